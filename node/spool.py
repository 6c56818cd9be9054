"""The local spool: publishes the shared directory refused, kept on local disk until it comes back.

When the mount stays away (or is full) a worker keeps training; what it must publish waits here, one
file per shared-dir path (``<quoted relative path>.spool``, or ``….spool.append`` for JSONL lines), and is
written back oldest first by :meth:`Spool.flush`. Nothing is lost, also across restarts. A newer publish
of a path that is still spooled replaces the spooled version, so the spool never later overwrites newer
content with older; appends to a spooled JSONL file join its spool entry, so lines keep their order.

The spool only stands in for the mount: it always uses the local disk directly (never the injected
``fs``), and its writes are the same atomic writes and appends as everywhere (:mod:`node.fsio`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, ContextManager
from urllib.parse import quote, unquote

import structlog

from node import fsio
from node.retry import SPOOLABLE_ERRNOS, errno_name
from node.warn_once import WarnOnce

log = structlog.get_logger(__name__)

_SUFFIX = ".spool"
_APPEND_SUFFIX = ".append"


class Spool:
    """The spool of one node for one experiment ``root``, in ``directory`` (local disk). ``lock()`` gives
    the lock that orders every spool change; lock order everywhere: that lock, then a file's append lock."""

    def __init__(self, directory: Path, root: Path, lock: Callable[[], ContextManager], warn: WarnOnce):
        self.directory = Path(directory)
        self.root = Path(root)
        self.lock = lock
        self._warn = warn

    # -- sending: write to the mount, or spool ----------------------------------------------------------
    def send(self, target: Path, data: bytes, write: Callable[[], None]) -> bool:
        """``write()`` (which writes ``data`` to ``target``); True when it did. False when ``data`` went to
        the spool instead: an older version of ``target`` is still spooled (this one replaces it there),
        or ``write()`` failed with one of :data:`SPOOLABLE_ERRNOS`. Other errors propagate."""
        key = self._key(target, append=False)
        if self._holds(key):
            with self.lock():
                if self._holds(key):
                    fsio.write_atomic(self.directory / key, data)
                    log.info("publish_spooled", path=str(target), reason="older version still spooled")
                    return False
        try:
            write()
            return True
        except OSError as err:
            if err.errno not in SPOOLABLE_ERRNOS:
                raise
            with self.lock():
                fsio.write_atomic(self.directory / key, data)
            log.warning("publish_spooled", path=str(target), error=errno_name(err), spool=str(self.directory))
            return False

    def send_line(self, target: Path, line: bytes, append: Callable[[], None], file_lock: ContextManager) -> bool:
        """``append()`` (which appends ``line`` to ``target``) under ``file_lock``; True when it did. False
        when ``line`` joined the spool: earlier lines of ``target`` are still spooled, or ``append()`` failed
        with one of :data:`SPOOLABLE_ERRNOS`. Other errors propagate."""
        key = self._key(target, append=True)
        with self.lock(), file_lock:
            if not self._holds(key):
                try:
                    append()
                    return True
                except OSError as err:
                    if err.errno not in SPOOLABLE_ERRNOS:
                        raise
                    log.warning("append_spooled", path=str(target), error=errno_name(err))
            fsio.append_bytes(self.directory / key, line)
            fsio.fsync_dir(self.directory)
            return False

    # -- what is waiting --------------------------------------------------------------------------------
    def targets(self) -> list[Path]:
        """Shared-dir paths waiting in the spool, oldest first."""
        return [target for _, target, _ in self._entries()]

    def _entries(self) -> list[tuple[Path, Path, bool]]:
        """(spool file, shared-dir path, is an append) of every entry, oldest first."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        entries = []
        for name in names:
            parsed = self._target(name)
            if parsed is None:
                continue
            local = self.directory / name
            try:
                mtime = os.lstat(local).st_mtime_ns
            except FileNotFoundError:
                continue
            entries.append((mtime, name, local, parsed[0], parsed[1]))
        entries.sort(key=lambda e: (e[0], e[1]))
        return [(local, target, append) for _, _, local, target, append in entries]

    def _key(self, target: Path, *, append: bool) -> str:
        rel = os.path.relpath(os.path.normpath(os.path.abspath(target)), os.path.normpath(os.path.abspath(self.root)))
        return quote(Path(rel).as_posix(), safe="") + _SUFFIX + (_APPEND_SUFFIX if append else "")

    def _target(self, name: str) -> tuple[Path, bool] | None:
        """Spool file name -> (shared path, is_append); None for names that are not spool entries."""
        append = name.endswith(_APPEND_SUFFIX)
        base = name[: -len(_APPEND_SUFFIX)] if append else name
        if not base.endswith(_SUFFIX) or name.startswith("."):
            return None
        rel = unquote(base[: -len(_SUFFIX)])
        if not rel or os.path.isabs(rel):
            return None
        return self.root / rel, append

    def _holds(self, key: str) -> bool:
        return os.path.lexists(self.directory / key)

    # -- flushing ---------------------------------------------------------------------------------------
    def flush(self, write: Callable[[Path, bytes, bool], None]) -> int:
        """``write(target, data, is_append)`` for each entry, oldest first, removing each from the spool once
        written. Stops at the first spoolable error (the mount is still away); an entry refused otherwise
        (another OSError, or ValueError: a path outside the experiment) stays for a human, with one warning.
        Returns how many were written."""
        try:
            if not os.listdir(self.directory):
                return 0
        except FileNotFoundError:
            return 0
        written = 0
        with self.lock():
            for local, target, append in self._entries():
                try:
                    written += self._flush_entry(local, target, append, write)
                except OSError as err:  # spoolable: the mount is still away
                    log.info("spool_flush_paused", pending=str(target), error=errno_name(err), written=written)
                    break
            if written:
                with contextlib.suppress(OSError):
                    fsio.fsync_dir(self.directory)
        if written:
            log.info("spool_flushed", written=written)
        return written

    def _flush_entry(self, local: Path, target: Path, append: bool, write: Callable[[Path, bytes, bool], None]) -> int:
        """1 when the entry was written and removed; 0 when it is gone meanwhile or refused (one warning).
        A spoolable OSError propagates: the mount is still away."""
        try:
            data = local.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as err:
            self._warn(local, ("local", err.errno), "spool_entry_unreadable", error=str(err))
            return 0
        try:
            write(target, data, append)
        except OSError as err:
            if err.errno in SPOOLABLE_ERRNOS:
                raise
            self._warn(local, ("flush", err.errno), "spool_flush_failed", target=str(target), error=str(err))
            return 0
        except ValueError as err:  # path outside the experiment: never written, kept for a human
            self._warn(local, ("outside",), "spool_entry_refused", target=str(target), reason=str(err))
            return 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(local)
        return 1
