"""Paths that stay inside the experiment (and its archive) directory, also through symlinked parents.

Peers write into the shared directory too, so a directory on a path may be a symlink planted to lead a
write or a read out of the experiment. Every path the store touches is checked here first: lexically,
and once its parent's symlinks are resolved. The file itself is never followed (reads use O_NOFOLLOW).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Iterable

import structlog

from node.layout import parse_round_dir, parse_stage_dir

log = structlog.get_logger(__name__)


def _is_inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


def _lexical(path: Path | str) -> str:
    return os.path.normpath(os.path.abspath(path))


class Confinement:
    """The checks for paths under ``bases`` (trusted configuration); ``fs`` makes the OS calls."""

    def __init__(self, bases: Iterable[Path], fs: Any):
        self.bases = [Path(b) for b in bases]
        self.fs = fs
        self._real_bases: list[str] | None = None

    def _real(self, fresh: bool = False) -> list[str]:
        # The roots are resolved once, and again only when a check fails (the first resolution may have
        # happened while the mount was away and stopped early).
        if self._real_bases is None or fresh:
            self._real_bases = [os.path.realpath(b) for b in self.bases]
        return self._real_bases

    def check_inside(self, path: Path | str) -> Path:
        """``path`` (as a Path) when it is inside a base, lexically and once its parent's symlinks are
        resolved; ValueError otherwise."""
        p = Path(path)
        lexical = _lexical(p)
        if not any(_is_inside(lexical, _lexical(b)) for b in self.bases):
            raise ValueError(f"refusing path outside the experiment directory: {str(p)!r}")
        real = os.path.join(self._resolve_dir(os.path.dirname(lexical)), os.path.basename(lexical))
        if not any(_is_inside(real, b) for b in self._real()) and not any(
                _is_inside(real, b) for b in self._real(fresh=True)):
            raise ValueError(f"refusing path that resolves outside the experiment directory: {str(p)!r}")
        return p

    def _resolve_dir(self, directory: str) -> str:
        """``os.path.realpath(directory)`` (lexically normalised), resolving only the components below the
        base it lies in (whose own resolution is cached): a few lstats instead of one per component from /.
        A symlink among them hands the whole path to realpath."""
        for base, real_base in zip(map(_lexical, self.bases), self._real()):
            if not _is_inside(directory, base):
                continue
            current = real_base
            rest = [] if directory == base else directory[len(base.rstrip(os.sep)) + 1:].split(os.sep)
            for i, part in enumerate(rest):
                candidate = os.path.join(current, part)
                try:
                    st = os.lstat(candidate)
                except OSError:  # missing (a write creates it): the rest stays as written, as realpath does
                    return os.path.join(candidate, *rest[i + 1:])
                if stat.S_ISLNK(st.st_mode):
                    return os.path.realpath(directory)
                current = candidate
            return current
        return os.path.realpath(directory)

    def check_writable(self, path: Path | str) -> Path:
        """:meth:`check_inside` for a write. ``round_R``/``stage_S`` directories are created by the nodes
        themselves, so one found to be a symlink (e.g. pointing out of the experiment) was planted by a
        hostile peer: it is unlinked (the link only, never its target) and recreated as a directory by the
        write, instead of refusing the write and crashing the node round after round. Any other symlink
        (a fixed directory such as ``checkpoints/``) is still refused with ValueError."""
        try:
            return self.check_inside(path)
        except ValueError:
            if not self._unlink_planted_round_link(Path(path)):
                raise
        return self.check_inside(path)

    def _unlink_planted_round_link(self, p: Path) -> bool:
        """Unlink the first symlinked round/stage directory on the way to ``p``; True when one was."""
        lexical = _lexical(p)
        base = next((b for b in map(_lexical, self.bases) if _is_inside(lexical, b) and lexical != b), None)
        if base is None:
            return False
        current = Path(base)
        for part in Path(os.path.relpath(os.path.dirname(lexical), base)).parts:
            if part in (".", ".."):
                return False
            current = current / part
            if parse_round_dir(part) is None and parse_stage_dir(part) is None:
                continue
            try:
                if not stat.S_ISLNK(self.fs.lstat(current).st_mode):
                    continue
            except OSError:
                return False
            try:
                self.fs.unlink(current)
            except FileNotFoundError:
                pass
            except OSError:
                return False
            log.warning("planted_symlink_removed", path=str(current),
                        reason="a round/stage directory was a symlink; recreated as a directory")
            return True
        return False
