"""Supervisor overhead: its own CPU use with real nodes, and restart latency with fake ones.

    python scripts/bench_supervisor.py                          # real smoke-cpu swarm, 60 s of CPU measured
    python scripts/bench_supervisor.py --seconds 30 --monitor-interval 2
    python scripts/bench_supervisor.py --nodes fake --kills 5   # restart latency (tests/fake_node.py, no torch)

``--nodes real`` (default) starts ``swarm launch configs/smoke-cpu.yaml`` (a real supervisor process and
real ``python -m node`` processes training the tiny GPT-2) with ``experiment.max_rounds`` large enough
to outlast the measurement, files in a temporary root. ``--nodes fake`` runs the same supervisor over
``tests/fake_node.py`` nodes (no torch) and can time restarts. Either way, once every node runs:

1. restart latency (``--kills`` > 0): SIGKILL worker_1, time until a *new* worker_1 process has written
   its heartbeat (the supervisor noticed the exit, classified it, waited its backoff, spawned, the node
   started); median over the kills, with ``--backoff`` as the policy's first delay;
2. the supervisor's CPU use over ``--seconds`` of steady state, from its own ``/proc/<pid>/stat``
   (user + system clock ticks of all its threads, the shared-dir poller included), as % of one core;
   how often it rewrote ``status.json`` (its mtime polled every 0.1 s), and its resident memory.

``--host-processes N`` starts N idle processes first: a busier host (psutil's search for a node's
children reads every process's parent, so the supervisor's cost used to grow with the host).
"""

from __future__ import annotations

import argparse
import os
import shutil
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
from supervisor.runfiles import RuntimePaths  # noqa: E402
from supervisor.status import read_status  # noqa: E402

SMOKE = REPO / "configs" / "smoke-cpu.yaml"
CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (every thread) from /proc/<pid>/stat, in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5), after "pid (comm)"


def launch_command(args, tmp: Path, paths: RuntimePaths) -> tuple[list[str], dict]:
    """``swarm launch`` over real nodes (smoke-cpu) or fake ones, and its environment."""
    env = {**os.environ, "SWARM_RUNTIME_DIR": str(paths.root)}
    common = [f"supervisor.workers={args.workers}", f"supervisor.monitor_interval_s={args.monitor_interval}",
              f"supervisor.heartbeat_interval_s={args.heartbeat_interval}",
              f"supervisor.backoff_initial_s={args.backoff}", f"supervisor.backoff_max_s={max(args.backoff, 1.0)}",
              "supervisor.max_restarts=10000", "supervisor.stop_timeout_s=10"]
    if args.nodes == "fake":
        cfg = config_yaml(tmp / "cfg.yaml", tmp / "shared", name="bench", heartbeat_timeout_s=60.0)
        env.update(SWARM_NODE_COMMAND=" ".join(FAKE_NODE), FAKE_HEARTBEAT_S=str(args.heartbeat_interval),
                   FAKE_NODE_MODE="ok")
        sets = common
    else:
        cfg = SMOKE
        sets = [f"experiment.root={tmp / 'shared'}", "experiment.name=bench-supervisor",
                "experiment.max_rounds=100000", "checkpoint.every_rounds=1000000",
                f"exchange.lock_dir={tmp / 'locks'}", f"exchange.spool_dir={tmp / 'spool'}", *common]
        for var in ("GDRIVE_PATH", "EXPERIMENT_NAME", "MAX_ROUNDS", "TEST_MODE", "MODEL_NAME"):
            env.pop(var, None)
    cmd = [sys.executable, "-m", "supervisor.cli", "launch", str(cfg)]
    for item in sets:
        cmd += ["--set", item]
    return cmd, env


def time_restarts(paths: RuntimePaths, sup_pid: int, nodes: int, kills: int) -> list[float]:
    """Seconds from SIGKILL of worker_1 to a new worker_1 heartbeat, per kill."""
    latencies: list[float] = []
    hb = heartbeat_path(paths.root, "worker_1")
    for _ in range(kills):
        old = read_heartbeat(hb).pid
        t0 = time.monotonic()
        os.kill(old, signal.SIGKILL)
        while True:
            rec = read_heartbeat(hb)
            if rec is not None and rec.pid != old:
                latencies.append(time.monotonic() - t0)
                break
            if time.monotonic() - t0 > 120:
                raise TimeoutError("worker_1 did not come back within 120 s")
            time.sleep(0.002)
        wait_for(lambda: all_running(paths, sup_pid, nodes), timeout=120)
        time.sleep(0.3)
    return latencies


