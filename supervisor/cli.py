"""``swarm``: launch, watch, stop and check one experiment's swarm (1 coordinator + N workers).

Every subcommand takes the experiment's CONFIG file plus ``--set section.field=value`` (repeatable) and
honours the same environment overrides as the nodes (``GDRIVE_PATH``, ``EXPERIMENT_NAME``, ``TEST_MODE``,
...; see ``node.config``), so ``swarm status CONFIG`` finds the supervisor that ``swarm launch CONFIG``
started. Local runtime files (lock, pid, status.json, logs, heartbeats) live in
``~/.cache/sapo-swarm/run/<name>-<hash>`` or ``$SWARM_RUNTIME_DIR``.

Exit codes: 0 success; 1 a node went FATAL / validation failed / stop timed out; 2 a user mistake
(configuration, impossible GPU plan, a supervisor already running), one line on stderr, no traceback;
3 ``status``: no supervisor is running; 128+N the supervisor was stopped by signal N (143 SIGTERM, 130 SIGINT).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, TextIO

import structlog
import yaml

from node.config import resolve_config
from node.layout import ExperimentLayout, parse_round_dir, parse_stage_dir
from node.logs import configure_logging as setup_logging
from node.logs import rotated_files
from node.schemas import ConfigSnapshot, PeerRecord, RolloutFile, RoundResult, RoundState, validate_metrics_line
from sapo.config import ConfigError
from supervisor import procs
from supervisor.daemon import Supervisor
from supervisor.launch import node_names
from supervisor.runfiles import AlreadyRunning, RuntimePaths, running_supervisor
from supervisor.status import read_status
from supervisor.gpu_plan import PlanError
from supervisor.systemd import render_unit, unit_name

NODE_COMMAND_ENV = "SWARM_NODE_COMMAND"  # tests and the bench run a fake node through this
EXIT_NOT_RUNNING = 3
STALE_STATUS_S = 60.0  # a running supervisor rewrites status.json every monitor interval
MAX_JSON_BYTES = 64 * 1024 * 1024


class CommandError(Exception):
    """A user mistake: printed as one line on stderr, exit ``code`` (2 by default), no traceback."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- logging

