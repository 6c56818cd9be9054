"""The worker loop: one SAPO round per coordinator round (DESIGN.md §4).

    wait for the coordinator's round r
    sample I questions -> generate G each -> publish -> wait (bounded) for live peers' files of round r
    -> fetch + validate -> pick J external groups (re-scored locally) -> GRPO step
    -> round result + metrics line -> checkpoint every K rounds -> held-out eval every K' rounds (and at the end)

If the coordinator moved on while we were busy, we join the newest round and log the skipped ones.
SIGTERM/SIGINT: finish nothing more, checkpoint the last completed round, exit 143.
"""

from __future__ import annotations

import contextlib

import hashlib
import random
import time

import structlog
import torch

from node.checkpoint import load_latest_checkpoint, save_checkpoint
from node.config import ExperimentConfig
from node.exchange import STAGE, Publisher, fetch_shared_groups, peer_files_present
from node.heartbeat import Heartbeat
from node.layout import ExperimentLayout
from node.logs import bind
from node.mounts import poll_interval
from node.records import RunRecords
from node.liveness import PeerTracker
from node.wakeup import Wakeup, events_disabled
from node.plausible import state_problem
from node.runtime import EXIT_FINISHED, EXIT_STOPPED, PeerRegistration, StopFlag, StopRequested
from node.schemas import RoundResult, RoundState
from node.storage import SharedStore
from sapo.evaluate import evaluate, heldout_questions
from sapo.learner import SapoLearner, mean_reward

log = structlog.get_logger(__name__)


