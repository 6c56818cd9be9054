"""File I/O that survives crashes and hostile files: the one atomic write, append, checked reads, listing.

Used for the shared experiment directory (through :class:`node.storage.SharedStore`, which adds
confinement, retries and the spool) and for local files (heartbeats, the spool itself, operator tools).

- :func:`write_atomic`: a temp file in the same directory, every byte written, fsync, ``os.replace``,
  fsync the directory. A reader never sees half a file of ours; the temp file is removed on failure.
- :func:`append_bytes`: ``O_APPEND``, write, fsync; on failure the file is cut back to its old length.
- Own paths are ours: with ``quarantine_dir`` given, whatever a peer planted at a path we write (a
  directory, FIFO, socket, device, symlink, or, for appends, a hard link) is moved aside into it by
  :func:`quarantine` (renamed, never followed or deleted; one ``own_path_quarantined`` warning) and the
  write goes on into a fresh regular file. Without it such a path raises :class:`OwnPathTaken`.
- :func:`read_capped` / :func:`iter_jsonl` / :func:`read_jsonl` / :func:`read_end` / :func:`tail_text`: ``lstat`` first (no symlinks, regular
  files only, size cap), then ``O_NOFOLLOW|O_NONBLOCK`` and ``fstat`` again; a refused file raises
  :class:`BadFile`, a missing one FileNotFoundError.
- :func:`sort_entries` / :func:`list_files`: the regular files of a directory, hidden (temp) files
  skipped, symlinks and other names refused without ever being opened.

Every function takes ``fs`` (the OS calls, :class:`RealFS` by default), so tests can make a "mount" fail
with ``EIO``/``ENOTCONN``/``ENOSPC`` at will.
"""

from __future__ import annotations

import errno
import os
import stat
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import structlog

from node.strict_json import parse_json_bytes

log = structlog.get_logger(__name__)

T = TypeVar("T")

TEMP_SUFFIX = ".tmp"
DEFAULT_MAX_JSONL_BYTES = 512 * 1024 * 1024
# Errors from fsync on a directory that only mean "not supported here" (FUSE, some network filesystems).
_DIR_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.ENOSYS, errno.EBADF, errno.EACCES, errno.EPERM})
_READ_CHUNK = 1 << 20
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# O_NOFOLLOW: a symlink fails (ELOOP); O_NONBLOCK: a FIFO without a reader fails (ENXIO) instead of blocking.
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# What open(_APPEND_FLAGS) says when the path is not a regular file: a symlink, a directory, a FIFO
# without a reader or a socket, a device without a driver.
_PLANTED_ERRNOS = frozenset({errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP})
# How many planted things one write moves aside before it gives up (someone keeps planting).
MAX_SET_ASIDE = 3


class RealFS:
    """The OS calls made on files here; tests substitute a faulty one."""

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

    def rename(self, src, dst) -> None:
        os.rename(src, dst)

    def listdir(self, path) -> list[str]:
        return os.listdir(path)

    def unlink(self, path) -> None:
        os.unlink(path)

    def rmdir(self, path) -> None:
        os.rmdir(path)

    def makedirs(self, path, exist_ok: bool = True) -> None:
        os.makedirs(path, exist_ok=exist_ok)


REAL_FS = RealFS()


class BadFile(Exception):
    """A file we refuse to read: ``reason`` says why, ``signature`` identifies the file version (so a
    caller can warn once per version)."""

    def __init__(self, reason: str, signature: tuple = ()):
        super().__init__(reason)
        self.reason = reason
        self.signature = signature


class OwnPathTaken(OSError):
    """Something that is not our regular file sits at a path only we write: ``reason`` says what
    ("directory", "fifo", "symlink", "hard link (2 links)", ...). The errno is what the plain write met
    (EISDIR, ELOOP, ENXIO) or EMLINK for a hard link."""

    def __init__(self, err: int, reason: str, path: Path):
        super().__init__(err, f"{reason} at own path, not our regular file", str(path))
        self.reason = reason


