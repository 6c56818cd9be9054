"""Event-driven rounds: a worker wakes when the state file lands; writers the watch cannot see are still
seen within one poll interval (events disabled, or a file written behind a FUSE mount's back)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from node.config import resolve_config
from node.heartbeat import Heartbeat
from node.layout import ExperimentLayout
from node.round_switch import PendingSwitch
from node.runtime import PeerRegistration, StopFlag
from node.schemas import RoundState
from node.signing import Signer
from node.storage import SharedStore
from node.wakeup import Wakeup
from node.worker import Worker
from sapo.learner import SapoLearner
from sapo.tiny_model import build_tiny_gpt2

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smoke-cpu.yaml"
KEY = bytes(range(32))
POLL_S = 3.0  # long, so that an event visibly beats it


def _worker(tmp_path, experiment_root: Path, *, events: bool) -> Worker:
    config = resolve_config(CONFIG, environ={}, overrides=[f"experiment.root={experiment_root}",
                                                           f"coordinator.poll_interval_s={POLL_S}"])
    layout = ExperimentLayout.from_config(config)
    store = SharedStore(layout, node_id="worker_1", lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool",
                        signer=Signer(KEY))
    store.ensure_layout()
    learner = SapoLearner(*build_tiny_gpt2(seed=1), config.sapo, experiment_seed=config.experiment.seed)
    worker = Worker(config, "worker_1", store=store, layout=layout, learner=learner,
                    heartbeat=Heartbeat(tmp_path / "run", "worker_1", "worker", 1.0), stop=StopFlag(),
                    peer=PeerRegistration(store, layout, "worker_1", "worker", 1.0))
    worker.wakeup = Wakeup(enabled=events)
    return worker


def _publish_state_later(store: SharedStore, layout: ExperimentLayout, delay_s: float) -> threading.Thread:
    state = RoundState(experiment="smoke-cpu", round=0, stage=0, started_at=1.0, updated_at=1.0, finished=False,
                       max_rounds=3)
    t = threading.Thread(target=lambda: (time.sleep(delay_s), store.write_json_atomic(layout.state_file(),
                                                                                     state.to_json())))
    t.start()
    return t


def _timed_wait(worker: Worker) -> float:
    t = time.monotonic()
    assert worker.wait_for_round().round == 0
    return time.monotonic() - t


def test_a_worker_wakes_when_the_state_lands_not_at_the_poll(tmp_path):
    worker = _worker(tmp_path, tmp_path / "shared", events=True)
    if not worker.wakeup.active:
        pytest.skip("no inotify here")
    writer = _publish_state_later(worker.store, worker.layout, 0.3)
    waited = _timed_wait(worker)
    writer.join()
    assert waited < POLL_S  # woken by the event; the poll alone would take up to POLL_S after the write
    assert worker.wakeup.woken >= 1


def test_without_events_the_poll_still_sees_the_state(tmp_path):
    worker = _worker(tmp_path, tmp_path / "shared", events=False)
    writer = _publish_state_later(worker.store, worker.layout, 0.3)
    waited = _timed_wait(worker)
    writer.join()
    assert waited >= POLL_S - 0.5 and worker.wakeup.woken == 0  # found by the first poll after the write


def test_a_write_the_mount_does_not_report_is_seen_by_polling(tmp_path, flaky_mount):
    """The worker watches through a FUSE mount; the state is written into the backing directory, behind the
    mount's back (as another host would through its own mount): no event comes, the poll finds it."""
    worker = _worker(tmp_path, flaky_mount.mountpoint, events=True)
    if not worker.wakeup.active:
        pytest.skip("no inotify here")
    behind_root = flaky_mount.backing / worker.layout.root.relative_to(flaky_mount.mountpoint)
    behind = SharedStore(behind_root, lock_dir=tmp_path / "l2", spool_dir=tmp_path / "s2", signer=Signer(KEY))
    writer = _publish_state_later(behind, behind.layout, 0.3)
    waited = _timed_wait(worker)
    writer.join()
    assert worker.wakeup.woken == 0 and waited >= POLL_S - 0.5


def test_a_round_switch_line_splits_detect_and_start():
    switch = PendingSwitch(round=4, reason="all_live_workers_submitted", last_result_at=100.0, advanced_at=100.02,
                           expected=frozenset({"w1", "w2"}))
    switch.observe("w1", 3, 100.01)  # still in the old round: not a start
    switch.observe("w1", 4, 100.03)
    assert not switch.complete
    switch.observe("w2", 5, 100.05)
    switch.observe("w3", 4, 100.09)  # not expected: ignored
    assert switch.complete
    line = switch.line()
    assert (line["switch_ms"], line["detect_ms"], line["start_ms"], line["missing"]) == (50.0, 20.0, 30.0, [])
    timer = PendingSwitch(round=1, reason="interval", last_result_at=None, advanced_at=5.0, expected=frozenset({"w1"}))
    assert timer.line()["switch_ms"] is None and timer.line()["missing"] == ["w1"]
