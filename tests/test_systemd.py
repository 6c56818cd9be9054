"""The generated unit (contents, `systemd-analyze verify`) and sd_notify from the daemon on a real socket."""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from doubles import FakeOS
from fake_node import fake_config
from supervisor import cli
from supervisor.daemon import Supervisor
from supervisor.sdnotify import SdNotifier
from supervisor.systemd import render_unit, unit_name
from test_daemon import RecordingLog, beat


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_unit_contents(tmp_path):
    cfg = fake_config(tmp_path / "shared", workers=4, stop_timeout_s=60.0, monitor_interval_s=2.0,
                      startup_timeout_s=600.0)
    config_path = tmp_path / "exp.yaml"
    env = {"GDRIVE_PATH": "/mnt/drive", "MAX_ROUNDS": "5", "HUGGINGFACE_ACCESS_TOKEN": "hf_secret", "EDITOR": "vi"}
    text = render_unit(cfg, config_path=config_path, overrides=["sapo.num_generations=4"], working_dir=tmp_path,
                       environ=env)
    s = unit_settings(text)
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecStart"] == [f"{sys.executable} -m supervisor.cli launch {config_path} --set sapo.num_generations=4"]
    assert Path(s["ExecStart"][0].split()[0]).is_absolute()
    assert s["WorkingDirectory"] == [str(tmp_path)] and s["User"] == [getpass.getuser()]
    assert s["Restart"] == ["on-failure"] and s["KillMode"] == ["control-group"]
    assert int(s["WatchdogSec"][0]) >= 3 * 2.0 and int(s["WatchdogSec"][0]) == 60
    assert int(s["TimeoutStopSec"][0]) == 90  # stop_timeout_s + 30
    assert int(s["TimeoutStartSec"][0]) >= 5 * 600  # a staggered start of every node
    assert s["RestartPreventExitStatus"] == ["2"] and s["SuccessExitStatus"] == ["143 130"]
    assert 'Environment="GDRIVE_PATH=/mnt/drive"' in text and 'Environment="MAX_ROUNDS=5"' in text
    assert "hf_secret" not in text and "EDITOR" not in text and "EnvironmentFile" in text
    assert unit_name(cfg) == "sapo-fake.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    odd = tmp_path / "my configs 100%"
    odd.mkdir()
    config_path = odd / "exp.yaml"
    config_path.write_text("experiment: {name: fake}\n")
    cfg = fake_config(tmp_path / "shared")
    text = render_unit(cfg, config_path=config_path, overrides=["experiment.name=fake"], working_dir=odd,
                       environ={"GDRIVE_PATH": '/mnt/my "drive" 50%'})
    unit = tmp_path / unit_name(cfg)
    unit.write_text(text)
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    relevant = [line for line in res.stderr.splitlines() if unit.name in line or "Unknown" in line]
    assert res.returncode == 0, res.stderr
    assert not relevant, res.stderr


def test_cli_prints_the_unit(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SWARM_RUNTIME_DIR", str(tmp_path / "rt"))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("experiment: {name: unit-test, root: /srv/shared}\nsapo: {tasks: [{name: toy_copy}]}\n")
    assert cli.main(["systemd-unit", str(cfg), "--set", "supervisor.workers=3", "--user", "trainer"]) == 0
    out = capsys.readouterr().out
    assert "supervisor.cli launch" in out and "--set supervisor.workers=3" in out and "User=trainer" in out
    assert "RequiresMountsFor=/srv/shared" in out
    assert cli.main(["systemd-unit", str(cfg), "--name-only"]) == 0
    assert capsys.readouterr().out.strip() == "sapo-unit-test.service"


@pytest.fixture
def listener(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.0)
    yield path, sock
    sock.close()


def drain(sock) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_sd_notify_through_the_daemon_on_a_real_socket(tmp_path, listener):
    path, sock = listener
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "60000000", "PATH": "/bin"}
    fos = FakeOS(obey_signals=False)
    cfg = fake_config(tmp_path / "shared", workers=2, stagger="heartbeat")  # one start-up at a time
    sup = Supervisor(cfg, os_=fos, gpu=None, runtime_dir=tmp_path / "rt", notifier=SdNotifier(environ=env),
                     log=RecordingLog(), environ=env, sample_processes=False)
    sup.tick()  # coordinator starting: no READY yet
    before = drain(sock)
    assert "WATCHDOG=1" in before and not any(m == "READY=1" for m in before)
    assert any(m.startswith("STATUS=round -: ") and "1 starting" in m for m in before)
    beat(sup, fos, "coordinator")
    sup.tick()
    beat(sup, fos, "worker_1")
    sup.tick()
    beat(sup, fos, "worker_2")
    sup.tick()
    msgs = drain(sock)
    assert msgs.count("READY=1") == 1
    assert any(m.startswith("STATUS=") and "3 running" in m for m in msgs)
    fos.advance(1.0)
    sup.tick()
    assert "WATCHDOG=1" in drain(sock)
    # nodes never inherit systemd's variables (NotifyAccess=main: only the supervisor speaks)
    assert all("NOTIFY_SOCKET" not in p.env and "WATCHDOG_USEC" not in p.env for p in fos.spawned)
    sup.request_stop(signal.SIGTERM)
    sup.tick()
    msgs = drain(sock)
    assert "STOPPING=1" in msgs and any(m.startswith("STATUS=stopping (SIGTERM received)") for m in msgs)
    for p in fos.spawned:
        fos.exit(p.pid, 143)
    assert sup.tick() and sup.exit_code == 143
    assert any(m.startswith("STATUS=exited with code 143") for m in drain(sock))