class RingHandler(logging.Handler):
    """Keeps the last formatted lines for the live display."""

    def __init__(self, ring: deque):
        super().__init__()
        self.ring = ring

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.ring.append(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def configure_logging(log_file: Path | None, console: str = "plain", ring: deque | None = None) -> None:
    """node.logs' one setup: JSON lines to ``log_file`` (rotated); the console as ``tty``, ``plain`` or
    ``none``; ``ring`` collects lines for the live display."""
    setup_logging(log_file, console=console, handlers=(RingHandler(ring),) if ring is not None else ())


# --------------------------------------------------------------------------- formatting helpers

def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit in ("B", "K") else f"{n:.1f}{unit}"
        n /= 1024
    return "-"


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def render_log_line(line: str) -> str:
    """A JSON log line (structlog) as ``HH:MM:SS level event k=v ...``; anything else unchanged."""
    text = line.rstrip("\n")
    if not text.startswith("{"):
        return text
    try:
        obj = json.loads(text)
    except ValueError:
        return text
    if not isinstance(obj, dict) or "event" not in obj:
        return text
    ts = str(obj.pop("timestamp", ""))
    clock = ts[11:19] if len(ts) >= 19 else ts
    level = str(obj.pop("level", "")).lower()
    event = obj.pop("event")
    for noise in ("logger", "pid", "node_id", "role"):
        obj.pop(noise, None)
    exc = obj.pop("exception", None)
    rest = " ".join(f"{k}={v if not isinstance(v, str) or ' ' not in v else repr(v)}" for k, v in obj.items())
    out = f"{clock} {level:<7} {event}" + (f" {rest}" if rest else "")
    if exc:
        out += "\n" + str(exc).rstrip()
    return out


def _line_time(line: str) -> float | None:
    if not line.startswith("{"):
        return None
    try:
        ts = json.loads(line).get("timestamp")
        return datetime.fromisoformat(str(ts).replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError, TypeError):
        return None


def render_status(st: dict | None, *, running_pid: int | None, runtime_dir: Path, experiment: str,
                  recent: Iterable[str] = (), now: float | None = None) -> str:
    """The human view of ``status.json``: a header, one row per node, then what went wrong."""
    now = time.time() if now is None else now
    out: list[str] = []
    if running_pid is None:
        out.append(f"No supervisor is running for experiment {experiment!r} (runtime dir {runtime_dir}).")
        if st is None:
            out.append("No status file either: it was never launched from this machine, or with another "
                       "$SWARM_RUNTIME_DIR / experiment.root.")
            return "\n".join(out)
        age = now - float(st.get("updated_at") or now)
        code = st.get("exit_code")
        out.append(f"Last status, written {fmt_age(age)} ago by pid {st.get('supervisor', {}).get('pid')}: "
                   f"{st.get('state')}" + (f", exit code {code}" if code is not None else
                                            " (it did not exit cleanly: killed, or the machine went down)"))
    else:
        sup = (st or {}).get("supervisor", {})
        out.append(f"Supervisor pid {running_pid} for experiment {experiment!r}: {(st or {}).get('state', '?')}"
                   f"  (supervisor cpu {sup.get('cpu_percent', '-')}%, rss {fmt_bytes(sup.get('rss_bytes'))})")
        if st is None:
            out.append("(no status file yet)")
            return "\n".join(out)
        age = now - float(st.get("updated_at") or now)
        if age > STALE_STATUS_S:
            out.append(f"WARNING: status.json was last written {fmt_age(age)} ago: the supervisor's loop may be "
                       f"stuck (py-spy dump --pid {running_pid})")
    launch = st.get("launch") or {}
    gpu = st.get("gpu") or {}
    out.append(f"{st.get('summary', '')}")
    out.append(f"{launch.get('describe', '')}" + (f"; GPU utilisation {gpu.get('utilization')}%"
                                                 if gpu.get("utilization") is not None else ""))
    header = ("NODE", "STATE", "PID", "ROUND", "PHASE", "BEAT", "RESTARTS", "REWARD", "RSS", "CPU%", "GPU MEM",
              "LAST EXIT")
    rows = []
    for name, n in (st.get("nodes") or {}).items():
        gpu_mem = "?" if n.get("gpu_unknown") else fmt_bytes(n.get("gpu_bytes"))  # unknown is never 0
        if n.get("gpu_budget_bytes"):
            gpu_mem += f"/{fmt_bytes(n['gpu_budget_bytes'])}"
        if n.get("over_budget"):
            gpu_mem += " OVER"
        reward = n.get("reward")
        rows.append((
            name, n.get("state", "?"), str(n.get("pid") or "-"),
            "-" if n.get("round") is None else str(n["round"]), n.get("phase") or "-",
            fmt_age(n.get("heartbeat_age_s")), str(n.get("restarts", 0)),
            "-" if reward is None else f"{reward:.3f}", fmt_bytes(n.get("rss_bytes")),
            "-" if n.get("cpu_percent") is None else f"{n['cpu_percent']:.0f}", gpu_mem,
            (n.get("last_exit_line") or "-")[:60],
        ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for r in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for name, n in (st.get("nodes") or {}).items():
        last = n.get("last_exit") or {}
        failed = n.get("state") in ("FATAL", "BACKOFF") or (
            last and last.get("reason") not in (None, "stopped") and not (last.get("returncode") == 0))
        if not failed:
            continue
        out.append("")
        out.append(f"{name}: {n.get('state')}" + (f" — {n['fatal_reason']}" if n.get("fatal_reason") else ""))
        if n.get("last_exit_line"):
            out.append(f"  last exit: {n['last_exit_line']}")
        if n.get("backoff_left_s") is not None:
            out.append(f"  restarting in {n['backoff_left_s']:.1f} s")
        tail = n.get("log_tail") or []
        if not tail and n.get("logs", {}).get("stderr"):
            tail = procs.tail_file(n["logs"]["stderr"], lines=5).splitlines()
        if tail:
            out.append(f"  last log lines ({n.get('logs', {}).get('stderr', 'stderr')}):")
            for line in tail[-8:]:
                out.extend("    " + part for part in render_log_line(line).splitlines()[:6])
    if any(n.get("gpu_unknown") for n in (st.get("nodes") or {}).values()):
        out.append("")
        out.append("GPU MEM ?: NVML does not report this process's memory here (MIG, some containers, or it "
                   "cannot list the processes); the budget is not checked")
    if st.get("over_budget"):
        out.append("")
        out.append("over GPU memory budget: " + ", ".join(st["over_budget"]))
    if st.get("stop_reason"):
        out.append(f"stop reason: {st['stop_reason']}")
    recent = list(recent)
    if recent:
        out.append("")
        out.append("recent events:")
        out.extend("  " + line[:200] for line in recent)
    return "\n".join(out)


# --------------------------------------------------------------------------- shared argument handling

def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="the experiment's YAML file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field (repeatable), as the nodes get it")


def _load(args, extra: Iterable[str] = ()):
    overrides = [*args.sets, *extra]
    return resolve_config(args.config, overrides=overrides), overrides


def _node_command() -> list[str] | None:
    raw = os.environ.get(NODE_COMMAND_ENV, "").strip()
    return shlex.split(raw) if raw else None


# --------------------------------------------------------------------------- launch

class LiveDisplay:
    """Redraws the status table on a TTY at most once per ``interval`` seconds."""

    def __init__(self, stream: TextIO, ring: deque, interval: float = 1.0):
        self.stream, self.ring, self.interval = stream, ring, interval
        self._last = 0.0

    def __call__(self, sup: Supervisor) -> None:
        now = time.monotonic()
        if now - self._last < self.interval and sup.exit_code is None:
            return
        self._last = now
        recent = [render_log_line(line).splitlines()[0] for line in list(self.ring)[-6:]]
        text = render_status(sup.snapshot(), running_pid=os.getpid(), runtime_dir=sup.paths.root,
                             experiment=sup.config.experiment.name, recent=recent)
        text += "\nCtrl-C: stop gracefully (twice: kill)   logs: swarm logs CONFIG -f"
        width = shutil.get_terminal_size((160, 40)).columns
        self.stream.write("\x1b[H\x1b[2J" + "\n".join(line[:width] for line in text.splitlines()) + "\n")
        self.stream.flush()


def cmd_launch(args) -> int:
    extra = [f"supervisor.workers={args.workers}"] if args.workers is not None else []
    config, overrides = _load(args, extra)
    paths = RuntimePaths.for_config(config)
    pid = running_supervisor(paths)
    if pid is not None:
        raise AlreadyRunning(pid, paths.root)
    kwargs = dict(config_path=args.config, overrides=overrides, node_command=_node_command())
    if args.detach:
        return _detach(config, kwargs, paths)
    ring: deque = deque(maxlen=50)
    tty = sys.stdout.isatty() and sys.stderr.isatty()
    configure_logging(paths.supervisor_log, console="none" if tty else "plain", ring=ring if tty else None)
    sup = Supervisor(config, **kwargs)
    display = LiveDisplay(sys.stdout, ring) if tty else None
    rc = sup.run(on_tick=display, tick_interval=1.0 if display else None)
    print(f"swarm: supervisor exited with code {rc}: {sup.summary_line()}", file=sys.stderr)
    return rc


def _detach(config, kwargs: dict, paths: RuntimePaths) -> int:
    """Double-fork into the background (new session), report the daemon's pid or its refusal."""
    probe = Supervisor(config, **kwargs, log=structlog.get_logger("supervisor"))
    configure_logging(None, console="none")
    try:
        probe.prepare()  # an impossible GPU plan is refused here, before anything forks
    finally:
        probe.close_gpu()
    paths.logs_dir.mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    first = os.fork()
    if first:
        os.close(write_fd)
        chunks = []
        while True:
            data = os.read(read_fd, 4096)
            if not data:
                break
            chunks.append(data)
        os.close(read_fd)
        os.waitpid(first, 0)
        message = b"".join(chunks).decode(errors="replace").strip()
        if message.startswith("ok "):
            pid = message.split()[1]
            print(pid)
            print(f"swarm: supervisor running in the background (pid {pid}); logs in {paths.logs_dir}; "
                  f"`swarm status CONFIG`, `swarm stop CONFIG`", file=sys.stderr)
            return 0
        if message.startswith("err "):
            _, code, text = message.split(" ", 2)
            print(f"swarm: {text}", file=sys.stderr)
            return int(code)
        print(f"swarm: the background supervisor exited before starting; see {paths.detached_output}",
              file=sys.stderr)
        return 1
    # the intermediate child: new session, then leave the daemon as an orphan of init
    try:
        os.close(read_fd)
        os.setsid()
        if os.fork():
            os._exit(0)
        _run_daemon(config, kwargs, paths, write_fd)
    except BaseException:  # noqa: BLE001 - never return into the caller's stack in a forked child
        import traceback

        traceback.print_exc()
        os._exit(1)
    os._exit(1)


def _run_daemon(config, kwargs: dict, paths: RuntimePaths, write_fd: int) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    out = os.open(paths.detached_output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(devnull)
    os.close(out)
    configure_logging(paths.supervisor_log, console="none")
    state = {"fd": write_fd}

    def report(text: str) -> None:
        if state["fd"] is not None:
            try:
                os.write(state["fd"], text.encode())
            finally:
                os.close(state["fd"])
                state["fd"] = None

    rc = 1
    try:
        sup = Supervisor(config, **kwargs)
        rc = sup.run(on_started=lambda s: report(f"ok {os.getpid()}\n"))
    except (AlreadyRunning, PlanError, ConfigError) as err:
        report(f"err 2 {err}")
        rc = 2
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        report("err 1 the supervisor failed at start-up; see " + str(paths.detached_output))
        rc = 1
    finally:
        report("")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


# --------------------------------------------------------------------------- status / stop

def cmd_status(args) -> int:
    config, _ = _load(args)
    paths = RuntimePaths.for_config(config)
    while True:
        pid = running_supervisor(paths)
        st = read_status(paths)
        if args.json:
            print(json.dumps({"running": pid is not None, "supervisor_pid": pid, "runtime_dir": str(paths.root),
                              "experiment": config.experiment.name, "status": st}, indent=1))
        else:
            text = render_status(st, running_pid=pid, runtime_dir=paths.root, experiment=config.experiment.name)
            if args.watch:
                sys.stdout.write("\x1b[H\x1b[2J")
            print(text, flush=True)
        if not args.watch:
            return 0 if pid is not None else EXIT_NOT_RUNNING
        try:
            time.sleep(1.0)
        except KeyboardInterrupt:
            return 0


def cmd_stop(args) -> int:
    config, _ = _load(args)
    paths = RuntimePaths.for_config(config)
    pid = running_supervisor(paths)
    if pid is None:
        print(f"No supervisor is running for experiment {config.experiment.name!r}; nothing to stop.")
        return 0
    timeout = args.timeout if args.timeout is not None else config.supervisor.stop_timeout_s + 30
    os.kill(pid, signal.SIGTERM)
    print(f"Sent SIGTERM to supervisor pid {pid}; waiting up to {timeout:g} s for the nodes to checkpoint "
          f"and exit...", flush=True)
    deadline = time.monotonic() + timeout
    while procs.is_alive(pid):
        if time.monotonic() > deadline:
            print(f"swarm: supervisor pid {pid} is still running after {timeout:g} s; "
                  f"`kill -9 {pid}` kills it and every node (they die with it)", file=sys.stderr)
            return 1
        time.sleep(0.1)
    st = read_status(paths) or {}
    print(f"Stopped: supervisor exit code {st.get('exit_code', '?')} ({st.get('summary', 'no status')}).")
    return 0


# --------------------------------------------------------------------------- logs

LogFile = tuple[str, Path, bool]  # (label, path, skip JSON lines: they are in the structured log too)


def log_files(paths: RuntimePaths, config, node: str | None) -> list[LogFile]:
    """(label, path, skip_json) of every log of the swarm, or of one node.

    A node's JSON log lines go both to its structured log and to its stderr: when the structured log
    exists, stderr/stdout contribute only their other lines (tracebacks, prints)."""
    names = [n for n, _ in node_names(config.supervisor.workers)]
    if node is not None:
        if node != "supervisor" and node not in names:
            known = sorted({*names, *(p.name.split(".")[0] for p in paths.logs_dir.glob("*.log"))})
            if node not in known:
                raise CommandError(f"no node {node!r}; known: {', '.join(['supervisor', *names])}")
        names = [node]
    files: list[LogFile] = []
    for name in names:
        if name == "supervisor":
            continue
        structured = paths.node_log(name).exists()
        files += [(name, paths.node_log(name), False), (name, paths.stderr_log(name), structured),
                  (name, paths.stdout_log(name), structured)]
    if node in (None, "supervisor"):
        files += [("supervisor", paths.supervisor_log, False), ("supervisor", paths.detached_output, True),
                  ("on_event", paths.events_log, False)]
    return files


def _is_json_line(line: str) -> bool:
    return line.startswith("{") and line.rstrip().endswith("}")


def merged_tail(files: list[LogFile], lines: int) -> list[tuple[str, str]]:
    """The last ``lines`` lines over all files, ordered by their timestamps where they have one."""
    entries = []
    for order, (label, path, skip_json) in enumerate(files):
        text = procs.tail_file(path, max_bytes=max(65536, lines * 400), lines=lines)
        stamps = (t for t in map(_line_time, text.splitlines()) if t is not None)
        try:  # lines before the first timestamp: that timestamp, or the file's mtime when it has none
            last = next(stamps, None) or path.stat().st_mtime
        except OSError:
            last = 0.0
        for i, line in enumerate(text.splitlines()):
            ts = _line_time(line)
            last = ts if ts is not None else last  # a traceback sorts with the JSON line before it
            if skip_json and _is_json_line(line):
                continue
            entries.append((last, order, i, label, line))
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    return [(e[3], e[4]) for e in entries[-lines:]] if lines > 0 else []


def follow(files: list[LogFile], emit: Callable[[str, str], None], *, poll_s: float = 0.25,
           should_stop: Callable[[], bool] = lambda: False, from_end: bool = True) -> None:
    """Emit new complete lines of every file as they arrive (a truncated file starts over)."""
    offsets = {path: (procs.file_size(path) if from_end else 0) for _, path, _ in files}
    partial: dict[Path, bytes] = {path: b"" for _, path, _ in files}
    while not should_stop():
        for label, path, skip_json in files:
            size = procs.file_size(path)
            if size < offsets[path]:
                offsets[path], partial[path] = 0, b""
            if size == offsets[path]:
                continue
            try:
                with open(path, "rb") as f:
                    f.seek(offsets[path])
                    data = f.read(size - offsets[path])
            except OSError:
                continue
            offsets[path] += len(data)
            data = partial[path] + data
            *complete, partial[path] = data.split(b"\n")
            for raw in complete:
                line = raw.decode("utf-8", errors="replace")
                if not (skip_json and _is_json_line(line)):
                    emit(label, line)
        time.sleep(poll_s)


def cmd_logs(args) -> int:
    config, _ = _load(args)
    paths = RuntimePaths.for_config(config)
    files = log_files(paths, config, args.node)
    width = max(len(label) for label, _, _ in files)

    def emit(label: str, line: str) -> None:
        for part in render_log_line(line).splitlines() or [""]:
            print(f"{label:<{width}} | {part}", flush=True)

    if not any(path.exists() for _, path, _ in files):
        print(f"No logs yet in {paths.logs_dir}.", file=sys.stderr)
        if not args.follow:
            return 0
    # The tail reaches into rotated files (<name>.log.1, ...) too; following watches the live ones.
    history = [(label, old, skip) for label, path, skip in files for old in rotated_files(path)[:-1]]
    for label, line in merged_tail(history + files, args.lines):
        emit(label, line)
    if args.follow:
        try:
            follow(files, emit)
        except KeyboardInterrupt:
            return 0
    return 0


# --------------------------------------------------------------------------- validate

@dataclass(frozen=True)
class Check:
    """One line of ``swarm validate``."""

    name: str
    ok: bool
    detail: str


def _read_json(path: Path):
    with open(path, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(f"larger than {MAX_JSON_BYTES} bytes")
    return json.loads(data)


def _read_jsonl(path: Path) -> list[tuple[int, object | Exception]]:
    out = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                out.append((i, json.loads(raw)))
            except ValueError as err:
                out.append((i, err))
    return out


def _ranges(rounds: Iterable[int]) -> str:
    rs = sorted(set(rounds))
    if not rs:
        return "none"
    parts, start, prev = [], rs[0], rs[0]
    for r in rs[1:] + [None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(parts)


def _round_files(layout: ExperimentLayout, kind: str) -> list[tuple[int, int, Path]]:
    """(round, stage, path) of every ``<kind>/round_R/stage_S/*.json``."""
    out = []
    for r in layout.rounds_present(kind):
        rdir = layout.round_dir(kind, r)
        try:
            stages = sorted(os.listdir(rdir))
        except OSError:
            continue
        for sname in stages:
            s = parse_stage_dir(sname)
            if s is None:
                continue
            for f in sorted((rdir / sname).glob("*.json")):
                out.append((r, s, f))
    return out


def validate_experiment(config) -> list[Check]:
    """The seeds' validate_test_run: final state, per-worker metrics/rollouts/events, every file's schema."""
    layout = ExperimentLayout.from_config(config)
    name, max_rounds = config.experiment.name, config.experiment.max_rounds
    checks: list[Check] = []
    if not layout.root.is_dir():
        return [Check("experiment dir", False, f"{layout.root} does not exist")]
    # state
    try:
        state = RoundState.from_json(_read_json(layout.state_file()), expect_experiment=name)
        ok = state.finished and state.round >= max_rounds
        checks.append(Check("state", ok, f"round {state.round} of {max_rounds}, "
                                         f"{'finished' if state.finished else 'NOT finished'}"
                            + ("" if state.round >= max_rounds else f": max_rounds ({max_rounds}) not reached")))
    except FileNotFoundError:
        checks.append(Check("state", False, f"{layout.relative(layout.state_file())} is missing"))
    except (OSError, ValueError) as err:
        checks.append(Check("state", False, f"{layout.relative(layout.state_file())}: {err}"))
    # config snapshot
    snap = None
    try:
        snap = ConfigSnapshot.from_json(_read_json(layout.config_file()), expect_experiment=name)
        checks.append(Check("config snapshot", True, f"written by {snap.written_by}"))
    except FileNotFoundError:
        checks.append(Check("config snapshot", False, f"{layout.relative(layout.config_file())} is missing"))
    except (OSError, ValueError) as err:
        checks.append(Check("config snapshot", False, f"{layout.relative(layout.config_file())}: {err}"))
    # peers
    bad, count = [], 0
    for f in sorted(layout.peers_dir().glob("*.json")) if layout.peers_dir().is_dir() else []:
        count += 1
        try:
            PeerRecord.from_json(_read_json(f), expect_node=f.stem)
        except (OSError, ValueError) as err:
            bad.append(f"{f.name}: {err}")
    checks.append(Check("peers", not bad and count > 0,
                        "; ".join(bad[:3]) if bad else (f"{count} peer files valid" if count else "no peer files")))
    # every rollout and reward file parses
    rollouts: dict[str, set[int]] = {}
    for kind, parse in (("rollouts", RolloutFile.from_json), ("rewards", RoundResult.from_json)):
        bad, count = [], 0
        for r, s, f in _round_files(layout, kind):
            count += 1
            try:
                parse(_read_json(f), expect_round=r, expect_stage=s, expect_node=f.stem)
                if kind == "rollouts":
                    rollouts.setdefault(f.stem, set()).add(r)
            except (OSError, ValueError) as err:
                bad.append(f"{layout.relative(f)}: {err}")
        checks.append(Check(f"{kind} files", not bad, "; ".join(bad[:3]) + (f" (+{len(bad) - 3} more)"
                            if len(bad) > 3 else "") if bad else f"{count} files valid"))
    # archived rollouts count as present
    archive = layout.archive_root / "rollouts" if layout.archive_root is not None else None
    archived = archive is not None and archive.is_dir()
    if archived:
        for rdir in archive.iterdir():
            r = parse_round_dir(rdir.name)
            if r is not None:
                for f in rdir.rglob("*.json"):
                    rollouts.setdefault(f.stem, set()).add(r)
    pruned_below = _pruned_below(layout, config, snap, archived)
    # per worker
    expected = set(range(max_rounds))
    for i in range(1, config.supervisor.workers + 1):
        w = f"worker_{i}"
        skipped: set[int] = set()
        events = layout.events_file(w)
        if events.exists():
            try:
                lines = _read_jsonl(events)
                broken = [n for n, obj in lines if not isinstance(obj, dict)]
                for _, obj in lines:
                    if isinstance(obj, dict) and obj.get("event") == "rounds_skipped":
                        skipped.update(r for r in obj.get("rounds") or [] if isinstance(r, int))
                checks.append(Check(f"{w} events", not broken,
                                    f"lines {broken[:5]} are not JSON objects" if broken else f"{len(lines)} events"))
            except OSError as err:
                checks.append(Check(f"{w} events", False, str(err)))
        else:
            checks.append(Check(f"{w} events", False, f"{layout.relative(events)} is missing"))
        metrics = layout.metrics_file(w)
        trained: list[int] = []
        problems = []
        if not metrics.exists():
            checks.append(Check(f"{w} metrics", False, f"{layout.relative(metrics)} is missing"))
            continue
        try:
            for n, obj in _read_jsonl(metrics):
                if isinstance(obj, Exception):
                    problems.append(f"line {n}: not JSON ({obj})")
                    continue
                try:
                    validate_metrics_line(obj, expect_node=w)
                    trained.append(obj["round"])
                except ValueError as err:
                    problems.append(f"line {n}: {err}")
        except OSError as err:
            problems.append(str(err))
        dups = sorted({r for r in trained if trained.count(r) > 1})
        if dups:
            problems.append(f"rounds with more than one line: {_ranges(dups)}")
        missing = expected - set(trained) - skipped
        if missing:
            problems.append(f"no line for rounds {_ranges(missing)}")
        checks.append(Check(f"{w} metrics", not problems, "; ".join(problems[:4]) if problems else
                            f"{len(trained)} lines, rounds {_ranges(trained)}"
                            + (f", skipped {_ranges(skipped)}" if skipped else "")))
        checks.append(_rollouts_check(w, trained, rollouts.get(w, set()), pruned_below))
    return checks


def _pruned_below(layout, config, snap, archived: bool) -> int:
    """Rounds below this were removed by retention without an archive to check them against (0: none).

    The experiment's own settings (its config snapshot) decide, since the run may have been launched with
    overrides this command was not given; the oldest round directory still present says how far it got.
    """
    exchange = {"cleanup_enabled": config.exchange.cleanup_enabled, "archive_old": config.exchange.archive_old}
    if snap is not None and isinstance(snap.config.get("exchange"), dict):
        exchange.update(snap.config["exchange"])
    if not exchange.get("cleanup_enabled") or (exchange.get("archive_old") and archived):
        return 0
    live = layout.root / "rollouts"
    rounds = [r for r in (parse_round_dir(d.name) for d in live.iterdir()) if r is not None] if live.is_dir() else []
    return min(rounds) if rounds else 0


def _rollouts_check(worker: str, trained: list[int], present: set[int], pruned_below: int) -> Check:
    """Every trained round has this worker's rollout file, unless retention removed that round."""
    pruned = {r for r in trained if r < pruned_below} - present
    missing = set(trained) - present - pruned
    if not trained:
        return Check(f"{worker} rollouts", False, "no trained rounds")
    if missing:
        return Check(f"{worker} rollouts", False, f"no rollout file for trained rounds {_ranges(missing)}")
    detail = f"rollout files for rounds {_ranges(set(trained) & present)}"
    if pruned:
        detail += f"; rounds {_ranges(pruned)} pruned by retention"
    return Check(f"{worker} rollouts", True, detail)


def cmd_validate(args) -> int:
    config, _ = _load(args)
    checks = validate_experiment(config)
    width = max(len(c.name) for c in checks)
    print(f"validate {config.experiment_dir}")
    for c in checks:
        print(f"{'PASS' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}")
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks passed" + (": FAILED" if failed else ": OK"))
    return 1 if failed else 0


# --------------------------------------------------------------------------- config / systemd-unit

def cmd_config(args) -> int:
    if args.schema:  # the file's JSON Schema: needs no valid config (editors validate configs with it)
        from node.config import config_json_schema

        sys.stdout.write(json.dumps(config_json_schema(), indent=2) + "\n")
        return 0
    config, _ = _load(args)
    sys.stdout.write(yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False))
    return 0


def cmd_systemd_unit(args) -> int:
    config, overrides = _load(args)
    if args.name_only:
        print(unit_name(config))
        return 0
    sys.stdout.write(render_unit(config, config_path=args.config, overrides=overrides, user=args.user))
    return 0


# --------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm", description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("launch", help="start the coordinator and N workers under the supervisor",
                       description="Start the swarm and supervise it: restarts crashed or hung nodes, "
                                   "exits 0 when the experiment finished. Foreground with a live status "
                                   "table on a terminal (plain log lines otherwise), or --detach.")
    _config_args(p)
    p.add_argument("--workers", type=int, metavar="N", help="number of workers (= --set supervisor.workers=N)")
    p.add_argument("--detach", action="store_true",
                   help="run in the background (new session); prints its pid; logs in the runtime dir")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("status", help="show the supervisor's status (per-node state, round, memory)",
                       description="Show status.json of the running supervisor, or say that none runs. "
                                   "Exit code 0 when a supervisor runs, 3 when none does.")
    _config_args(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--watch", action="store_true", help="redraw every second until Ctrl-C")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("stop", help="stop the supervisor gracefully (nodes checkpoint first)",
                       description="SIGTERM the supervisor; it SIGTERMs every node, waits stop_timeout_s "
                                   "for checkpoints, then SIGKILLs. Waits for it to exit.")
    _config_args(p)
    p.add_argument("--timeout", type=float, metavar="S", help="wait at most S seconds (default stop_timeout_s + 30)")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("logs", help="merged, readable logs of every node (or one)",
                       description="Print the last lines of every node's logs merged by time, each prefixed "
                                   "with its node id; -f keeps following.")
    _config_args(p)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until Ctrl-C")
    p.add_argument("--node", metavar="ID", help="only this node (coordinator, worker_1, ..., supervisor)")
    p.add_argument("-n", "--lines", type=int, default=50, metavar="N", help="lines of history to print (50)")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("validate", help="check a finished experiment directory (pass/fail table)",
                       description="Check that the state reached max_rounds and finished, that every worker "
                                   "has one metrics line per round, rollout files for every round it trained "
                                   "and training events, and that every file parses. Exit 0 pass, 1 fail.")
    _config_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("config", help="print the resolved config (file + env + --set) as YAML",
                       description="Print the configuration the nodes would run with, as YAML; with --schema, "
                                   "the JSON Schema of the YAML file instead (for editors' validation).")
    _config_args(p)
    p.add_argument("--schema", action="store_true", help="print the config file's JSON Schema and exit")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("systemd-unit", help="print a systemd unit file for this experiment",
                       description="Print a Type=notify unit running `swarm launch CONFIG` with this venv's "
                                   "python; scripts/install_service.sh installs it.")
    _config_args(p)
    p.add_argument("--user", help="User= of the service (default: you)")
    p.add_argument("--name-only", action="store_true", help="print only the unit's file name")
    p.set_defaults(func=cmd_systemd_unit)

    from supervisor import report  # matplotlib is imported lazily, only when a report is drawn

    p = sub.add_parser("report", help="plots and a cumulative-reward table comparing experiments",
                       description=report.DESCRIPTION)
    report.add_arguments(p)
    p.set_defaults(func=report.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``swarm`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or an argparse usage error (already printed)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        return int(args.func(args))
    except CommandError as err:
        print(f"swarm: {err}", file=sys.stderr)
        return err.code
    except ConfigError as err:
        print(f"swarm: configuration error: {err}", file=sys.stderr)
        return 2
    except PlanError as err:
        print(f"swarm: GPU plan refused: {err}", file=sys.stderr)
        return 2
    except AlreadyRunning as err:
        print(f"swarm: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `swarm logs | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
