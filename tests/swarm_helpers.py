"""Starting real node processes by hand in tests, as a user without the supervisor would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smoke-cpu.yaml"


class Swarm:
    """Node processes started by hand, as a user without the supervisor would; all killed at the end."""

    def __init__(self, tmp_path: Path, *overrides: str, shared: Path | None = None):
        self.tmp = tmp_path
        shared = shared or tmp_path / "shared"
        self.overrides = [f"experiment.root={shared}", f"exchange.lock_dir={tmp_path / 'locks'}",
                          f"exchange.spool_dir={tmp_path / 'spool'}", *overrides]
        self.env = {**os.environ, "SWARM_RUNTIME_DIR": str(tmp_path / "run"), "PYTHONUNBUFFERED": "1"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.exp = shared / "experiments" / "smoke-cpu"

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

    def make(*overrides, shared=None):
        made.append(Swarm(tmp_path, *overrides, shared=shared))
        return made[-1]

    yield make
    for s in made:
        s.close()
