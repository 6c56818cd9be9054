"""A systemd unit for one experiment's supervisor (``swarm systemd-unit CONFIG``).

The supervisor itself is the service's main process and the only one that talks to systemd:
``Type=notify`` with ``NotifyAccess=main`` (nodes never inherit ``$NOTIFY_SOCKET``, see
:func:`supervisor.sdnotify.child_env`). READY=1 comes once the nodes run, so ``TimeoutStartSec`` covers a
staggered start of every node; WATCHDOG=1 comes from the monitor loop, at least every second, so
``WatchdogSec`` only fires when the loop itself is stuck. ``KillMode=control-group``: on stop systemd
sends SIGTERM to every process of the service; the supervisor then waits ``stop_timeout_s`` for the
nodes to checkpoint, so ``TimeoutStopSec`` is longer than that. Exit codes: 0 finished, 1 a node went
FATAL (restarted by ``Restart=on-failure``), 2 a user mistake (not restarted), 143/130 stopped.

A joining host's unit (``swarm systemd-unit CONFIG --join``) runs ``swarm launch CONFIG --join --host-id H
--workers N [--key-file F]`` as ``sapo-<experiment>-join-<host>.service``; it says READY=1 while it waits for
the experiment, and it needs the first host's key (``--key-file``, or ``swarm.key`` in its runtime dir).
"""

from __future__ import annotations

import getpass
import math
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

from node.config import ENV_OVERRIDES

# Variables copied into the unit when set: the seeds' overrides, TEST_MODE, and where things live.
# Secrets (HUGGINGFACE_ACCESS_TOKEN, HF_TOKEN) are never written: use an EnvironmentFile= instead.
UNIT_ENV_VARS: tuple[str, ...] = tuple(ENV_OVERRIDES) + ("TEST_MODE", "SWARM_RUNTIME_DIR", "HF_HOME",
                                                          "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
SECRET_ENV_VARS = ("HUGGINGFACE_ACCESS_TOKEN", "HF_TOKEN")
STOP_MARGIN_S = 30
RESTART_SEC = 10


def unit_name(config, host: str | None = None) -> str:
    """``sapo-<experiment name>.service``; ``sapo-<experiment name>-join-<host>.service`` on a joining host."""
    join = f"-join-{host}" if host is not None else ""
    return f"sapo-{config.experiment.name}{join}.service"


def _escape(value: str) -> str:
    """Quote one word for a unit file: ``%`` specifiers and ``$`` expansion disabled, quotes escaped."""
    text = value.replace("%", "%%").replace("$", "$$")
    if text and not any(c in text for c in ' \t"\'\\;'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _spec(value: str) -> str:
    """A path-like setting (no quoting there): only ``%`` specifiers disabled."""
    return value.replace("%", "%%")


def _env_assignment(key: str, value: str) -> str:
    text = f"{key}={value}".replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'Environment="{text}"'


def exec_start(config_path: str | os.PathLike, overrides: Sequence[str] = (), python: str | None = None,
               join: Sequence[str] = ()) -> str:
    """``<venv python> -m supervisor.cli launch <abs config> [JOIN ...] [--set k=v ...]`` (absolute paths only);
    ``join``: a joining host's ``--join --host-id H --workers N [--key-file F]``."""
    py = os.path.abspath(python or sys.executable)
    words = [py, "-m", "supervisor.cli", "launch", str(Path(config_path).absolute()), *join]
    for item in overrides:
        words += ["--set", item]
    return " ".join(_escape(w) for w in words)


def _environment_lines(env: Mapping[str, str]) -> list[str]:
    """The shell's settings the service needs (never a secret: a comment says where tokens go instead)."""
    lines = [_env_assignment(key, env[key]) for key in UNIT_ENV_VARS if env.get(key)]
    if any(env.get(k) for k in SECRET_ENV_VARS):
        lines.append("# A token is set in your shell but never written here: put it in a root-only file and add")
        lines.append("# EnvironmentFile=/etc/sapo/secrets.env")
    return lines


def render_unit(
    config,
    *,
    config_path: str | os.PathLike,
    overrides: Sequence[str] = (),
    python: str | None = None,
    working_dir: str | os.PathLike | None = None,
    user: str | None = None,
    environ: Mapping[str, str] | None = None,
    host: str | None = None,
    key_file: str | os.PathLike | None = None,
) -> str:
    """The unit file text for ``config`` (see the module docstring for the choices). ``host``: a joining host's
    id (``config`` is then its own view, :func:`supervisor.launch.joiner_config`), ``key_file`` the key it is
    given (the path goes into the unit, never the key)."""
    sv = config.supervisor
    env = os.environ if environ is None else environ
    cwd = str(Path(working_dir or os.getcwd()).absolute())
    user = user or getpass.getuser()
    nodes = sv.workers + (1 if host is None else 0)
    start_timeout = int(math.ceil(nodes * sv.startup_timeout_s + 60))
    stop_timeout = int(math.ceil(sv.stop_timeout_s + STOP_MARGIN_S))
    watchdog = int(max(60, math.ceil(10 * sv.monitor_interval_s)))
    shared = Path(config.experiment.root).expanduser()
    shared = shared if shared.is_absolute() else Path(cwd) / shared
    name = unit_name(config, host)
    join: list[str] = []
    what = f"supervisor of 1 coordinator + {sv.workers} workers"
    if host is not None:
        join = ["--join", "--host-id", host, "--workers", str(sv.workers)]
        join += ["--key-file", str(Path(key_file).expanduser().absolute())] if key_file else []
        what = f"joining host {host}: {sv.workers} workers (the coordinator runs on the first host)"
    lines = [
        f"# {name}: generated by `swarm systemd-unit {Path(config_path).absolute()}`",
        "# Install: scripts/install_service.sh CONFIG (or copy to /etc/systemd/system/ and",
        f"#   systemctl daemon-reload && systemctl enable --now {name})",
    ]
    if host is not None and not key_file:
        lines.append("# The experiment key: copy the first host's swarm.key (chmod 600) into this host's runtime dir "
                     "(`swarm status CONFIG --join --json` shows it), or regenerate with --key-file F")
    lines += [
        "[Unit]",
        f"Description=SAPO swarm {config.experiment.name}: {what}",
        "After=network-online.target",
        "Wants=network-online.target",
        f"RequiresMountsFor={_spec(os.path.normpath(str(shared)))}",
        "StartLimitIntervalSec=900",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={exec_start(config_path, overrides, python, join)}",
        f"WorkingDirectory={_spec(cwd)}",
        f"User={_spec(user)}",
        _env_assignment("PYTHONUNBUFFERED", "1"),
    ]
    lines += _environment_lines(env)
    lines += [
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC}",
        "RestartPreventExitStatus=2",
        "SuccessExitStatus=143 130",
        "KillMode=control-group",
        "KillSignal=SIGTERM",
        f"TimeoutStartSec={start_timeout}",
        f"TimeoutStopSec={stop_timeout}",
        f"WatchdogSec={watchdog}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)
