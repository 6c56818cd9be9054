"""Full disks, files replaced mid-read, half-written files, stale locks: nothing lost, nothing crashes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from conftest import fill_disk
from fakes import FlakyFS
from node.checkpoint import load_latest_checkpoint, save_checkpoint
from scenarios import record
from node.layout import ExperimentLayout
from node.schemas import RolloutFile
from node.storage import SharedStore
from sapo.tiny_model import build_tiny_gpt2

pytestmark = pytest.mark.chaos


def test_enospc_during_checkpoint_keeps_the_previous_one(tmp_path, tiny_disk):
    import torch

    layout = ExperimentLayout.for_experiment(tiny_disk, "exp")
    store = SharedStore(layout, node_id="worker_1", lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool",
                        sleep=lambda s: None, retry_attempts=2)
    store.ensure_layout()
    model, _ = build_tiny_gpt2(seed=0)
    opt = torch.optim.Adam(model.parameters())
    assert save_checkpoint(store, layout, "worker_1", 0, model, opt, keep_last=3)
    filler = fill_disk(tiny_disk)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with capture_logs() as logs:
        assert not save_checkpoint(store, layout, "worker_1", 1, model, opt, keep_last=3)
    failed = [e for e in logs if e["event"] == "checkpoint_failed"]
    assert failed and "No space left" in failed[0]["error"]
    assert not list(tiny_disk.rglob("*.tmp")), "a partial temp file was left behind"
    fresh, _ = build_tiny_gpt2(seed=5)
    restored = load_latest_checkpoint(store, layout, "worker_1", fresh, torch.optim.Adam(fresh.parameters()),
                                      max_bytes=1 << 30)
    assert restored.round == 0  # the previous checkpoint is intact and loads
    filler.unlink()  # space returns: the node recovers at its next checkpoint
    assert save_checkpoint(store, layout, "worker_1", 1, model, opt, keep_last=3)
    record("enospc_checkpoint", faults="checkpoint of round 1 onto a full tmpfs (real ENOSPC)",
           recover="next checkpoint succeeds once space returns", error=failed[0]["error"][:80],
           previous_checkpoint_loads=True, temp_files_left=0)


def test_enospc_during_publish_spools_then_lands(tmp_path, tiny_disk):
    layout = ExperimentLayout.for_experiment(tiny_disk, "exp")
    store = SharedStore(layout, node_id="worker_1", lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool",
                        sleep=lambda s: None, retry_attempts=2)
    store.ensure_layout()
    filler = fill_disk(tiny_disk)
    body = {"payload": "x" * 10_000}
    paths = [layout.reward_file(r, 0, "worker_1") for r in range(3)]
    for path in paths:
        assert store.publish(path, body) is False
    assert len(store.spooled()) == 3
    filler.unlink()
    assert store.flush_spool() == 3
    assert all(json.loads(p.read_text()) == body for p in paths)
    record("enospc_publish", faults="3 publishes onto a full tmpfs (real ENOSPC)",
           recover="spool flushed when space returns", spooled=3, landed=3)


def test_reader_never_sees_half_a_file(tmp_path):
    """One writer replaces a peer file atomically in a loop while we read it: every read is whole."""
    layout = ExperimentLayout.for_experiment(tmp_path / "shared", "exp")
    writer = SharedStore(layout, node_id="worker_2", lock_dir=tmp_path / "l2", spool_dir=tmp_path / "s2")
    reader = SharedStore(layout, node_id="worker_1", lock_dir=tmp_path / "l1", spool_dir=tmp_path / "s1")
    writer.ensure_layout()
    path = layout.rollout_file(0, 0, "worker_2")
    stop = threading.Event()

    def write_loop():
        k = 0
        while not stop.is_set():
            k += 1
            file = RolloutFile(peer_id="worker_2", round=0, stage=0, timestamp=float(k), rollouts={})
            writer.write_json_atomic(path, {**file.to_json(), "padding": "y" * (k % 7) * 5000})

    thread = threading.Thread(target=write_loop)
    thread.start()
    try:
        reads = 0
        with capture_logs() as logs:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                got = reader.read_as(path, RolloutFile.from_json, expect_round=0, expect_stage=0, expect_node="worker_2")
                reads += got is not None
    finally:
        stop.set()
        thread.join()
    assert reads > 50
    assert not [e for e in logs if e["event"] == "peer_file_rejected"]
    record("stale_read", faults="a peer file atomically replaced in a loop for 2 s while read",
           recover="n/a (no error)", reads=reads, torn_reads=0)


def test_half_written_file_from_a_killed_writer_is_skipped(tmp_path):
    """A writer that did not use atomic writes was SIGKILLed mid-file: the file is skipped, not fatal."""
    layout = ExperimentLayout.for_experiment(tmp_path / "shared", "exp")
    store = SharedStore(layout, node_id="worker_1", lock_dir=tmp_path / "l", spool_dir=tmp_path / "s")
    store.ensure_layout()
    path = layout.rollout_file(0, 0, "worker_3")
    path.parent.mkdir(parents=True, exist_ok=True)
    code = (f"import sys, time\nf = open({str(path)!r}, 'w')\n"
            "f.write('{\"schema_version\": 1, \"peer_id\": \"worker_3\", \"rollouts\": {\"0\": [' + 'x' * 100000)\n"
            "f.flush()\nprint('ready', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    with capture_logs() as logs:
        assert store.read_as(path, RolloutFile.from_json, expect_round=0, expect_stage=0, expect_node="worker_3") is None
    assert [e["event"] for e in logs] == ["peer_file_rejected"]
    record("half_written", faults="a non-atomic writer SIGKILLed mid-file (100 kB of a rollout file)",
           recover="n/a (skipped with one warning)", warnings=1)


def test_lock_held_by_a_killed_process_is_released(tmp_path):
    """filelock uses flock: the kernel drops the lock with its holder, so no stale lock blocks us."""
    layout = ExperimentLayout.for_experiment(tmp_path / "shared", "exp")
    store = SharedStore(layout, node_id="worker_1", lock_dir=tmp_path / "locks", spool_dir=tmp_path / "s")
    holder = (
        "import sys, time\nsys.path.insert(0, %r)\n"
        "from node.layout import ExperimentLayout\nfrom node.storage import SharedStore\n"
        "s = SharedStore(ExperimentLayout.for_experiment(%r, 'exp'), lock_dir=%r, spool_dir=%r)\n"
        "s.lock('config-snapshot').acquire()\nprint('locked', flush=True)\ntime.sleep(60)\n"
    ) % (str(Path(__file__).resolve().parents[2]), str(tmp_path / "shared"), str(tmp_path / "locks"),
         str(tmp_path / "s2"))
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        lock = store.lock("config-snapshot", timeout=0.2)
        with pytest.raises(Exception):
            lock.acquire()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        killed = time.monotonic()
        lock.acquire(timeout=5)
        lock.release()
        record("stale_lock", faults="the config-snapshot lock held by a process, then SIGKILLed",
               recover=f"lock acquired {time.monotonic() - killed:.3f} s after the kill")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_flaky_fs_eio_bursts_never_raise_from_reads(tmp_path):
    fs = FlakyFS()
    layout = ExperimentLayout.for_experiment(tmp_path / "shared", "exp")
    store = SharedStore(layout, node_id="worker_1", lock_dir=tmp_path / "l", spool_dir=tmp_path / "s", fs=fs,
                        sleep=lambda s: None, retry_attempts=2)
    store.ensure_layout()
    path = layout.state_file()
    store.write_json_atomic(path, {"a": 1})
    for err in (errno.EIO, errno.ENOTCONN, errno.ESTALE, errno.EAGAIN):
        fs.down(err)
        assert store.read_json(path) is None
        assert store.list_json(layout.peers_dir()) == []
        fs.heal()
        assert store.read_json(path) == {"a": 1}
    record("io_bursts", faults="EIO, ENOTCONN, ESTALE, EAGAIN on every call (2 retries each)",
           recover="first read after the fault ends", exceptions=0)
