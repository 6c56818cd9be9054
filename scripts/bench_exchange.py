#!/usr/bin/env python3
"""Benchmark one round of the rollout exchange on local disk, and what signing it costs.

Simulates P peers in a temporary experiment directory. Each round, the P-1 other peers' rollout files
are put in place (not timed), then one node does what a worker does per round and the clock runs:
publish its own rollout file (atomic write with fsync), list the round's stage directory, read every
peer file and validate it against the schema (size cap, strict JSON, types, path consistency).
Prints the median (and p90) milliseconds per round for each peer count, split into our publish (atomic
write + fsync: independent of the peer count) and fetch + validate (grows with it). Goal: < 20 ms for 4 peers.
Beside them, the OS calls one node's exchange makes on the shared dir per round (counted through the store's
``fs``: what a network mount gets as round trips when nothing is cached): all of them, then the listings,
the stats (lstat, stat, fstat) and the opens. ``--call-ms X`` sleeps X ms in every such call, a model of a
mount whose every call is a round trip (Drive, NFS; docs/OPERATIONS.md "More than one machine").

Then the signatures (HMAC-SHA256 over each file, docs/RELIABILITY.md, threat model) at ``--sign-peers``
peers (64 by default): the same exchange without a key and with one, rounds interleaved in one run, side by
side; and the signature work alone (signing our file + verifying every peer file, timed on the same bytes),
as a percentage of the exchange without a key. Goal: < 5 %.

    python scripts/bench_exchange.py                 # 4, 8, 16, 32 and 64 peers, 20 rounds; signing at 64
    python scripts/bench_exchange.py --peers 4 16 64 --rounds 50 --dir /mnt/drive/tmp
    python scripts/bench_exchange.py --peers 4 8 16 32 64 --call-ms 20 --sign-peers 0   # a 20 ms/call mount
"""

from __future__ import annotations

import argparse
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.fsio import RealFS  # noqa: E402
from node.layout import ExperimentLayout  # noqa: E402
from node.schemas import Rollout, RolloutFile, TaskRef  # noqa: E402
from node.signing import Signer  # noqa: E402
from node.storage import SharedStore, encode_json  # noqa: E402

SIGNING_GOAL_PCT = 5.0  # signing + verifying, in % of the exchange without a key


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


class CountingFS(RealFS):
    """The OS calls of the store, counted by name; each one delayed by ``call_ms`` (a mount's round trip)."""

    def __init__(self, call_ms: float = 0.0):
        self.calls: dict[str, int] = {}
        self.delay_s = call_ms / 1000.0

    def __getattribute__(self, name):
        attr = super().__getattribute__(name)
        if name.startswith("_") or name in ("calls", "delay_s") or not callable(attr):
            return attr

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.delay_s:
                time.sleep(self.delay_s)
            return attr(*args, **kwargs)
        return counted


