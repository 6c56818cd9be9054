"""``python -m node``: identity from flags or the seeds' env, and configuration errors as exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smoke-cpu.yaml"


def _node(tmp_path, *args, env=None):
    full_env = {**os.environ, "SWARM_RUNTIME_DIR": str(tmp_path / "run"), "GDRIVE_PATH": str(tmp_path / "shared"),
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "node", "--config", str(CONFIG), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, env, words", [
    (["--set", "sapo.num_generations=1"], {}, "sapo.num_generations: must be >= 2"),
    ([], {"NODE_ROLE": "worker"}, "NODE_ID"),
    ([], {"NODE_ROLE": "boss", "NODE_ID": "x"}, "NODE_ROLE: must be one of coordinator, worker"),
    (["--role", "worker", "--node-id", "../w"], {}, "NODE_ID"),
    ([], {"NODE_ROLE": "worker", "NODE_ID": "w1", "MAX_ROUNDS": "lots"}, "$MAX_ROUNDS"),
])
def test_configuration_errors_exit_2_without_traceback(tmp_path, args, env, words):
    result = _node(tmp_path, *args, env=env)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_with_other_ijg_than_the_experiment_refuses(tmp_path):
    first = _node(tmp_path, "--role", "coordinator", "--set", "supervisor.startup_timeout_s=0.1",
                  "--set", "experiment.max_rounds=1", "--set", "coordinator.strategy=time",
                  "--set", "coordinator.round_interval_s=0.1")
    assert first.returncode == 0, first.stderr
    other = _node(tmp_path, env={"NODE_ROLE": "worker", "NODE_ID": "worker_1", "NUM_GENERATIONS": "8"})
    assert other.returncode == 2
    assert "sapo.num_generations" in other.stderr and "experiment has 4" in other.stderr
