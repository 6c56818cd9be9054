"""The `swarm` CLI: each subcommand's happy path and error path."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from fake_node import FAKE_NODE, config_yaml
from harness import Timeouts, alive, wait_for
from node.config import resolve_config
from node.layout import ExperimentLayout
from node.schemas import ConfigSnapshot, PeerRecord, Rollout, RolloutFile, RoundResult, RoundState, TaskRef
from supervisor import cli, logview
from supervisor.runfiles import RuntimePaths
from supervisor.status import read_status

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("launch", "status", "stop", "logs", "validate", "config", "systemd-unit")


@pytest.fixture
def rt(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SWARM_RUNTIME_DIR", str(tmp_path / "rt"))
    for var in ("GDRIVE_PATH", "EXPERIMENT_NAME", "TEST_MODE", "MAX_ROUNDS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "rt"


def swarm(*args: str, env_extra=None, timeout=30) -> subprocess.CompletedProcess:
    env = {**os.environ, "SWARM_NODE_COMMAND": " ".join(FAKE_NODE), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------- help and errors

def test_help_documents_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out
        assert cli.main([command, "--help"]) == 0
        sub = capsys.readouterr().out
        assert "CONFIG" in sub and "--set" in sub
    assert cli.main([]) == 2  # no subcommand: a usage error


def test_bad_config_exits_2_naming_the_field_without_a_traceback(tmp_path, rt, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("supervisor: {workers: 0}\n")
    for command in COMMANDS:
        assert cli.main([command, str(bad)]) == 2, command
        err = capsys.readouterr().err
        assert "supervisor.workers" in err and "must be >= 1" in err and "Traceback" not in err, command
    assert cli.main(["config", str(bad), "--set", "nonsense"]) == 2
    assert "--set wants section.field=value" in capsys.readouterr().err
    assert cli.main(["config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err
    # the real console script, as a user sees it: one line, no traceback
    res = swarm("launch", str(bad), "--set", "sapo.num_generations=1", env_extra={"SWARM_RUNTIME_DIR": str(rt)})
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert "sapo.num_generations" in res.stderr or "supervisor.workers" in res.stderr


# --------------------------------------------------------------------------- config

def test_config_prints_yaml_that_resolves_back_to_the_same_config(tmp_path, rt, monkeypatch, capsys):
    monkeypatch.setenv("GDRIVE_PATH", str(tmp_path / "drive"))
    monkeypatch.setenv("NUM_GENERATIONS", "6")
    src = REPO / "configs" / "smoke-cpu.yaml"
    assert cli.main(["config", str(src), "--set", "supervisor.workers=3", "--set", "sapo.top_p=0.9"]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["supervisor"]["workers"] == 3
    out = tmp_path / "resolved.yaml"
    out.write_text(printed)
    original = resolve_config(src, overrides=["supervisor.workers=3", "sapo.top_p=0.9"])
    assert resolve_config(out) == original
    assert original.sapo.num_generations == 6 and original.experiment.root == str(tmp_path / "drive")


def test_systemd_unit_name_and_text(tmp_path, rt, capsys):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared")
    assert cli.main(["systemd-unit", str(cfg)]) == 0
    assert "Type=notify" in capsys.readouterr().out


# --------------------------------------------------------------------------- status / stop without a supervisor

def test_status_and_stop_without_a_supervisor(tmp_path, rt, capsys):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared")
    assert cli.main(["status", str(cfg)]) == 3
    out = capsys.readouterr().out
    assert "No supervisor is running for experiment 'fake'" in out and "No status file" in out
    assert cli.main(["status", str(cfg), "--json"]) == 3
    obj = json.loads(capsys.readouterr().out)
    assert obj["running"] is False and obj["supervisor_pid"] is None and obj["status"] is None
    assert cli.main(["stop", str(cfg)]) == 0
    assert "nothing to stop" in capsys.readouterr().out
    # a stale pid file from a dead supervisor (or a reused pid) does not count
    rt.mkdir(parents=True, exist_ok=True)
    (rt / "supervisor.pid").write_text(f"{os.getpid()}\n12345.0\n")
    assert cli.main(["status", str(cfg)]) == 3


def fabricated_status(rt: Path) -> dict:
    me = psutil.Process()
    rt.mkdir(parents=True, exist_ok=True)
    (rt / "supervisor.pid").write_text(f"{os.getpid()}\n{me.create_time():.3f}\n")
    node = {"state": "RUNNING", "pid": 4242, "restarts": 0, "round": 7, "phase": "train", "heartbeat_age_s": 0.4,
            "reward": 0.25, "rss_bytes": 300 * 2**20, "cpu_percent": 97.0, "gpu_bytes": None,
            "gpu_budget_bytes": None, "over_budget": False, "last_exit_line": None, "log_tail": [], "logs": {}}
    fatal = {**node, "state": "FATAL", "pid": None, "restarts": 3, "round": None,
             "fatal_reason": "configuration error: worker_2 failed 3 times before its first heartbeat",
             "last_exit": {"reason": "exited", "returncode": 1},
             "last_exit_line": "pid 99 exit code 1 [exited]: exit code 1",
             "log_tail": ['{"event": "node_crashed", "level": "error", "timestamp": "2026-01-01T10:00:00Z"}',
                          "RuntimeError: CUDA error: no kernel image"]}
    st = {"version": 1, "state": "running", "summary": "round 7/10: 2 running, 1 fatal; restarts 3",
          "updated_at": time.time(), "supervisor": {"pid": os.getpid(), "cpu_percent": 0.5, "rss_bytes": 40 << 20},
          "launch": {"describe": "device cpu (supervisor.device is cpu)"}, "gpu": {},
          "nodes": {"coordinator": node, "worker_1": {**node, "pid": 4243}, "worker_2": fatal},
          "over_budget": [], "fatal": [{"node": "worker_2", "reason": fatal["fatal_reason"]}], "exit_code": None}
    (rt / "status.json").write_text(json.dumps(st))
    return st


def test_status_of_a_running_supervisor_shows_nodes_and_what_failed(tmp_path, rt, capsys):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared")
    fabricated_status(rt)
    assert cli.main(["status", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"Supervisor pid {os.getpid()}" in out and "round 7/10" in out
    assert "worker_1     RUNNING" in out and "0.250" in out and "300.0M" in out
    assert "worker_2: FATAL — configuration error" in out
    assert "10:00:00 error   node_crashed" in out and "RuntimeError: CUDA error: no kernel image" in out
    assert cli.main(["status", str(cfg), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["running"] is True and obj["status"]["nodes"]["worker_2"]["state"] == "FATAL"


# --------------------------------------------------------------------------- logs

def test_logs_are_merged_by_time_and_prefixed(tmp_path, rt, capsys):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared", workers=1)
    logs = rt / "logs"
    logs.mkdir(parents=True)

    def j(ts, event, **kw):
        return json.dumps({"event": event, "level": "info", "timestamp": f"2026-01-01T10:00:{ts:02d}Z", **kw})

    (logs / "coordinator.log").write_text("\n".join([j(1, "round_advanced", round=1), j(4, "round_advanced", round=2)]) + "\n")
    (logs / "worker_1.log").write_text(j(2, "round_done", reward_local=0.5) + "\n")
    (logs / "worker_1.stderr.log").write_text(j(2, "round_done", reward_local=0.5) + "\nTraceback: boom\n")
    (logs / "supervisor.log").write_text(j(3, "node_spawned", node="worker_1") + "\n")
    assert cli.main(["logs", str(cfg)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("coordinator | 10:00:01 info    round_advanced round=1")
    assert [line.split(" | ")[0].strip() for line in lines] == [
        "coordinator", "worker_1", "worker_1", "supervisor", "coordinator"]
    assert sum("round_done" in line for line in lines) == 1  # the stderr copy of a JSON line is not repeated
    assert any(line.endswith("| Traceback: boom") for line in lines)
    assert cli.main(["logs", str(cfg), "--node", "worker_1", "-n", "1"]) == 0
    assert capsys.readouterr().out.strip() == "worker_1 | Traceback: boom"
    assert cli.main(["logs", str(cfg), "--node", "worker_9"]) == 2
    assert "no node 'worker_9'" in capsys.readouterr().err


def test_follow_emits_new_lines_as_they_arrive(tmp_path):
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_text("old\n")
    got: list[tuple[str, str]] = []
    stop = threading.Event()
    t = threading.Thread(target=logview.follow, args=([("a", a, False), ("b", b, False)], lambda *x: got.append(x)),
                         kwargs={"poll_s": 0.02, "should_stop": stop.is_set})
    t.start()
    try:
        time.sleep(0.1)
        with open(a, "a") as f:
            f.write("new 1\npart")
        b.write_text("b 1\n")
        wait_for(lambda: len(got) == 2, 3, "the two new lines followed")
        with open(a, "a") as f:
            f.write("ial\n")
        wait_for(lambda: len(got) == 3, 3, "the completed partial line followed")
    finally:
        stop.set()
        t.join(5)
    assert sorted(got) == [("a", "new 1"), ("a", "partial"), ("b", "b 1")]


# --------------------------------------------------------------------------- validate

def make_experiment(root: Path, name: str = "fake", workers: int = 2, rounds: int = 3) -> ExperimentLayout:
    layout = ExperimentLayout.for_experiment(root, name)
    layout.ensure_dirs()
    now = time.time()

    def dump(path: Path, obj) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))

    dump(layout.state_file(), RoundState(experiment=name, round=rounds, stage=0, started_at=now, updated_at=now,
                                         finished=True, max_rounds=rounds).to_json())
    dump(layout.config_file(), ConfigSnapshot(experiment=name, written_by="coordinator", written_at=now,
                                              config={"experiment": {"name": name}}).to_json())
    for node in ["coordinator"] + [f"worker_{i}" for i in range(1, workers + 1)]:
        dump(layout.peer_file(node), PeerRecord(node_id=node, role="coordinator" if node == "coordinator" else "worker",
                                                pid=1, host="h", started_at=now, heartbeat_at=now, round=rounds,
                                                progress=3, status="finished").to_json())
    for i in range(1, workers + 1):
        w = f"worker_{i}"
        for r in range(rounds):
            task = TaskRef("basic_arithmetic", 1, r)
            group = [Rollout("2+2=", "<answer>4</answer>", 1.0, True, task), Rollout("2+2=", "5", 0.0, True, task)]
            dump(layout.rollout_file(r, 0, w), RolloutFile(w, r, 0, now, {"0": group}).to_json())
            dump(layout.reward_file(r, 0, w), RoundResult(w, r, 0, 0.5, 1, 1, now).to_json())
        layout.log_dir(w).mkdir(parents=True, exist_ok=True)
        layout.metrics_file(w).write_text("".join(json.dumps({"node_id": w, "round": r, "reward_local": 0.5}) + "\n"
                                                  for r in range(rounds)))
        layout.events_file(w).write_text(json.dumps({"node_id": w, "event": "start"}) + "\n")
    return layout


def test_validate_passes_on_a_complete_experiment(tmp_path, rt, capsys):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared", workers=2)
    make_experiment(tmp_path / "shared")
    assert cli.main(["validate", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "PASS  state" in out and "11/11 checks passed: OK" in out


def test_validate_fails_naming_what_is_wrong(tmp_path, rt, capsys):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared", workers=2)
    layout = make_experiment(tmp_path / "shared")
    with open(layout.metrics_file("worker_1"), "a") as f:  # round 1 twice
        f.write(json.dumps({"node_id": "worker_1", "round": 1, "reward_local": 0.1}) + "\n")
    layout.rollout_file(2, 0, "worker_2").unlink()  # a trained round without rollouts
    layout.reward_file(0, 0, "worker_2").write_text('{"schema_version": 1, "node_id": "worker_2"')  # truncated
    layout.events_file("worker_2").unlink()
    state = json.loads(layout.state_file().read_text())
    layout.state_file().write_text(json.dumps({**state, "round": 1, "finished": False}))
    assert cli.main(["validate", str(cfg)]) == 1
    out = capsys.readouterr().out
    fails = {line.split()[1]: line for line in out.splitlines() if line.startswith("FAIL")}
    assert "NOT finished" in fails["state"] and "max_rounds (3) not reached" in fails["state"]
    assert "rounds with more than one line: 1" in out
    assert "no rollout file for trained rounds 2" in out
    assert "rewards/round_0/stage_0/worker_2.json" in fails["rewards"]
    assert "training_events.jsonl is missing" in out
    assert out.strip().endswith("FAILED")
    assert cli.main(["validate", str(config_yaml(tmp_path / "c2.yaml", tmp_path / "nowhere"))]) == 1
    assert "does not exist" in capsys.readouterr().out


def _retained(tmp_path, *, archive: bool, archive_dir_exists: bool = True):
    """A finished 12-round experiment whose snapshot says retention kept the last 4 rounds."""
    layout = make_experiment(tmp_path / "shared", rounds=12)
    snapshot = json.loads(layout.config_file().read_text())
    snapshot["config"]["exchange"] = {"cleanup_enabled": True, "keep_last_n_rounds": 4, "archive_old": archive}
    layout.config_file().write_text(json.dumps(snapshot))
    archive_root = layout.archive_root / "rollouts"
    for r in range(8):  # what retention did at round 11
        src = layout.root / "rollouts" / f"round_{r}"
        if archive and archive_dir_exists:
            archive_root.mkdir(parents=True, exist_ok=True)
            src.rename(archive_root / f"round_{r}")
        else:
            for f in src.rglob("*.json"):
                f.unlink()
            for d in sorted(src.rglob("*"), reverse=True):
                d.rmdir()
            src.rmdir()
    return layout


def test_validate_knows_rounds_pruned_by_retention(tmp_path, rt, capsys):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared", workers=2)  # the CLI's own config: no cleanup
    layout = _retained(tmp_path, archive=False)
    assert cli.main(["validate", str(cfg), "--set", "experiment.max_rounds=12"]) == 0
    out = capsys.readouterr().out
    assert "rounds 0-7 pruned by retention" in out and "FAIL" not in out
    layout.rollout_file(9, 0, "worker_1").unlink()  # a kept round that lost its file is still a failure
    assert cli.main(["validate", str(cfg), "--set", "experiment.max_rounds=12"]) == 1
    assert "no rollout file for trained rounds 9" in capsys.readouterr().out


def test_validate_checks_archived_rounds_against_the_archive(tmp_path, rt, capsys):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared", workers=2)
    layout = _retained(tmp_path, archive=True)
    assert cli.main(["validate", str(cfg), "--set", "experiment.max_rounds=12"]) == 0
    assert "pruned by retention" not in capsys.readouterr().out  # they are all in the archive
    (layout.archive_root / "rollouts" / "round_3" / "stage_0" / "worker_2.json").unlink()
    assert cli.main(["validate", str(cfg), "--set", "experiment.max_rounds=12"]) == 1
    assert "no rollout file for trained rounds 3" in capsys.readouterr().out


# --------------------------------------------------------------------------- launch (real processes)

def test_foreground_launch_runs_to_the_end_with_plain_log_lines(tmp_path, rt, reaper):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared", workers=2)
    res = swarm("launch", str(cfg), "--workers", "1", env_extra={"FAKE_NODE_MODE": "exit_after=0.5"})
    assert res.returncode == 0, res.stderr
    assert "node_spawned" in res.stderr and "supervisor exited with code 0" in res.stderr
    assert "\x1b[" not in res.stderr  # no colours, no screen redraws when not on a TTY
    st = read_status(RuntimePaths(rt))
    assert st["exit_code"] == 0 and st["finished"] is True and list(st["nodes"]) == ["coordinator", "worker_1"]
    assert json.loads((rt / "logs" / "supervisor.log").read_text().splitlines()[0])["event"] == "gpu_plan"


def test_detach_then_status_logs_and_stop(tmp_path, rt, reaper, capsys):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared", workers=1, stop_timeout_s=3.0)
    t0 = time.monotonic()
    res = swarm("launch", str(cfg), "--detach")
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - t0 < 15
    pid = int(res.stdout.strip())
    # it outlived the command that started it, in a new session it does not lead (no controlling terminal)
    assert alive(pid) and os.getsid(pid) not in (os.getsid(0), pid)

    def running():
        st = read_status(RuntimePaths(rt))
        return st if st and [n["state"] for n in st["nodes"].values()] == ["RUNNING", "RUNNING"] else None

    wait_for(running, Timeouts.of(cfg).budget(), "the detached supervisor's nodes RUNNING")
    assert cli.main(["status", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"Supervisor pid {pid}" in out and "worker_1" in out
    again = swarm("launch", str(cfg), "--detach")
    assert again.returncode == 2 and f"pid {pid}" in again.stderr
    assert cli.main(["logs", str(cfg), "-n", "200"]) == 0
    out = capsys.readouterr().out
    assert "supervisor  | " in out and "node_spawned" in out and "worker_1    | fake node worker_1" in out
    node_pids = [n["pid"] for n in running()["nodes"].values()]
    assert cli.main(["stop", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "Stopped: supervisor exit code 143" in out
    assert not alive(pid) and not any(alive(p) for p in node_pids)
    assert cli.main(["status", str(cfg)]) == 3


def test_the_supervisor_never_imports_torch():
    code = ("import sys, supervisor.cli, supervisor.daemon, supervisor.systemd, supervisor.gpu; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_logs_read_rotated_files_too(tmp_path, rt, capsys):
    """A long run's node log rotates (node.logs.LOG_MAX_BYTES); `swarm logs` still shows the lines before it."""
    from node.logs import configure_logging, rotated_files

    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared", workers=1)
    config = resolve_config(cfg, environ={})
    log_path = RuntimePaths.for_config(config).node_log("worker_1")
    configure_logging(log_path, console="none", max_bytes=400, backups=2)
    import structlog

    log = structlog.get_logger("test")
    for i in range(12):
        log.info("line", n=i)
    logging.getLogger().handlers[0].flush()
    files = rotated_files(log_path, backups=2)
    assert len(files) == 3 and all(f.stat().st_size <= 400 for f in files)  # rotated, bounded, oldest dropped
    configure_logging(None, console="none")
    assert cli.main(["logs", str(cfg), "--node", "worker_1", "--lines", "100"]) == 0
    out = capsys.readouterr().out
    shown = [int(x.split("n=")[1].split()[0]) for x in out.splitlines() if "n=" in x]
    assert shown == sorted(shown) and shown[-1] == 11 and len(shown) > 3  # the live file alone holds ~2 lines


