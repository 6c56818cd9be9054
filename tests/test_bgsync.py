"""Durability off the critical path: durable="later" writes are visible at once and fsynced just after."""

from __future__ import annotations

import os
import threading

from node import fsio
from node.storage import SharedStore


class CountingFS(fsio.RealFS):
    """The real calls, counting fsyncs per path (files by fd, directories by path), optionally held back."""

    def __init__(self):
        self.synced: list[str] = []
        self.fd_paths: dict[int, str] = {}
        self.gate = threading.Event()
        self.gate.set()

    def open(self, path, flags, mode=0o666):
        fd = super().open(path, flags, mode)
        self.fd_paths[fd] = str(path)
        return fd

    def fsync(self, fd):
        self.gate.wait()
        self.synced.append(self.fd_paths.get(fd, "?"))
        super().fsync(fd)


def test_later_is_visible_before_the_fsync_and_synced_right_after(tmp_path):
    fs = CountingFS()
    store = SharedStore(tmp_path / "exp", fs=fs, lock_dir=tmp_path / "l", spool_dir=tmp_path / "s")
    path = store.layout.reward_file(3, 0, "worker_1")
    fs.gate.clear()  # hold the background fsync back
    store.publish(path, {"node_id": "worker_1", "round": 3}, durable="later")
    assert store.read_json(path) == {"node_id": "worker_1", "round": 3}  # another reader sees it already
    assert str(path) not in fs.synced
    assert not store.sync(timeout=0.2)  # still pending
    fs.gate.set()
    assert store.sync(timeout=30)
    assert str(path) in fs.synced and str(path.parent) in fs.synced  # the file, then its directory


def test_an_append_later_and_a_strict_write_are_both_synced(tmp_path):
    fs = CountingFS()
    store = SharedStore(tmp_path / "exp", fs=fs, lock_dir=tmp_path / "l", spool_dir=tmp_path / "s")
    metrics = store.layout.metrics_file("worker_1")
    store.append_jsonl(metrics, {"node_id": "worker_1", "round": 0}, durable="later")
    assert store.sync(timeout=30) and str(metrics) in fs.synced
    state = store.layout.state_file()
    store.write_json_atomic(state, {"round": 1})  # durable=True: synced before it returns, no thread
    assert any(p.endswith(".tmp") for p in fs.synced)  # the temp file was fsynced before the rename


def test_a_file_replaced_before_its_sync_is_skipped_not_an_error(tmp_path):
    fs = CountingFS()
    store = SharedStore(tmp_path / "exp", fs=fs, lock_dir=tmp_path / "l", spool_dir=tmp_path / "s")
    path = store.layout.peer_file("worker_1")
    fs.gate.clear()
    store.write_json_atomic(path, {"node_id": "worker_1"}, durable="later")
    os.unlink(path)
    fs.gate.set()
    assert store.sync(timeout=30)
