"""The coordinator's round clock: strategies, liveness, resume without going back, the final state."""

from __future__ import annotations

import json
import time
from pathlib import Path

from node.config import resolve_config
from node.coordinator import Coordinator, decide_advance
from node.heartbeat import Heartbeat
from node.layout import ExperimentLayout
from node.runtime import StopFlag
from node.schemas import PeerRecord, RoundResult, RoundState
from node.storage import SharedStore

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smoke-cpu.yaml"


def test_strategies():
    kw = dict(interval_s=60, timeout_s=120)
    assert decide_advance("time", elapsed_s=61, live={"a"}, submitted=set(), **kw) == "interval"
    assert decide_advance("time", elapsed_s=10, live=set(), submitted={"a"}, **kw) is None
    assert decide_advance("completion", elapsed_s=1, live={"a", "b"}, submitted={"a", "b"}, **kw)
    assert decide_advance("completion", elapsed_s=999, live={"a", "b"}, submitted={"a"}, **kw) is None
    assert decide_advance("completion", elapsed_s=999, live=set(), submitted=set(), **kw) is None
    assert decide_advance("hybrid", elapsed_s=5, live={"a", "b"}, submitted={"a"}, **kw) is None
    assert decide_advance("hybrid", elapsed_s=121, live={"a", "b"}, submitted={"a"}, **kw) == "round_timeout"
    # a dead worker (no longer live) does not stall the round
    assert decide_advance("hybrid", elapsed_s=5, live={"a"}, submitted={"a"}, **kw) == "all_live_workers_submitted"


