"""The supervisor's local runtime dir: its file names, the one-supervisor lock and pid file, atomic writes.

The runtime dir is ``node.heartbeat.default_runtime_dir`` of the experiment (``$SWARM_RUNTIME_DIR`` wins;
a joining host's gets ``-join-<host>`` appended): local disk, never the shared dir. It holds
``supervisor.lock`` (held while a supervisor runs), ``supervisor.pid`` (its pid and process start time, so a
reused pid is not taken for it), ``status.json``, the nodes' heartbeats and every log. Stdlib, filelock and psutil only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import psutil

from node.fsio import write_atomic
from node.heartbeat import RUNTIME_DIR_ENV, default_runtime_dir, heartbeat_path
from supervisor import procs


class AlreadyRunning(RuntimeError):
    """A second supervisor for one experiment: the lock is held by ``pid``."""

    def __init__(self, pid: int | None, runtime_dir: Path):
        self.pid = pid
        self.runtime_dir = runtime_dir
        who = f"pid {pid}" if pid else "another process (pid unknown)"
        super().__init__(f"a supervisor is already running for this experiment: {who} "
                         f"(lock {runtime_dir / 'supervisor.lock'}); stop it with `swarm stop CONFIG`")


@dataclass(frozen=True)
class RuntimePaths:
    """Files of the local runtime dir (never the shared dir): lock, pid, status, logs, heartbeats."""

    root: Path

    @classmethod
    def for_config(cls, config, host: str | None = None) -> "RuntimePaths":
        """``node.heartbeat.default_runtime_dir`` of the experiment (``$SWARM_RUNTIME_DIR`` wins); on a joining
        ``host`` that directory's name plus ``-join-<host>``: its own lock, key and logs, so a joiner and the
        first host (or two joiners) can run on one machine."""
        if host is None or os.environ.get(RUNTIME_DIR_ENV):
            return cls(Path(default_runtime_dir(config.experiment_dir)))
        first = Path(default_runtime_dir(config.experiment_dir))
        return cls(first.with_name(f"{first.name}-join-{host}"))

    @property
    def lock(self) -> Path:
        return self.root / "supervisor.lock"

    @property
    def pid_file(self) -> Path:
        return self.root / "supervisor.pid"

    @property
    def status_file(self) -> Path:
        return self.root / "status.json"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def supervisor_log(self) -> Path:
        """The supervisor's own JSON log (one event per line)."""
        return self.logs_dir / "supervisor.log"

    @property
    def detached_output(self) -> Path:
        """stdout/stderr of a ``--detach``-ed supervisor (tracebacks end up here)."""
        return self.logs_dir / "supervisor.out"

    @property
    def events_log(self) -> Path:
        """Output of the ``on_event`` commands."""
        return self.logs_dir / "on_event.log"

    def stdout_log(self, node_id: str) -> Path:
        return self.logs_dir / f"{node_id}.stdout.log"

    def stderr_log(self, node_id: str) -> Path:
        return self.logs_dir / f"{node_id}.stderr.log"

    def node_log(self, node_id: str) -> Path:
        """The node's own structured log (written by the node, not by us)."""
        return self.logs_dir / f"{node_id}.log"

    def heartbeat(self, node_id: str) -> Path:
        return heartbeat_path(self.root, node_id)


def write_text_atomic(path: Path, text: str) -> None:
    """node.fsio's one atomic write (temp file, os.replace), not durable: a runtime file lost in a power cut
    is rewritten at the next tick."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode("utf-8"), durable=False)


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON through :func:`write_text_atomic`."""
    write_text_atomic(path, json.dumps(obj, indent=1, default=str) + "\n")


def read_pid_file(path: Path) -> tuple[int, float | None] | None:
    """(pid, process create time or None) from ``supervisor.pid``, or None when absent or garbled."""
    try:
        parts = path.read_text(encoding="ascii", errors="replace").split()
    except OSError:
        return None
    try:
        pid = int(parts[0])
    except (IndexError, ValueError):
        return None
    try:
        created = float(parts[1]) if len(parts) > 1 else None
    except ValueError:
        created = None
    return pid, created


def running_supervisor(paths: RuntimePaths) -> int | None:
    """The pid of the live supervisor of this runtime dir, or None (no pid file, dead, or a reused pid)."""
    found = read_pid_file(paths.pid_file)
    if found is None:
        return None
    pid, created = found
    if not procs.is_alive(pid):
        return None
    if created is not None:
        try:
            if abs(psutil.Process(pid).create_time() - created) > 1.0:
                return None  # the pid was reused by an unrelated process (e.g. after a reboot)
        except psutil.Error:
            return None
    return pid


class SupervisorLock:
    """One supervisor per experiment: ``supervisor.lock`` held while it runs, ``supervisor.pid`` naming it."""

    def __init__(self, paths: RuntimePaths):
        self.paths = paths
        self._lock: filelock.BaseFileLock | None = None

    def acquire(self) -> None:
        """Take the lock and write the pid file, or raise :class:`AlreadyRunning` naming the holder."""
        self.paths.root.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.paths.lock))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            found = read_pid_file(self.paths.pid_file)
            raise AlreadyRunning(found[0] if found else None, self.paths.root) from None
        self._lock = lock
        try:
            created = psutil.Process().create_time()
        except psutil.Error:
            created = 0.0
        write_text_atomic(self.paths.pid_file, f"{os.getpid()}\n{created:.3f}\n")

    def release(self) -> None:
        """Remove our pid file (not a successor's) and release the lock; a no-op when not held."""
        if self._lock is None:
            return
        found = read_pid_file(self.paths.pid_file)
        if found and found[0] == os.getpid():
            try:
                self.paths.pid_file.unlink()
            except OSError:
                pass
        self._lock.release()
        self._lock = None