class Exchange:
    """One node's view of a simulated experiment with ``peers`` peers, signed with ``key`` (None: unsigned),
    its OS calls through ``fs`` (default: the real ones, uncounted)."""

    def __init__(self, base: Path, peers: int, groups: int, completions: int, key: bytes | None, tag: str = "",
                 fs: RealFS | None = None):
        self.rng = random.Random(peers)
        self.layout = ExperimentLayout.for_experiment(base / f"p{peers}{tag}", "bench")
        self.layout.ensure_dirs()
        self.me = "worker_0"
        self.store = SharedStore(self.layout, node_id=self.me, lock_dir=base / "locks", spool_dir=base / f"spool{peers}{tag}",
                                 signer=Signer(key), fs=fs)
        self.others = [f"worker_{i}" for i in range(1, peers)]
        self.groups, self.completions, self.peers = groups, completions, peers

    def prepare(self, r: int) -> dict:
        """The peers' files of round ``r`` in place (signed as they would sign them); our file's content."""
        d = self.layout.rollouts_dir(r, 0)
        d.mkdir(parents=True, exist_ok=True)
        for peer in self.others:
            path = self.layout.rollout_file(r, 0, peer)
            path.write_bytes(self.store.encode_signed(path, make_file(peer, r, self.groups, self.completions,
                                                                      self.rng).to_json()))
        return make_file(self.me, r, self.groups, self.completions, self.rng).to_json()

    def round(self, r: int, mine: dict) -> tuple[float, float]:
        """One timed round: (ms for publish + fetch + validate, ms for the publish alone)."""
        t0 = time.perf_counter()
        assert self.store.publish(self.layout.rollout_file(r, 0, self.me), mine)
        publish = (time.perf_counter() - t0) * 1000.0
        got = []
        d = self.layout.rollouts_dir(r, 0)
        for path in self.store.list_json(d):
            rf = self.store.read_as(path, RolloutFile.from_json, expect_round=r, expect_stage=0, expect_node=path.stem)
            if rf is not None:
                got.append(rf)
        total = (time.perf_counter() - t0) * 1000.0
        assert len(got) == self.peers, f"round {r}: {len(got)} of {self.peers} files validated"
        return total, publish

    def signature_ms(self, r: int, mine: dict) -> tuple[float, float]:
        """The signature work of round ``r`` alone, on the bytes the exchange just read: (ms to sign our file
        and verify every file of the round, ms to compute their paths' contexts). The contexts are computed
        with or without a key (SharedStore.verified always asks for one), so only the first is overhead."""
        paths = [self.layout.rollout_file(r, 0, p) for p in (self.me, *self.others)]
        data = [p.read_bytes() for p in paths]
        body = encode_json(mine)
        t0 = time.perf_counter()
        contexts = [self.store.context(p) for p in paths]
        t1 = time.perf_counter()
        self.store.signer.sign(body, contexts[0])
        for context, raw in zip(contexts, data):
            self.store.signer.verify(raw, context)
        t2 = time.perf_counter()
        return (t2 - t1) * 1000.0, (t1 - t0) * 1000.0


CALL_KINDS = {"list": ("listdir",), "stat": ("lstat", "stat", "fstat"), "open": ("open",)}


def bench(peers: int, rounds: int, groups: int, completions: int, base: Path, call_ms: float = 0.0
          ) -> tuple[list[float], list[float], dict[str, float]]:
    """Milliseconds per round: (publish + fetch + validate, publish alone), and the store's OS calls per round
    (``all`` and per :data:`CALL_KINDS`), each call delayed by ``call_ms``."""
    fs = CountingFS(call_ms)
    ex = Exchange(base, peers, groups, completions, None, fs=fs)
    times, publish, counted = [], [], {}
    for r in range(rounds):
        mine = ex.prepare(r)
        before = dict(fs.calls)
        total, pub = ex.round(r, mine)
        times.append(total)
        publish.append(pub)
        for name, n in fs.calls.items():
            counted[name] = counted.get(name, 0) + n - before.get(name, 0)
    per_round = {kind: sum(counted.get(n, 0) for n in names) / rounds for kind, names in CALL_KINDS.items()}
    return times, publish, {"all": sum(counted.values()) / rounds, **per_round}


