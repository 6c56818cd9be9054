"""A stand-in node obeying the supervisor's contract, for tests and the bench (stdlib + node.heartbeat).

    python tests/fake_node.py --config CFG --role worker --node-id worker_1 [--set k=v ...]

Behaviour from the environment: ``FAKE_NODE_MODE_<node_id>`` wins over ``FAKE_NODE_MODE`` (default ok):

- ``ok``: heartbeat and make progress until SIGTERM/SIGINT, then "checkpoint" and exit 143;
- ``exit_after=S``: like ok, then exit 0 after S seconds (the coordinator first writes a final
  ``state/current_state.json`` when the config names an experiment dir);
- ``crash_at_start``: a line on stderr, exit 1 before any heartbeat;
- ``crash_after=S``: like ok, then exit 1 after S seconds;
- ``config_error``: "configuration error: ..." on stderr, exit 2;
- ``cuda_oom``: heartbeat, then a CUDA out-of-memory traceback and exit 1;
- ``hang_main_loop``: the heartbeat thread keeps beating, the main loop stops after FAKE_HANG_AFTER s;
- ``ignore_sigterm``: like ok but SIGTERM and SIGINT are ignored;
- ``slow_start=S``: sleep S seconds before the first heartbeat, then ok.

The heartbeat interval is ``--set supervisor.heartbeat_interval_s=X`` when given, else
``$FAKE_HEARTBEAT_S`` (default 0.1). With ``$FAKE_NODE_RECORD`` (a directory) each start writes
``<node_id>.<pid>.json`` there (argv, env subset); a graceful stop writes ``<node_id>.<pid>.checkpoint``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.heartbeat import Heartbeat  # noqa: E402

CONTRACT_ENV = ("NODE_ROLE", "NODE_ID", "SWARM_RUNTIME_DIR", "SWARM_DEVICE", "CUDA_VISIBLE_DEVICES",
                "CUDA_DEVICE_ORDER", "SWARM_MEMORY_BYTES", "SWARM_MEMORY_FRACTION", "OMP_NUM_THREADS", "NOTIFY_SOCKET",
                "WATCHDOG_USEC")


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--role", default=os.environ.get("NODE_ROLE", "worker"))
    p.add_argument("--node-id", default=os.environ.get("NODE_ID", "worker_1"))
    p.add_argument("--set", action="append", default=[])
    return p.parse_args(argv)


def overrides(items) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out


def experiment_dir(config_path: str | None, sets: dict) -> Path | None:
    """``<root>/experiments/<name>`` from the YAML (plus --set), without the real config machinery."""
    root = name = None
    if config_path:
        try:
            import yaml

            data = yaml.safe_load(Path(config_path).read_text()) or {}
            root = (data.get("experiment") or {}).get("root")
            name = (data.get("experiment") or {}).get("name")
        except Exception:  # noqa: BLE001 - a test helper: no state file then
            pass
    root = sets.get("experiment.root", os.environ.get("GDRIVE_PATH") or root)
    name = sets.get("experiment.name", os.environ.get("EXPERIMENT_NAME") or name)
    if not root or not name:
        return None
    return Path(root) / "experiments" / name


def write_final_state(exp_dir: Path, name: str, max_rounds: int) -> None:
    state = exp_dir / "state"
    state.mkdir(parents=True, exist_ok=True)
    now = time.time()
    obj = {"schema_version": 1, "experiment": name, "round": max_rounds, "stage": 0, "started_at": now,
           "updated_at": now, "finished": True, "max_rounds": max_rounds}
    tmp = state / ".current_state.json.tmp"
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, state / "current_state.json")


def main(argv=None) -> int:
    args = parse_args(argv)
    node_id, role = args.node_id, args.role
    sets = overrides(args.set)
    mode = os.environ.get(f"FAKE_NODE_MODE_{node_id}") or os.environ.get("FAKE_NODE_MODE") or "ok"
    kind, _, value = mode.partition("=")
    interval = float(sets.get("supervisor.heartbeat_interval_s") or os.environ.get("FAKE_HEARTBEAT_S") or 0.1)
    runtime_dir = Path(os.environ.get("SWARM_RUNTIME_DIR") or ".")
    record = os.environ.get("FAKE_NODE_RECORD")
    if record:
        Path(record).mkdir(parents=True, exist_ok=True)
        info = {"argv": sys.argv[1:], "pid": os.getpid(), "mode": mode,
                "env": {k: os.environ[k] for k in CONTRACT_ENV if k in os.environ}}
        (Path(record) / f"{node_id}.{os.getpid()}.json").write_text(json.dumps(info))
    print(f"fake node {node_id} ({role}) pid {os.getpid()} mode {mode}", flush=True)

    if kind == "crash_at_start":
        print("RuntimeError: fake crash at start-up", file=sys.stderr, flush=True)
        return 1
    if kind == "config_error":
        print("configuration error: sapo.num_generations: must be >= 2; got 1", file=sys.stderr, flush=True)
        return 2

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    if kind == "ignore_sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    if kind == "slow_start":
        time.sleep(float(value or 1.0))
    beat = Heartbeat(runtime_dir, node_id, role, interval).start()
    started = time.monotonic()
    hang_after = float(os.environ.get("FAKE_HANG_AFTER", "0.3"))
    last_progress = -1.0
    while True:
        elapsed = time.monotonic() - started
        if stop["signal"] is not None:
            beat.progress("checkpoint", status="stopping")
            if record:
                (Path(record) / f"{node_id}.{os.getpid()}.checkpoint").write_text(str(stop["signal"]))
            beat.stop()
            print(f"fake node {node_id} stopped by signal {stop['signal']} after checkpointing", flush=True)
            return 143
        if kind == "exit_after" and elapsed >= float(value or 1.0):
            if role == "coordinator":
                exp = experiment_dir(args.config, sets)
                if exp is not None:
                    write_final_state(exp, exp.name, int(sets.get("experiment.max_rounds", 3)))
            beat.progress("done", status="finished")
            beat.stop()
            return 0
        if kind == "crash_after" and elapsed >= float(value or 1.0):
            print("RuntimeError: fake crash while running", file=sys.stderr, flush=True)
            return 1
        if kind == "cuda_oom" and elapsed >= float(value or 0.3):
            print("Traceback (most recent call last):\n  File \"worker.py\", line 1, in train\n"
                  "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)",
                  file=sys.stderr, flush=True)
            return 1
        if not (kind == "hang_main_loop" and elapsed >= hang_after) and elapsed - last_progress >= min(0.25, interval):
            last_progress = elapsed
            beat.progress("train", round_=int(elapsed), status="running")
        time.sleep(0.05)


# --------------------------------------------------------------------------- helpers for the tests and the bench

FAKE_NODE = [sys.executable, str(Path(__file__).resolve())]


def fake_config(root: Path, *, workers: int = 2, name: str = "fake", **supervisor):
    """An ExperimentConfig for fake swarms: fast heartbeats and timeouts, CPU, under ``root``."""
    from node.config import ExperimentConfig, with_overrides

    sv = {"workers": workers, "device": "cpu", "heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 1.5,
          "startup_timeout_s": 5.0, "monitor_interval_s": 0.2, "stop_timeout_s": 3.0, "backoff_initial_s": 0.2,
          "backoff_max_s": 2.0, "max_restarts": 10, "startup_failures_fatal": 3}
    sv.update(supervisor)
    return with_overrides(ExperimentConfig(), experiment={"root": str(root), "name": name, "max_rounds": 3},
                          supervisor=sv)


def config_yaml(path: Path, root: Path, *, workers: int = 2, name: str = "fake", **supervisor) -> Path:
    """The same settings as :func:`fake_config`, as a YAML file the CLI can read."""
    import yaml

    cfg = fake_config(root, workers=workers, name=name, **supervisor)
    data = {"experiment": {"root": str(root), "name": name, "max_rounds": 3},
            "sapo": {"tasks": [{"name": "toy_copy"}]},
            "supervisor": {k: v for k, v in cfg.to_dict()["supervisor"].items()}}
    path.write_text(yaml.safe_dump(data))
    return path


def write_heartbeat(runtime_dir: Path, node_id: str, *, pid: int, at: float, progress_at: float | None = None,
                    role: str = "worker", round_: int = 0, status: str = "running", phase: str = "train") -> None:
    """A heartbeat as a node would write it (for FakeOS tests, with the fake clock's wall time)."""
    from node.heartbeat import HeartbeatRecord, heartbeat_path

    rec = HeartbeatRecord(node_id=node_id, role=role, pid=pid, heartbeat_at=at, progress=1,
                          progress_at=at if progress_at is None else progress_at, phase=phase, round=round_,
                          status=status)
    path = heartbeat_path(runtime_dir, node_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec.to_json()))


def drive(sup, until=lambda: False, timeout: float = 10.0) -> bool:
    """Tick a real-OS Supervisor (in this thread) until ``until()`` or it is done; returns ``until()``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = sup.tick()
        if until():
            return True
        if done:
            return bool(until())
        time.sleep(min(0.05, sup.next_wake(sup.os.monotonic())))
    return bool(until())


if __name__ == "__main__":
    sys.exit(main())
