"""Supervisor overhead: restart latency and the supervisor's own CPU use, with fake nodes (no torch).

    python scripts/bench_supervisor.py                 # 2 workers, 5 kills, 60 s of CPU measurement
    python scripts/bench_supervisor.py --seconds 10 --kills 3 --workers 4

Starts ``swarm launch`` (a real supervisor process) whose nodes are ``tests/fake_node.py``, waits until
every node runs, then:

1. restart latency: SIGKILL worker_1, time until a *new* worker_1 process has written its heartbeat
   (the supervisor noticed the exit, classified it, waited its backoff, spawned, the node started);
   median over ``--kills`` kills, with ``--backoff`` as the policy's first delay (default 0: the figure is
   the supervisor's own reaction, the configured backoff adds on top);
2. the supervisor's CPU use (user + system time of its process) over ``--seconds`` of steady state at
   the production monitor interval, and its resident memory.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from fake_node import FAKE_NODE, config_yaml  # noqa: E402
from node.heartbeat import heartbeat_path, read_heartbeat  # noqa: E402
from supervisor.daemon import RuntimePaths, read_status  # noqa: E402


def wait_for(predicate, timeout: float, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError("condition not reached in time")


def all_running(paths: RuntimePaths, sup_pid: int, nodes: int):
    st = read_status(paths)
    if not st or st.get("supervisor", {}).get("pid") != sup_pid:
        return None
    states = [n["state"] for n in st["nodes"].values()]
    return st if states == ["RUNNING"] * nodes else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--seconds", type=float, default=60.0, help="CPU measurement window (default 60)")
    p.add_argument("--monitor-interval", type=float, default=2.0, help="supervisor.monitor_interval_s (2.0)")
    p.add_argument("--heartbeat-interval", type=float, default=1.0, help="supervisor.heartbeat_interval_s (1.0)")
    p.add_argument("--backoff", type=float, default=0.0, help="supervisor.backoff_initial_s (0)")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-supervisor-"))
    paths = RuntimePaths(tmp / "rt")
    cfg = config_yaml(tmp / "cfg.yaml", tmp / "shared", workers=args.workers, name="bench",
                      heartbeat_interval_s=args.heartbeat_interval, heartbeat_timeout_s=60.0,
                      monitor_interval_s=args.monitor_interval, backoff_initial_s=args.backoff,
                      backoff_max_s=max(args.backoff, 1.0), max_restarts=10_000, stop_timeout_s=5.0)
    env = {**os.environ, "SWARM_RUNTIME_DIR": str(paths.root), "SWARM_NODE_COMMAND": " ".join(FAKE_NODE),
           "FAKE_HEARTBEAT_S": str(args.heartbeat_interval), "FAKE_NODE_MODE": "ok"}
    out = open(tmp / "supervisor.out", "wb")
    sup = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "launch", str(cfg)], cwd=REPO, env=env,
                           stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    nodes = args.workers + 1
    latencies: list[float] = []
    try:
        t_launch = time.monotonic()
        wait_for(lambda: all_running(paths, sup.pid, nodes), timeout=60)
        launch_s = time.monotonic() - t_launch
        hb = heartbeat_path(paths.root, "worker_1")
        for _ in range(args.kills):
            old = read_heartbeat(hb).pid
            t0 = time.monotonic()
            os.kill(old, signal.SIGKILL)
            while True:
                rec = read_heartbeat(hb)
                if rec is not None and rec.pid != old:
                    latencies.append(time.monotonic() - t0)
                    break
                if time.monotonic() - t0 > 30:
                    raise TimeoutError("worker_1 did not come back within 30 s")
                time.sleep(0.002)
            wait_for(lambda: all_running(paths, sup.pid, nodes), timeout=30)
            time.sleep(0.3)
        proc = psutil.Process(sup.pid)
        time.sleep(min(2.0, args.seconds))  # let the restarts' bookkeeping settle
        c0, w0 = proc.cpu_times(), time.monotonic()
        time.sleep(args.seconds)
        c1, w1 = proc.cpu_times(), time.monotonic()
        rss = proc.memory_info().rss
        status = read_status(paths) or {}
    finally:
        if sup.poll() is None:
            sup.send_signal(signal.SIGTERM)
            try:
                sup.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(sup.pid, signal.SIGKILL)
                sup.wait()
        out.close()
    user, system = c1.user - c0.user, c1.system - c0.system
    wall = w1 - w0
    restarts = status.get("nodes", {}).get("worker_1", {}).get("restarts")
    rows = [
        ("nodes", f"1 coordinator + {args.workers} workers (tests/fake_node.py)"),
        ("settings", f"monitor_interval_s={args.monitor_interval:g}, heartbeat_interval_s={args.heartbeat_interval:g}, "
                     f"backoff_initial_s={args.backoff:g}"),
        ("launch to all RUNNING", f"{launch_s:.2f} s (CLI start-up, staggered spawns, status written every "
                                  f"monitor interval)"),
        (f"restart latency, {len(latencies)} kills", f"median {statistics.median(latencies) * 1000:.0f} ms "
         f"(min {min(latencies) * 1000:.0f}, max {max(latencies) * 1000:.0f}); worker_1 restarts={restarts}"),
        (f"supervisor CPU over {wall:.0f} s", f"{100 * (user + system) / wall:.2f} % of one core "
         f"(user {user:.2f} s + sys {system:.2f} s)"),
        ("supervisor RSS", f"{rss / 2**20:.1f} MiB"),
        ("machine", f"{os.cpu_count()} CPUs; supervisor exit code after SIGTERM: {sup.returncode}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