def bench_signing(peers: int, rounds: int, groups: int, completions: int, base: Path) -> dict[str, float]:
    """The exchange without and with a key, rounds interleaved in pairs (so both see the same machine load),
    and the signature work alone. Medians in ms; the overheads in % of the exchange without a key (the
    side-by-side one from the paired differences, which cancel most of a busy machine's drift)."""
    plain = Exchange(base, peers, groups, completions, None, "-plain")
    signed = Exchange(base, peers, groups, completions, secrets.token_bytes(32), "-signed")
    plain_ms, signed_ms, crypto_ms, context_ms = [], [], [], []
    for r in range(rounds):
        for ex in (plain, signed) if r % 2 == 0 else (signed, plain):
            mine = ex.prepare(r)
            (signed_ms if ex is signed else plain_ms).append(ex.round(r, mine)[0])
            if ex is signed:
                crypto, context = signed.signature_ms(r, mine)
                crypto_ms.append(crypto)
                context_ms.append(context)
    base_ms = statistics.median(plain_ms)
    paired = statistics.median(b - a for a, b in zip(plain_ms, signed_ms))
    crypto = statistics.median(crypto_ms)
    return {"without_key_ms": base_ms, "with_key_ms": statistics.median(signed_ms),
            "difference_pct": 100.0 * paired / base_ms, "signature_ms": crypto,
            "signature_pct": 100.0 * crypto / base_ms, "context_ms": statistics.median(context_ms)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Time publish + list + read + validate of peers' rollout files per "
                                             "round on local disk (goal: < 20 ms/round for 4 peers).")
    ap.add_argument("--peers", type=int, nargs="+", default=[4, 8, 16, 32, 64],
                    help="peer counts to simulate (default: 4 8 16 32 64)")
    ap.add_argument("--rounds", type=int, default=20, help="rounds per peer count (median reported; default 20)")
    ap.add_argument("--groups", type=int, default=2, help="I: question groups per file (default 2)")
    ap.add_argument("--completions", type=int, default=4, help="G: completions per group (default 4)")
    ap.add_argument("--dir", type=Path, default=None, help="where to put the experiment (default: a temp dir)")
    ap.add_argument("--sign-peers", type=int, default=64,
                    help="peer count of the signing comparison (default 64; 0: skip it)")
    ap.add_argument("--call-ms", type=float, default=0.0,
                    help="sleep this long in every OS call of the exchange table: a mount whose every call is a "
                         "round trip (default 0: local disk as it is)")
    args = ap.parse_args(argv)
    if min(args.peers) < 1 or args.rounds < 1 or args.sign_peers < 0 or args.call_ms < 0:
        ap.error("--peers and --rounds must be >= 1, --sign-peers and --call-ms >= 0")
    with tempfile.TemporaryDirectory(prefix="bench_exchange_", dir=args.dir) as tmp:
        latency = f", every OS call +{args.call_ms:g} ms" if args.call_ms else ""
        print(f"{'peers':>6} {'ms/round (median)':>18} {'p90':>8} {'publish':>8} {'fetch+validate':>15} "
              f"{'ms/peer file':>13} {'calls':>7} {'list':>5} {'stat':>6} {'open':>6}   (I={args.groups}, "
              f"G={args.completions}, {args.rounds} rounds{latency}, {tmp}; calls: OS calls per round)")
        bench(4, 3, args.groups, args.completions, Path(tmp) / "warm-up")  # imports, first directories
        for p in args.peers:
            times, publish, calls = bench(p, args.rounds, args.groups, args.completions, Path(tmp), args.call_ms)
            med = statistics.median(times)
            p90 = sorted(times)[max(0, int(len(times) * 0.9) - 1)]
            pub = statistics.median(publish)
            fetch = statistics.median(t - q for t, q in zip(times, publish))
            print(f"{p:>6} {med:>18.2f} {p90:>8.2f} {pub:>8.2f} {fetch:>15.2f} {fetch / p:>13.3f} {calls['all']:>7.0f} "
                  f"{calls['list']:>5.0f} {calls['stat']:>6.0f} {calls['open']:>6.0f}")
        if args.sign_peers:
            rounds = max(args.rounds, 2)
            sig = bench_signing(args.sign_peers, rounds, args.groups, args.completions, Path(tmp))
            verdict = "OK" if sig["signature_pct"] < SIGNING_GOAL_PCT else "OVER"
            print(f"\nsigning at {args.sign_peers} peers ({rounds} rounds, the two interleaved; median ms/round): "
                  f"without a key {sig['without_key_ms']:.2f}, with a key {sig['with_key_ms']:.2f} "
                  f"(paired difference {sig['difference_pct']:+.1f} %)")
            print(f"signature work alone (HMAC-SHA256: sign ours + verify {args.sign_peers} files): "
                  f"{sig['signature_ms']:.3f} ms = {sig['signature_pct']:.2f} % of the exchange (goal < "
                  f"{SIGNING_GOAL_PCT:g} %: {verdict}); the files' path contexts {sig['context_ms']:.3f} ms more, "
                  f"computed with or without a key")
    return 0


if __name__ == "__main__":
    sys.exit(main())
