"""OS calls behind one object: spawn, signal a process group, liveness, reaping, clocks, exit reasons.

The monitor loop takes an :class:`OS`-shaped object; production passes :class:`RealOS`, state-machine
tests pass ``tests/doubles.py``'s ``FakeOS`` with a scripted history. Everything here is Linux-first:
children start in their own session (so a signal to the group reaches grandchildren) with
``PR_SET_PDEATHSIG = SIGKILL`` (so no node outlives the supervisor, even after ``kill -9`` of it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal as _signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import psutil

from node.fsio import BadFile, tail_text
from supervisor.states import ExitInfo

PR_SET_PDEATHSIG = 1

# Patterns looked for in a failed node's log tail, first match wins.
LOG_PATTERNS: tuple[tuple[str, str], ...] = (
    ("CUDA out of memory", "cuda_oom"),
    ("torch.OutOfMemoryError", "cuda_oom"),
    ("torch.cuda.OutOfMemoryError", "cuda_oom"),
    ("Transport endpoint is not connected", "transport_disconnected"),
)


# --------------------------------------------------------------------------- spawning

_prctl = None


def _load_prctl():
    """libc's prctl, resolved in the parent so the forked child only makes the call."""
    global _prctl
    if _prctl is None and sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.prctl
        fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        fn.restype = ctypes.c_int
        _prctl = fn
    return _prctl


def _child_setup(parent_pid: int):
    """``preexec_fn``: die with the parent; exit at once if the parent is already gone."""
    prctl = _load_prctl()

    def setup() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(_signal.SIGKILL), 0, 0, 0)
        # The parent may have died between fork and prctl: then no signal will ever come and we
        # would have been re-parented already. Leave now rather than run as an orphan.
        if os.getppid() != parent_pid:
            os._exit(1)

    return setup


def spawn(argv: Sequence[str], *, env: Mapping[str, str] | None, cwd: str | os.PathLike | None,
          stdout_path: str | os.PathLike, stderr_path: str | os.PathLike) -> subprocess.Popen:
    """Start ``argv`` in its own session / process group, output appended (``O_APPEND``) to files.

    The child gets ``PR_SET_PDEATHSIG = SIGKILL`` (Linux): it is killed when the *thread* that
    spawned it exits, so call this from the supervisor's main thread. stdin is /dev/null. The
    same path for stdout and stderr shares one file. Raises OSError when ``argv[0]`` cannot be run
    (classify that as ``config_error``).
    """
    stdout_path, stderr_path = Path(stdout_path), Path(stderr_path)
    for p in {stdout_path.parent, stderr_path.parent}:
        p.mkdir(parents=True, exist_ok=True)
    # Append mode (O_APPEND) is what lets the supervisor bound these files while the child runs: it copies
    # and truncates them (node.logs.truncate_if_large), and the child's next write lands at the new end.
    out = open(stdout_path, "ab")
    try:
        err = out if stderr_path == stdout_path else open(stderr_path, "ab")
        try:
            return subprocess.Popen(
                list(argv), env=None if env is None else dict(env), cwd=cwd,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                start_new_session=True, preexec_fn=_child_setup(os.getpid()),
            )
        finally:
            if err is not out:
                err.close()
    finally:
        out.close()


# --------------------------------------------------------------------------- signals and liveness

