"""The only module that touches the bytes of the shared experiment directory (DESIGN.md §3).

In production the shared directory is a Google-Drive FUSE mount: slow, caching, eventually consistent,
and sometimes gone (``EIO``, ``ENOTCONN`` "Transport endpoint is not connected"). Everything read from it
is untrusted: other nodes' files may be truncated, huge, hostile, or from another version.

- Writes are atomic: a temp file in the same directory, write, fsync, ``os.replace``, fsync the directory.
  A reader never sees half a file of ours; the temp file is removed when anything fails.
- Transient errors (:data:`TRANSIENT_ERRNOS`) are retried with capped exponential backoff and full jitter.
- :meth:`SharedStore.publish` / :meth:`SharedStore.append_jsonl` fall back to a local on-disk spool when the
  mount stays away (or is full), and the spool is flushed, oldest first, when it comes back — nothing is
  lost, also across restarts (the spool is a directory on local disk).
- Reads check before they read: ``lstat`` (no symlinks, regular files only, size cap), a parent that
  resolves inside the experiment, ``O_NOFOLLOW``; then JSON is parsed with NaN/Infinity refused and the
  nesting depth capped. A bad file gives ``None`` and one warning (per file version), never an exception.
- Locks (filelock) live on local disk by default: a lock on a FUSE mount may be a no-op.

All OS calls go through an injected ``fs`` object (:class:`RealFS` by default), so tests can make the
"mount" fail with ``EIO``/``ENOTCONN``/``ENOSPC`` at will. Spool and locks always use the local disk
directly: they stand in for the mount while it is away.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import stat
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import quote, unquote

import filelock
import structlog

from node.config import plain_name_problem
from node.layout import ExperimentLayout, parse_round_dir, parse_stage_dir

log = structlog.get_logger(__name__)

T = TypeVar("T")

TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ENOTCONN, errno.ESTALE, errno.EAGAIN, errno.ETIMEDOUT, errno.EBUSY})
# Errors after which a publish goes to the spool instead of failing.
SPOOLABLE_ERRNOS = TRANSIENT_ERRNOS | {errno.ENOSPC, errno.EDQUOT}
# Errors from fsync on a directory that only mean "not supported here" (FUSE, some network filesystems).
_DIR_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.ENOSYS, errno.EBADF, errno.EACCES, errno.EPERM})

DEFAULT_MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 64
TEMP_SUFFIX = ".tmp"
_APPEND_SUFFIX = ".append"
_WARNED_CAP = 4096
_READ_CHUNK = 1 << 20


def is_transient(err: BaseException) -> bool:
    """True for an OSError whose errno says "try again later" (the mount is flaky, not the request)."""
    return isinstance(err, OSError) and err.errno in TRANSIENT_ERRNOS


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
            log.debug("transient_io_retry", what=what, attempt=k + 1, errno=errno.errorcode.get(err.errno, err.errno),
                      delay_s=round(delay, 4))
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


class RealFS:
    """The OS calls :class:`SharedStore` makes on the shared directory; tests substitute a faulty one."""

    def open(self, path, flags: int, mode: int = 0o666) -> int:
        return os.open(path, flags, mode)

    def read(self, fd: int, n: int) -> bytes:
        return os.read(fd, n)

    def write(self, fd: int, data) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def lstat(self, path) -> os.stat_result:
        return os.lstat(path)

    def stat(self, path) -> os.stat_result:
        return os.stat(path)

    def replace(self, src, dst) -> None:
        os.replace(src, dst)

    def listdir(self, path) -> list[str]:
        return os.listdir(path)

    def unlink(self, path) -> None:
        os.unlink(path)

    def rmdir(self, path) -> None:
        os.rmdir(path)

    def makedirs(self, path, exist_ok: bool = True) -> None:
        os.makedirs(path, exist_ok=exist_ok)


class BadFile(Exception):
    """A file from the shared directory that we refuse (internal; readers get None and a warning)."""

    def __init__(self, reason: str, signature: tuple = ()):
        super().__init__(reason)
        self.reason = reason
        self.signature = signature


class Unreachable(BadFile):
    """The shared dir did not answer (a transient error outlived the retries); ``error`` is the OSError."""

    def __init__(self, reason: str, signature: tuple, error: OSError):
        super().__init__(reason, signature)
        self.error = error


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed (numbers must be finite)")


def _check_json_tree(obj: Any, max_depth: int) -> None:
    """Iteratively: nesting depth <= max_depth and every float finite (``1e999`` parses to inf)."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            if depth > max_depth:
                raise ValueError(f"nested deeper than {max_depth} levels")
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, (dict, list, float)))
        elif isinstance(value, list):
            if depth > max_depth:
                raise ValueError(f"nested deeper than {max_depth} levels")
            stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list, float)))
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError("numbers must be finite")