def derived_seed(*parts) -> int:
    """A 63-bit seed from (experiment seed, node id, round, purpose): stable across runs and restarts."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class Worker:
    """One training node."""

    def __init__(self, config: ExperimentConfig, node_id: str, *, store: SharedStore, layout: ExperimentLayout,
                 learner: SapoLearner, heartbeat: Heartbeat, stop: StopFlag, peer: PeerRegistration):
        self.config, self.node_id, self.store, self.layout = config, node_id, store, layout
        self.learner, self.heartbeat, self.stop, self.peer = learner, heartbeat, stop, peer
        self.publisher = Publisher(store, layout, node_id, config.exchange.publish_frequency)
        self.records = RunRecords(store, layout, node_id)
        self.last_done = -1  # the last round whose training step is in the weights
        self.last_checkpoint = -1
        self.peers = PeerTracker(store, layout, config.supervisor.heartbeat_timeout_s,
                                 rng=random.Random(derived_seed(config.experiment.seed, node_id, "peers")))
        self.last_state: RoundState | None = None  # the last state accepted (states never go back)
        self._refused_state: str | None = None
        self._rejected_seen = dict(store.rejected)
        self.wakeup = Wakeup(enabled=not events_disabled())  # waits end when the file lands, not at the poll
        self.poll_s = poll_interval(config)
        self._heldout = None  # the held-out questions, built at the first eval

    # --- start and stop -----------------------------------------------------------------------------
    def resume(self) -> None:
        """Load the newest good checkpoint, if any."""
        params = sum(p.numel() * p.element_size() for p in self.learner.model.parameters())
        restored = load_latest_checkpoint(self.store, self.layout, self.node_id, self.learner.model,
                                          self.learner.optimizer, max_bytes=4 * params + (64 << 20))
        if restored is not None:
            self.last_done = self.last_checkpoint = restored.round
            if self.learner.adaptive is not None and isinstance(restored.extra.get("adaptive_ij"), dict):
                self.learner.adaptive.load_state_dict(restored.extra["adaptive_ij"])
            self.records.event("resumed", round=restored.round)
        else:
            self.records.event("started")

    def checkpoint(self) -> None:
        """Checkpoint the last completed round (once)."""
        if self.last_done < 0 or self.last_checkpoint == self.last_done:
            return
        extra = {"adaptive_ij": self.learner.adaptive.state_dict()} if self.learner.adaptive is not None else {}
        ok = save_checkpoint(self.store, self.layout, self.node_id, self.last_done, self.learner.model,
                             self.learner.optimizer, keep_last=self.config.checkpoint.keep_last, extra=extra)
        if ok:
            self.last_checkpoint = self.last_done
            self.records.event("checkpoint", round=self.last_done)

    def warmup(self):
        """``sapo.warmup``: one worst-case round before the first real one (see SapoLearner.warmup).

        ``auto`` runs it on CUDA only. An out-of-memory error splits its generate into more calls and its
        training pass into smaller micro-batches, which the real rounds then keep; only one that survives
        a single prompt per call and a single row per micro-batch crashes the worker now, in its first
        minute (the supervisor reports it as cuda_oom). Returns the stats, or None when it is off.
        """
        if not self.learner.config.warmup:  # the learner decided "auto" for its device
            return None
        self.heartbeat.progress("warmup", status="running")
        t = time.perf_counter()
        stats = self.learner.warmup()
        seconds = round(time.perf_counter() - t, 3)
        fields = {"seconds": seconds, "generate_s": round(stats.generate_s, 3), "train_s": round(stats.train_s, 3),
                  "sequences_generated": stats.sequences_generated, "sequences_trained": stats.sequences_trained,
                  "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
                  "micro_batch_size": stats.micro_batch_size, "micro_batch_tokens": stats.micro_batch_tokens,
                  "generate_calls": stats.generate_calls, "oom_halvings": stats.oom_halvings,
                  "gpu_peak_bytes": stats.peak_bytes}
        self.records.event("warmup", **fields)
        log.info("warmup_done", **fields)
        return stats

    def run(self) -> int:
        """Train until the coordinator's final state; returns the process exit code."""
        try:
            self.resume()
            self.warmup()
            if self.eval_due(self.last_done):  # an eval a crash or stop cut short: the weights are its round's
                self.evaluate(self.last_done)
            while True:
                state = self.wait_for_round()
                self.log_skipped(state.round)
                if state.finished:
                    self.checkpoint()
                    self.evaluate(self.last_done, final=True)
                    self.records.event("finished", round=self.last_done)
                    self.peer.update(round_=self.last_done, status="finished", force=True)
                    self.heartbeat.progress("finished", status="finished")
                    log.info("experiment_finished", last_round=self.last_done)
                    return EXIT_FINISHED
                self.run_round(state.round)
                self.last_done = state.round
                if (state.round + 1) % self.config.checkpoint.every_rounds == 0:
                    self.checkpoint()
                if self.eval_due(state.round):
                    self.evaluate(state.round)
        except StopRequested as stop:
            log.info("worker_stopping", signal=str(stop), last_round=self.last_done)
            self.heartbeat.progress("stopping", status="stopping")
            self.checkpoint()
            self.records.event("stopped", signal=str(stop), round=self.last_done)
            self.peer.update(round_=self.last_done, status="stopping", force=True)
            return EXIT_STOPPED

    # --- held-out evaluation -----------------------------------------------------------------------
    def eval_due(self, round_: int) -> bool:
        """The ``eval`` section asks for an eval after ``round_`` (every K rounds: (round + 1) % K == 0)."""
        every = self.config.eval.every_rounds
        return every > 0 and round_ >= 0 and (round_ + 1) % every == 0

    def evaluate(self, round_: int, *, final: bool = False) -> dict | None:
        """Held-out pass@1 of the weights trained up to ``round_`` (:mod:`sapo.evaluate`), within
        ``eval.time_budget_s``, appended to ``logs/<node>/evals.jsonl``: at most once per round, also across
        restarts. ``final`` marks the weights the run ends with (also true for the last round of the run).
        Returns the line's fields; None when evals are off, nothing was trained yet, or the round already has
        its line (at the end of a run whose last round was already evaluated, nothing is repeated)."""
        cfg, sapo = self.config.eval, self.learner.config
        if cfg.every_rounds == 0 or round_ < 0 or round_ in self.records.evaluated_rounds:
            return None
        if self._heldout is None:
            self._heldout = heldout_questions(self.learner.bank, cfg.seed, cfg.questions_per_task)

        def tick():  # before each batch: a stop is noticed, the supervisor sees progress
            self.stop.check()
            self.heartbeat.progress("eval", round_=round_)

        # as many prompts per batch as a round's generate holds rows (it fits in memory), after any halving
        rows = sapo.num_train_samples * sapo.num_generations // self.learner.generate_split.calls
        result = evaluate(self.learner.model, self.learner.tokenizer, self.learner.bank, self._heldout,
                          max_new_tokens=cfg.max_new_tokens or sapo.max_new_tokens,
                          max_prompt_tokens=sapo.max_prompt_tokens, batch_size=max(1, rows),
                          time_budget_s=cfg.time_budget_s, decode=sapo.decode, autocast=self.learner.autocast,
                          on_batch=tick)
        # final: the weights the run ends with (its last round, or whatever round was last at the end)
        final = final or round_ >= self.config.experiment.max_rounds - 1
        fields = {"final": final, **result.to_json()}
        self.records.eval(round_, fields)
        log.info("eval_done", eval_round=round_, final=final, seconds=fields["seconds"], complete=fields["complete"],
                 accuracy={name: t["accuracy"] for name, t in fields["tasks"].items()})
        return fields

    def log_skipped(self, joined: int) -> None:
        """Record the rounds before ``joined`` we never trained (we were down or behind; also when the run
        finished meanwhile). A round trained before a crash that came before its checkpoint already has its
        metrics line: it was not skipped."""
        skipped = [r for r in range(self.last_done + 1, joined) if r not in self.records.recorded_rounds]
        if skipped:
            self.records.event("rounds_skipped", rounds=skipped, joined=joined)
            log.warning("rounds_skipped", rounds=skipped, joined=joined)

    def read_state(self) -> RoundState | None:
        """The coordinator's state, or None while it is absent, unreadable, unsigned or implausible (a round
        beyond max_rounds, "finished" too early, a round going back: see node.plausible), one warning each
        time the refused state changes."""
        state = self.store.read_as(self.layout.state_file(), RoundState.from_json,
                                   expect_experiment=self.config.experiment.name)
        if state is None:
            return None
        problem = state_problem(state, max_rounds=self.config.experiment.max_rounds, previous=self.last_state)
        if problem:
            if problem != self._refused_state:
                log.warning("state_refused", reason=problem, round=state.round)
                self._refused_state = problem
            return None
        self._refused_state = None
        self.last_state = state
        return state

    def wait_for_round(self) -> RoundState:
        """Block until the coordinator's round is one we have not trained yet, or the run is over."""
        poll = self.poll_s  # file events end the wait sooner
        state_file = self.layout.state_file()
        while True:
            self.stop.check()
            self.wakeup.watch([state_file.parent])
            state = self.read_state()
            if state is not None and (state.finished or state.round > self.last_done):
                return state
            self.heartbeat.progress("waiting_for_round", round_=self.last_done)
            self.peer.update(round_=max(self.last_done, 0), status="running")
            self.store.flush_spool(attempts=1)
            self.stop.wait_for(self.wakeup, poll, wanted=lambda name: name == state_file.name)

    # --- one round ----------------------------------------------------------------------------------
    def run_round(self, round_: int) -> dict:
        """Train one round; returns its metrics line."""
        bind(round=round_)
        self.peer.update(round_=round_, status="running", force=True)
        timings: dict[str, float] = {}
        t_round = time.perf_counter()
        local, gen = self._local_groups(round_, timings)
        self.stop.check()
        selection, rejected, published, missing = self._external_groups(round_, local, timings)
        self.stop.check()
        self.heartbeat.progress("train", round_=round_)
        stats = self.learner.train(local + selection.groups)
        timings["train_s"] = stats.seconds
        timings["round_s"] = time.perf_counter() - t_round
        result = RoundResult(node_id=self.node_id, round=round_, stage=STAGE, mean_reward=mean_reward(local),
                             num_local_groups=len(local), num_external_groups=len(selection.groups),
                             submitted_at=time.time())
        # visible now, fsynced just after: the coordinator is waiting for it (node.bgsync)
        self.store.publish(self.layout.reward_file(round_, STAGE, self.node_id), result.to_json(), durable="later")
        metrics = metrics_line(local, selection, rejected, published, gen, stats, timings)
        metrics["files_rejected"] = self._rejections_since_last_round()
        metrics["peer_files_missing"] = len(missing)
        if self.learner.adaptive is not None:  # I/J moved by the reward trend: this round's and the next's
            metrics["adaptive_ij"] = {"used": [len(local), self.learner.split[1]],
                                      "next": list(self.learner.adapt(mean_reward(local + selection.groups)))}
        self.records.metrics(round_, metrics)
        if metrics["oom_halvings"]:
            log.warning("out_of_memory_recovered", halvings=metrics["oom_halvings"], generate_calls=gen.calls,
                        micro_batch_size=stats.micro_batch_size, micro_batch_tokens=stats.micro_batch_tokens)
        log.info("round_done", reward_local=round(metrics["reward_local"], 4),
                 external=len(selection.groups), seconds=round(timings["round_s"], 3))
        return metrics

    def _local_groups(self, round_: int, timings: dict):
        """This round's I questions, G completions each, scored: (groups, GenerateStats)."""
        self.heartbeat.progress("generate", round_=round_, status="running")
        with phase(timings, "sample_s"):
            questions = self.learner.sample_questions(self.node_id, round_)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        seed = derived_seed(self.config.experiment.seed, self.node_id, round_, "sample")
        local, gen = self.learner.generate(questions, seed=seed, source=self.node_id)
        timings["generate_s"], timings["score_s"] = gen.generate_s, gen.score_s
        return local, gen

    def _external_groups(self, round_: int, local, timings: dict):
        """Publish ours, wait (bounded) for the peers', take J of theirs: (selection, files rejected, published, live
        peers whose file had not landed by the fetch: skipped this round)."""
        cfg = self.config
        self.heartbeat.progress("publish", round_=round_)
        with phase(timings, "publish_s"):
            published = self.publisher.publish(local, round_)
        with phase(timings, "wait_s"):
            missing = self.wait_for_peers(round_)
        self.heartbeat.progress("fetch", round_=round_)
        if missing:  # a file that landed since the wait ended is fetched (and used) all the same
            missing -= peer_files_present(self.store, self.layout, round_, missing)
        shared, rejected = ([], 0)
        with phase(timings, "fetch_s"):
            if cfg.sapo.num_transplant_trees > 0:
                rng = random.Random(derived_seed(cfg.experiment.seed, self.node_id, round_, "peers"))
                shared, rejected = fetch_shared_groups(self.store, self.layout, round_, self.node_id,
                                                       cfg.exchange.fetch_max_peers,
                                                       peers=self.peers.known_workers() - {self.node_id}, rng=rng)
        with phase(timings, "select_s"):
            rng = random.Random(derived_seed(cfg.experiment.seed, self.node_id, round_, "external"))
            selection = self.learner.select_external(shared, self.node_id, rng)
        for peer_id, batch_id, reason in selection.suspicious:  # a peer lied: one warning per group
            log.warning("peer_group_rejected" if reason != "reward_disagreement" else "peer_reward_disagreement",
                        peer=peer_id, batch_id=batch_id, reason=reason,
                        used=reason == "reward_disagreement")
        return selection, rejected, published, missing

    def _rejections_since_last_round(self) -> dict[str, int]:
        """Shared-dir files (and lines) refused since the last metrics line, per reason."""
        now = dict(self.store.rejected)
        delta = {k: v - self._rejected_seen.get(k, 0) for k, v in now.items() if v > self._rejected_seen.get(k, 0)}
        self._rejected_seen = now
        return delta

    def wait_for_peers(self, round_: int) -> set[str]:
        """Wait, bounded, until every live peer published round ``round_`` (or the round moved on). Returns the
        live peers whose file had not appeared when the wait ended (a slow or lagging mount, a peer on another
        host): the round never waits longer for them; files still absent at the fetch are skipped and counted
        (``peer_files_missing``)."""
        cfg = self.config
        if cfg.sapo.num_transplant_trees == 0:
            return set()
        deadline = time.monotonic() + cfg.exchange.fetch_timeout_s
        state_file = self.layout.state_file()
        missing: set[str] = set()
        while time.monotonic() < deadline:
            self.wakeup.watch([self.layout.rollouts_dir(round_, STAGE), state_file.parent])
            live = set(self.peers.live_workers()) - {self.node_id}
            missing = live - peer_files_present(self.store, self.layout, round_, live)
            if not missing:
                return missing
            state = self.read_state()
            if state is not None and (state.finished or state.round > round_):
                return missing
            self.heartbeat.progress("waiting_for_peers", round_=round_)
            self.peer.update(round_=round_, status="running")
            waiting_for = {f"{peer}.json" for peer in missing} | {state_file.name}
            self.stop.wait_for(self.wakeup, min(0.25, self.poll_s), wanted=waiting_for.__contains__)
        log.info("peer_wait_timed_out", round=round_, missing=sorted(missing)[:20], count=len(missing))
        return missing


