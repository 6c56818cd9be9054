#!/usr/bin/env python3
"""Run the toy I/J sweep (configs/toy-{4loc0ext,3loc1ext,2loc2ext,1loc3ext}.yaml) one config after the other,
then write the report (cumulative reward per configuration, plots) with ``python -m supervisor.report``.

    python scripts/run_toy_sweep.py                       # all four, then runs/reports/toy-sweep/
    python scripts/run_toy_sweep.py --fresh --report-dir /tmp/rep configs/toy-2loc2ext.yaml
    python scripts/run_toy_sweep.py --set experiment.max_rounds=20 --set experiment.root=/tmp/sweep

How each experiment runs: with ``swarm launch CONFIG`` (the supervisor, in the foreground) when a ``swarm``
command is on PATH and ``swarm launch --help`` succeeds; otherwise (or with ``--by-hand``) by starting the
nodes as a user without the supervisor would: one ``python -m node --role coordinator`` and
``supervisor.workers`` × ``python -m node --role worker --node-id worker_K``, each in its own session,
its output in ``--logs-dir`` (with ``OMP_NUM_THREADS=1`` unless set, when there are more nodes than
cores). Without the supervisor nothing restarts a node that dies; the script then stops the rest of
that experiment and reports the failure.

An experiment directory that already exists would be resumed (or, if finished, end at once), so the
script refuses to run it unless ``--fresh`` (delete it first) or ``--resume`` is given. Environment
overrides (``GDRIVE_PATH``, ``MAX_ROUNDS``, ...) and ``--set`` apply to the nodes and to the report alike.
Exit code: 0 when every experiment finished and the report was written, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = [ROOT / "configs" / f"toy-{split}.yaml" for split in ("4loc0ext", "3loc1ext", "2loc2ext", "1loc3ext")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run_toy_sweep.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", type=Path, help="experiment configs (default: the four toy-* splits)")
    add_run_arguments(p, logs_dir="runs/sweep-logs", timeout=3600.0, report_dir="runs/reports/toy-sweep")
    return p.parse_args(argv)


def add_run_arguments(p: argparse.ArgumentParser, *, logs_dir: str, timeout: float, report_dir: str):
    """The options of a script that runs experiments one after the other and reports them (this one and
    run_split_experiment.py); returns the --fresh/--resume group, for more mutually exclusive options."""
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config override for every experiment (and the report)")
    p.add_argument("--by-hand", action="store_true", help="start the nodes directly even if `swarm` is available")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--fresh", action="store_true", help="delete an existing experiment directory first")
    existing.add_argument("--resume", action="store_true", help="run an existing experiment directory as it is")
    p.add_argument("--logs-dir", type=Path, default=Path(logs_dir),
                   help=f"where node output goes in --by-hand mode (default {logs_dir})")
    p.add_argument("--timeout", type=float, default=timeout, help=f"seconds allowed per experiment (default {timeout:.0f})")
    p.add_argument("--report-dir", type=Path, default=Path(report_dir),
                   help=f"where the report goes (default {report_dir})")
    p.add_argument("--no-report", action="store_true", help="only run the experiments")
    return existing


def swarm_available() -> bool:
    """True when a ``swarm`` command exists and ``swarm launch --help`` works."""
    exe = shutil.which("swarm")
    if exe is None:
        return False
    try:
        done = subprocess.run([exe, "launch", "--help"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


class Stop(Exception):
    """SIGINT/SIGTERM received: stop the running experiment and give up."""


def _raise_stop(signum, _frame):
    raise Stop(signal.Signals(signum).name)


def _terminate(procs: dict[str, subprocess.Popen], grace_s: float = 30.0) -> None:
    """SIGTERM every process group still running, one shared deadline, then SIGKILL."""
    for proc in procs.values():
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def run_by_hand(config_path: Path, overrides: list[str], workers: int, logs_dir: Path, timeout: float) -> bool:
    """Coordinator + ``workers`` workers started directly; True when all of them exited 0."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "node", "--config", str(config_path)]
    for item in overrides:
        base += ["--set", item]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if workers + 1 > (os.cpu_count() or 1):
        # More processes than cores: one intra-op thread each instead of every process using all cores.
        env.setdefault("OMP_NUM_THREADS", "1")
    procs: dict[str, subprocess.Popen] = {}
    try:
        for node_id in ["coordinator"] + [f"worker_{k}" for k in range(1, workers + 1)]:
            role = "coordinator" if node_id == "coordinator" else "worker"
            with open(logs_dir / f"{node_id}.out", "ab") as out:
                procs[node_id] = subprocess.Popen(base + ["--role", role, "--node-id", node_id], cwd=ROOT, env=env,
                                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            codes = {n: p.poll() for n, p in procs.items()}
            failed = {n: c for n, c in codes.items() if c not in (None, 0)}
            if failed:
                print(f"  node(s) failed: {failed}; see {logs_dir}/<node>.out", flush=True)
                return False
            if all(c == 0 for c in codes.values()):
                return True
            if time.monotonic() > deadline:
                print(f"  timed out after {timeout:.0f}s", flush=True)
                return False
            time.sleep(0.5)
    finally:
        _terminate(procs)


def run_with_swarm(config_path: Path, overrides: list[str], timeout: float) -> bool:
    """``swarm launch CONFIG`` in the foreground; True when it exits 0."""
    args = ["swarm", "launch", str(config_path)]
    for item in overrides:
        args += ["--set", item]
    proc = subprocess.Popen(args, cwd=ROOT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout) == 0
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout:.0f}s", flush=True)
        return False
    finally:
        _terminate({"swarm": proc}, grace_s=120.0)


