"""The supervisor daemon: the state machine on FakeOS (scripted histories), then real processes.

Real-process tests use ``tests/fake_node.py`` (stdlib + node.heartbeat, no torch) as the node command.
Every test leaves no process behind: the ``reaper`` fixture (tests/conftest.py) makes this process a child
subreaper and SIGKILLs/reaps every descendant at teardown.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import fill_disk
from doubles import FakeOS
from fake_node import FAKE_NODE, config_yaml, drive, fake_config, write_heartbeat
from harness import Timeouts, alive, still_alive, wait_for
from node.logs import rotated_files, truncate_if_large
from supervisor import cli, procs, statusview
from supervisor.daemon import LOG_CHECK_S, Supervisor
from supervisor.managed import MIN_FREE_BYTES
from supervisor.runfiles import AlreadyRunning, RuntimePaths
from supervisor.status import read_status
from supervisor.sdnotify import SdNotifier
from supervisor.states import NodeState

S = NodeState
REPO = Path(__file__).resolve().parents[1]


class RecordingLog:
    def __init__(self):
        self.events: list[tuple[str, str, dict]] = []

    def _add(self, level, event, kw):
        self.events.append((level, event, kw))

    def info(self, event, **kw):
        self._add("info", event, kw)

    def warning(self, event, **kw):
        self._add("warning", event, kw)

    def error(self, event, **kw):
        self._add("error", event, kw)

    def named(self, event):
        return [kw for _, e, kw in self.events if e == event]


# --------------------------------------------------------------------------- FakeOS harness

def fake_sup(tmp_path, workers=2, os_=None, runtime_dir=None, log_max_bytes=None,
             **supervisor) -> tuple[Supervisor, FakeOS, RecordingLog]:
    fos = os_ or FakeOS()
    log = RecordingLog()
    cfg = fake_config(tmp_path / "shared", workers=workers, **supervisor)
    sup = Supervisor(cfg, config_path=tmp_path / "cfg.yaml", overrides=["sapo.num_generations=4"], os_=fos, gpu=None,
                     runtime_dir=runtime_dir or tmp_path / "rt", notifier=SdNotifier(environ={}), log=log,
                     environ={"PATH": "/bin"}, sample_processes=False,
                     **({"log_max_bytes": log_max_bytes} if log_max_bytes else {}))
    return sup, fos, log


def beat(sup: Supervisor, fos: FakeOS, name: str, *, progress_age: float = 0.0, **kw) -> None:
    node = sup.nodes[name]
    write_heartbeat(sup.paths.root, name, pid=node.proc.pid, at=fos.now(), progress_at=fos.now() - progress_age,
                    role=node.role, **kw)


def state(sup, name) -> NodeState:
    return sup.nodes[name].status.state


def start_all(sup, fos) -> None:
    """Tick through the staggered start, heartbeating each node as it spawns."""
    for name in sup.nodes:
        sup.tick()
        assert state(sup, name) is S.STARTING, name
        beat(sup, fos, name)
    sup.tick()
    assert all(n.status.state is S.RUNNING for n in sup.nodes.values())


def advance(sup, fos, seconds, step=0.1, beat_running=True) -> None:
    """Move the fake clocks forward, heartbeating every RUNNING node, ticking as we go."""
    t = 0.0
    while t < seconds - 1e-9:
        fos.advance(step)
        t += step
        if beat_running:
            for name, n in sup.nodes.items():
                if n.status.state is S.RUNNING and n.proc is not None:
                    beat(sup, fos, name)
        sup.tick()


# --------------------------------------------------------------------------- FakeOS: the state machine

def test_staggered_start_one_node_at_a_time_with_the_contract(tmp_path):
    sup, fos, log = fake_sup(tmp_path, workers=2, stagger="heartbeat")
    sup.tick()
    assert [p.args[-3] for p in fos.spawned] == ["coordinator"]  # --node-id coordinator --set k=v
    sup.tick()
    fos.advance(1.0)
    sup.tick()
    assert len(fos.spawned) == 1, "a worker was spawned before the coordinator heartbeat"
    beat(sup, fos, "coordinator")
    sup.tick()
    assert state(sup, "coordinator") is S.RUNNING and len(fos.spawned) == 2
    beat(sup, fos, "worker_1")
    sup.tick()
    assert len(fos.spawned) == 3
    coord, w1, _ = fos.spawned
    assert w1.args == [*sup.node_command, "--config", str((tmp_path / "cfg.yaml").absolute()), "--role", "worker",
                       "--node-id", "worker_1", "--set", "sapo.num_generations=4"]
    assert coord.env["NODE_ROLE"] == "coordinator" and coord.env["CUDA_VISIBLE_DEVICES"] == ""
    assert w1.env["NODE_ID"] == "worker_1" and w1.env["SWARM_DEVICE"] == "cpu"
    assert w1.env["SWARM_RUNTIME_DIR"] == str(tmp_path / "rt") and "SWARM_MEMORY_FRACTION" not in w1.env
    assert w1.env["CUDA_VISIBLE_DEVICES"] == "" and "SWARM_MEMORY_BYTES" not in w1.env
    assert "CUDA_DEVICE_ORDER" not in w1.env  # a CPU worker needs no device order
    assert [kw["node"] for kw in log.named("node_spawned")] == ["coordinator", "worker_1", "worker_2"]


def test_cpu_swarm_spawns_every_node_at_once_and_restarts_wait_for_no_start_up(tmp_path):
    sup, fos, log = fake_sup(tmp_path, workers=3)  # supervisor.device cpu, stagger auto
    sup.tick()
    assert sup.stagger == "none" and log.named("gpu_plan")[0]["stagger"] == "none"
    assert [p.args[-3] for p in fos.spawned] == ["coordinator", "worker_1", "worker_2", "worker_3"]
    assert all(n.status.state is S.STARTING for n in sup.nodes.values())  # no heartbeat yet, none waited for
    assert sup.next_wake(fos.monotonic()) <= 0.25 + 1e-9  # polls for the first heartbeats, nothing held
    for name in ("coordinator", "worker_1", "worker_2"):
        beat(sup, fos, name)
    sup.tick()
    w2 = sup.nodes["worker_2"]
    fos.exit(w2.proc.pid, 1)
    sup.tick()
    assert w2.status.state is S.BACKOFF and state(sup, "worker_3") is S.STARTING
    fos.advance(w2.status.backoff_until - fos.monotonic())
    sup.tick()  # worker_3 is still starting: with "none" the restart does not wait for it
    assert w2.status.state is S.STARTING and w2.status.restarts == 1 and state(sup, "worker_3") is S.STARTING


def test_gpu_swarm_starts_the_next_worker_once_the_previous_one_loaded_its_model(tmp_path):
    from doubles import FakeGpu
    from supervisor.gpu import GIB

    fos, log = FakeOS(), RecordingLog()
    cfg = fake_config(tmp_path / "shared", workers=3, device="cuda", memory_fraction="auto",
                      cuda_context_margin_gb=0.5)
    sup = Supervisor(cfg, os_=fos, gpu=FakeGpu(80 * GIB), runtime_dir=tmp_path / "rt",
                     notifier=SdNotifier(environ={}), log=log, environ={}, sample_processes=False)
    spawned = lambda: [p.args[-1] for p in fos.spawned]  # noqa: E731 - ... --node-id NAME (no --set here)
    sup.tick()
    assert sup.stagger == "loaded"
    assert spawned() == ["coordinator", "worker_1"]  # the coordinator loads no model: it holds no one back
    fos.advance(1.0)
    beat(sup, fos, "coordinator")
    sup.tick()
    assert spawned() == ["coordinator", "worker_1"], "a second model load began while worker_1 was loading"
    beat(sup, fos, "worker_1", phase="loaded", status="starting")  # its first heartbeat: the model is loaded
    sup.tick()
    assert state(sup, "worker_1") is S.RUNNING and spawned() == ["coordinator", "worker_1", "worker_2"]
    w1 = sup.nodes["worker_1"]
    fos.exit(w1.proc.pid, 1)  # worker_1 crashes while worker_2 is loading: its restart waits its turn
    sup.tick()
    fos.advance(w1.status.backoff_until - fos.monotonic() + 0.1)
    sup.tick()
    assert w1.status.state is S.BACKOFF and spawned()[-1] == "worker_2"
    assert sup.next_wake(fos.monotonic()) >= min(0.25, sup.sv.monitor_interval_s) - 1e-9  # held: no busy loop
    beat(sup, fos, "worker_2", phase="loaded", status="starting")
    sup.tick()  # worker_2 loaded: worker_1's restart goes first (start order), worker_3 after its load
    assert spawned()[-1] == "worker_1" and w1.status.state is S.STARTING and state(sup, "worker_3") is S.STOPPED
    beat(sup, fos, "worker_1", phase="loaded", status="starting")
    sup.tick()
    assert spawned()[-1] == "worker_3"


def test_startup_timeout_is_a_hang_and_the_next_node_goes_on(tmp_path):
    sup, fos, log = fake_sup(tmp_path, workers=1, startup_timeout_s=5.0, stagger="heartbeat")
    sup.tick()
    coord = fos.spawned[0]
    fos.advance(5.1)
    sup.tick()
    assert (coord.pid, signal.SIGKILL) in fos.sent and state(sup, "coordinator") is S.STOPPING
    fos.advance(0.1)
    sup.tick()  # reaped: hung -> BACKOFF; the gate is free, so worker_1 starts meanwhile
    st = sup.nodes["coordinator"].status
    assert st.state is S.BACKOFF and st.last_exit.reason == "hung"
    assert "no first heartbeat within startup_timeout_s=5" in st.last_exit.detail
    assert fos.spawned[-1].args[-3] == "worker_1"
    assert log.named("node_hung")


def test_backoff_to_fatal(tmp_path):
    sup, fos, log = fake_sup(tmp_path, workers=2, backoff_initial_s=1.0, backoff_max_s=4.0, max_restarts=3,
                             restart_window_s=600.0, stable_after_s=300.0)
    start_all(sup, fos)
    delays = []
    for _ in range(4):
        w1 = sup.nodes["worker_1"]
        fos.exit(w1.proc.pid, 1)
        sup.tick()
        if w1.status.state is S.FATAL:
            break
        assert w1.status.state is S.BACKOFF
        delays.append(round(w1.status.backoff_until - fos.monotonic(), 6))
        advance(sup, fos, delays[-1], step=delays[-1])  # the others keep heartbeating
        assert w1.status.state is S.STARTING
        beat(sup, fos, "worker_1")
        sup.tick()
        assert w1.status.state is S.RUNNING
    w1 = sup.nodes["worker_1"].status
    assert delays == [1.0, 2.0, 4.0]
    assert w1.state is S.FATAL and "failed 4 times" in w1.fatal_reason and "max_restarts=3" in w1.fatal_reason
    assert w1.restarts == 3
    # the rest of the swarm keeps going, and the supervisor stays up
    assert state(sup, "coordinator") is S.RUNNING and state(sup, "worker_2") is S.RUNNING
    advance(sup, fos, 1.0)
    assert sup.exit_code is None and state(sup, "worker_1") is S.FATAL
    snap = read_status(sup.paths)
    assert snap["nodes"]["worker_1"]["state"] == "FATAL"
    assert snap["fatal"] == [{"node": "worker_1", "reason": w1.fatal_reason}]


def test_config_error_after_startup_failures(tmp_path):
    sup, fos, log = fake_sup(tmp_path, workers=1, backoff_initial_s=0.5, startup_failures_fatal=3)
    sup.tick()
    beat(sup, fos, "coordinator")
    sup.tick()  # worker_1 spawned
    for attempt in range(3):
        w = sup.nodes["worker_1"]
        assert w.status.state is S.STARTING
        fos.exit(w.proc.pid, 1)
        sup.tick()
        if attempt < 2:
            assert w.status.state is S.BACKOFF
            advance(sup, fos, 1.0, step=0.5)
    st = sup.nodes["worker_1"].status
    assert st.state is S.FATAL
    assert st.fatal_reason.startswith("configuration error: worker_1 failed 3 times before its first heartbeat")
    assert len(fos.spawned) == 4  # coordinator + 3 attempts, then no more
    advance(sup, fos, 10.0)
    assert len(fos.spawned) == 4


def test_exit_code_2_is_fatal_at_once_with_the_nodes_message(tmp_path):
    sup, fos, log = fake_sup(tmp_path, workers=2)
    start_all(sup, fos)
    w = sup.nodes["worker_2"]
    sup.paths.logs_dir.mkdir(parents=True, exist_ok=True)
    sup.paths.stderr_log("worker_2").write_text("old run: ignore me\n")
    w.stderr_offset = sup.paths.stderr_log("worker_2").stat().st_size
    with open(sup.paths.stderr_log("worker_2"), "a") as f:
        f.write("configuration error: sapo.num_generations: must be >= 2; got 1\n")
    fos.exit(w.proc.pid, 2)
    sup.tick()
    assert w.status.state is S.FATAL
    assert "configuration error" in w.status.fatal_reason and "sapo.num_generations" in w.status.fatal_reason
    assert w.log_tail == ["configuration error: sapo.num_generations: must be >= 2; got 1"]


def test_finished_nodes_are_not_restarted_and_the_supervisor_exits_0(tmp_path):
    sup, fos, log = fake_sup(tmp_path, workers=2)
    start_all(sup, fos)
    spawned = len(fos.spawned)
    fos.exit(sup.nodes["worker_1"].proc.pid, 0)  # a worker finishing first counts as finished
    advance(sup, fos, 5.0)
    assert state(sup, "worker_1") is S.EXITED and len(fos.spawned) == spawned and sup.exit_code is None
    for name in ("coordinator", "worker_2"):
        fos.exit(sup.nodes[name].proc.pid, 0)
    assert sup.tick() is True
    assert sup.exit_code == 0 and len(fos.spawned) == spawned
    assert all(n.status.state is S.EXITED for n in sup.nodes.values())
    assert read_status(sup.paths)["state"] == "exited"


def test_stable_run_resets_backoff(tmp_path):
    sup, fos, log = fake_sup(tmp_path, workers=1, backoff_initial_s=1.0, stable_after_s=10.0)
    start_all(sup, fos)
    w = sup.nodes["worker_1"]
    for expected in (1.0, 2.0):
        fos.exit(w.proc.pid, 1)
        sup.tick()
        assert w.status.backoff_until - fos.monotonic() == pytest.approx(expected)
        fos.advance(expected)
        sup.tick()
        beat(sup, fos, "worker_1")
        sup.tick()
    advance(sup, fos, 11.0, step=0.5)  # a stable run
    assert w.status.backoff_attempt == 0
    fos.exit(w.proc.pid, 1)
    sup.tick()
    assert w.status.backoff_until - fos.monotonic() == pytest.approx(1.0)


def test_hung_main_loop_is_killed_and_restarted(tmp_path):
    sup, fos, log = fake_sup(tmp_path, workers=1, heartbeat_timeout_s=2.0, backoff_initial_s=0.5)
    start_all(sup, fos)
    w = sup.nodes["worker_1"]
    old = w.proc.pid
    fos.advance(1.0)
    beat(sup, fos, "worker_1", progress_age=1.0)
    beat(sup, fos, "coordinator")
    sup.tick()
    assert w.status.state is S.RUNNING
    fos.advance(1.5)
    beat(sup, fos, "worker_1", progress_age=2.5, phase="generate")  # thread alive, loop stuck
    beat(sup, fos, "coordinator")
    sup.tick()
    assert (old, signal.SIGKILL) in fos.sent and w.status.state is S.STOPPING
    sup.tick()
    assert w.status.state is S.BACKOFF and w.status.last_exit.reason == "hung"
    assert "main loop made no progress" in w.status.last_exit.detail and "'generate'" in w.status.last_exit.detail
    fos.advance(0.5)
    sup.tick()
    assert w.status.state is S.STARTING and w.proc.pid != old and w.status.restarts == 1


def test_silent_heartbeat_is_a_hang(tmp_path):
    sup, fos, log = fake_sup(tmp_path, workers=1, heartbeat_timeout_s=2.0)
    start_all(sup, fos)
    fos.advance(2.1)
    sup.tick()
    w = sup.nodes["worker_1"]
    assert w.status.state is S.STOPPING and "no heartbeat for" in w.hung_detail
    assert state(sup, "coordinator") is S.STOPPING  # equally silent in this script


def test_stop_sends_sigterm_then_sigkill_after_one_shared_deadline(tmp_path):
    sup, fos, log = fake_sup(tmp_path, workers=2, os_=FakeOS(obey_signals=False), stop_timeout_s=10.0)
    start_all(sup, fos)
    pids = {name: n.proc.pid for name, n in sup.nodes.items()}
    sup.request_stop(signal.SIGTERM)
    sup.tick()
    assert sorted(fos.sent) == sorted((pid, signal.SIGTERM) for pid in pids.values())
    assert all(n.status.state is S.STOPPING for n in sup.nodes.values())
    fos.exit(pids["coordinator"], 143)
    fos.advance(9.9)
    sup.tick()
    assert state(sup, "coordinator") is S.STOPPED
    assert not [s for s in fos.sent if s[1] == signal.SIGKILL]
    fos.advance(0.2)
    sup.tick()
    assert sorted(p for p, s in fos.sent if s == signal.SIGKILL) == sorted([pids["worker_1"], pids["worker_2"]])
    for name in ("worker_1", "worker_2"):
        fos.exit(pids[name], -signal.SIGKILL)
    assert sup.tick() is True
    assert sup.exit_code == 143
    info = sup.nodes["worker_1"].status.last_exit
    assert info.reason == "stopped" and "SIGKILL after the stop timeout" in info.detail
    assert len(fos.spawned) == 3  # nothing restarted while stopping


def test_backoff_node_is_not_restarted_during_a_stop_and_sigint_gives_130(tmp_path):
    sup, fos, log = fake_sup(tmp_path, workers=1)
    start_all(sup, fos)
    fos.exit(sup.nodes["worker_1"].proc.pid, 1)
    sup.tick()
    assert state(sup, "worker_1") is S.BACKOFF
    sup.request_stop(signal.SIGINT)
    sup.tick()
    assert state(sup, "worker_1") is S.STOPPED
    fos.advance(1.0)
    assert sup.tick() is True and sup.exit_code == 130


def test_coordinator_fatal_stops_the_swarm_with_exit_1(tmp_path):
    sup, fos, log = fake_sup(tmp_path, workers=2)
    start_all(sup, fos)
    fos.exit(sup.nodes["coordinator"].proc.pid, 2)
    sup.tick()
    assert state(sup, "coordinator") is S.FATAL
    assert all(state(sup, w) is S.STOPPING for w in ("worker_1", "worker_2"))
    sup.tick()
    assert sup.exit_code == 1
    assert "coordinator is FATAL" in read_status(sup.paths)["stop_reason"]


def test_spawn_failure_is_a_configuration_error(tmp_path):
    sup, fos, log = fake_sup(tmp_path, workers=1)
    fos.spawn_error = FileNotFoundError(2, "No such file or directory")
    sup.tick()
    st = sup.nodes["coordinator"].status
    assert st.state is S.FATAL and "configuration error" in st.fatal_reason and "cannot start" in st.fatal_reason
    assert sup.tick() and sup.exit_code == 1


def test_on_event_runs_on_restart_and_fatal(tmp_path):
    out = tmp_path / "events.txt"
    sup, fos, log = fake_sup(tmp_path, workers=1, max_restarts=0,
                             on_event=f'echo "$SWARM_EVENT|$SWARM_NODE|$SWARM_EXPERIMENT|$SWARM_REASON" >> {out}')
    start_all(sup, fos)
    fos.exit(sup.nodes["worker_1"].proc.pid, 1)
    sup.tick()
    assert state(sup, "worker_1") is S.FATAL
    sup.wait_events(5.0)
    event, node, exp, reason = out.read_text().strip().split("|", 3)
    assert (event, node, exp) == ("fatal", "worker_1", "fake") and "max_restarts=0" in reason


def test_a_full_runtime_disk_holds_silent_nodes_reports_it_and_resumes(tmp_path, tiny_disk):
    """Heartbeats live on the runtime disk: when it is full every node falls silent. Nobody is killed as hung, a
    clear error names the dir and its free bytes (once a minute), and all is normal once space returns."""
    sup, fos, log = fake_sup(tmp_path, workers=1, runtime_dir=tiny_disk / "rt", heartbeat_timeout_s=2.0)
    start_all(sup, fos)
    for name in sup.nodes:  # the last beat a little newer than the last progress: no "stuck main loop" verdict
        beat(sup, fos, name, progress_age=0.09)
    filler = fill_disk(tiny_disk)
    advance(sup, fos, 120.0, step=0.5, beat_running=False)  # no node can write a heartbeat: 60 x the timeout
    assert not [s for s in fos.sent if s[1] == signal.SIGKILL] and len(fos.spawned) == 2
    assert all(n.status.state is S.RUNNING and n.status.condition == "runtime_disk_full" for n in sup.nodes.values())
    errors = log.named("runtime_disk_full")
    assert len(errors) == 2  # at the first silence past the timeout, then a minute later
    assert errors[0]["runtime_dir"] == str(tiny_disk / "rt") and errors[0]["free_bytes"] < MIN_FREE_BYTES
    assert errors[0]["nodes"] == ["coordinator", "worker_1"] and "not killed" in errors[0]["action"]
    assert [kw["condition"] for kw in log.named("node_condition")] == ["runtime_disk_full"] * 2  # once per node
    snap = sup.snapshot()
    assert snap["summary"].startswith(f"ERROR runtime dir {tiny_disk / 'rt'} is full (")
    assert "coordinator, worker_1 silent, not killed, waiting for space" in snap["summary"]
    assert snap["runtime_disk_full"]["free_bytes"] < MIN_FREE_BYTES
    assert snap["nodes"]["worker_1"]["condition"] == "runtime_disk_full"
    filler.unlink()  # space returns: the nodes get their timeout to beat again
    advance(sup, fos, 1.5, step=0.5, beat_running=False)
    assert all(n.status.state is S.RUNNING and n.status.condition is None for n in sup.nodes.values())
    assert log.named("runtime_disk_ok") and "ERROR" not in sup.summary_line()
    advance(sup, fos, 5.0)  # heartbeats resume
    assert all(n.status.state is S.RUNNING for n in sup.nodes.values()) and not log.named("node_hung")
    fos.advance(2.5)  # a real hang is a hang again
    sup.tick()
    assert log.named("node_hung") and not sup.runtime_disk.full


def test_captured_logs_are_copied_and_truncated_while_the_nodes_run(tmp_path):
    sup, fos, log = fake_sup(tmp_path, workers=1, log_max_bytes=1000)
    start_all(sup, fos)
    w = sup.nodes["worker_1"]
    big = {sup.paths.stdout_log("worker_1"): b"o" * 5000, sup.paths.stderr_log("worker_1"): b"e" * 999,
           sup.paths.detached_output: b"d" * 1000, sup.paths.events_log: b"v" * 3000}
    sup.paths.logs_dir.mkdir(parents=True, exist_ok=True)
    for path, data in big.items():
        with open(path, "ab") as f:
            f.write(data)
    w.stdout_offset = 4000
    advance(sup, fos, LOG_CHECK_S + 1.0, step=1.0)
    for path, data in big.items():
        if len(data) >= 1000:
            assert path.stat().st_size == 0 and path.with_name(path.name + ".1").read_bytes() == data, path
        else:
            assert path.read_bytes() == data and not path.with_name(path.name + ".1").exists()
    assert w.stdout_offset == 0  # the run tail starts at the truncated file's start
    assert sorted(kw["path"] for kw in log.named("log_rotated")) == sorted(
        str(p) for p, data in big.items() if len(data) >= 1000)


# --------------------------------------------------------------------------- real processes

def real_sup(tmp_path, reaper, monkeypatch, *, modes=None, workers=2, **supervisor) -> Supervisor:
    monkeypatch.setenv("FAKE_NODE_RECORD", str(tmp_path / "record"))
    for name, mode in (modes or {}).items():
        monkeypatch.setenv(f"FAKE_NODE_MODE_{name}" if name != "*" else "FAKE_NODE_MODE", mode)
    cfg = fake_config(tmp_path / "shared", workers=workers, **supervisor)
    sup = Supervisor(cfg, node_command=FAKE_NODE, runtime_dir=tmp_path / "rt", gpu=None,
                     notifier=SdNotifier(environ={}), log=RecordingLog())
    reaper.append(sup)
    return sup


def all_running(sup) -> bool:
    return all(n.status.state is S.RUNNING for n in sup.nodes.values())


def test_sigkill_a_worker_only_it_restarts(tmp_path, reaper, monkeypatch):
    sup = real_sup(tmp_path, reaper, monkeypatch)
    assert drive(sup, lambda: all_running(sup), timeout=15)
    pids = {name: n.proc.pid for name, n in sup.nodes.items()}
    os.kill(pids["worker_1"], signal.SIGKILL)
    w1 = sup.nodes["worker_1"]
    assert drive(sup, lambda: w1.status.restarts == 1 and w1.status.state is S.RUNNING, timeout=10)
    assert w1.status.last_exit.reason == "oom_killed_host"  # a SIGKILL we did not send
    assert sup.nodes["coordinator"].proc.pid == pids["coordinator"]
    assert sup.nodes["worker_2"].proc.pid == pids["worker_2"]
    assert all(n.status.restarts == 0 for name, n in sup.nodes.items() if name != "worker_1")
    assert not alive(pids["worker_1"])


def test_crash_at_start_backs_off_then_fatal_while_the_supervisor_stays_up(tmp_path, reaper, monkeypatch):
    sup = real_sup(tmp_path, reaper, monkeypatch, modes={"worker_2": "crash_at_start"}, backoff_initial_s=0.1)
    w2 = sup.nodes["worker_2"].status
    assert drive(sup, lambda: w2.state is S.FATAL, timeout=15)
    assert [t.new for t in w2.transitions if t.new in (S.BACKOFF, S.FATAL)] == [S.BACKOFF, S.BACKOFF, S.FATAL]
    drive(sup, timeout=0.5)
    assert sup.exit_code is None
    assert sup.nodes["coordinator"].status.state is S.RUNNING and sup.nodes["worker_1"].status.state is S.RUNNING
    snap = read_status(sup.paths)
    node = snap["nodes"]["worker_2"]
    assert node["state"] == "FATAL" and "configuration error" in node["fatal_reason"]
    assert "RuntimeError: fake crash at start-up" in node["log_tail"]
    text = statusview.render_status(snap, running_pid=os.getpid(), runtime_dir=sup.paths.root, experiment="fake")
    assert "worker_2: FATAL" in text and "RuntimeError: fake crash at start-up" in text


def test_hung_main_loop_is_detected_and_restarted_within_twice_the_timeout(tmp_path, reaper, monkeypatch):
    monkeypatch.setenv("FAKE_HANG_AFTER", "0.5")
    sup = real_sup(tmp_path, reaper, monkeypatch, modes={"worker_1": "hang_main_loop"}, workers=1,
                   heartbeat_timeout_s=2.0)
    w1 = sup.nodes["worker_1"]
    assert drive(sup, lambda: w1.status.state is S.RUNNING, timeout=10)
    old = w1.proc.pid
    assert drive(sup, lambda: w1.heartbeat is not None and time.time() - w1.heartbeat.progress_at > 0.3, timeout=5)
    hang_began = w1.heartbeat.progress_at
    assert drive(sup, lambda: w1.status.restarts == 1 and w1.status.state is S.RUNNING, timeout=10)
    took = time.time() - hang_began
    assert w1.proc.pid != old and w1.status.last_exit.reason == "hung"
    assert took < 2 * 2.0, f"restart took {took:.2f} s after the main loop stopped"
    assert sup.nodes["coordinator"].status.restarts == 0


def test_a_node_ignoring_sigterm_gets_sigkill(tmp_path, reaper, monkeypatch):
    sup = real_sup(tmp_path, reaper, monkeypatch, modes={"worker_1": "ignore_sigterm"}, stop_timeout_s=1.0)
    assert drive(sup, lambda: all_running(sup), timeout=15)
    pid = sup.nodes["worker_1"].proc.pid
    t0 = time.monotonic()
    sup.request_stop(signal.SIGTERM)
    assert drive(sup, lambda: sup.exit_code is not None, timeout=8)
    took = time.monotonic() - t0
    info = sup.nodes["worker_1"].status.last_exit
    assert info.signal == "SIGKILL" and "SIGKILL after the stop timeout" in info.detail
    assert sup.nodes["worker_2"].status.last_exit.returncode == 143  # checkpointed and exited
    assert 1.0 <= took < 3.0 and sup.exit_code == 143 and not alive(pid)


def test_real_nodes_on_a_full_runtime_disk_are_not_killed(tmp_path, reaper, monkeypatch, tiny_disk):
    """Real fake nodes whose heartbeat writes fail with a real ENOSPC: none is killed or restarted, and once space
    returns their heartbeats (Heartbeat.write) resume."""
    monkeypatch.setenv("FAKE_NODE_RECORD", str(tmp_path / "record"))
    cfg = fake_config(tmp_path / "shared", workers=1)
    sup = Supervisor(cfg, node_command=FAKE_NODE, runtime_dir=tiny_disk / "rt", gpu=None,
                     notifier=SdNotifier(environ={}), log=RecordingLog())
    reaper.append(sup)
    assert drive(sup, lambda: all_running(sup), timeout=15)
    pids = {name: n.proc.pid for name, n in sup.nodes.items()}
    filler = fill_disk(tiny_disk)
    held = lambda: all(n.status.condition == "runtime_disk_full" for n in sup.nodes.values())  # noqa: E731
    assert drive(sup, held, timeout=15)
    drive(sup, timeout=2 * cfg.supervisor.heartbeat_timeout_s)  # silent for longer than the timeout
    assert {name: n.proc.pid for name, n in sup.nodes.items()} == pids and all_running(sup)
    assert sup.log.named("runtime_disk_full") and not sup.log.named("node_hung")
    filler.unlink()
    fresh = lambda: all(n.status.condition is None and n.heartbeat and time.time() - n.heartbeat.heartbeat_at < 1  # noqa: E731
                        for n in sup.nodes.values())
    assert drive(sup, fresh, timeout=15)
    assert {name: n.proc.pid for name, n in sup.nodes.items()} == pids and all(
        n.status.restarts == 0 for n in sup.nodes.values())


def test_a_running_childs_output_truncated_in_place_stays_whole(tmp_path, reaper):
    """Copy-and-truncate under a live writer (procs.spawn opens the capture with O_APPEND): the child's next line
    lands at the start of the emptied file, not past a hole at its old offset; every file holds lines in order."""
    out, err = tmp_path / "w.stdout.log", tmp_path / "w.stderr.log"
    code = "import time\nfor i in range(10**9):\n    print(f'line {i:09d}', flush=True)\n    time.sleep(0.0002)"
    proc = procs.spawn([sys.executable, "-c", code], env=None, cwd=tmp_path, stdout_path=out, stderr_path=err)
    rotations = 0
    try:
        deadline = time.monotonic() + 60
        while rotations < 3 and time.monotonic() < deadline:
            rotations += truncate_if_large(out, max_bytes=20_000, backups=2)
            time.sleep(0.01)
        wait_for(lambda: out.stat().st_size > 1000, 30, "the child's lines after the last truncation")
    finally:
        proc.kill()
        proc.wait()
    assert rotations == 3
    files = rotated_files(out, backups=2)
    assert [f.name for f in files] == ["w.stdout.log.2", "w.stdout.log.1", "w.stdout.log"]  # the oldest dropped
    assert all(f.stat().st_size >= 20_000 for f in files[:2])
    texts = [f.read_bytes() for f in files]
    assert not any(b"\0" in t for t in texts)  # no hole: O_APPEND
    lines = [line for t in texts for line in t.decode().splitlines()]
    whole = [re.fullmatch(r"line (\d{9})", line) for line in lines]
    # A copy taken while a line is being written may hold its start, the emptied file its end: at most one
    # such seam per truncation; every other line is whole, and their numbers only go up.
    assert sum(m is None for m in whole) <= 2 * rotations
    numbers = [int(m.group(1)) for m in whole if m]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


# ----- the supervisor as its own process (the CLI), as in production

LAUNCH_S = Timeouts(fake_config(Path("/nonexistent"), workers=2)).budget()  # the staggered start of 3 fake nodes


def launch(cfg: Path, tmp_path: Path, *args: str, env_extra=None) -> subprocess.Popen:
    env = {**os.environ, "SWARM_RUNTIME_DIR": str(tmp_path / "rt"), "SWARM_NODE_COMMAND": " ".join(FAKE_NODE),
           "FAKE_NODE_RECORD": str(tmp_path / "record"), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "supervisor.cli", "launch", str(cfg), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def running_status(tmp_path: Path, supervisor_pid: int, nodes: int):
    st = read_status(RuntimePaths(tmp_path / "rt"))
    if not st or st["supervisor"]["pid"] != supervisor_pid:
        return None
    states = [n["state"] for n in st["nodes"].values()]
    return st if states == ["RUNNING"] * nodes else None


def test_sigterm_the_supervisor_stops_every_node_within_the_stop_timeout(tmp_path, reaper):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared", workers=2, stop_timeout_s=3.0)
    proc = launch(cfg, tmp_path)
    st = wait_for(lambda: running_status(tmp_path, proc.pid, 3), LAUNCH_S, "every node RUNNING",
                  fail_if=lambda: proc.poll() is not None and f"the supervisor exited ({proc.returncode})",
                  details=lambda: proc.stdout.read1().decode() if proc.poll() is not None else "")
    pids = [n["pid"] for n in st["nodes"].values()]
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 143
    # Graceful, not killed: every node checkpointed (below) and the supervisor did not wait out the whole stop
    # timeout plus its SIGKILL. The bound is the stop timeout (3 s) plus the supervisor's own reaping, not an
    # idle machine's speed: on a loaded one a tick can be late.
    assert time.monotonic() - t0 < 3.0 + 3.0
    assert not any(alive(p) for p in pids)
    checkpoints = sorted(p.name.split(".")[0] for p in (tmp_path / "record").glob("*.checkpoint"))
    assert checkpoints == ["coordinator", "worker_1", "worker_2"]
    final = read_status(RuntimePaths(tmp_path / "rt"))
    assert final["exit_code"] == 143 and all(n["state"] == "STOPPED" for n in final["nodes"].values())
    assert not (tmp_path / "rt" / "supervisor.pid").exists()


def test_sigkill_the_supervisor_no_node_survives_and_a_new_launch_takes_over(tmp_path, reaper, capsys, monkeypatch):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared", workers=2)
    first = launch(cfg, tmp_path)
    st = wait_for(lambda: running_status(tmp_path, first.pid, 3), LAUNCH_S, "the first supervisor's nodes RUNNING")
    pids = [n["pid"] for n in st["nodes"].values()]
    first.kill()
    first.wait(timeout=5)
    assert not still_alive(pids, 5), "a node outlived its supervisor"
    second = launch(cfg, tmp_path)  # the runbook after a disconnect: launch again, it resumes
    st2 = wait_for(lambda: running_status(tmp_path, second.pid, 3), LAUNCH_S, "the second supervisor's nodes RUNNING")
    assert not set(n["pid"] for n in st2["nodes"].values()) & set(pids)
    # one supervisor per experiment: a third launch refuses, naming the running one
    monkeypatch.setenv("SWARM_RUNTIME_DIR", str(tmp_path / "rt"))
    rc = cli.main(["launch", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and f"pid {second.pid}" in err and "already running" in err
    with pytest.raises(AlreadyRunning) as exc:  # the lock itself, not only the pid-file check
        Supervisor(fake_config(tmp_path / "shared", workers=2), runtime_dir=tmp_path / "rt", gpu=None,
                   log=RecordingLog()).acquire_lock()
    assert exc.value.pid == second.pid
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=10) == 143
