"""The operator tools against a hostile experiment directory and runtime dir: real files, real commands.

Planted as found on live runs: a 401-digit integer in a metrics line and in the state file, a symlink to
/dev/zero at a metrics path, a FIFO at ``state/current_state.json`` and at a metrics path, and file names
carrying ESC/CR/LF in ``peers/`` and ``logs/``. ``swarm report``, ``swarm validate`` and ``swarm logs`` run
as the operator runs them (a subprocess, each with a generous timeout: a FIFO that were opened would
block forever, a /dev/zero read until memory ran out); the supervisor's shared-dir poller runs in-process
in its own thread. None may print a traceback or an unescaped control character; each refused file is one
clear line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import structlog

from fake_node import config_yaml
from node.layout import ExperimentLayout
from node.schemas import RoundState
from supervisor import cli, logview
from supervisor.terminal import escape_controls
from supervisor.watch import SharedPoller
from test_cli import fabricated_status, make_experiment

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ("GDRIVE_PATH", "EXPERIMENT_NAME", "TEST_MODE", "MAX_ROUNDS")  # env that would change the config
HUGE = 10 ** 400
NAME = "evil\x1b[2J\x1b]0;pwned\x07\rfake\nline"  # a file name: clear the screen, retitle, fake a line
SHOWN = escape_controls(NAME)
COMMAND_TIMEOUT_S = 60.0  # one command on a few small files takes a second or two; a hang takes forever
POLL_WAIT_S = 30.0  # one poll reads three small files


def run_swarm(*args: str, runtime_dir: Path) -> subprocess.CompletedProcess:
    """``python -m supervisor.cli ARGS`` as a person runs it, output captured as bytes."""
    env = {**os.environ, "SWARM_RUNTIME_DIR": str(runtime_dir)}
    for var in OVERRIDES:
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *args], cwd=REPO, env=env,
                          capture_output=True, timeout=COMMAND_TIMEOUT_S)


def assert_harmless(res: subprocess.CompletedProcess) -> tuple[str, str]:
    """(stdout, stderr) as text, asserting no traceback and no raw ESC, CR, BEL or C1 control in either."""
    out, err = res.stdout.decode("utf-8"), res.stderr.decode("utf-8")
    for text in (out, err):
        assert "Traceback" not in text, text[-3000:]
        assert not {"\x1b", "\r", "\x07", "\x9b"} & set(text), ascii(text[-3000:])
    return out, err


def failed_checks(out: str) -> dict[str, str]:
    """check name -> detail of each FAIL line of ``swarm validate``'s plain table."""
    rows = (re.fullmatch(r"FAIL  (.+?)  +(.*)", line) for line in out.splitlines())
    return {m[1]: m[2] for m in rows if m}


def plant(path: Path, kind: str) -> None:
    """Replace ``path`` with a FIFO or a symlink to /dev/zero."""
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")


def append_line(path: Path, obj: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(obj) + "\n")


@pytest.fixture
def experiment(tmp_path, monkeypatch) -> tuple[Path, ExperimentLayout, Path]:
    """(config file, layout, runtime dir) of a complete, valid two-worker experiment of three rounds; the
    runtime dir is this test's (``SWARM_RUNTIME_DIR``, for the in-process commands too)."""
    monkeypatch.setenv("SWARM_RUNTIME_DIR", str(tmp_path / "rt"))
    for var in OVERRIDES:
        monkeypatch.delenv(var, raising=False)
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared", workers=2)
    return cfg, make_experiment(tmp_path / "shared"), tmp_path / "rt"


# --------------------------------------------------------------------------- swarm validate

@pytest.mark.timeout(4 * COMMAND_TIMEOUT_S)
def test_validate_names_each_hostile_file_and_ignores_junk_names(experiment):
    cfg, layout, rt = experiment
    # Junk beside the files validate reads: a hostile name without the .json suffix, a hostile log dir.
    (layout.peers_dir() / f"{NAME}.txt").write_text("junk")
    (layout.root / "logs" / NAME).mkdir()
    res = run_swarm("validate", str(cfg), runtime_dir=rt)
    out, _ = assert_harmless(res)
    assert res.returncode == 0 and "11/11 checks passed: OK" in out  # harmless junk changes nothing

    plant(layout.state_file(), "fifo")
    plant(layout.metrics_file("worker_1"), "dev_zero")
    append_line(layout.metrics_file("worker_2"), {"node_id": "worker_2", "round": 2, "reward_local": HUGE})
    os.mkfifo(layout.peers_dir() / f"{NAME}.json")
    res = run_swarm("validate", str(cfg), runtime_dir=rt)
    out, _ = assert_harmless(res)
    fails = failed_checks(out)
    assert res.returncode == 1 and out.rstrip().endswith("FAILED")
    assert fails["state"] == "state/current_state.json: is not a regular file"
    assert fails["worker_1 metrics"].startswith("logs/worker_1/metrics.jsonl: is a symlink; no line for rounds")
    assert fails["worker_2 metrics"].startswith("line 4: reward_local: a 401-digit integer is out of range (|x| <= 2**63)")
    assert f"{SHOWN}.json: not a regular file" in fails["peers"]

    layout.state_file().unlink()
    state = RoundState(experiment="fake", round=3, stage=0, started_at=1.0, updated_at=1.0, finished=True,
                       max_rounds=3).to_json()
    layout.state_file().write_text(json.dumps(state | {"round": HUGE}))
    res = run_swarm("validate", str(cfg), runtime_dir=rt)
    out, _ = assert_harmless(res)
    assert res.returncode == 1
    assert failed_checks(out)["state"] == ("state/current_state.json: round: a 401-digit integer is out of range "
                                           "(|x| <= 2**63)")


