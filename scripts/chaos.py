"""Chaos and fault-injection scenarios on real processes, with a figures table.

    python scripts/chaos.py --quick            # the short versions (what tests/chaos runs), ~10 min on 2 cores
    python scripts/chaos.py                    # longer runs (20 worker kills, 30-round comparisons, ...)
    python scripts/chaos.py --only kill_storm --only hung_worker --keep
    python scripts/chaos.py --quick --only kill_storm --seed 632211013     # replay the random choices

Scenarios on `swarm launch` (tiny model, CPU) live in tests/chaos/scenarios.py, the attacks on the trust
boundary (someone without the key writing to the shared directory) in tests/chaos/trust_scenarios.py; the
storage-level ones (Drive disconnect on a real FUSE mount, ENOSPC on a real tmpfs, stale reads, stale locks, config fuzzing)
are the pytest tests in tests/chaos/, run here through pytest with $CHAOS_FIGURES collecting what they
measured. Prints one table row per scenario: faults injected, PASS/FAIL, data lost (rollouts/rounds/
checkpoints), time to recover. Exit code 0 when every scenario passed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "chaos"), str(ROOT / "tests"), str(ROOT)]

from node.fsio import read_jsonl  # noqa: E402
from scenarios import FIGURES_ENV, SCENARIOS, Figures, render_table, run_scenario  # noqa: E402
from trust_scenarios import TRUST_SCENARIOS  # noqa: E402

SCENARIOS = {**SCENARIOS, **TRUST_SCENARIOS}

# pytest-only scenarios: (row title, test ids, faults injected, how to turn their recorded figures into a row)
PYTEST_SCENARIOS = [
    ("drive_disconnect", "Drive disconnect (real FUSE mount → ENOTCONN)",
     ["tests/chaos/test_flaky_mount.py::test_drive_disconnect_spools_and_recovers_with_zero_loss"]),
    ("enospc_checkpoint", "ENOSPC during a checkpoint (real 4 MiB tmpfs)",
     ["tests/chaos/test_disk_and_files.py::test_enospc_during_checkpoint_keeps_the_previous_one"]),
    ("enospc_publish", "ENOSPC during a publish (real 4 MiB tmpfs)",
     ["tests/chaos/test_disk_and_files.py::test_enospc_during_publish_spools_then_lands"]),
    ("stale_read", "Stale read: peer file replaced while being read",
     ["tests/chaos/test_disk_and_files.py::test_reader_never_sees_half_a_file"]),
    ("half_written", "Half-written file from a SIGKILLed writer",
     ["tests/chaos/test_disk_and_files.py::test_half_written_file_from_a_killed_writer_is_skipped"]),
    ("io_bursts", "EIO/ENOTCONN/ESTALE/EAGAIN on every read (fault-injecting fs)",
     ["tests/chaos/test_disk_and_files.py::test_flaky_fs_eio_bursts_never_raise_from_reads"]),
    ("stale_lock", "Stale lock of a SIGKILLed process",
     ["tests/chaos/test_disk_and_files.py::test_lock_held_by_a_killed_process_is_released"]),
    ("config_fuzz", "Config fuzzing (YAML, env, --set)",
     ["tests/chaos/test_config_fuzz.py"]),
]

ORDER = ["kill_storm", "host_disconnect", "hung_worker", "hung_main_loop", "crash_loop_bad_model",
         "crash_loop_import_error", "drive_disconnect", "enospc_checkpoint", "enospc_publish", "stale_read",
         "half_written", "io_bursts", "stale_lock", "malicious_peer_files", "second_supervisor", "config_fuzz",
         "forged_state", "own_paths", "planted_files", "startup_under_load"]


def run_pytest_scenarios(names: list[str], workdir: Path, quick: bool) -> dict[str, Figures]:
    """Run the selected pytest scenarios in one pytest process; one Figures per scenario."""
    chosen = [s for s in PYTEST_SCENARIOS if s[0] in names]
    if not chosen:
        return {}
    workdir.mkdir(parents=True, exist_ok=True)
    figures_file = workdir / "figures.jsonl"
    junit = workdir / "junit.xml"
    ids = [t for _, _, tests in chosen for t in tests]
    env = {**os.environ, FIGURES_ENV: str(figures_file)}  # these tests have one length: quick or not
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                           f"--basetemp={workdir / 'pytest'}", *ids], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    elapsed = time.monotonic() - started
    outcomes: dict[str, tuple[str, str, float]] = {}  # test function name -> (outcome, message, seconds)
    try:
        for case in ET.parse(junit).getroot().iter("testcase"):
            status, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    status, message = tag, (el.get("message") or el.text or "")[:300]
            outcomes[case.get("name")] = (status, message, float(case.get("time") or 0))
    except (OSError, ET.ParseError):
        pass
    recorded: dict[str, dict] = {}
    for obj in read_jsonl(figures_file)[0]:  # a line cut by a killed test run is skipped, not a crash
        if isinstance(obj.get("test"), str):
            recorded.setdefault(obj.pop("test"), {}).update(obj)
    rows = {}
    for key, title, tests in chosen:
        fig = Figures(title)
        mine = {n: o for n, o in outcomes.items()
                if any(n.split("[")[0] == t.split("::")[-1] or (t.endswith(".py") and n.startswith("test_"))
                       for t in tests)}
        if key == "config_fuzz":
            mine = {n: o for n, o in outcomes.items() if n.startswith("test_random_")}
        if not mine:
            fig.problems.append(f"pytest did not report these tests (rc {proc.returncode}): "
                                f"{proc.stdout[-500:]} {proc.stderr[-300:]}")
        for name, (status, message, seconds) in mine.items():
            fig.duration_s += seconds
            if status == "skipped":
                fig.problems.append(f"{name} SKIPPED: {message}")
            elif status != "passed":
                fig.problems.append(f"{name} {status}: {message}")
        data = dict(recorded.get(key, {}))
        if key not in recorded and not fig.problems:
            fig.problems.append("the test recorded no figures")
        fig.faults = data.pop("faults", fig.faults) or ", ".join(tests)
        fig.recover = data.pop("recover", "")
        for k in ("rollouts", "rounds", "checkpoints"):
            fig.lost[k] = int(data.pop(f"lost_{k}", 0))
        fig.details.update(data)
        fig.measured = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in data.items())
        rows[key] = fig
    print(f"[pytest scenarios: {elapsed:.0f} s]", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the short versions (as in tests/chaos)")
    p.add_argument("--only", action="append", choices=ORDER, help="run only these scenarios (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the working directories")
    p.add_argument("--json", type=Path, help="also write the figures as JSON here")
    p.add_argument("--seed", type=int, help="seed of the random choices (kill_storm, host_disconnect) to replay a run")
    args = p.parse_args(argv)
    names = args.only or ORDER
    base = Path(tempfile.mkdtemp(prefix="chaos-"))
    started = time.monotonic()
    print(f"chaos {'--quick ' if args.quick else ''}on {platform.node()} ({os.cpu_count()} CPUs), "
          f"work dir {base}", file=sys.stderr)
    rows: dict[str, Figures] = {}
    try:
        pytest_rows = run_pytest_scenarios([n for n in names if n not in SCENARIOS], base / "pytest", args.quick) \
            if any(n not in SCENARIOS for n in names) else {}
        rows.update(pytest_rows)
        for name in names:
            if name in SCENARIOS:
                print(f"[{name} ...]", file=sys.stderr, flush=True)
                fn = SCENARIOS[name]
                extra = {"seed": args.seed} if args.seed is not None and "seed" in inspect.signature(fn).parameters else {}
                fig = run_scenario(fn, base / name, quick=args.quick, **extra)
                rows[name] = fig
                print(fig.report(), file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    ordered = [rows[n] for n in names if n in rows]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\nChaos figures ({'--quick' if args.quick else 'long'}), {stamp}, {platform.node()}: "
          f"{os.cpu_count()} CPUs, {platform.python_version()}; total {time.monotonic() - started:.0f} s\n")
    print(render_table(ordered))
    failed = [f for f in ordered if not f.passed]
    print(f"\n{len(ordered) - len(failed)}/{len(ordered)} scenarios passed; data lost "
          f"{sum(sum(f.lost.values()) for f in ordered)}")
    for f in failed:
        print(f"\nFAIL {f.scenario}:\n" + "\n".join(f"  - {x}" for x in f.problems))
    if args.json:
        args.json.write_text(json.dumps([f.to_json() for f in ordered], indent=1))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
