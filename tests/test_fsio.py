"""node.fsio (the one atomic write and the one JSONL reader), node.retry, node.warn_once, and their users
outside the store (heartbeats, recorded metrics rounds)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from node import fsio
from node.fsio import BadFile
from node.heartbeat import MAX_HEARTBEAT_BYTES, Heartbeat, read_heartbeat
from node.layout import ExperimentLayout
from node.records import recorded_rounds
from node.retry import RetryPolicy
from node.storage import SharedStore
from node.strict_json import encode_json
from node.warn_once import WarnOnce

from fakes import FlakyFS

# -- the JSONL reader ---------------------------------------------------------------------------------------

JSONL = b'{"round": 0}\n\nnot json\n[1, 2]\n{"round": NaN}\n{"round": 1}\n{"round": 2, "partial'


def test_iter_jsonl_numbers_lines_and_keeps_the_reason(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(JSONL)
    got = list(fsio.iter_jsonl(p))
    assert [n for n, _ in got] == [1, 3, 4, 5, 6, 7]  # the blank line 2 is skipped, not counted as bad
    assert got[0][1] == {"round": 0} and got[2][1] == [1, 2] and got[4][1] == {"round": 1}
    assert all(isinstance(got[i][1], ValueError) for i in (1, 3, 5))  # not JSON, NaN, partial last line


def test_read_jsonl_rows_and_bad_count(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(JSONL)
    assert fsio.read_jsonl(p) == ([{"round": 0}, {"round": 1}], 4)
    assert fsio.read_jsonl(tmp_path / "missing.jsonl") == ([], 0)
    assert fsio.read_jsonl(tmp_path / "m.jsonl" / "below") == ([], 0)  # a file on the way: missing


def test_read_jsonl_reads_only_the_first_max_bytes(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b"".join(b'{"round": %d}\n' % i for i in range(1000)))
    rows, bad = fsio.read_jsonl(p, max_bytes=30)  # 13 bytes a line: two whole lines and a cut one
    assert rows == [{"round": 0}, {"round": 1}] and bad == 1


def test_read_jsonl_long_lines_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(fsio, "_READ_CHUNK", 7)
    p = tmp_path / "m.jsonl"
    lines = [{"text": "x" * n} for n in (0, 5, 20, 3)]
    p.write_bytes(b"".join(encode_json(x) + b"\n" for x in lines))
    assert fsio.read_jsonl(p) == (lines, 0)


def test_read_jsonl_refuses_symlinks_and_directories(tmp_path):
    target = tmp_path / "real.jsonl"
    target.write_bytes(b'{"a": 1}\n')
    (tmp_path / "link.jsonl").symlink_to(target)
    with pytest.raises(BadFile, match="symlink"):
        fsio.read_jsonl(tmp_path / "link.jsonl")
    with pytest.raises(BadFile, match="not a regular file"):
        fsio.read_jsonl(tmp_path)


def test_store_read_jsonl_warns_once_and_tolerates_the_mount(tmp_path):
    layout = ExperimentLayout.for_experiment(tmp_path / "shared", "exp")
    layout.ensure_dirs()
    fs = FlakyFS()
    store = SharedStore(layout, node_id="worker_1", lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool",
                        fs=fs, sleep=lambda s: None, retry_attempts=2)
    m = layout.metrics_file("worker_1")
    for r in (0, 1):
        store.append_jsonl(m, {"node_id": "worker_1", "round": r})
    store.append_jsonl(m, {"node_id": "worker_2", "round": 7})
    assert recorded_rounds(store, m, "worker_1") == {0, 1}
    fs.down(errno.ENOTCONN)
    with capture_logs() as logs:
        assert store.read_jsonl(m) == ([], 0)
        assert store.read_jsonl(m) == ([], 0)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["peer_file_rejected"]
    fs.heal()
    assert len(store.read_jsonl(m)[0]) == 3
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes(b"{}\n")
    assert store.read_jsonl(outside) == ([], 0)


# -- writes, listing ----------------------------------------------------------------------------------------

def test_write_atomic_durable_or_not(tmp_path):
    fs = FlakyFS()
    p = tmp_path / "new" / "f.json"
    fsio.write_atomic(p, b"one", fs=fs)
    assert p.read_bytes() == b"one" and fs.calls["fsync"] == 2  # the file and its directory
    fsio.write_atomic(p, b"two", fs=fs, durable=False)
    assert p.read_bytes() == b"two" and fs.calls["fsync"] == 2
    fs.fail("replace", errno.EIO, times=1)
    with pytest.raises(OSError):
        fsio.write_atomic(p, b"three", fs=fs)
    assert p.read_bytes() == b"two" and os.listdir(p.parent) == ["f.json"]


def test_write_atomic_temp_name_stays_short(tmp_path):
    long = tmp_path / ("x" * 250)
    fsio.write_atomic(long, b"{}")
    assert long.read_bytes() == b"{}"


def test_list_files_sorts_and_refuses(tmp_path):
    for name in ("b.json", "a.json", ".a.json.1.tmp", "notes.txt"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "link.json").symlink_to(tmp_path / "a.json")
    files, refused = fsio.list_files(tmp_path)
    assert [p.name for p in files] == ["a.json", "b.json"]
    assert {(p.name, reason) for p, reason, _ in refused} == {("link.json", "symlink"),
                                                               ("notes.txt", "not a .json file (ignored)")}
    assert fsio.list_files(tmp_path / "missing") == ([], [])


def test_heartbeat_round_trip_and_refusals(tmp_path):
    beat = Heartbeat(tmp_path, "worker_1", "worker", 1.0, clock=lambda: 5.0)
    beat.write()
    rec = read_heartbeat(beat.path)
    assert rec is not None and rec.node_id == "worker_1" and rec.heartbeat_at == 5.0
    assert [n for n in os.listdir(tmp_path) if n.endswith(fsio.TEMP_SUFFIX)] == []
    beat.path.write_bytes(b" " * (MAX_HEARTBEAT_BYTES + 1))
    assert read_heartbeat(beat.path) is None
    beat.path.unlink()
    beat.path.symlink_to(tmp_path / "elsewhere.json")
    assert read_heartbeat(beat.path) is None
    assert read_heartbeat(tmp_path / "missing.heartbeat.json") is None


def test_heartbeat_with_a_broken_clock_writes_nothing_and_does_not_raise(tmp_path):
    beat = Heartbeat(tmp_path, "worker_1", "worker", 1.0, clock=lambda: float("nan"))
    beat.write()
    assert not beat.path.exists()


# -- retry policy and warn-once -----------------------------------------------------------------------------

def test_retry_policy_retries_transient_errors_only():
    sleeps = []
    policy = RetryPolicy(attempts=3, sleep=sleeps.append)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError(errno.ESTALE, "stale")
        return "ok"

    assert policy(flaky) == "ok" and len(sleeps) == 2
    with pytest.raises(OSError):
        policy(lambda: (_ for _ in ()).throw(OSError(errno.EIO, "eio")), attempts=1)
    with pytest.raises(PermissionError):
        policy(lambda: (_ for _ in ()).throw(PermissionError(errno.EACCES, "no")))
    assert len(sleeps) == 2


def test_warn_once_per_signature_and_capped():
    warn = WarnOnce(cap=2)
    with capture_logs() as logs:
        warn(Path("a"), (1,), "bad")
        warn(Path("a"), (1,), "bad")
        warn(Path("a"), (2,), "bad")  # a new version of the file
        warn.clear("a")
        warn(Path("a"), (2,), "bad")  # fine in between
        warn("b", (1,), "bad")
        warn("c", (1,), "bad")  # forgets "a", the least recently warned
        warn("a", (2,), "bad")
    assert [e["path"] for e in logs] == ["a", "a", "a", "b", "c", "a"]