def test_config_schema_describes_the_yaml_file_and_validates_a_shipped_config(tmp_path, capsys):
    assert cli.main(["config", str(tmp_path / "not-even-there.yaml"), "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["properties"]) >= {"experiment", "model", "sapo", "coordinator", "exchange", "supervisor"}
    text = json.dumps(schema)
    assert "num_generations" in text and "micro_batch_tokens" in text
    jsonschema = pytest.importorskip("jsonschema")
    repo = Path(__file__).resolve().parents[1]
    for shipped in sorted((repo / "configs").glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(shipped.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"sapo": {"num_generations": "eight"}}, schema)


def test_captured_output_rotates_before_a_respawn(tmp_path):
    """A node's stdout/stderr capture (appended by the node, not rotated by it) rotates at the size limit."""
    from node.logs import rotate_if_large, rotated_files

    path = tmp_path / "worker_1.stderr.log"
    assert rotate_if_large(path, max_bytes=10, backups=2) is False  # nothing there yet
    for text in ("first run ....\n", "second run ...\n", "third run ....\n"):
        path.write_text(text)
        assert rotate_if_large(path, max_bytes=10, backups=2) is True
    assert [p.name for p in rotated_files(path, backups=2)] == ["worker_1.stderr.log.2", "worker_1.stderr.log.1"]
    assert (tmp_path / "worker_1.stderr.log.1").read_text() == "third run ....\n"  # newest kept, oldest dropped
    assert (tmp_path / "worker_1.stderr.log.2").read_text() == "second run ...\n"
