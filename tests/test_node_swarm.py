"""Real node processes (tiny model, CPU) on a temp directory: a swarm by hand, and a SIGKILLed worker."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from swarm_helpers import Swarm, swarm_factory  # noqa: F401 - the fixture


@pytest.mark.slow
def test_coordinator_and_two_workers_finish_three_rounds(swarm_factory):
    swarm = swarm_factory()
    for node in ("coordinator", "worker_1", "worker_2"):
        swarm.start(node)
    for node in ("coordinator", "worker_1", "worker_2"):
        assert swarm.wait(node, 180) == 0, swarm.output(node)[-3000:]
    state = json.loads((swarm.exp / "state" / "current_state.json").read_text())
    assert state["finished"] is True and state["round"] == 3
    for worker in ("worker_1", "worker_2"):
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
def test_sigkilled_worker_restarted_by_hand_resumes_without_duplicates(swarm_factory):
    swarm = swarm_factory("experiment.max_rounds=10", "checkpoint.every_rounds=2", "sapo.max_new_tokens=24")
    for node in ("coordinator", "worker_1", "worker_2"):
        swarm.start(node)
    deadline = time.monotonic() + 120
    while len(swarm.metrics("worker_1")) < 4:
        assert time.monotonic() < deadline, swarm.output("worker_1")[-3000:]
        time.sleep(0.05)
    swarm.procs["worker_1"].send_signal(signal.SIGKILL)
    swarm.procs["worker_1"].wait(timeout=10)
    killed_at = len(swarm.metrics("worker_1"))
    swarm.start("worker_1")
    for node in ("coordinator", "worker_1", "worker_2"):
        assert swarm.wait(node, 240) == 0, swarm.output(node)[-3000:]
    events = [json.loads(x) for x in (swarm.exp / "logs" / "worker_1" / "training_events.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed and resumed[0]["round"] >= 1, events
    rounds = [m["round"] for m in swarm.metrics("worker_1")]
    assert max(Counter(rounds).values()) == 1, f"duplicated metrics lines: {rounds}"
    assert len(rounds) >= killed_at and rounds == sorted(rounds)
    assert [m["round"] for m in swarm.metrics("worker_2")] == list(range(10))
    assert json.loads((swarm.exp / "state" / "current_state.json").read_text())["finished"] is True
