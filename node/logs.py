"""structlog, configured once per process (in ``main``): the one logging setup of nodes, supervisor and CLI.

Processor pipeline: merge context variables (node_id, role, round bound by the loops), add the level and
an ISO UTC timestamp, then render: JSON lines into the node's log file, and a readable console renderer
on stderr when it is a TTY (plain JSON otherwise, which the supervisor captures). Standard-library
logging (transformers, filelock) goes through the same pipeline via ProcessorFormatter.
"""

from __future__ import annotations

import logging
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
    try:
        if path.stat().st_size < max_bytes:
            return False
    except FileNotFoundError:
        return False
    for i in range(backups, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        newer = path if i == 1 else path.with_name(f"{path.name}.{i - 1}")
        if newer.exists():
            newer.replace(older)
    return True


def rotated_files(path: Path, backups: int = LOG_BACKUPS) -> list[Path]:
    """``path``'s rotated files that exist, oldest first, then ``path`` itself (if it exists)."""
    files = [path.with_name(f"{path.name}.{i}") for i in range(backups, 0, -1)] + [path]
    return [f for f in files if f.exists()]


def bind(**values) -> None:
    """Bind values (node_id, role, round) to every later log line of this process."""
    structlog.contextvars.bind_contextvars(**values)
