"""The coordinator: sole writer of ``state/current_state.json``; it advances rounds and never trains.

Strategies (config ``coordinator.strategy``):
- ``time``: advance every ``round_interval_s``;
- ``completion``: advance when every live worker has submitted its round result;
- ``hybrid`` (default): completion, or ``round_timeout_s`` after the round started, whichever comes first.

Live means a peer record younger than the heartbeat timeout, so a dead worker never stalls a round. The
first round starts once the expected number of workers has registered (or after ``round_timeout_s``), so
a staggered start does not leave the last workers out of round 0. After ``max_rounds`` it writes a final
state (``finished: true``) and exits 0; restarted, it resumes from the state file and never goes back.
"""

from __future__ import annotations

import time
from dataclasses import replace

import structlog

from node.config import ExperimentConfig
from node.heartbeat import Heartbeat
from node.layout import ExperimentLayout
from node.logs import bind
from node.retention import apply_retention
from node.runtime import EXIT_FINISHED, EXIT_STOPPED, PeerRegistration, StopFlag, StopRequested, live_workers
from node.schemas import RoundResult, RoundState
from node.storage import SharedStore

log = structlog.get_logger(__name__)

STAGE = 0


def decide_advance(strategy: str, *, elapsed_s: float, interval_s: float, timeout_s: float,
                   live: set[str], submitted: set[str]) -> str | None:
    """Why the current round should end now (a short reason), or None to keep waiting. Pure."""
    complete = bool(submitted) and live <= submitted
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
                 heartbeat: Heartbeat, stop: StopFlag, clock=time.time):
        self.config, self.node_id, self.store, self.layout = config, node_id, store, layout
        self.heartbeat, self.stop, self.clock = heartbeat, stop, clock
        self.peer = PeerRegistration(store, layout, node_id, "coordinator", config.supervisor.heartbeat_interval_s)

    # --- state file ---------------------------------------------------------------------------------
    def load_state(self) -> RoundState | None:
        """The existing state, waiting out an unreachable mount (an outage must not look like round 0)."""
        while True:
            try:
                return self.store.read_as(self.layout.state_file(), RoundState.from_json, raise_unreachable=True,
                                          expect_experiment=self.config.experiment.name)
            except OSError as err:
                log.warning("state_unreachable", error=str(err))
                self.heartbeat.progress("state_unreachable")
                self.stop.sleep(self.config.coordinator.poll_interval_s * 5)

    def write_state(self, state: RoundState) -> None:
        """Write the state; retried until it lands (the coordinator is useless without it)."""
        while True:
            try:
                self.store.write_json_atomic(self.layout.state_file(), state.to_json(), retries=True)
                return
            except OSError as err:
                log.warning("state_write_failed", error=str(err))
                self.heartbeat.progress("state_write_failed")
                self.stop.sleep(self.config.coordinator.poll_interval_s * 5)

    def submitted(self, round_: int) -> set[str]:
        """Workers with a valid round result for ``round_``."""
        names = set()
        for path in self.store.list_json(self.layout.rewards_dir(round_, STAGE)):
            if self.store.read_as(path, RoundResult.from_json, expect_round=round_, expect_stage=STAGE,
                                  expect_node=path.stem) is not None:
                names.add(path.stem)
        return names

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
                return EXIT_FINISHED
            else:
                log.info("coordinator_resumed", round=state.round)
                state = self.resume(state)
            while not state.finished:
                state = self.tick(state)
                self.stop.sleep(cfg.coordinator.poll_interval_s)
            self.peer.update(round_=state.round, status="finished", force=True)
            return EXIT_FINISHED
        except StopRequested as stop:
            log.info("coordinator_stopping", signal=str(stop))
            self.peer.update(round_=-1, status="stopping", force=True)
            return EXIT_STOPPED

    def resume(self, state: RoundState) -> RoundState:
        """After a crash or a host restart: hold the current round until the workers that were active
        before (those with a result for this or the previous round) have refreshed their peer record since
        we resumed (a record from before a kill may still look live), or ``round_timeout_s`` passed, then
        restart the round's clock. Otherwise the first worker up would race through the rounds
        alone while the others start (staggered, minutes for large models), and a round begun before a long
        outage would time out before anyone could train it. Round 0 waits as at the start."""
        cfg = self.config
        if state.round == 0:
            self.wait_for_workers()
        else:
            expected = self.submitted(state.round - 1) | self.submitted(state.round)
            started = self.clock()
            while True:
                live = {name for name, record in live_workers(self.store, self.layout,
                                                              cfg.supervisor.heartbeat_timeout_s).items()
                        if record.heartbeat_at >= started}
                waited = self.clock() - started
                if expected <= live or waited >= cfg.coordinator.round_timeout_s:
                    log.info("swarm_resuming", round=state.round, expected=sorted(expected), live=sorted(live),
                             waited_s=round(waited, 1))
                    break
                self.heartbeat.progress("waiting_for_workers", round_=state.round)
                self.peer.update(round_=state.round, status="running")
                self.stop.sleep(cfg.coordinator.poll_interval_s)
        now = self.clock()
        state = replace(state, started_at=now, updated_at=now)
        self.write_state(state)
        return state

    def wait_for_workers(self) -> RoundState:
        """Hold round 0 until the expected workers registered, or ``round_timeout_s`` passed."""
        cfg = self.config
        started = self.clock()
        while True:
            live = live_workers(self.store, self.layout, cfg.supervisor.heartbeat_timeout_s)
            waited = self.clock() - started
            if len(live) >= cfg.supervisor.workers or waited >= cfg.coordinator.round_timeout_s:
                log.info("swarm_starting", workers=sorted(live), waited_s=round(waited, 1))
                now = self.clock()
                return RoundState(experiment=cfg.experiment.name, round=0, stage=STAGE, started_at=now,
                                  updated_at=now, finished=False, max_rounds=cfg.experiment.max_rounds)
            self.heartbeat.progress("waiting_for_workers")
            self.peer.update(round_=0, status="starting")
            self.stop.sleep(cfg.coordinator.poll_interval_s)

    def tick(self, state: RoundState) -> RoundState:
        """Look at submissions once; return the (possibly advanced) state."""
        cfg = self.config
        bind(round=state.round)
        now = self.clock()
        live = set(live_workers(self.store, self.layout, cfg.supervisor.heartbeat_timeout_s, now=now))
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
        self.write_state(new)
        log.info("round_advanced", round=state.round, next_round=next_round, reason=reason,
                 submitted=sorted(submitted), live=sorted(live), finished=finished)
        if not finished and cfg.exchange.cleanup_enabled:
            report = apply_retention(self.store, next_round, enabled=True,
                                     keep_last_n=cfg.exchange.keep_last_n_rounds, archive=cfg.exchange.archive_old)
            log.info("retention_applied", deleted=report.deleted, archived=report.archived, errors=report.errors)
        return new
