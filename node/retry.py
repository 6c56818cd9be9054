"""Transient I/O errors, and retrying them with capped exponential backoff and full jitter (DESIGN.md §3).

A Google-Drive FUSE mount fails now and then with ``EIO``, ``ENOTCONN`` ("Transport endpoint is not
connected"), ``ESTALE`` or ``EAGAIN`` and works again a moment later: those errors say "try again later",
not "the request is wrong". :data:`SPOOLABLE_ERRNOS` adds "the mount is full": a publish that meets one of
those goes to the local spool (:mod:`node.spool`) instead of failing.
"""

from __future__ import annotations

import errno
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")

TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ENOTCONN, errno.ESTALE, errno.EAGAIN, errno.ETIMEDOUT, errno.EBUSY})
# Errors after which a publish goes to the spool instead of failing.
SPOOLABLE_ERRNOS = TRANSIENT_ERRNOS | {errno.ENOSPC, errno.EDQUOT}


def is_transient(err: BaseException) -> bool:
    """True for an OSError whose errno says "try again later" (the mount is flaky, not the request)."""
    return isinstance(err, OSError) and err.errno in TRANSIENT_ERRNOS


def errno_name(err: OSError) -> str:
    """``"EIO"`` for an OSError with errno EIO; the number (or "None") when it has no symbolic name."""
    return errno.errorcode.get(err.errno or 0, str(err.errno))


def retry(
    fn: Callable[[], T],
    *,
    attempts: int = 5,
    base_delay: float = 0.05,
    max_delay: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
    rng: Any = random,
    what: str = "",
) -> T:
    """``fn()``, retried on transient OSErrors up to ``attempts`` calls in all, sleeping a uniformly random
    time in ``[0, min(max_delay, base_delay * 2**k)]`` before retry k+1 (exponential backoff, full jitter).
    Other exceptions, and the last transient one, propagate unchanged."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for k in range(attempts):
        try:
            return fn()
        except OSError as err:
            if err.errno not in TRANSIENT_ERRNOS or k == attempts - 1:
                raise
            delay = rng.uniform(0.0, min(max_delay, base_delay * (2 ** k)))
            log.debug("transient_io_retry", what=what, attempt=k + 1, errno=errno_name(err), delay_s=round(delay, 4))
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class RetryPolicy:
    """:func:`retry` with its settings bound, so a caller passes one object instead of five numbers."""

    attempts: int = field(default=5, metadata={"help": "calls in all, the first included"})
    base_delay: float = field(default=0.05, metadata={"help": "seconds; the cap of the first backoff"})
    max_delay: float = field(default=2.0, metadata={"help": "seconds; no backoff is longer"})
    sleep: Callable[[float], None] = field(default=time.sleep, metadata={"help": "injected in tests"})
    rng: Any = field(default_factory=random.Random, metadata={"help": "anything with uniform(a, b)"})

    def __call__(self, fn: Callable[[], T], what: str = "", attempts: int | None = None) -> T:
        """``retry(fn)`` under this policy; ``attempts`` overrides the policy's count for this call."""
        return retry(fn, attempts=attempts or self.attempts, base_delay=self.base_delay, max_delay=self.max_delay,
                     sleep=self.sleep, rng=self.rng, what=what)
