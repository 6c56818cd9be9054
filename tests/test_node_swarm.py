"""Real node processes (tiny model, CPU) on a temp directory: a swarm by hand, and a SIGKILLed worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smoke-cpu.yaml"


class Swarm:
    """Node processes started by hand, as a user without the supervisor would; all killed at the end."""

    def __init__(self, tmp_path: Path, *overrides: str):
        self.tmp = tmp_path
        self.overrides = [f"experiment.root={tmp_path / 'shared'}", f"exchange.lock_dir={tmp_path / 'locks'}",
                          f"exchange.spool_dir={tmp_path / 'spool'}", *overrides]
        self.env = {**os.environ, "SWARM_RUNTIME_DIR": str(tmp_path / "run"), "PYTHONUNBUFFERED": "1"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.exp = tmp_path / "shared" / "experiments" / "smoke-cpu"

    def start(self, node_id: str) -> subprocess.Popen:
        role = "coordinator" if node_id == "coordinator" else "worker"
        args = [sys.executable, "-m", "node", "--config", str(CONFIG), "--role", role, "--node-id", node_id]
        for item in self.overrides:
            args += ["--set", item]
        log = open(self.tmp / f"{node_id}.out", "ab")
        self.procs[node_id] = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self.procs[node_id]

    def wait(self, node_id: str, timeout: float) -> int:
        try:
            return self.procs[node_id].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{node_id} did not exit in {timeout}s; output:\n{self.output(node_id)[-3000:]}")

    def output(self, node_id: str) -> str:
        return (self.tmp / f"{node_id}.out").read_text(errors="replace")

    def metrics(self, node_id: str) -> list[dict]:
        path = self.exp / "logs" / node_id / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def swarm_factory(tmp_path):
    made = []

    def make(*overrides):
        made.append(Swarm(tmp_path, *overrides))
        return made[-1]

    yield make
    for s in made:
        s.close()


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