# -- writes -------------------------------------------------------------------------------------------
def write_atomic(path: Path | str, data: bytes, *, fs: Any = REAL_FS, durable: bool = True,
                 quarantine_dir: Path | str | None = None) -> None:
    """Replace ``path`` with ``data`` atomically: temp file in the same directory (the parent is created),
    write every byte, fsync, ``os.replace``, fsync the directory. On any failure the temp file is removed
    and the old content (if any) is intact. ``durable=False`` skips both fsyncs, for files whose loss in a
    power cut is harmless (heartbeats).

    With ``quarantine_dir``, anything at ``path`` that is not a regular file (a directory, FIFO, socket,
    symlink, device) is first moved aside into it (:func:`quarantine`). A hard-linked regular file needs
    nothing: the replace gives ``path`` a new inode and the other link keeps the old one untouched.
    Without it a directory there fails the replace (EISDIR) and anything else is replaced."""
    p = Path(path)
    fs.makedirs(p.parent, exist_ok=True)
    tmp = p.parent / f".{p.name[:100]}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"
    fd = fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    replaced = False
    try:
        try:
            _write_all(fs, fd, data, tmp, fsync=durable)
        finally:
            fs.close(fd)
        if quarantine_dir is not None:
            _own_path(fs, p, quarantine_dir, lambda: _check_replaceable(fs, p))
        fs.replace(tmp, p)
        replaced = True
    finally:
        if not replaced:
            try:
                fs.unlink(tmp)
            except OSError:
                pass
    if durable:
        fsync_dir(p.parent, fs=fs)


def append_bytes(path: Path | str, data: bytes, *, fs: Any = REAL_FS,
                 quarantine_dir: Path | str | None = None, durable: bool = True) -> None:
    """Append ``data`` (``O_APPEND``, every byte, fsync unless not ``durable``; the parent is created). On failure the file is
    cut back to its old length (best effort), so a retry does not leave half a line behind. Two writers
    must hold a lock: the cut-back assumes nobody appended meanwhile.

    Only a regular file with one link is written (opened with ``O_NOFOLLOW|O_NONBLOCK``, then checked
    with ``fstat``): never a FIFO (with or without a reader), socket, device, directory, symlink, or a
    file hard-linked from elsewhere. With ``quarantine_dir`` such a thing is moved aside into it
    (:func:`quarantine`) and the append goes to a fresh file; for a hard link our name is moved, so the
    file's earlier lines (the node's history before the planting) are in quarantine, and the other
    link's file is never written. Without it :class:`OwnPathTaken` is raised."""
    p = Path(path)
    fs.makedirs(p.parent, exist_ok=True)
    fd, start = _own_path(fs, p, quarantine_dir, lambda: _open_for_append(fs, p))
    try:
        try:
            _write_all(fs, fd, data, p, fsync=durable)
        except BaseException:
            try:
                fs.ftruncate(fd, start)
            except OSError:
                pass
            raise
    finally:
        fs.close(fd)


def quarantine(path: Path | str, quarantine_dir: Path | str, reason: str, *, fs: Any = REAL_FS) -> Path | None:
    """Move whatever is at ``path`` into ``quarantine_dir`` (created; it must be a real directory, not a
    symlink) as ``<path relative to the quarantine's parent, '/' -> '__'>.<UTC time>.<random>``, and log
    one ``own_path_quarantined`` warning. A rename, so nothing is followed or deleted: a symlink moves as
    the link, a directory with its contents, a hard link as our name only. Returns the new path, or None
    when nothing was there any more. A failed move (EXDEV: the quarantine is on another filesystem;
    EACCES; ...) raises an OSError naming ``path``, with the errno of the failure."""
    p, q = Path(path), Path(quarantine_dir)
    dest = q / _quarantine_name(p, q)
    try:
        fs.makedirs(q, exist_ok=True)
        if not stat.S_ISDIR(fs.lstat(q).st_mode):
            raise OSError(errno.ENOTDIR, "not a real directory", str(q))
        fs.rename(p, dest)
    except FileNotFoundError:
        return None  # gone meanwhile (or the quarantine was): nothing moved; the caller looks again
    except OSError as err:
        raise OSError(err.errno, f"cannot move the {reason} at own path {p} aside into {q}: "
                                 f"{err.strerror or err}", str(p)) from err
    log.warning("own_path_quarantined", path=str(p), reason=reason, moved_to=str(dest))
    return dest


