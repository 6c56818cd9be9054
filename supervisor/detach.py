"""``swarm launch --detach``: the supervisor as a daemon, its start-up reported back through a pipe.

The command checks what it can first (an impossible GPU plan is refused before anything forks), then
double-forks: the intermediate child starts a new session and exits, so the daemon is an orphan of init
with no controlling terminal. The daemon writes ``ok <pid>`` into the pipe once every node is spawned, or
``err <exit code> <message>``; the command prints the pid (stdout) or the message (stderr) and exits.
"""

from __future__ import annotations

import os
import sys
import traceback

import structlog

from node.logs import configure_logging
from sapo.config import ConfigError
from supervisor.daemon import Supervisor
from supervisor.gpu_plan import PlanError
from supervisor.runfiles import AlreadyRunning, RuntimePaths


def launch_detached(config, kwargs: dict, paths: RuntimePaths) -> int:
    """Double-fork into the background (new session); report the daemon's pid or its refusal."""
    probe = Supervisor(config, **kwargs, log=structlog.get_logger("supervisor"))
    configure_logging(None, console="none")
    try:
        probe.prepare()  # an impossible GPU plan is refused here, before anything forks
    finally:
        probe.close_gpu()
    paths.logs_dir.mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    first = os.fork()
    if first:
        os.close(write_fd)
        message = _read_all(read_fd)
        os.waitpid(first, 0)
        return _report(message, paths)
    # the intermediate child: new session, then leave the daemon as an orphan of init
    try:
        os.close(read_fd)
        os.setsid()
        if os.fork():
            os._exit(0)
        _run_daemon(config, kwargs, paths, write_fd)
    except BaseException:  # noqa: BLE001 - never return into the caller's stack in a forked child
        traceback.print_exc()
        os._exit(1)
    os._exit(1)


def _read_all(fd: int) -> str:
    chunks = []
    while data := os.read(fd, 4096):
        chunks.append(data)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace").strip()


def _report(message: str, paths: RuntimePaths) -> int:
    """What the daemon said, for the user; the command's exit code."""
    if message.startswith("ok "):
        pid = message.split()[1]
        print(pid)
        print(f"swarm: supervisor running in the background (pid {pid}); logs in {paths.logs_dir}; "
              f"`swarm status CONFIG`, `swarm stop CONFIG`", file=sys.stderr)
        return 0
    if message.startswith("err "):
        _, code, text = message.split(" ", 2)
        print(f"swarm: {text}", file=sys.stderr)
        return int(code)
    print(f"swarm: the background supervisor exited before starting; see {paths.detached_output}",
          file=sys.stderr)
    return 1


def _redirect_output(paths: RuntimePaths) -> None:
    """stdin from /dev/null; stdout and stderr appended to the detached-output file."""
    devnull = os.open(os.devnull, os.O_RDWR)
    out = os.open(paths.detached_output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(devnull)
    os.close(out)


def _run_daemon(config, kwargs: dict, paths: RuntimePaths, write_fd: int) -> None:
    _redirect_output(paths)
    configure_logging(paths.supervisor_log, console="none")
    state = {"fd": write_fd}

    def report(text: str) -> None:
        if state["fd"] is not None:
            try:
                os.write(state["fd"], text.encode())
            finally:
                os.close(state["fd"])
                state["fd"] = None

    rc = 1
    try:
        sup = Supervisor(config, **kwargs)
        rc = sup.run(on_started=lambda s: report(f"ok {os.getpid()}\n"))
    except (AlreadyRunning, PlanError, ConfigError) as err:
        report(f"err 2 {err}")
        rc = 2
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        report("err 1 the supervisor failed at start-up; see " + str(paths.detached_output))
        rc = 1
    finally:
        report("")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
