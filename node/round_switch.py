"""Round switch latency: from the last round result written to every worker having started the next round.

The swarm's own cost per round is the switch: the coordinator noticing that the last live worker submitted
(``detect``), writing the next state, and every worker noticing it and starting the round (``start``). With
2000 rounds of ~1 s each, every 100 ms of switch costs 10 % of the run, so it is measured every round.

Times: a result's ``submitted_at`` and the ``heartbeat_at`` of the first peer record a worker writes when it
starts a round (it forces one at the start) are the writers' clocks; the advance is the coordinator's. On one
host these are the same clock; across hosts the figure includes their skew (issue: more hosts).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PendingSwitch:
    """A round that started, waiting for every expected worker to start it."""

    round: int
    reason: str
    last_result_at: float | None  # the newest result of the previous round (None: advanced on a timer)
    advanced_at: float
    expected: frozenset[str]
    started: dict[str, float] = field(default_factory=dict)

    def observe(self, worker: str, record_round: int, heartbeat_at: float) -> None:
        """A worker's peer record says it is in ``record_round`` (as of ``heartbeat_at``)."""
        if worker in self.expected and worker not in self.started and record_round >= self.round:
            self.started[worker] = heartbeat_at

    @property
    def complete(self) -> bool:
        return set(self.started) >= self.expected

    def line(self) -> dict:
        """The round_switches.jsonl line (milliseconds; None where unknown)."""
        last_start = max(self.started.values()) if self.started else None
        origin = self.last_result_at if self.last_result_at is not None else self.advanced_at

        def ms(later: float | None, earlier: float | None) -> float | None:
            return None if later is None or earlier is None else round(max(0.0, later - earlier) * 1000, 1)
        return {
            "round": self.round,
            "reason": self.reason,
            "switch_ms": ms(last_start, origin),
            "detect_ms": ms(self.advanced_at, self.last_result_at),
            "start_ms": ms(last_start, self.advanced_at),
            "workers": len(self.expected),
            "missing": sorted(self.expected - set(self.started)),
        }
