"""Start-up and restart latency of a real swarm: launch -> round 0, and SIGKILL -> the worker training again.

    python scripts/bench_startup.py                       # configs/smoke-cpu.yaml, 1 launch
    python scripts/bench_startup.py --repeats 3 --set supervisor.stagger=heartbeat

Runs ``swarm launch CONFIG`` (the console script beside this Python, else ``python -m supervisor.cli``) with
its files in a temporary root and runtime dir, ``experiment.max_rounds`` raised so that the run outlasts
the measurement. Every figure comes from the timestamps the processes log (``<runtime dir>/logs/*.log``),
against the wall-clock time just before the command was started:

1. launch -> round 0: when every worker started its round 0 (a worker's ``round_done`` time minus the
   round's ``seconds``), with the coordinator's ``experiment_started`` and the first worker's round 0
   beside it;
2. once ``worker_1`` finished round ``--kill-after``, SIGKILL it; restart -> training: from the kill to
   the new ``worker_1`` process starting a round, split into the supervisor seeing the exit, its backoff,
   the node's Python start and imports up to its first log line, the imports and model load up to
   ``worker_ready``, and the rest (checkpoint, waiting for the round) up to the round's start.

Ends with ``summary: launch_to_round0_s=N.N restart_to_training_s=N.N`` (medians over the repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from bench_supervisor import stop  # noqa: E402 (SIGTERM the supervisor, SIGKILL its group if it lingers)

SMOKE = REPO / "configs" / "smoke-cpu.yaml"
SEED_VARS = ("GDRIVE_PATH", "EXPERIMENT_NAME", "MAX_ROUNDS", "TEST_MODE", "MODEL_NAME", "SWARM_NODE_COMMAND")


def swarm_command() -> list[str]:
    """``swarm`` as a user runs it: the console script of this environment, else the module."""
    script = Path(sys.executable).with_name("swarm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "supervisor.cli"]


def read_events(logs: Path) -> list[dict]:
    """Every JSON log line of every process (``<node>.log``, ``supervisor.log``), with ``at`` (epoch s)
    and ``file`` (the node) added; sorted by time."""
    events = []
    for path in logs.glob("*.log"):
        if path.name.endswith((".stdout.log", ".stderr.log")):
            continue
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            try:
                ev = json.loads(line)
                ev["at"] = datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()
            except (ValueError, KeyError, TypeError):
                continue
            ev["file"] = path.name[:-4]
            events.append(ev)
    return sorted(events, key=lambda e: e["at"])


def round_starts(events: list[dict], node: str) -> list[tuple[float, int, int]]:
    """(start time, round, pid) of every round ``node`` finished: ``round_done`` minus its seconds."""
    return [(e["at"] - float(e["seconds"]), e.get("round"), e.get("pid")) for e in events
            if e["file"] == node and e.get("event") == "round_done" and "seconds" in e]


def first(events: list[dict], *, after: float = 0.0, **match) -> dict | None:
    for e in events:
        if e["at"] >= after and all(e.get(k) == v for k, v in match.items()):
            return e
    return None


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise RuntimeError(f"the supervisor exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not within {timeout:g} s")


def launch_figures(events: list[dict], t0: float, workers: list[str]) -> dict | None:
    """Seconds from ``t0`` to round 0 (every worker, the first worker, the coordinator), or None yet."""
    starts = {}
    for w in workers:
        r0 = [s for s, r, _ in round_starts(events, w) if r == 0]
        if not r0:
            return None
        starts[w] = r0[0]
    exp = first(events, file="coordinator", event="experiment_started")
    sup = first(events, file="supervisor", event="supervisor_started")
    rows = {"supervisor_started": sup["at"] - t0 if sup else None,
            "experiment_started": exp["at"] - t0 if exp else None}
    for w in workers:
        ready = first(events, file=w, event="worker_ready")
        spawned = first(events, file="supervisor", event="node_spawned", node=w)
        rows[f"{w} spawned"] = spawned["at"] - t0 if spawned else None
        rows[f"{w} ready"] = ready["at"] - t0 if ready else None
        rows[f"{w} round 0"] = starts[w] - t0
    rows["first worker round 0"] = min(starts.values()) - t0
    rows["every worker round 0"] = max(starts.values()) - t0
    return rows


def restart_figures(events: list[dict], t_kill: float, old_pid: int, node: str) -> dict | None:
    """Seconds from the kill to each step of ``node``'s restart, or None until it trained again."""
    again = [(s, r) for s, r, pid in round_starts(events, node) if pid != old_pid and s >= t_kill]
    if not again:
        return None
    exited = first(events, after=t_kill, file="supervisor", event="node_exited", node=node)
    spawned = first(events, after=t_kill, file="supervisor", event="node_spawned", node=node)
    new_pid = spawned.get("pid") if spawned else None
    logged = first(events, after=t_kill, file=node, pid=new_pid) if new_pid else None
    ready = first(events, after=t_kill, file=node, event="worker_ready")
    rows = {"exit seen by the supervisor": exited, "spawned (after the backoff)": spawned,
            "first log line (python + node imports + config)": logged,
            "worker_ready (torch/transformers + model)": ready}
    out = {k: (v["at"] - t_kill if v else None) for k, v in rows.items()}
    out[f"training again (round {again[0][1]})"] = again[0][0] - t_kill
    return out


