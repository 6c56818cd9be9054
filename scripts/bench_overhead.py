#!/usr/bin/env python
"""Swarm overhead on the CPU: the same rounds of work run by the supervised swarm and in one process.

    python scripts/bench_overhead.py                      # both variants, 10 rounds each
    python scripts/bench_overhead.py --variant one --rounds 20 --max-new-tokens 64
    python scripts/bench_overhead.py --polls 0.5           # the swarm at the config's poll interval only

Variant "one": 1 worker, J=0. The swarm is `swarm launch` (supervisor + coordinator + worker processes,
files in a temporary root); the single process is a plain loop over SapoLearner with the same resolved
config, model seed and per-round sampling seeds as the worker (sample, generate, score, train: no files,
no processes). Both therefore do exactly the same work, which is checked: the tokens generated in each
round must be equal.

Variant "two": 2 workers, J=2. The single process does both workers' work one after the other (each
generates, then each re-scores the other's groups and trains), as the worker would with the peer's file.

Printed per variant: start-up (the swarm: launch -> the last worker starts round 0, i.e. CLI, config
checks, staggered spawns, imports, model load; one process: model load and learner set-up only, its
imports excluded), wall seconds (start-up + every round), seconds per round over the measured rounds
(the first --skip-rounds are left out), both as the swarm's pace (metrics timestamps, so the
coordinator's round switch is included) and as the worker's own round_s, and the ratio swarm / one
process per round (goal <= 1.10x). The swarm is run at each coordinator poll interval of --polls
(default: the config's, and 0.1 s): polling is how a round ends and the next begins. Every side runs
--repeat times, alternating, and the median repeat is shown (other work on a small machine moves single
runs a lot); CPU seconds per round (user + system, sampled from the worker processes) are shown too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_CONFIG = REPO / "configs" / "smoke-cpu.yaml"
GOAL_RATIO = 1.10


@dataclass
class Side:
    """One way of running the rounds: its start-up, wall time and per-round times."""

    name: str
    startup_s: float | None = None
    wall_s: float | None = None
    per_round_s: float | None = None  # mean over the measured rounds (the pace)
    compute_round_s: float | None = None  # mean worker round_s (the swarm) / loop round (one process)
    tokens: dict = field(default_factory=dict)  # (worker, round) -> tokens generated
    phases: dict = field(default_factory=dict)  # mean seconds per phase of a round (all workers' for one process)
    cpu_per_round_s: float | None = None  # CPU seconds (user + system) per measured round, all workers
    load: float | None = None  # the 1-minute load average when this side finished
    spread: tuple = ()  # (min, max) s/round over the repeats, when there were several
    error: str = ""
    switch_ms: list = field(default_factory=list)  # the coordinator's round switch latencies (the swarm)


def mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def swarm_side(name: str, metrics: dict[str, list[dict]], *, launch_wall: float, end_wall: float,
               skip_rounds: int) -> Side:
    """The swarm's figures from its workers' metrics lines (each with round, timestamp, timings.round_s)."""
    side = Side(name, wall_s=end_wall - launch_wall)
    paces, computes, starts, phases = [], [], [], {}
    for worker, lines in metrics.items():
        lines = sorted(lines, key=lambda m: m["round"])
        if not lines:
            continue
        starts.append(lines[0]["timestamp"] - lines[0]["timings"]["round_s"])
        for m in lines:
            side.tokens[(worker, m["round"])] = m.get("tokens_generated")
        measured = [m for m in lines if m["round"] >= skip_rounds]
        before = [m for m in lines if m["round"] < skip_rounds]
        if measured:
            t0 = before[-1]["timestamp"] if before else measured[0]["timestamp"] - measured[0]["timings"]["round_s"]
            paces.append((measured[-1]["timestamp"] - t0) / len(measured))
            computes += [m["timings"]["round_s"] for m in measured]
            for m in measured:
                for phase, seconds in m["timings"].items():
                    phases.setdefault(phase, []).append(seconds)
    side.startup_s = max(starts) - launch_wall if starts else None
    side.per_round_s = mean(paces)
    side.compute_round_s = mean(computes)
    side.phases = {k: mean(v) for k, v in phases.items() if k != "round_s"}
    return side


def cpu_per_round(metrics: dict[str, list[dict]], samples: dict[str, list[tuple[float, float]]],
                  skip_rounds: int) -> float | None:
    """CPU seconds per measured round summed over workers, from (wall, CPU) samples of each worker process.

    A worker's window runs from the end of its last skipped round to the end of its last round; the
    samples nearest inside the window bound it (sampled every 0.1 s, so this is approximate).
    """
    total, rounds = 0.0, None
    for worker, lines in metrics.items():
        lines = sorted(lines, key=lambda m: m["round"])
        measured = [m for m in lines if m["round"] >= skip_rounds]
        before = [m for m in lines if m["round"] < skip_rounds]
        pts = samples.get(worker, [])
        if not measured or not before or not pts:
            return None
        t0, t1 = before[-1]["timestamp"], measured[-1]["timestamp"]
        inside = [(t, c) for t, c in pts if t0 <= t <= t1]
        if len(inside) < 2:
            return None
        total += (inside[-1][1] - inside[0][1]) * (t1 - t0) / max(inside[-1][0] - inside[0][0], 1e-9)
        rounds = len(measured) if rounds is None else min(rounds, len(measured))
    return total / rounds if rounds else None


def pick_median(sides: list[Side]) -> Side:
    """The repeat with the median pace (the lower middle one for an even count), with the spread attached."""
    ok = sorted((x for x in sides if x.per_round_s is not None), key=lambda x: x.per_round_s)
    if not ok:
        return sides[0]
    chosen = ok[(len(ok) - 1) // 2]
    if len(ok) > 1:
        chosen.spread = (ok[0].per_round_s, ok[-1].per_round_s)
    return chosen


def ratio(swarm: Side, single: Side) -> float | None:
    """Swarm seconds per round / one process's, over the same measured rounds."""
    if not swarm.per_round_s or not single.per_round_s:
        return None
    return swarm.per_round_s / single.per_round_s


