"""What the `swarm` CLI shows: rich on a terminal, plain text in a pipe, hostile values never obeyed."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from rich.console import Console

from fake_node import FAKE_NODE, config_yaml
from supervisor import cli, live, logview, statusview, validate
from supervisor.terminal import escape_controls
from test_cli import fabricated_status, make_experiment, rt  # noqa: F401 - a fixture (reaper: conftest.py)

REPO = Path(__file__).resolve().parents[1]
# What a hostile value may try: clear the screen, retitle the window (OSC ... BEL), a C1 CSI, a fake line.
HOSTILE = "evil\x1b[2J\x1b]0;pwned\x07\x9b31m\rfake\nline"
INJECTED = ("\x1b[2J", "\x1b]0;", "\x07", "\x9b", "\r")


def injected(text: str) -> list[str]:
    return [seq for seq in INJECTED if seq in text]


def on_a_terminal(*args: str, env_extra: dict | None = None, timeout: float = 60) -> tuple[int, str]:
    """``python -m supervisor.cli ARGS`` with stdin/stdout/stderr on a pseudo-terminal (160x40)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "SWARM_NODE_COMMAND": " ".join(FAKE_NODE), **(env_extra or {})}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", *args], cwd=REPO, env=env, stdin=slave,
                            stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 0.2)[0]:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError as err:  # EIO: every end of the terminal is closed
                if err.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            chunks.append(data)
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def terminal_console(width: int = 160) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=width, highlight=False, color_system="standard"), out


# --------------------------------------------------------------------------- escaping

def test_control_characters_are_written_out_not_obeyed():
    assert escape_controls("a\x1b[31mb") == "a\\x1b[31mb"
    assert escape_controls("x\ny\rz\x07\x7f\x9b") == "x\\ny\\rz\\x07\\x7f\\x9b"
    assert escape_controls("tab\tand unicode é ✓") == "tab\tand unicode é ✓"
    assert escape_controls(3.5) == "3.5"


def test_a_hostile_log_line_renders_as_one_harmless_line():
    line = json.dumps({"event": HOSTILE, "level": "info", "timestamp": "2026-01-01T10:00:00Z", HOSTILE: HOSTILE,
                       "n": float("nan")})
    text = logview.render_log_line(line)
    assert not injected(text) and "\n" not in text
    assert text.startswith("10:00:00 info    evil\\x1b[2J") and "n=nan" in text  # NaN is fine in a log line
    with_exc = json.dumps({"event": "boom", "exception": f"Traceback\n  {HOSTILE}\nValueError"})
    assert logview.render_log_line(with_exc).splitlines()[1:] == [  # a traceback keeps its lines
        "Traceback", "  evil\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m", "fake", "line", "ValueError"]
    assert logview.render_log_line(f"not json {HOSTILE}") == f"not json {escape_controls(HOSTILE)}"


def _hostile_status(rt: Path) -> dict:
    st = fabricated_status(rt)
    node = dict(st["nodes"]["worker_2"], last_exit_line=HOSTILE, fatal_reason=HOSTILE, phase=HOSTILE,
                log_tail=[HOSTILE, json.dumps({"event": HOSTILE, "level": "error"})])
    st["nodes"] = {"coordinator": st["nodes"]["coordinator"], HOSTILE: node}
    st["summary"], st["stop_reason"] = HOSTILE, HOSTILE
    st["round_switch"] = {"last": {"round": HOSTILE, "switch_ms": 10 ** 400, "detect_ms": [HOSTILE], "start_ms": 1.5,
                                   "missing": [HOSTILE, 7], "missing_count": HOSTILE},
                          "rounds": 3, "switch_ms": HOSTILE}  # fields of the wrong type: '?' or '-'
    (rt / "status.json").write_text(json.dumps(st))
    return st


def test_status_escapes_a_hostile_node_id_in_plain_text_and_on_a_terminal(rt):
    st = _hostile_status(rt)
    kwargs = dict(running_pid=os.getpid(), runtime_dir=rt, experiment=HOSTILE, recent=[HOSTILE])
    text = statusview.render_status(st, **kwargs)
    assert not injected(text)
    rows = [line for line in text.splitlines() if line.startswith(escape_controls(HOSTILE) + " ")]
    assert len(rows) == 1 and rows[0].split()[1] == "FATAL"  # one row: the table's columns stay in place
    assert ("round switch: ? into round ? (detect ?, start 1.5 ms); p50 -, p99 - over the last 3; not started in "
            f"time: {escape_controls(HOSTILE)}, 7\n") in text
    console, out = terminal_console()
    console.print(statusview.status_renderable(st, **kwargs))
    shown = out.getvalue()
    assert not injected(shown) and "\x1b[" in shown and "NODE" in shown and "evil\\x1b[2J" in shown


