"""File locks for read-modify-write sequences on one host (DESIGN.md §3).

Locks live on local disk by default: a lock on a FUSE mount may be a no-op. Across hosts nothing locks;
the one-writer-per-file rule keeps the protocol correct there.
"""

from __future__ import annotations

import threading
from pathlib import Path

import filelock

from node.config import plain_name_problem


class LockBox:
    """Named locks ``<lock_dir>/<name>.lock``; the same object for the same name, so a lock is re-entrant
    in one thread while threads (and processes) exclude each other."""

    def __init__(self, lock_dir: Path | str):
        self.lock_dir = Path(lock_dir)
        self._locks: dict[str, filelock.FileLock] = {}
        self._mutex = threading.Lock()

    def get(self, name: str, *, timeout: float = -1) -> filelock.FileLock:
        """The lock called ``name`` (a plain name: ValueError otherwise), waiting at most ``timeout``
        seconds when acquired (-1: forever)."""
        problem = plain_name_problem(name)
        if problem:
            raise ValueError(f"lock name {name!r} {problem}")
        with self._mutex:
            lk = self._locks.get(name)
            if lk is None:
                self.lock_dir.mkdir(parents=True, exist_ok=True)
                lk = filelock.FileLock(str(self.lock_dir / f"{name}.lock"), timeout=timeout)
                self._locks[name] = lk
            else:
                lk.timeout = timeout
            return lk
