"""Wake on filesystem events, poll as a fallback: how a node waits for what another node writes.

A node waits for files: the coordinator for round results, a worker for the state file and its peers'
rollouts. Polling costs one poll interval per round switch on average; on the local host the kernel can
say when a file lands instead (inotify). Events are only a hint, never the truth:

- callers re-read the files after every wake (an event says "look now", not what the file holds);
- the wait is bounded by the poll interval, so writers the watch cannot see (another host on the same
  Drive, a FUSE mount that delivers no events, a directory created after the watch) are still seen;
- only names the caller cares about wake it (``wanted(name)``), so junk files cost no wake, and at most
  :data:`MAX_WAKES_PER_SECOND` wakes (and :data:`MAX_IDLE_READS_PER_SECOND` reads of unwanted events)
  happen per second: an event storm degrades to plain polling, never to a busy loop.

inotify_simple (a thin, dependency-free wrapper of the inotify syscalls, no threads) is used rather than
watchdog (an observer thread per watch, callbacks across threads, polling emulation we do not need: the
fallback here is the caller's own poll). Where inotify is missing (not Linux, no more watches allowed),
:class:`Wakeup` degrades to sleeping the timeout.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import structlog

log = structlog.get_logger(__name__)

MAX_WAKES_PER_SECOND = 50  # a wake costs the caller one look (~1 ms): at most a few percent of a core
# Reads that brought only unwanted events (temp files of atomic writes, junk) allowed per poll interval
# before the wait gives up on events and sleeps: a few per write are normal, a storm is not.
MAX_IDLE_READS_PER_SECOND = 200
_READ_MASK_NAMES = ("CLOSE_WRITE", "MOVED_TO", "CREATE", "DELETE", "ATTRIB")

try:  # Linux only; anything else polls
    import inotify_simple
except ImportError:  # pragma: no cover - exercised on other platforms
    inotify_simple = None


class Wakeup:
    """Waits until a wanted name changes in one of the watched directories, or a timeout.

    ``watch(dirs)`` sets the directories (missing ones are skipped and tried again at the next call);
    ``wait(timeout_s, wanted)`` returns True when an event for a wanted name woke it, False at the timeout.
    ``enabled=False`` (or no inotify) makes every wait a plain sleep: the polling fallback.
    """

    def __init__(self, *, enabled: bool = True, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.sleep, self.clock = sleep, clock
        self._inotify = None
        self._watches: dict[int, Path] = {}
        self._wanted_dirs: tuple[Path, ...] = ()
        self._window_start, self._wakes, self._idle_reads = 0.0, 0, 0
        self.woken = 0  # waits ended by an event (for tests and figures)
        if enabled and inotify_simple is not None:
            try:
                self._inotify = inotify_simple.INotify(nonblocking=False)
                flags = inotify_simple.flags
                self._mask = 0
                for name in _READ_MASK_NAMES:
                    self._mask |= getattr(flags, name)
            except OSError as err:
                log.warning("inotify_unavailable", error=str(err), fallback="polling")
                self._inotify = None

    @property
    def active(self) -> bool:
        """True when waits can be woken by events (else they are plain sleeps)."""
        return self._inotify is not None

    def watch(self, directories) -> bool:
        """Watch exactly ``directories`` (added and removed as needed; missing ones are retried later). True
        when a watch was added: what changed there before it was armed raised no event, so the caller should
        look once more before it waits."""
        wanted = tuple(Path(d) for d in directories)
        if self._inotify is None:
            return False
        if wanted == self._wanted_dirs and len(self._watches) == len(set(wanted)):
            return False
        self._wanted_dirs = wanted
        added = False
        for wd, path in list(self._watches.items()):
            if path not in wanted:
                self._remove(wd)
        have = set(self._watches.values())
        for path in wanted:
            if path in have:
                continue
            try:
                # O_NOFOLLOW semantics: a symlink planted for a directory is not watched (polling still works)
                wd = self._inotify.add_watch(path, self._mask | inotify_simple.flags.DONT_FOLLOW
                                             | inotify_simple.flags.ONLYDIR)
            except OSError:
                continue  # not there yet (or not a directory): the next watch() tries again
            self._watches[wd] = path
            have.add(path)
            added = True
        return added

    def _remove(self, wd: int) -> None:
        self._watches.pop(wd, None)
        try:
            self._inotify.rm_watch(wd)
        except OSError:
            pass  # the directory is gone: the kernel dropped the watch already

    def wait(self, timeout_s: float, wanted: Callable[[str], bool] = lambda name: True) -> bool:
        """Block until an event for a ``wanted`` name in a watched directory, or ``timeout_s``."""
        timeout_s = max(0.0, float(timeout_s))
        if self._inotify is None or not self._watches:
            self.sleep(timeout_s)
            return False
        deadline = self.clock() + timeout_s
        if self._over_budget():
            self.sleep(timeout_s)  # an event storm: poll, drain what piled up meanwhile
            self._drain(wanted)
            return False
        while True:
            left = deadline - self.clock()
            if left <= 0:
                return False
            events = self._inotify.read(timeout=max(1, int(left * 1000)))
            if not events:
                continue
            if self._relevant(events, wanted):
                self._wakes += 1
                self.woken += 1
                return True
            self._idle_reads += 1  # a storm of unwanted events must not spin this loop
            if self._over_budget():
                self.sleep(max(0.0, deadline - self.clock()))
                self._drain(wanted)
                return False

    def _over_budget(self) -> bool:
        now = self.clock()
        if now - self._window_start >= 1.0:
            self._window_start, self._wakes, self._idle_reads = now, 0, 0
        return self._wakes >= MAX_WAKES_PER_SECOND or self._idle_reads >= MAX_IDLE_READS_PER_SECOND

    def _drain(self, wanted: Callable[[str], bool]) -> None:
        self._relevant(self._inotify.read(timeout=0), wanted)

    def _relevant(self, events, wanted: Callable[[str], bool]) -> bool:
        hit = False
        for event in events:
            if event.mask & inotify_simple.flags.IGNORED:
                self._watches.pop(event.wd, None)  # the directory went away (retention): re-added later
                continue
            if event.name and wanted(event.name):
                hit = True
        return hit

    def close(self) -> None:
        """Release the inotify descriptor (also done when the object is collected)."""
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
            self._watches.clear()


def events_available() -> bool:
    """inotify can be used here and is not turned off."""
    return inotify_simple is not None and not events_disabled()


def events_disabled() -> bool:
    """``SWARM_NO_INOTIFY=1`` turns events off (every wait polls): for mounts that deliver events late or
    wrongly, and for tests of the fallback."""
    return os.environ.get("SWARM_NO_INOTIFY", "").strip() not in ("", "0")
