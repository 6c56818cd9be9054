"""Fast start and restart: what each process imports, the task-name cache, deferred imports in a worker, and a
CPU swarm whose nodes all start at once.

Real processes throughout; every wait is bounded by what it waits for (a node's slow start, a start-up
timeout), never by how fast an idle machine is.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fake_node import FAKE_NODE, config_yaml, drive, fake_config
from harness import MARGIN_S, Timeouts, iso_ts, wait_for
from node.heartbeat import heartbeat_path, read_heartbeat
from node.task_names import installed_key, known_task_names, registered_datasets
from supervisor.daemon import Supervisor
from supervisor.sdnotify import SdNotifier
from supervisor.states import NodeState

S = NodeState
REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke-cpu.yaml"
HEAVY = ("torch", "transformers", "reasoning_gym", "matplotlib")
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$")


def run_python(code: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def imported(stderr: str) -> set[str]:
    """Top-level packages in a ``python -X importtime`` report."""
    return {m.group(1).split(".")[0] for line in stderr.splitlines() if (m := IMPORT_LINE.match(line))}


@pytest.fixture
def warm_cache(tmp_path, monkeypatch):
    """``SWARM_CACHE_DIR`` in tmp_path with reasoning-gym's names already cached (as after any first check)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SWARM_CACHE_DIR", str(cache))
    env = {**os.environ, "SWARM_CACHE_DIR": str(cache)}
    run_python("from node.task_names import known_task_names; known_task_names()", env)
    return env


# --------------------------------------------------------------------------- what each process imports

