"""The quiet supervisor: status.json rewritten only when something lasting changed (or the refresh is due),
and psutil's scan of every process for a node's descendants done once per refresh, not every sample."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from doubles import FakeOS
from fake_node import fake_config
from node import fsio
from node.layout import ExperimentLayout
from node.signing import Signer
from node.storage import SharedStore
from supervisor.daemon import Supervisor
from supervisor.sdnotify import SdNotifier
from supervisor.status import StatusFile, lasting, read_status
from supervisor.statusview import render_status
from supervisor.watch import ProcessSampler, SharedPoller
from test_daemon import RecordingLog, advance, start_all


def snap(state="RUNNING", age=0.5, rss=100, updated=1.0):
    return {"state": "running", "summary": "round 3/10", "updated_at": updated, "round": 3,
            "supervisor": {"pid": 1, "rss_bytes": rss, "cpu_percent": 0.1}, "gpu": {"utilization": 7},
            "nodes": {"worker_1": {"state": state, "pid": 42, "heartbeat_age_s": age, "rss_bytes": rss,
                                   "phase": "train", "round": 3}}}


def test_passing_figures_are_not_lasting_changes():
    assert lasting(snap(age=0.1, rss=1, updated=1.0)) == lasting(snap(age=9.0, rss=2, updated=2.0))
    assert lasting(snap(state="RUNNING")) != lasting(snap(state="BACKOFF"))
    assert "heartbeat_age_s" not in lasting(snap())["nodes"]["worker_1"]
    assert lasting(snap())["nodes"]["worker_1"]["pid"] == 42


def test_status_file_writes_changes_at_once_and_passing_figures_on_the_refresh(tmp_path):
    path = tmp_path / "status.json"
    sf = StatusFile(path, RecordingLog(), refresh_s=5.0)
    assert sf.offer(snap(age=0.1), now=0.0)  # the first one
    assert not sf.offer(snap(age=0.6), now=0.5)  # only an age moved
    assert sf.offer(snap(state="BACKOFF"), now=1.0)  # a state changed: at once
    assert not sf.offer(snap(state="BACKOFF", age=3.0), now=5.9)
    assert sf.offer(snap(state="BACKOFF", age=5.0), now=6.0)  # the refresh is due
    assert sf.offer(snap(state="BACKOFF", age=5.1), now=6.1, force=True)
    assert '"heartbeat_age_s": 5.1' in path.read_text()


def test_the_supervisor_rewrites_status_on_a_state_change_not_every_monitor_interval(tmp_path):
    fos = FakeOS()
    cfg = fake_config(tmp_path / "shared", workers=1, monitor_interval_s=0.2)
    sup = Supervisor(cfg, os_=fos, gpu=None, runtime_dir=tmp_path / "rt", notifier=SdNotifier(environ={}),
                     log=RecordingLog(), environ={"PATH": "/bin"}, sample_processes=False)
    start_all(sup, fos)
    written = read_status(sup.paths)["updated_at"]
    advance(sup, fos, 2.0)  # ten monitor intervals, nothing but heartbeats
    assert read_status(sup.paths)["updated_at"] == written
    advance(sup, fos, 3.0)  # the refresh: ages and rounds get out
    refreshed = read_status(sup.paths)["updated_at"]
    assert refreshed > written
    fos.advance(0.1)
    fos.exit(sup.nodes["worker_1"].proc.pid, 1)
    sup.tick()  # a state change is written at once
    st = read_status(sup.paths)
    assert st["updated_at"] > refreshed and st["nodes"]["worker_1"]["state"] == "BACKOFF"


def test_descendants_are_looked_up_once_per_refresh(monkeypatch):
    calls = []
    real = psutil.Process.children

    def counting(self, recursive=False):
        calls.append(self.pid)
        return real(self, recursive=recursive)

    monkeypatch.setattr(psutil.Process, "children", counting)
    node = SimpleNamespace(proc=SimpleNamespace(pid=os.getpid()), rss_bytes=None, cpu_percent=None)
    sampler = ProcessSampler(tree_refresh_s=30.0)
    for now in (0.0, 2.0, 29.0):
        sampler.sample([node], now)
    assert calls == [os.getpid()] and node.rss_bytes > 1_000_000 and node.cpu_percent is not None
    sampler.sample([node], 30.0)
    assert calls == [os.getpid()] * 2
    node.proc = None  # the process ended: forgotten, nothing looked up
    sampler.sample([node], 31.0)
    assert calls == [os.getpid()] * 2 and not sampler._procs


def test_the_supervisors_own_cpu_is_averaged_over_the_refresh():
    sampler = ProcessSampler(self_every_s=5.0)
    sampler.sample_self(0.0)
    first = dict(sampler.me)
    assert first["rss_bytes"] > 1_000_000
    sampler.me["cpu_percent"] = -1.0  # a marker: not re-measured within the interval
    sampler.sample_self(4.9)
    assert sampler.me["cpu_percent"] == -1.0
    sampler.sample_self(5.0)
    assert sampler.me["cpu_percent"] >= 0.0


# --------------------------------------------------------------------------- the round switch in swarm status

KEY = bytes(range(32))


def switch(rnd: int, total: float | None, *, detect: float | None = 0.5, missing=(), node="coordinator") -> dict:
    return {"node_id": node, "timestamp": 1.0 + rnd, "round": rnd, "reason": "all_live_workers_submitted",
            "switch_ms": total, "detect_ms": detect, "start_ms": None if total is None else total - (detect or 0),
            "workers": 2, "missing": list(missing)}


def _switch_sup(tmp_path) -> tuple[Supervisor, RecordingLog, SharedStore]:
    log = RecordingLog()
    cfg = fake_config(tmp_path / "shared", workers=2)
    sup = Supervisor(cfg, os_=FakeOS(), gpu=None, runtime_dir=tmp_path / "rt", notifier=SdNotifier(environ={}),
                     log=log, environ={"PATH": "/bin"}, sample_processes=False)
    layout = ExperimentLayout.from_config(cfg)
    store = SharedStore(layout, node_id="coordinator", lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool",
                        signer=Signer(KEY))
    store.ensure_layout()
    return sup, log, store


def test_status_shows_the_last_round_switch_and_its_percentiles_from_signed_and_plain_lines(tmp_path):
    sup, log, store = _switch_sup(tmp_path)
    path = store.layout.round_switch_file()
    sup.shared.poll(wait_s=10.0)
    assert sup.shared.round_switch is None and sup.snapshot()["round_switch"] is None  # before the first switch
    assert "round switch" not in render_status(sup.snapshot(), running_pid=1, runtime_dir=tmp_path, experiment="x")

    for rnd in range(1, 101):  # signed lines, as the coordinator writes them: 1..100 ms
        store.append_jsonl(path, switch(rnd, float(rnd)))
    with path.open("a") as fh:  # an unsigned line (an older coordinator) and one naming missing workers
        fh.write(json.dumps(switch(101, 40.0)) + "\n")
        fh.write(json.dumps(switch(102, 30.0, detect=None, missing=["worker_2", "evil\x1b[2J"])) + "\n")
    sup.shared.poll(wait_s=10.0)
    sw = sup.snapshot()["round_switch"]
    # The last 50 lines (rounds 53..102): 53..100 ms, 40 ms and 30 ms.
    window = [float(r) for r in range(53, 101)] + [40.0, 30.0]
    assert sw["rounds"] == 50 and sw["incomplete"] == 1
    assert sw["switch_ms"]["p50"] == pytest.approx(statistics.median(window), abs=0.05)
    assert sw["switch_ms"]["p99"] == pytest.approx(99.5, abs=0.05)
    assert sw["detect_ms"] == {"p50": 0.5, "p99": 0.5}  # the null detect (a timer) left out
    assert sw["last"] == {"round": 102, "reason": "all_live_workers_submitted", "switch_ms": 30.0, "detect_ms": None,
                          "start_ms": 30.0, "workers": 2, "missing": ["worker_2", "evil\x1b[2J"], "missing_count": 2}
    assert not log.named("shared_lines_skipped")

    text = render_status(sup.snapshot(), running_pid=1, runtime_dir=tmp_path, experiment="x")
    (line,) = [x for x in text.splitlines() if x.startswith("round switch: ")]
    assert line == ("round switch: 30.0 ms into round 102 (detect -, start 30.0 ms); p50 "
                    f"{statistics.median(window):.1f} ms, p99 99.5 ms over the last 50; not started in time: "
                    "worker_2, evil\\x1b[2J")
    sup.write_status()
    assert read_status(sup.paths)["round_switch"]["last"]["round"] == 102  # --json shows it too


def test_the_poller_reads_only_the_end_of_the_switch_file_and_skips_bad_lines_once(tmp_path):
    sup, log, store = _switch_sup(tmp_path)
    path = store.layout.round_switch_file()
    path.parent.mkdir(parents=True)
    with path.open("w") as fh:  # ~4 MiB of old rounds: never read whole
        for rnd in range(20_000):
            fh.write(json.dumps(switch(rnd, 5.0)) + "\n")
        fh.write("not json\n")
        fh.write(json.dumps(switch(20_001, 7.0) | {"round": 10 ** 400}) + "\n")
        fh.write(json.dumps(switch(20_002, 9.0, node="worker_1")) + "\n")
        fh.write(json.dumps(switch(20_003, 8.0)) + "\n")
        fh.write(json.dumps(switch(20_004, 6.0))[:30])  # being appended: not a bad line
    read = []
    real = fsio.read_end

    def counting(p, **kw):
        data, begin, size = real(p, **kw)
        read.append((Path(p).name, len(data)))
        return data, begin, size

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fsio, "read_end", counting)
        sup.shared.poll(wait_s=10.0)
        sup.shared.poll(wait_s=10.0)
    assert ("round_switches.jsonl", SharedPoller.SWITCH_TAIL_BYTES) in read
    sw = sup.shared.round_switch
    assert sw["last"]["round"] == 20_003 and sw["rounds"] == 47  # 50 lines, 3 of them bad
    skipped = log.named("shared_lines_skipped")
    assert len(skipped) == 1 and skipped[0]["path"] == str(path)  # once, not once per poll
    assert skipped[0]["reason"].startswith("a line left out: ")

    path.unlink()
    os.mkfifo(path)  # refused without blocking; the last good figures kept
    sup.shared.poll(wait_s=10.0)
    assert not sup.shared._thread.is_alive() and sup.shared.round_switch == sw
    assert log.named("shared_file_refused")[-1] == {"path": str(path), "reason": "is not a regular file"}
