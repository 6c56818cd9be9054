"""Durability off the critical path: files made visible now, fsynced by a background thread moments later.

A round switch waits for two writes: the last worker's round result and the coordinator's next state.
Another process sees a renamed file at once; only a power cut needs the fsync, and an fsync of a file and
its directory costs 1-15 ms on a busy disk, twice per switch. So those writes are made visible without
fsync, and this thread fsyncs them (the file, then its directory) right after. The guarantee becomes
"durable within moments" instead of "durable before anyone could read it"; :meth:`BackgroundSync.wait`
restores the strict one where it matters (before a checkpoint, at a stop).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import structlog

from node import fsio

log = structlog.get_logger(__name__)


class BackgroundSync:
    """fsyncs the files handed to :meth:`add` (and their directories) in one daemon thread."""

    def __init__(self, fs: Any = fsio.REAL_FS):
        self.fs = fs
        self._pending: list[Path] = []
        self._cond = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None
        self._warned = False

    def add(self, path: Path) -> None:
        """fsync ``path`` and its directory soon."""
        with self._cond:
            self._pending.append(Path(path))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="bgsync", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until everything added so far is fsynced; False when ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending)
                batch, self._pending = self._pending, []
                self._busy = True
            try:
                for directory in self._sync_files(batch):
                    try:
                        fsio.fsync_dir(directory, fs=self.fs)
                    except OSError as err:
                        self._warn(directory, err)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _sync_files(self, batch: list[Path]) -> list[Path]:
        directories: dict[Path, None] = {}
        for path in dict.fromkeys(batch):
            try:
                fd = self.fs.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue  # replaced or removed meanwhile: its successor is synced on its own
            try:
                self.fs.fsync(fd)
            except OSError as err:
                self._warn(path, err)
            finally:
                self.fs.close(fd)
            directories[path.parent] = None
        return list(directories)

    def _warn(self, path: Path, err: OSError) -> None:
        if not self._warned:  # the mount is away: the retrying writers already report that
            self._warned = True
            log.warning("background_fsync_failed", path=str(path), error=str(err))
