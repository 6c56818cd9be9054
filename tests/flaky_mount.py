#!/usr/bin/env python
"""A real FUSE passthrough mount that can drop out like Colab's Google-Drive mount.

    python tests/flaky_mount.py BACKING_DIR MOUNTPOINT CONTROL_DIR

Every operation is passed through to BACKING_DIR, except while ``CONTROL_DIR/down`` exists: then every
operation fails with ENOTCONN ("Transport endpoint is not connected"), as a disconnected Drive does. If
``CONTROL_DIR/latency_ms`` holds a number, every operation sleeps that long first (a slow mount).

If ``CONTROL_DIR/delay_s`` holds a number N, a regular file written to BACKING_DIR by someone else (another
host's writes, as Drive propagates them) becomes visible here only N seconds after it appeared: until then
lookups, opens and directory listings do not show it. A path is dated when this mount first sees it (its
mtime or ctime then, whichever is later) and, once shown, stays shown (a rewrite under the same name is seen
at once). Files created or renamed through the mount are this host's own writes: visible at once.
Run it as its own process (a FUSE server in the process that uses the mount deadlocks); unmount with
``fusermount -u MOUNTPOINT`` (or ``umount -l``) after killing it.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
import time

from fuse import FUSE, FuseOSError, Operations


class FlakyPassthrough(Operations):
    """Passthrough operations guarded by the control files."""

    def __init__(self, backing: str, control: str):
        self.backing = os.path.realpath(backing)
        self.down_flag = os.path.join(control, "down")
        self.latency_file = os.path.join(control, "latency_ms")
        self.delay_file = os.path.join(control, "delay_s")
        self._delay = (0.0, float("-inf"))  # (seconds, when read): the control file is read at most twice a second
        self._visible_at: dict[str, float] = {}  # path -> when it may be shown (0: our own write)
        self._lock = threading.Lock()

    def _guard(self) -> None:
        if os.path.exists(self.latency_file):
            try:
                time.sleep(float(open(self.latency_file).read().strip() or 0) / 1000.0)
            except (OSError, ValueError):
                pass
        if os.path.exists(self.down_flag):
            raise FuseOSError(errno.ENOTCONN)

    def _full(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    def _delay_s(self) -> float:
        value, read_at = self._delay
        now = time.monotonic()
        if now - read_at >= 0.5:
            try:
                value = float(open(self.delay_file).read().strip() or 0)
            except (OSError, ValueError):
                value = 0.0
            self._delay = (value, now)
        return value

    def _hidden(self, path: str) -> bool:
        """A regular file someone else wrote less than delay_s ago (see the module doc)."""
        delay = self._delay_s()
        if delay <= 0:
            return False
        with self._lock:
            at = self._visible_at.get(path)
        if at is None:
            try:
                st = os.lstat(self._full(path))
            except OSError:
                return False
            if not stat.S_ISREG(st.st_mode):
                return False
            with self._lock:
                at = self._visible_at.setdefault(path, max(st.st_mtime, st.st_ctime) + delay)
        return time.time() < at

    def _mine(self, path: str) -> None:
        with self._lock:
            self._visible_at[path] = 0.0

    def _check_visible(self, path: str) -> None:
        if self._hidden(path):
            raise FuseOSError(errno.ENOENT)

    def __call__(self, op, *args):
        self._guard()
        try:
            return super().__call__(op, *args)
        except OSError as err:
            if isinstance(err, FuseOSError):
                raise
            raise FuseOSError(err.errno or errno.EIO) from None

    # metadata
    def access(self, path, mode):
        self._check_visible(path)
        if not os.access(self._full(path), mode):
            raise FuseOSError(errno.EACCES)

    def getattr(self, path, fh=None):
        self._check_visible(path)
        st = os.lstat(self._full(path))
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid", "st_ino")
        return {k: getattr(st, k) for k in keys}

    def readdir(self, path, fh):
        names = os.listdir(self._full(path))
        return [".", "..", *(n for n in names if not self._hidden(os.path.join(path, n)))]

    def readlink(self, path):
        return os.readlink(self._full(path))

    def statfs(self, path):
        st = os.statvfs(self._full(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
                "f_frsize", "f_namemax")
        return {k: getattr(st, k) for k in keys}

    def chmod(self, path, mode):
        os.chmod(self._full(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._full(path), uid, gid)

    def utimens(self, path, times=None):
        os.utime(self._full(path), times)

    # namespace
    def mkdir(self, path, mode):
        os.mkdir(self._full(path), mode)

    def rmdir(self, path):
        os.rmdir(self._full(path))

    def unlink(self, path):
        os.unlink(self._full(path))

    def rename(self, old, new):
        os.replace(self._full(old), self._full(new))
        self._mine(new)

    def symlink(self, target, source):
        os.symlink(source, self._full(target))

    def link(self, target, source):
        os.link(self._full(source), self._full(target))
        self._mine(target)

    def truncate(self, path, length, fh=None):
        with open(self._full(path), "r+b") as f:
            f.truncate(length)

    # files
    def open(self, path, flags):
        self._check_visible(path)
        return os.open(self._full(path), flags)

    def create(self, path, mode, fi=None):
        fd = os.open(self._full(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        self._mine(path)
        return fd

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        return os.pwrite(fh, data, offset)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        os.fsync(fh)
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0

    def opendir(self, path):
        return 0

    def releasedir(self, path, fh):
        return 0

    def fsyncdir(self, path, datasync, fh):
        return 0


def main(argv=None) -> int:
    """Mount in the foreground until killed."""
    backing, mountpoint, control = (argv or sys.argv[1:])[:3]
    os.makedirs(backing, exist_ok=True)
    os.makedirs(mountpoint, exist_ok=True)
    os.makedirs(control, exist_ok=True)
    FUSE(FlakyPassthrough(backing, control), mountpoint, foreground=True, nothreads=False, use_ino=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
