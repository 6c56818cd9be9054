"""The whole product with the real node (tiny model, CPU): `swarm launch`, kills, relaunch, validate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smoke-cpu.yaml"

pytestmark = pytest.mark.slow


class Launch:
    """`swarm launch` of the smoke config in a temp dir, driven like a user would from a shell."""

    def __init__(self, tmp_path: Path, *overrides: str):
        self.tmp = tmp_path
        self.sets = [f"experiment.root={tmp_path / 'shared'}", f"exchange.lock_dir={tmp_path / 'locks'}",
                     f"exchange.spool_dir={tmp_path / 'spool'}", *overrides]
        self.env = {**os.environ, "SWARM_RUNTIME_DIR": str(tmp_path / "run")}
        self.exp = tmp_path / "shared" / "experiments" / "smoke-cpu"
        self.proc: subprocess.Popen | None = None
        self.seen_pids: set[int] = set()

    def swarm(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "supervisor.cli", args[0], str(CONFIG), *args[1:]]
        for item in self.sets:
            cmd += ["--set", item]
        return subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)

    def start(self) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "supervisor.cli", "launch", str(CONFIG)]
        for item in self.sets:
            cmd += ["--set", item]
        log = open(self.tmp / "supervisor.out", "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self.proc

    def status(self) -> dict:
        try:
            return json.loads((self.tmp / "run" / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def node_pid(self, node: str) -> int | None:
        pid = self.status().get("nodes", {}).get(node, {}).get("pid")
        if pid:
            self.seen_pids.add(pid)
        return pid

    def metrics(self, node: str) -> list[dict]:
        path = self.exp / "logs" / node / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            for node in ("coordinator", "worker_1", "worker_2"):
                self.node_pid(node)
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; supervisor output:\n{self.output()[-3000:]}")
            time.sleep(0.1)

    def output(self) -> str:
        path = self.tmp / "supervisor.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for pid in self.seen_pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """A zombie (killed, not yet reaped by PID 1 here) counts as dead."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def launch(tmp_path):
    made = []

    def make(*overrides):
        made.append(Launch(tmp_path, *overrides))
        return made[-1]

    yield make
    for item in made:
        item.close()


def test_readme_first_command_launch_then_validate(launch):
    run = launch()
    result = run.swarm("launch", timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check = run.swarm("validate")
    assert check.returncode == 0, check.stdout
    assert "checks passed" in check.stdout
    for worker in ("worker_1", "worker_2"):
        assert sum(m["num_external_groups"] for m in run.metrics(worker)) > 0


def test_killed_worker_then_killed_supervisor_relaunch_resumes(launch):
    run = launch("experiment.max_rounds=10", "sapo.max_new_tokens=24", "checkpoint.every_rounds=2")
    sup = run.start()
    run.wait_for(lambda: len(run.metrics("worker_1")) >= 2, 240, "worker_1 to train 2 rounds")
    victim = run.node_pid("worker_1")
    os.kill(victim, signal.SIGKILL)  # only worker_1 restarts; the others keep training
    run.wait_for(lambda: (run.node_pid("worker_1") or victim) != victim
                 and run.status()["nodes"]["worker_1"]["state"] == "RUNNING", 120, "worker_1 to be restarted")
    status = run.status()
    assert status["nodes"]["worker_1"]["restarts"] == 1
    assert status["nodes"]["worker_2"]["restarts"] == 0 and status["nodes"]["coordinator"]["restarts"] == 0
    assert "SIGKILL" in status["nodes"]["worker_1"]["last_exit_line"]

    run.wait_for(lambda: len(run.metrics("worker_2")) >= 5, 240, "worker_2 to train 5 rounds")
    nodes = {n: run.node_pid(n) for n in ("coordinator", "worker_1", "worker_2")}
    sup.send_signal(signal.SIGKILL)  # power loss of the supervisor: no node may outlive it
    sup.wait(timeout=10)
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in nodes.values() if pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [n for n, pid in nodes.items() if pid and alive(pid)], "a node outlived its supervisor"

    result = run.swarm("launch", timeout=400)  # the same command again resumes the experiment
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert run.swarm("validate").returncode == 0
    state = json.loads((run.exp / "state" / "current_state.json").read_text())
    assert state["finished"] and state["round"] == 10
    for worker in ("worker_1", "worker_2"):
        rounds = [m["round"] for m in run.metrics(worker)]
        assert max(Counter(rounds).values()) == 1, f"{worker} has duplicated metrics lines: {rounds}"
        assert rounds[-1] == 9
        events = [json.loads(x)["event"] for x in (run.exp / "logs" / worker / "training_events.jsonl").read_text().splitlines()]
        assert "resumed" in events


def test_sigterm_stops_every_node_after_a_checkpoint(launch):
    run = launch("experiment.max_rounds=200", "sapo.max_new_tokens=24", "checkpoint.every_rounds=1000",
                 "supervisor.stop_timeout_s=20")
    sup = run.start()
    run.wait_for(lambda: len(run.metrics("worker_1")) >= 2 and len(run.metrics("worker_2")) >= 2, 240,
                 "both workers to train")
    nodes = {n: run.node_pid(n) for n in ("coordinator", "worker_1", "worker_2")}
    started = time.monotonic()
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=40) == 143
    assert time.monotonic() - started < 20 + 5
    assert not [n for n, pid in nodes.items() if pid and alive(pid)]
    for worker in ("worker_1", "worker_2"):
        events = [json.loads(x) for x in (run.exp / "logs" / worker / "training_events.jsonl").read_text().splitlines()]
        assert events[-1]["event"] == "stopped"
        assert any(e["event"] == "checkpoint" for e in events), "no checkpoint on SIGTERM"
        assert list((run.exp / "checkpoints").rglob(f"{worker}.pt"))
