"""Metrics, evals and events of one node: ``logs/<node>/metrics.jsonl``, ``evals.jsonl`` and
``training_events.jsonl``.

At most one metrics line per (node, round), also across restarts: on start we read the rounds already
recorded, and a round trained again after a crash (its checkpoint was older than its metrics line) is not
recorded twice. Eval lines (held-out pass@1, :mod:`sapo.evaluate`) follow the same rule per (node, eval
round): ``{node_id, round, timestamp, final, seconds, complete, tasks: {name: {accuracy, score, n, planned,
seconds, complete}}}``, ``round`` being the last round trained into the weights evaluated and ``final``
true when those are the weights the run ends with.
"""

from __future__ import annotations

import time
from pathlib import Path

import structlog

from node.layout import ExperimentLayout
from node.storage import SharedStore

log = structlog.get_logger(__name__)

MAX_METRICS_BYTES = 512 * 1024 * 1024
EVALS_FILE = "evals.jsonl"  # in logs/<node>/, beside metrics.jsonl


def evals_file(layout: ExperimentLayout, node_id: str) -> Path:
    """``logs/<node>/evals.jsonl``: one held-out eval line per (node, eval round)."""
    return layout.log_dir(node_id) / EVALS_FILE  # log_dir checks the node id; the name is ours


class RunRecords:
    """Appends metrics and events for one node (spooled like every publish when the mount is away)."""

    def __init__(self, store: SharedStore, layout: ExperimentLayout, node_id: str):
        self.store, self.node_id = store, node_id
        self.metrics_path = layout.metrics_file(node_id)
        self.events_path = layout.events_file(node_id)
        self.recorded_rounds = recorded_rounds(store, self.metrics_path, node_id)
        self.evals_path = evals_file(layout, node_id)
        self.evaluated_rounds = recorded_rounds(store, self.evals_path, node_id)

    def metrics(self, round_: int, fields: dict) -> bool:
        """Append the metrics line of ``round_`` unless this round is already recorded."""
        if round_ in self.recorded_rounds:
            log.info("metrics_already_recorded", round=round_)
            return False
        line = {"node_id": self.node_id, "round": round_, "timestamp": time.time(), **fields}
        self.store.append_jsonl(self.metrics_path, line, durable="later")
        self.recorded_rounds.add(round_)
        return True

    def eval(self, round_: int, fields: dict) -> bool:
        """Append the eval line of ``round_`` unless this round already has one (also from before a restart)."""
        if round_ in self.evaluated_rounds:
            log.info("eval_already_recorded", round=round_)
            return False
        self.store.append_jsonl(self.evals_path, {"node_id": self.node_id, "round": round_, "timestamp": time.time(),
                                                  **fields})
        self.evaluated_rounds.add(round_)
        return True

    def event(self, name: str, **fields) -> None:
        """Append one training event (start, resume, rounds skipped, checkpoint, stop, finish...)."""
        self.store.append_jsonl(self.events_path, {"node_id": self.node_id, "event": name,
                                                   "timestamp": time.time(), **fields}, durable="later")


def recorded_rounds(store: SharedStore, path, node_id: str) -> set[int]:
    """Rounds with a line of ``node_id`` in ``path`` (metrics or evals; unparseable lines are ignored)."""
    rows, _ = store.read_jsonl(path, max_bytes=MAX_METRICS_BYTES)
    return {row["round"] for row in rows if row.get("node_id") == node_id and type(row.get("round")) is int}