def _quarantine_name(p: Path, q: Path) -> str:
    base, full = os.path.normpath(q.parent), os.path.normpath(p)
    rel = full[len(base):] if full.startswith(base.rstrip(os.sep) + os.sep) else full
    flat = rel.strip(os.sep).replace(os.sep, "__")[-160:]  # the tail names the node and the file
    return f"{flat}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.{uuid.uuid4().hex[:12]}"


def _own_path(fs: Any, p: Path, quarantine_dir: Path | str | None, attempt: Callable[[], T]) -> T:
    """``attempt()``; while it raises :class:`OwnPathTaken`, move the planted thing aside and try again
    (at most :data:`MAX_SET_ASIDE` times). Without ``quarantine_dir`` OwnPathTaken propagates."""
    for _ in range(MAX_SET_ASIDE):
        try:
            return attempt()
        except OwnPathTaken as taken:
            if quarantine_dir is None:
                raise
            quarantine(p, quarantine_dir, taken.reason, fs=fs)
    return attempt()


def _open_for_append(fs: Any, p: Path) -> tuple[int, int]:
    """(fd, size) of ``p`` opened for appending, checked to be a regular file with one link; else
    :class:`OwnPathTaken` (nothing written)."""
    try:
        fd = fs.open(p, _APPEND_FLAGS, 0o644)
    except OSError as err:
        if err.errno in _PLANTED_ERRNOS:
            try:
                st = fs.lstat(p)
            except OSError:
                raise err from None
            _refuse_foreign(st, p)
        raise
    try:
        st = fs.fstat(fd)
        _refuse_foreign(st, p, links=True)
    except BaseException:
        fs.close(fd)
        raise
    return fd, st.st_size


def _check_replaceable(fs: Any, p: Path) -> None:
    """Nothing, or a regular file (any number of links), at ``p``; else :class:`OwnPathTaken`."""
    try:
        st = fs.lstat(p)
    except FileNotFoundError:
        return
    _refuse_foreign(st, p)


# (test of st_mode, what it is, the errno OwnPathTaken carries)
_FOREIGN_KINDS = ((stat.S_ISLNK, "symlink", errno.ELOOP), (stat.S_ISDIR, "directory", errno.EISDIR),
                  (stat.S_ISFIFO, "fifo", errno.ENXIO), (stat.S_ISSOCK, "socket", errno.ENXIO),
                  (stat.S_ISCHR, "device", errno.ENXIO), (stat.S_ISBLK, "device", errno.ENXIO))


def _refuse_foreign(st: os.stat_result, p: Path, *, links: bool = False) -> None:
    """Raise :class:`OwnPathTaken` unless ``st`` is a regular file, with at most one link if ``links``
    (0 is let through: some FUSE filesystems do not count links)."""
    if stat.S_ISREG(st.st_mode):
        if links and st.st_nlink > 1:
            raise OwnPathTaken(errno.EMLINK, f"hard link ({st.st_nlink} links)", p)
        return
    reason, code = next(((name, code) for is_kind, name, code in _FOREIGN_KINDS if is_kind(st.st_mode)),
                        ("not a regular file", errno.ENXIO))
    raise OwnPathTaken(code, reason, p)


def _write_all(fs: Any, fd: int, data: bytes, path: Path, *, fsync: bool) -> None:
    """Write every byte (a short write goes on from where it stopped; none at all is EIO), then fsync."""
    view = memoryview(data)
    while view:
        n = fs.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "short write", str(path))
        view = view[n:]
    if fsync:
        fs.fsync(fd)


