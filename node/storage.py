"""The shared experiment directory, as one object: every read and write of it goes through here (DESIGN.md §3).

In production the shared directory is a Google-Drive FUSE mount: slow, caching, eventually consistent,
and sometimes gone (``EIO``, ``ENOTCONN`` "Transport endpoint is not connected"). Everything read from it
is untrusted: other nodes' files may be truncated, huge, hostile, or from another version.

:class:`SharedStore` is a facade over one module per idea:

- :mod:`node.confine` — every path is checked to stay inside the experiment (or archive) dir;
- :mod:`node.fsio` — atomic writes, appends, checked and capped reads, listing, deletion;
- :mod:`node.retry` — transient errors retried with capped exponential backoff and full jitter;
- :mod:`node.spool` — publishes the mount refused wait on local disk and are flushed when it returns;
- :mod:`node.strict_json` — JSON with NaN/Infinity refused and the nesting depth capped;
- :mod:`node.warn_once` — a bad file gives ``None`` and one warning per file version, never an exception;
- :mod:`node.locks` — file locks on local disk (a lock on a FUSE mount may be a no-op);
- :mod:`node.signing` — every JSON file and JSONL line we write is signed (HMAC-SHA256, the experiment
  key), every one we read is verified before it is parsed; refusals are counted per reason
  (:attr:`SharedStore.rejected`).

All OS calls on the shared directory go through an injected ``fs`` object (:class:`RealFS` by default),
so tests can make the "mount" fail with ``EIO``/``ENOTCONN``/``ENOSPC`` at will.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, Union

import filelock
import structlog

from node import fsio
from node.bgsync import BackgroundSync
from node.config import plain_name_problem
from node.confine import Confinement
from node.fsio import BadFile, RealFS
from node.layout import ExperimentLayout
from node.locks import LockBox
from node.retry import TRANSIENT_ERRNOS, RetryPolicy, errno_name
from node.signing import SignatureError, Signer
from node.spool import Spool
from node.strict_json import MAX_JSON_DEPTH, encode_json, parse_json_bytes
from node.warn_once import WarnOnce

log = structlog.get_logger(__name__)

T = TypeVar("T")
LATER = "later"
Durability = Union[bool, Literal["later"]]

DEFAULT_MAX_FILE_BYTES = 16 * 1024 * 1024


class Unreachable(BadFile):
    """The shared dir did not answer (a transient error outlived the retries); ``error`` is the OSError."""

    def __init__(self, reason: str, signature: tuple, error: OSError):
        super().__init__(reason, signature)
        self.error = error


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sapo-swarm"


def _root_key(root: Path) -> str:
    return hashlib.sha256(os.fsencode(os.path.abspath(root))).hexdigest()[:16]


class SharedStore:
    """Reads and writes of one experiment directory (and its archive directory), safe on a flaky mount.

    ``root`` is the experiment dir or an :class:`ExperimentLayout` (then writes may also go to its
    ``archive_root``). ``lock_dir`` and ``spool_dir`` must be on local disk; they default to
    ``~/.cache/sapo-swarm/{locks,spool}/<hash of root>[/<node_id>]``.
    """

    def __init__(
        self,
        root: Path | str | ExperimentLayout,
        *,
        node_id: str | None = None,
        lock_dir: Path | str | None = None,
        spool_dir: Path | str | None = None,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        fs: Any = None,
        retry_attempts: int = 5,
        retry_base_delay: float = 0.05,
        retry_max_delay: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: Any = None,
        max_json_depth: int = MAX_JSON_DEPTH,
        signer: Signer | None = None,
    ):
        self.layout = root if isinstance(root, ExperimentLayout) else ExperimentLayout(Path(root))
        self.root = self.layout.root
        if node_id is not None and plain_name_problem(node_id):
            raise ValueError(f"node id {node_id!r} {plain_name_problem(node_id)}")
        self.node_id = node_id
        key = _root_key(self.root)
        cache = _default_cache_dir()
        self.lock_dir = Path(lock_dir) if lock_dir else cache / "locks" / key
        self.spool_dir = Path(spool_dir) if spool_dir else cache / "spool" / key / (node_id or "_shared")
        self.max_file_bytes = int(max_file_bytes)
        self.max_json_depth = max_json_depth
        self.signer = signer if signer is not None else Signer(None, required=False)
        self.rejected: Counter[str] = Counter()  # files (and lines) refused on read, per reason
        # Something planted at one of our own paths (a FIFO, a directory, a hard link) is moved here.
        self.quarantine_dir = self.layout.quarantine_dir()
        self.fs = fs if fs is not None else RealFS()
        self._bg = BackgroundSync(self.fs)  # fsyncs durable="later" writes off the critical path
        self._retry = RetryPolicy(attempts=retry_attempts, base_delay=retry_base_delay, max_delay=retry_max_delay,
                                  sleep=sleep, rng=rng if rng is not None else random.Random())
        self._warn = WarnOnce()
        self._locks = LockBox(self.lock_dir)
        bases = [self.root] + ([self.layout.archive_root] if self.layout.archive_root else [])
        self._confine = Confinement(bases, self.fs)
        self._context_bases = [os.path.normpath(os.path.abspath(b)).rstrip(os.sep) + os.sep for b in bases]
        spool_lock = "spool-" + (node_id or "_shared")
        self._spool = Spool(self.spool_dir, self.root, lambda: self.lock(spool_lock), self._warn)

    @classmethod
    def from_config(cls, config, node_id: str | None = None, **kwargs) -> "SharedStore":
        """The store of a :class:`node.config.ExperimentConfig`: its experiment dir and archive dir, its
        ``exchange.max_file_bytes``, and ``exchange.lock_dir``/``spool_dir`` when set (a configured dir gets
        ``<hash of root>/`` resp. ``<hash of root>/<node_id>/`` appended, so experiments and nodes sharing
        it never mix). ``kwargs`` go to the constructor (fs, retry settings, ...)."""
        ex = config.exchange
        layout = ExperimentLayout.from_config(config)
        key = _root_key(layout.root)
        kwargs.setdefault("lock_dir", Path(ex.lock_dir).expanduser() / key if ex.lock_dir else None)
        kwargs.setdefault("spool_dir", Path(ex.spool_dir).expanduser() / key / (node_id or "_shared")
                          if ex.spool_dir else None)
        kwargs.setdefault("max_file_bytes", ex.max_file_bytes)
        return cls(layout, node_id=node_id, **kwargs)

    # -- paths and directories ------------------------------------------------------------------------
    def check_inside(self, path: Path | str) -> Path:
        """``path`` (as a Path) when it is inside the experiment or archive dir, lexically and once its
        parent's symlinks are resolved; ValueError otherwise. The file itself is never followed."""
        return self._confine.check_inside(path)

    def makedirs(self, path: Path | str, exist_ok: bool = True) -> None:
        """``makedirs`` inside the experiment (or archive) dir, with retries."""
        p = self._confine.check_writable(path)
        self._retry(lambda: self.fs.makedirs(p, exist_ok=exist_ok), "makedirs")

    def ensure_layout(self) -> None:
        """Create the experiment's fixed directories (state/, peers/, rollouts/, ...)."""
        self.layout.ensure_dirs(self.makedirs)

    # -- writes ---------------------------------------------------------------------------------------
    def write_json_atomic(self, path: Path | str, obj: Any, *, retries: bool = False,
                          durable: Durability = True) -> None:
        """Write ``obj`` (a JSON object) as strict, signed JSON, atomically (no spool: see :meth:`publish`)."""
        self.write_bytes_atomic(path, self.encode_signed(path, obj), retries=retries, durable=durable)

    def write_bytes_atomic(self, path: Path | str, data: bytes, *, retries: bool = False,
                           durable: Durability = True) -> None:
        """:func:`node.fsio.write_atomic` inside the experiment (anything but a regular file at ``path`` is
        moved to the quarantine dir first, with one warning): on any failure the old content (if any) is
        intact. With ``retries`` transient errors are retried (the whole sequence, with backoff); else they
        propagate. ``durable``: True = fsynced before returning; ``"later"`` = visible now, fsynced by
        the background syncer moments later (:meth:`sync` waits for it); False = never explicitly."""
        if retries:
            self._retry(lambda: self.write_bytes_atomic(path, data, durable=durable), "write")
            return
        p = self._confine.check_writable(path)
        fsio.write_atomic(p, data, fs=self.fs, quarantine_dir=self.quarantine_dir, durable=durable is True)
        if durable == LATER:
            self._bg.add(p)

    def sync(self, timeout: float | None = None) -> bool:
        """Wait until every ``durable="later"`` write so far is fsynced (before a checkpoint, at a stop)."""
        return self._bg.wait(timeout)

    def publish(self, path: Path | str, obj: Any, *, durable: Durability = True) -> bool:
        """Write ``obj`` to ``path`` atomically, with retries. True when it is in the shared dir; False
        when the mount refused it (transient error or full) and it went to the local spool, to be written
        by a later :meth:`flush_spool` (every publish flushes first). Other errors propagate. ``durable`` as
        in :meth:`write_bytes_atomic`."""
        p = self._confine.check_writable(path)
        data = self.encode_signed(p, obj)
        self.flush_spool(attempts=1)
        return self._spool.send(p, data, lambda: self._retry(
            lambda: self.write_bytes_atomic(p, data, durable=durable), "publish"))

    def append_jsonl(self, path: Path | str, obj: Any, *, durable: Durability = True) -> bool:
        """Append ``obj`` as one JSON line (O_APPEND, write, fsync) under this file's lock. True when it is
        in the shared dir; False when spooled locally (kept in order, flushed later). ``durable`` as in
        :meth:`write_bytes_atomic`."""
        p = self._confine.check_writable(path)
        line = self.encode_signed(p, obj) + b"\n"
        self.flush_spool(attempts=1)

        def append() -> None:
            self._retry(lambda: fsio.append_bytes(p, line, fs=self.fs, quarantine_dir=self.quarantine_dir,
                                                  durable=durable is True), "append")
            if durable == LATER:
                self._bg.add(p)
        return self._spool.send_line(p, line, append, self.lock(self._append_lock_name(p)))

    def encode_signed(self, path: Path | str, obj: Any) -> bytes:
        """The bytes we write for ``obj`` at ``path``: compact strict JSON, signed for that path."""
        return self.signer.sign(encode_json(obj), self.context(path))

    def context(self, path: Path | str) -> str:
        """What a signature binds a file to: its path relative to the experiment (or archive) dir, so a
        signed file copied to another round or node no longer verifies; an archived copy still does."""
        lexical = os.path.normpath(os.path.abspath(path))
        for base in self._context_bases:
            if lexical.startswith(base):
                return lexical[len(base):].replace(os.sep, "/")
        return os.path.basename(lexical)

    def verified(self, path: Path | str, data: bytes, sig: tuple = ()) -> bytes:
        """The canonical bytes of signed ``data`` read at ``path``; BadFile (``unsigned``/``bad signature``)
        when the signature is missing (and required) or wrong. Checked before any parsing."""
        try:
            return self.signer.verify(data, self.context(path))
        except SignatureError as err:
            raise BadFile(err.reason, sig) from None

    def spooled(self) -> list[Path]:
        """Shared-dir paths waiting in the spool, oldest first."""
        return self._spool.targets()

    def flush_spool(self, *, attempts: int | None = None) -> int:
        """Write spooled files to the shared dir, oldest first, removing each from the spool once written.
        Stops at the first transient error (the mount is still away). Returns how many were written."""
        return self._spool.flush(lambda target, data, append: self._write_spooled(target, data, append, attempts))

    def _write_spooled(self, target: Path, data: bytes, append: bool, attempts: int | None) -> None:
        if append:
            with self.lock(self._append_lock_name(target)):
                p = self.check_inside(target)
                self._retry(lambda: fsio.append_bytes(p, data, fs=self.fs, quarantine_dir=self.quarantine_dir), "flush_append", attempts)
        else:
            self._retry(lambda: self.write_bytes_atomic(target, data), "flush_spool", attempts)

    def _append_lock_name(self, p: Path) -> str:
        return "append-" + hashlib.sha256(os.fsencode(os.path.abspath(p))).hexdigest()[:16]

    # -- reads ----------------------------------------------------------------------------------------
    def read_bytes(self, path: Path | str, *, max_bytes: int | None = None) -> bytes | None:
        """The bytes of a regular file in the shared dir, or None (missing, refused, or unreachable; one
        warning per bad file version)."""
        return self._tolerant(path, lambda: self._read_checked(path, max_bytes)[0], None)  # raw: not verified

    def read_json(self, path: Path | str, *, max_bytes: int | None = None,
                  raise_unreachable: bool = False) -> Any | None:
        """The parsed JSON of a file in the shared dir, or None: missing (silently), or refused with one
        warning per file version: symlink, not a regular file, over the size cap (not read), resolving
        outside the experiment, invalid UTF-8/JSON, NaN/Infinity, nesting deeper than the cap, or a
        transient error that outlived the retries. With ``raise_unreachable`` that last case raises the
        OSError instead, for callers to whom "missing" and "cannot tell" differ (a coordinator resuming
        from the state file must not restart at round 0 because the mount was away)."""
        return self.read_as(path, lambda obj: obj, max_bytes=max_bytes, raise_unreachable=raise_unreachable)

    def read_as(self, path: Path | str, parse: Callable[..., T], *, max_bytes: int | None = None,
                raise_unreachable: bool = False, **expect) -> T | None:
        """``parse(read_json(path), **expect)`` — e.g. ``read_as(p, RolloutFile.from_json, expect_round=5)``
        — or None with one warning per bad file version, whether the bytes, the JSON or the schema is bad.
        ``raise_unreachable`` as in :meth:`read_json`."""
        return self._tolerant(path, lambda: self._parse_file(path, parse, max_bytes, expect), None, raise_unreachable)

    def read_as_or_reason(self, path: Path | str, parse: Callable[..., T], *, max_bytes: int | None = None,
                          **expect) -> tuple[T | None, str | None]:
        """(value, None), or (None, why): ``"missing"``, or the reason the file was refused (``unsigned``,
        ``bad signature``, ``schema: ... newer than supported``...). For callers to whom a refused file and
        no file differ (a coordinator must never take a forged state for a fresh experiment). Transient
        errors that outlive the retries raise their OSError; a refusal is counted and warned about as in
        :meth:`read_as`."""
        try:
            return self._tolerant(path, lambda: self._parse_file(path, parse, max_bytes, expect), None,
                                  raise_unreachable=True, reraise_bad=True), None
        except FileNotFoundError:
            return None, "missing"
        except BadFile as bad:
            return None, bad.reason

    def _parse_file(self, path: Path | str, parse: Callable[..., T], max_bytes: int | None, expect: dict) -> T:
        data, sig = self._read_checked(path, max_bytes)
        data = self.verified(path, data, sig)
        try:
            obj = parse_json_bytes(data, max_depth=self.max_json_depth)
        except ValueError as err:
            raise BadFile(str(err), sig) from None
        try:
            return parse(obj, **expect)
        except ValueError as err:  # SchemaError is a ValueError
            raise BadFile(f"schema: {err}", sig) from None

    def read_jsonl(self, path: Path | str, *, max_bytes: int = fsio.DEFAULT_MAX_JSONL_BYTES) -> tuple[list[dict], int]:
        """:func:`node.fsio.read_jsonl` of a file in the shared dir: its JSON-object lines among the first
        ``max_bytes`` and how many lines were skipped; ``([], 0)`` when it is missing, refused or
        unreachable (one warning per bad file version)."""
        def read():
            p = self._inside_or_bad(path)
            return self._reading(p, lambda: fsio.read_jsonl(p, max_bytes=max_bytes, fs=self.fs,
                                                            verify=lambda line: self._verified_line(p, line)))
        return self._tolerant(path, read, ([], 0))

    def _verified_line(self, p: Path, line: bytes) -> bytes:
        try:
            return self.signer.verify(line, self.context(p))
        except SignatureError as err:
            self.rejected[err.reason] += 1
            raise

    def read_bytes_strict(self, path: Path | str, *, max_bytes: int | None = None) -> bytes:
        """Like :meth:`read_bytes` but raising: :class:`BadFile` (refused: symlink, not regular, over the
        cap), ValueError (outside), FileNotFoundError, or the OSError that outlived the retries. For
        callers that must tell "bad" from "unreachable", such as retention (never delete what could not
        be archived)."""
        p = self.check_inside(path)
        return self._retry(lambda: fsio.read_capped(p, self._cap(max_bytes), fs=self.fs), "read")[0]

    def _tolerant(self, path: Path | str, read: Callable[[], T], default: T, raise_unreachable: bool = False,
                  reraise_bad: bool = False) -> T:
        """``read()``, or ``default`` when the file is missing or refused (one warning per file version);
        ``reraise_bad`` raises FileNotFoundError / the BadFile after counting and warning instead."""
        try:
            value = read()
        except FileNotFoundError:
            if reraise_bad:
                raise
            return default
        except BadFile as bad:
            if raise_unreachable and isinstance(bad, Unreachable):
                raise bad.error from None
            self.rejected[rejection_kind(bad.reason)] += 1
            self._warn(path, bad.signature, "peer_file_rejected", reason=bad.reason)
            if reraise_bad:
                raise
            return default
        self._warn.clear(path)
        return value

    def _read_checked(self, path: Path | str, max_bytes: int | None) -> tuple[bytes, tuple]:
        p = self._inside_or_bad(path)
        cap = self._cap(max_bytes)
        return self._reading(p, lambda: fsio.read_capped(p, cap, fs=self.fs))

    def _cap(self, max_bytes: int | None) -> int:
        return self.max_file_bytes if max_bytes is None else int(max_bytes)

    def _inside_or_bad(self, path: Path | str) -> Path:
        try:
            return self.check_inside(path)
        except ValueError as err:
            raise BadFile(str(err), ("outside",)) from None

    def _reading(self, p: Path, read: Callable[[], T]) -> T:
        """``read()`` with retries; an OSError other than "missing" becomes :class:`BadFile`
        (:class:`Unreachable` when transient)."""
        try:
            return self._retry(read, "read")
        except (FileNotFoundError, BadFile):
            raise
        except OSError as err:
            name = errno_name(err)
            if err.errno in TRANSIENT_ERRNOS:
                raise Unreachable(f"unreachable after retries: {name}", ("transient", err.errno), err) from None
            raise BadFile(f"cannot read: {name} {err.strerror or ''}".strip(), ("error", err.errno)) from None

    # -- listing --------------------------------------------------------------------------------------
    def listdir(self, directory: Path | str, *, raise_unreachable: bool = False) -> list[str]:
        """Names in a shared-dir directory, sorted; [] when it is missing or (after retries, with a
        warning) unreachable — or, with ``raise_unreachable``, that OSError is raised."""
        try:
            d = self.check_inside(directory)
        except ValueError as err:
            log.warning("listdir_refused", path=str(directory), reason=str(err))
            return []
        try:
            names = self._retry(lambda: self.fs.listdir(d), "listdir")
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as err:
            if raise_unreachable:
                raise
            self._warn(d, ("listdir", err.errno), "shared_dir_unreachable", error=errno_name(err))
            return []
        self._warn.clear(d)
        return sorted(names)

    def list_json(self, directory: Path | str) -> list[Path]:
        """``*.json`` regular files in a shared-dir directory (no temp or hidden files, no symlinks),
        sorted; tolerant of a missing directory and of transient errors. Symlinks, non-regular files and
        other names (a ``.pt`` among rollouts) are skipped with one ``peer_file_rejected`` warning each."""
        d = Path(directory)
        files, refused = fsio.sort_entries(d, self.listdir(d), suffix=".json",
                                           lstat=lambda p: self._retry(lambda: self.fs.lstat(p), "lstat"))
        for p, reason, signature in refused:
            self._warn(p, signature, "peer_file_rejected", reason=reason)
        return files

    def lstat(self, path: Path | str, *, raise_unreachable: bool = False) -> os.stat_result | None:
        """``lstat`` with retries; None when missing or unreachable (with ``raise_unreachable``, errors
        other than "missing" are raised)."""
        p = self.check_inside(path)
        try:
            return self._retry(lambda: self.fs.lstat(p), "lstat")
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError:
            if raise_unreachable:
                raise
            return None

    # -- deletion (retention) and locks ---------------------------------------------------------------
    def lock(self, name: str, *, timeout: float = -1) -> filelock.FileLock:
        """A file lock ``<lock_dir>/<name>.lock`` for read-modify-write sequences on this host. The same
        object is returned for the same name (re-entrant in one thread; threads exclude each other)."""
        return self._locks.get(name, timeout=timeout)


def rejection_kind(reason: str) -> str:
    """A short, bounded category for a refusal reason (for counters): ``unsigned``, ``bad signature``,
    ``schema``, ``json``, ``too large``, ``not a regular file``... (free text is cut at its first colon)."""
    if reason.startswith("schema:"):
        return "schema"
    if "exceeds the cap" in reason or "beyond the cap" in reason:
        return "too large"
    if reason.startswith(("invalid JSON", "not UTF-8", "nested deeper", "numbers must be finite")):
        return "json"
    return reason.split(":")[0][:40]
