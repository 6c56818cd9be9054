"""``swarm logs``: every log of the swarm merged by time, rendered readably, optionally followed.

The logs are local runtime files (``<runtime dir>/logs``) written by our own processes: structlog JSON
lines (``<node>.log``, ``supervisor.log``, rotated as ``.1``, ``.2``...) and what a node printed on
stderr/stdout (tracebacks). Each file is read through :mod:`node.fsio`'s checked open (:func:`read_end`:
regular files only, ``O_NOFOLLOW|O_NONBLOCK``, only the end of a long file): a symlink, FIFO or device
there is one "skipped" line on stderr, never a hang. JSON lines are parsed leniently (Python's ``json``,
which takes the NaN a structlog value may hold): this is display, not the shared-dir exchange. Every value
is escaped (:func:`supervisor.terminal.escape_controls`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

from rich.console import Console

from node import fsio
from node.fsio import read_end, tail_text  # noqa: F401 (also imported from here by the status views)
from node.logs import rotated_files
from supervisor.launch import node_names
from supervisor.runfiles import RuntimePaths
from supervisor.terminal import Line, escape_controls, pad, plain, styled

LogFile = tuple[str, Path, bool]  # (label, path, skip JSON lines: they are in the structured log too)
LEVEL_STYLES = {"critical": "bold red", "error": "bold red", "warning": "yellow", "debug": "dim"}
LABEL_STYLES = ("cyan", "green", "magenta", "blue", "yellow", "bright_cyan", "bright_green", "bright_magenta")
_NOISE = ("logger", "pid", "node_id", "role")
FOLLOW_MAX_BYTES = 16 * 1024 * 1024  # read per file per poll at most; beyond it, the start of a burst is lost


class UnknownNode(LookupError):
    """``swarm logs --node`` named a node this swarm does not have (a user mistake)."""


# --------------------------------------------------------------------------- one line

def _json_object(text: str) -> dict | None:
    """A JSON object line as a dict (lenient: NaN is fine here); None for anything else."""
    if not text.startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested thousands of levels deep
        return None
    return obj if isinstance(obj, dict) else None


def _value(v: object) -> str:
    return escape_controls(repr(v) if isinstance(v, str) and " " in v else v)


def log_lines(line: str) -> list[Line]:
    """A JSON log line as ``HH:MM:SS level event k=v ...`` plus its exception's lines; anything else as
    itself. Every value escaped; styles for a terminal."""
    text = line.rstrip("\n")
    obj = _json_object(text)
    if obj is None or "event" not in obj:
        return [[(escape_controls(text), "")]]
    ts = str(obj.pop("timestamp", ""))
    clock = ts[11:19] if len(ts) >= 19 else ts
    level = str(obj.pop("level", "")).lower()
    event = obj.pop("event")
    for noise in _NOISE:
        obj.pop(noise, None)
    exc = obj.pop("exception", None)
    rest = " ".join(f"{escape_controls(k)}={_value(v)}" for k, v in obj.items())
    level_cell = pad(escape_controls(level), 7, LEVEL_STYLES.get(level, ""))
    head: Line = [(escape_controls(clock), "dim"), (" ", ""), level_cell, (" ", ""), (escape_controls(event), "bold")]
    if rest:
        head.append((" " + rest, ""))
    tail = [[(escape_controls(part), "red")] for part in str(exc).rstrip().splitlines()] if exc else []
    return [head, *tail]


def render_log_line(line: str) -> str:
    """:func:`log_lines` as plain text (several lines when it carries an exception)."""
    return "\n".join(plain(part) for part in log_lines(line))


def _line_time(line: str) -> float | None:
    obj = _json_object(line)
    try:
        return datetime.fromisoformat(str(obj["timestamp"]).replace("Z", "+00:00")).timestamp()
    except (ValueError, KeyError, TypeError, OverflowError, OSError):  # TypeError: not an object; the others:
        return None  # a date the platform's clock functions cannot convert (year 1, local time)
        return None


def _is_json_line(line: str) -> bool:
    return line.startswith("{") and line.rstrip().endswith("}")


# --------------------------------------------------------------------------- reading

def warn_skipped(path: Path, reason: str) -> None:
    """One line on stderr for a log file that is not read (escaped: the name may be hostile)."""
    print(escape_controls(f"swarm logs: skipped {path}: {reason}"), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the files

def log_files(paths: RuntimePaths, config, node: str | None) -> list[LogFile]:
    """(label, path, skip_json) of every log of the swarm, or of one node.

    A node's JSON log lines go both to its structured log and to its stderr: when the structured log
    exists, stderr/stdout contribute only their other lines (tracebacks, prints)."""
    names = [n for n, _ in node_names(config.supervisor.workers)]
    if node is not None:
        if node != "supervisor" and node not in names:
            known = sorted({*names, *(p.name.split(".")[0] for p in paths.logs_dir.glob("*.log"))})
            if node not in known:
                raise UnknownNode(f"no node {node!r}; known: {', '.join(['supervisor', *names])}")
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


def with_rotated(files: list[LogFile]) -> list[LogFile]:
    """The rotated files (``<name>.log.3`` ... ``.1``, oldest first) before the live ones."""
    old = [(label, f, skip) for label, path, skip in files for f in rotated_files(path) if f != path]
    return old + files


def merged_tail(files: list[LogFile], lines: int,
                skipped: Callable[[Path, str], None] = warn_skipped) -> list[tuple[str, str]]:
    """The last ``lines`` lines over all files, ordered by their timestamps where they have one; a file
    that cannot be read goes to ``skipped(path, reason)``."""
    entries = []
    for order, (label, path, skip_json) in enumerate(files):
        try:
            text = tail_text(path, max_bytes=max(65536, lines * 400), lines=lines)
        except fsio.BadFile as err:
            skipped(path, err.reason)
            continue
        except OSError as err:
            skipped(path, err.strerror or type(err).__name__)
            continue
        stamps = (t for t in map(_line_time, text.splitlines()) if t is not None)
        # Lines before the first timestamp: that timestamp, or the file's mtime when it has none.
        last = next(stamps, None) or _mtime(path)
        for i, line in enumerate(text.splitlines()):
            ts = _line_time(line)
            last = ts if ts is not None else last  # a traceback sorts with the JSON line before it
            if skip_json and _is_json_line(line):
                continue
            entries.append((last, order, i, label, line))
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    return [(e[3], e[4]) for e in entries[-lines:]] if lines > 0 else []


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def _read_new(path: Path, offset: int) -> tuple[bytes, int, int]:
    """(new bytes, where they begin, size) of a followed file; a file cut below ``offset`` (truncated, or
    replaced by a smaller one) is read from its start; a missing one is empty."""
    try:
        data, begin, size = read_end(path, max_bytes=FOLLOW_MAX_BYTES, start=offset)
        if size < offset:
            data, begin, size = read_end(path, max_bytes=FOLLOW_MAX_BYTES)
    except FileNotFoundError:
        return b"", 0, 0
    return data, begin, size


def follow(files: list[LogFile], emit: Callable[[str, str], None], *, poll_s: float = 0.25,
           should_stop: Callable[[], bool] = lambda: False, from_end: bool = True,
           skipped: Callable[[Path, str], None] = warn_skipped) -> None:
    """Emit new complete lines of every file as they arrive (a truncated file starts over); a file that
    cannot be read goes to ``skipped(path, reason)`` once per reason."""
    offsets = {path: (_regular_size(path) if from_end else 0) for _, path, _ in files}
    partial: dict[Path, bytes] = {path: b"" for _, path, _ in files}
    refused: dict[Path, str] = {}
    while not should_stop():
        for label, path, skip_json in files:
            try:
                data, begin, _ = _read_new(path, offsets[path])
            except (fsio.BadFile, OSError) as err:
                reason = err.reason if isinstance(err, fsio.BadFile) else (err.strerror or type(err).__name__)
                if refused.get(path) != reason:
                    refused[path] = reason
                    skipped(path, reason)
                continue
            refused.pop(path, None)
            if begin != offsets[path]:  # started over, or more than FOLLOW_MAX_BYTES arrived: no partial line
                partial[path] = b""
            offsets[path] = begin + len(data)
            if not data:
                continue
            *complete, partial[path] = (partial[path] + data).split(b"\n")
            for raw in complete:
                line = raw.decode("utf-8", errors="replace")
                if not (skip_json and _is_json_line(line)):
                    emit(label, line)
        time.sleep(poll_s)


def _regular_size(path: Path) -> int:
    """The size of ``path`` when it is a regular file now (following starts there), else 0; never opens it."""
    try:
        st = path.lstat()
    except OSError:
        return 0
    return st.st_size if fsio.entry_problem(st) is None else 0


# --------------------------------------------------------------------------- printing

def printer(files: list[LogFile], console: Console | None) -> Callable[[str, str], None]:
    """``emit(label, line)``: ``label | rendered line`` on stdout, one row per rendered line; labels
    padded to the widest, coloured per node on a terminal."""
    labels = list(dict.fromkeys(label for label, _, _ in files))
    width = max(map(len, labels))
    styles = {label: LABEL_STYLES[i % len(LABEL_STYLES)] for i, label in enumerate(labels)}

    def emit(label: str, line: str) -> None:
        for part in log_lines(line):
            row = [pad(escape_controls(label), width, styles.get(label, "")), (" | ", "dim"), *part]
            if console is None:
                print(plain(row), flush=True)
            else:
                console.print(styled(row), soft_wrap=True)

    return emit


def show_logs(paths: RuntimePaths, config, *, node: str | None, lines: int, keep_following: bool,
              console: Console | None) -> int:
    """The last ``lines`` lines of every log (rotated files too), then new ones until Ctrl-C when
    ``keep_following``."""
    files = log_files(paths, config, node)
    history = with_rotated(files)
    emit = printer(files, console)
    if not any(os.path.lexists(path) for _, path, _ in history):
        print(escape_controls(f"No logs yet in {paths.logs_dir}."), file=sys.stderr)
        if not keep_following:
            return 0
    for label, line in merged_tail(history, lines):
        emit(label, line)
    if keep_following:
        try:
            follow(files, emit)  # the live files; after a rotation the new, smaller file is read from its start
        except KeyboardInterrupt:
            return 0
    return 0