@contextlib.contextmanager
def phase(timings: dict, name: str):
    """Time the block into ``timings[name]`` (seconds)."""
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - t


def metrics_line(local, selection, rejected: int, published, gen, stats, timings: dict) -> dict:
    """One round's metrics line (logs/<node>/metrics.jsonl): rewards, exchange counts, the step, timings."""
    metrics = {
        "reward_local": mean_reward(local),
        "reward_external": mean_reward(selection.groups) if selection.groups else None,
        "num_local_groups": len(local),
        "num_external_groups": len(selection.groups),
        "external_candidates": selection.candidates,
        "external_dropped": dict(selection.dropped),
        "peer_reward_disagreements": selection.reward_disagreements,
        "peer_files_rejected": rejected,
        "published": published,
        "loss": stats.loss, "pg_loss": stats.pg_loss, "kl": stats.kl, "clip_fraction": stats.clip_fraction,
        "grad_norm": stats.grad_norm, "optimizer_steps": stats.optimizer_steps, "skipped_step": stats.skipped,
        "micro_batch_size": stats.micro_batch_size, "micro_batch_tokens": stats.micro_batch_tokens,
        "generate_calls": gen.calls, "oom_halvings": gen.oom_halvings + stats.oom_halvings,
        "tokens_generated": gen.generated_tokens, "tokens_prompt": gen.prompt_tokens,
        "tokens_trained": stats.completion_tokens,
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }
    if torch.cuda.is_available():
        metrics["gpu_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        metrics["gpu_reserved_peak_bytes"] = int(torch.cuda.max_memory_reserved())
        # The allocator freed its cache and retried (a synchronising cudaFree): a worker running at its
        # memory cap pays this every round. Cumulative since start; a rising count means too little room.
        metrics["gpu_alloc_retries"] = int(torch.cuda.memory_stats().get("num_alloc_retries", 0))
    return metrics
