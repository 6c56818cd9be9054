"""``status.json``: what ``swarm status`` shows, built from a Supervisor, written when it matters, read back.

:func:`snapshot` is everything about the swarm, JSON-ready (version :data:`STATUS_VERSION`);
:func:`summary_line` is its one-line form (sd_notify ``STATUS=``, the console); :func:`phase` and
:func:`launch_complete` say where the supervisor as a whole is. :class:`StatusFile` rewrites the file at
once when something lasting changed (a state, a pid, a restart, a failure, a GPU figure) and otherwise
every :data:`STATUS_REFRESH_S`, so ages, rounds, round switches, rewards and CPU figures stay fresh without
a rewrite every tick. :func:`read_status` is the reader's side, through :mod:`node.fsio` and strict JSON like any file
of the runtime dir (a FIFO or a symlink there reads as no status, never a hang). The human table lives in
``supervisor/statusview.py``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node import fsio
from node.strict_json import parse_json_bytes
from supervisor.runfiles import RuntimePaths, write_json_atomic
from supervisor.states import NodeState

if TYPE_CHECKING:
    from supervisor.daemon import Supervisor
    from supervisor.managed import ManagedNode

S = NodeState
STATUS_VERSION = 1
STATUS_MAX_BYTES = 16 * 1024 * 1024  # a status is a few KiB per node; this is a sanity cap
STATUS_REFRESH_S = 5.0  # rewrite at least this often while nothing lasting changes (cli warns after 60 s)
# Figures that change all the time: a change in these alone waits for the next refresh.
PASSING_TOP = ("updated_at", "summary", "round", "round_switch")
PASSING_NODE = ("uptime_s", "in_state_s", "backoff_left_s", "heartbeat_age_s", "progress_age_s", "phase", "round",
                "reward", "rss_bytes", "cpu_percent")
PASSING_NESTED = {"supervisor": ("rss_bytes", "cpu_percent"), "gpu": ("utilization",)}


def read_status(paths: RuntimePaths) -> dict | None:
    """The last ``status.json`` written, or None (missing, refused by :func:`node.fsio.read_capped`, or not
    strict JSON)."""
    try:
        obj = parse_json_bytes(fsio.read_capped(paths.status_file, STATUS_MAX_BYTES)[0])
    except (OSError, ValueError, fsio.BadFile):
        return None
    return obj if isinstance(obj, dict) else None


def launch_complete(sup: "Supervisor") -> bool:
    """Every node RUNNING, or the first launch is over (each node left STOPPED/STARTING once)."""
    states = [n.status.state for n in sup.nodes.values()]
    if all(s is S.RUNNING for s in states):
        return True
    return not any(s in (S.STOPPED, S.STARTING) for s in states) and not sup.stop.active


def phase(sup: "Supervisor") -> str:
    """``starting``, ``running``, ``stopping`` or ``exited``: the supervisor as a whole."""
    if sup.exit_code is not None:
        return "exited"
    if sup.stop.active:
        return "stopping"
    return "running" if launch_complete(sup) else "starting"


def current_round(sup: "Supervisor") -> int | None:
    """The coordinator's round: its state file when read, else its heartbeat."""
    rs = sup.shared.round_state
    if rs is not None:
        return rs.round
    hb = sup.nodes["coordinator"].heartbeat
    if hb is not None and hb.round >= 0:
        return hb.round
    return None


def summary_line(sup: "Supervisor") -> str:
    """One line for STATUS= and the console: round, node counts, restarts."""
    counts: dict[str, int] = {}
    for n in sup.nodes.values():
        counts[n.status.state.value] = counts.get(n.status.state.value, 0) + 1
    rs = sup.shared.round_state
    rnd = current_round(sup)
    round_text = f"round {rnd}/{sup.config.experiment.max_rounds}" if rnd is not None else "round -"
    if rs is not None and rs.finished:
        round_text += " (finished)"
    parts = ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items()))
    restarts = sum(n.status.restarts for n in sup.nodes.values())
    text = f"{round_text}: {parts}; restarts {restarts}"
    stop = sup.stop
    if sup.exit_code is not None:
        text = f"exited with code {sup.exit_code}" + (f" ({stop.reason})" if stop.reason else "") + "; " + text
    elif stop.active:
        text = f"stopping ({stop.reason}); " + text
    return text


