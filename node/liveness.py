"""Which peers are live, judged by the reader's own clock (never a writer's timestamp).

A peer record (``peers/<node>.json``) says when its writer last beat, by the writer's clock. Trusting that
lets a record dated in the future count as live forever (every round then waits ``round_timeout_s``), and a
host with a skewed clock look dead. Here a record is live while it keeps **changing** as seen locally:

- its version ``(started_at, progress)`` rose above the highest seen (``progress`` is a counter the node
  bumps; ``started_at`` changes with a restart), so a replayed older copy never counts as a change;
- a change is dated by *our* clock when we see it; a record seen for the first time counts as changed at
  ``min(now, heartbeat_at)``: a record from the past is as old as it says, one from the future is fresh
  once and then must keep changing like any other.

Scans are bounded: peers known to be valid are looked at by name every scan (one lstat each); the
directory is listed to discover new peers at most every ``discover_every_s``, and then every unknown name
(up to :data:`MAX_NAMES_PER_SCAN`, in a seeded random order) costs one lstat, and at most ``max_records`` new
or changed files are read. A file whose ``lstat`` signature did not change since it was last read is not
read again, so thousands of junk names cost a few milliseconds once each has been read, and a real peer
among them is found at the next discovery.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from typing import Callable

from node.layout import ExperimentLayout, check_node_id
from node.schemas import PeerRecord
from node.storage import SharedStore

DEFAULT_MAX_RECORDS = 8192  # new or changed unknown records read per discovery (~30 us each when refused)
MAX_NAMES_PER_SCAN = 20_000  # unknown names looked at (one lstat each) per discovery
_SUPERVISED_NAME = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]*-)?worker_[1-9][0-9]{0,5}|coordinator")
DEFAULT_DISCOVER_EVERY_S = 1.0
_MAX_REMEMBERED = 65536  # file signatures kept across scans (junk included); then the cache starts over


@dataclass
class _Seen:
    file_sig: tuple | None = None
    record: PeerRecord | None = None  # the last valid record (None: never valid)
    version: tuple = (-1.0, -1)       # the highest (started_at, progress) seen
    changed_at: float = float("-inf")  # our clock, when the version last rose


class PeerTracker:
    """Liveness of the peers of one experiment, as one reader sees it (keep one per process)."""

    def __init__(self, store: SharedStore, layout: ExperimentLayout, timeout_s: float, *,
                 clock: Callable[[], float] = time.time, max_records: int = DEFAULT_MAX_RECORDS,
                 rng: random.Random | None = None, discover_every_s: float = DEFAULT_DISCOVER_EVERY_S):
        self.store, self.layout, self.timeout_s, self.clock = store, layout, float(timeout_s), clock
        self.max_records = int(max_records)
        self.rng = rng if rng is not None else random.Random(0)
        self.discover_every_s = float(discover_every_s)
        self._seen: dict[str, _Seen] = {}
        self._discovered_at = float("-inf")

    def scan(self) -> None:
        """Look at the peers directory once (bounded, see the module doc)."""
        now = self.clock()
        known = [name for name, seen in self._seen.items() if seen.record is not None]
        for name in known:
            self._look(name, now)
        if now - self._discovered_at >= self.discover_every_s:
            self._discovered_at = now
            reads = 0
            for name in self._unknown_names(set(known)):
                if reads >= self.max_records:
                    break  # the rest next time, in another order
                reads += self._look(name, now)

    def live_workers(self, *, scan: bool = True) -> dict[str, PeerRecord]:
        """Workers whose record changed within the timeout (our clock) and that did not say finished."""
        if scan:
            self.scan()
        now = self.clock()
        return {name: seen.record for name, seen in self._seen.items()
                if seen.record is not None and seen.record.role == "worker" and seen.record.status != "finished"
                and now - seen.changed_at <= self.timeout_s}

    def changed_since(self, name: str, since: float) -> bool:
        """``name``'s record changed (as we saw it) at or after ``since`` (our clock)."""
        seen = self._seen.get(name)
        return seen is not None and seen.changed_at >= since

    def changed_at(self, name: str) -> float | None:
        """When (our clock) ``name``'s record was last seen to change; None when never seen valid."""
        seen = self._seen.get(name)
        return None if seen is None or seen.record is None else seen.changed_at

    def known_workers(self, *, scan: bool = True) -> set[str]:
        """Every worker with a valid record seen so far, live or not."""
        if scan:
            self.scan()
        return {name for name, seen in self._seen.items() if seen.record is not None and seen.record.role == "worker"}

    # -- one scan ---------------------------------------------------------------------------------------
    def _unknown_names(self, known: set[str]) -> list[str]:
        """Node ids with a peer file that is not (yet) a known peer, shuffled; at most
        :data:`MAX_NAMES_PER_SCAN` (each costs an lstat; only new or changed files are read)."""
        others = []
        for name in self.store.listdir(self.layout.peers_dir()):
            if name.endswith(".json") and not name.startswith(".") and name[:-5] not in known:
                try:
                    others.append(check_node_id(name[:-5]))
                except ValueError:
                    continue
        self.rng.shuffle(others)
        # Names a supervisor gives its nodes first (worker_3, hostb-worker_1, coordinator): junk under other
        # names cannot delay finding a real peer; hand-picked names are still found, behind them.
        others.sort(key=lambda name: _SUPERVISED_NAME.fullmatch(name) is None)
        return others[:MAX_NAMES_PER_SCAN]

    def _look(self, name: str, now: float) -> bool:
        """Look at ``name``'s record once; True when it had to be read (new or changed)."""
        path = self.layout.peer_file(name)
        try:
            st = self.store.lstat(path)
        except ValueError:  # peers/ itself leads out of the experiment
            return False
        if st is None:
            return False
        seen = self._seen.get(name)
        file_sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if seen is not None and seen.file_sig == file_sig:
            return False  # unchanged since we last read it
        if seen is None:
            if len(self._seen) >= _MAX_REMEMBERED:
                self._seen = {k: v for k, v in self._seen.items() if v.record is not None}
            seen = self._seen[name] = _Seen()
        seen.file_sig = file_sig
        record = self.store.read_as(path, PeerRecord.from_json, expect_node=name)
        if record is None:
            return True
        version = (record.started_at, record.progress)
        if version <= seen.version:
            return True  # the same or an older copy (a replay): not a sign of life
        first_sight = seen.record is None
        seen.version, seen.record = version, record
        seen.changed_at = min(now, record.heartbeat_at) if first_sight else now
        return True
