"""Round switch latency: from the last round result written to every worker having started the next round.

The swarm's own cost per round is the switch: the coordinator noticing that the last live worker submitted
(``detect``), writing the next state, and every worker noticing it and starting the round (``start``). With
2000 rounds of ~1 s each, every 100 ms of switch costs 10 % of the run, so it is measured every round.

Times are the coordinator's own clock, never a writer's (another host's may be minutes off): when it first saw
each result (it wakes on the file's event), when it advanced, and when it saw each worker's peer record say
it started the next round (a worker forces a record at the start of a round; the coordinator watches the peers
directory while a switch is pending). So the figure is what the coordinator observed, a millisecond or two
after the writes on one host, the mount's propagation lag later across hosts.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PendingSwitch:
    """A round that started, waiting for every expected worker to start it (all times: the coordinator's clock)."""

    round: int
    reason: str
    last_result_at: float | None  # when the last result of the previous round was seen (None: on a timer)
    advanced_at: float
    expected: frozenset[str]
    started: dict[str, float] = field(default_factory=dict)

    def observe(self, worker: str, record_round: int, seen_at: float) -> None:
        """A worker's peer record, seen (our clock) at ``seen_at``, says it is in ``record_round``."""
        if worker in self.expected and worker not in self.started and record_round >= self.round:
            self.started[worker] = seen_at

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
