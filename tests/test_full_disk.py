"""A full local runtime disk (a real 4 MiB tmpfs): heartbeat writes fail visibly, and the supervisor's disk
check tells a full disk from a hang. The supervisor holding silent nodes is in tests/test_daemon.py."""

from __future__ import annotations

import errno

from structlog.testing import capture_logs

from conftest import fill_disk
from node.heartbeat import Heartbeat, read_heartbeat
from supervisor.managed import MIN_FREE_BYTES, RuntimeDisk, disk_full


class Clock:
    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_heartbeat_remembers_a_failing_write_and_logs_it_once(tiny_disk):
    clock = Clock()
    beat = Heartbeat(tiny_disk / "rt", "worker_1", "worker", 0.1, clock=clock)
    assert beat.write() and beat.write_errno is None and beat.failing_since is None
    filler = fill_disk(tiny_disk)
    with capture_logs() as logs:
        for _ in range(5):
            clock.t += 1.0
            assert beat.write() is False
    assert beat.write_errno == errno.ENOSPC and beat.failing_since == 1_700_000_001.0
    assert [e["event"] for e in logs] == ["heartbeat_write_failed"]  # once, not at every beat
    assert logs[0]["errno"] == errno.ENOSPC and "No space left" in logs[0]["error"]
    assert read_heartbeat(beat.path).heartbeat_at == 1_700_000_000.0  # the last good one stays, whole
    filler.unlink()
    clock.t += 1.0
    with capture_logs() as logs:
        assert beat.write() is True
    assert beat.write_errno is None and beat.failing_since is None
    assert [(e["event"], e["failed_for_s"]) for e in logs] == [("heartbeat_write_recovered", 5.0)]
    assert read_heartbeat(beat.path).heartbeat_at == clock.t


def test_disk_full_by_free_bytes_or_by_a_refused_probe(tiny_disk, tmp_path):
    assert disk_full(tiny_disk) is None
    filler = fill_disk(tiny_disk)
    full = disk_full(tiny_disk)
    assert full is not None and full.free_bytes < MIN_FREE_BYTES and "statvfs" in full.detail
    assert f"runtime dir {tiny_disk} is full ({full.free_bytes} bytes free" in full.one_line()
    probed = disk_full(tiny_disk, min_free_bytes=0)  # statvfs says nothing: the probe write decides
    assert probed is not None and "a probe write failed: No space left on device" in probed.detail
    assert not list(tiny_disk.glob(".disk-probe-*"))
    filler.unlink()
    assert disk_full(tiny_disk, min_free_bytes=0) is None and disk_full(tiny_disk) is None
    assert not list(tiny_disk.glob(".disk-probe-*"))


def test_runtime_disk_checks_at_most_every_second_and_reports_once_a_minute(tiny_disk):
    class Log:
        def __init__(self):
            self.events = []

        def error(self, event, **kw):
            self.events.append((event, kw))

        info = error

    log = Log()
    disk = RuntimeDisk(tiny_disk, log)
    assert disk.check(0.0) is None
    filler = fill_disk(tiny_disk)
    assert disk.check(0.5) is None  # cached: checked at most every check_s
    assert disk.check(1.0) is not None
    for t in range(1, 200, 10):
        disk.report(float(t), ["worker_1"])
    reports = [kw for e, kw in log.events if e == "runtime_disk_full"]
    assert [r["nodes"] for r in reports] == [["worker_1"]] * 4  # at 1, 61, 121, 181 s
    assert reports[0]["runtime_dir"] == str(tiny_disk) and reports[0]["free_bytes"] < MIN_FREE_BYTES
    filler.unlink()
    assert disk.check(300.0) is None
    assert log.events[-1][0] == "runtime_disk_ok"