def parse_json_bytes(data: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON from untrusted bytes: UTF-8, no NaN/Infinity, finite numbers, depth <= ``max_depth``.
    Raises ValueError with a short reason (never RecursionError)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8: {err.reason} at byte {err.start}") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except ValueError as err:  # parse_constant, int digit limits
        raise ValueError(f"invalid JSON: {str(err)[:200]}") from None
    _check_json_tree(obj, max_depth)
    return obj


def encode_json(obj: Any) -> bytes:
    """Compact, strict JSON bytes (NaN/Infinity refused with ValueError), as everything we publish."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=True).encode("ascii")


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sapo-swarm"


def _root_key(root: Path) -> str:
    return hashlib.sha256(os.fsencode(os.path.abspath(root))).hexdigest()[:16]


def _is_inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


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
        self.fs = fs if fs is not None else RealFS()
        self.retry_attempts = retry_attempts
        self.retry_base_delay = retry_base_delay
        self.retry_max_delay = retry_max_delay
        self.sleep = sleep
        self.rng = rng if rng is not None else random.Random()
        self.max_json_depth = max_json_depth
        self._warned: OrderedDict[str, tuple] = OrderedDict()
        self._locks: dict[str, filelock.FileLock] = {}
        self._mutex = threading.RLock()
        self._bases = [self.root] + ([self.layout.archive_root] if self.layout.archive_root else [])
        self._real_bases: list[str] | None = None

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

    # -- plumbing -------------------------------------------------------------------------------------
    def _retry(self, fn: Callable[[], T], what: str = "", attempts: int | None = None) -> T:
        return retry(fn, attempts=attempts or self.retry_attempts, base_delay=self.retry_base_delay,
                     max_delay=self.retry_max_delay, sleep=self.sleep, rng=self.rng, what=what)

    def _real(self, fresh: bool = False) -> list[str]:
        # The roots are trusted configuration: resolved once, and again only when a check fails (the
        # first resolution may have happened while the mount was away and stopped early).
        if self._real_bases is None or fresh:
            self._real_bases = [os.path.realpath(b) for b in self._bases]
        return self._real_bases

    def check_inside(self, path: Path | str) -> Path:
        """``path`` (as a Path) when it is inside the experiment or archive dir, lexically and once its
        parent's symlinks are resolved; ValueError otherwise. The file itself is never followed."""
        p = Path(path)
        lexical = os.path.normpath(os.path.abspath(p))
        if not any(_is_inside(lexical, os.path.normpath(os.path.abspath(b))) for b in self._bases):
            raise ValueError(f"refusing path outside the experiment directory: {str(p)!r}")
        parent = os.path.realpath(os.path.dirname(lexical))
        real = os.path.join(parent, os.path.basename(lexical))
        if not any(_is_inside(real, b) for b in self._real()) and not any(
                _is_inside(real, b) for b in self._real(fresh=True)):
            raise ValueError(f"refusing path that resolves outside the experiment directory: {str(p)!r}")
        return p

    def _check_writable(self, path: Path | str) -> Path:
        """:meth:`check_inside` for a write. ``round_R``/``stage_S`` directories are created by the nodes
        themselves, so one found to be a symlink (e.g. pointing out of the experiment) was planted by a
        hostile peer: it is unlinked (the link only, never its target) and recreated as a directory by the
        write, instead of refusing the write and crashing the node round after round. Any other symlink
        (a fixed directory such as ``checkpoints/``) is still refused with ValueError."""
        try:
            return self.check_inside(path)
        except ValueError:
            if not self._unlink_planted_round_links(Path(path)):
                raise
        return self.check_inside(path)

    def _unlink_planted_round_links(self, p: Path) -> bool:
        lexical = os.path.normpath(os.path.abspath(p))
        for base in self._bases:
            b = os.path.normpath(os.path.abspath(base))
            if _is_inside(lexical, b) and lexical != b:
                break
        else:
            return False
        removed = False
        current = Path(b)
        for part in Path(os.path.relpath(os.path.dirname(lexical), b)).parts:
            if part in (".", ".."):
                return removed
            current = current / part
            if parse_round_dir(part) is None and parse_stage_dir(part) is None:
                continue
            try:
                st = self.fs.lstat(current)
            except OSError:
                return removed
            if stat.S_ISLNK(st.st_mode):
                try:
                    self.fs.unlink(current)
                except FileNotFoundError:
                    pass
                except OSError:
                    return removed
                log.warning("planted_symlink_removed", path=str(current),
                            reason="a round/stage directory was a symlink; recreated as a directory")
                removed = True
                break
        return removed

    def _warn_once(self, path: Path | str, signature: tuple, event: str, **fields) -> None:
        key = str(path)
        with self._mutex:
            if self._warned.get(key) == signature:
                self._warned.move_to_end(key)
                return
            self._warned[key] = signature
            self._warned.move_to_end(key)
            while len(self._warned) > _WARNED_CAP:
                self._warned.popitem(last=False)
        log.warning(event, path=key, **fields)

    def _clear_warning(self, path: Path | str) -> None:
        if self._warned:
            with self._mutex:
                self._warned.pop(str(path), None)

    def makedirs(self, path: Path | str, exist_ok: bool = True) -> None:
        """``makedirs`` inside the experiment (or archive) dir, with retries."""
        p = self._check_writable(path)
        self._retry(lambda: self.fs.makedirs(p, exist_ok=exist_ok), "makedirs")

    def ensure_layout(self) -> None:
        """Create the experiment's fixed directories (state/, peers/, rollouts/, ...)."""
        self.layout.ensure_dirs(self.makedirs)

    # -- atomic writes ------------------------------------------------------------------------------
    def write_json_atomic(self, path: Path | str, obj: Any, *, retries: bool = False) -> None:
        """Write ``obj`` as strict JSON, atomically (no spool: see :meth:`publish`)."""
        self.write_bytes_atomic(path, encode_json(obj), retries=retries)

    def write_bytes_atomic(self, path: Path | str, data: bytes, *, retries: bool = False) -> None:
        """Temp file in the same directory, write, flush+fsync, ``os.replace``, fsync the directory.
        On any failure the temp file is removed and the old content (if any) is intact. With ``retries``
        transient errors are retried (the whole sequence, with backoff); else they propagate."""
        if retries:
            self._retry(lambda: self.write_bytes_atomic(path, data), "write")
            return
        p = self._check_writable(path)
        fs = self.fs
        fs.makedirs(p.parent, exist_ok=True)
        tmp = p.parent / f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"
        fd = fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        replaced = False
        try:
            try:
                self._write_all(fd, data, tmp)
            finally:
                fs.close(fd)
            fs.replace(tmp, p)
            replaced = True
        finally:
            if not replaced:
                try:
                    fs.unlink(tmp)
                except OSError:
                    pass
        self._fsync_dir(p.parent)

    def _write_all(self, fd: int, data: bytes, path: Path) -> None:
        """Write every byte (a short write is retried from where it stopped; none at all is EIO), then fsync."""
        view = memoryview(data)
        while view:
            n = self.fs.write(fd, view)
            if n <= 0:
                raise OSError(errno.EIO, "short write", str(path))
            view = view[n:]
        self.fs.fsync(fd)

    def _fsync_dir(self, directory: Path) -> None:
        try:
            fd = self.fs.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            if err.errno in _DIR_FSYNC_UNSUPPORTED:
                return
            raise
        try:
            self.fs.fsync(fd)
        except OSError as err:
            if err.errno not in _DIR_FSYNC_UNSUPPORTED:
                raise
        finally:
            self.fs.close(fd)

    # -- publish and spool --------------------------------------------------------------------------
    def publish(self, path: Path | str, obj: Any) -> bool:
        """Write ``obj`` to ``path`` atomically, with retries. True when it is in the shared dir; False
        when the mount refused it (transient error or full) and it went to the local spool, to be written
        by a later :meth:`flush_spool` (every publish flushes first). Other errors propagate."""
        data = encode_json(obj)
        p = self._check_writable(path)
        self.flush_spool(attempts=1)
        key = self._spool_key(p)
        spooled = self.spool_dir / key
        if os.path.lexists(spooled):
            # An older version is still spooled (the mount is still away): this one replaces it there,
            # so the spool can never later overwrite newer content with older.
            with self._spool_lock():
                if os.path.lexists(spooled):
                    self._spool_write(key, data)
                    log.info("publish_spooled", path=str(p), reason="older version still spooled")
                    return False
        try:
            self._retry(lambda: self.write_bytes_atomic(p, data), "publish")
            return True
        except OSError as err:
            if err.errno not in SPOOLABLE_ERRNOS:
                raise
            with self._spool_lock():
                self._spool_write(key, data)
            log.warning("publish_spooled", path=str(p), error=errno.errorcode.get(err.errno, str(err.errno)),
                        spool=str(self.spool_dir))
            return False

    def append_jsonl(self, path: Path | str, obj: Any) -> bool:
        """Append ``obj`` as one JSON line (O_APPEND, write, fsync) under this file's lock. True when it is
        in the shared dir; False when spooled locally (kept in order, flushed later)."""
        line = encode_json(obj) + b"\n"
        p = self._check_writable(path)
        self.flush_spool(attempts=1)
        key = self._spool_key(p) + _APPEND_SUFFIX
        # Lock order everywhere: spool lock, then the file's append lock (flush_spool takes them so too).
        with self._spool_lock(), self.lock(self._append_lock_name(p)):
            if not os.path.lexists(self.spool_dir / key):
                try:
                    self._retry(lambda: self._append(p, line), "append")
                    return True
                except OSError as err:
                    if err.errno not in SPOOLABLE_ERRNOS:
                        raise
                    log.warning("append_spooled", path=str(p), error=errno.errorcode.get(err.errno, str(err.errno)))
            self._spool_append(key, line)
            return False

    def _append_lock_name(self, p: Path) -> str:
        return "append-" + hashlib.sha256(os.fsencode(os.path.abspath(p))).hexdigest()[:16]

    def _append(self, p: Path, data: bytes) -> None:
        """One append under the caller's lock; on failure the file is cut back to its old length (best
        effort), so a retry does not leave half a line behind."""
        fs = self.fs
        fs.makedirs(p.parent, exist_ok=True)
        fd = fs.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            start = fs.fstat(fd).st_size
            try:
                self._write_all(fd, data, p)
            except BaseException:
                try:
                    fs.ftruncate(fd, start)
                except OSError:
                    pass
                raise
        finally:
            fs.close(fd)

    def _spool_key(self, p: Path) -> str:
        rel = os.path.relpath(os.path.normpath(os.path.abspath(p)), os.path.normpath(os.path.abspath(self.root)))
        return quote(Path(rel).as_posix(), safe="") + ".spool"

    def _spool_path_for(self, name: str) -> tuple[Path, bool] | None:
        """Spool file name -> (shared path, is_append); None for names that are not spool entries."""
        append = name.endswith(_APPEND_SUFFIX)
        base = name[: -len(_APPEND_SUFFIX)] if append else name
        if not base.endswith(".spool") or name.startswith("."):
            return None
        rel = unquote(base[: -len(".spool")])
        if not rel or os.path.isabs(rel):
            return None
        return self.root / rel, append

    def _spool_lock(self) -> filelock.FileLock:
        return self.lock("spool-" + (self.node_id or "_shared"))

    def _spool_write(self, key: str, data: bytes) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        final = self.spool_dir / key
        tmp = self.spool_dir / f".{key[:100]}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_local_dir(self.spool_dir)

    def _spool_append(self, key: str, line: bytes) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        with open(self.spool_dir / key, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        _fsync_local_dir(self.spool_dir)

    def spooled(self) -> list[Path]:
        """Shared-dir paths waiting in the spool, oldest first."""
        return [target for _, target, _ in self._spool_entries()]

    def _spool_entries(self) -> list[tuple[Path, Path, bool]]:
        try:
            names = os.listdir(self.spool_dir)
        except FileNotFoundError:
            return []
        entries = []
        for name in names:
            parsed = self._spool_path_for(name)
            if parsed is None:
                continue
            local = self.spool_dir / name
            try:
                mtime = os.lstat(local).st_mtime_ns
            except FileNotFoundError:
                continue
            entries.append((mtime, name, local, parsed[0], parsed[1]))
        entries.sort(key=lambda e: (e[0], e[1]))
        return [(local, target, append) for _, _, local, target, append in entries]

    def flush_spool(self, *, attempts: int | None = None) -> int:
        """Write spooled files to the shared dir, oldest first, removing each from the spool once written.
        Stops at the first transient error (the mount is still away). Returns how many were written."""
        try:
            if not os.listdir(self.spool_dir):
                return 0
        except FileNotFoundError:
            return 0
        written = 0
        with self._spool_lock():
            for local, target, append in self._spool_entries():
                try:
                    data = local.read_bytes()
                except FileNotFoundError:
                    continue
                except OSError as err:
                    self._warn_once(local, ("local", err.errno), "spool_entry_unreadable", error=str(err))
                    continue
                try:
                    if append:
                        with self.lock(self._append_lock_name(target)):
                            self._retry(lambda: self._append(self.check_inside(target), data), "flush_append", attempts)
                    else:
                        self._retry(lambda: self.write_bytes_atomic(target, data), "flush_spool", attempts)
                except OSError as err:
                    if err.errno in SPOOLABLE_ERRNOS:
                        log.info("spool_flush_paused", pending=str(target),
                                 error=errno.errorcode.get(err.errno, str(err.errno)), written=written)
                        break
                    self._warn_once(local, ("flush", err.errno), "spool_flush_failed", target=str(target),
                                    error=str(err))
                    continue
                except ValueError as err:  # path outside the experiment: never written, kept for a human
                    self._warn_once(local, ("outside",), "spool_entry_refused", target=str(target), reason=str(err))
                    continue
                try:
                    os.unlink(local)
                except FileNotFoundError:
                    pass
                written += 1
            if written:
                _fsync_local_dir(self.spool_dir)
        if written:
            log.info("spool_flushed", written=written)
        return written

    # -- reads --------------------------------------------------------------------------------------
    def read_bytes(self, path: Path | str, *, max_bytes: int | None = None) -> bytes | None:
        """The bytes of a regular file in the shared dir, or None (missing, refused, or unreachable; one
        warning per bad file version)."""
        try:
            return self._read_checked(path, max_bytes)[0]
        except FileNotFoundError:
            return None
        except BadFile as bad:
            self._warn_once(path, bad.signature, "peer_file_rejected", reason=bad.reason)
            return None

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
        try:
            obj, sig = self._read_json_checked(path, max_bytes)
            try:
                value = parse(obj, **expect)
            except ValueError as err:  # SchemaError is a ValueError
                raise BadFile(f"schema: {err}", sig) from None
        except FileNotFoundError:
            return None
        except Unreachable as bad:
            if raise_unreachable:
                raise bad.error from None
            self._warn_once(path, bad.signature, "peer_file_rejected", reason=bad.reason)
            return None
        except BadFile as bad:
            self._warn_once(path, bad.signature, "peer_file_rejected", reason=bad.reason)
            return None
        self._clear_warning(path)
        return value

    def _read_json_checked(self, path: Path | str, max_bytes: int | None) -> tuple[Any, tuple]:
        data, sig = self._read_checked(path, max_bytes)
        try:
            return parse_json_bytes(data, max_depth=self.max_json_depth), sig
        except ValueError as err:
            raise BadFile(str(err), sig) from None

    def _read_checked(self, path: Path | str, max_bytes: int | None) -> tuple[bytes, tuple]:
        cap = self.max_file_bytes if max_bytes is None else int(max_bytes)
        try:
            p = self.check_inside(path)
        except ValueError as err:
            raise BadFile(str(err), ("outside",)) from None
        try:
            return self._retry(lambda: self._read_once(p, cap), "read")
        except (FileNotFoundError, BadFile):
            raise
        except OSError as err:
            name = errno.errorcode.get(err.errno or 0, str(err.errno))
            if err.errno in TRANSIENT_ERRNOS:
                raise Unreachable(f"unreachable after retries: {name}", ("transient", err.errno), err) from None
            if err.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink swapped in after lstat
                raise BadFile("is a symlink", ("symlink",)) from None
            if err.errno in (errno.ENOTDIR,):
                raise FileNotFoundError(err.errno, err.strerror, str(p)) from None
            raise BadFile(f"cannot read: {name} {err.strerror or ''}".strip(), ("error", err.errno)) from None

    def _read_once(self, p: Path, cap: int) -> tuple[bytes, tuple]:
        fs = self.fs
        st = fs.lstat(p)
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stat.S_ISLNK(st.st_mode):
            raise BadFile("is a symlink", sig)
        if not stat.S_ISREG(st.st_mode):
            raise BadFile("is not a regular file", sig)
        if st.st_size > cap:
            raise BadFile(f"size {st.st_size} bytes exceeds the cap of {cap}", sig)
        fd = fs.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fst = fs.fstat(fd)
            if not stat.S_ISREG(fst.st_mode):
                raise BadFile("is not a regular file", sig)
            if fst.st_size > cap:
                raise BadFile(f"size {fst.st_size} bytes exceeds the cap of {cap}", sig)
            chunks = []
            total = 0
            while True:
                chunk = fs.read(fd, min(_READ_CHUNK, cap + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > cap:
                    raise BadFile(f"grew beyond the cap of {cap} bytes while being read", sig)
        finally:
            fs.close(fd)
        return b"".join(chunks), sig

    def read_bytes_strict(self, path: Path | str, *, max_bytes: int | None = None) -> bytes:
        """Like :meth:`read_bytes` but raising: :class:`BadFile` (refused: symlink, not regular, over the
        cap, outside), FileNotFoundError, or the OSError that outlived the retries. For callers that must
        tell "bad" from "unreachable", such as retention (never delete what could not be archived)."""
        p = self.check_inside(path)
        cap = self.max_file_bytes if max_bytes is None else int(max_bytes)
        return self._retry(lambda: self._read_once(p, cap), "read")[0]

    # -- listing ------------------------------------------------------------------------------------
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
            self._warn_once(d, ("listdir", err.errno), "shared_dir_unreachable",
                            error=errno.errorcode.get(err.errno or 0, str(err.errno)))
            return []
        self._clear_warning(d)
        return sorted(names)

    def list_json(self, directory: Path | str) -> list[Path]:
        """``*.json`` regular files in a shared-dir directory (no temp or hidden files, no symlinks),
        sorted; tolerant of a missing directory and of transient errors. Symlinks, non-regular files and
        other names (a ``.pt`` among rollouts) are skipped with one ``peer_file_rejected`` warning each."""
        d = Path(directory)
        out = []
        for name in self.listdir(d):
            if name.startswith("."):  # temp files of writes in progress
                continue
            if not name.endswith(".json"):  # e.g. a .pt planted among rollouts: never opened, said once
                self._warn_once(d / name, ("not_json",), "peer_file_rejected", reason="not a .json file (ignored)")
                continue
            p = d / name
            try:
                st = self._retry(lambda: self.fs.lstat(p), "lstat")
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.append(p)
            else:  # a symlink (maybe pointing out of the experiment) or a device/fifo: never opened
                kind = "symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                self._warn_once(p, (st.st_ino, st.st_mtime_ns), "peer_file_rejected", reason=kind)
        return out

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

    # -- deletion (retention) -----------------------------------------------------------------------
    def remove_tree(self, path: Path | str) -> None:
        """Delete a file or directory tree without following symlinks (a symlink is unlinked, never
        entered); iterative, so a hostile deep tree cannot exhaust the stack. Entries that vanish meanwhile
        are fine; other errors propagate after retries."""
        top = self.check_inside(path)
        stack: list[tuple[Path, bool]] = [(top, False)]  # (path, children already queued)
        while stack:
            p, expanded = stack.pop()
            if expanded:
                self._ignore_missing(lambda: self.fs.rmdir(p), "rmdir")
                continue
            try:
                st = self._retry(lambda: self.fs.lstat(p), "lstat")
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                self._ignore_missing(lambda: self.fs.unlink(p), "unlink")
                continue
            try:
                names = self._retry(lambda: self.fs.listdir(p), "listdir")
            except FileNotFoundError:
                continue
            stack.append((p, True))
            stack.extend((p / name, False) for name in names)

    def _ignore_missing(self, fn: Callable[[], None], what: str) -> None:
        try:
            self._retry(fn, what)
        except FileNotFoundError:
            pass

    # -- locks --------------------------------------------------------------------------------------
    def lock(self, name: str, *, timeout: float = -1) -> filelock.FileLock:
        """A file lock ``<lock_dir>/<name>.lock`` for read-modify-write sequences on this host. The same
        object is returned for the same name (re-entrant in one thread; threads exclude each other)."""
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


def _fsync_local_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
