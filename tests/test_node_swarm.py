"""Real node processes (tiny model, CPU) on a temp directory: a swarm by hand, and a SIGKILLed worker."""

from __future__ import annotations

import signal
from collections import Counter

import pytest

from harness import CONFIG, Timeouts

RESUME = ("experiment.max_rounds=10", "checkpoint.every_rounds=2", "sapo.max_new_tokens=24")


@pytest.mark.slow
@pytest.mark.timeout(Timeouts.of(CONFIG).budget(rounds=3))
def test_coordinator_and_two_workers_finish_three_rounds(make_swarm):
    swarm = make_swarm()
    for node in swarm.names:
        swarm.start_node(node)
    for node in swarm.names:
        assert swarm.wait_node(node, swarm.t.budget(rounds=3)) == 0, swarm.output(f"{node}.out")[-3000:]
    state = swarm.state()
    assert state["finished"] is True and state["round"] == 3
    for worker in swarm.workers:
        lines = swarm.metrics(worker)
        assert [m["round"] for m in lines] == [0, 1, 2]
        assert sum(m["num_external_groups"] for m in lines) > 0, "J=2 but no external group was used"
        assert all(m["external_candidates"] >= 1 for m in lines)
        for r in range(3):
            assert (swarm.exp / "rollouts" / f"round_{r}" / "stage_0" / f"{worker}.json").is_file()
            assert (swarm.exp / "rewards" / f"round_{r}" / "stage_0" / f"{worker}.json").is_file()
        assert (swarm.exp / "logs" / worker / "training_events.jsonl").is_file()
        assert (swarm.exp / "peers" / f"{worker}.json").is_file()
        assert (swarm.exp / "checkpoints" / "round_2" / f"{worker}.pt").is_file()
    assert (swarm.exp / "state" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.timeout(Timeouts.of(CONFIG, *RESUME).budget(launches=2, rounds=10 + 1))
def test_sigkilled_worker_restarted_by_hand_resumes_without_duplicates(make_swarm):
    swarm = make_swarm(*RESUME)
    for node in swarm.names:
        swarm.start_node(node)
    swarm.wait_for(lambda: len(swarm.metrics("worker_1")) >= 4, swarm.t.budget(rounds=4), "worker_1 to train 4 rounds")
    swarm.kill("worker_1", signal.SIGKILL)
    swarm.wait_node("worker_1", 10)
    killed_at = len(swarm.metrics("worker_1"))
    swarm.start_node("worker_1")
    for node in swarm.names:
        assert swarm.wait_node(node, swarm.t.budget(rounds=10)) == 0, swarm.output(f"{node}.out")[-3000:]
    resumed = [e for e in swarm.events("worker_1") if e["event"] == "resumed"]
    assert resumed and resumed[0]["round"] >= 1, swarm.events("worker_1")
    rounds = [m["round"] for m in swarm.metrics("worker_1")]
    assert max(Counter(rounds).values()) == 1, f"duplicated metrics lines: {rounds}"
    assert len(rounds) >= killed_at and rounds == sorted(rounds)
    assert [m["round"] for m in swarm.metrics("worker_2")] == list(range(10))
    assert swarm.state()["finished"] is True
