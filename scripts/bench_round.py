#!/usr/bin/env python
"""Seconds per phase of one SAPO round on one process, and tokens/s, so later changes can be compared.

    python scripts/bench_round.py                      # builtin tiny model on CPU, default task mix
    python scripts/bench_round.py --model builtin:tiny-gpt2 --rounds 5 -I 2 -J 2 -G 4 --max-new-tokens 64

Phases: sample (questions from the task mix), generate (one batched generate for I*G sequences), score
(local rewards), external (re-build and re-score J peer groups from a second in-process policy),
train (loss, backward, optimizer step). The first round is a warm-up and is not counted.

A random model scores 0 on reasoning-gym, which would make every group signal-free and skip training;
so after the real scoring is timed, rewards are replaced by seeded random numbers (``--real-rewards``
keeps them) and the train phase always runs on the full (I+J)*G batch.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from node.models import load_model  # noqa: E402
from sapo.config import DEFAULT_TASKS, SapoConfig, TaskSpec  # noqa: E402
from sapo.learner import SapoLearner  # noqa: E402
from sapo.swarm import share_group  # noqa: E402


def parse_args(argv=None):
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:tiny-gpt2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds (after one warm-up)")
    p.add_argument("-I", type=int, default=2)
    p.add_argument("-J", type=int, default=2)
    p.add_argument("-G", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--tasks", default=",".join(t.name for t in DEFAULT_TASKS))
    p.add_argument("--real-rewards", action="store_true", help="train on the real (mostly zero) rewards")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the benchmark and print one table."""
    args = parse_args(argv)
    config = SapoConfig(
        num_train_samples=args.I, num_transplant_trees=args.J, num_generations=args.G,
        max_new_tokens=args.max_new_tokens, tasks=tuple(TaskSpec(n) for n in args.tasks.split(",")),
    )
    me = load_model(args.model, device=args.device, dtype=args.dtype, seed=0)
    peer = load_model(args.model, device=args.device, dtype=args.dtype, seed=1)
    learner = SapoLearner(me.model, me.tokenizer, config)
    other = SapoLearner(peer.model, peer.tokenizer, config)
    rng = random.Random(0)
    rows = []
    for round_ in range(args.rounds + 1):
        t0 = time.perf_counter()
        questions = learner.sample_questions("bench", round_)
        t1 = time.perf_counter()
        local, gen = learner.generate(questions, seed=round_, source="bench")
        # The peer needs at least J groups; give it max(I, J) questions so selection can fill J.
        peer_questions = other.bank.sample(0, "peer", round_, max(args.I, args.J))
        peer_groups, _ = other.generate(peer_questions, seed=10_000 + round_, source="peer")
        if not args.real_rewards:
            for g in local:
                g.rewards = [rng.random() for _ in g.rewards]
            learner.bank.score = lambda *_a, **_k: rng.random()  # external re-scoring, same reason
        t2 = time.perf_counter()
        chosen = learner.select_external([share_group(g, "peer") for g in peer_groups], "bench", rng)
        t3 = time.perf_counter()
        if not args.real_rewards:
            del learner.bank.score  # back to the class's real scorer for the next round's local groups
        stats = learner.train(local + chosen.groups)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t4 = time.perf_counter()
        rows.append({
            "sample": t1 - t0, "generate": gen.generate_s, "score": gen.score_s, "external": t3 - t2,
            "train": t4 - t3, "round": (t4 - t0) - (t2 - t1) + gen.generate_s + gen.score_s,
            "gen_tokens": gen.generated_tokens, "train_tokens": stats.completion_tokens,
            "external_used": len(chosen.groups), "skipped": stats.skipped,
        })
    measured = rows[1:]

    def med(key):
        return statistics.median(r[key] for r in measured)

    print(f"model={args.model} device={args.device} I={args.I} J={args.J} G={args.G} "
          f"max_new_tokens={args.max_new_tokens} rounds={args.rounds} (median after 1 warm-up)")
    print(f"{'phase':<10} {'seconds':>9}")
    for phase in ("sample", "generate", "score", "external", "train", "round"):
        print(f"{phase:<10} {med(phase):9.4f}")
    gen_tps = sum(r["gen_tokens"] for r in measured) / sum(r["generate"] for r in measured)
    train_tps = sum(r["train_tokens"] for r in measured) / max(sum(r["train"] for r in measured), 1e-9)
    print(f"generate tokens/s  {gen_tps:10.1f}")
    print(f"train tokens/s     {train_tps:10.1f}  (completion tokens through loss/backward/step)")
    print(f"external groups used per round: {[r['external_used'] for r in measured]}; "
          f"steps skipped (no signal): {sum(1 for r in measured if r['skipped'])}/{len(measured)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
