#!/usr/bin/env python
"""Which weight precision and optimizer learn: the GRPO learning test's task under each, side by side (CPU).

    python scripts/bench_precision.py                 # 3 seeds, 40 steps, lr 3e-3 and 3e-4
    python scripts/bench_precision.py --seeds 5 --steps 60 --lrs 1e-3

Task (as tests/test_sapo_learning.py): builtin:tiny-gpt2, 4 prompts x 8 completions of 3 tokens, reward 1
when the first completion token id is a multiple of 4 (about 1 in 4 at random). For each configuration,
learning rate and seed it runs the same GRPO steps and prints the mean reward of the first and last 5
steps. Configurations:

  fp32          float32 weights, torch Adam (the reference)
  fp32+bf16ac   float32 weights and Adam state, forward passes under bfloat16 autocast
  bf16          bfloat16 weights, torch Adam (its moments are bfloat16 too; updates round to nearest)
  bf16+sr       bfloat16 weights, StochasticRoundingAdamW (float32 moments, stochastically rounded weights)

A second table shows what one Adam step at GPT-2's lr 1e-5 does to builtin:gpt2-124m's weights under each
precision: the share of weights that changed at all, and the mean moved distance relative to fp32's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sapo.config import SapoConfig, TaskSpec  # noqa: E402
from sapo.learner import SapoLearner, mean_reward  # noqa: E402
from sapo.optim import StochasticRoundingAdamW  # noqa: E402
from sapo.rollouts import Group, encode_prompt, sample_completions  # noqa: E402
from sapo.tiny_model import build_builtin, build_tiny_gpt2  # noqa: E402

CONFIGS = {  # name -> (weights dtype, autocast dtype, optimizer)
    "fp32": (torch.float32, None, "adam"),
    "fp32+bf16ac": (torch.float32, torch.bfloat16, "adam"),
    "bf16": (torch.bfloat16, None, "adam"),
    "bf16+sr": (torch.bfloat16, None, "adamw_sr"),
}
PROMPTS = [f"Say something about {w}." for w in ("cats", "rain", "numbers", "ships")]


def learning_run(name: str, lr: float, seed: int, steps: int) -> list[float]:
    """Mean reward of every step of one GRPO run."""
    dtype, autocast, optimizer = CONFIGS[name]
    model, tok = build_tiny_gpt2(seed=seed)
    config = SapoConfig(num_train_samples=4, num_generations=8, max_new_tokens=3, learning_rate=lr,
                        optimizer=optimizer, tasks=(TaskSpec("toy_copy"),))
    learner = SapoLearner(model.to(dtype), tok, config, experiment_seed=seed, autocast=autocast)
    prompt_ids = [encode_prompt(tok, p, 64) for p in PROMPTS]
    history = []
    for step in range(steps):
        with learner.autocast():
            sampled = sample_completions(learner.model, tok, prompt_ids, num_generations=8, max_new_tokens=3,
                                         temperature=1.0, top_p=1.0, seed=seed * 1000 + step)
        groups = [Group(None, p, ids, comps, rewards=[float(c.token_ids[0] % 4 == 0) for c in comps])
                  for p, ids, comps in zip(PROMPTS, prompt_ids, sampled)]
        history.append(mean_reward(groups))
        learner.train(groups)
    return history


def update_survival(lr: float = 1e-5) -> dict[str, tuple[float, float]]:
    """name -> (share of GPT-2-124M weights changed by one Adam step, mean |move| / fp32's)."""
    model, _ = build_builtin("builtin:gpt2-124m", 0)
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(model.parameters())]
    out, reference = {}, None
    for name, make in (
        ("fp32", lambda ps: torch.optim.Adam(ps, lr=lr)),
        ("bf16", lambda ps: torch.optim.Adam(ps, lr=lr)),
        ("bf16+sr", lambda ps: StochasticRoundingAdamW(ps, lr=lr, seed=0)),
    ):
        dtype = torch.float32 if name == "fp32" else torch.bfloat16
        params = [torch.nn.Parameter(p.detach().to(dtype).clone()) for p in model.parameters()]
        before = [p.detach().clone() for p in params]
        opt = make(params)
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        opt.step()
        changed = sum(int((p != b).sum()) for p, b in zip(params, before))
        total = sum(p.numel() for p in params)
        moved = sum(float((p.detach().float() - b.float()).abs().sum()) for p, b in zip(params, before)) / total
        reference = reference or moved
        out[name] = (changed / total, moved / reference)
        del params, before, opt
    return out


def main(argv=None) -> int:
    """Run both tables and print them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lrs", default="3e-3,3e-4", help="comma-separated learning rates (default 3e-3,3e-4)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    p.add_argument("--no-survival", action="store_true", help="skip the GPT-2-124M one-step table")
    args = p.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or args.seeds < 1 or args.steps < 10:
        p.error(f"unknown configs {unknown}" if unknown else "--seeds >= 1 and --steps >= 10")
    lrs = [float(x) for x in args.lrs.split(",") if x]
    torch.set_num_threads(1)
    print(f"GRPO learning test task, builtin:tiny-gpt2, {args.steps} steps, {args.seeds} seeds; reward = mean "
          f"of the first / last 5 steps (chance ~0.25)")
    print(f"{'config':<12} {'lr':>7} {'first 5':>8} {'last 5':>8} {'gain':>7} {'gain min..max over seeds':>26} {'s/run':>6}")
    for lr in lrs:
        for name in names:
            firsts, lasts, gains, secs = [], [], [], []
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                h = learning_run(name, lr, seed, args.steps)
                secs.append(time.perf_counter() - t0)
                firsts.append(statistics.mean(h[:5]))
                lasts.append(statistics.mean(h[-5:]))
                gains.append(lasts[-1] - firsts[-1])
            print(f"{name:<12} {lr:>7.0e} {statistics.mean(firsts):>8.3f} {statistics.mean(lasts):>8.3f} "
                  f"{statistics.mean(gains):>+7.3f} {min(gains):>+12.3f} .. {max(gains):>+8.3f} "
                  f"{statistics.mean(secs):>6.1f}", flush=True)
    if not args.no_survival:
        print("\nOne Adam step at lr 1e-5 on builtin:gpt2-124m (random gradients):")
        print(f"{'config':<12} {'weights changed':>16} {'mean move vs fp32':>18}")
        for name, (share, moved) in update_survival().items():
            print(f"{name:<12} {share:>15.1%} {moved:>18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
