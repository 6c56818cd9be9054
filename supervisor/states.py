"""Node lifecycle states, exit descriptions and the restart policy (stdlib only).

Every node (the coordinator and each worker) is in exactly one :class:`NodeState`. Every transition
goes through :func:`change_state`, which refuses a transition whose predecessor is not allowed
(:data:`ALLOWED`) and logs a ``node_state_changed`` event. A STARTING or RUNNING node may also be under
one :data:`CONDITIONS` entry, a circumstance the supervisor waits out instead of acting on (changed only
through :func:`set_condition`, which logs ``node_condition``). The policy (:class:`RestartPolicy`) is pure
arithmetic over a :class:`NodeStatus` and a monotonic ``now``: it never sleeps, spawns or reads a clock,
so the monitor loop and its tests drive it with scripted times.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable, Protocol


class NodeState(str, Enum):
    """Where a node is in its life (names borrowed from supervisord).

    ::

        STOPPED ──spawn──▶ STARTING ──first heartbeat──▶ RUNNING ──exit 0──▶ EXITED
           ▲                 ▲   │                          │
           │           delay │   └─crash / no heartbeat─┐   └─crash / hang─┐
           │          passed │                          ▼                  ▼
           │                 └──────────────────────── BACKOFF ◀───────────┘
           │                                              │
           │                                              └──too many failures──▶ FATAL
           └──reaped── STOPPING ◀──stop── STARTING, RUNNING

        also: STARTING ─exit 0─▶ EXITED            (finished before any heartbeat)
              STOPPING ─killed─▶ BACKOFF           (a hung node killed to be restarted)
              BACKOFF ──stop──▶ STOPPED            (stop requested while waiting)
              STARTING, RUNNING, STOPPING ─▶ FATAL (gave up as it exited)
              STOPPED, BACKOFF ──▶ FATAL         (could not be spawned at all: a configuration error)
              EXITED, FATAL ──explicit restart──▶ STARTING

    Predecessors, the source of truth (:data:`ALLOWED`)::

        STARTING ◀ STOPPED, BACKOFF, EXITED, FATAL     RUNNING  ◀ STARTING
        BACKOFF  ◀ STARTING, RUNNING, STOPPING         STOPPING ◀ STARTING, RUNNING
        STOPPED  ◀ STOPPING, BACKOFF                   EXITED   ◀ STARTING, RUNNING
        FATAL    ◀ STOPPED, STARTING, RUNNING, STOPPING, BACKOFF

    When a STOPPED or BACKOFF node is spawned depends on ``supervisor.stagger`` too
    (:data:`STAGGER_POLICIES`, :func:`spawn_held_by`): at once (``none``, the CPU's default), or once the
    start-up before it is far enough (``heartbeat``: its first heartbeat; ``loaded``, a GPU's default: a
    starting worker's model load, which its first heartbeat marks).

    STOPPED: not running, not wanted (initial, or after a requested stop).
    STARTING: spawned, no heartbeat yet. RUNNING: heartbeating.
    BACKOFF: failed, waiting ``backoff_until`` before the next spawn.
    STOPPING: SIGTERM/SIGKILL sent to its process group, waiting for the exit.
    EXITED: finished normally (exit 0, e.g. after ``max_rounds``); not restarted.
    FATAL: gave up (too many failures in the window, or a configuration error); not restarted.

    Conditions (:data:`CONDITIONS`, ``NodeStatus.condition``) qualify STARTING and RUNNING without
    changing the state: ``RUNNING [runtime_disk_full]`` is a running node whose silence is excused.
    """

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"

    def __str__(self) -> str:
        return self.value


S = NodeState

# A process exists (or may still exist) in these states.
RUNNING_STATES: frozenset[NodeState] = frozenset({S.STARTING, S.RUNNING, S.STOPPING})
# No process exists in these states.
STOPPED_STATES: frozenset[NodeState] = frozenset({S.STOPPED, S.BACKOFF, S.EXITED, S.FATAL})
# The supervisor will not spawn the node again on its own.
TERMINAL_STATES: frozenset[NodeState] = frozenset({S.EXITED, S.FATAL})

# new state -> the states it may be entered from.
ALLOWED: dict[NodeState, frozenset[NodeState]] = {
    S.STARTING: frozenset({S.STOPPED, S.BACKOFF, S.EXITED, S.FATAL}),
    S.RUNNING: frozenset({S.STARTING}),
    S.BACKOFF: frozenset({S.STARTING, S.RUNNING, S.STOPPING}),
    S.STOPPING: frozenset({S.STARTING, S.RUNNING}),
    S.STOPPED: frozenset({S.STOPPING, S.BACKOFF}),
    S.EXITED: frozenset({S.STARTING, S.RUNNING}),
    S.FATAL: frozenset({S.STOPPED, S.STARTING, S.RUNNING, S.STOPPING, S.BACKOFF}),
}

EXIT_REASONS: tuple[str, ...] = (
    "exited",  # ordinary exit with a code (0 = finished)
    "signal",  # killed by a signal we did not send (other than an unrequested SIGKILL)
    "oom_killed_host",  # SIGKILL not sent by the supervisor: likely the host OOM killer
    "cuda_oom",  # "CUDA out of memory" in the log tail
    "transport_disconnected",  # "Transport endpoint is not connected" (a dropped FUSE/Drive mount)
    "hung",  # no heartbeat for heartbeat_timeout_s: the supervisor killed it
    "stopped",  # the supervisor asked it to stop
    "config_error",  # could not be spawned at all (missing executable, bad cwd, ...), or exit code 2
)


# Conditions of a STARTING or RUNNING node: circumstances the supervisor waits out instead of acting on.
# A node is judged hung neither while one holds nor within its timeout (heartbeat_timeout_s, or
# startup_timeout_s while STARTING) after it was last seen (NodeStatus.condition_seen_at).
CONDITIONS: dict[str, str] = {
    "runtime_disk_full": "the runtime dir's filesystem is full: the node cannot write its heartbeat, so its "
                         "silence is not a hang; it is not killed, and beats again once space returns",
}
CONDITION_STATES: frozenset[NodeState] = frozenset({S.STARTING, S.RUNNING})


# How start-ups are spread out (``supervisor.stagger``; :func:`resolve_stagger` turns ``auto`` into one of
# these). Staggering exists for GPU memory: CUDA contexts and weights arriving on one device at once spike past
# the plan. On the CPU the start-ups share only the cores, and waiting costs each worker's whole start-up.
STAGGER_POLICIES: dict[str, str] = {
    "none": "every node is spawned at once (restarts too: no start-up waits for another)",
    "heartbeat": "one start-up at a time: the next node once the one STARTING sent its first heartbeat or gave up",
    "loaded": "the next worker once no worker is still loading its model: a worker's first heartbeat (phase "
              "'loaded') comes right after its model load; the coordinator loads no model and holds no one back",
}


def resolve_stagger(configured: str, device: str) -> str:
    """The policy for ``supervisor.stagger`` on ``device`` (``cpu``/``cuda``): ``auto`` is ``none`` on the CPU
    and ``loaded`` on a GPU. ValueError for a name not in :data:`STAGGER_POLICIES`."""
    if configured == "auto":
        return "loaded" if device == "cuda" else "none"
    if configured not in STAGGER_POLICIES:
        raise ValueError(f"unknown stagger policy {configured!r}; allowed: auto, {', '.join(STAGGER_POLICIES)}")
    return configured


def spawn_held_by(policy: str, nodes: Iterable[NodeStatus]) -> str | None:
    """The node whose start-up holds back the next spawn under ``policy`` (see :data:`STAGGER_POLICIES`), or
    None when a node may be spawned now. Pure: the tick asks before every spawn."""
    if policy not in STAGGER_POLICIES:
        raise ValueError(f"unknown stagger policy {policy!r}; allowed: {', '.join(STAGGER_POLICIES)}")
    for st in nodes:
        if st.state is not S.STARTING:
            continue
        if policy == "heartbeat" or (policy == "loaded" and st.role == "worker" and not st.first_heartbeat_seen):
            return st.name
    return None


class IllegalTransition(RuntimeError):
    """A state change whose predecessor is not in :data:`ALLOWED` (a bug in the monitor loop)."""


class EventLog(Protocol):
    """What :func:`change_state` needs of a logger (a structlog BoundLogger fits)."""

    def info(self, event: str, **kw: Any) -> Any: ...

    def warning(self, event: str, **kw: Any) -> Any: ...


@dataclass(frozen=True)
class ExitInfo:
    """How one process ended: the values behind a one-line explanation."""

    pid: int | None
    returncode: int | None
    signal: str | None  # e.g. "SIGKILL" when the process died of a signal
    reason: str  # one of EXIT_REASONS
    detail: str = ""

    def __post_init__(self):
        if self.reason not in EXIT_REASONS:
            raise ValueError(f"unknown exit reason {self.reason!r}; allowed: {', '.join(EXIT_REASONS)}")

    @property
    def finished(self) -> bool:
        """A normal, unrequested exit with code 0: the node is done."""
        return self.reason == "exited" and self.returncode == 0

    @property
    def is_failure(self) -> bool:
        """Counts toward backoff and FATAL: anything but a finish or a stop we asked for."""
        return not self.finished and self.reason != "stopped"

    def one_line(self) -> str:
        """E.g. ``pid 4242 killed by SIGKILL [oom_killed_host]: SIGKILL not sent by the supervisor: ...``."""
        if self.signal:
            how = f"killed by {self.signal}"
        elif self.returncode is None:
            how = "did not start"
        else:
            how = f"exit code {self.returncode}"
        who = f"pid {self.pid} " if self.pid is not None else ""
        text = f"{who}{how} [{self.reason}]"
        return f"{text}: {self.detail}" if self.detail else text

    def to_dict(self) -> dict:
        return {"pid": self.pid, "returncode": self.returncode, "signal": self.signal,
                "reason": self.reason, "detail": self.detail}


@dataclass
class Transition:
    """One recorded state change (kept in ``NodeStatus.transitions`` for `swarm status`)."""

    at: float
    old: NodeState
    new: NodeState
    reason: str


@dataclass
class NodeStatus:
    """Everything the supervisor knows about one node; mutated only by the monitor loop."""

    name: str
    role: str  # "coordinator" or "worker"
    state: NodeState = S.STOPPED
    pid: int | None = None
    restarts: int = 0  # spawns after a failure
    backoff_attempt: int = 0  # failures since the last stable run; drives backoff_delay
    consecutive_startup_failures: int = 0  # failures in a row before any first heartbeat
    last_exit: ExitInfo | None = None
    backoff_until: float | None = None  # monotonic time of the next spawn (BACKOFF only)
    started_at: float | None = None  # monotonic time of the current/last spawn
    state_since: float = 0.0  # monotonic time of the last transition
    first_heartbeat_seen: bool = False
    fatal_reason: str | None = None
    condition: str | None = None  # one of CONDITIONS, STARTING/RUNNING only (set_condition)
    condition_seen_at: float | None = None  # monotonic time a condition was last seen to hold (this run)
    failure_times: deque = field(default_factory=lambda: deque(maxlen=256))  # monotonic, oldest first
    transitions: deque = field(default_factory=lambda: deque(maxlen=32))

    def mark_spawned(self, pid: int, now: float) -> None:
        """A new process for this node exists: reset the per-run fields (call before → STARTING)."""
        self.pid = pid
        self.started_at = now
        self.first_heartbeat_seen = False
        self.backoff_until = None
        self.condition = self.condition_seen_at = None

    def mark_heartbeat(self) -> None:
        """The node's first (or any) heartbeat: start-up succeeded (call before STARTING → RUNNING)."""
        self.first_heartbeat_seen = True
        self.consecutive_startup_failures = 0

    def uptime(self, now: float) -> float:
        if self.started_at is None or self.state not in RUNNING_STATES:
            return 0.0
        return max(0.0, now - self.started_at)

    def to_dict(self, now: float) -> dict:
        """JSON-ready snapshot for the status file (times as ages relative to ``now``)."""
        return {
            "name": self.name,
            "role": self.role,
            "state": self.state.value,
            "pid": self.pid,
            "restarts": self.restarts,
            "consecutive_startup_failures": self.consecutive_startup_failures,
            "uptime_s": round(self.uptime(now), 3),
            "in_state_s": round(max(0.0, now - self.state_since), 3),
            "backoff_left_s": (round(max(0.0, self.backoff_until - now), 3)
                               if self.backoff_until is not None and self.state is S.BACKOFF else None),
            "first_heartbeat_seen": self.first_heartbeat_seen,
            "last_exit": self.last_exit.to_dict() if self.last_exit else None,
            "last_exit_line": self.last_exit.one_line() if self.last_exit else None,
            "fatal_reason": self.fatal_reason,
            "condition": self.condition,
        }


def change_state(status: NodeStatus, new: NodeState, *, reason: str, now: float,
                 log: EventLog | None) -> None:
    """Move ``status`` to ``new``: the one place every transition goes through.

    Raises :class:`IllegalTransition` when ``status.state`` is not an allowed predecessor of ``new``
    (a self-transition is illegal too). Records the transition and logs ``node_state_changed``
    (at warning level for BACKOFF and FATAL). Leaving STARTING/RUNNING ends any condition.
    """
    new = NodeState(new)
    old = status.state
    if old not in ALLOWED[new]:
        raise IllegalTransition(
            f"{status.name}: {old.value} -> {new.value} is not allowed "
            f"(allowed from: {', '.join(sorted(s.value for s in ALLOWED[new]))}); reason was {reason!r}")
    status.state = new
    status.state_since = now
    status.transitions.append(Transition(now, old, new, reason))
    if new is not S.BACKOFF:
        status.backoff_until = None
    if new not in CONDITION_STATES:
        status.condition = None
    if log is not None:
        emit = log.warning if new in (S.BACKOFF, S.FATAL) else log.info
        emit("node_state_changed", node=status.name, role=status.role, old=old.value, new=new.value,
             reason=reason, pid=status.pid, restarts=status.restarts)


def set_condition(status: NodeStatus, condition: str | None, *, reason: str, now: float,
                  log: EventLog | None) -> None:
    """Put ``status`` under ``condition`` (None: end it), seen at ``now``: the one place conditions change.

    Raises ValueError for a condition not in :data:`CONDITIONS` or a node not STARTING/RUNNING. Logs
    ``node_condition`` when the condition changes (warning when one begins, info when it ends); seeing the
    same one again only moves ``condition_seen_at``.
    """
    if condition is not None:
        if condition not in CONDITIONS:
            raise ValueError(f"unknown condition {condition!r}; allowed: {', '.join(CONDITIONS)}")
        if status.state not in CONDITION_STATES:
            raise ValueError(f"{status.name} is {status.state.value}: conditions qualify STARTING and RUNNING only")
        status.condition_seen_at = now
    old, status.condition = status.condition, condition
    if log is not None and old != condition:
        emit = log.warning if condition is not None else log.info
        emit("node_condition", node=status.name, role=status.role, state=status.state.value, condition=condition,
             previous=old, reason=reason, pid=status.pid)


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a failed node and when to give up (capped exponential backoff)."""

    backoff_initial_s: float = 2.0
    backoff_max_s: float = 120.0
    stable_after_s: float = 300.0
    max_restarts: int = 10
    restart_window_s: float = 3600.0
    startup_failures_fatal: int = 3

    def __post_init__(self):
        if self.backoff_initial_s < 0 or self.backoff_max_s < 0:
            raise ValueError("backoff delays must be >= 0")
        if self.max_restarts < 0 or self.startup_failures_fatal < 1:
            raise ValueError("max_restarts must be >= 0 and startup_failures_fatal >= 1")
        if self.stable_after_s <= 0 or self.restart_window_s <= 0:
            raise ValueError("stable_after_s and restart_window_s must be > 0")

    @classmethod
    def from_section(cls, section: Any) -> "RestartPolicy":
        """From a ``node.config.SupervisorSection`` (duck-typed: this module stays stdlib-only)."""
        return cls(**{name: getattr(section, name) for name in cls.__dataclass_fields__})

    def backoff_delay(self, attempt: int) -> float:
        """Delay before restart number ``attempt`` (1-based): initial · 2^(attempt−1), capped."""
        attempt = max(1, int(attempt))
        if attempt > 64:  # 2**63 × anything positive is past any sane cap
            return float(self.backoff_max_s)
        return float(min(self.backoff_max_s, self.backoff_initial_s * math.pow(2.0, attempt - 1)))

    def failures_in_window(self, status: NodeStatus, now: float) -> int:
        return sum(1 for t in status.failure_times if now - t <= self.restart_window_s)

    def record_failure(self, status: NodeStatus, info: ExitInfo, now: float) -> None:
        """Book a failed exit: last_exit, failure time, backoff attempt, start-up failure count.

        A run that lasted ``stable_after_s`` resets the backoff first (the next delay is the initial
        one again). A finish or a requested stop only sets ``last_exit``.
        """
        status.last_exit = info
        if not info.is_failure:
            return
        if status.started_at is not None and now - status.started_at >= self.stable_after_s:
            status.backoff_attempt = 0
        status.backoff_attempt += 1
        status.failure_times.append(now)
        while status.failure_times and now - status.failure_times[0] > self.restart_window_s:
            status.failure_times.popleft()
        if status.first_heartbeat_seen:
            status.consecutive_startup_failures = 0
        else:
            status.consecutive_startup_failures += 1

    def reset_if_stable(self, status: NodeStatus, now: float) -> bool:
        """Forget the backoff of a node RUNNING for ``stable_after_s``; True when it reset something."""
        if (status.state is S.RUNNING and status.started_at is not None
                and now - status.started_at >= self.stable_after_s and status.backoff_attempt):
            status.backoff_attempt = 0
            return True
        return False

    def next_start(self, status: NodeStatus, now: float) -> float:
        """Monotonic time of the next spawn after the failure just recorded."""
        return now + self.backoff_delay(status.backoff_attempt)

    def should_give_up(self, status: NodeStatus, now: float) -> str | None:
        """Why the node should be FATAL now, or None to keep restarting it."""
        last = f"; last exit: {status.last_exit.one_line()}" if status.last_exit else ""
        n = status.consecutive_startup_failures
        if n >= self.startup_failures_fatal:
            return (f"configuration error: {status.name} failed {n} times before its first heartbeat"
                    f" (startup_failures_fatal={self.startup_failures_fatal}){last}")
        count = self.failures_in_window(status, now)
        if count > self.max_restarts:
            return (f"{status.name} failed {count} times in the last {self.restart_window_s:g} s "
                    f"(max_restarts={self.max_restarts}){last}")
        return None
