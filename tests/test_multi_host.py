"""More than one host: ``swarm launch CONFIG --join`` adds workers to an experiment whose coordinator runs elsewhere.

The fast tests check the pieces: worker ids per host, the joiner's runtime dir, key and unit, its wait for the
experiment (on FakeOS), a peer record that never goes back in time. The slow ones run two real supervisors on
this machine, each with its own runtime dir, sharing one experiment dir, as two machines sharing a Drive folder
would: the first host (coordinator + worker_1) and a joiner (two workers) whose clock is minutes off
(libfaketime; a Python clock shim where it is not installed), killed as a whole host mid-run and relaunched,
and, where FUSE works, a joiner that sees the directory through a mount that shows other hosts' new files
seconds late.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from doubles import FakeOS
from fake_node import fake_config
from harness import MARGIN_S, alive, iso_ts, still_alive
from node.layout import ExperimentLayout
from node.liveness import PeerTracker
from node.runtime import HOST_ID_ENV, PeerRegistration
from node.schemas import ConfigSnapshot, PeerRecord
from node.signing import KEY_ENV, Signer, create_key_file
from node.storage import SharedStore
from supervisor import cli, validate
from supervisor.daemon import Supervisor
from supervisor.launch import ExperimentGate, host_id, joiner_config, node_names
from supervisor.runfiles import RuntimePaths
from supervisor.sdnotify import SdNotifier
from supervisor.states import NodeState
from supervisor.systemd import render_unit, unit_name

S = NodeState
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
SKEW_S = 120  # the joiner's clock: two minutes ahead, then (relaunched) two minutes behind


# --------------------------------------------------------------------------- fast: the pieces

def test_worker_ids_and_host_ids():
    assert node_names(2, "gpu-b") == [("gpu-b-worker_1", "worker"), ("gpu-b-worker_2", "worker")]
    assert node_names(1)[0] == ("coordinator", "coordinator")
    assert host_id(hostname="Colab Runtime.internal") == "Colab-Runtime.internal"
    assert host_id(hostname="-x" * 40) == ("x-" * 40)[:47]  # plain, short enough for <host>-worker_K
    assert host_id(hostname="...") == "host"
    assert host_id("b2") == "b2"
    for bad in ("a/b", "../x", "x" * 49, ""):
        with pytest.raises(Exception, match="--host-id"):
            host_id(bad)


def test_joiner_config_is_its_own_view_and_the_nodes_keep_the_experiments(tmp_path):
    cfg = fake_config(tmp_path / "shared", workers=3)
    mine = joiner_config(cfg, 1)
    assert mine.supervisor.workers == 1 and mine.workers == () and mine.sapo == cfg.sapo
    assert joiner_config(cfg, None).supervisor.workers == 3
    with pytest.raises(Exception, match="at least one worker"):
        joiner_config(cfg, 0)


def test_a_joiners_runtime_dir_is_its_own(tmp_path, monkeypatch):
    monkeypatch.delenv("SWARM_RUNTIME_DIR", raising=False)
    cfg = fake_config(tmp_path / "shared")
    first, joiner = RuntimePaths.for_config(cfg).root, RuntimePaths.for_config(cfg, "hostb").root
    assert joiner == first.with_name(first.name + "-join-hostb")
    monkeypatch.setenv("SWARM_RUNTIME_DIR", str(tmp_path / "rt"))
    assert RuntimePaths.for_config(cfg, "hostb").root == tmp_path / "rt"  # chosen explicitly: used as it is


def test_join_refuses_to_start_without_the_experiment_key(tmp_path, monkeypatch, capsys):
    for var in (KEY_ENV, "SWARM_KEY_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SWARM_RUNTIME_DIR", str(tmp_path / "rt"))
    config = tmp_path / "c.yaml"
    config.write_text(f"experiment: {{name: mh, root: {tmp_path / 'shared'}}}\nsupervisor: {{device: cpu}}\n")
    assert cli.main(["launch", str(config), "--join", "--host-id", "b"]) == 2
    err = capsys.readouterr().err
    assert "needs the experiment's key" in err and "swarm.key" in err and "--key-file" in err
    assert not (tmp_path / "rt" / "swarm.key").exists()  # a joiner never makes a key of its own
    assert cli.main(["launch", str(config), "--host-id", "b"]) == 2
    assert "with --join" in capsys.readouterr().err
    assert cli.main(["launch", str(config), "--join", "--host-id", "a/b"]) == 2
    assert "--host-id" in capsys.readouterr().err


def test_help_and_systemd_unit_for_a_joiner(tmp_path, capsys):
    assert cli.main(["launch", "--help"]) == 0
    assert "--join" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    assert "swarm launch CONFIG --join" in capsys.readouterr().out
    cfg = joiner_config(fake_config(tmp_path / "shared", workers=2), 3)
    key = tmp_path / "swarm.key"
    text = render_unit(cfg, config_path=tmp_path / "c.yaml", host="gpu-b", key_file=key, working_dir=tmp_path,
                       environ={})
    assert f"launch {tmp_path / 'c.yaml'} --join --host-id gpu-b --workers 3 --key-file {key}" in text
    assert "joining host gpu-b: 3 workers" in text and "TimeoutStartSec=" in text
    assert unit_name(cfg, "gpu-b") == f"sapo-{cfg.experiment.name}-join-gpu-b.service"
    without = render_unit(cfg, config_path=tmp_path / "c.yaml", host="gpu-b", working_dir=tmp_path, environ={})
    assert "copy the first host's swarm.key" in without and "--key-file" not in without.split("ExecStart=")[1]


def _gate_setup(tmp_path):
    cfg = fake_config(tmp_path / "shared")
    layout = ExperimentLayout.from_config(cfg)
    key = os.urandom(32)
    store = SharedStore.from_config(cfg, node_id="coordinator", signer=Signer(key))
    store.ensure_layout()
    return cfg, layout, key, store


def _write_snapshot(store, layout, cfg) -> None:
    snap = ConfigSnapshot(experiment=cfg.experiment.name, written_by="coordinator", written_at=time.time(),
                          config=cfg.to_dict())
    store.write_json_atomic(layout.config_file(), snap.to_json())


def _gate_settled(gate: ExperimentGate, now: float) -> str | None:
    gate.check(now)
    gate._thread.join(5)
    return gate.waiting


def test_the_gate_opens_on_the_experiments_signed_config_only(tmp_path):
    cfg, layout, key, store = _gate_setup(tmp_path)
    gate = ExperimentGate.for_layout(layout, key, interval_s=0.0)
    assert "does not exist yet" in _gate_settled(gate, 1.0)
    other = ExperimentGate.for_layout(layout, os.urandom(32), interval_s=0.0)
    _write_snapshot(store, layout, cfg)
    assert "bad signature" in _gate_settled(other, 2.0) and "swarm.key" in other.waiting
    assert _gate_settled(gate, 3.0) is None


def test_a_joiner_spawns_its_workers_once_the_experiment_exists(tmp_path):
    cfg, layout, key, store = _gate_setup(tmp_path)
    fos = FakeOS()
    sup = Supervisor(joiner_config(cfg, 2), os_=fos, gpu=None, runtime_dir=tmp_path / "rt", host="hostb",
                     notifier=SdNotifier(environ={}), environ={"PATH": "/bin", KEY_ENV: key.hex()},
                     sample_processes=False)
    sup.prepare()
    for _ in range(20):
        sup.tick()
        fos.advance(0.1)
        time.sleep(0.01)  # the gate reads in a helper thread
    assert fos.spawned == [] and "does not exist yet" in sup.summary_line()
    snap = sup.snapshot()  # no coordinator here: the status still renders (round unknown)
    assert snap["round"] is None and snap["join_host"] == "hostb" and "waiting for the experiment" in snap["summary"]
    _write_snapshot(store, layout, cfg)
    deadline = time.monotonic() + 10
    while not fos.spawned and time.monotonic() < deadline:
        sup.tick()
        fos.advance(0.2)
        time.sleep(0.02)
    names = sorted(p.env["NODE_ID"] for p in fos.spawned)
    assert names == ["hostb-worker_1", "hostb-worker_2"]
    assert all(p.env[HOST_ID_ENV] == "hostb" and "--role" in p.args and "worker" in p.args for p in fos.spawned)
    assert sup.waiting_for() is None and "waiting" not in sup.summary_line()


def test_a_peer_record_never_goes_back_in_time(tmp_path, monkeypatch):
    cfg, layout, key, store = _gate_setup(tmp_path)
    ahead = time.time() + SKEW_S  # the record a run with a clock two minutes ahead left behind
    old = PeerRecord(node_id="hostb-worker_1", role="worker", pid=1, host="hostb", started_at=ahead,
                     heartbeat_at=ahead, round=3, progress=500, status="running")
    store.write_json_atomic(layout.peer_file("hostb-worker_1"), old.to_json())
    monkeypatch.setenv(HOST_ID_ENV, "hostb")
    peer = PeerRegistration(store, layout, "hostb-worker_1", "worker", 1.0)
    assert peer.started_at > ahead  # readers see (started_at, progress) rise: the restart counts as alive
    peer.update(round_=4, status="running", force=True)
    record = store.read_as(layout.peer_file("hostb-worker_1"), PeerRecord.from_json)
    assert record.host == "hostb" and (record.started_at, record.progress) > (old.started_at, old.progress)
    monkeypatch.setenv(HOST_ID_ENV, "bad/host")
    assert PeerRegistration(store, layout, "worker_9", "worker", 1.0).host != "bad/host"


# --------------------------------------------------------------------------- slow: two supervisors, one experiment

SETS = ("supervisor.workers=1", "coordinator.round_timeout_s=45", "supervisor.heartbeat_timeout_s=30",
        "supervisor.startup_timeout_s=120")


def skewed_clock(offset_s: int, shim_dir: Path) -> dict[str, str]:
    """The environment of a process tree whose wall clock is ``offset_s`` off: libfaketime (Debian's faketime
    package) for time(), gettimeofday() and clock_gettime(CLOCK_REALTIME), the monotonic clock left alone; where
    it is not installed, a sitecustomize that offsets Python's time.time()/time_ns() (every clock our nodes and
    supervisor read for wall time)."""
    if LIBFAKETIME.exists():
        return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": f"{offset_s:+d}s", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                "NO_FAKE_STAT": "1"}
    shim_dir.mkdir(parents=True, exist_ok=True)
    (shim_dir / "sitecustomize.py").write_text(
        "import os, time\n"
        "_off = float(os.environ.get('SAPO_TEST_CLOCK_OFFSET_S') or 0)\n"
        "if _off:\n"
        "    _time, _time_ns = time.time, time.time_ns\n"
        "    time.time = lambda: _time() + _off\n"
        "    time.time_ns = lambda: _time_ns() + int(_off * 1e9)\n")
    path = os.pathsep.join(p for p in (str(shim_dir), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "SAPO_TEST_CLOCK_OFFSET_S": str(offset_s)}


def two_hosts(make_swarm, tmp_path, *sets, joiner_shared: Path | None = None, first_shared: Path | None = None,
              clock: int = 0, joiner_workers: int = 2):
    """The first host (coordinator + worker_1) and a joiner ``hostb`` with the first host's key, sharing one
    experiment dir (the joiner's through ``joiner_shared`` when given)."""
    first = make_swarm(*SETS, *sets, shared=first_shared)
    key = first.runtime / "swarm.key"
    create_key_file(key)  # what the first `swarm launch` creates; the user copies it to the other machine
    env = skewed_clock(clock, tmp_path / "clock-shim") if clock else {}
    joiner = make_swarm(*SETS, *sets, shared=joiner_shared or first.root / "shared", env=env, join_host="hostb",
                        join_workers=joiner_workers, key_file=key)
    assert joiner.exp.name == first.exp.name and joiner.runtime != first.runtime
    return first, joiner


def lines(swarm, node: str) -> list[dict]:
    return swarm.metrics(node)


def checkpoints(swarm, node: str) -> list[int]:
    """The rounds ``node`` checkpointed, in order (its ``checkpoint`` events)."""
    return [e["round"] for e in swarm.events(node) if e.get("event") == "checkpoint"]


def advances(first) -> list[tuple[float, dict]]:
    """(time, event) of the coordinator's round starts: experiment_started, then every round_advanced."""
    return [(iso_ts(e["timestamp"]), e) for e in first.node_log("coordinator")
            if e.get("event") in ("experiment_started", "round_advanced")]


def round_seconds(first) -> list[tuple[int, float]]:
    """(round, seconds from its start to its advance), by the first host's clock."""
    marks = advances(first)
    return [(e["round"], t - prev) for (prev, _), (t, e) in zip(marks, marks[1:])]


def check_every_worker(first, joiner) -> None:
    """Both hosts' workers: one metrics line per round trained (none twice, rounds they logged as skipped or
    that came before they joined excepted), valid events, a rollout file per trained round; the first host's
    `swarm validate` passes."""
    layout = ExperimentLayout.from_config(first.config)
    max_rounds = first.config.experiment.max_rounds
    for w in (*first.workers, *joiner.workers):
        events, skipped = validate.events_check(layout, w)
        metrics, trained = validate.metrics_check(layout, w, max_rounds, skipped)  # a joiner logs earlier rounds as skipped
        assert events.ok and metrics.ok, (events, metrics)
        assert len(trained) == len(set(trained)) and trained, (w, trained)
    result = first.cli("validate")
    assert result.returncode == 0, result.stdout + result.stderr


class Observer:
    """A reader of the shared dir on the first host, judging liveness as the coordinator does
    (:class:`node.liveness.PeerTracker`, the experiment's key): :meth:`scan` it while waiting."""

    def __init__(self, first, key_file: Path):
        from node.signing import read_key_file

        store = SharedStore.from_config(first.config, node_id="observer", signer=Signer(read_key_file(key_file)))
        self.tracker = PeerTracker(store, ExperimentLayout.from_config(first.config),
                                   first.config.supervisor.heartbeat_timeout_s)

    def scan(self, value=True):
        """Scan once; returns ``value`` (so it can sit inside a wait's predicate)."""
        self.tracker.scan()
        return value


def peer_clock_offset(swarm, node: str) -> float:
    """How far ``node``'s clock is from ours, from its peer record's heartbeat_at (written within a second)."""
    record = json.loads((swarm.exp / "peers" / f"{node}.json").read_text())
    return record["heartbeat_at"] - time.time()


@pytest.mark.slow
def test_a_skewed_joiner_is_killed_as_a_host_and_resumes(make_swarm, tmp_path):
    first, joiner = two_hosts(make_swarm, tmp_path, "experiment.max_rounds=14", "exchange.fetch_timeout_s=5",
                              clock=+SKEW_S)
    t, max_rounds = first.t, first.config.experiment.max_rounds
    joiner.launch()  # before the first host: it waits for the experiment, and says so
    joiner.wait_for(lambda: "waiting for the experiment" in (joiner.status().get("summary") or ""), t.launch,
                    "the joiner to say it waits for the experiment")
    shown = joiner.cli("status")
    assert shown.returncode == 0 and "waiting for the experiment" in shown.stdout, shown.stdout + shown.stderr
    first.launch()
    seen = Observer(first, first.runtime / "swarm.key")

    # Both hosts train; then one joiner worker is SIGKILLed: its own supervisor restarts it, as on the first host.
    joiner.wait_for(lambda: seen.scan(all(checkpoints(joiner, w) for w in joiner.workers)), t.budget(rounds=4),
                    "every joiner worker to checkpoint a round")
    offset = peer_clock_offset(joiner, "hostb-worker_1")
    assert abs(offset - SKEW_S) < 30, f"the joiner's clock is not {SKEW_S:+d} s off: {offset:+.1f} s"
    victim = joiner.kill("hostb-worker_1")
    joiner.wait_for(lambda: joiner.node("hostb-worker_1").get("restarts") == 1
                    and joiner.running_pid("hostb-worker_1") not in (None, victim), t.restart,
                    "the joiner's supervisor to restart its killed worker")
    done = len(checkpoints(joiner, "hostb-worker_1"))
    joiner.wait_for(lambda: seen.scan(len(checkpoints(joiner, "hostb-worker_1")) > done), t.budget(rounds=2),
                    "the restarted worker to train and checkpoint again")

    # The whole joining host goes: SIGKILL its supervisor, its nodes die with it.
    nodes = [joiner.node(w).get("pid") for w in joiner.workers]
    assert first.state_round() < max_rounds - 4, "the run is too far on to test a relaunch"
    joiner.proc.kill()
    killed_at = time.time()
    assert joiner.wait_exit(10) == -signal.SIGKILL
    assert not still_alive(nodes, 10), "the joiner's nodes outlived its supervisor"
    before = {w: lines(joiner, w) for w in joiner.workers}
    saved = {w: checkpoints(joiner, w)[-1] for w in joiner.workers}
    assert first.proc.poll() is None and alive(first.node("worker_1").get("pid"))
    assert set(joiner.workers) <= set(seen.tracker.live_workers())  # seen alive by their +2 min records

    # Relaunched with its clock two minutes behind: each worker resumes from its checkpoint.
    joiner.env.update(skewed_clock(-SKEW_S, tmp_path / "clock-shim"))
    relaunched_at = time.time()
    joiner.launch()
    for w in joiner.workers:
        joiner.wait_for(lambda w=w: seen.scan(len(lines(joiner, w)) >= len(before[w]) + 2), t.budget(rounds=4),
                        f"{w} to train 2 rounds after the relaunch")
    # The relaunched workers' records, written by a clock now 4 minutes behind the last run's, count as signs of
    # life for a reader that saw the old ones (the coordinator): their (started_at, progress) rose.
    back = [w for w in joiner.workers if not seen.tracker.changed_since(w, relaunched_at)]
    assert not back, f"records of {back} did not count as alive after the relaunch (started_at went back)"
    offset = peer_clock_offset(joiner, "hostb-worker_1")
    assert abs(offset + SKEW_S) < 30, f"the relaunched joiner's clock is not {-SKEW_S:+d} s off: {offset:+.1f} s"
    assert first.wait_exit(t.budget(rounds=max_rounds)) == 0, first.output()[-3000:]
    assert joiner.wait_exit(t.budget(rounds=2)) == 0, joiner.output()[-3000:]

    for w in joiner.workers:
        resumed = [e["round"] for e in joiner.events(w) if e.get("event") == "resumed"]
        assert resumed and resumed[-1] == saved[w], (w, resumed, saved[w])  # its newest checkpoint at the kill
        assert min(m["round"] for m in lines(joiner, w)[len(before[w]):]) > max(m["round"] for m in before[w])
        record = json.loads((first.exp / "peers" / f"{w}.json").read_text())
        assert record["host"] == "hostb" and record["status"] == "finished"
    check_every_worker(first, joiner)
    # The joiner's last status lists every node of both hosts, their records checked with the key it was given.
    hosts = {n["node"]: n["host"] for n in (joiner.status().get("swarm") or {}).get("nodes", []) if n.get("verified")}
    assert set(first.names) | set(joiner.workers) <= set(hosts), hosts
    assert {hosts[w] for w in joiner.workers} == {"hostb"} and hosts["worker_1"] != "hostb"

    # The coordinator counted the joiner's workers as live before the kill and again after the relaunch (their
    # records dated by their own skewed clocks), and no round waited for the vanished host past the heartbeat
    # timeout: a dead host is dropped from completion, never held until round_timeout_s.
    marks = advances(first)
    live_before = [set(e["live"]) for ts, e in marks if e["event"] == "round_advanced" and ts < killed_at]
    assert any(set(joiner.workers) <= live for live in live_before), live_before
    assert set(joiner.workers) <= set(marks[-1][1]["live"]), marks[-1]  # the last round waited for them too
    bound = first.config.supervisor.heartbeat_timeout_s + 10  # < round_timeout_s
    slow = [(r, round(s, 1)) for r, s in round_seconds(first) if s > bound]
    assert not slow, f"rounds that waited past the heartbeat timeout for the joiner: {slow}"
    assert [e["reason"] for _, e in marks[1:]].count("round_timeout") == 0


@pytest.mark.slow
def test_a_joiner_that_sees_other_hosts_files_late(flaky_mount, make_swarm, tmp_path):
    """A joiner behind a mount that shows the first host's new files seconds late (Drive's propagation), its
    clock two minutes behind: a late peer file is used when it lands within the worker's bounded wait, else
    skipped and counted (``peer_files_missing``); no round waits for it longer than that wait."""
    fetch_s = 3
    first, joiner = two_hosts(make_swarm, tmp_path, "experiment.max_rounds=9", f"exchange.fetch_timeout_s={fetch_s}",
                              first_shared=flaky_mount.backing, joiner_shared=flaky_mount.mountpoint, clock=-SKEW_S)
    t = first.t
    joiner.launch()
    first.launch()

    def trained(n: dict):
        return all(len(lines(joiner, w)) >= n[w] for w in joiner.workers)

    joiner.wait_for(lambda: trained(dict.fromkeys(joiner.workers, 1)), t.budget(rounds=4),
                    "every joiner worker to train a round")
    assert first.state_round() < 5, "the joiner came too late in the run to test its lag"
    flaky_mount.delay(fetch_s / 2)  # within the wait: worker_1's files are used
    start = {w: len(lines(joiner, w)) for w in joiner.workers}
    joiner.wait_for(lambda: trained({w: n + 2 for w, n in start.items()}), t.budget(rounds=3),
                    "every joiner worker to train 2 rounds behind the lagging mount")
    flaky_mount.delay(3 * fetch_s)  # past the wait: worker_1's files are skipped, counted, never waited for
    switched_at = time.time()
    done = {w: len(lines(joiner, w)) for w in joiner.workers}
    assert first.wait_exit(t.budget(rounds=first.config.experiment.max_rounds)) == 0, first.output()[-3000:]
    assert joiner.wait_exit(MARGIN_S) == 0, joiner.output()[-3000:]
    check_every_worker(first, joiner)

    # A file that lands within the wait is used (both peers' groups, worker_1's included, were candidates).
    within = [m for w in joiner.workers for m in lines(joiner, w)[start[w]:done[w]]]
    assert any(m["peer_files_missing"] == 0 and m["external_candidates"] >= 4 for m in within), within
    # Later: worker_1's files land after the wait ended; skipped and counted, the round goes on.
    late = [m for w in joiner.workers for m in lines(joiner, w)[done[w]:]]
    assert late and any(m["peer_files_missing"] >= 1 for m in late), late
    assert all(m["timings"]["wait_s"] <= fetch_s + 5 for m in late), [m["timings"]["wait_s"] for m in late]
    after = [s for (r, s), (ts, _) in zip(round_seconds(first), advances(first)[1:]) if ts > switched_at + 1]
    assert after and max(after) <= 2 * fetch_s + 15, after  # the joiner's wait, then worker_1's: not the delay
    assert sum(m["num_external_groups"] for m in lines(first, "worker_1")) > 0  # the joiner's files, at once
