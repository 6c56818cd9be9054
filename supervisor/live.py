"""The status over time: ``swarm status`` (once, ``--json``, ``--watch``) and ``swarm launch``'s live table.

``swarm status`` shows this host's supervisor (its ``status.json``) and, under it, every node of the
experiment found in the shared dir (:class:`SwarmSource`): the running supervisor's own scan when its
status is fresh (ages by this host's clock), else a scan of ours (in ``--watch`` one scan object across
frames, so records seen changing get ages by our clock too).

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
from pathlib import Path
from typing import Callable

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from node.layout import ExperimentLayout
from node.logs import configure_logging
from supervisor.daemon import Supervisor
from supervisor.runfiles import RuntimePaths, running_supervisor
from supervisor.status import SwarmScan, read_status, swarm_store, with_ages
from supervisor.statusview import STALE_STATUS_S, render_status, status_renderable
from supervisor.terminal import finite_number

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


class SwarmSource:
    """Every node of the experiment for ``swarm status``: the running supervisor's scan in a fresh
    ``status.json``, else our own :class:`SwarmScan` of ``config``'s experiment dir (without ``config``, the
    dir a status.json names), its key looked up as a node does (``key_file``, environment, runtime dir)."""

    def __init__(self, paths: RuntimePaths, config=None, key_file: str | None = None):
        self.paths, self.config, self.key_file = paths, config, key_file
        self._scan: SwarmScan | None = None

    def section(self, pid: int | None, st: dict | None, now: float | None = None) -> dict | None:
        """The swarm section to show (None: no experiment dir known)."""
        now = time.time() if now is None else now
        updated = finite_number((st or {}).get("updated_at"))
        if pid is not None and isinstance((st or {}).get("swarm"), dict) and updated is not None \
                and now - updated <= STALE_STATUS_S:
            return st["swarm"]
        scan = self._scanner(st)
        return scan.scan() if scan is not None else None

    def _scanner(self, st: dict | None) -> SwarmScan | None:
        if self._scan is None:
            if self.config is not None:
                layout, required = ExperimentLayout.from_config(self.config), self.config.exchange.require_signatures
                first = ["coordinator", *(f"worker_{i}" for i in range(1, self.config.supervisor.workers + 1))]
            elif isinstance((st or {}).get("experiment_dir"), str) and "\x00" not in st["experiment_dir"]:
                layout, required, first = ExperimentLayout(Path(st["experiment_dir"])), True, list((st.get("nodes") or {}))
            else:
                return None
            store, note = swarm_store(layout, self.paths.root, key_file=self.key_file, required=required)
            self._scan = SwarmScan(store, key_note=note, first=[str(n) for n in first])
        return self._scan


def show_status(paths: RuntimePaths, experiment: str, *, as_json: bool, watch: bool,
                console: Console | None, config=None, key_file: str | None = None) -> int:
    """``swarm status``: 0 when a supervisor runs, 3 when none does; ``watch`` redraws until Ctrl-C (0).
    ``config`` (the experiment's) lets it list the whole swarm from the shared dir even where no supervisor
    ever ran; ``key_file``: the experiment key, when not in the environment or the runtime dir."""
    # A refused peer file or a flaky mount is shown in the swarm's notes; the store's log lines go nowhere
    # (unconfigured, structlog would print them into this command's stdout, --json included).
    configure_logging(None, console="none", handlers=(logging.NullHandler(),))
    swarm = SwarmSource(paths, config, key_file)
    if console is not None and watch and not as_json:
        return _watch_live(paths, experiment, console, swarm)
    while True:
        pid, st = running_supervisor(paths), read_status(paths)
        section, now = swarm.section(pid, st), time.time()
        if as_json:
            print(json.dumps({"running": pid is not None, "supervisor_pid": pid, "runtime_dir": str(paths.root),
                              "experiment": experiment, "status": st, "swarm": with_ages(section, now)}, indent=1),
                  flush=True)
        elif console is not None:
            console.print(status_renderable(st, running_pid=pid, runtime_dir=paths.root, experiment=experiment,
                                            swarm=section, now=now))
        else:
            print(render_status(st, running_pid=pid, runtime_dir=paths.root, experiment=experiment, swarm=section,
                                now=now), flush=True)
        if not watch:
            return 0 if pid is not None else EXIT_NOT_RUNNING
        try:
            time.sleep(1.0)
        except KeyboardInterrupt:
            return 0
        if not as_json:
            print(flush=True)  # a blank line between plain snapshots


def _watch_live(paths: RuntimePaths, experiment: str, console: Console, swarm: SwarmSource) -> int:
    try:
        with LiveTable(console) as table:
            while True:
                pid, st = running_supervisor(paths), read_status(paths)
                table.show(status_renderable(st, running_pid=pid, runtime_dir=paths.root, experiment=experiment,
                                             swarm=swarm.section(pid, st)))
                time.sleep(1.0)
    except KeyboardInterrupt:
        return 0
