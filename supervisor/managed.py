"""One node as the supervisor sees it, and the verdicts on it: why its process ended, whether it is hung.

:class:`ManagedNode` is a :class:`~supervisor.states.NodeStatus` plus the current process's details.
:func:`exit_info` sorts an exit (we killed it as hung, we asked it to stop, a configuration error, or
:func:`supervisor.procs.classify_exit` over the log tail of this run); :func:`hung_verdict` reads the
heartbeat clocks (no first heartbeat within ``startup_timeout_s``; no heartbeat, or no main-loop progress,
for ``heartbeat_timeout_s``). Both are pure: the tick acts on what they say.

A silent node is not always hung: heartbeats live in the local runtime dir, and when its filesystem is
full no node can write one. :class:`RuntimeDisk` tells that case apart (``os.statvfs`` free bytes below
:data:`MIN_FREE_BYTES`, or a probe write refused with ENOSPC/EDQUOT) and reports it, at most once per
:data:`DISK_REPORT_S`, as the error ``runtime_disk_full``; the tick then holds the node under the
``runtime_disk_full`` condition (:data:`supervisor.states.CONDITIONS`) instead of killing it. The price: a
node that truly hangs while the disk is full is killed only once space returns and its timeout passes.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.heartbeat import HeartbeatRecord, read_heartbeat
from supervisor import procs
from supervisor.runfiles import RuntimePaths
from supervisor.states import ExitInfo, NodeState, NodeStatus

S = NodeState
EXIT_CONFIG_ERROR = 2  # what a node returns for a configuration error (never retried)
MIN_FREE_BYTES = 64 * 1024  # below this the runtime dir's filesystem counts as full (a heartbeat is ~300 bytes)
PROBE_BYTES = 4096  # one page: what a heartbeat's temp file needs
DISK_CHECK_S = 1.0  # statvfs and the probe at most this often, however many nodes are silent
DISK_REPORT_S = 60.0  # the runtime_disk_full error at most this often while it lasts


@dataclass
class ManagedNode:
    """A node as the supervisor sees it: its :class:`NodeStatus` plus the current process's details."""

    status: NodeStatus
    proc: Any = None  # a Popen (or a test double) while a process exists
    spawn_wall: float = 0.0  # wall-clock time of the current spawn (heartbeats are wall-clock)
    stdout_offset: int = 0  # log sizes at spawn: the classification reads only this run's tail
    stderr_offset: int = 0
    nvml_pids: list[int] = field(default_factory=list)  # NSpid view of the pid, for the GPU release wait
    hung_detail: str | None = None  # set when we SIGKILLed it for silence
    stop_requested: bool = False  # we asked it to stop (SIGTERM), so its exit is not a failure
    kill_sent: bool = False  # SIGKILL sent after the stop deadline
    heartbeat: HeartbeatRecord | None = None  # the last heartbeat of the current process
    gpu_bytes: int | None = None  # None: not listed by NVML, or listed with unknown memory (gpu_unknown)
    gpu_unknown: bool = False  # on the GPU but NVML does not say how much it holds: shown as "?"
    rss_bytes: int | None = None
    cpu_percent: float | None = None
    over_budget: bool = False
    log_tail: list[str] = field(default_factory=list)  # last lines of the last failed run
    gpu_wait_since: float | None = None

    @property
    def name(self) -> str:
        return self.status.name

    @property
    def role(self) -> str:
        return self.status.role

    def begin_run(self, proc: Any, wall: float) -> None:
        """A new process for this node was spawned at ``wall``: forget everything about the previous one."""
        self.proc, self.spawn_wall = proc, wall
        self.hung_detail, self.stop_requested, self.kill_sent = None, False, False
        self.heartbeat, self.gpu_wait_since, self.over_budget = None, None, False

    def end_run(self) -> None:
        """The process was reaped: no process, no figures (the log tail and NVML pids stay)."""
        self.proc = None
        self.rss_bytes = self.cpu_percent = self.gpu_bytes = None
        self.gpu_unknown = False

    def read_heartbeat(self, path: Path) -> HeartbeatRecord | None:
        """This process's heartbeat at ``path`` (kept in :attr:`heartbeat`), or None (none yet, or a stale one)."""
        rec = read_heartbeat(path)
        if rec is not None and (rec.pid == self.proc.pid or rec.heartbeat_at >= self.spawn_wall - 1.0):
            self.heartbeat = rec
            return rec
        return None

    def run_tail(self, paths: RuntimePaths, lines: int = 20) -> str:
        """The last lines this run wrote to stderr (stdout when stderr has none)."""
        tail = procs.tail_file(paths.stderr_log(self.name), start=self.stderr_offset, lines=lines)
        if not tail.strip():
            tail = procs.tail_file(paths.stdout_log(self.name), start=self.stdout_offset, lines=lines)
        return tail


def exit_info(node: ManagedNode, rc: int, tail: str) -> ExitInfo:
    """Why the node's process ended: hung (we killed it), stopped (we asked), config error, or as it died."""
    pid = node.proc.pid
    if node.hung_detail is not None:
        info = procs.classify_exit(rc, requested_stop=False, hung=True, pid=pid)
        return dataclasses.replace(info, detail=f"hung: {node.hung_detail}; killed by the supervisor")
    if node.stop_requested:
        return procs.classify_exit(rc, requested_stop=True, pid=pid)
    if rc == EXIT_CONFIG_ERROR:
        last = _last_line(tail)
        detail = "configuration error (exit code 2)" + (f": {last}" if last else "")
        return ExitInfo(pid, rc, None, "config_error", detail)
    return procs.classify_exit(rc, requested_stop=False, log_tail=tail, pid=pid)


