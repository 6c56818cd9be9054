"""structlog, configured once per process (in ``main``): the one logging setup of nodes, supervisor and CLI.

Processor pipeline: merge context variables (node_id, role, round bound by the loops), add the level and
an ISO UTC timestamp, then render: JSON lines into the node's log file, and a readable console renderer
on stderr when it is a TTY (plain JSON otherwise, which the supervisor captures). Standard-library
logging (transformers, filelock) goes through the same pipeline via ProcessorFormatter.

Every log is bounded: at most :data:`LOG_BACKUPS` old files of about :data:`LOG_MAX_BYTES` beside the live
one (``<name>.1`` the newest; ``swarm logs`` reads them all, :func:`rotated_files`). All live in the local
runtime dir's ``logs/`` (``supervisor.runfiles.RuntimePaths``), never in the shared dir:

- ``<node>.log``, a node's structured log, and ``supervisor.log``, the supervisor's: written by their own
  process through a ``RotatingFileHandler`` (:func:`configure_logging`), so never above the limit;
- ``<node>.stdout.log`` / ``<node>.stderr.log``, what the supervisor captures from a node: the supervisor
  renames them before it (re)spawns the node (:func:`rotate_if_large`) and, while the node runs, copies
  and truncates them in place (:func:`truncate_if_large`, every ``supervisor.daemon.LOG_CHECK_S``);
- ``supervisor.out``, a ``--detach``-ed supervisor's own stdout/stderr, and ``on_event.log``, the output of
  ``on_event`` commands: renamed before a command starts (``supervisor.hooks``), and both copied and
  truncated by the supervisor's periodic check.

The live file of the last two kinds may pass the limit by what its writers append in one check interval.
Copy-and-truncate is safe only because every writer opens these files with ``O_APPEND`` (after the truncate
its next write lands at the new end, offset 0, not at its old offset past a hole); the few lines written
between the copy and the truncate are lost, the price of not restarting the writer (logrotate's
``copytruncate``).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from logging.handlers import RotatingFileHandler
from pathlib import Path

import structlog

SHARED_PROCESSORS = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
    structlog.processors.format_exc_info,
]


# Every log file the project writes rotates at this size, keeping this many old files (<name>.1 is the
# newest): a months-long run must not fill the runtime disk. `swarm logs` reads the rotated files too.
LOG_MAX_BYTES = 50 * 1024 * 1024
LOG_BACKUPS = 3


def _formatter(renderer) -> logging.Formatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=SHARED_PROCESSORS,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )


def json_formatter() -> logging.Formatter:
    """The JSON-lines formatter of log files (also for extra handlers that render later)."""
    return _formatter(structlog.processors.JSONRenderer())


def configure_logging(log_file: Path | None = None, *, console: str = "auto", level: str = "INFO",
                      handlers: tuple[logging.Handler, ...] = (), max_bytes: int = LOG_MAX_BYTES,
                      backups: int = LOG_BACKUPS) -> None:
    """The one logging setup of every process (nodes, supervisor, CLI): structlog through stdlib logging.

    JSON lines to ``log_file`` (rotated at ``max_bytes``, ``backups`` kept); the console on stderr as
    ``tty`` (readable, colours), ``plain`` (readable, no colours), ``json``, ``none``, or ``auto`` (tty on a
    terminal, json otherwise: what the supervisor captures from a node). ``handlers`` get JSON lines too.
    """
    structlog.configure(
        processors=[*SHARED_PROCESSORS, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,  # safe with multiprocessing and in tests
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = RotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        file_handler.setFormatter(json_formatter())
        root.addHandler(file_handler)
    if console == "auto":
        console = "tty" if sys.stderr.isatty() else "json"
    if console != "none":
        renderer = (structlog.processors.JSONRenderer() if console == "json"
                    else structlog.dev.ConsoleRenderer(colors=console == "tty"))
        console_handler = logging.StreamHandler(sys.stderr)
        console_handler.setFormatter(_formatter(renderer))
        root.addHandler(console_handler)
    for handler in handlers:
        handler.setFormatter(json_formatter())
        root.addHandler(handler)
    for noisy in ("filelock", "urllib3", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def rotate_if_large(path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> bool:
    """Rotate a file another process appends to (a node's captured stdout/stderr) before it is reopened:
    ``path`` -> ``path.1`` -> ... -> ``path.<backups>`` (dropped). True when it rotated."""
    if not _is_large(path, max_bytes):
        return False
    _shift(path, backups)
    path.replace(path.with_name(f"{path.name}.1"))
    return True


def truncate_if_large(path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> bool:
    """Rotate a file a running process holds open with ``O_APPEND``: copy it to ``path.1`` (older ones
    shifted as by :func:`rotate_if_large`), then truncate it in place, so the writer's next line starts
    the file again. True when it rotated. A failed copy (a full disk) leaves ``path`` as it was and raises
    the OSError; a partial copy is removed."""
    if not _is_large(path, max_bytes):
        return False
    _shift(path, backups)
    newest = path.with_name(f"{path.name}.1")
    try:
        shutil.copyfile(path, newest)
    except OSError:
        newest.unlink(missing_ok=True)
        raise
    os.truncate(path, 0)
    return True


def _is_large(path: Path, max_bytes: int) -> bool:
    try:
        return path.stat().st_size >= max_bytes
    except FileNotFoundError:
        return False


def _shift(path: Path, backups: int) -> None:
    """``path.<i>`` -> ``path.<i+1>`` for every old file (``path.<backups>`` dropped): ``path.1`` is free."""
    for i in range(backups, 1, -1):
        older, newer = path.with_name(f"{path.name}.{i}"), path.with_name(f"{path.name}.{i - 1}")
        if newer.exists():
            newer.replace(older)


def rotated_files(path: Path, backups: int = LOG_BACKUPS) -> list[Path]:
    """``path``'s rotated files that exist, oldest first, then ``path`` itself (if it exists)."""
    files = [path.with_name(f"{path.name}.{i}") for i in range(backups, 0, -1)] + [path]
    return [f for f in files if f.exists()]


def bind(**values) -> None:
    """Bind values (node_id, role, round) to every later log line of this process."""
    structlog.contextvars.bind_contextvars(**values)