def same_work(swarm: Side, single: Side) -> str:
    """'yes' when every (worker, round) generated the same number of tokens on both sides."""
    common = set(swarm.tokens) & set(single.tokens)
    if not common:
        return "unknown (no common rounds)"
    diff = sorted(k for k in common if swarm.tokens[k] != single.tokens[k])
    missing = sorted(set(single.tokens) - set(swarm.tokens))
    if diff:
        return f"NO: tokens differ in {len(diff)} of {len(common)} (worker, round), e.g. {diff[0]}"
    if missing:
        return f"yes for {len(common)} (worker, round); the swarm skipped {len(missing)}, e.g. {missing[0]}"
    return f"yes (tokens generated equal in all {len(common)} (worker, round))"


def format_variant(title: str, single: Side, swarms: list[Side]) -> str:
    """One table: a column per side, then the ratios."""
    cols = [single, *swarms]
    width = max(24, *(len(c.name) + 2 for c in cols))

    def row(label, values):
        return f"{label:<34}" + "".join(f"{v:>{width}}" for v in values)

    def num(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    out = [title, row("", [c.name for c in cols])]
    out.append(row("start-up s", [num(c.startup_s, ".2f") for c in cols]))
    out.append(row("wall s (start-up + all rounds)", [num(c.wall_s, ".2f") for c in cols]))
    out.append(row("s/round (pace, measured rounds)", [num(c.per_round_s) for c in cols]))
    if any(c.spread for c in cols):
        out.append(row("  min-max over repeats", ["-" if not c.spread else f"{c.spread[0]:.3f}-{c.spread[1]:.3f}"
                                                  for c in cols]))
    out.append(row("s/round (worker round_s)", [num(c.compute_round_s) for c in cols]))
    out.append(row("ratio per round vs one process", ["1.00x"] + [
        "-" if ratio(s, single) is None else f"{ratio(s, single):.2f}x" for s in swarms]))
    out.append(row("overhead per round ms (pace - one)", ["-"] + [
        "-" if not (s.per_round_s and single.per_round_s) else f"{1000 * (s.per_round_s - single.per_round_s):+.0f}"
        for s in swarms]))
    out.append(row("ratio round_s vs one process", ["1.00x"] + [
        "-" if not (s.compute_round_s and single.per_round_s) else f"{s.compute_round_s / single.per_round_s:.2f}x"
        for s in swarms]))
    out.append(row("CPU s/round (all workers)", [num(c.cpu_per_round_s) for c in cols]))
    out.append(row("load average after the run", [num(c.load, ".2f") for c in cols]))
    for s in cols:
        if s.phases:
            out.append(f"  {s.name} phases (mean ms per round{', per worker' if s in swarms else ''}): "
                       + ", ".join(f"{k.removesuffix('_s')} {1000 * v:.0f}" for k, v in s.phases.items()))
    for s in swarms:
        r = ratio(s, single)
        verdict = "-" if r is None else ("MET" if r <= GOAL_RATIO else "MISSED")
        out.append(f"  {s.name}: goal <= {GOAL_RATIO:.2f}x per round: {verdict}; same work: {same_work(s, single)}"
                   + (f"; error: {s.error}" if s.error else ""))
    return "\n".join(out)


# --------------------------------------------------------------------------- the two sides

def overrides(args, workers: int, tmp: Path) -> list[str]:
    """The workload, shared by both sides (the swarm also gets its paths)."""
    j = 0 if workers == 1 else 2
    return [f"experiment.root={tmp / 'shared'}", "experiment.name=bench-overhead",
            f"experiment.max_rounds={args.rounds}", f"model.name={args.model}",
            f"sapo.num_train_samples={args.I}", f"sapo.num_transplant_trees={j}", f"sapo.num_generations={args.G}",
            f"sapo.max_new_tokens={args.max_new_tokens}", f"supervisor.workers={workers}", "supervisor.device=cpu",
            "checkpoint.every_rounds=1000000", f"exchange.lock_dir={tmp / 'locks'}",
            f"exchange.spool_dir={tmp / 'spool'}", *args.set]


def run_single(args, workers: int) -> Side:
    """Both (or the one) workers' rounds in this process, in order, with the worker's seeds."""
    import torch  # noqa: F401  (imported before the clock starts: start-up is model load + set-up)

    from node.config import resolve_config
    from node.models import load_model
    from node.worker import derived_seed
    from sapo.learner import SapoLearner
    from sapo.swarm import share_group

    config = resolve_config(args.config, environ={}, overrides=overrides(args, workers, Path("/nonexistent")))
    seed = config.experiment.seed
    ids = [f"worker_{i}" for i in range(1, workers + 1)]
    side = Side("one process")
    t_start = time.perf_counter()
    learners = {}
    for w in ids:
        loaded = load_model(config.model.name, device="cpu", dtype=config.model.dtype, seed=seed,
                            attn_implementation=config.model.attn_implementation)
        learners[w] = SapoLearner(loaded.model, loaded.tokenizer, config.sapo, experiment_seed=seed)
    side.startup_s = time.perf_counter() - t_start
    round_times, phases = [], {"generate_s": [], "select_s": [], "train_s": []}
    cpu0 = None
    for r in range(config.experiment.max_rounds):
        if r == args.skip_rounds:
            cpu0 = time.process_time()
        t0 = time.perf_counter()
        local, gen_s, select_s, train_s = {}, 0.0, 0.0, 0.0
        for w in ids:
            learner = learners[w]
            questions = learner.sample_questions(w, r)
            local[w], gen = learner.generate(questions, seed=derived_seed(seed, w, r, "sample"), source=w)
            gen_s += gen.generate_s
            side.tokens[(w, r)] = gen.generated_tokens
        for w in ids:
            learner = learners[w]
            t = time.perf_counter()
            shared = [share_group(g, p) for p in ids if p != w for g in local[p]]
            chosen = learner.select_external(shared, w, random.Random(derived_seed(seed, w, r, "external")))
            select_s += time.perf_counter() - t
            train_s += learner.train(local[w] + chosen.groups).seconds
        round_times.append(time.perf_counter() - t0)
        if r >= args.skip_rounds:
            for k, v in (("generate_s", gen_s), ("select_s", select_s), ("train_s", train_s)):
                phases[k].append(v)
    side.wall_s = time.perf_counter() - t_start
    measured = round_times[args.skip_rounds:]
    side.per_round_s = side.compute_round_s = mean(measured)
    side.cpu_per_round_s = (time.process_time() - cpu0) / len(measured)
    side.phases = {k: mean(v) for k, v in phases.items()}
    side.load = os.getloadavg()[0]
    return side


def read_metrics(exp_dir: Path) -> dict[str, list[dict]]:
    """worker id -> its metrics lines (node.fsio's one JSONL reader)."""
    from node.fsio import read_jsonl

    return {path.parent.name: read_jsonl(path)[0] for path in sorted((exp_dir / "logs").glob("*/metrics.jsonl"))}


def read_switches(exp_dir: Path, skip_rounds: int) -> list[float]:
    """The round switch latencies (ms) the coordinator logged, for the measured rounds."""
    from node.fsio import read_jsonl

    rows, _ = read_jsonl(exp_dir / "logs" / "coordinator" / "round_switches.jsonl")
    return [r["switch_ms"] for r in rows if r.get("round", 0) > skip_rounds and isinstance(r.get("switch_ms"), (int, float))]


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by nearest rank, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary_line(results: dict[int, tuple[Side, Side]]) -> str:
    """``summary: ratio_1w=... ratio_2w=... switch_p50_ms=... switch_p99_ms=... startup_s=...`` from the config-poll
    swarm of each variant run (NA where a variant was not run or failed)."""
    def ratio(workers: int) -> str:
        single, swarm = results.get(workers, (None, None))
        if single is None or swarm is None or not single.per_round_s or not swarm.per_round_s:
            return "NA"
        return f"{swarm.per_round_s / single.per_round_s:.2f}x"
    switches = [ms for _, swarm in results.values() for ms in swarm.switch_ms]
    p50, p99 = percentile(switches, 0.5), percentile(switches, 0.99)
    startups = [swarm.startup_s for _, swarm in results.values() if swarm.startup_s is not None]
    fmt = lambda v, spec: "NA" if v is None else format(v, spec)  # noqa: E731
    return (f"summary: ratio_1w={ratio(1)} ratio_2w={ratio(2)} switch_p50_ms={fmt(p50, '.0f')} "
            f"switch_p99_ms={fmt(p99, '.0f')} startup_s={fmt(min(startups) if startups else None, '.1f')}")


def run_swarm(args, workers: int, poll: float | None) -> Side:
    """`swarm launch` of the same workload in a temporary root; figures from its metrics."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    sets = overrides(args, workers, tmp)
    if poll is not None:
        sets.append(f"coordinator.poll_interval_s={poll}")
    cmd = [sys.executable, "-m", "supervisor.cli", "launch", str(args.config)]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "SWARM_RUNTIME_DIR": str(tmp / "run")}
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    for var in ("GDRIVE_PATH", "EXPERIMENT_NAME", "MAX_ROUNDS", "TEST_MODE", "MODEL_NAME", "NUM_TRAIN_SAMPLES",
                "NUM_TRANSPLANT_TREES", "NUM_GENERATIONS", "COORDINATOR_ROUND_INTERVAL"):
        env.pop(var, None)  # the single side ignores the environment; so must the swarm
    import psutil

    cpu_samples: dict[str, list[tuple[float, float]]] = {}  # worker -> (wall, its CPU seconds so far)
    launch_wall = time.time()
    with open(tmp / "supervisor.out", "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + args.timeout
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                nodes = json.loads((tmp / "run" / "status.json").read_text())["nodes"]
            except (OSError, ValueError, KeyError):
                nodes = {}
            for name, node in nodes.items():
                if node.get("role") == "worker" and node.get("pid"):
                    try:
                        t = psutil.Process(node["pid"]).cpu_times()
                        cpu_samples.setdefault(name, []).append((time.time(), t.user + t.system))
                    except psutil.Error:
                        pass
            time.sleep(0.1)
        if proc.poll() is None:
            proc.terminate()
        proc.wait()
    end_wall = time.time()
    label = f"swarm (poll {poll if poll is not None else args.config_poll} s)"
    metrics = read_metrics(tmp / "shared" / "experiments" / "bench-overhead")
    side = swarm_side(label, metrics, launch_wall=launch_wall, end_wall=end_wall, skip_rounds=args.skip_rounds)
    side.cpu_per_round_s = cpu_per_round(metrics, cpu_samples, args.skip_rounds)
    side.switch_ms = read_switches(tmp / "shared" / "experiments" / "bench-overhead", args.skip_rounds)
    side.load = os.getloadavg()[0]
    if proc.returncode != 0:
        side.error = f"swarm launch exited {proc.returncode}; see {tmp}"
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return side


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=("one", "two", "both"), default="both",
                   help="one: 1 worker, J=0; two: 2 workers, J=2 (default both)")
    p.add_argument("--rounds", type=int, default=10, help="rounds (default 10)")
    p.add_argument("--skip-rounds", type=int, default=1, help="first rounds not measured (default 1)")
    p.add_argument("--model", default="builtin:tiny-gpt2")
    p.add_argument("-I", type=int, default=2, help="local questions per round (default 2)")
    p.add_argument("-G", type=int, default=4, help="completions per question (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="(default 32)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="base config (default %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="extra override for both sides (repeatable)")
    p.add_argument("--polls", default="config",
                   help="coordinator.poll_interval_s values for the swarm runs, comma-separated: 'config' = the "
                        "config's (default: config only; the summary line uses the first)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per swarm run (default 900)")
    p.add_argument("--repeat", type=int, default=3,
                   help="run both sides this many times, alternating, and report the median (default 3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (OMP_NUM_THREADS for the nodes; default 1: with torch's "
                        "default of one per core, a small model's timings swing 10x whenever anything else "
                        "runs on a 2-core machine); 0 = the defaults: torch's (one per core) for the one process, the "
                        "supervisor's (cores / workers) for the swarm's nodes")
    args = p.parse_args(argv)
    if args.rounds <= args.skip_rounds:
        p.error("--rounds must be larger than --skip-rounds")
    return args


def main(argv=None) -> int:
    """Run both sides for each variant and print the tables."""
    args = parse_args(argv)
    from node.config import resolve_config

    base = resolve_config(args.config, environ={}, overrides=args.set)
    args.config_poll = base.coordinator.poll_interval_s
    polls = [None if x.strip() == "config" else float(x) for x in args.polls.split(",") if x.strip()]
    import torch

    load0 = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"bench_overhead: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average "
          f"{load0[0]:.2f}; model {args.model}, I={args.I} G={args.G}, max_new_tokens {args.max_new_tokens}, "
          f"{args.rounds} rounds (first {args.skip_rounds} not measured), config {args.config.name}", flush=True)
    variants = {"one": [1], "two": [2], "both": [1, 2]}[args.variant]
    results: dict[int, tuple[Side, Side]] = {}
    for workers in variants:
        singles, runs = [], {i: [] for i in range(len(polls))}
        for _ in range(args.repeat):  # alternate the sides, so that other load on the machine hits both
            singles.append(run_single(args, workers))
            for i, poll in enumerate(polls):
                runs[i].append(run_swarm(args, workers, poll))
        single = pick_median(singles)
        swarms = [pick_median(runs[i]) for i in range(len(polls))]
        title = (f"\n1 worker, J=0 (one process: the loop alone)" if workers == 1 else
                 f"\n2 workers, J=2 (one process: both workers' work one after the other)")
        print(format_variant(title, single, swarms), flush=True)
        results[workers] = (single, swarms[0])
    load1 = os.getloadavg()
    print(f"\nload average at the end: {load1[0]:.2f} (other work on this machine shares its CPUs)")
    print(summary_line(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