@dataclass(frozen=True)
class Hang:
    """Why a STARTING or RUNNING node counts as hung. ``silent``: no heartbeat (none yet, or none for two
    heartbeat intervals), which is also what a full runtime disk looks like; otherwise its heartbeat thread
    is alive and its main loop is stuck."""

    detail: str
    silent: bool


def hung_verdict(node: ManagedNode, now: float, wall: float, sv: Any) -> Hang | None:
    """Why a STARTING or RUNNING node counts as hung (``sv``: the supervisor section), or None.

    ``now`` is monotonic (start-up, conditions), ``wall`` wall-clock (heartbeats carry wall-clock times).
    No verdict while a condition holds or within the timeout after it was last seen
    (:data:`supervisor.states.CONDITIONS`): the node gets that long to beat again.
    """
    st = node.status
    timeout = sv.startup_timeout_s if st.state is S.STARTING else sv.heartbeat_timeout_s
    if st.condition_seen_at is not None and now - st.condition_seen_at <= timeout:
        return None
    if st.state is S.STARTING:
        if now - (st.started_at or now) > timeout:
            return Hang(f"no first heartbeat within startup_timeout_s={timeout:g}", silent=True)
        return None
    hb = node.heartbeat
    last_beat = max(node.spawn_wall, hb.heartbeat_at if hb else node.spawn_wall)
    if wall - last_beat > timeout:
        return Hang(f"no heartbeat for {wall - last_beat:.1f} s (heartbeat_timeout_s={timeout:g}): "
                    "the process is frozen", silent=True)
    if hb is not None and hb.status not in ("finished", "stopping") and wall - hb.progress_at > timeout:
        # The last beat may be a little newer than the last progress: when both stop (a full disk) this check
        # fires first. Beats late by two intervals make it a silence all the same.
        late = wall - last_beat > 2 * sv.heartbeat_interval_s
        return Hang(f"main loop made no progress for {wall - hb.progress_at:.1f} s in phase {hb.phase!r} "
                    f"(heartbeat_timeout_s={timeout:g})" + (", nor its heartbeat thread for "
                    f"{wall - last_beat:.1f} s" if late else " while its heartbeat thread is alive"), silent=late)
    return None


@dataclass(frozen=True)
class DiskFull:
    """The runtime dir's filesystem refuses writes: ``free_bytes`` left, and how we know (``detail``)."""

    directory: str
    free_bytes: int | None
    detail: str

    def one_line(self) -> str:
        free = f"{self.free_bytes} bytes free" if self.free_bytes is not None else "free space unknown"
        return f"runtime dir {self.directory} is full ({free}; {self.detail})"


def disk_full(directory: Path, min_free_bytes: int = MIN_FREE_BYTES) -> DiskFull | None:
    """A :class:`DiskFull` when ``directory``'s filesystem has less than ``min_free_bytes`` free or refuses a
    :data:`PROBE_BYTES` probe write with ENOSPC/EDQUOT (out of inodes, a quota); None otherwise (other
    errors too: they are not a full disk)."""
    free = None
    try:
        vfs = os.statvfs(directory)
        free = (vfs.f_bfree if os.geteuid() == 0 else vfs.f_bavail) * vfs.f_frsize  # root may use reserved blocks
    except OSError:
        pass
    if free is not None and free < min_free_bytes:
        return DiskFull(str(directory), free, f"statvfs: below {min_free_bytes} bytes")
    probe = Path(directory) / f".disk-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskFull(str(directory), free, f"a probe write failed: {os.strerror(err.errno)}")
        return None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None


class RuntimeDisk:
    """Whether the runtime dir's filesystem is full (:func:`disk_full` at most every ``check_s``), and the
    supervisor's error about it (``runtime_disk_full``, at most every ``report_s``; ``runtime_disk_ok`` when
    space returns). ``now`` is monotonic."""

    def __init__(self, directory: Path, log: Any, *, min_free_bytes: int = MIN_FREE_BYTES,
                 check_s: float = DISK_CHECK_S, report_s: float = DISK_REPORT_S):
        self.directory, self.log, self.min_free_bytes = Path(directory), log, min_free_bytes
        self.check_s, self.report_s = check_s, report_s
        self.full: DiskFull | None = None  # the last verdict
        self._checked_at: float | None = None
        self._reported_at: float | None = None

    def check(self, now: float) -> DiskFull | None:
        """The verdict as of ``now`` (cached for ``check_s``); logs ``runtime_disk_ok`` when space returned."""
        if self._checked_at is None or now - self._checked_at >= self.check_s:
            self._checked_at = now
            was, self.full = self.full, disk_full(self.directory, self.min_free_bytes)
            if was is not None and self.full is None:
                self._reported_at = None
                self.log.info("runtime_disk_ok", runtime_dir=str(self.directory),
                              detail="space returned: silent nodes get their heartbeat timeout to beat again")
        return self.full

    def report(self, now: float, nodes: list[str]) -> None:
        """The error for an operator: the dir, its free bytes, the ``nodes`` held instead of killed."""
        if self.full is None or (self._reported_at is not None and now - self._reported_at < self.report_s):
            return
        self._reported_at = now
        self.log.error("runtime_disk_full", runtime_dir=str(self.directory), free_bytes=self.full.free_bytes,
                       detail=self.full.detail, nodes=nodes,
                       action="silent nodes are not killed as hung; waiting for space (free some on this disk)")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1]
    return line if len(line) <= 300 else line[:297] + "..."