def test_validate_and_logs_escape_hostile_names_and_values(tmp_path, rt, capsys):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared", workers=2)
    layout = make_experiment(tmp_path / "shared")
    (layout.peers_dir() / f"{HOSTILE.replace(chr(10), '')}.json").write_text("{}")
    assert cli.main(["validate", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert not injected(out) and "FAIL  peers" in out and "evil\\x1b[2J" in out
    logs = rt / "logs"
    logs.mkdir(parents=True)
    (logs / "worker_1.log").write_text(json.dumps({"event": HOSTILE, "level": "info", "k": HOSTILE}) + "\n")
    (logs / "worker_1.stderr.log").write_text(f"printed {HOSTILE}\n")
    assert cli.main(["logs", str(cfg), "--node", "worker_1"]) == 0
    out = capsys.readouterr().out
    assert not injected(out) and all(x.startswith("worker_1 | ") for x in out.splitlines())
    assert "k=evil\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\rfake\\nline" in out  # a JSON value stays on its line


# --------------------------------------------------------------------------- plain text (not a terminal)

def test_status_shows_the_round_switch_in_plain_text_and_json(tmp_path, rt, capsys):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared")
    st = fabricated_status(rt)
    st["round_switch"] = {"last": {"round": 7, "reason": "all_live_workers_submitted", "switch_ms": 37.3,
                                   "detect_ms": 20.7, "start_ms": 16.6, "workers": 2, "missing": [],
                                   "missing_count": 0},
                          "rounds": 6, "measured": 6, "incomplete": 0, "switch_ms": {"p50": 38.0, "p99": 95.2},
                          "detect_ms": {"p50": 20.0, "p99": 40.0}, "start_ms": {"p50": 18.0, "p99": 55.0}}
    (rt / "status.json").write_text(json.dumps(st))
    assert cli.main(["status", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert ("\nround switch: 37.3 ms into round 7 (detect 20.7 ms, start 16.6 ms); p50 38.0 ms, p99 95.2 ms over the "
            "last 6\n") in out
    assert cli.main(["status", str(cfg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"]["round_switch"]["switch_ms"] == {"p50": 38.0, "p99": 95.2}


def test_status_watch_in_a_pipe_prints_plain_snapshots(tmp_path, rt, capsys, monkeypatch):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared")
    fabricated_status(rt)
    sleeps = []

    def sleep(s):
        sleeps.append(s)
        if len(sleeps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(live.time, "sleep", sleep)
    assert cli.main(["status", str(cfg), "--watch"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and out.count("Supervisor pid") == 2 and "\n\nSupervisor pid" in out


def test_logs_show_a_rotated_file_whose_live_file_is_gone(tmp_path, rt, capsys):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared", workers=1)
    (rt / "logs").mkdir(parents=True)
    (rt / "logs" / "supervisor.log.1").write_text(json.dumps({"event": "before_rotation", "level": "info"}) + "\n")
    assert cli.main(["logs", str(cfg), "--node", "supervisor"]) == 0
    assert "before_rotation" in capsys.readouterr().out


def test_validate_refuses_a_symlinked_peer_file(tmp_path, rt, capsys):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared", workers=2)
    layout = make_experiment(tmp_path / "shared")
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (layout.peers_dir() / "worker_9.json").symlink_to(secret)
    checks = {c.name: c for c in validate.validate_experiment(cli.resolve_config(cfg))}
    assert not checks["peers"].ok and "worker_9.json: symlink" in checks["peers"].detail
    assert checks["state"].ok and checks["worker_1 metrics"].ok


# --------------------------------------------------------------------------- on a terminal

def test_live_table_redraws_at_most_once_per_interval():
    console, out = terminal_console(width=80)
    now = [100.0]
    with live.LiveTable(console, interval=1.0, clock=lambda: now[0]) as table:
        assert table.due()
        table.show("frame one")
        now[0] += 0.5
        assert not table.due()
        now[0] += 0.6
        assert table.due()
        table.show("frame two")
    shown = out.getvalue()
    assert "frame one" in shown and "frame two" in shown


def test_validate_on_a_terminal_is_a_coloured_table(tmp_path, rt):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared", workers=2)
    make_experiment(tmp_path / "shared")
    rc, out = on_a_terminal("validate", str(cfg), env_extra={"SWARM_RUNTIME_DIR": str(rt)})
    assert rc == 0, out
    assert "\x1b[32mPASS" in out and "11/11 checks passed: OK" in out and "CHECK" in out


def test_status_on_a_terminal_is_a_table_with_hostile_values_escaped(tmp_path, rt):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared")
    _hostile_status(rt)
    rc, out = on_a_terminal("status", str(cfg), env_extra={"SWARM_RUNTIME_DIR": str(rt)})
    assert rc == 0, out
    assert "NODE" in out and "coordinator" in out and "\x1b[" in out and "evil\\x1b[2J" in out
    assert not [seq for seq in INJECTED if seq != "\r" and seq in out]  # the terminal itself turns \n into \r\n


def test_foreground_launch_on_a_terminal_shows_the_live_table(tmp_path, rt, reaper):
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared", workers=1)
    rc, out = on_a_terminal("launch", str(cfg), env_extra={"SWARM_RUNTIME_DIR": str(rt),
                                                           "FAKE_NODE_MODE": "exit_after=1.0"})
    assert rc == 0, out
    assert "NODE" in out and "worker_1" in out and "Ctrl-C: stop gracefully" in out
    assert "supervisor exited with code 0" in out
