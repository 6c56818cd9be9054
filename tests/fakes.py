"""Small honest stand-ins shared by tests: a filesystem that fails on demand like a dropped mount."""

import errno
import os

from node.fsio import RealFS


class FlakyFS(RealFS):
    """RealFS whose calls fail on demand: ``fail(op, errno, times)`` (times=None: until ``heal()``), or
    ``down(errno)`` for every call, as a disconnected Drive mount does."""

    OPS = ("open", "read", "write", "fsync", "close", "fstat", "ftruncate", "lstat", "stat", "replace", "listdir",
           "unlink", "rmdir", "makedirs")

    def __init__(self):
        self.rules: dict[str, list] = {}
        self.all_down: int | None = None
        self.calls: dict[str, int] = {}

    def fail(self, op: str, err: int, times: int | None = None) -> None:
        self.rules[op] = [err, times]

    def down(self, err: int = errno.ENOTCONN) -> None:
        self.all_down = err

    def heal(self) -> None:
        self.rules.clear()
        self.all_down = None

    def _check(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        if self.all_down is not None and op != "close":
            raise OSError(self.all_down, os.strerror(self.all_down))
        rule = self.rules.get(op)
        if rule is not None:
            err, times = rule
            if times is not None:
                if times <= 0:
                    return
                rule[1] = times - 1
            raise OSError(err, os.strerror(err))


def _flaky(name):
    real = getattr(RealFS, name)

    def method(self, *args, **kwargs):
        self._check(name)
        return real(self, *args, **kwargs)

    method.__name__ = name
    return method


for _op in FlakyFS.OPS:
    setattr(FlakyFS, _op, _flaky(_op))
