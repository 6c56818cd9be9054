"""What both node roles share: stop signals, the experiment's config snapshot, peer registration."""

from __future__ import annotations

import os
import signal
import socket
import time

import structlog

from node.config import ExperimentConfig, plain_name_problem
from node.layout import ExperimentLayout
from node.schemas import ConfigSnapshot, PeerRecord
from node.storage import SharedStore
from sapo.config import ConfigError

log = structlog.get_logger(__name__)

EXIT_FINISHED = 0
EXIT_FAILED = 1
EXIT_CONFIG_ERROR = 2
EXIT_STOPPED = 143  # 128 + SIGTERM: stopped on request, after checkpointing
HOST_ID_ENV = "SWARM_HOST_ID"  # a joining host's id (supervisor.launch hands it to its nodes)

# Fields that must agree across every node of an experiment: they shape what is exchanged. Checked on the base
# config, and so is the ``workers:`` list (every worker's own model, seed, tasks, I, J): see _identity.
IDENTITY_FIELDS = (
    ("model", "name"), ("model", "init_seed"), ("experiment", "seed"),
    ("sapo", "num_train_samples"), ("sapo", "num_transplant_trees"), ("sapo", "num_generations"),
    ("sapo", "max_new_tokens"), ("sapo", "max_prompt_tokens"), ("sapo", "tasks"),
)


class StopRequested(Exception):
    """SIGTERM/SIGINT arrived; raised at the next safe point of a loop."""


class StopFlag:
    """Signal handlers only record; loops call ``check()`` between phases."""

    def __init__(self):
        self.signum: int | None = None

    def install(self) -> "StopFlag":
        """Handle SIGTERM and SIGINT in this (main) thread."""
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        """A stop was asked for."""
        return self.signum is not None

    def check(self) -> None:
        """Raise StopRequested if a stop was asked for."""
        if self.signum is not None:
            raise StopRequested(signal.Signals(self.signum).name)

    def wait_for(self, wakeup, seconds: float, wanted=lambda name: True) -> bool:
        """Like :meth:`sleep`, but True as soon as ``wakeup`` (a :class:`node.wakeup.Wakeup`) sees an event for a
        ``wanted`` file name; False after ``seconds``. A stop request is noticed within half a second."""
        deadline = time.monotonic() + seconds
        while True:
            self.check()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if wakeup.wait(min(left, 0.5), wanted):
                self.check()
                return True

    def sleep(self, seconds: float) -> None:
        """Sleep in small steps, raising StopRequested as soon as a stop is asked for."""
        deadline = time.monotonic() + seconds
        while True:
            self.check()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))


def _identity(config_dict: dict) -> dict:
    # A snapshot from before model.init_seed and workers: existed holds neither; both then mean the defaults.
    return {**{f"{a}.{b}": config_dict.get(a, {}).get(b) for a, b in IDENTITY_FIELDS},
            "workers": config_dict.get("workers") or []}


def ensure_config_snapshot(store: SharedStore, layout: ExperimentLayout, config: ExperimentConfig, node_id: str,
                           *, repair: bool = False) -> None:
    """Write ``state/config.json`` if this is the experiment's first node; else check ours agrees.

    A snapshot that cannot be verified (unsigned, another key, unreadable) is logged and ignored, never a
    reason to stop; with ``repair`` (the coordinator) it is replaced by ours.

    A node whose I/J/G, model, seed, task mix or ``workers:`` list differs from the experiment's refuses to start
    (ConfigError, exit code 2) instead of exchanging rollouts its peers cannot use.
    """
    mine = config.to_dict()
    with store.lock("config-snapshot"):
        existing, why = store.read_as_or_reason(layout.config_file(), ConfigSnapshot.from_json,
                                                expect_experiment=config.experiment.name)
        if existing is None and why != "missing" and not repair:
            # Forged, or signed with another key (this node was given the wrong one): either way it cannot
            # speak for the experiment, and it must not stop this node. The coordinator rewrites it.
            log.error("config_snapshot_unverified", reason=why, hint="state/config.json cannot be verified; if "
                      "this node runs on another host, give it the experiment's key (SWARM_KEY or --key-file; "
                      "the supervisor keeps it in its runtime dir as swarm.key)")
            return
        if existing is None:
            if why != "missing":
                log.warning("config_snapshot_repaired", reason=why)
            snapshot = ConfigSnapshot(experiment=config.experiment.name, written_by=node_id,
                                      written_at=time.time(), config=mine)
            store.write_json_atomic(layout.config_file(), snapshot.to_json(), retries=True)
            return
    theirs, ours = _identity(dict(existing.config)), _identity(mine)
    diffs = [f"{k}: experiment has {theirs[k]!r}, this node has {ours[k]!r}" for k in ours if theirs[k] != ours[k]]
    if diffs:
        raise ConfigError(
            diffs[0].split(":")[0],
            f"does not match experiment {config.experiment.name!r} (state/config.json, written by "
            f"{existing.written_by}): " + "; ".join(diffs) + ". Use a new experiment name to change these.",
        )


def host_name(environ=None) -> str:
    """The host in our peer record: ``$SWARM_HOST_ID`` (a joining host's id) when it is a plain name, else the
    hostname (at most 64 characters)."""
    env = os.environ if environ is None else environ
    host = env.get(HOST_ID_ENV, "")
    return (host if host and not plain_name_problem(host) else socket.gethostname())[:64]


class PeerRegistration:
    """Our ``peers/<node>.json``: written at start and at phase boundaries, at most once per interval.

    Readers (:mod:`node.liveness`) count a record as alive while its ``(started_at, progress)`` rises, by their
    own clocks. So ``started_at`` never goes back for a node id: after a restart it is now, or just after the
    ``started_at`` of the record the node left behind when that is later (this host's clock was stepped back
    since, or the node was relaunched on a host whose clock is behind the one before)."""

    def __init__(self, store: SharedStore, layout: ExperimentLayout, node_id: str, role: str, interval_s: float):
        self.store, self.path, self.interval_s = store, layout.peer_file(node_id), interval_s
        self.node_id, self.role = node_id, role
        self.host = host_name()
        self.started_at = self._start_time()
        self.progress = 0
        self.last_write = 0.0

    def _start_time(self) -> float:
        now = time.time()
        try:  # our own record from a previous run, verified like any peer's (a forged one is ignored)
            previous = self.store.read_as(self.path, PeerRecord.from_json, expect_node=self.node_id)
        except OSError:
            previous = None
        if previous is not None and previous.started_at >= now:
            return previous.started_at + 0.001
        return now

    def update(self, *, round_: int, status: str, force: bool = False) -> None:
        """Refresh the record (best effort: a failed write is retried at the next update)."""
        self.progress += 1
        now = time.time()
        if not force and now - self.last_write < self.interval_s:
            return
        record = PeerRecord(node_id=self.node_id, role=self.role, pid=os.getpid(), host=self.host,
                            started_at=self.started_at, heartbeat_at=now, round=max(round_, 0),
                            progress=self.progress, status=status)
        try:
            # not durable: rewritten every interval, and one lost in a power cut is harmless
            self.store.write_json_atomic(self.path, record.to_json(), durable=False)
            self.last_write = now
        except OSError as err:
            log.warning("peer_record_write_failed", error=str(err))
