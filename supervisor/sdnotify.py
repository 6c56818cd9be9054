"""systemd's sd_notify protocol without libsystemd: datagrams to ``$NOTIFY_SOCKET``.

Without systemd (containers, a shell) ``$NOTIFY_SOCKET`` is unset and every call is a silent no-op.
A send that fails is logged once and never raised: notifications must not take the supervisor down.
"""

from __future__ import annotations

import os
import socket
from typing import Callable, Mapping

import structlog

# Variables systemd gives the service's main process; children must not inherit them.
SYSTEMD_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without systemd's notification variables (a node must not notify for the supervisor)."""
    return {k: v for k, v in env.items() if k not in SYSTEMD_ENV_VARS}


def socket_address(value: str | None) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as a sendto() address: a path, or ``@name`` → abstract ``\\0name``."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock:... and other forms are not supported


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None when none are wanted.

    None also when ``$WATCHDOG_PID`` names another process.
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    wpid = env.get("WATCHDOG_PID", "")
    if wpid:
        try:
            if int(wpid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


class SdNotifier:
    """Send sd_notify messages; a no-op when ``$NOTIFY_SOCKET`` is absent."""

    def __init__(self, environ: Mapping[str, str] | None = None, log=None):
        env = os.environ if environ is None else environ
        self._env = dict(env)
        self._log = log or structlog.get_logger(__name__)
        self._raw = env.get("NOTIFY_SOCKET") or None
        self._address = socket_address(self._raw)
        self._sock: socket.socket | None = None
        self._failed_once = False
        if self._raw and self._address is None:
            self._log.warning("sd_notify_unsupported_socket", notify_socket=self._raw)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines (keys upper-cased); True when a datagram left, False otherwise."""
        if self._address is None or not fields:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ")
            lines.append(f"{key.upper()}={text}")
        payload = "\n".join(lines).encode("utf-8", errors="replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self._address)
            return True
        except OSError as err:
            if not self._failed_once:
                self._failed_once = True
                self._log.warning("sd_notify_failed", notify_socket=self._raw, error=str(err))
            return False

    def ready(self) -> bool:
        return self.notify(READY=1)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings for this process (see :func:`watchdog_interval`)."""
        return watchdog_interval(self._env)

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


class SupervisorNotices:
    """What the supervisor tells systemd from its loop: READY=1 once the nodes run, WATCHDOG=1 at most every
    ``watchdog_every_s`` (and at the end), STATUS=<summary line> whenever that line changes."""

    def __init__(self, notifier: SdNotifier, watchdog_every_s: float = 1.0):
        self.notifier = notifier
        self.watchdog_every_s = watchdog_every_s
        self._ready_sent = False
        self._last_watchdog: float | None = None
        self._last_status: str | None = None

    def update(self, now: float, *, ready: bool, summary: Callable[[], str], done: bool) -> None:
        """One tick's notifications (``now`` monotonic; ``summary`` is only called when systemd listens)."""
        if not self.notifier.enabled:
            return
        if ready and not self._ready_sent:
            self._ready_sent = True
            self.notifier.ready()
        if self._last_watchdog is None or now - self._last_watchdog >= self.watchdog_every_s or done:
            self._last_watchdog = now
            self.notifier.watchdog()
        line = summary()
        if line != self._last_status:
            self._last_status = line
            self.notifier.status(line)