def run_one(path: Path, overrides: list[str], config, *, fresh: bool, use_swarm: bool, logs_dir: Path,
            timeout: float) -> bool:
    """Run the experiment of ``path`` (resolved as ``config``) to its end, its directory deleted first when
    ``fresh``; prints what runs and how long it took. True when it finished."""
    if fresh and config.experiment_dir.exists():
        shutil.rmtree(config.experiment_dir)
    name = config.experiment.name
    print(f"== {name}: I={config.sapo.num_train_samples} J={config.sapo.num_transplant_trees} "
          f"G={config.sapo.num_generations}, {config.supervisor.workers} workers, "
          f"{config.experiment.max_rounds} rounds ({path.name})", flush=True)
    t0 = time.monotonic()
    if use_swarm:
        done = run_with_swarm(path, overrides, timeout)
    else:
        done = run_by_hand(path, overrides, config.supervisor.workers, logs_dir / name, timeout)
    print(f"   {'finished' if done else 'FAILED'} in {time.monotonic() - t0:.0f}s", flush=True)
    return done


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from node.config import resolve_config
    from sapo.config import ConfigError

    configs = [c.resolve() for c in (args.configs or DEFAULT_CONFIGS)]
    try:
        resolved = [(path, resolve_config(path, overrides=args.set)) for path in configs]
    except ConfigError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    os.chdir(ROOT)  # relative experiment roots (./runs) mean the repository, as for the nodes
    for path, config in resolved:
        exp_dir = config.experiment_dir
        if exp_dir.exists() and not (args.fresh or args.resume):
            print(f"{exp_dir} exists (from an earlier run?): pass --fresh to delete it or --resume to continue it",
                  file=sys.stderr)
            return 2
    use_swarm = not args.by_hand and swarm_available()
    print(f"running {len(resolved)} experiment(s) {'with `swarm launch`' if use_swarm else 'by hand (python -m node)'}",
          flush=True)
    signal.signal(signal.SIGTERM, _raise_stop)
    ok = True
    try:
        for path, config in resolved:
            ok = run_one(path, args.set, config, fresh=args.fresh, use_swarm=use_swarm, logs_dir=args.logs_dir,
                         timeout=args.timeout) and ok
    except (KeyboardInterrupt, Stop) as why:
        print(f"stopped ({why or 'SIGINT'})", file=sys.stderr)
        return 1
    if args.no_report:
        return 0 if ok else 1
    from supervisor.report import main as report_main

    report_args = [str(p) for p, _ in resolved] + ["--out", str(args.report_dir)]
    for item in args.set:
        report_args += ["--set", item]
    code = report_main(report_args)
    return 0 if ok and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
