"""structlog, configured once per process (in ``main``).

Processor pipeline: merge context variables (node_id, role, round bound by the loops), add the level and
an ISO UTC timestamp, then render: JSON lines into the node's log file, and a readable console renderer
on stderr when it is a TTY (plain JSON otherwise, which the supervisor captures). Standard-library
logging (transformers, filelock) goes through the same pipeline via ProcessorFormatter.
"""

from __future__ import annotations

import logging
import sys
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


def configure_logging(log_file: Path | None = None, *, level: str = "INFO", console: bool = True) -> None:
    """Route structlog and stdlib logging to a JSON-lines file and (optionally) the console."""
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
    json_formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=SHARED_PROCESSORS,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.JSONRenderer()],
    )
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(json_formatter)
        root.addHandler(file_handler)
    if console:
        renderer = structlog.dev.ConsoleRenderer(colors=True) if sys.stderr.isatty() else structlog.processors.JSONRenderer()
        console_handler = logging.StreamHandler(sys.stderr)
        console_handler.setFormatter(structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=SHARED_PROCESSORS,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        ))
        root.addHandler(console_handler)
    for noisy in ("filelock", "urllib3", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def bind(**values) -> None:
    """Bind values (node_id, role, round) to every later log line of this process."""
    structlog.contextvars.bind_contextvars(**values)