def measure(pid: int, status_file: Path, seconds: float) -> dict:
    """The supervisor's CPU seconds and status.json rewrites over ``seconds``."""
    c0, w0 = cpu_seconds(pid), time.monotonic()
    writes, last = 0, None
    while time.monotonic() - w0 < seconds:
        try:
            mtime = status_file.stat().st_mtime_ns
        except OSError:
            mtime = None
        if last is not None and mtime != last:
            writes += 1
        last = mtime
        time.sleep(0.1)
    c1, w1 = cpu_seconds(pid), time.monotonic()
    return {"cpu_s": c1 - c0, "wall_s": w1 - w0, "status_writes": writes, "rss": psutil.Process(pid).memory_info().rss,
            "host_processes": len(psutil.pids())}


def stop(sup: subprocess.Popen) -> None:
    if sup.poll() is None:
        sup.send_signal(signal.SIGTERM)
        try:
            sup.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(sup.pid, signal.SIGKILL)
            sup.wait()


def report(args, launch_s: float, latencies: list[float], m: dict, status: dict, rc: int | None) -> None:
    nodes = "real python -m node, configs/smoke-cpu.yaml" if args.nodes == "real" else "tests/fake_node.py"
    rows = [
        ("nodes", f"1 coordinator + {args.workers} workers ({nodes})"),
        ("settings", f"monitor_interval_s={args.monitor_interval:g}, heartbeat_interval_s={args.heartbeat_interval:g}, "
                     f"backoff_initial_s={args.backoff:g}"),
        ("launch to all RUNNING", f"{launch_s:.2f} s"),
    ]
    if latencies:
        restarts = status.get("nodes", {}).get("worker_1", {}).get("restarts")
        rows.append((f"restart latency, {len(latencies)} kills",
                     f"median {statistics.median(latencies) * 1000:.0f} ms (min {min(latencies) * 1000:.0f}, "
                     f"max {max(latencies) * 1000:.0f}); worker_1 restarts={restarts}"))
    rows += [
        (f"supervisor CPU over {m['wall_s']:.0f} s", f"{100 * m['cpu_s'] / m['wall_s']:.2f} % of one core "
         f"({m['cpu_s']:.2f} s user + sys, /proc/<pid>/stat)"),
        ("status.json rewrites", f"{m['status_writes'] * 60 / m['wall_s']:.0f} per minute"),
        ("round reached", f"{status.get('round')}"),
        ("supervisor RSS", f"{m['rss'] / 2**20:.1f} MiB"),
        ("machine", f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, {m['host_processes']} processes; "
                    f"supervisor exit code after SIGTERM: {rc}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", choices=("real", "fake"), default="real", help="real smoke-cpu nodes (default) or fake")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kills", type=int, default=None, help="restart timings (default 5 with fake nodes, 0 with real)")
    p.add_argument("--seconds", type=float, default=60.0, help="CPU measurement window (default 60)")
    p.add_argument("--monitor-interval", type=float, default=None,
                   help="supervisor.monitor_interval_s (default 0.5 real, as smoke-cpu ships; 2.0 fake)")
    p.add_argument("--heartbeat-interval", type=float, default=1.0, help="supervisor.heartbeat_interval_s (1.0)")
    p.add_argument("--backoff", type=float, default=0.0, help="supervisor.backoff_initial_s (0)")
    p.add_argument("--host-processes", type=int, default=0,
                   help="idle processes started first, to measure on a busier host (default 0)")
    args = p.parse_args(argv)
    if args.kills is None:
        args.kills = 5 if args.nodes == "fake" else 0
    if args.monitor_interval is None:
        args.monitor_interval = 0.5 if args.nodes == "real" else 2.0

    tmp = Path(tempfile.mkdtemp(prefix="bench-supervisor-"))
    paths = RuntimePaths(tmp / "rt")
    cmd, env = launch_command(args, tmp, paths)
    nodes = args.workers + 1
    idle = [subprocess.Popen(["sleep", "86400"], stdin=subprocess.DEVNULL) for _ in range(args.host_processes)]
    with open(tmp / "supervisor.out", "wb") as out:
        sup = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            t_launch = time.monotonic()
            wait_for(lambda: all_running(paths, sup.pid, nodes), timeout=300)
            launch_s = time.monotonic() - t_launch
            latencies = time_restarts(paths, sup.pid, nodes, args.kills)
            time.sleep(min(5.0, args.seconds))  # let start-up and the restarts' bookkeeping settle
            m = measure(sup.pid, paths.status_file, args.seconds)
            status = read_status(paths) or {}
        finally:
            stop(sup)
            for proc in idle:
                proc.kill()
                proc.wait()
    report(args, launch_s, latencies, m, status, sup.returncode)
    shutil.rmtree(tmp, ignore_errors=True)  # kept when the run failed (an exception above)
    return 0


if __name__ == "__main__":
    sys.exit(main())
