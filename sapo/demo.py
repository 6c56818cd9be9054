"""A single-process SAPO demo: two in-process policies, each training on I local groups plus J groups
sampled by the other, on the built-in tiny model. Prints the reward of every round.

    python -m sapo.demo --rounds 30

The default task is the toy copy task, which the tiny model can learn in minutes on a CPU; pass
``--tasks basic_arithmetic`` (or any reasoning-gym name) to see the real mix (a random tiny model scores 0).
"""

from __future__ import annotations

import argparse
import random
import time

from sapo.config import SapoConfig, TaskSpec
from sapo.learner import SapoLearner, mean_reward
from sapo.swarm import share_group
from sapo.tiny_model import build_tiny_gpt2


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options of the demo."""
    p = argparse.ArgumentParser(prog="python -m sapo.demo", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30, help="rounds to run (default 30)")
    p.add_argument("--tasks", default="toy_copy", help="comma-separated task names (default toy_copy)")
    p.add_argument("-I", "--local", type=int, default=2, help="local questions per round (I)")
    p.add_argument("-J", "--external", type=int, default=2, help="external groups per round (J)")
    p.add_argument("-G", "--generations", type=int, default=8, help="completions per question (G)")
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (the tiny model likes it large)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the demo; returns a process exit code."""
    args = parse_args(argv)
    config = SapoConfig(
        num_train_samples=args.local,
        num_transplant_trees=args.external,
        num_generations=args.generations,
        max_new_tokens=args.max_new_tokens,
        learning_rate=args.lr,
        tasks=tuple(TaskSpec(name.strip()) for name in args.tasks.split(",") if name.strip()),
    )
    names = ("node_a", "node_b")
    learners = {
        n: SapoLearner(*build_tiny_gpt2(seed=args.seed + i), config, experiment_seed=args.seed)
        for i, n in enumerate(names)
    }
    rng = random.Random(args.seed)
    print(f"SAPO demo: I={args.local} J={args.external} G={args.generations} tasks={args.tasks}")
    print("round  reward[node_a]  reward[node_b]  external used  seconds")
    for round_ in range(args.rounds):
        t0 = time.perf_counter()
        local = {}
        for i, name in enumerate(names):
            learner = learners[name]
            questions = learner.sample_questions(name, round_)
            local[name], _ = learner.generate(questions, seed=args.seed * 1_000_003 + round_ * 2 + i, source=name)
        used = []
        for name in names:
            peer = names[1 - names.index(name)]
            shared = [share_group(g, peer) for g in local[peer]]
            chosen = learners[name].select_external(shared, name, rng)
            learners[name].train(local[name] + chosen.groups)
            used.append(len(chosen.groups))
        print(f"{round_:5d}  {mean_reward(local['node_a']):14.3f}  {mean_reward(local['node_b']):14.3f}"
              f"  {used[0]:>6d} / {used[1]:<6d}  {time.perf_counter() - t0:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
