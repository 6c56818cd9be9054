"""Liveness by the reader's clock: future-dated, replayed and junk peer records change nothing."""

from __future__ import annotations

import time

from node.layout import ExperimentLayout
from node.liveness import PeerTracker
from node.schemas import PeerRecord
from node.signing import Signer
from node.storage import SharedStore

KEY = bytes(range(32))


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _store(tmp_path, key=KEY) -> SharedStore:
    store = SharedStore(ExperimentLayout(tmp_path / "exp"), signer=Signer(key), lock_dir=tmp_path / "locks",
                        spool_dir=tmp_path / "spool")
    store.ensure_layout()
    return store


def _write(store: SharedStore, node: str, *, beat: float, progress: int, started: float = 1.0, status="running"):
    record = PeerRecord(node_id=node, role="worker", pid=1, host="h", started_at=started, heartbeat_at=beat,
                        round=0, progress=progress, status=status)
    store.write_json_atomic(store.layout.peer_file(node), record.to_json())
    return store.layout.peer_file(node).read_bytes()


def test_a_record_dated_in_the_future_is_live_only_while_it_keeps_changing(tmp_path):
    store, clock = _store(tmp_path), Clock()
    tracker = PeerTracker(store, store.layout, timeout_s=10, clock=clock)
    _write(store, "w1", beat=clock.t + 10**9, progress=1)  # a century ahead
    _write(store, "w2", beat=clock.t, progress=1)
    assert set(tracker.live_workers()) == {"w1", "w2"}
    clock.t += 11
    _write(store, "w2", beat=clock.t, progress=2)  # w2 keeps beating, w1's record never changes again
    assert set(tracker.live_workers()) == {"w2"}


def test_a_record_from_the_past_is_as_old_as_it_says_until_it_changes(tmp_path):
    store, clock = _store(tmp_path), Clock()
    tracker = PeerTracker(store, store.layout, timeout_s=10, clock=clock)
    _write(store, "w1", beat=clock.t - 60, progress=5)
    assert tracker.live_workers() == {}
    _write(store, "w1", beat=clock.t - 59, progress=6)  # its clock is a minute behind ours, but it beats
    assert set(tracker.live_workers()) == {"w1"}


def test_replaying_older_signed_copies_is_no_sign_of_life(tmp_path):
    store, clock = _store(tmp_path), Clock()
    tracker = PeerTracker(store, store.layout, timeout_s=10, clock=clock)
    path = store.layout.peer_file("w1")
    old = [_write(store, "w1", beat=clock.t + i, progress=i) for i in range(1, 4)]
    assert set(tracker.live_workers()) == {"w1"}
    for _ in range(5):  # an outsider copies the old (validly signed) versions back in turn
        clock.t += 4
        for data in old:
            path.write_bytes(data)
            tracker.scan()
    assert tracker.live_workers() == {}
    _write(store, "w1", beat=clock.t, progress=1, started=2.0)  # a restart: a new incarnation is life
    assert set(tracker.live_workers()) == {"w1"}


def test_unsigned_forged_and_finished_records_are_not_live(tmp_path):
    store, clock = _store(tmp_path), Clock()
    tracker = PeerTracker(store, store.layout, timeout_s=10, clock=clock)
    outsider = _store(tmp_path, key=bytes(range(2, 34)))
    _write(outsider, "forged", beat=clock.t, progress=1)
    store.layout.peer_file("plain").write_text(
        PeerRecord(node_id="plain", role="worker", pid=1, host="h", started_at=1.0, heartbeat_at=clock.t,
                   round=0, progress=1, status="running").to_json().__repr__())
    _write(store, "done", beat=clock.t, progress=1, status="finished")
    _write(store, "w1", beat=clock.t, progress=1)
    assert set(tracker.live_workers()) == {"w1"}
    assert tracker.known_workers(scan=False) == {"w1", "done"}


def test_thousands_of_junk_records_cost_one_lstat_each_and_never_hide_a_known_peer(tmp_path):
    store, clock = _store(tmp_path), Clock()
    tracker = PeerTracker(store, store.layout, timeout_s=10, clock=clock, max_records=256)
    _write(store, "w1", beat=clock.t, progress=1)
    tracker.scan()
    junk = store.layout.peers_dir()
    for i in range(5000):
        (junk / f"a{i:05d}.json").write_bytes(b'{"node_id":"a","hmac":"' + b"0" * 64 + b'"}')
    reads = []
    original = store.read_as
    store.read_as = lambda *a, **k: reads.append(a[0]) or original(*a, **k)
    t = time.perf_counter()
    for step in range(20):
        clock.t += 1
        _write(store, "w1", beat=clock.t, progress=2 + step)
        assert set(tracker.live_workers()) == {"w1"}  # the known peer is looked at first, every scan
    elapsed = time.perf_counter() - t
    junk_reads = [p for p in reads if p.name.startswith("a")]
    assert len(junk_reads) <= 20 * 255  # at most the cap per scan...
    assert len(set(junk_reads)) == len(junk_reads)  # ...and each junk file read once, then only lstat'ed
    print(f"20 scans of 5000 junk records: {elapsed:.2f} s, {len(junk_reads)} junk reads")


def test_a_new_peer_among_thousands_of_junk_names_is_found_at_the_next_discovery(tmp_path):
    store, clock = _store(tmp_path), Clock()
    tracker = PeerTracker(store, store.layout, timeout_s=10, clock=clock, max_records=1024)
    for i in range(5000):
        (store.layout.peers_dir() / f"a{i:05d}.json").write_bytes(b'{"node_id":"a"}')
    for _ in range(6):  # each junk file is read once (1024 per discovery), then only lstat'ed
        clock.t += 1
        tracker.scan()
    _write(store, "worker_7", beat=clock.t, progress=1)
    clock.t += 1
    assert set(tracker.live_workers()) == {"worker_7"}
