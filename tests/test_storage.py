"""node.storage: atomic writes, retries, the spool, and hostile files from the shared directory."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import filelock
import pytest
from structlog.testing import capture_logs

from node.layout import ExperimentLayout
from node.retry import TRANSIENT_ERRNOS, retry
from node.schemas import PeerRecord, Rollout, RolloutFile, RoundResult, TaskRef
from node.storage import SharedStore
from node.strict_json import parse_json_bytes

from fakes import FlakyFS


def make_rollout_file(peer="worker_1", rnd=5, stage=0, groups=2, g=4) -> RolloutFile:
    rollouts = {}
    for b in range(groups):
        task = TaskRef(dataset="basic_arithmetic", seed=42, index=b)
        rollouts[str(b)] = [Rollout(prompt=f"Q{b}: 2+{b}?", response=f"answer {i}", reward=float(i % 2),
                                    finished=True, task=task) for i in range(g)]
    return RolloutFile(peer_id=peer, round=rnd, stage=stage, timestamp=1.7e9, rollouts=rollouts)


class RecordingRng:
    def __init__(self):
        self.calls = []

    def uniform(self, a, b):
        self.calls.append((a, b))
        return b


@pytest.fixture
def fs():
    return FlakyFS()


@pytest.fixture
def layout(tmp_path) -> ExperimentLayout:
    layout = ExperimentLayout.for_experiment(tmp_path / "shared", "exp")
    layout.ensure_dirs()
    return layout


def make_store(layout, tmp_path, fs=None, **kw) -> SharedStore:
    kw.setdefault("sleep", lambda s: None)
    return SharedStore(layout, node_id="worker_1", lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool",
                       fs=fs, **kw)


@pytest.fixture
def store(layout, tmp_path, fs) -> SharedStore:
    return make_store(layout, tmp_path, fs)


def warnings(logs):
    return [e for e in logs if e["log_level"] == "warning"]


def files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() or p.is_symlink())


# -- retry --------------------------------------------------------------------------------------------

def test_retry_backoff_with_full_jitter_then_success():
    rng, slept, calls = RecordingRng(), [], []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise OSError(errno.EIO, "io")
        return "ok"

    assert retry(flaky, attempts=5, base_delay=0.1, max_delay=0.3, sleep=slept.append, rng=rng) == "ok"
    assert len(calls) == 4
    assert rng.calls == [(0.0, 0.1), (0.0, 0.2), (0.0, 0.3)]  # exponential, capped, full jitter from 0
    assert slept == [0.1, 0.2, 0.3]


def test_retry_gives_up_and_non_transient_propagates_at_once():
    calls = []

    def down():
        calls.append(1)
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    with pytest.raises(OSError) as info:
        retry(down, attempts=3, base_delay=0, max_delay=0, sleep=lambda s: None)
    assert info.value.errno == errno.ENOTCONN and len(calls) == 3

    calls.clear()

    def denied():
        calls.append(1)
        raise PermissionError(errno.EACCES, "denied")

    with pytest.raises(PermissionError):
        retry(denied, attempts=5, sleep=lambda s: None)
    assert len(calls) == 1
    assert {errno.EIO, errno.ENOTCONN, errno.ESTALE, errno.EAGAIN} <= TRANSIENT_ERRNOS


# -- atomic writes ------------------------------------------------------------------------------------------

def test_atomic_write_round_trip_no_temp(store, layout):
    p = layout.peer_file("worker_1")
    store.write_json_atomic(p, {"a": 1})
    store.write_json_atomic(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert os.listdir(p.parent) == ["worker_1.json"]


@pytest.mark.parametrize("op", ["write", "fsync", "replace"])
def test_atomic_write_failure_keeps_old_content(store, layout, fs, op):
    p = layout.peer_file("worker_1")
    store.write_json_atomic(p, {"v": "old"})
    fs.fail(op, errno.EIO)
    with pytest.raises(OSError):
        store.write_json_atomic(p, {"v": "new" * 1000})
    assert json.loads(p.read_text()) == {"v": "old"}
    assert os.listdir(p.parent) == ["worker_1.json"]  # the temp file was removed


def test_refuses_writes_outside_root(store, layout, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for bad in [layout.root / ".." / "x.json", Path("/etc/x.json"), layout.root / "peers" / ".." / ".." / "y.json"]:
        with pytest.raises(ValueError):
            store.write_json_atomic(bad, {})
    # a round dir planted as a symlink out of the experiment: the link is replaced, the write lands inside
    (layout.root / "rollouts" / "round_9").symlink_to(outside, target_is_directory=True)
    store.write_json_atomic(layout.rollout_file(9, 0, "worker_1"), {})
    assert not (layout.root / "rollouts" / "round_9").is_symlink()
    assert layout.rollout_file(9, 0, "worker_1").is_file()
    # any other symlinked directory (not one the nodes create per round) is still refused
    (layout.root / "logs").mkdir(exist_ok=True)
    (layout.root / "logs" / "worker_1").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError):
        store.append_jsonl(layout.metrics_file("worker_1"), {})
    with pytest.raises(ValueError):
        store.publish(layout.root / ".." / "z.json", {})
    assert os.listdir(outside) == [] and not (layout.root.parent / "x.json").exists()
    # the archive dir is allowed (retention writes there)
    store.write_bytes_atomic(layout.archive_rollouts_dir(1) / "stage_0" / "a.json", b"{}")


def test_publish_retries_transient_then_succeeds(store, layout, fs):
    fs.fail("open", errno.EIO, times=2)
    p = layout.rollout_file(0, 0, "worker_1")
    assert store.publish(p, make_rollout_file(rnd=0).to_json()) is True
    assert RolloutFile.from_json(json.loads(p.read_text())).round == 0
    assert list(store.spool_dir.glob("*")) == []


def test_publish_non_transient_error_propagates(store, layout, fs):
    fs.fail("open", errno.EACCES)
    with pytest.raises(PermissionError):
        store.publish(layout.peer_file("worker_1"), {"a": 1})
    assert store.spooled() == []


def test_publish_refuses_nan(store, layout):
    with pytest.raises(ValueError):
        store.publish(layout.peer_file("worker_1"), {"x": float("nan")})


# -- spool --------------------------------------------------------------------------------------------

def test_spool_while_disconnected_then_flush_everything(layout, tmp_path, fs):
    store = make_store(layout, tmp_path, fs)
    fs.down(errno.ENOTCONN)
    expected = {}
    for r in range(3):
        p = layout.rollout_file(r, 0, "worker_1")
        obj = make_rollout_file(rnd=r).to_json()
        expected[p] = obj
        assert store.publish(p, obj) is False
    expected[layout.peer_file("worker_1")] = {"hb": 1}
    assert store.publish(layout.peer_file("worker_1"), {"hb": 0}) is False
    assert store.publish(layout.peer_file("worker_1"), {"hb": 1}) is False  # newer replaces older in spool
    assert store.append_jsonl(layout.metrics_file("worker_1"), {"node_id": "worker_1", "round": 0}) is False
    assert store.append_jsonl(layout.metrics_file("worker_1"), {"node_id": "worker_1", "round": 1}) is False
    assert len(store.spooled()) == 5
    assert not any(p.exists() for p in expected)

    # The spool is on disk: a new process (a new store) sees it.
    store2 = make_store(layout, tmp_path, fs)
    assert sorted(store2.spooled()) == sorted([*expected, layout.metrics_file("worker_1")])
    assert store2.flush_spool() == 0  # still down: nothing written, nothing lost
    assert len(store2.spooled()) == 5

    fs.heal()
    assert store2.flush_spool() == 5
    assert store2.spooled() == []
    for p, obj in expected.items():
        assert json.loads(p.read_text()) == obj
    lines = layout.metrics_file("worker_1").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [0, 1]
    assert not [n for n in os.listdir(layout.peers_dir()) if n.endswith(".tmp")]


def test_spool_flushed_by_next_publish_in_order(store, layout, fs):
    p = layout.peer_file("worker_1")
    m = layout.metrics_file("worker_1")
    fs.down(errno.EIO)
    assert store.publish(p, {"v": 1}) is False
    assert store.append_jsonl(m, {"node_id": "worker_1", "round": 0}) is False
    fs.heal()
    assert store.append_jsonl(m, {"node_id": "worker_1", "round": 1}) is True
    assert [json.loads(x)["round"] for x in m.read_text().splitlines()] == [0, 1]
    assert store.publish(p, {"v": 2}) is True
    assert json.loads(p.read_text()) == {"v": 2} and store.spooled() == []


def test_enospc_is_spooled(store, layout, fs):
    fs.fail("write", errno.ENOSPC)
    p = layout.reward_file(1, 0, "worker_1")
    res = RoundResult(node_id="worker_1", round=1, stage=0, mean_reward=0.5, num_local_groups=2,
                      num_external_groups=1, submitted_at=3.0)
    assert store.publish(p, res.to_json()) is False
    assert store.spooled() == [p] and not p.exists()
    fs.heal()
    assert store.flush_spool() == 1
    assert store.read_as(p, RoundResult.from_json, expect_round=1, expect_stage=0, expect_node="worker_1") == res


def test_flaky_mount_flips_back_zero_lost(store, layout, fs):
    """ENOTCONN for a while (until a flag flips), publishing all along: everything arrives, in the end."""
    published = []
    for r in range(10):
        if r == 2:
            fs.down(errno.ENOTCONN)
        if r == 7:
            fs.heal()
        p = layout.rollout_file(r, 0, "worker_1")
        store.publish(p, make_rollout_file(rnd=r).to_json())
        published.append(p)
    store.flush_spool()
    assert store.spooled() == []
    for r, p in enumerate(published):
        assert store.read_as(p, RolloutFile.from_json, expect_round=r, expect_node="worker_1") is not None


# -- reads of untrusted files ---------------------------------------------------------------------------------

def _write(p: Path, data: bytes | str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def test_read_json_ok_and_missing(store, layout):
    p = _write(layout.peer_file("a"), '{"x": [1, 2.5, "s"]}')
    with capture_logs() as logs:
        assert store.read_json(p) == {"x": [1, 2.5, "s"]}
        assert store.read_json(layout.peer_file("nobody")) is None
    assert warnings(logs) == []


def _hostile_files(layout: ExperimentLayout, tmp_path: Path) -> dict[str, Path]:
    d = layout.rollouts_dir(4, 0)
    good = json.dumps(make_rollout_file(peer="p", rnd=4).to_json())
    out = {
        "truncated": _write(d / "truncated.json", good[: len(good) // 2]),
        "empty": _write(d / "empty.json", b""),
        "nan": _write(d / "nan.json", good.replace('"reward": 0.0', '"reward": NaN')),
        "infinity": _write(d / "infinity.json", good.replace('"reward": 1.0', '"reward": -Infinity')),
        "overflow": _write(d / "overflow.json", good.replace('"reward": 1.0', '"reward": 1e999')),
        "nested": _write(d / "nested.json", b"[" * 1_000_000),
        "nested_obj": _write(d / "nested_obj.json", '{"a":' * 100 + "1" + "}" * 100),
        "not_utf8": _write(d / "not_utf8.json", b'{"a": "\xff\xfe"}'),
        "huge_int": _write(d / "huge_int.json", "1" * 10_000),
    }
    for name in ("nan", "infinity", "overflow"):
        assert out[name].read_text() != good, name  # the replacement happened
    big = d / "big.json"
    with open(big, "wb") as f:
        f.truncate(100 * 1024 * 1024)  # sparse: instant, 100 MB by stat
    out["big"] = big
    secret = _write(tmp_path / "outside" / "secret.json", good)
    (d / "link.json").symlink_to(secret)
    out["symlink"] = d / "link.json"
    os.mkfifo(d / "fifo.json")
    out["fifo"] = d / "fifo.json"
    (d / "dir.json").mkdir()
    out["dir"] = d / "dir.json"
    outside_dir = tmp_path / "outside_dir"
    _write(outside_dir / "stage_0" / "p.json", good)
    (layout.root / "rollouts" / "round_8").symlink_to(outside_dir, target_is_directory=True)
    out["symlinked_parent"] = layout.root / "rollouts" / "round_8" / "stage_0" / "p.json"
    return out


def test_hostile_files_rejected_once_each(store, layout, tmp_path, fs):
    files = _hostile_files(layout, tmp_path)
    with capture_logs() as logs:
        for name, p in files.items():
            assert store.read_json(p) is None, name
    warned = warnings(logs)
    assert sorted(e["path"] for e in warned) == sorted(str(p) for p in files.values())
    assert all(e["event"] == "peer_file_rejected" and e["reason"] for e in warned)
    reasons = {Path(e["path"]).name: e["reason"] for e in warned}
    assert "exceeds the cap" in reasons["big.json"]
    assert "symlink" in reasons["link.json"]
    assert "deeper" in reasons["nested.json"]
    # Polling again does not spam.
    with capture_logs() as logs:
        for p in files.values():
            assert store.read_json(p) is None
    assert warnings(logs) == []


def test_big_file_rejected_without_reading(store, layout, fs):
    big = layout.rollouts_dir(1, 0) / "big.json"
    big.parent.mkdir(parents=True)
    with open(big, "wb") as f:
        f.truncate(100 * 1024 * 1024)
    assert store.read_json(big) is None
    assert fs.calls.get("open", 0) == 0 and fs.calls.get("read", 0) == 0
    assert store.read_json(big, max_bytes=200 * 1024 * 1024) is None  # a larger cap: read, then bad JSON


def test_changed_bad_file_warns_again(store, layout):
    p = _write(layout.peer_file("w"), "{")
    with capture_logs() as logs:
        store.read_json(p)
        store.read_json(p)
        _write(p, "{{{{")
        os.utime(p, ns=(1, 1))
        store.read_json(p)
    assert len(warnings(logs)) == 2


@pytest.mark.parametrize("case", ["wrong_types", "dotdot_peer", "abs_peer", "control_peer", "future_version",
                                  "round_mismatch", "nan_reward"])
def test_schema_rejections_through_read_as(store, layout, case):
    obj = make_rollout_file(peer="worker_2", rnd=5).to_json()
    if case == "wrong_types":
        obj["rollouts"]["0"][0]["reward"] = "high"
        obj["round"] = True
    elif case == "dotdot_peer":
        obj["peer_id"] = "../worker_2"
    elif case == "abs_peer":
        obj["peer_id"] = "/etc/passwd"
    elif case == "control_peer":
        obj["peer_id"] = "worker_2\x1b[31m"
    elif case == "future_version":
        obj["schema_version"] = 99
    elif case == "round_mismatch":
        obj["round"] = 6
    p = layout.rollout_file(5, 0, "worker_2")
    text = json.dumps(obj)
    if case == "nan_reward":
        text = text.replace('"reward": 0.0', '"reward": NaN')
        assert "NaN" in text
    _write(p, text)
    with capture_logs() as logs:
        for _ in range(3):
            assert store.read_as(p, RolloutFile.from_json, expect_round=5, expect_stage=0,
                                 expect_node="worker_2") is None
    warned = warnings(logs)
    assert len(warned) == 1 and warned[0]["path"] == str(p)
    if case == "future_version":
        assert "schema version 99 is newer than supported 1" in warned[0]["reason"]


def test_read_as_good_file(store, layout):
    rf = make_rollout_file(peer="worker_2", rnd=5)
    p = layout.rollout_file(5, 0, "worker_2")
    store.write_json_atomic(p, rf.to_json())
    assert store.read_as(p, RolloutFile.from_json, expect_round=5, expect_stage=0, expect_node="worker_2") == rf


def test_transient_read_errors_retried_then_none(store, layout, fs):
    p = layout.peer_file("w")
    rec = PeerRecord(node_id="w", role="worker", pid=1, host="h", started_at=0.0, heartbeat_at=1.0, round=0,
                     progress=3, status="running")
    store.write_json_atomic(p, rec.to_json())
    fs.fail("read", errno.EIO, times=2)
    assert store.read_as(p, PeerRecord.from_json, expect_node="w") == rec
    fs.down(errno.ENOTCONN)
    with capture_logs() as logs:
        assert store.read_json(p) is None
        assert store.read_json(p) is None
    assert len(warnings(logs)) == 1
    with pytest.raises(OSError) as info:
        store.read_as(p, PeerRecord.from_json, raise_unreachable=True)
    assert info.value.errno == errno.ENOTCONN
    fs.heal()
    assert store.read_as(p, PeerRecord.from_json) == rec
    assert store.read_json(layout.peer_file("absent"), raise_unreachable=True) is None


def test_parse_json_bytes_depth_limit():
    assert parse_json_bytes(b"[" * 64 + b"]" * 64) is not None
    with pytest.raises(ValueError):
        parse_json_bytes(b"[" * 65 + b"]" * 65)


# -- listing, appends, locks -------------------------------------------------------------------------------

def test_list_json_filters(store, layout, tmp_path, fs):
    d = layout.rollouts_dir(2, 0)
    for name in ["a.json", "b.json", ".a.json.123.abc.tmp", ".hidden.json", "notes.txt", "c.json.tmp"]:
        _write(d / name, "{}")
    (d / "sub.json").mkdir()
    (d / "link.json").symlink_to(tmp_path)
    assert [p.name for p in store.list_json(d)] == ["a.json", "b.json"]
    assert store.list_json(layout.rollouts_dir(99, 0)) == []
    fs.down(errno.ENOTCONN)
    with capture_logs() as logs:
        assert store.list_json(d) == []
        assert store.list_json(d) == []
    assert len(warnings(logs)) == 1


def test_append_jsonl(store, layout):
    m = layout.events_file("worker_1")
    for i in range(3):
        assert store.append_jsonl(m, {"node_id": "worker_1", "round": i, "event": "x"}) is True
    assert [json.loads(x)["round"] for x in m.read_text().splitlines()] == [0, 1, 2]


def test_append_failure_leaves_no_partial_line(store, layout, fs):
    m = layout.metrics_file("worker_1")
    store.append_jsonl(m, {"node_id": "worker_1", "round": 0})
    fs.fail("fsync", errno.EIO, times=1)  # the write went through, fsync failed: cut back, then retried
    store.append_jsonl(m, {"node_id": "worker_1", "round": 1})
    assert [json.loads(x)["round"] for x in m.read_text().splitlines()] == [0, 1]


def test_lock_is_local_and_exclusive(store, layout, tmp_path):
    lk = store.lock("retention")
    assert isinstance(lk, filelock.FileLock)
    assert Path(lk.lock_file).parent == tmp_path / "locks"
    other = SharedStore(layout, lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool2")
    with lk:
        with store.lock("retention"):  # re-entrant for the same store
            pass
        result = []
        t = threading.Thread(target=lambda: result.append(_try(other.lock("retention", timeout=0))))
        t.start()
        t.join()
        assert result == [False]
    assert _try(other.lock("retention", timeout=0)) is True
    with pytest.raises(ValueError):
        store.lock("../x")


def _try(lk) -> bool:
    try:
        lk.acquire()
    except filelock.Timeout:
        return False
    lk.release()
    return True


def test_default_dirs_are_local_and_outside_root(layout, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    s = SharedStore(layout.root, node_id="worker_3")
    assert s.lock_dir.is_relative_to(tmp_path / "cache" / "sapo-swarm" / "locks")
    assert s.spool_dir.is_relative_to(tmp_path / "cache" / "sapo-swarm" / "spool")
    assert s.spool_dir.name == "worker_3"
    assert not s.lock_dir.is_relative_to(layout.root) and not s.spool_dir.is_relative_to(layout.root)
    with pytest.raises(ValueError):
        SharedStore(layout.root, node_id="../x")


def test_from_config(tmp_path):
    from node.config import resolve_config

    cfg = resolve_config(environ={"GDRIVE_PATH": str(tmp_path / "drive"), "EXPERIMENT_NAME": "e1"},
                         overrides=[f"exchange.lock_dir={tmp_path / 'L'}", "exchange.max_file_bytes=4096"])
    s = SharedStore.from_config(cfg, node_id="worker_2")
    assert s.root == tmp_path / "drive" / "experiments" / "e1"
    assert s.layout.archive_root == tmp_path / "drive" / "archives" / "e1"
    assert s.lock_dir.parent == tmp_path / "L" and s.max_file_bytes == 4096
    assert s.spool_dir.name == "worker_2" and not s.spool_dir.is_relative_to(tmp_path / "drive")
