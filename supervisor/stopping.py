"""Stopping the swarm: a recorded request, SIGTERM to every process group, one shared deadline, SIGKILL.

Signal handlers only call :meth:`StopSequence.request` (it records; a second request means "kill now");
the tick then calls :meth:`~StopSequence.begin` (every STARTING/RUNNING node gets SIGTERM and goes
STOPPING, a node in BACKOFF goes STOPPED) and :meth:`~StopSequence.escalate` (SIGKILL to every group still
alive once ``stop_timeout_s`` has passed, or at once after a second request). Nodes checkpoint on SIGTERM.
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Iterable

from supervisor.states import NodeState, change_state

S = NodeState


class StopSequence:
    """The stop of one supervisor: why, since when, until when; ``send(node, sig)`` signals a node's group."""

    def __init__(self, timeout_s: float, *, send: Callable[[Any, int], None], notifier: Any, log: Any):
        self.timeout_s = timeout_s
        self.send = send
        self.notifier = notifier
        self.log = log
        self.signal: int | None = None  # the stop signal recorded by a handler
        self.kill_now = False  # a second request: SIGKILL without waiting
        self.active = False
        self.reason: str | None = None
        self.deadline: float | None = None

    @property
    def pending(self) -> bool:
        """A stop was requested and the tick has not begun it yet."""
        return self.signal is not None and not self.active

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Record a stop (safe from a signal handler); a second request kills without waiting."""
        if self.signal is not None:
            self.kill_now = True
            return
        self.signal = int(signum)

    def begin(self, nodes: Iterable[Any], now: float, reason: str) -> None:
        """SIGTERM every starting or running node and start the shared deadline."""
        self.active = True
        self.reason = reason
        self.deadline = now + self.timeout_s
        self.notifier.stopping()
        self.log.info("supervisor_stopping", reason=reason, stop_timeout_s=self.timeout_s)
        for node in nodes:
            st = node.status
            if st.state in (S.STARTING, S.RUNNING):
                node.stop_requested = True
                self.send(node, signal.SIGTERM)
                change_state(st, S.STOPPING, reason=reason, now=now, log=self.log)
            elif st.state is S.BACKOFF:
                change_state(st, S.STOPPED, reason=reason, now=now, log=self.log)

    def escalate(self, nodes: Iterable[Any], now: float) -> None:
        """SIGKILL every group still alive once the shared deadline passed (or after a second request)."""
        if not (self.kill_now or (self.deadline is not None and now >= self.deadline)):
            return
        for node in nodes:
            if node.proc is not None and not node.kill_sent:
                node.kill_sent = True
                self.log.warning("node_killed", node=node.name, pid=node.proc.pid,
                                 reason="second stop request" if self.kill_now else
                                 f"still running {self.timeout_s:g} s after SIGTERM")
                self.send(node, signal.SIGKILL)