def test_validate_never_enters_a_symlinked_round_directory(experiment, tmp_path, capsys):
    cfg, layout, _ = experiment
    moved = tmp_path / "elsewhere"
    (layout.root / "rollouts" / "round_1").rename(moved)
    (layout.root / "rollouts" / "round_1").symlink_to(moved, target_is_directory=True)
    assert cli.main(["validate", str(cfg)]) == 1
    fails = failed_checks(capsys.readouterr().out)
    assert fails["rollouts files"] == "rollouts/round_1: symlink"
    assert fails["worker_1 rollouts"] == "no rollout file for trained rounds 1"


# --------------------------------------------------------------------------- swarm report

@pytest.mark.timeout(4 * COMMAND_TIMEOUT_S)
def test_report_skips_each_hostile_file_in_one_line(experiment, tmp_path):
    _, layout, rt = experiment
    append_line(layout.metrics_file("worker_1"), {"node_id": "worker_1", "round": 3, "reward_local": HUGE})
    plant(layout.metrics_file("worker_2"), "dev_zero")
    (layout.root / "logs" / NAME).mkdir()
    os.mkfifo(layout.root / "logs" / NAME / "metrics.jsonl")
    plant(layout.state_file(), "fifo")  # the report does not need it: still never opened
    res = run_swarm("report", str(layout.root), "--out", str(tmp_path / "report"), runtime_dir=rt)
    out, err = assert_harmless(res)
    assert res.returncode == 0 and err == ""
    skipped = [line for line in out.splitlines() if line.startswith("- fake: skipped ")]
    assert sorted(skipped) == sorted([
        "- fake: skipped logs/worker_1/metrics.jsonl: 1 line(s) left out; the first, line 4: reward_local: "
        "a 401-digit integer is out of range (|x| <= 2**63)",
        "- fake: skipped logs/worker_2/metrics.jsonl: is a symlink",
        f"- fake: skipped logs/{SHOWN}/metrics.jsonl: is not a regular file",
    ])
    assert "| fake (running or stopped) | ? | ? | ? | 1 | 3 | 1.50 |" in out  # worker_1's rounds 0-2 only
    assert (tmp_path / "report" / "report.md").read_text().count("- fake: skipped ") == 3

    for node in ("worker_1", "worker_2"):  # nothing readable left: one escaped line, exit 2
        plant(layout.metrics_file(node), "fifo")
    res = run_swarm("report", str(layout.root), "--out", str(tmp_path / "report2"), runtime_dir=rt)
    out, err = assert_harmless(res)
    assert res.returncode == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("report: nothing to report: ") and SHOWN in err


# --------------------------------------------------------------------------- swarm logs

@pytest.mark.timeout(4 * COMMAND_TIMEOUT_S)
def test_logs_escape_hostile_names_and_skip_what_is_not_a_file(experiment):
    cfg, _, rt = experiment
    logs = rt / "logs"
    logs.mkdir(parents=True)
    line = {"event": "round_done", "level": "info", "timestamp": "2026-01-01T10:00:00Z", "reward": HUGE}
    (logs / "worker_1.log").write_text(json.dumps(line) + "\n")
    os.mkfifo(logs / "worker_1.stderr.log")
    (logs / "worker_2.log").symlink_to("/dev/zero")
    (logs / f"{NAME}.log").write_text(json.dumps({**line, "event": NAME}) + "\n")
    os.mkfifo(logs / f"{NAME}.stderr.log")

    res = run_swarm("logs", str(cfg), runtime_dir=rt)
    out, err = assert_harmless(res)
    assert res.returncode == 0 and f"round_done reward={HUGE}" in out
    assert sorted(err.splitlines()) == [f"swarm logs: skipped {logs}/worker_1.stderr.log: is not a regular file",
                                        f"swarm logs: skipped {logs}/worker_2.log: is a symlink"]

    res = run_swarm("logs", str(cfg), "--node", NAME, runtime_dir=rt)  # a node known by its file name only
    out, err = assert_harmless(res)
    assert res.returncode == 0
    assert out.startswith(f"{SHOWN} | 10:00:00 info    {SHOWN}") and out.count("\n") == 1
    assert err == f"swarm logs: skipped {logs}/{SHOWN}.stderr.log: is not a regular file\n"