def _node_entry(sup: "Supervisor", n: "ManagedNode", now: float, wall: float, budget: int | None) -> dict:
    d = n.status.to_dict(now)
    hb = n.heartbeat if n.proc is not None else None
    paths = sup.paths
    d.update(
        heartbeat_age_s=round(wall - hb.heartbeat_at, 3) if hb else None,
        progress_age_s=round(wall - hb.progress_at, 3) if hb else None,
        phase=hb.phase if hb else None,
        round=hb.round if hb else None,
        node_status=hb.status if hb else None,
        rss_bytes=n.rss_bytes, cpu_percent=n.cpu_percent, gpu_bytes=n.gpu_bytes, gpu_unknown=n.gpu_unknown,
        gpu_budget_bytes=budget if n.role == "worker" else None, over_budget=n.over_budget,
        reward=sup.shared.rewards.get(n.name), log_tail=list(n.log_tail),
        waiting_for_gpu_release=n.gpu_wait_since is not None,
        logs={"stdout": str(paths.stdout_log(n.name)), "stderr": str(paths.stderr_log(n.name)),
              "structured": str(paths.node_log(n.name))},
    )
    return d


def snapshot(sup: "Supervisor", now: float | None = None) -> dict:
    """Everything ``swarm status`` shows, JSON-ready."""
    now = sup.os.monotonic() if now is None else now
    wall = sup.os.now()
    launch = sup.launch
    budget = launch.budget_bytes() if launch else None
    nodes = {n.name: _node_entry(sup, n, now, wall, budget) for n in sup.nodes.values()}
    rs = sup.shared.round_state
    gpu_watch = sup.gpu_watch
    return {
        "version": STATUS_VERSION,
        "state": phase(sup),
        "summary": summary_line(sup),
        "updated_at": wall,
        "supervisor": {"pid": os.getpid(), "started_at": sup.started_wall, **sup.sampler.me},
        "experiment": sup.config.experiment.name,
        "experiment_dir": str(Path(sup.config.experiment_dir).absolute()),
        "config_path": sup.config_path,
        "runtime_dir": str(sup.paths.root),
        "workers": sup.sv.workers,
        "launch": launch.to_dict() if launch else None,
        "gpu": {"available": sup.gpu is not None, "utilization": gpu_watch.utilization if gpu_watch else None,
                "device": dataclasses.asdict(launch.gpu_device) if launch and launch.gpu_device else None,
                "processes_readable": gpu_watch.readable if gpu_watch else None},
        "round": current_round(sup),
        "max_rounds": sup.config.experiment.max_rounds,
        "finished": bool(rs.finished) if rs else False,
        "round_switch": sup.shared.round_switch,  # supervisor.switches.status_summary; None before the first
        "fatal": [{"node": n.name, "reason": n.status.fatal_reason} for n in sup.nodes.values()
                  if n.status.state is S.FATAL],
        "over_budget": [n.name for n in sup.nodes.values() if n.over_budget],
        "stop_reason": sup.stop.reason,
        "exit_code": sup.exit_code,
        "nodes": nodes,
    }


def lasting(snap: dict) -> dict:
    """``snap`` without the figures that change all the time (:data:`PASSING_TOP` and the others)."""
    out = {k: v for k, v in snap.items() if k not in PASSING_TOP}
    for key, passing in PASSING_NESTED.items():
        if isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in out[key].items() if k not in passing}
    out["nodes"] = {name: {k: v for k, v in d.items() if k not in PASSING_NODE}
                    for name, d in (snap.get("nodes") or {}).items()}
    return out


class StatusFile:
    """Writes snapshots to ``path`` when something lasting changed, else every ``refresh_s``."""

    def __init__(self, path: Path, log: Any, refresh_s: float = STATUS_REFRESH_S):
        self.path = path
        self.log = log
        self.refresh_s = refresh_s
        self._last: dict | None = None
        self._written_at: float | None = None

    def due(self, now: float) -> bool:
        """True when the refresh interval has passed (or nothing was written yet)."""
        return self._written_at is None or now - self._written_at >= self.refresh_s

    def offer(self, snap: dict, now: float, *, force: bool = False) -> bool:
        """Write ``snap`` when forced, due, or lastingly different from the last one written; True if written."""
        key = lasting(snap)
        if not (force or self.due(now) or key != self._last):
            return False
        try:
            write_json_atomic(self.path, snap)
        except OSError as err:
            self.log.warning("status_write_failed", path=str(self.path), error=str(err))
            return False
        self._last, self._written_at = key, now
        return True
