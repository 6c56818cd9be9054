"""The worker's round in-process on the tiny model: hostile peer files, a dropping mount, checkpoints."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from fakes import FlakyFS
from node.checkpoint import load_latest_checkpoint, save_checkpoint
from node.config import ExperimentConfig, resolve_config
from node.exchange import fetch_shared_groups, rollout_file_for
from node.heartbeat import Heartbeat
from node.layout import ExperimentLayout
from node.runtime import PeerRegistration, StopFlag, ensure_config_snapshot
from node.storage import SharedStore
from node.worker import Worker
from sapo.config import ConfigError
from sapo.learner import SapoLearner
from sapo.tiny_model import build_tiny_gpt2

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smoke-cpu.yaml"


def _config(tmp_path, *overrides) -> ExperimentConfig:
    return resolve_config(CONFIG, environ={}, overrides=[f"experiment.root={tmp_path / 'shared'}",
                                                         "exchange.fetch_timeout_s=0", *overrides])


def _worker(tmp_path, node_id="worker_1", fs=None, config=None) -> Worker:
    config = config or _config(tmp_path)
    layout = ExperimentLayout.from_config(config)
    store = SharedStore(layout, node_id=node_id, lock_dir=tmp_path / "locks", spool_dir=tmp_path / f"spool-{node_id}",
                        fs=fs, sleep=lambda s: None, retry_attempts=2)
    store.ensure_layout()
    learner = SapoLearner(*build_tiny_gpt2(seed=1), config.sapo, experiment_seed=config.experiment.seed)
    heartbeat = Heartbeat(tmp_path / "run", node_id, "worker", 1.0)
    peer = PeerRegistration(store, layout, node_id, "worker", 1.0)
    return Worker(config, node_id, store=store, layout=layout, learner=learner, heartbeat=heartbeat,
                  stop=StopFlag(), peer=peer)


def _publish_peer(tmp_path, round_: int, peer_id="worker_2") -> None:
    """A real peer's rollouts for ``round_``, made by a second tiny policy."""
    peer = _worker(tmp_path, node_id=peer_id)
    groups, _ = peer.learner.generate(peer.learner.sample_questions(peer_id, round_), seed=round_, source=peer_id)
    peer.publisher.publish(groups, round_)
    peer.peer.update(round_=round_, status="running", force=True)  # a peer is fetched only with a valid record


def test_round_uses_external_groups_and_writes_seed_layout(tmp_path):
    worker = _worker(tmp_path)
    _publish_peer(tmp_path, 0)
    metrics = worker.run_round(0)
    assert metrics["external_candidates"] == 2  # I = 2 groups from worker_2
    assert metrics["num_external_groups"] + sum(metrics["external_dropped"].values()) == 2
    layout = worker.layout
    assert layout.rollout_file(0, 0, "worker_1").is_file()
    assert layout.reward_file(0, 0, "worker_1").is_file()
    line = json.loads(layout.metrics_file("worker_1").read_text().splitlines()[0])
    assert line["node_id"] == "worker_1" and line["round"] == 0 and "generate_s" in line["timings"]


def _plant_hostile_files(layout: ExperimentLayout, round_: int, outside: Path) -> list[str]:
    d = layout.rollouts_dir(round_, 0)
    d.mkdir(parents=True, exist_ok=True)
    good = rollout_file_for([], node_id="x", round_=round_).to_json()
    files = {
        "truncated": b'{"schema_version": 1, "peer_id": "truncated", "round": 0, "rollo',
        "nan_reward": json.dumps({**good, "peer_id": "nan_reward", "rollouts": {"0": [
            {"prompt": "p", "response": "r", "reward": float("nan"), "finished": True,
             "task": {"dataset": "toy_copy", "seed": 1, "index": 0}}]}}).encode(),
        "wrong_types": json.dumps({**good, "peer_id": "wrong_types", "round": "0"}).encode(),
        "future": json.dumps({**good, "peer_id": "future", "schema_version": 99}).encode(),
        "other_round": json.dumps({**good, "peer_id": "other_round", "round": round_ + 7}).encode(),
        "impostor": json.dumps({**good, "peer_id": "worker_9"}).encode(),
        "dotdot_id": json.dumps({**good, "peer_id": "../etc"}).encode(),
        "absolute_id": json.dumps({**good, "peer_id": "/etc/passwd"}).encode(),
        "deep": b"[" * 100_000 + b"]" * 100_000,
    }
    for name, data in files.items():
        (d / f"{name}.json").write_bytes(data)
    with open(d / "huge.json", "wb") as f:  # 100 MB, sparse: rejected by size without being read
        f.truncate(100 * 1024 * 1024)
    outside.write_text(json.dumps({**good, "peer_id": "link"}))
    os.symlink(outside, d / "link.json")
    (d / "..evil.json").write_text(json.dumps({**good, "peer_id": "..evil"}))  # hidden: never even read
    return [*files, "huge", "link"]