def fsync_dir(directory: Path | str, *, fs: Any = REAL_FS) -> None:
    """fsync a directory, so a rename or a new file in it survives a power cut. Filesystems that cannot
    (FUSE, some network mounts) are tolerated; other errors propagate."""
    try:
        fd = fs.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        if err.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        fs.fsync(fd)
    except OSError as err:
        if err.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        fs.close(fd)


# -- checked reads ------------------------------------------------------------------------------------
def read_capped(path: Path | str, cap: int, *, fs: Any = REAL_FS) -> tuple[bytes, tuple]:
    """(bytes, signature) of a regular file of at most ``cap`` bytes. Raises :class:`BadFile` (a symlink,
    not a regular file, over the cap: never read), FileNotFoundError, or the OSError of the OS call."""
    fd, sig = _open_regular(fs, Path(path), cap)
    try:
        chunks = []
        total = 0
        while chunk := fs.read(fd, min(_READ_CHUNK, cap + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                raise BadFile(f"grew beyond the cap of {cap} bytes while being read", sig)
    finally:
        fs.close(fd)
    return b"".join(chunks), sig


def iter_jsonl(path: Path | str, *, max_bytes: int = DEFAULT_MAX_JSONL_BYTES, fs: Any = REAL_FS,
               verify: Callable[[bytes], bytes] | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value or the ValueError that refused it) for each non-blank line among the
    first ``max_bytes`` of a JSONL file, read line by line (strict JSON, as :func:`parse_json_bytes`). A
    partial last line (a file being appended to, or cut by ``max_bytes``) is a ValueError like any bad
    line. ``verify(raw line) -> bytes`` checks each line before it is parsed (a signature; its ValueError
    refuses the line). Missing file: nothing. Refused file: :class:`BadFile`, as :func:`read_capped`."""
    try:
        fd, _ = _open_regular(fs, Path(path), None)
    except FileNotFoundError:
        return
    try:
        for number, raw in enumerate(_lines(fs, fd, max_bytes), 1):
            if not raw.strip():
                continue
            try:
                yield number, parse_json_bytes(raw if verify is None else verify(raw))
            except ValueError as err:
                yield number, err
    finally:
        fs.close(fd)


def read_jsonl(path: Path | str, *, max_bytes: int = DEFAULT_MAX_JSONL_BYTES, fs: Any = REAL_FS,
               verify: Callable[[bytes], bytes] | None = None) -> tuple[list[dict], int]:
    """The JSON-object lines of a JSONL file (see :func:`iter_jsonl`) and how many lines were skipped:
    not JSON, partial, refused by ``verify``, or JSON but not an object. A missing file gives ``([], 0)``."""
    rows, bad = [], 0
    for _, value in iter_jsonl(path, max_bytes=max_bytes, fs=fs, verify=verify):
        if isinstance(value, dict):
            rows.append(value)
        else:
            bad += 1
    return rows, bad


def read_end(path: Path | str, *, max_bytes: int, start: int = 0) -> tuple[bytes, int, int]:
    """``(data, begin, size)``: the bytes of ``path`` from ``begin = max(start, size - max_bytes)`` to the
    size it had when opened. Opened through the checked open (``lstat``, ``O_NOFOLLOW|
    O_NONBLOCK``, ``fstat``): a symlink, FIFO, device or directory raises :class:`BadFile`
    without blocking; a missing file raises FileNotFoundError."""
    fd, _ = _open_regular(REAL_FS, Path(path), None)
    try:
        size = os.fstat(fd).st_size
        begin = pos = max(start, size - max_bytes, 0)
        chunks = []
        while pos < size and (chunk := os.pread(fd, min(1 << 20, size - pos), pos)):
            chunks.append(chunk)
            pos += len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks), begin, size


def tail_text(path: Path | str, *, max_bytes: int = 8192, lines: int = 20, start: int = 0) -> str:
    """The last ``lines`` lines of ``path`` (:func:`read_end`: at most ``max_bytes`` from its end, nothing
    before offset ``start``); "" when it is missing. A refused file raises :class:`BadFile`."""
    try:
        data, begin, _ = read_end(path, max_bytes=max_bytes, start=start)
    except FileNotFoundError:
        return ""
    parts = data.decode("utf-8", errors="replace").splitlines()
    if begin > start and parts:
        parts = parts[1:]  # we started mid-line
    return "\n".join(parts[-lines:]) if lines > 0 else ""


def _lines(fs: Any, fd: int, max_bytes: int) -> Iterator[bytes]:
    """The lines (without ``\\n``) of the first ``max_bytes`` of ``fd``, then the unterminated rest."""
    pending = bytearray()
    left = max_bytes
    while left > 0 and (chunk := fs.read(fd, min(_READ_CHUNK, left))):
        left -= len(chunk)
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            pending += chunk[start:end]
            yield bytes(pending)
            pending.clear()
            start = end + 1
        pending += chunk[start:]
    if pending:
        yield bytes(pending)


def _open_regular(fs: Any, p: Path, cap: int | None) -> tuple[int, tuple]:
    """(fd, signature) of a regular file opened for reading, checked before and after opening; a path
    through a file that is not a directory counts as missing."""
    try:
        st = fs.lstat(p)
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        _check_regular(st, sig, cap)
        fd = fs.open(p, _READ_FLAGS)
    except NotADirectoryError as err:
        raise FileNotFoundError(errno.ENOENT, err.strerror, str(p)) from None
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink swapped in after lstat
            raise BadFile("is a symlink", ("symlink",)) from None
        raise
    try:
        _check_regular(fs.fstat(fd), sig, cap)
    except BaseException:
        fs.close(fd)
        raise
    return fd, sig


def _check_regular(st: os.stat_result, sig: tuple, cap: int | None) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise BadFile("is a symlink", sig)
    if not stat.S_ISREG(st.st_mode):
        raise BadFile("is not a regular file", sig)
    if cap is not None and st.st_size > cap:
        raise BadFile(f"size {st.st_size} bytes exceeds the cap of {cap}", sig)


# -- listing and deletion -----------------------------------------------------------------------------
def entry_problem(st: os.stat_result) -> str | None:
    """None for a regular file; else why a directory entry is refused (never opened)."""
    if stat.S_ISREG(st.st_mode):
        return None
    return "symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"


def sort_entries(directory: Path, names: Iterable[str], *, suffix: str,
                 lstat: Callable[[Path], os.stat_result]) -> tuple[list[Path], list[tuple[Path, str, tuple]]]:
    """Split the ``names`` of ``directory`` into regular files ending in ``suffix`` (in the given order)
    and refused entries ``(path, reason, signature)``: other names, symlinks, devices, fifos. Hidden
    names (temp files of writes in progress) are skipped silently, so are entries ``lstat`` fails on."""
    files, refused = [], []
    for name in names:
        if name.startswith("."):
            continue
        p = directory / name
        if not name.endswith(suffix):
            refused.append((p, f"not a {suffix} file (ignored)", ("wrong_suffix",)))
            continue
        try:
            st = lstat(p)
        except OSError:
            continue
        problem = entry_problem(st)
        if problem is None:
            files.append(p)
        else:
            refused.append((p, problem, (st.st_ino, st.st_mtime_ns)))
    return files, refused


def list_files(directory: Path | str, *, suffix: str = ".json",
               fs: Any = REAL_FS) -> tuple[list[Path], list[tuple[Path, str, tuple]]]:
    """:func:`sort_entries` of a directory's names, sorted; a missing directory gives ``([], [])``."""
    d = Path(directory)
    try:
        names = sorted(fs.listdir(d))
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    return sort_entries(d, names, suffix=suffix, lstat=fs.lstat)
