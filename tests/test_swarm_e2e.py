"""The whole product with the real node (tiny model, CPU): `swarm launch`, kills, relaunch, validate."""

from __future__ import annotations

import signal
import time
from collections import Counter

import pytest

from harness import CONFIG, Timeouts, alive, still_alive

pytestmark = pytest.mark.slow

RESUME = ("experiment.max_rounds=10", "sapo.max_new_tokens=24", "checkpoint.every_rounds=2")
SIGTERM = ("experiment.max_rounds=200", "sapo.max_new_tokens=24", "checkpoint.every_rounds=1000",
           "supervisor.stop_timeout_s=20")


@pytest.mark.timeout(Timeouts.of(CONFIG).budget(rounds=3))
def test_readme_first_command_launch_then_validate(make_swarm):
    run = make_swarm()
    assert run.run_to_end() == 0, run.output()[-3000:]
    check = run.cli("validate")
    assert check.returncode == 0, check.stdout
    assert "checks passed" in check.stdout
    for worker in run.workers:
        assert sum(m["num_external_groups"] for m in run.metrics(worker)) > 0


@pytest.mark.timeout(Timeouts.of(CONFIG, *RESUME).budget(launches=2, rounds=10 + 2, restarts=1))
def test_killed_worker_then_killed_supervisor_relaunch_resumes(make_swarm):
    run = make_swarm(*RESUME)
    t = run.t
    sup = run.launch()
    run.wait_for(lambda: len(run.metrics("worker_1")) >= 2, t.budget(rounds=2), "worker_1 to train 2 rounds")
    victim = run.kill("worker_1")  # only worker_1 restarts; the others keep training
    run.wait_for(lambda: run.running_pid("worker_1") not in (None, victim), t.budget(launches=0, restarts=1),
                 "worker_1 to be restarted")
    status = run.status()
    assert status["nodes"]["worker_1"]["restarts"] == 1
    assert status["nodes"]["worker_2"]["restarts"] == 0 and status["nodes"]["coordinator"]["restarts"] == 0
    assert "SIGKILL" in status["nodes"]["worker_1"]["last_exit_line"]

    run.wait_for(lambda: len(run.metrics("worker_2")) >= 5, t.budget(launches=0, rounds=5),
                 "worker_2 to train 5 rounds")
    nodes = {n: run.node(n).get("pid") for n in run.names}
    sup.send_signal(signal.SIGKILL)  # power loss of the supervisor: no node may outlive it
    sup.wait(timeout=10)
    survivors = still_alive(nodes.values(), 15)  # parent-death signal: at once
    assert not [n for n, pid in nodes.items() if pid in survivors], "a node outlived its supervisor"

    assert run.run_to_end() == 0, run.output()[-3000:]  # the same command again resumes the experiment
    assert run.cli("validate").returncode == 0
    state = run.state()
    assert state["finished"] and state["round"] == 10
    for worker in run.workers:
        rounds = [m["round"] for m in run.metrics(worker)]
        assert max(Counter(rounds).values()) == 1, f"{worker} has duplicated metrics lines: {rounds}"
        assert rounds[-1] == 9
        assert "resumed" in [e["event"] for e in run.events(worker)]


@pytest.mark.timeout(Timeouts.of(CONFIG, *SIGTERM).budget(rounds=2, stops=1))
def test_sigterm_stops_every_node_after_a_checkpoint(make_swarm):
    run = make_swarm(*SIGTERM)
    run.launch()
    run.wait_for(lambda: len(run.metrics("worker_1")) >= 2 and len(run.metrics("worker_2")) >= 2,
                 run.t.budget(rounds=2), "both workers to train")
    nodes = {n: run.node(n).get("pid") for n in run.names}
    started = time.monotonic()
    assert run.stop(signal.SIGTERM) == 143
    assert time.monotonic() - started < run.t.stop + 5
    assert not [n for n, pid in nodes.items() if pid and alive(pid)]
    for worker in run.workers:
        events = run.events(worker)
        assert events[-1]["event"] == "stopped"
        assert any(e["event"] == "checkpoint" for e in events), "no checkpoint on SIGTERM"
        assert list((run.exp / "checkpoints").rglob(f"{worker}.pt"))
