"""Metrics and events of one node: ``logs/<node>/metrics.jsonl`` and ``training_events.jsonl``.

At most one metrics line per (node, round), also across restarts: on start we read the rounds already
recorded, and a round trained again after a crash (its checkpoint was older than its metrics line) is not
recorded twice.
"""

from __future__ import annotations

import time

import structlog

from node.layout import ExperimentLayout
from node.storage import SharedStore

log = structlog.get_logger(__name__)

MAX_METRICS_BYTES = 512 * 1024 * 1024


class RunRecords:
    """Appends metrics and events for one node (spooled like every publish when the mount is away)."""

    def __init__(self, store: SharedStore, layout: ExperimentLayout, node_id: str):
        self.store, self.node_id = store, node_id
        self.metrics_path = layout.metrics_file(node_id)
        self.events_path = layout.events_file(node_id)
        self.recorded_rounds = recorded_rounds(store, self.metrics_path, node_id)

    def metrics(self, round_: int, fields: dict) -> bool:
        """Append the metrics line of ``round_`` unless this round is already recorded."""
        if round_ in self.recorded_rounds:
            log.info("metrics_already_recorded", round=round_)
            return False
        line = {"node_id": self.node_id, "round": round_, "timestamp": time.time(), **fields}
        self.store.append_jsonl(self.metrics_path, line, durable="later")
        self.recorded_rounds.add(round_)
        return True

    def event(self, name: str, **fields) -> None:
        """Append one training event (start, resume, rounds skipped, checkpoint, stop, finish...)."""
        self.store.append_jsonl(self.events_path, {"node_id": self.node_id, "event": name,
                                                   "timestamp": time.time(), **fields}, durable="later")


def recorded_rounds(store: SharedStore, path, node_id: str) -> set[int]:
    """Rounds with a metrics line of ``node_id`` in ``path`` (unparseable lines are ignored)."""
    rows, _ = store.read_jsonl(path, max_bytes=MAX_METRICS_BYTES)
    return {row["round"] for row in rows if row.get("node_id") == node_id and type(row.get("round")) is int}
