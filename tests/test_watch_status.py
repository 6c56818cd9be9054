"""The quiet supervisor: status.json rewritten only when something lasting changed (or the refresh is due),
and psutil's scan of every process for a node's descendants done once per refresh, not every sample."""

from __future__ import annotations

import os
from types import SimpleNamespace

import psutil

from doubles import FakeOS
from fake_node import fake_config
from supervisor.daemon import Supervisor
from supervisor.sdnotify import SdNotifier
from supervisor.status import StatusFile, lasting, read_status
from supervisor.watch import ProcessSampler
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
