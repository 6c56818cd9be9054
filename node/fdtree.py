"""Walking, reading and deleting in the shared directory through directory file descriptors (no TOCTOU).

A path is resolved again by every path-based call, so a round directory that a hostile peer swaps for a
symlink between an ``lstat`` and an ``unlink`` leads the second call out of the experiment. Here a
directory is opened once, relative to its parent's fd, with ``O_NOFOLLOW|O_DIRECTORY``, and everything
below it is reached relative to that fd: a symlink is only ever a name in a directory (unlinked, never
entered), never a path component that gets resolved.

- :func:`open_dir`: a trusted base (the experiment or archive dir, opened as configured), then each
  component relative to the previous one with ``O_NOFOLLOW``;
- :func:`scan`: a directory's entries as ``(name, is_dir)``, symlinks not followed;
- :func:`remove_entry` / :func:`remove_path`: delete a file, a symlink or a whole tree, iteratively (a
  hostile deep tree cannot exhaust the stack) with at most ``max_fds`` directories open: a tree deeper than
  that goes back up through ``..``, checked to be the very directory it came down from;
- :func:`unlink_path` / :func:`rmdir_path`: one file, one empty directory;
- :func:`read_file_at`: a regular file relative to a directory fd (``O_NOFOLLOW|O_NONBLOCK``, ``fstat``,
  size cap), refused with :class:`node.fsio.BadFile` otherwise.

Entries that vanish meanwhile are fine. Every OS call goes through ``ops`` (:class:`FdOps`; tests
substitute a faulty or a swapping double) and ``call(fn, what)`` (a retry policy such as the store's, so
transient ``EIO``/``ENOTCONN`` are retried as everywhere else); other errors propagate.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from node.fsio import BadFile

T = TypeVar("T")
Call = Callable[[Callable[[], Any], str], Any]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
MAX_OPEN_FDS = 32  # directories held open by one removal; deeper levels are reopened through ".."
_READ_CHUNK = 1 << 20
# open(O_NOFOLLOW|O_DIRECTORY) on a symlink gives ELOOP, on anything else that is no directory ENOTDIR.
_NOT_A_DIR = frozenset({errno.ELOOP, errno.ENOTDIR})


def direct(fn: Callable[[], T], what: str = "") -> T:
    """The ``call`` without retries."""
    return fn()


class FdOps:
    """The fd-relative OS calls made here; tests substitute a faulty or swapping double."""

    def open(self, name, flags: int, dir_fd: int | None = None) -> int:
        return os.open(name, flags, dir_fd=dir_fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def read(self, fd: int, n: int) -> bytes:
        return os.read(fd, n)

    def scandir(self, fd: int) -> list[tuple[str, bool]]:
        """``(name, is_dir)`` of every entry, without following symlinks (``os.scandir`` on a dup of fd)."""
        with os.scandir(fd) as entries:
            return [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]

    def unlink(self, name: str, dir_fd: int) -> None:
        os.unlink(name, dir_fd=dir_fd)

    def rmdir(self, name: str, dir_fd: int) -> None:
        os.rmdir(name, dir_fd=dir_fd)


REAL_OPS = FdOps()


class TreeMoved(OSError):
    """Going back up a deep tree through ``..`` did not lead to the directory we came down from (someone
    moved part of the tree meanwhile): the removal stops rather than delete in a directory we never chose."""


def check_name(name: str) -> str:
    """``name`` when it is one plain directory entry (not empty, ``.``, ``..``, no ``/`` or NUL)."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"not a plain directory entry: {name!r}")
    return name


def relative_parts(base: Path | str, path: Path | str) -> tuple[str, ...]:
    """The components of ``path`` below ``base``, lexically (nothing resolved); ValueError when ``path``
    is ``base`` itself or not below it."""
    b = os.path.normpath(os.path.abspath(base))
    p = os.path.normpath(os.path.abspath(path))
    rel = os.path.relpath(p, b)
    if rel == "." or rel == ".." or rel.startswith(".." + os.sep):
        raise ValueError(f"{p!r} is not below {b!r}")
    return tuple(rel.split(os.sep))


# -- opening and listing ------------------------------------------------------------------------------
def open_child(dir_fd: int, name: str, *, ops: FdOps = REAL_OPS, call: Call = direct) -> int:
    """An fd of the directory ``name`` in ``dir_fd``, never through a symlink: a symlink or a file there
    raises OSError with ``ELOOP``/``ENOTDIR`` (see :func:`is_not_a_dir`), a missing one FileNotFoundError."""
    check_name(name)
    return call(lambda: ops.open(name, DIR_FLAGS, dir_fd=dir_fd), "open")


def is_not_a_dir(err: OSError) -> bool:
    """True for the error :func:`open_child` gives when the entry is a symlink or no directory."""
    return err.errno in _NOT_A_DIR


