"""The coordinator: sole writer of ``state/current_state.json``; it advances rounds and never trains.

Strategies (config ``coordinator.strategy``):
- ``time``: advance every ``round_interval_s``;
- ``completion``: advance when every live worker has submitted its round result;
- ``hybrid`` (default): completion, or ``round_timeout_s`` after the round started, whichever comes first.

Live means a peer record that kept changing within the heartbeat timeout *as seen by our clock*
(:mod:`node.liveness`), so a dead worker never stalls a round and a record dated in the future does not
make one look alive. A round counts as complete only with results from live workers that appeared after
the round started (a result planted ahead of time does not count). Round 0 starts once the expected
number of workers has registered, waiting as long as the supervisor waits for a start-up
(``startup_timeout_s``), so a slow load on a busy machine never leaves a worker out of round 0.

The state the coordinator resumes from is never taken on trust: a state file that is forged, unreadable,
from a newer version, or implausible (:mod:`node.plausible`) is replaced by the coordinator's own local
copy (``<runtime dir>/coordinator.state.json``), else by the highest round with a signed result; an
experiment with progress is never sent back to round 0 (a clear error instead). While running, a state
file changed behind its back is rewritten. After ``max_rounds`` it writes a final state (``finished:
true``) and exits 0.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path

import structlog

from node import fsio
from node.config import ExperimentConfig
from node.heartbeat import Heartbeat
from node.layout import ExperimentLayout, parse_round_dir
from node.liveness import PeerTracker
from node.logs import bind
from node.mounts import poll_interval
from node.plausible import state_problem
from node.retention import apply_retention
from node.round_switch import PendingSwitch
from node.runtime import EXIT_FINISHED, EXIT_STOPPED, PeerRegistration, StopFlag, StopRequested
from node.schemas import RoundResult, RoundState
from node.storage import SharedStore
from node.strict_json import encode_json, parse_json_bytes
from node.wakeup import Wakeup, events_disabled
from sapo.config import ConfigError

log = structlog.get_logger(__name__)

STAGE = 0
_EVIDENCE_ROUNDS = 16  # round directories looked at (newest first) when recovering the round from results


def decide_advance(strategy: str, *, elapsed_s: float, interval_s: float, timeout_s: float,
                   live: set[str], submitted: set[str]) -> str | None:
    """Why the current round should end now (a short reason), or None to keep waiting. Pure."""
    complete = bool(live) and live <= submitted  # results from workers that are not live do not count
    if strategy == "time":
        return "interval" if elapsed_s >= interval_s else None
    if complete:
        return "all_live_workers_submitted"
    if strategy == "hybrid" and elapsed_s >= timeout_s:
        return "round_timeout"
    return None


class Coordinator:
    """Runs the round clock of one experiment."""

    def __init__(self, config: ExperimentConfig, node_id: str, *, store: SharedStore, layout: ExperimentLayout,
                 heartbeat: Heartbeat, stop: StopFlag, clock=time.time, local_state: Path | None = None):
        self.config, self.node_id, self.store, self.layout = config, node_id, store, layout
        self.heartbeat, self.stop, self.clock = heartbeat, stop, clock
        self.local_state = local_state
        self.peer = PeerRegistration(store, layout, node_id, "coordinator", config.supervisor.heartbeat_interval_s)
        self.peers = PeerTracker(store, layout, config.supervisor.heartbeat_timeout_s, clock=clock,
                                 rng=random.Random(config.experiment.seed))
        self._written: tuple[RoundState, tuple | None] | None = None  # what we last wrote, its file signature
        self._stale_results: dict[str, tuple] = {}  # results already there when the current round started
        self._results: dict[int, dict[str, float]] = {}  # when (our clock) each valid result was first seen
        self._switch: PendingSwitch | None = None
        self.wakeup = Wakeup(enabled=not events_disabled())  # ticks wake when a result lands, not at the poll
        self.poll_s = poll_interval(config)

    # --- state file ---------------------------------------------------------------------------------
    def load_state(self) -> RoundState | None:
        """The state to resume from, or None for a fresh experiment (see the module doc). Waits out an
        unreachable mount (an outage must not look like round 0); raises ConfigError when the state file
        cannot be used and nothing else tells the round."""
        cfg = self.config
        shared, why = self._read_shared_state()
        candidates = []
        for source, state in (("shared", shared), ("local copy", self._read_local_state())):
            if state is None:
                continue
            problem = state_problem(state, max_rounds=cfg.experiment.max_rounds)
            if problem:
                log.warning("state_refused", source=source, reason=problem)
                why = why or problem
                continue
            candidates.append(state)
        if candidates:
            best = max(candidates, key=lambda st: (st.round, st.finished))
            if best is not shared:
                log.warning("state_restored", source="local copy", round=best.round,
                            shared_state=why or f"round {shared.round}")
            return best
        evidence = self.highest_result_round()
        if evidence is not None and evidence < cfg.experiment.max_rounds:
            log.warning("state_recovered_from_results", round=evidence, shared_state=why)
            now = self.clock()
            return RoundState(experiment=cfg.experiment.name, round=evidence, stage=STAGE, started_at=now,
                              updated_at=now, finished=False, max_rounds=cfg.experiment.max_rounds)
        if why == "missing" or (why and not self._has_progress() and "newer than supported" not in why):
            if why != "missing":
                log.warning("state_replaced", reason=why, detail="no progress anywhere: starting at round 0")
            return None
        hint = (" If an older version (without signatures) ran this experiment, launch with --set "
                "exchange.require_signatures=false." if why == "unsigned" else "")
        raise ConfigError("state", f"state/current_state.json cannot be used ({why}) and neither a local copy "
                          "nor a round result tells the current round; refusing to restart the experiment at "
                          "round 0. Restore the file, or start a new experiment name." + hint)

    def _read_shared_state(self) -> tuple[RoundState | None, str | None]:
        while True:
            try:
                state, why = self.store.read_as_or_reason(self.layout.state_file(), RoundState.from_json,
                                                          expect_experiment=self.config.experiment.name)
                return state, why
            except OSError as err:
                log.warning("state_unreachable", error=str(err))
                self.heartbeat.progress("state_unreachable")
                self.stop.sleep(self.poll_s * 5)

    def _read_local_state(self) -> RoundState | None:
        if self.local_state is None:
            return None
        try:
            data, _ = fsio.read_capped(self.local_state, 64 * 1024)
            return RoundState.from_json(parse_json_bytes(data), expect_experiment=self.config.experiment.name)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, fsio.BadFile) as err:
            log.warning("local_state_unusable", path=str(self.local_state), error=str(err)[:200])
            return None

    def highest_result_round(self) -> int | None:
        """The newest round with at least one valid (signed) round result, or None."""
        self.peers.scan()
        names = self.store.listdir(self.layout.root / "rewards")
        rounds = sorted((r for r in map(parse_round_dir, names) if r is not None), reverse=True)
        for round_ in rounds[:_EVIDENCE_ROUNDS]:
            if self.submitted(round_):
                return round_
        return None

    def _has_progress(self) -> bool:
        """Any round directory of results or checkpoints: the experiment ran at least one round."""
        return any(parse_round_dir(n) is not None for kind in ("rewards", "checkpoints")
                   for n in self.store.listdir(self.layout.root / kind))

    def write_state(self, state: RoundState) -> None:
        """Write the state (retried until it lands: the coordinator is useless without it), then our local
        copy (best effort: it only matters if the shared one is later lost or forged)."""
        while True:
            try:
                # visible at once, fsynced just after (node.bgsync): every worker is waiting for it
                self.store.write_json_atomic(self.layout.state_file(), state.to_json(), retries=True, durable="later")
                break
            except OSError as err:
                log.warning("state_write_failed", error=str(err))
                self.heartbeat.progress("state_write_failed")
                self.stop.sleep(self.poll_s * 5)
        # Not the file's signature yet: something could have replaced it since the rename. The next guard
        # reads it back once and records the signature of what it found equal to this state.
        self._written = (state, None)
        if self.local_state is not None:
            try:
                # not fsynced: a backup, needed only if the shared copy is also lost; keeps the switch fast
                fsio.write_atomic(self.local_state, encode_json(state.to_json()), durable=False)
            except OSError as err:
                log.warning("local_state_write_failed", path=str(self.local_state), error=str(err))

    def guard_state_file(self) -> None:
        """Rewrite the state file when it changed behind our back (forged, replaced, deleted): one lstat
        per call while nothing happens. A mount that is away is left alone (the next call looks again)."""
        if self._written is None:
            return
        state, sig = self._written
        now_sig = self._signature_of(self.layout.state_file())
        if now_sig is not None and now_sig == sig:
            return
        try:
            on_disk, why = self.store.read_as_or_reason(self.layout.state_file(), RoundState.from_json,
                                                        expect_experiment=self.config.experiment.name)
        except OSError as err:
            log.info("state_guard_unreachable", error=str(err))
            return
        if on_disk == state:
            self._written = (state, now_sig)
            return
        log.warning("state_repaired", found=why or f"round {on_disk.round}", round=state.round)
        self.write_state(state)

    def _signature_of(self, path) -> tuple | None:
        """(mtime, size, inode) of a shared-dir file, or None: missing, unreachable, or on a path leading out
        of the experiment (e.g. a round directory planted as a symlink)."""
        try:
            return _file_signature(self.store.lstat(path))
        except (OSError, ValueError):
            return None

    def submitted(self, round_: int) -> set[str]:
        """Known workers (a valid peer record) with a valid round result for ``round_``; results that were
        already there when the round started do not count. Looked up by name: junk in the directory costs
        nothing."""
        names = set()
        for worker in self.peers.known_workers(scan=False):
            path = self.layout.reward_file(round_, STAGE, worker)
            sig = self._signature_of(path)
            if sig is None or self._stale_results.get(worker) == sig:
                continue
            result = self.store.read_as(path, RoundResult.from_json, expect_round=round_, expect_stage=STAGE,
                                        expect_node=worker)
            if result is not None:
                names.add(worker)
                self._results.setdefault(round_, {}).setdefault(worker, self.clock())
        return names

    def _note_stale_results(self, round_: int) -> None:
        """Remember the result files already present for a round that starts now."""
        stale = {}
        for worker in self.peers.known_workers(scan=False):
            sig = self._signature_of(self.layout.reward_file(round_, STAGE, worker))
            if sig is not None:
                stale[worker] = sig
        if stale:
            log.warning("results_before_round_start", round=round_, nodes=sorted(stale)[:20], count=len(stale))
        self._stale_results = stale

    # --- loop ---------------------------------------------------------------------------------------
    def run(self) -> int:
        """Advance rounds until ``max_rounds``; returns the process exit code."""
        cfg = self.config
        try:
            state = self.load_state()
            if state is None:
                state = self.wait_for_workers()
                self.write_state(state)
                log.info("experiment_started", max_rounds=cfg.experiment.max_rounds)
            elif state.finished:
                log.info("experiment_already_finished", round=state.round)
                self.write_state(state)
                return EXIT_FINISHED
            else:
                log.info("coordinator_resumed", round=state.round)
                state = self.resume(state)
            while not state.finished:
                state = self.tick(state)
                self.wait_for_results(state.round)
            self.peer.update(round_=state.round, status="finished", force=True)
            return EXIT_FINISHED
        except StopRequested as stop:
            log.info("coordinator_stopping", signal=str(stop))
            self.peer.update(round_=-1, status="stopping", force=True)
            return EXIT_STOPPED

    def resume(self, state: RoundState) -> RoundState:
        """After a crash or a host restart: hold the current round until the workers that were active
        before (those with a result for this or the previous round) have refreshed their peer record since
        we resumed (a record from before a kill may still look live), or the start-up timeout passed, then
        restart the round's clock. Otherwise the first worker up would race through the rounds
        alone while the others start (staggered, minutes for large models), and a round begun before a long
        outage would time out before anyone could train it. Round 0 waits as at the start."""
        cfg = self.config
        if state.round == 0:
            self.wait_for_workers()
        else:
            self.peers.scan()
            expected = self.submitted(state.round - 1) | self.submitted(state.round)
            started = self.clock()
            while True:
                live = {name for name in self.peers.live_workers() if self.peers.changed_since(name, started)}
                waited = self.clock() - started
                if expected <= live or waited >= cfg.supervisor.startup_timeout_s:
                    log.info("swarm_resuming", round=state.round, expected=sorted(expected), live=sorted(live),
                             waited_s=round(waited, 1))
                    break
                self.heartbeat.progress("waiting_for_workers", round_=state.round)
                self.peer.update(round_=state.round, status="running")
                self.stop.sleep(self.poll_s)
        now = self.clock()
        state = replace(state, started_at=now, updated_at=now)
        self.write_state(state)
        return state

    def wait_for_workers(self) -> RoundState:
        """Hold round 0 until the expected workers registered, or the supervisor's start-up timeout passed
        (a worker loading its model on a busy machine may take far longer than a round)."""
        cfg = self.config
        started = self.clock()
        while True:
            # "running": loaded and waiting for a round. A "starting" record is written before the model
            # loads, which may take longer than a round: counting it would start round 0 without that worker.
            live = {name: r for name, r in self.peers.live_workers().items() if r.status == "running"}
            waited = self.clock() - started
            if len(live) >= cfg.supervisor.workers or waited >= cfg.supervisor.startup_timeout_s:
                log.info("swarm_starting", workers=sorted(live), waited_s=round(waited, 1))
                now = self.clock()
                return RoundState(experiment=cfg.experiment.name, round=0, stage=STAGE, started_at=now,
                                  updated_at=now, finished=False, max_rounds=cfg.experiment.max_rounds)
            self.heartbeat.progress("waiting_for_workers")
            self.peer.update(round_=0, status="starting")
            self.stop.sleep(self.poll_s)

    def wait_for_results(self, round_: int) -> None:
        """Until a known worker's result for ``round_`` lands (an event), or one poll interval."""
        results = self.layout.rewards_dir(round_, STAGE)
        try:
            self.store.makedirs(results)  # so it can be watched before the first worker creates it
        except (OSError, ValueError):
            pass  # the mount is away or the path is hostile: polling still works
        expected = {f"{w}.json" for w in self.peers.known_workers(scan=False)}
        # while a switch is pending, also wake when a worker's record says it started the new round
        armed = self.wakeup.watch([results] if self._switch is None else [results, self.layout.peers_dir()])
        if armed:
            return  # what landed before the watch raised no event: tick once more first
        self.stop.wait_for(self.wakeup, self.poll_s, wanted=expected.__contains__)

    def _follow_switch(self, live: dict, now: float) -> None:
        """Note which workers started the round the last advance began; log the switch once all did (or
        the round timed out)."""
        switch = self._switch
        if switch is None:
            return
        for name, record in live.items():
            seen_at = self.peers.changed_at(name)  # our clock: another host's may be minutes off
            if seen_at is not None:
                switch.observe(name, record.round, seen_at)
        if switch.complete or now - switch.advanced_at > self.config.coordinator.round_timeout_s:
            line = switch.line()
            log.info("round_switch", **line)
            try:
                self.store.append_jsonl(self.layout.round_switch_file(self.node_id),
                                        {"node_id": self.node_id, "timestamp": now, **line}, durable="later")
            except OSError as err:
                log.warning("round_switch_write_failed", error=str(err))
            self._switch = None

    def tick(self, state: RoundState) -> RoundState:
        """Look at submissions once; return the (possibly advanced) state."""
        cfg = self.config
        bind(round=state.round)
        now = self.clock()
        self.guard_state_file()
        live_records = self.peers.live_workers()
        live = set(live_records)
        self._follow_switch(live_records, now)
        submitted = self.submitted(state.round)
        self.heartbeat.progress("coordinating", round_=state.round, status="running")
        self.peer.update(round_=state.round, status="running")
        reason = decide_advance(cfg.coordinator.strategy, elapsed_s=now - state.started_at,
                                interval_s=cfg.coordinator.round_interval_s, timeout_s=cfg.coordinator.round_timeout_s,
                                live=live, submitted=submitted)
        if reason is None:
            return state
        next_round = state.round + 1
        finished = next_round >= cfg.experiment.max_rounds
        new = replace(state, round=next_round, started_at=now, updated_at=now, finished=finished,
                      max_rounds=cfg.experiment.max_rounds)
        seen = self._results.get(state.round, {})
        last_result = max((seen[w] for w in live & submitted), default=None)
        if not finished:
            self._note_stale_results(next_round)
        self._results = {}
        self.write_state(new)
        if not finished:
            self._switch = PendingSwitch(round=next_round, reason=reason, advanced_at=self.clock(),
                                         last_result_at=last_result if reason != "interval" else None,
                                         expected=frozenset(live))
        log.info("round_advanced", round=state.round, next_round=next_round, reason=reason,
                 submitted=sorted(submitted), live=sorted(live), finished=finished)
        if not finished and cfg.exchange.cleanup_enabled:
            report = apply_retention(self.store, next_round, enabled=True,
                                     keep_last_n=cfg.exchange.keep_last_n_rounds, archive=cfg.exchange.archive_old)
            log.info("retention_applied", deleted=report.deleted, archived=report.archived, errors=report.errors)
        return new


def _file_signature(st) -> tuple | None:
    """(mtime, size, inode) of an lstat result, None for a missing file."""
    return None if st is None else (st.st_mtime_ns, st.st_size, st.st_ino)