def one_run(args, tmp: Path) -> tuple[dict, dict]:
    rt = tmp / "rt"
    env = {k: v for k, v in os.environ.items() if k not in SEED_VARS}
    env["SWARM_RUNTIME_DIR"] = str(rt)
    sets = [f"experiment.root={tmp / 'shared'}", "experiment.name=bench-startup",
            f"experiment.max_rounds={args.max_rounds}", f"exchange.lock_dir={tmp / 'locks'}",
            f"exchange.spool_dir={tmp / 'spool'}", *args.set]
    cmd = [*swarm_command(), "launch", str(args.config)]
    for item in sets:
        cmd += ["--set", item]
    workers = [f"worker_{i}" for i in range(1, args.workers + 1)]
    cmd += ["--workers", str(args.workers)]
    with open(tmp / "swarm.out", "wb") as out:
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            logs = rt / "logs"
            launch = wait_for(lambda: launch_figures(read_events(logs), t0, workers), args.timeout,
                              "every worker started round 0", proc)
            node = "worker_1"
            done = wait_for(lambda: [x for x in round_starts(read_events(logs), node) if x[1] >= args.kill_after],
                            args.timeout, f"{node} finished round {args.kill_after}", proc)
            old_pid = done[0][2]
            t_kill = time.time()
            os.kill(old_pid, signal.SIGKILL)
            restart = wait_for(lambda: restart_figures(read_events(logs), t_kill, old_pid, node), args.timeout,
                               f"{node} trained again after SIGKILL", proc)
        finally:
            stop(proc)
    return launch, restart


def show(title: str, rows: dict) -> None:
    print(title)
    for k, v in rows.items():
        print(f"  {k:<50} {'-' if v is None else f'{v:6.2f} s'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=SMOKE, help="experiment YAML (default configs/smoke-cpu.yaml)")
    p.add_argument("--workers", type=int, default=2, help="supervisor.workers (default 2, as smoke-cpu)")
    p.add_argument("--repeats", type=int, default=1, help="launches (default 1); medians in the summary")
    p.add_argument("--kill-after", type=int, default=1, help="SIGKILL worker_1 once it finished this round (1)")
    p.add_argument("--max-rounds", type=int, default=1000, help="experiment.max_rounds (default 1000: outlasts it)")
    p.add_argument("--timeout", type=float, default=300.0, help="longest wait for any one step (300 s)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config override")
    p.add_argument("--keep", action="store_true", help="keep the temporary root (logs) and print its path")
    args = p.parse_args(argv)

    launches, restarts = [], []
    for i in range(args.repeats):
        tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
        launch, restart = one_run(args, tmp)
        show(f"run {i + 1}: launch -> (seconds after `swarm launch` started)", launch)
        show(f"run {i + 1}: SIGKILL worker_1 -> (seconds after the kill)", restart)
        launches.append(launch["every worker round 0"])
        restarts.append(list(restart.values())[-1])
        if args.keep:
            print(f"  files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; config {args.config}; "
          f"{' '.join(args.set) or 'no overrides'}")
    print(f"summary: launch_to_round0_s={statistics.median(launches):.1f} "
          f"restart_to_training_s={statistics.median(restarts):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
