"""One warning per bad file version (DESIGN.md §3: "a bad file is skipped with one warning per file").

A node polls the shared directory every fraction of a second; a hostile or broken peer file would
otherwise fill the log. A file is identified by its path, a version by a signature the caller chooses
(mtime, size, inode; or the errno that refused it): a new version warns again, the same one never does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

DEFAULT_CAP = 4096


class WarnOnce:
    """Remembers the last warned signature of up to ``cap`` paths (least recently warned forgotten first)."""

    def __init__(self, cap: int = DEFAULT_CAP):
        self.cap = cap
        self._warned: OrderedDict[str, tuple] = OrderedDict()
        self._mutex = threading.Lock()

    def __call__(self, path: Path | str, signature: tuple, event: str, **fields) -> None:
        """Log ``event`` at warning level for ``path`` unless this signature of it was the last warned."""
        key = str(path)
        with self._mutex:
            if self._warned.get(key) == signature:
                self._warned.move_to_end(key)
                return
            self._warned[key] = signature
            self._warned.move_to_end(key)
            while len(self._warned) > self.cap:
                self._warned.popitem(last=False)
        log.warning(event, path=key, **fields)

    def clear(self, path: Path | str) -> None:
        """``path`` is fine again: its next problem warns even when it looks like the last one."""
        if self._warned:
            with self._mutex:
                self._warned.pop(str(path), None)
