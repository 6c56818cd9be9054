"""Wake on filesystem events, poll as a fallback (node.wakeup), on real directories."""

from __future__ import annotations

import os
import threading
import time

import pytest

from node.fsio import write_atomic
from node.wakeup import MAX_IDLE_READS_PER_SECOND, Wakeup

LONG = 30.0  # a timeout no passing test waits out: an event must end the wait long before


def _later(seconds: float, fn) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(seconds), fn()), daemon=True)
    t.start()
    return t


def test_an_atomic_write_of_a_wanted_name_wakes_the_wait(tmp_path):
    w = Wakeup()
    if not w.active:
        pytest.skip("no inotify here")
    w.watch([tmp_path])
    writer = _later(0.05, lambda: write_atomic(tmp_path / "current_state.json", b"{}"))
    t = time.monotonic()
    assert w.wait(LONG, wanted=lambda name: name == "current_state.json")
    assert time.monotonic() - t < LONG / 2
    writer.join()


def test_unwanted_names_and_temp_files_do_not_wake_it(tmp_path):
    w = Wakeup()
    if not w.active:
        pytest.skip("no inotify here")
    w.watch([tmp_path])
    for i in range(50):
        (tmp_path / f"junk{i}.json").write_text("x")
    assert not w.wait(0.3, wanted=lambda name: name == "worker_1.json")


def test_without_events_every_wait_is_the_poll_interval(tmp_path):
    w = Wakeup(enabled=False)
    w.watch([tmp_path])
    (tmp_path / "a.json").write_text("x")
    t = time.monotonic()
    assert not w.wait(0.2)
    assert time.monotonic() - t >= 0.2 and not w.active


def test_a_directory_created_after_the_first_watch_is_watched_at_the_next(tmp_path):
    w = Wakeup()
    if not w.active:
        pytest.skip("no inotify here")
    later = tmp_path / "rollouts" / "round_3" / "stage_0"
    w.watch([later])  # not there yet: skipped, tried again
    assert not w.wait(0.05)
    later.mkdir(parents=True)
    w.watch([later])
    _later(0.05, lambda: write_atomic(later / "worker_2.json", b"{}"))
    assert w.wait(LONG, wanted=lambda name: name == "worker_2.json")


def test_an_event_storm_degrades_to_polling_not_to_a_busy_loop(tmp_path):
    w = Wakeup()
    if not w.active:
        pytest.skip("no inotify here")
    w.watch([tmp_path])
    stop = threading.Event()

    def storm():
        i = 0
        while not stop.is_set():
            (tmp_path / f"junk{i % 500}.json").write_text(str(i))
            i += 1
    reads = []
    real_read = w._inotify.read
    w._inotify.read = lambda **kw: reads.append(1) or real_read(**kw)
    t = threading.Thread(target=storm, daemon=True)
    t.start()
    try:
        started = time.monotonic()
        waits = 0
        while time.monotonic() - started < 1.0:
            w.wait(0.1, wanted=lambda name: name == "current_state.json")  # never written: every wait times out
            waits += 1
    finally:
        stop.set()
        t.join()
    assert w.woken == 0
    assert waits <= 11  # each wait lasted its interval: the junk never ended one early
    # at most MAX_IDLE_READS_PER_SECOND reads (+ a drain per wait) per second, then sleeps: never a spinning loop
    elapsed = time.monotonic() - started
    assert len(reads) <= (elapsed + 1) * MAX_IDLE_READS_PER_SECOND + 2 * waits


def test_a_symlink_is_never_watched_in_place_of_a_directory(tmp_path):
    w = Wakeup()
    if not w.active:
        pytest.skip("no inotify here")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, tmp_path / "link")
    w.watch([tmp_path / "link"])
    (outside / "worker_1.json").write_text("x")
    assert not w.wait(0.1)