def is_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an unreaped corpse counts as dead)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def signal_group(pid: int, sig: int) -> bool:
    """Send ``sig`` to the process group led by ``pid`` (children are session leaders: pgid == pid).

    Returns False when there was nobody to signal: ESRCH, or EPERM for a group of zombies (True
    means the group existed; on Linux a group of unreaped zombies still "receives" the signal).
    Other EPERMs (a live process we may not signal) are raised.
    """
    try:
        os.killpg(pid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        if is_alive(pid):
            raise
        return False


def reap(popen: subprocess.Popen) -> int | None:
    """Non-blocking wait: the return code once the process has exited (and is reaped), else None."""
    return popen.poll()


def signal_name(signum: int) -> str:
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# --------------------------------------------------------------------------- logs and exits

def file_size(path: str | os.PathLike) -> int:
    """Current size of ``path`` (0 when missing): record it before spawn, pass it to tail_file."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def tail_file(path: str | os.PathLike, max_bytes: int = 8192, lines: int = 20, *, start: int = 0) -> str:
    """The last ``lines`` lines of ``path``, reading at most ``max_bytes`` from its end.

    Nothing before byte offset ``start`` is read (logs are appended across restarts: pass the size
    the file had when the current process was spawned). A missing or refused file (a FIFO, a symlink:
    :func:`node.fsio.tail_text` never blocks on one) gives "".
    """
    try:
        return tail_text(path, max_bytes=max_bytes, lines=lines, start=start)
    except (OSError, BadFile):
        return ""


def _matching_line(log_tail: str, needle: str) -> str:
    for line in reversed(log_tail.splitlines()):
        if needle in line:
            line = line.strip()
            return line if len(line) <= 200 else line[:197] + "..."
    return ""


def classify_exit(returncode: int | None, *, requested_stop: bool, log_tail: str = "", hung: bool = False,
                  pid: int | None = None) -> ExitInfo:
    """Sort an exit into one :data:`~supervisor.states.EXIT_REASONS` value with a one-line detail.

    Order: hung (we killed it for silence) > requested stop > SIGKILL we did not send (host OOM
    killer) > a known message in the log tail (non-zero exits only) > other signal > exit code.
    """
    sig = signal_name(-returncode) if returncode is not None and returncode < 0 else None
    if hung:
        return ExitInfo(pid, returncode, sig, "hung",
                        "no heartbeat within the timeout: killed by the supervisor")
    if requested_stop:
        detail = "stopped by the supervisor"
        if sig == "SIGKILL":
            detail += " (SIGKILL after the stop timeout)"
        elif sig not in (None, "SIGTERM", "SIGINT"):
            detail += f" (ended by {sig})"
        elif sig is None and returncode not in (0, None):
            detail += f" (exit code {returncode})"
        return ExitInfo(pid, returncode, sig, "stopped", detail)
    if returncode == -int(_signal.SIGKILL):
        return ExitInfo(pid, returncode, sig, "oom_killed_host",
                        "SIGKILL not sent by the supervisor: likely the host OOM killer "
                        "(check `dmesg | grep -i oom`)")
    if returncode != 0:
        for needle, reason in LOG_PATTERNS:
            line = _matching_line(log_tail, needle)
            if line:
                return ExitInfo(pid, returncode, sig, reason, line)
    if sig is not None:
        return ExitInfo(pid, returncode, sig, "signal", f"killed by {sig}, not sent by the supervisor")
    if returncode == 0:
        return ExitInfo(pid, 0, None, "exited", "finished normally")
    last = log_tail.strip().splitlines()[-1].strip() if log_tail.strip() else ""
    if len(last) > 200:
        last = last[:197] + "..."
    detail = f"exit code {returncode}" + (f"; last log line: {last}" if last else "")
    return ExitInfo(pid, returncode, None, "exited", detail)


def spawn_failure(err: OSError, argv: Sequence[str]) -> ExitInfo:
    """ExitInfo for a node that could not be spawned at all (missing executable, bad cwd, ...)."""
    return ExitInfo(None, None, None, "config_error",
                    f"cannot start {' '.join(map(str, argv))[:160]}: {err.strerror or err}")


# --------------------------------------------------------------------------- the injectable OS

class OS(Protocol):
    """What the monitor loop needs of the operating system."""

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str] | None, cwd: str | os.PathLike | None,
              stdout_path: str | os.PathLike, stderr_path: str | os.PathLike): ...

    def signal_group(self, pid: int, sig: int) -> bool: ...

    def is_alive(self, pid: int) -> bool: ...

    def reap(self, popen) -> int | None: ...

    def monotonic(self) -> float: ...

    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class RealOS:
    """The real thing: :func:`spawn`, :func:`signal_group`, :func:`is_alive`, :func:`reap`, clocks."""

    def spawn(self, argv, *, env, cwd, stdout_path, stderr_path) -> subprocess.Popen:
        return spawn(argv, env=env, cwd=cwd, stdout_path=stdout_path, stderr_path=stderr_path)

    def signal_group(self, pid: int, sig: int) -> bool:
        return signal_group(pid, sig)

    def is_alive(self, pid: int) -> bool:
        return is_alive(pid)

    def reap(self, popen: subprocess.Popen) -> int | None:
        return reap(popen)

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))
