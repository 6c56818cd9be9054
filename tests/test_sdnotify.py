"""sd_notify over a real AF_UNIX datagram socket given as NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from supervisor.sdnotify import SdNotifier, child_env, socket_address, watchdog_interval


class RecordingLog:
    def __init__(self):
        self.lines = []

    def info(self, event, **kw):
        self.lines.append(("info", event, kw))

    def warning(self, event, **kw):
        self.lines.append(("warning", event, kw))


@pytest.fixture
def listener(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    yield path, sock
    sock.close()


def receive(sock) -> str:
    return sock.recv(4096).decode()


def test_messages_arrive_on_a_real_socket(listener, monkeypatch):
    path, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    n = SdNotifier()
    assert n.enabled
    assert n.ready()
    assert receive(sock) == "READY=1"
    assert n.watchdog()
    assert receive(sock) == "WATCHDOG=1"
    assert n.status("round 3/10: 4 running, 0 restarting")
    assert receive(sock) == "STATUS=round 3/10: 4 running, 0 restarting"
    assert n.stopping()
    assert receive(sock) == "STOPPING=1"
    assert n.notify(READY=1, status="two\nlines")
    assert receive(sock) == "READY=1\nSTATUS=two lines"
    n.close()


def test_abstract_socket(monkeypatch):
    name = f"sapo-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert SdNotifier().ready()
        assert receive(sock) == "READY=1"
    finally:
        sock.close()


def test_absent_socket_is_a_silent_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    log = RecordingLog()
    n = SdNotifier(log=log)
    assert not n.enabled
    assert n.ready() is False and n.watchdog() is False and n.status("x") is False and n.stopping() is False
    assert log.lines == []


def test_send_failure_is_logged_once_and_never_raises(tmp_path):
    log = RecordingLog()
    n = SdNotifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")}, log=log)
    assert n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    assert [ln[1] for ln in log.lines] == ["sd_notify_failed"]


def test_socket_address_forms():
    assert socket_address(None) is None and socket_address("") is None
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abc") == b"\0abc"
    assert socket_address("vsock:2:1234") is None


def test_watchdog_interval(monkeypatch):
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert SdNotifier().watchdog_interval() == 2.0


def test_child_env_drops_systemd_variables():
    env = {"PATH": "/bin", "NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "2"}
    assert child_env(env) == {"PATH": "/bin"}
