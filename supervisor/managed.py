"""One node as the supervisor sees it, and the verdicts on it: why its process ended, whether it is hung.

:class:`ManagedNode` is a :class:`~supervisor.states.NodeStatus` plus the current process's details.
:func:`exit_info` sorts an exit (we killed it as hung, we asked it to stop, a configuration error, or
:func:`supervisor.procs.classify_exit` over the log tail of this run); :func:`hung_reason` reads the
heartbeat clocks (no first heartbeat within ``startup_timeout_s``; no heartbeat, or no main-loop progress,
for ``heartbeat_timeout_s``). Both are pure: the tick acts on what they say.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.heartbeat import HeartbeatRecord, read_heartbeat
from supervisor import procs
from supervisor.runfiles import RuntimePaths
from supervisor.states import ExitInfo, NodeState, NodeStatus

S = NodeState
EXIT_CONFIG_ERROR = 2  # what a node returns for a configuration error (never retried)


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


def hung_reason(node: ManagedNode, now: float, wall: float, sv: Any) -> str | None:
    """Why a STARTING or RUNNING node counts as hung (``sv``: the supervisor section), or None.

    ``now`` is monotonic (start-up), ``wall`` wall-clock (heartbeats carry wall-clock times).
    """
    st = node.status
    if st.state is S.STARTING:
        if now - (st.started_at or now) > sv.startup_timeout_s:
            return f"no first heartbeat within startup_timeout_s={sv.startup_timeout_s:g}"
        return None
    timeout = sv.heartbeat_timeout_s
    hb = node.heartbeat
    last_beat = max(node.spawn_wall, hb.heartbeat_at if hb else node.spawn_wall)
    if wall - last_beat > timeout:
        return f"no heartbeat for {wall - last_beat:.1f} s (heartbeat_timeout_s={timeout:g}): the process is frozen"
    if hb is not None and hb.status not in ("finished", "stopping") and wall - hb.progress_at > timeout:
        return (f"main loop made no progress for {wall - hb.progress_at:.1f} s in phase {hb.phase!r} "
                f"(heartbeat_timeout_s={timeout:g}) while its heartbeat thread is alive")
    return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1]
    return line if len(line) <= 300 else line[:297] + "..."