def open_dir(base: Path | str, parts: Sequence[str], *, ops: FdOps = REAL_OPS, call: Call = direct) -> int:
    """An fd of ``base/parts...``: ``base`` is trusted configuration (opened as it is, symlinks and all);
    each part is opened relative to the previous one with ``O_NOFOLLOW`` (see :func:`open_child`)."""
    fd = call(lambda: ops.open(os.fspath(base), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), "open")
    try:
        for part in parts:
            child = open_child(fd, part, ops=ops, call=call)
            ops.close(fd)
            fd = child
    except BaseException:
        ops.close(fd)
        raise
    return fd


def scan(dir_fd: int, *, ops: FdOps = REAL_OPS, call: Call = direct) -> list[tuple[str, bool]]:
    """``(name, is_dir)`` of the entries of ``dir_fd``, sorted by name; symlinks count as no directory."""
    return sorted(call(lambda: ops.scandir(dir_fd), "scandir"))


# -- reading ------------------------------------------------------------------------------------------
def read_file_at(dir_fd: int, name: str, cap: int, *, ops: FdOps = REAL_OPS, call: Call = direct) -> bytes:
    """The bytes of the regular file ``name`` in ``dir_fd``, at most ``cap`` of them. Raises
    :class:`BadFile` (a symlink, not a regular file, over the cap: never read), FileNotFoundError, or the
    OSError of the OS call (after ``call``'s retries: the whole open-read-close is retried)."""
    check_name(name)

    def read() -> bytes:
        try:
            fd = ops.open(name, FILE_FLAGS, dir_fd=dir_fd)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise BadFile("is a symlink", ("symlink",)) from None
            raise
        try:
            st = ops.fstat(fd)
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
            if not stat.S_ISREG(st.st_mode):
                raise BadFile("is not a regular file", sig)
            if st.st_size > cap:
                raise BadFile(f"size {st.st_size} bytes exceeds the cap of {cap}", sig)
            chunks, total = [], 0
            while chunk := ops.read(fd, min(_READ_CHUNK, cap + 1 - total)):
                chunks.append(chunk)
                total += len(chunk)
                if total > cap:
                    raise BadFile(f"grew beyond the cap of {cap} bytes while being read", sig)
            return b"".join(chunks)
        finally:
            ops.close(fd)
    return call(read, "read")


# -- deletion -----------------------------------------------------------------------------------------
@dataclass
class _Level:
    """One directory on the way down: its name in its parent, its fd (None once closed to stay under the
    fd bound), its identity (to check a reopened ``..``) and the subdirectories still to remove."""

    name: str
    fd: int | None
    ident: tuple[int, int]
    subdirs: list[str]
    rescanned: bool = False


def _unlink(ops: FdOps, call: Call, dir_fd: int, name: str) -> None:
    try:
        call(lambda: ops.unlink(name, dir_fd=dir_fd), "unlink")
    except FileNotFoundError:
        pass


def _clear_files(ops: FdOps, call: Call, fd: int) -> list[str]:
    """Unlink every entry of ``fd`` that is no directory (symlinks included); the subdirectories' names."""
    subdirs = []
    for name, is_dir in scan(fd, ops=ops, call=call):
        if is_dir:
            subdirs.append(name)
            continue
        try:
            _unlink(ops, call, fd, name)
        except IsADirectoryError:  # became a directory since the listing
            subdirs.append(name)
    return subdirs


def _enter(ops: FdOps, call: Call, parent_fd: int, name: str) -> _Level | None:
    """Open the directory ``name`` and unlink its files; None when it was no directory (then it was
    unlinked: a symlink is never entered) or is gone."""
    try:
        fd = open_child(parent_fd, name, ops=ops, call=call)
    except FileNotFoundError:
        return None
    except OSError as err:
        if not is_not_a_dir(err):
            raise
        _unlink(ops, call, parent_fd, name)
        return None
    try:
        st = ops.fstat(fd)
        return _Level(name, fd, (st.st_dev, st.st_ino), _clear_files(ops, call, fd))
    except BaseException:
        ops.close(fd)
        raise


def _make_room(ops: FdOps, stack: list[_Level], max_fds: int) -> None:
    """Close the fds of the shallowest open levels (never the top) until one more fits under ``max_fds``.
    The open levels stay a suffix of the stack, so going back up reopens one ``..`` at a time."""
    open_levels = [level for level in stack[:-1] if level.fd is not None]
    for level in open_levels[:max(0, len(open_levels) + 2 - max(2, max_fds))]:
        ops.close(level.fd)
        level.fd = None


