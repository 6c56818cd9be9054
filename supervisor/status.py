"""``status.json``: what ``swarm status`` shows, built from a Supervisor, written when it matters, read back.

:func:`snapshot` is everything about the swarm, JSON-ready (version :data:`STATUS_VERSION`);
:func:`summary_line` is its one-line form (sd_notify ``STATUS=``, the console); :func:`phase` and
:func:`launch_complete` say where the supervisor as a whole is. :class:`StatusFile` rewrites the file at
once when something lasting changed (a state, a pid, a restart, a failure, a GPU figure) and otherwise
every :data:`STATUS_REFRESH_S`, so ages, rounds, round switches, rewards and CPU figures stay fresh without
a rewrite every tick. :func:`read_status` is the reader's side, through :mod:`node.fsio` and strict JSON like any file
of the runtime dir (a FIFO or a symlink there reads as no status, never a hang). The human table lives in
``supervisor/statusview.py``.

:class:`SwarmScan` is the whole swarm as this host sees it in the shared directory, whichever host runs
which node: every peer record (``peers/<node>.json``: host, role, round, status; checked with the
experiment key when this host holds it, :func:`swarm_store`, else read unverified and marked so) and each
worker's last reward (the end of its ``logs/<node>/metrics.jsonl``). A record's ``heartbeat_at`` is its
writer's clock, so the scan dates each record by *our* clock when it sees its version ``(started_at,
progress)`` rise (as :mod:`node.liveness` does); until then the age shown is by the writer's clock and
says so (:func:`swarm_age`). Scans are bounded as liveness bounds its own: one listing of ``peers/``, then
at most ``max_reads`` names looked at (known peers first, one ``lstat`` each, read only when changed),
at most ``max_rows`` nodes listed. The supervisor scans from its shared-dir poller (``status.json``'s
``swarm``, ages by its clock); ``swarm status`` on a host without a running supervisor scans itself.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from node import fsio
from node.layout import ExperimentLayout, check_node_id
from node.retry import errno_name
from node.schemas import PeerRecord, SchemaError, validate_metrics_line
from node.signing import KeyProblem, Signer, fingerprint, resolve_key
from node.storage import SharedStore, rejection_kind
from node.strict_json import parse_json_bytes
from supervisor.runfiles import RuntimePaths, write_json_atomic
from supervisor.states import NodeState
from supervisor.terminal import finite_number

if TYPE_CHECKING:
    from supervisor.daemon import Supervisor
    from supervisor.managed import ManagedNode

S = NodeState
STATUS_VERSION = 1
STATUS_MAX_BYTES = 16 * 1024 * 1024  # a status is a few KiB per node; this is a sanity cap
STATUS_REFRESH_S = 5.0  # rewrite at least this often while nothing lasting changes (cli warns after 60 s)
# Figures that change all the time: a change in these alone waits for the next refresh.
PASSING_TOP = ("updated_at", "summary", "round", "round_switch", "swarm")
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
        "swarm": sup.shared.swarm,  # SwarmScan.scan(): every node in the shared dir; None before the first poll
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


# --------------------------------------------------------------------------- the whole swarm (shared dir)

SWARM_MAX_READS = 256  # peer files looked at per scan (known peers first): junk names cannot lengthen a scan
SWARM_MAX_ROWS = 100  # nodes listed; the others are counted
SWARM_RECORD_MAX_BYTES = 64 * 1024  # a peer record is ~250 bytes
SWARM_TAIL_BYTES = 16384  # the end of a metrics file: its last lines
REWARD_KEYS = ("reward_local", "mean_reward", "reward")  # the first a metrics line has is its reward
NODE_ID_LIKE = re.compile(r"coordinator|(?:.+-)?worker_[1-9][0-9]{0,8}")  # the ids supervisors give nodes
_SWARM_REMEMBERED = 65536  # names remembered across scans (junk included); then the memory starts over


def swarm_store(layout: ExperimentLayout, runtime_dir: Path | str, *, environ: Mapping[str, str] | None = None,
                key_file: str | None = None, required: bool = True) -> tuple[SharedStore, str]:
    """(a store reading ``layout`` with the experiment key, a line saying how records are checked). The key
    is looked up as a node looks it up (``key_file``, ``$SWARM_KEY``, ``$SWARM_KEY_FILE``, then
    ``<runtime_dir>/swarm.key``), never created; without one (or with an unusable one) records are read
    unverified: a signature is stripped, not checked."""
    try:
        key, source = resolve_key(key_file=key_file, runtime_dir=Path(runtime_dir), environ=environ, create=False)
        note = (f"signatures checked with the experiment key {fingerprint(key)} ({source})" if key is not None else
                f"UNVERIFIED: no experiment key on this host (--key-file, $SWARM_KEY, $SWARM_KEY_FILE or "
                f"{Path(runtime_dir) / 'swarm.key'})")
    except KeyProblem as err:
        key, note = None, f"UNVERIFIED: the experiment key is unusable: {err}"
    signer = Signer(key, required=required) if key is not None else Signer(None, required=False)
    return SharedStore(layout, signer=signer), note


def line_reward(line: Mapping) -> float | None:
    """The reward of a checked metrics line: its first :data:`REWARD_KEYS` field that is a bounded number."""
    for key in REWARD_KEYS:
        value = finite_number(line.get(key))
        if value is not None:
            return value
    return None


def swarm_age(entry: Mapping, now: float) -> tuple[float | None, str]:
    """(seconds since the record last changed, whose clock): ``local`` once this host saw it change, else
    ``writer`` (its ``heartbeat_at``, the writer's clock: a skewed host shows a wrong, even negative, age)."""
    for key, clock in (("seen_change_at", "local"), ("heartbeat_at", "writer")):
        value = finite_number(entry.get(key))
        if value is not None:
            return now - value, clock
    return None, "-"


def with_ages(section: Mapping | None, now: float) -> dict | None:
    """A copy of a :meth:`SwarmScan.scan` section with ``age_s`` and ``age_clock`` in every node (--json)."""
    if not isinstance(section, Mapping):
        return None
    nodes = [n for n in section.get("nodes") or () if isinstance(n, Mapping)]
    return {**section, "nodes": [{**n, **dict(zip(("age_s", "age_clock"), swarm_age(n, now)))} for n in nodes]}


@dataclasses.dataclass
class _Peer:
    file_sig: tuple | None = None
    record: PeerRecord | None = None  # the last valid record (None: never valid)
    version: tuple = (-1.0, -1)  # the highest (started_at, progress) seen
    seen_change_at: float | None = None  # our clock, when the version last rose after the first sight
    verified: bool = False  # the record's signature was checked with the key
    problem: str | None = None  # why the last read was refused (None: it was not)


class SwarmScan:
    """Every node of one experiment as this host sees it in the shared dir (see the module docstring);
    keep one per process and call :meth:`scan` repeatedly: ages by our clock need two looks at a record."""

    def __init__(self, store: SharedStore, *, key_note: str = "", clock: Callable[[], float] = time.time,
                 max_reads: int = SWARM_MAX_READS, max_rows: int = SWARM_MAX_ROWS, first: Iterable[str] = (),
                 rng: random.Random | None = None):
        self.store, self.layout, self.key_note, self.clock = store, store.layout, key_note, clock
        self.max_reads, self.max_rows = int(max_reads), int(max_rows)
        self.first = list(first)  # names looked at before unknown ones (this host's own nodes)
        self.rng = rng if rng is not None else random.Random(0)
        self._peers: dict[str, _Peer] = {}
        self._rewards: dict[str, tuple[tuple, float | None]] = {}  # node -> (metrics file signature, reward)

    def scan(self) -> dict:
        """Look at the shared dir once (bounded) and return the section ``status.json`` and ``--json`` show."""
        now = self.clock()
        names, unreachable = self._listed()
        order = self._order(names) if unreachable is None else []  # a mount that is away: no lstat each
        for name in order[:self.max_reads]:
            self._look(name, now)
        nodes = sorted(((name, p) for name, p in self._peers.items() if p.record is not None),
                       key=lambda item: (item[1].record.host, item[1].record.role != "coordinator", item[0]))
        rows = [self._entry(name, peer) for name, peer in nodes[:self.max_rows]]
        refused = Counter(p.problem for p in self._peers.values() if p.problem is not None)
        return {"scanned_at": now, "experiment_dir": str(self.layout.root), "verified": self.store.signer.enabled,
                "key": self.key_note, "unreachable": unreachable, "listed": len(names), "looked_at": min(len(order), self.max_reads),
                "not_looked_at": max(0, len(order) - self.max_reads), "refused": dict(sorted(refused.items())),
                "hosts": len({p.record.host for _, p in nodes}), "nodes": rows, "more": max(0, len(nodes) - len(rows))}

    # -- one scan ---------------------------------------------------------------------------------------
    def _listed(self) -> tuple[list[str], str | None]:
        """(the node ids with a ``peers/<id>.json`` name: plain names only, junk is not a node; why ``peers/``
        could not be listed, after the store's retries: then the nodes seen last time are kept)."""
        try:
            entries = self.store.listdir(self.layout.peers_dir(), raise_unreachable=True)
        except OSError as err:
            return [n for n, p in self._peers.items() if p.record is not None], errno_name(err)
        out = []
        for entry in entries:
            if entry.endswith(".json") and not entry.startswith("."):
                try:
                    out.append(check_node_id(entry[:-5]))
                except ValueError:
                    continue
        listed = set(out)
        for gone in [name for name in self._peers if name not in listed]:
            del self._peers[gone]
            self._rewards.pop(gone, None)
        if len(self._peers) >= _SWARM_REMEMBERED:
            self._peers = {k: v for k, v in self._peers.items() if v.record is not None}
        return out, None

    def _order(self, names: list[str]) -> list[str]:
        """The names to look at, best first: known peers; this host's own names; names that look like node ids
        (``coordinator``, ``worker_N``, ``<host>-worker_N``), those with a ``logs/<id>/`` first; then any other
        name never looked at; then names refused before. Each group is shuffled (seeded), so junk that
        mimics node ids delays real peers by scans, never for good."""
        known = sorted(n for n in names if n in self._peers and self._peers[n].record is not None)
        listed = set(names)
        first = [n for n in dict.fromkeys(self.first) if n in listed and n not in known]
        taken = set(known) | set(first)
        rest = [n for n in names if n not in taken]
        logged = set(self.store.listdir(self.layout.logs_dir())) if len(rest) > self.max_reads - len(taken) else set()
        groups: list[list[str]] = [[], [], [], []]
        for n in rest:
            tried = n in self._peers
            groups[3 if tried else 0 if NODE_ID_LIKE.fullmatch(n) and n in logged else
                   1 if NODE_ID_LIKE.fullmatch(n) else 2].append(n)
        for group in groups:
            self.rng.shuffle(group)
        return known + first + [n for group in groups for n in group]

    def _look(self, name: str, now: float) -> None:
        path = self.layout.peer_file(name)
        st = self.store.lstat(path)
        if st is None:
            return
        peer = self._peers.setdefault(name, _Peer())
        file_sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if peer.file_sig == file_sig:
            return  # unchanged since we last read it: one lstat
        peer.file_sig = file_sig
        try:
            data, sig = fsio.read_capped(self.store.check_inside(path), SWARM_RECORD_MAX_BYTES, fs=self.store.fs)
            body = self.store.verified(path, data, sig)
            record = PeerRecord.from_json(parse_json_bytes(body), expect_node=name)
        except FileNotFoundError:
            return
        except fsio.BadFile as bad:
            peer.problem = rejection_kind(bad.reason)
            return
        except SchemaError:
            peer.problem = "schema"
            return
        except (OSError, ValueError) as err:  # strict JSON's refusals; an OS error other than "missing"
            peer.problem = rejection_kind(str(err))
            return
        peer.problem = None
        version = (record.started_at, record.progress)
        if version <= peer.version:
            return  # the same or an older copy (a replay): not a sign of life
        if peer.record is not None:
            peer.seen_change_at = now  # a change we saw: dated by our clock
        peer.version, peer.record = version, record
        peer.verified = self.store.signer.enabled and len(body) < len(data)

    def _entry(self, name: str, peer: _Peer) -> dict:
        rec = peer.record
        return {"node": name, "host": rec.host, "role": rec.role, "round": rec.round, "status": rec.status,
                "pid": rec.pid, "heartbeat_at": rec.heartbeat_at, "seen_change_at": peer.seen_change_at,
                "verified": peer.verified, "reward": self._reward(name) if rec.role == "worker" else None}

    def _reward(self, name: str) -> float | None:
        """The reward of the node's last valid (and, with the key, verified) metrics line; cached while its
        metrics file does not change."""
        path = self.layout.metrics_file(name)
        st = self.store.lstat(path)
        if st is None:
            return None
        file_sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._rewards.get(name)
        if cached is not None and cached[0] == file_sig:
            return cached[1]
        reward = self._last_reward(path, name)
        self._rewards[name] = (file_sig, reward)
        return reward

    def _last_reward(self, path: Path, name: str) -> float | None:
        try:
            data, begin, _ = fsio.read_end(self.store.check_inside(path), max_bytes=SWARM_TAIL_BYTES)
        except (fsio.BadFile, OSError, ValueError):
            return None
        pieces = data.split(b"\n")
        pieces = pieces[1:-1] if begin > 0 else pieces[:-1]  # a partial first line; a line being appended
        context = self.store.context(path)
        for piece in reversed([p for p in pieces if p.strip()]):
            try:
                line = validate_metrics_line(parse_json_bytes(self.store.signer.verify(piece, context)),
                                             expect_node=name)
            except ValueError:  # SignatureError and SchemaError are ValueErrors
                continue
            reward = line_reward(line)
            if reward is not None:
                return reward
        return None
