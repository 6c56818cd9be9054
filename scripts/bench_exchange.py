#!/usr/bin/env python3
"""Benchmark one round of the rollout exchange on local disk.

Simulates P peers in a temporary experiment directory. Each round, the P-1 other peers' rollout files
are put in place (not timed), then one node does what a worker does per round and the clock runs:
publish its own rollout file (atomic write with fsync), list the round's stage directory, read every
peer file and validate it against the schema (size cap, strict JSON, types, path consistency).
Prints the median (and p90) milliseconds per round for each peer count, split into our publish (atomic
write + fsync: independent of the peer count) and fetch + validate (grows with it). Goal: < 20 ms for 4 peers.

    python scripts/bench_exchange.py                 # 4, 8, 16, 32 and 64 peers, 20 rounds
    python scripts/bench_exchange.py --peers 4 16 64 --rounds 50 --dir /mnt/drive/tmp
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.layout import ExperimentLayout  # noqa: E402
from node.schemas import Rollout, RolloutFile, TaskRef  # noqa: E402
from node.storage import SharedStore, encode_json  # noqa: E402


def make_file(peer: str, rnd: int, groups: int, completions: int, rng: random.Random) -> RolloutFile:
    letters = "abcdefghijklmnopqrstuvwxyz      \n"
    rollouts = {}
    for b in range(groups):
        prompt = "".join(rng.choice(letters) for _ in range(300))
        task = TaskRef(dataset="basic_arithmetic", seed=rng.randrange(1 << 30), index=b)
        rollouts[str(b)] = [
            Rollout(prompt=prompt, response="".join(rng.choice(letters) for _ in range(200)),
                    reward=rng.random(), finished=True, task=task)
            for _ in range(completions)
        ]
    return RolloutFile(peer_id=peer, round=rnd, stage=0, timestamp=time.time(), rollouts=rollouts)


def bench(peers: int, rounds: int, groups: int, completions: int, base: Path) -> tuple[list[float], list[float]]:
    """Milliseconds per round: (publish + fetch + validate, publish alone)."""
    rng = random.Random(peers)
    layout = ExperimentLayout.for_experiment(base / f"p{peers}", "bench")
    layout.ensure_dirs()
    me = "worker_0"
    store = SharedStore(layout, node_id=me, lock_dir=base / "locks", spool_dir=base / f"spool{peers}")
    others = [f"worker_{i}" for i in range(1, peers)]
    times, publish = [], []
    for r in range(rounds):
        d = layout.rollouts_dir(r, 0)
        d.mkdir(parents=True, exist_ok=True)
        for peer in others:  # the peers' files already exist (not timed)
            (d / f"{peer}.json").write_bytes(encode_json(make_file(peer, r, groups, completions, rng).to_json()))
        mine = make_file(me, r, groups, completions, rng).to_json()

        t0 = time.perf_counter()
        assert store.publish(layout.rollout_file(r, 0, me), mine)
        publish.append((time.perf_counter() - t0) * 1000.0)
        got = []
        for path in store.list_json(d):
            rf = store.read_as(path, RolloutFile.from_json, expect_round=r, expect_stage=0, expect_node=path.stem)
            if rf is not None:
                got.append(rf)
        times.append((time.perf_counter() - t0) * 1000.0)
        assert len(got) == peers, f"round {r}: {len(got)} of {peers} files validated"
    return times, publish


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Time publish + list + read + validate of peers' rollout files per "
                                             "round on local disk (goal: < 20 ms/round for 4 peers).")
    ap.add_argument("--peers", type=int, nargs="+", default=[4, 8, 16, 32, 64],
                    help="peer counts to simulate (default: 4 8 16 32 64)")
    ap.add_argument("--rounds", type=int, default=20, help="rounds per peer count (median reported; default 20)")
    ap.add_argument("--groups", type=int, default=2, help="I: question groups per file (default 2)")
    ap.add_argument("--completions", type=int, default=4, help="G: completions per group (default 4)")
    ap.add_argument("--dir", type=Path, default=None, help="where to put the experiment (default: a temp dir)")
    args = ap.parse_args(argv)
    if min(args.peers) < 1 or args.rounds < 1:
        ap.error("--peers and --rounds must be >= 1")
    with tempfile.TemporaryDirectory(prefix="bench_exchange_", dir=args.dir) as tmp:
        print(f"{'peers':>6} {'ms/round (median)':>18} {'p90':>8} {'publish':>8} {'fetch+validate':>15} "
              f"{'ms/peer file':>13}   (I={args.groups}, G={args.completions}, {args.rounds} rounds, {tmp})")
        bench(4, 3, args.groups, args.completions, Path(tmp) / "warm-up")  # imports, first directories
        for p in args.peers:
            times, publish = bench(p, args.rounds, args.groups, args.completions, Path(tmp))
            med = statistics.median(times)
            p90 = sorted(times)[max(0, int(len(times) * 0.9) - 1)]
            pub = statistics.median(publish)
            fetch = statistics.median(t - q for t, q in zip(times, publish))
            print(f"{p:>6} {med:>18.2f} {p90:>8.2f} {pub:>8.2f} {fetch:>15.2f} {fetch / p:>13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