def _coordinator(tmp_path, *overrides):
    config = resolve_config(CONFIG, environ={}, overrides=[f"experiment.root={tmp_path}", *overrides])
    layout = ExperimentLayout.from_config(config)
    store = SharedStore(layout, node_id="coordinator", lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool")
    store.ensure_layout()
    beat = Heartbeat(tmp_path / "run", "coordinator", "coordinator", 1.0)
    return Coordinator(config, "coordinator", store=store, layout=layout, heartbeat=beat, stop=StopFlag())


def _register(c: Coordinator, node: str, age_s: float = 0.0):
    now = time.time()
    record = PeerRecord(node_id=node, role="worker", pid=1, host="h", started_at=now - 100,
                        heartbeat_at=now - age_s, round=0, progress=1, status="running")
    c.store.write_json_atomic(c.layout.peer_file(node), record.to_json())


def _submit(c: Coordinator, node: str, round_: int):
    result = RoundResult(node_id=node, round=round_, stage=0, mean_reward=0.5, num_local_groups=2,
                         num_external_groups=2, submitted_at=time.time())
    c.store.write_json_atomic(c.layout.reward_file(round_, 0, node), result.to_json())


def test_completion_ignores_dead_workers_and_forged_results(tmp_path):
    c = _coordinator(tmp_path)
    _register(c, "worker_1")
    _register(c, "worker_2", age_s=10_000)  # its heartbeat is far older than the timeout: dead
    state = RoundState(experiment="smoke-cpu", round=0, stage=0, started_at=time.time(), updated_at=time.time(),
                       finished=False, max_rounds=3)
    bogus = c.layout.reward_file(0, 0, "worker_1")
    bogus.parent.mkdir(parents=True, exist_ok=True)
    bogus.write_text(json.dumps({"schema_version": 1, "node_id": "worker_9", "round": 0}))  # not worker_1's
    assert c.tick(state).round == 0
    _submit(c, "worker_1", 0)
    assert c.tick(state).round == 1


def test_resume_never_goes_back_and_final_state(tmp_path):
    c = _coordinator(tmp_path)
    _register(c, "worker_1")
    state = RoundState(experiment="smoke-cpu", round=2, stage=0, started_at=time.time(), updated_at=time.time(),
                       finished=False, max_rounds=3)
    c.write_state(state)
    restarted = _coordinator(tmp_path)
    loaded = restarted.load_state()
    assert loaded.round == 2
    _submit(restarted, "worker_1", 2)
    final = restarted.tick(loaded)
    assert final.finished and final.round == 3
    on_disk = json.loads(c.layout.state_file().read_text())
    assert on_disk["finished"] is True and on_disk["round"] == 3
    assert _coordinator(tmp_path).run() == 0  # a coordinator started after the end exits at once


def test_time_strategy_advances_without_submissions(tmp_path):
    c = _coordinator(tmp_path, "coordinator.strategy=time", "coordinator.round_interval_s=0.01")
    state = RoundState(experiment="smoke-cpu", round=0, stage=0, started_at=time.time() - 1, updated_at=time.time(),
                       finished=False, max_rounds=3)
    assert c.tick(state).round == 1


# --- the state is never taken on trust (issue 12) ---------------------------------------------------------
import pytest  # noqa: E402

from node.signing import Signer  # noqa: E402
from sapo.config import ConfigError  # noqa: E402

KEY = bytes(range(32))


def _signed_coordinator(tmp_path, key=KEY, local=True) -> Coordinator:
    config = resolve_config(CONFIG, environ={}, overrides=[f"experiment.root={tmp_path}", "experiment.max_rounds=10"])
    layout = ExperimentLayout.from_config(config)
    store = SharedStore(layout, node_id="coordinator", lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool",
                        signer=Signer(key))
    store.ensure_layout()
    beat = Heartbeat(tmp_path / "run", "coordinator", "coordinator", 1.0)
    return Coordinator(config, "coordinator", store=store, layout=layout, heartbeat=beat, stop=StopFlag(),
                       local_state=tmp_path / "run" / "coordinator.state.json" if local else None)


def _state(round_, finished=False, max_rounds=10) -> RoundState:
    return RoundState(experiment="smoke-cpu", round=round_, stage=0, started_at=time.time(), updated_at=time.time(),
                      finished=finished, max_rounds=max_rounds)


@pytest.mark.parametrize("forgery", ["finished_early", "far_future", "junk", "wrong_key"])
def test_a_forged_state_and_a_restart_resume_from_the_local_copy(tmp_path, forgery):
    c = _signed_coordinator(tmp_path)
    c.write_state(_state(4))
    state_file = c.layout.state_file()
    if forgery == "junk":
        state_file.write_bytes(b"\x00garbage")
    elif forgery == "wrong_key":
        outsider = _signed_coordinator(tmp_path / "outsider", key=bytes(range(1, 33)))
        state_file.write_bytes(outsider.store.signer.sign(json.dumps(_state(9).to_json()).encode(), "state/current_state.json"))
    else:
        forged = _state(5, finished=True) if forgery == "finished_early" else _state(2**62)
        state_file.write_bytes(json.dumps(forged.to_json()).encode())  # unsigned
    restarted = _signed_coordinator(tmp_path)
    assert restarted.load_state().round == 4


def test_without_a_local_copy_the_newest_signed_result_tells_the_round(tmp_path):
    c = _signed_coordinator(tmp_path, local=False)
    _register(c, "worker_1")
    c.write_state(_state(6))
    for r in (5, 6):
        _submit(c, "worker_1", r)
    c.layout.state_file().write_bytes(b"{not json")
    assert _signed_coordinator(tmp_path, local=False).load_state().round == 6


def test_a_state_that_cannot_be_used_never_restarts_an_experiment_with_progress(tmp_path):
    c = _signed_coordinator(tmp_path, local=False)
    c.write_state(_state(3))
    (c.layout.root / "checkpoints" / "round_2").mkdir(parents=True)  # progress, but no result to tell the round
    newer = {**_state(3).to_json(), "schema_version": 99}
    c.store.write_json_atomic(c.layout.state_file(), newer)
    with pytest.raises(ConfigError, match="refusing to restart the experiment at round 0"):
        _signed_coordinator(tmp_path, local=False).load_state()


def test_a_fresh_experiment_with_a_planted_state_starts_at_round_0(tmp_path):
    c = _signed_coordinator(tmp_path, local=False)
    c.layout.state_file().write_bytes(json.dumps(_state(7).to_json()).encode())  # unsigned, nothing ran yet
    assert c.load_state() is None


def test_a_state_file_changed_behind_the_coordinators_back_is_rewritten(tmp_path):
    c = _signed_coordinator(tmp_path)
    _register(c, "worker_1")
    state = _state(2)
    c.write_state(state)
    c.layout.state_file().write_bytes(json.dumps(_state(2, finished=True).to_json()).encode())
    c.tick(state)
    assert c.store.read_as(c.layout.state_file(), RoundState.from_json) == state


def test_results_planted_before_a_round_starts_do_not_complete_it(tmp_path):
    c = _signed_coordinator(tmp_path)
    _register(c, "worker_1")
    state = _state(0)
    c.write_state(state)
    _submit(c, "worker_1", 1)  # signed (e.g. replayed by someone), already there when round 1 starts
    _submit(c, "worker_1", 0)
    state = c.tick(state)
    assert state.round == 1
    assert c.tick(state).round == 1  # the pre-existing result of round 1 does not count
    time.sleep(0.01)
    _submit(c, "worker_1", 1)  # a fresh submission does
    assert c.tick(state).round == 2


def test_results_of_workers_that_are_not_live_never_complete_a_round():
    kw = dict(interval_s=60, timeout_s=120)
    assert decide_advance("completion", elapsed_s=1, live=set(), submitted={"ghost"}, **kw) is None
    assert decide_advance("hybrid", elapsed_s=1, live=set(), submitted={"ghost"}, **kw) is None


def test_a_state_forged_right_after_our_write_is_repaired_at_the_next_tick(tmp_path):
    c = _signed_coordinator(tmp_path)
    _register(c, "worker_1")
    state = _state(2)
    real_write = c.store.write_json_atomic

    def write_then_forge(path, obj, **kwargs):  # the forgery lands between our rename and anything after it
        real_write(path, obj, **kwargs)
        c.layout.state_file().write_bytes(json.dumps(_state(2, finished=True).to_json()).encode())
    c.store.write_json_atomic = write_then_forge
    c.write_state(state)
    c.store.write_json_atomic = real_write
    c.tick(state)
    assert c.store.read_as(c.layout.state_file(), RoundState.from_json) == state


def test_a_round_directory_planted_as_a_symlink_out_of_the_experiment_is_not_a_crash(tmp_path):
    c = _signed_coordinator(tmp_path)
    _register(c, "worker_1")
    outside = tmp_path / "outside"
    outside.mkdir()
    (c.layout.root / "rewards").mkdir(parents=True, exist_ok=True)
    (c.layout.root / "rewards" / "round_1").symlink_to(outside)
    state = _state(0)
    c.write_state(state)
    _submit(c, "worker_1", 0)
    state = c.tick(state)  # advancing notes round 1's results: through the planted link
    assert state.round == 1 and c.submitted(1) == set() and list(outside.iterdir()) == []


def test_an_unreachable_mount_leaves_the_state_guard_quiet(tmp_path, monkeypatch):
    c = _signed_coordinator(tmp_path)
    c.write_state(_state(1))

    def away(*args, **kwargs):
        raise OSError(107, "Transport endpoint is not connected")
    monkeypatch.setattr(c.store, "read_as_or_reason", away)
    c.guard_state_file()  # no exception: the next tick looks again


def test_round_0_waits_for_workers_that_finished_loading(tmp_path):
    c = _signed_coordinator(tmp_path)
    c.config = resolve_config(CONFIG, environ={}, overrides=[f"experiment.root={tmp_path}", "supervisor.workers=1",
                                                             "supervisor.startup_timeout_s=0.5"])
    now = time.time()
    loading = PeerRecord(node_id="worker_1", role="worker", pid=1, host="h", started_at=now, heartbeat_at=now,
                         round=0, progress=1, status="starting")
    c.store.write_json_atomic(c.layout.peer_file("worker_1"), loading.to_json())
    t = time.monotonic()
    c.wait_for_workers()
    assert time.monotonic() - t >= 0.5  # a "starting" worker is still loading: round 0 waited for it
    running = PeerRecord(node_id="worker_1", role="worker", pid=1, host="h", started_at=now, heartbeat_at=now + 1,
                         round=0, progress=2, status="running")
    c.store.write_json_atomic(c.layout.peer_file("worker_1"), running.to_json())
    c.config = resolve_config(CONFIG, environ={}, overrides=[f"experiment.root={tmp_path}", "supervisor.workers=1",
                                                             "supervisor.startup_timeout_s=30"])
    t = time.monotonic()
    c.wait_for_workers()
    assert time.monotonic() - t < 15  # it is running: round 0 starts