def test_supervisor_and_coordinator_entry_modules_import_no_torch(warm_cache):
    code = ("import sys\n"
            "import supervisor.cli, supervisor.daemon, node.__main__, node.coordinator\n"
            "from node.config import resolve_config\n"
            f"resolve_config({str(SMOKE)!r})\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    assert run_python(code, warm_cache).stdout.strip() == "[]"


def test_a_real_coordinator_imports_no_torch(tmp_path, warm_cache, reaper):
    """``python -X importtime -m node`` as the coordinator, up to its main loop (waiting for workers)."""
    env = {**warm_cache, "SWARM_RUNTIME_DIR": str(tmp_path / "rt")}
    args = [sys.executable, "-X", "importtime", "-m", "node", "--config", str(SMOKE), "--role", "coordinator",
            "--set", f"experiment.root={tmp_path / 'shared'}", "--set", f"exchange.lock_dir={tmp_path / 'locks'}",
            "--set", f"exchange.spool_dir={tmp_path / 'spool'}"]
    with open(tmp_path / "coordinator.err", "w") as err:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        beat = heartbeat_path(tmp_path / "rt", "coordinator")
        wait_for(lambda: (read_heartbeat(beat) or None) and read_heartbeat(beat).phase == "waiting_for_workers",
                 Timeouts.of(SMOKE).config.supervisor.startup_timeout_s, "the coordinator waiting for workers",
                 fail_if=lambda: proc.poll() is not None and f"it exited with {proc.returncode}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=MARGIN_S) == 143
    report = (tmp_path / "coordinator.err").read_text()
    assert "node" in imported(report) and not imported(report) & set(HEAVY)


def test_a_real_supervisor_run_imports_no_torch(tmp_path, warm_cache, reaper):
    """``python -X importtime -m supervisor.cli launch`` over fake nodes that finish: the whole run."""
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared")
    env = {**warm_cache, "SWARM_RUNTIME_DIR": str(tmp_path / "rt"), "SWARM_NODE_COMMAND": " ".join(FAKE_NODE),
           "FAKE_NODE_MODE": "exit_after=0.5"}
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "supervisor.cli", "launch", str(cfg)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=Timeouts(fake_config(tmp_path)).budget())
    assert out.returncode == 0, out.stderr[-3000:]
    assert "supervisor" in imported(out.stderr) and not imported(out.stderr) & set(HEAVY)


# --------------------------------------------------------------------------- reasoning-gym's names, cached

def test_task_names_are_cached_per_install_and_match_reasoning_gym(tmp_path):
    from sapo.tasks import known_task_names as authoritative

    names = known_task_names(directory=tmp_path)
    assert names == authoritative() and "toy_copy" in names and "composite" not in names
    cached = tmp_path / f"reasoning-gym-datasets-{installed_key()}.json"
    data = json.loads(cached.read_text())
    assert data["key"] == installed_key() and "basic_arithmetic" in data["datasets"]
    # A warm cache is what answers: a name planted in it shows (nothing imports reasoning-gym for the check).
    cached.write_text(json.dumps({"key": installed_key(), "datasets": [*data["datasets"], "planted_task"]}))
    assert "planted_task" in known_task_names(directory=tmp_path)


@pytest.mark.parametrize("content", ["", "not json", "[]", '{"key": "other", "datasets": ["x"]}',
                                     '{"key": "KEY", "datasets": []}', '{"key": "KEY", "datasets": [1, 2]}'])
def test_a_broken_or_foreign_task_name_cache_falls_back_to_the_import(tmp_path, content):
    cached = tmp_path / f"reasoning-gym-datasets-{installed_key()}.json"
    cached.write_text(content.replace("KEY", installed_key()))
    from reasoning_gym.factory import DATASETS

    assert registered_datasets(directory=tmp_path) == sorted(DATASETS)
    assert json.loads(cached.read_text())["datasets"] == sorted(DATASETS)  # and is rewritten


def test_an_unwritable_cache_dir_is_not_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache dir should be")
    from sapo.tasks import known_task_names as authoritative

    assert known_task_names(directory=blocker / "cache") == authoritative()


def test_a_warm_cache_keeps_reasoning_gym_out_of_a_config_check(warm_cache):
    code = ("import sys\nfrom node.config import resolve_config\n"
            f"resolve_config({str(SMOKE)!r})\nprint('reasoning_gym' in sys.modules)\n")
    assert run_python(code, warm_cache).stdout.strip() == "False"
    bad = run_python("from node.config import resolve_config\nfrom sapo.config import ConfigError\n"
                     "try:\n    resolve_config(None, overrides=['sapo.tasks=[{\"name\": \"no_such_task\"}]'])\n"
                     "except ConfigError as e:\n    print(e)\n", warm_cache)
    assert "unknown task 'no_such_task'" in bad.stdout


# --------------------------------------------------------------------------- a worker's deferred imports

def test_a_worker_defers_cellpylib_and_never_imports_matplotlib_for_other_tasks(warm_cache):
    code = ("import sys, json\nfrom node.__main__ import defer_imports\n"
            "assert defer_imports() == ['cellpylib']\n"
            "import torch, transformers\nfrom node.models import load_model\nfrom sapo.learner import SapoLearner\n"
            "from sapo.tasks import TaskBank\nfrom sapo.config import TaskSpec\n"
            "bank = TaskBank([TaskSpec(name='basic_arithmetic', weight=1.0)])\n"
            "bank.sample(1, 'worker_1', 0, 4)\n"
            "before = 'matplotlib' in sys.modules\n"
            "import reasoning_gym\n"
            "item = reasoning_gym.create_dataset('game_of_life', size=10, seed=3)[4]\n"
            "print(json.dumps([before, 'matplotlib' in sys.modules, item['answer']]))\n")
    before, after, answer = json.loads(run_python(code, warm_cache).stdout)
    assert before is False and after is True  # loaded when game_of_life first built an item, not before
    plain = run_python("import reasoning_gym\n"
                       "print(reasoning_gym.create_dataset('game_of_life', size=10, seed=3)[4]['answer'])", warm_cache)
    assert answer == plain.stdout.strip()  # the deferred module is the real one once used


def test_defer_imports_leaves_imported_and_missing_modules_alone():
    from node.__main__ import defer_imports

    assert defer_imports(("json", "no_such_module_here")) == []
    assert type(sys.modules["json"]).__name__ == "module"


# --------------------------------------------------------------------------- a CPU swarm starts at once

def test_a_cpu_swarm_starts_every_node_without_waiting_for_heartbeats(tmp_path, reaper, monkeypatch):
    """Fake nodes that send no heartbeat for SLOW_S: every one of them must have started meanwhile."""
    slow_s = 300.0
    record = tmp_path / "record"
    monkeypatch.setenv("FAKE_NODE_RECORD", str(record))
    monkeypatch.setenv("FAKE_NODE_MODE", f"slow_start={slow_s:g}")
    cfg = fake_config(tmp_path / "shared", workers=3, startup_timeout_s=slow_s + 60, stop_timeout_s=1.0)
    sup = Supervisor(cfg, node_command=FAKE_NODE, runtime_dir=tmp_path / "rt", gpu=None,
                     notifier=SdNotifier(environ={}))
    reaper.append(sup)
    started = lambda: {p.name.split(".")[0] for p in record.glob("*.json")} if record.is_dir() else set()  # noqa: E731
    names = set(sup.nodes)
    assert drive(sup, lambda: started() == names, timeout=slow_s - MARGIN_S), f"started: {sorted(started())}"
    assert sup.stagger == "none"
    assert all(n.status.state is S.STARTING for n in sup.nodes.values())
    assert not any(heartbeat_path(sup.paths.root, name).exists() for name in names)  # none heartbeated yet


@pytest.mark.slow
def test_the_smoke_swarm_spawns_every_worker_before_any_heartbeat(make_swarm):
    """``swarm launch configs/smoke-cpu.yaml`` (real nodes, 3 rounds): every node spawned before the first one
    ran, and it finishes."""
    swarm = make_swarm()
    assert swarm.run_to_end() == 0
    events = [json.loads(line) for line in (swarm.runtime / "logs" / "supervisor.log").read_text().splitlines()
              if line.startswith("{")]
    spawned = [iso_ts(e["timestamp"]) for e in events if e["event"] == "node_spawned"]
    running = [iso_ts(e["timestamp"]) for e in events if e["event"] == "node_state_changed" and e["new"] == "RUNNING"]
    assert len(spawned) == len(swarm.names) and len(running) == len(swarm.names)  # no restart
    assert max(spawned) < min(running)
