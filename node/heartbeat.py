"""Liveness and progress of one node, on LOCAL disk, for the supervisor.

A background thread rewrites ``<runtime_dir>/<node_id>.heartbeat.json`` every interval. The main loop
bumps a progress counter at every phase boundary (``beat.progress("generate")``). The supervisor reads
both: a stale ``heartbeat_at`` means the process is frozen (SIGSTOP, D-state); a stale ``progress_at``
with a fresh heartbeat means the main loop is stuck. Either way the node is hung.

Heartbeats live on local disk, not in the shared directory: when a Drive mount drops out, a worker keeps
training on local data and must not look hung to its supervisor. (Peers learn about each other from
``peers/<node>.json`` in the shared directory, written best-effort by the node loop.)

When that local disk is full no heartbeat can be written, nor any marker saying so: :class:`Heartbeat`
remembers the errno and since when its writes fail, and logs the start and the end of the failure once
each; the supervisor, seeing the silence, checks the disk itself (``supervisor.managed.RuntimeDisk``) and
waits instead of killing the node.

No torch here: the supervisor imports this module.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import structlog

from node.fsio import BadFile, read_capped, write_atomic
from node.schemas import HeartbeatRecord  # noqa: F401 (its home is schemas; importers use this module)
from node.strict_json import encode_json, parse_json_bytes

log = structlog.get_logger(__name__)

RUNTIME_DIR_ENV = "SWARM_RUNTIME_DIR"
HEARTBEAT_SUFFIX = ".heartbeat.json"
MAX_HEARTBEAT_BYTES = 64 * 1024


def default_runtime_dir(experiment_dir: Path) -> Path:
    """A local per-experiment directory for heartbeats, the supervisor's lock and status.

    ``$SWARM_RUNTIME_DIR`` wins; otherwise ``~/.cache/sapo-swarm/run/<name>-<hash of the absolute path>``.
    """
    if os.environ.get(RUNTIME_DIR_ENV):
        return Path(os.environ[RUNTIME_DIR_ENV])
    absolute = Path(experiment_dir).expanduser().absolute()
    digest = hashlib.sha1(str(absolute).encode()).hexdigest()[:10]
    return Path.home() / ".cache" / "sapo-swarm" / "run" / f"{absolute.name}-{digest}"


def heartbeat_path(runtime_dir: Path, node_id: str) -> Path:
    """Where ``node_id`` writes its heartbeat."""
    return Path(runtime_dir) / f"{node_id}{HEARTBEAT_SUFFIX}"


def read_heartbeat(path: Path) -> HeartbeatRecord | None:
    """The latest heartbeat at ``path``, or None when absent or unreadable (a half-written file)."""
    try:
        data, _ = read_capped(path, MAX_HEARTBEAT_BYTES)
        return HeartbeatRecord.from_json(parse_json_bytes(data))
    except (OSError, ValueError, BadFile):
        return None


class Heartbeat:
    """The node side: a daemon thread writing heartbeats; ``progress()`` called from the main loop."""

    def __init__(self, runtime_dir: Path, node_id: str, role: str, interval_s: float, *, clock=time.time):
        self.path = heartbeat_path(runtime_dir, node_id)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.node_id, self.role, self.interval_s, self.clock = node_id, role, interval_s, clock
        self._lock = threading.Lock()
        now = clock()
        self._progress, self._progress_at, self._phase = 0, now, "start"
        self._round, self._status = -1, "starting"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.write_errno: int | None = None  # errno of the failing writes (None: the last write succeeded)
        self.failing_since: float | None = None  # clock time of the first failed write in a row

    def progress(self, phase: str, *, round_: int | None = None, status: str | None = None) -> None:
        """The main loop moved on: bump the counter (and optionally the round and status)."""
        with self._lock:
            self._progress += 1
            self._progress_at = self.clock()
            self._phase = phase
            if round_ is not None:
                self._round = round_
            if status is not None:
                self._status = status
        self.write()

    def record(self) -> HeartbeatRecord:
        """The heartbeat as of now."""
        with self._lock:
            return HeartbeatRecord(
                node_id=self.node_id, role=self.role, pid=os.getpid(), heartbeat_at=self.clock(),
                progress=self._progress, progress_at=self._progress_at, phase=self._phase,
                round=self._round, status=self._status,
            )

    def write(self) -> bool:
        """Write one heartbeat now; False when it failed (the next beat retries). A failure is remembered
        (:attr:`write_errno`, :attr:`failing_since`) and logged when it begins and when it ends, not at every
        beat: on a full disk the log cannot be written either."""
        try:
            # not durable: a heartbeat lost in a power cut is harmless
            write_atomic(self.path, encode_json(self.record().to_json()), durable=False)
        except (OSError, ValueError) as err:  # ValueError: a non-finite number from an injected clock
            self._failed(getattr(err, "errno", None) or 0, str(err))
            return False
        self._succeeded()
        return True

    def _failed(self, code: int, error: str) -> None:
        with self._lock:
            first = self.failing_since is None
            if first:
                self.failing_since = self.clock()
            self.write_errno = code
        if first:
            _log_quietly(log.warning, "heartbeat_write_failed", path=str(self.path), errno=code, error=error,
                         detail="the supervisor sees a silent node; it waits if the runtime disk is full")

    def _succeeded(self) -> None:
        with self._lock:
            since, self.failing_since, self.write_errno = self.failing_since, None, None
        if since is not None:
            _log_quietly(log.info, "heartbeat_write_recovered", path=str(self.path),
                         failed_for_s=round(self.clock() - since, 3))

    def start(self) -> "Heartbeat":
        """Start the background thread (idempotent). Starting counts as progress: the set-up before it
        (model loading) may have taken longer than the hang timeout and must not look like a stuck loop."""
        if self._thread is None:
            with self._lock:
                self._progress_at = self.clock()
            self.write()
            self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.node_id}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and write a last heartbeat. A node that never started heartbeating (it failed
        while loading its model) writes none: its supervisor must see a failure before the first heartbeat,
        which is what makes a crash loop at start-up a configuration error instead of endless restarts."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 1)
            self.write()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.write()


def _log_quietly(emit, event: str, **fields) -> None:
    """Log, never raise: on a full disk the log's own write may fail too (structlog's default logger prints to
    stdout, which the supervisor captures on that disk), and a heartbeat must not crash the loop calling it."""
    try:
        emit(event, **fields)
    except (OSError, ValueError):
        pass