def test_logs_follow_skips_a_fifo_once_and_goes_on(tmp_path):
    fifo, live = tmp_path / "a.log", tmp_path / "b.log"
    os.mkfifo(fifo)
    live.write_text("old\n")
    got, skipped, polls = [], [], []

    def should_stop() -> bool:  # a few polls, each a real read of both files; no clock involved
        polls.append(1)
        if len(polls) == 2:
            with live.open("a") as fh:
                fh.write("new 1\npart")
        if len(polls) == 3:
            with live.open("a") as fh:
                fh.write("ial\n")
        return len(polls) > 5

    logview.follow([("a", fifo, False), ("b", live, False)], lambda *x: got.append(x), poll_s=0.0,
                   should_stop=should_stop, skipped=lambda path, reason: skipped.append((path, reason)))
    assert got == [("b", "new 1"), ("b", "partial")]
    assert skipped == [(fifo, "is not a regular file")]  # once, not once per poll


# --------------------------------------------------------------------------- the supervisor's poller

@pytest.mark.timeout(4 * POLL_WAIT_S)
def test_the_shared_dir_poller_never_blocks_and_keeps_good_figures(experiment):
    _, layout, _ = experiment
    append_line(layout.metrics_file("worker_1"), {"node_id": "worker_1", "round": 3, "reward_local": HUGE})
    plant(layout.metrics_file("worker_2"), "fifo")
    plant(layout.state_file(), "fifo")

    with structlog.testing.capture_logs() as logged:
        poller = SharedPoller(layout, ["worker_1", "worker_2"], interval_s=1.0, log=structlog.get_logger())
        started = time.monotonic()
        poller.poll(wait_s=POLL_WAIT_S)
        assert not poller._thread.is_alive(), "the poller thread is parked on a FIFO"
        assert time.monotonic() - started < POLL_WAIT_S
        assert poller.round_state is None
        assert poller.rewards == {"worker_1": 0.5}  # the line before the 401-digit reward
        refused = {(e["path"], e["reason"]) for e in logged if e["event"] == "shared_file_refused"}
        assert refused == {(str(layout.state_file()), "is not a regular file"),
                           (str(layout.metrics_file("worker_2")), "is not a regular file")}

        poller.poll(wait_s=POLL_WAIT_S)  # the same refusals again: not warned again
        assert sum(e["event"] == "shared_file_refused" for e in logged) == 2

        layout.state_file().unlink()
        state = RoundState(experiment="fake", round=2, stage=0, started_at=1.0, updated_at=1.0, finished=False,
                           max_rounds=3).to_json()
        layout.state_file().write_text(json.dumps(state | {"round": HUGE}))
        poller.poll(wait_s=POLL_WAIT_S)
        assert poller.round_state is None and "state.round: must be <=" in logged[-1]["reason"]

        layout.state_file().write_text(json.dumps(state))
        poller.poll(wait_s=POLL_WAIT_S)
        assert poller.round_state is not None and poller.round_state.round == 2
        assert not poller._thread.is_alive()


# --------------------------------------------------------------------------- swarm status

def test_status_reads_a_hostile_runtime_dir_without_a_traceback(experiment, capsys):
    cfg, _, rt = experiment
    st = fabricated_status(rt)
    st["updated_at"] = HUGE
    st["supervisor"] = "not an object"
    st["nodes"]["worker_1"] |= {"reward": HUGE, "rss_bytes": HUGE, "heartbeat_age_s": "soon", "round": -HUGE}
    st["nodes"]["worker_2"] |= {"log_tail": [], "logs": {"stderr": str(rt / "logs" / "worker_2.stderr.log")},
                                "backoff_left_s": HUGE}
    (rt / "logs").mkdir()
    os.mkfifo(rt / "logs" / "worker_2.stderr.log")
    (rt / "status.json").write_text(json.dumps(st))
    assert cli.main(["status", str(cfg)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("worker_1 "))
    assert row.split()[:8] == ["worker_1", "RUNNING", "4243", "?", "train", "?", "0", "?"]
    assert f"skipped {rt}/logs/worker_2.stderr.log: is not a regular file" in out
    assert "restarting in ? s" in out

    (rt / "status.json").unlink()
    os.mkfifo(rt / "status.json")  # read as no status file, at once
    assert cli.main(["status", str(cfg)]) == 0
    assert "(no status file yet)" in capsys.readouterr().out