def _parent_fd(ops: FdOps, call: Call, stack: list[_Level], root_fd: int) -> int:
    """The fd of the top level's parent, reopened through ``..`` (and checked) when it was closed."""
    if len(stack) == 1:
        return root_fd
    parent, top = stack[-2], stack[-1]
    if parent.fd is None:
        fd = call(lambda: ops.open("..", DIR_FLAGS, dir_fd=top.fd), "open")
        st = ops.fstat(fd)
        if (st.st_dev, st.st_ino) != parent.ident:
            ops.close(fd)
            raise TreeMoved(f"{parent.name!r} moved while its tree was being removed")
        parent.fd = fd
    return parent.fd


def _rmdir(ops: FdOps, call: Call, stack: list[_Level], root_fd: int) -> bool:
    """Remove the (emptied) top level from its parent; False when new entries appeared in it once (it
    is then scanned again), True when it is gone."""
    top = stack[-1]
    parent_fd = _parent_fd(ops, call, stack, root_fd)
    try:
        call(lambda: ops.rmdir(top.name, dir_fd=parent_fd), "rmdir")
    except FileNotFoundError:
        pass
    except NotADirectoryError:  # the name now holds a symlink or file: inside the tree, unlinked
        _unlink(ops, call, parent_fd, top.name)
    except OSError as err:
        if err.errno != errno.ENOTEMPTY or top.rescanned:
            raise
        top.rescanned = True  # a late writer: clear what appeared, once
        top.subdirs = _clear_files(ops, call, top.fd)
        return False
    return True


def remove_entry(dir_fd: int, name: str, *, ops: FdOps = REAL_OPS, call: Call = direct,
                 max_fds: int = MAX_OPEN_FDS) -> None:
    """Delete the entry ``name`` of the directory ``dir_fd``: a file or symlink is unlinked (a symlink is
    never entered), a directory is emptied depth first and removed. Iterative, at most ``max_fds``
    directory fds open at once; entries that vanish meanwhile are fine; :class:`TreeMoved` when a
    reopened ``..`` is not where we came from; other errors propagate."""
    stack: list[_Level] = []
    try:
        first = _enter(ops, call, dir_fd, check_name(name))
        if first is None:
            return
        stack.append(first)
        while stack:
            top = stack[-1]
            if top.subdirs:
                _make_room(ops, stack, max_fds)
                child = _enter(ops, call, top.fd, top.subdirs.pop())
                if child is not None:
                    stack.append(child)
                continue
            if _rmdir(ops, call, stack, dir_fd):
                ops.close(top.fd)
                stack.pop()
    finally:
        for level in stack:
            if level.fd is not None:
                ops.close(level.fd)


def in_parent(base: Path | str, path: Path | str, action: Callable[[int, str], T], *, ops: FdOps = REAL_OPS,
              call: Call = direct) -> T | None:
    """``action(parent_fd, name)`` for ``path`` below ``base``, its parent opened by :func:`open_dir`
    (never through a symlink); None, without calling it, when a directory on the way is missing."""
    *parents, name = relative_parts(base, path)
    try:
        parent_fd = open_dir(base, parents, ops=ops, call=call)
    except FileNotFoundError:
        return None
    try:
        return action(parent_fd, name)
    finally:
        ops.close(parent_fd)


def remove_path(base: Path | str, path: Path | str, *, ops: FdOps = REAL_OPS, call: Call = direct) -> None:
    """:func:`remove_entry` of ``path`` below ``base`` (see :func:`in_parent`)."""
    in_parent(base, path, lambda fd, name: remove_entry(fd, name, ops=ops, call=call), ops=ops, call=call)


def unlink_path(base: Path | str, path: Path | str, *, ops: FdOps = REAL_OPS, call: Call = direct) -> None:
    """Unlink the file (or symlink) ``path`` below ``base``; a missing one is fine, a directory raises
    IsADirectoryError."""
    in_parent(base, path, lambda fd, name: _unlink(ops, call, fd, name), ops=ops, call=call)


def rmdir_path(base: Path | str, path: Path | str, *, ops: FdOps = REAL_OPS, call: Call = direct) -> None:
    """Remove the empty directory ``path`` below ``base``; raises as ``rmdir`` does (ENOTEMPTY...)."""
    in_parent(base, path, lambda fd, name: call(lambda: ops.rmdir(name, dir_fd=fd), "rmdir"), ops=ops, call=call)


def remove_under(bases: Sequence[Path | str], path: Path | str, *, ops: FdOps = REAL_OPS, call: Call = direct) -> None:
    """:func:`remove_path` of ``path`` from the first of ``bases`` (e.g. the experiment and archive dirs)
    it lies below, lexically; ValueError when it lies below none."""
    for base in bases:
        try:
            relative_parts(base, path)
        except ValueError:
            continue
        return remove_path(base, path, ops=ops, call=call)
    raise ValueError(f"refusing path outside the experiment directory: {str(path)!r}")
