"""The status over time: ``swarm status`` (once, ``--json``, ``--watch``) and ``swarm launch``'s live table.

On a terminal the table is redrawn in place with ``rich.live`` (the last frame stays on screen when it
ends); otherwise ``--watch`` prints one plain snapshot per second, separated by a blank line, with no
cursor or colour codes. The foreground launch collects the supervisor's recent log lines in a ring
(:class:`RingHandler`) to list under the table.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from typing import Callable

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from supervisor.daemon import Supervisor
from supervisor.runfiles import RuntimePaths, running_supervisor
from supervisor.status import read_status
from supervisor.statusview import render_status, status_renderable

EXIT_NOT_RUNNING = 3
LAUNCH_FOOTER = "Ctrl-C: stop gracefully (twice: kill)   logs: swarm logs CONFIG -f"


class RingHandler(logging.Handler):
    """Keeps the last formatted lines for the live display."""

    def __init__(self, ring: deque):
        super().__init__()
        self.ring = ring

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.ring.append(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class LiveTable:
    """A renderable redrawn in place on ``console``, at most once per ``interval`` seconds unless forced."""

    def __init__(self, console: Console, interval: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.live = Live(console=console, auto_refresh=False, vertical_overflow="ellipsis")
        self.interval, self.clock = interval, clock
        self._last: float | None = None

    def __enter__(self) -> "LiveTable":
        self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        self.live.stop()

    def due(self) -> bool:
        return self._last is None or self.clock() - self._last >= self.interval

    def show(self, renderable: RenderableType) -> None:
        self._last = self.clock()
        self.live.update(renderable, refresh=True)


def run_live(sup: Supervisor, console: Console, ring: deque) -> int:
    """Run the supervisor with its status table redrawn every second; its exit code."""

    def on_tick(s: Supervisor) -> None:
        if table.due() or s.exit_code is not None:
            view = status_renderable(s.snapshot(), running_pid=os.getpid(), runtime_dir=s.paths.root,
                                     experiment=s.config.experiment.name, recent=list(ring)[-6:])
            table.show(Group(view, Text(LAUNCH_FOOTER, style="dim")))

    with LiveTable(console) as table:
        return sup.run(on_tick=on_tick, tick_interval=1.0)


def show_status(paths: RuntimePaths, experiment: str, *, as_json: bool, watch: bool,
                console: Console | None) -> int:
    """``swarm status``: 0 when a supervisor runs, 3 when none does; ``watch`` redraws until Ctrl-C (0)."""
    if console is not None and watch and not as_json:
        return _watch_live(paths, experiment, console)
    while True:
        pid, st = running_supervisor(paths), read_status(paths)
        if as_json:
            print(json.dumps({"running": pid is not None, "supervisor_pid": pid, "runtime_dir": str(paths.root),
                              "experiment": experiment, "status": st}, indent=1), flush=True)
        elif console is not None:
            console.print(status_renderable(st, running_pid=pid, runtime_dir=paths.root, experiment=experiment))
        else:
            print(render_status(st, running_pid=pid, runtime_dir=paths.root, experiment=experiment), flush=True)
        if not watch:
            return 0 if pid is not None else EXIT_NOT_RUNNING
        try:
            time.sleep(1.0)
        except KeyboardInterrupt:
            return 0
        if not as_json:
            print(flush=True)  # a blank line between plain snapshots


def _watch_live(paths: RuntimePaths, experiment: str, console: Console) -> int:
    try:
        with LiveTable(console) as table:
            while True:
                st = read_status(paths)
                table.show(status_renderable(st, running_pid=running_supervisor(paths), runtime_dir=paths.root,
                                             experiment=experiment))
                time.sleep(1.0)
    except KeyboardInterrupt:
        return 0

