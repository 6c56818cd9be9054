#!/usr/bin/env python
"""A worker's round (SapoLearner, J=0) vs TRL's GRPOTrainer step, same tiny model, prompts and batch, on the CPU.

    pip install -e '.[bench]'          # trl (and datasets), only needed here
    python scripts/bench_trl.py        # builtin:tiny-gpt2, I=2 G=4, 32 new tokens, 10 rounds/steps, 1 thread

Both sides: the same freshly initialised model (seed 42), the same I prompts per round (our task bank's
questions for worker_1, round r, in order; TRL's dataset is those prompts, unshuffled), G completions each,
temperature 1, top_p 1, no top-k, beta 0, clip 0.2 / 0.28, token-level loss ("dapo" in TRL, what the
learner does), one optimizer step per round, dropout off. Both score every completion with our tasks,
then train on seeded random rewards (a random model scores almost only zeros, which would make TRL's
loss zero and the learner skip its step), so both always do the full forward/backward/step. A TRL step
includes its generation, reward and loss/backward/step, like our round. Seconds per round/step are the
median after the first (warm-up) one.

The two sides alternate: after each TRL step (timed from its on_step_begin to its on_step_end) a callback
runs our round of the same index (its own RNG state forked off, so TRL samples as if alone), so a busy
machine slows both sides alike instead of whichever ran during the noise.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("-I", type=int, default=2)
    p.add_argument("-G", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--tasks", default="toy_copy,basic_arithmetic")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)")
    p.add_argument("--decode", choices=("auto", "generate", "lean"), default="auto",
                   help="our sampling loop (sapo.decode; auto = the worker's default for the CPU)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run both sides and print one table."""
    args = parse_args(argv)
    try:
        import datasets
        import trl
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as err:
        print(f"bench_trl: {err}; install the bench extra: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    import torch
    import transformers
    from transformers import TrainerCallback

    from sapo.config import SapoConfig, TaskSpec
    from sapo.learner import SapoLearner
    from sapo.tiny_model import build_tiny_gpt2

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    config = SapoConfig(num_train_samples=args.I, num_transplant_trees=0, num_generations=args.G,
                        max_new_tokens=args.max_new_tokens, learning_rate=1e-4, decode=args.decode,
                        tasks=tuple(TaskSpec(n) for n in args.tasks.split(",")))

    # --- ours: the worker's round without the exchange, run between TRL's steps ---------------------
    learner = SapoLearner(*build_tiny_gpt2(seed=42), config, experiment_seed=42)
    questions_by_round = [learner.sample_questions("worker_1", r) for r in range(args.rounds)]
    ours, phases = [], {"generate": [], "score": [], "train": []}
    ours_rng, trl_rng = random.Random(0), random.Random(1)

    def our_round(r: int) -> None:
        t0 = time.perf_counter()
        groups, gen = learner.generate(questions_by_round[r], seed=r)
        for g in groups:  # random rewards, as TRL gets below: every step trains on the whole batch
            g.rewards = [ours_rng.random() for _ in g.rewards]
        stats = learner.train(groups)
        assert stats.optimizer_steps == 1
        ours.append(time.perf_counter() - t0)
        phases["generate"].append(gen.generate_s)
        phases["score"].append(gen.score_s)
        phases["train"].append(stats.seconds)

    bank = learner.bank

    # --- TRL: GRPOTrainer on the same prompts -------------------------------------------------------
    prompts, by_prompt = [], {}
    for questions in questions_by_round:
        for q in questions:
            prompt = learner.prompt_for(q.text)
            prompts.append(prompt)
            by_prompt[prompt] = q

    def reward(prompts, completions, **_):
        # Score for real (the cost is part of a step), then train on seeded random rewards: a random
        # model scores almost only zeros, which would make TRL's loss zero and ours skip its step.
        [bank.score(by_prompt[p], c, config.format_reward) for p, c in zip(prompts, completions)]
        return [trl_rng.random() for _ in completions]

    class Alternate(TrainerCallback):
        """Times each TRL step, then runs our round of the same index outside TRL's timed window."""

        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, *_a, **_k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_a, **_k):
            self.times.append(time.perf_counter() - self.t0)
            with torch.random.fork_rng(devices=[]):  # our seeding must not change what TRL samples next
                our_round(len(self.times) - 1)

    model, tokenizer = build_tiny_gpt2(seed=42)
    timer = Alternate()
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        trl_args = GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=args.I * args.G, num_generations=args.G,
            max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
            epsilon=0.2, epsilon_high=0.28, loss_type="dapo", learning_rate=config.learning_rate,
            max_steps=args.rounds, logging_steps=10_000, report_to=[], disable_tqdm=True, use_cpu=True, bf16=False,
            save_strategy="no",
            shuffle_dataset=False, seed=42, num_iterations=1, disable_dropout=True, max_grad_norm=1.0,
            lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0,
        )
        trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=reward, args=trl_args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), callbacks=[timer])
        trainer.train()
    trl_times = timer.times
    assert len(ours) == len(trl_times) == args.rounds, (len(ours), len(trl_times))

    med = lambda xs: statistics.median(xs[1:]) if len(xs) > 1 else float("nan")  # noqa: E731
    print(f"bench_trl: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, trl {trl.__version__}; builtin:tiny-gpt2, I={args.I} "
          f"G={args.G}, {args.max_new_tokens} new tokens, {args.rounds} rounds (median after the first), "
          f"our decode loop {learner.config.decode}")
    print(f"{'':<34}{'SapoLearner round':>18}{'GRPOTrainer step':>18}")
    print(f"{'s per round / step':<34}{med(ours):>18.4f}{med(trl_times):>18.4f}")
    print(f"{'ratio (ours / TRL)':<34}{med(ours) / med(trl_times):>18.2f}x")
    print("ours by phase (median s): " + ", ".join(f"{k} {med(v):.4f}" for k, v in phases.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