def test_hostile_peer_files_are_skipped_with_one_warning_each(tmp_path):
    worker = _worker(tmp_path)
    _publish_peer(tmp_path, 0)
    names = _plant_hostile_files(worker.layout, 0, tmp_path / "outside.json")
    for name in names:  # fetched only because each is a peer with a valid record: its rollout file is the attack
        PeerRegistration(worker.store, worker.layout, name, "worker", 1.0).update(round_=0, status="running")
    before = set(Path(tmp_path).rglob("*"))
    with capture_logs() as logs:
        metrics = worker.run_round(0)
        worker.run_round(1)  # the same bad files are not re-warned about in another round's poll
    warned = [Path(e["path"]).stem for e in logs if e["event"] == "peer_file_rejected"]
    # each once, although two rounds polled the directory; the symlink is not a file: never opened
    assert sorted(warned) == sorted(set(names) - {"link"})
    assert metrics["peer_files_rejected"] == len(names) - 1
    assert metrics["external_candidates"] == 2  # the honest peer's groups still count
    created = set(Path(tmp_path).rglob("*")) - before
    allowed = [tmp_path / "shared", tmp_path / "locks", tmp_path / "run", tmp_path / "spool-worker_1"]
    strays = [p for p in created if not any(p == a or a in p.parents for a in allowed)]
    assert strays == []
    assert (tmp_path / "outside.json").read_text().startswith("{")  # untouched


def test_mount_dropping_out_spools_and_loses_nothing(tmp_path):
    fs = FlakyFS()
    worker = _worker(tmp_path, fs=fs)
    worker.run_round(0)
    fs.down(errno.ENOTCONN)  # "Transport endpoint is not connected"
    for r in (1, 2, 3):
        metrics = worker.run_round(r)  # keeps training on local data
        assert metrics["published"] is False
    spooled = worker.store.spooled()
    assert spooled, "nothing was spooled while the mount was away"
    fs.heal()
    written = worker.store.flush_spool()
    assert written == len(spooled) and worker.store.spooled() == []
    layout = worker.layout
    for r in (1, 2, 3):
        assert layout.rollout_file(r, 0, "worker_1").is_file()
        assert layout.reward_file(r, 0, "worker_1").is_file()
    rounds = [json.loads(x)["round"] for x in layout.metrics_file("worker_1").read_text().splitlines()]
    assert rounds == [0, 1, 2, 3]


def test_checkpoint_round_trip_and_fallback_to_previous(tmp_path):
    worker = _worker(tmp_path)
    store, layout, learner = worker.store, worker.layout, worker.learner
    assert save_checkpoint(store, layout, "worker_1", 3, learner.model, learner.optimizer, keep_last=3)
    saved = {k: v.clone() for k, v in learner.model.state_dict().items()}
    worker.run_round(4)  # changes the weights
    assert save_checkpoint(store, layout, "worker_1", 4, learner.model, learner.optimizer, keep_last=3)
    path4 = layout.checkpoint_file(4, "worker_1")
    path4.write_bytes(path4.read_bytes()[:1000])  # a writer killed mid-way (or a corrupt copy)
    fresh = _worker(tmp_path)
    with capture_logs() as logs:
        restored = load_latest_checkpoint(store, layout, "worker_1", fresh.learner.model, fresh.learner.optimizer,
                                          max_bytes=1 << 30)
    assert restored.round == 3
    assert any(e["event"] == "checkpoint_unusable" for e in logs)
    for k, v in fresh.learner.model.state_dict().items():
        assert torch.equal(v, saved[k])


def test_checkpoint_loader_refuses_pickled_code(tmp_path):
    worker = _worker(tmp_path)
    path = worker.layout.checkpoint_file(5, "worker_1")
    path.parent.mkdir(parents=True)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"node_id": "worker_1", "round": 5, "model": Evil()}, path)
    restored = load_latest_checkpoint(worker.store, worker.layout, "worker_1", worker.learner.model,
                                      worker.learner.optimizer, max_bytes=1 << 30)
    assert restored is None and not (tmp_path / "pwned").exists()


def test_keep_last_checkpoints(tmp_path):
    worker = _worker(tmp_path)
    for r in range(5):
        save_checkpoint(worker.store, worker.layout, "worker_1", r, worker.learner.model, worker.learner.optimizer,
                        keep_last=2)
    assert sorted(p.parent.name for p in (tmp_path / "shared").rglob("worker_1.pt")) == ["round_3", "round_4"]


def test_metrics_line_not_duplicated_after_restart(tmp_path):
    worker = _worker(tmp_path)
    worker.run_round(0)
    again = _worker(tmp_path)  # a restart that lost its checkpoint trains round 0 again
    again.run_round(0)
    lines = worker.layout.metrics_file("worker_1").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [0]


def test_node_with_different_ijg_refuses_to_join(tmp_path):
    first = _worker(tmp_path)
    ensure_config_snapshot(first.store, first.layout, first.config, "worker_1")
    other = _config(tmp_path, "sapo.num_generations=8")
    with pytest.raises(ConfigError, match="num_generations"):
        ensure_config_snapshot(first.store, first.layout, other, "worker_2")
    ensure_config_snapshot(first.store, first.layout, _config(tmp_path, "sapo.learning_rate=0.5"), "worker_2")


def test_joining_waits_out_a_mount_that_is_away_at_start(tmp_path):
    from node.__main__ import join_experiment

    fs = FlakyFS()
    config = _config(tmp_path)
    layout = ExperimentLayout.from_config(config)
    store = SharedStore(layout, node_id="worker_1", lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool",
                        fs=fs, sleep=lambda s: None, retry_attempts=2)
    fs.fail("makedirs", errno.ENOTCONN, times=5)  # outlives two rounds of the store's own retries
    with capture_logs() as logs:
        join_experiment(store, layout, config, "worker_1", StopFlag(), retry_s=0.01)
    assert [e["event"] for e in logs].count("shared_dir_unreachable") >= 2
    assert layout.config_file().is_file()
