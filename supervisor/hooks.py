"""``supervisor.on_event``: an operator's shell command run on ``restart``, ``fatal`` and ``finish``.

Fire and forget: ``/bin/sh -c COMMAND`` in its own session with ``SWARM_EVENT``, ``SWARM_NODE``,
``SWARM_REASON``, ``SWARM_EXPERIMENT`` and ``SWARM_RUNTIME_DIR`` set, output appended to
``logs/on_event.log``. Later ticks reap the commands (a non-zero exit is logged); at most
:data:`MAX_EVENT_COMMANDS` run at once, more are skipped with a warning; the supervisor gives running
ones a moment before it exits (:meth:`EventHooks.wait`).
"""

from __future__ import annotations

import subprocess
import time
from typing import Any, Mapping

from node.logs import rotate_if_large
from node.signing import KEY_ENV, KEY_FILE_ENV
from supervisor.runfiles import RuntimePaths
from supervisor.sdnotify import child_env

MAX_EVENT_COMMANDS = 8  # on_event commands running at once; more are skipped with a warning


class EventHooks:
    """Runs ``command`` (None or empty: nothing) for each event, in ``cwd`` with ``environ`` plus the event."""

    def __init__(self, command: str | None, *, environ: Mapping[str, str], cwd: str, paths: RuntimePaths,
                 experiment: str, log: Any):
        self.command = command
        self.environ = environ
        self.cwd = cwd
        self.paths = paths
        self.experiment = experiment
        self.log = log
        self.running: list[subprocess.Popen] = []

    def fire(self, kind: str, node: str, reason: str) -> None:
        """Start the command for one event (``kind`` restart, fatal or finish; ``node`` "" for the swarm)."""
        if not self.command:
            return
        self.reap()
        if len(self.running) >= MAX_EVENT_COMMANDS:
            self.log.warning("on_event_skipped", kind=kind, node=node, running=len(self.running))
            return
        env = child_env(self.environ)
        for secret in (KEY_ENV, KEY_FILE_ENV):  # a notification script has no business signing files
            env.pop(secret, None)
        env.update(SWARM_EVENT=kind, SWARM_NODE=node, SWARM_REASON=reason, SWARM_EXPERIMENT=self.experiment,
                   SWARM_RUNTIME_DIR=str(self.paths.root))
        try:
            self.paths.logs_dir.mkdir(parents=True, exist_ok=True)
            rotate_if_large(self.paths.events_log)
            with open(self.paths.events_log, "ab") as out:
                proc = subprocess.Popen(["/bin/sh", "-c", self.command], env=env, cwd=self.cwd,
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True, close_fds=True)
        except OSError as err:
            self.log.warning("on_event_failed", kind=kind, node=node, error=str(err))
            return
        self.running.append(proc)
        self.log.info("on_event_started", kind=kind, node=node, pid=proc.pid)

    def reap(self) -> None:
        """Forget the commands that ended, logging those that failed."""
        still = []
        for proc in self.running:
            rc = proc.poll()
            if rc is None:
                still.append(proc)
            elif rc != 0:
                self.log.warning("on_event_exit", pid=proc.pid, returncode=rc, log=str(self.paths.events_log))
        self.running = still

    def wait(self, timeout_s: float = 5.0) -> None:
        """Give running commands a moment (a finish alert) before the supervisor exits."""
        deadline = time.monotonic() + timeout_s
        for proc in self.running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log.warning("on_event_still_running", pid=proc.pid)
        self.reap()
