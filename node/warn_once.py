"""One warning per bad file version (DESIGN.md §3: "a bad file is skipped with one warning per file"),
and at most a budget of warnings per reason per time window.

A node polls the shared directory every fraction of a second; a hostile or broken peer file would
otherwise fill the log. A file is identified by its path, a version by a signature the caller chooses
(mtime, size, inode; or the errno that refused it): a new version warns again, the same one never does.

The cache of warned paths is capped (:data:`DEFAULT_CAP`), so it alone is no guard: more junk names than
the cap make it thrash and every poll would warn again for every name. Hence the second guard, a budget
per ``(event, reason)`` and fixed time window (:data:`DEFAULT_BUDGET` warnings per
:data:`DEFAULT_WINDOW_S`): past it, warnings are counted, not logged, and one ``warnings_suppressed`` line
gives the counts per reason at the first call after the window ended (no thread: when calls stop, the
summary waits for the next one). Reasons are grouped by kind (the text before the first colon, digits as
``N``), and at most :data:`MAX_REASONS` kinds are told apart (later ones share one budget per event), so a
hostile peer cannot mint a fresh budget per file: at most ``(MAX_REASONS + events) * budget + 1`` lines per
window, whatever the directory holds.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import structlog

log = structlog.get_logger(__name__)

DEFAULT_CAP = 4096  # paths remembered (least recently warned forgotten first)
DEFAULT_BUDGET = 20  # warnings logged per (event, reason kind) per window
DEFAULT_WINDOW_S = 60.0
MAX_REASONS = 32  # reason kinds told apart; later kinds share the budget of OTHER
OTHER = "other"


def reason_kind(reason: object) -> str:
    """The budget group of a reason: its text before the first colon, digit runs as ``N``, 60 characters.

    ``"size 123 bytes exceeds the cap of 64"`` and ``"size 9 bytes exceeds the cap of 64"`` share a budget;
    ``"schema: <whatever the file said>"`` is ``"schema"``.
    """
    if reason is None:
        return ""
    head = str(reason).split(":", 1)[0]
    return re.sub(r"\d+", "N", head).strip()[:60]


class WarnOnce:
    """Remembers the last warned signature of up to ``cap`` paths, and logs at most ``budget`` warnings per
    ``(event, reason kind)`` per ``window_s`` seconds of ``clock`` (see the module docstring)."""

    def __init__(self, cap: int = DEFAULT_CAP, *, budget: int = DEFAULT_BUDGET, window_s: float = DEFAULT_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic):
        self.cap = cap
        self.budget = budget
        self.window_s = window_s
        self.clock = clock
        self._warned: OrderedDict[str, tuple] = OrderedDict()
        self._mutex = threading.Lock()
        self._window_start: float | None = None
        self._logged: dict[tuple[str, str], int] = {}  # this window: (event, kind) -> warnings logged
        self._suppressed: dict[tuple[str, str], int] = {}  # this window: (event, kind) -> warnings not logged

    def __call__(self, path: Path | str, signature: tuple, event: str, **fields) -> None:
        """Log ``event`` at warning level for ``path`` unless this signature of it was the last warned, or the
        budget of its reason is spent for this window (then it is only counted)."""
        key = str(path)
        with self._mutex:
            summary = self._roll_window()
            repeat = self._warned.get(key) == signature
            self._warned[key] = signature
            self._warned.move_to_end(key)
            while len(self._warned) > self.cap:
                self._warned.popitem(last=False)
            allowed = not repeat and self._spend(event, reason_kind(fields.get("reason")))
        if summary:
            log.warning("warnings_suppressed", window_s=self.window_s, budget=self.budget, counts=summary,
                        total=sum(summary.values()))
        if allowed:
            log.warning(event, path=key, **fields)

    def clear(self, path: Path | str) -> None:
        """``path`` is fine again: its next problem warns even when it looks like the last one."""
        if self._warned:
            with self._mutex:
                self._warned.pop(str(path), None)

    def _roll_window(self) -> dict[str, int]:
        """Start a new window when the current one is over; the suppressed counts of the one that ended."""
        now = self.clock()
        if self._window_start is not None and now - self._window_start < self.window_s:
            return {}
        ended = {f"{event}: {kind}" if kind else event: n for (event, kind), n in self._suppressed.items()}
        self._window_start, self._logged, self._suppressed = now, {}, {}
        return ended

    def _spend(self, event: str, kind: str) -> bool:
        """Count one warning of ``(event, kind)``: True while within the budget of this window."""
        group = (event, kind)
        if group not in self._logged and len(self._logged) >= MAX_REASONS:
            group = (event, OTHER)
        logged = self._logged.get(group, 0)
        if logged < self.budget:
            self._logged[group] = logged + 1
            return True
        self._suppressed[group] = self._suppressed.get(group, 0) + 1
        return False
