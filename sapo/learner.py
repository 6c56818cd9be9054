"""One node's learner: sample local groups, take external ones, take the GRPO step.

A round, as the node loop drives it (see DESIGN.md §4)::

    questions = learner.sample_questions(node_id, round)            # I questions
    local = learner.generate(questions, seed=...)                    # I groups of G, scored locally
    ... publish local, fetch peers' SharedGroups ...
    chosen = learner.select_external(shared, own_id, rng)            # J groups, re-scored locally
    stats = learner.train(local + chosen.groups)                     # one (or k) optimizer steps

No I/O here; timings are measured with ``time.perf_counter`` and returned as metrics.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from dataclasses import dataclass, field
import torch

from sapo.adaptive import AdaptiveIJ
from sapo.batch import (
    TrainBatch,
    build_batch,
    completion_log_probs,
    head_split_matches,
    padded_tokens,
    predicted_positions,
    token_advantages,
)
from sapo.config import SapoConfig
from sapo.grpo import clipped_policy_loss, ragged_group_advantages
from sapo.oom import GenerateSplit, MicroBatchLimits, retry_on_oom
from sapo.optim import enable_activation_checkpointing, make_optimizer
from sapo.rollouts import Completion, Group, encode_prompt, make_static_cache, max_positions, sample_completions
from sapo.swarm import Selection, SharedGroup, rebuild_group, select_external
from sapo.tasks import Question, TaskBank, build_prompt


@dataclass
class TrainStats:
    """What one training step did, for the metrics line."""

    loss: float = 0.0
    pg_loss: float = 0.0
    kl: float = 0.0
    clip_fraction: float = 0.0
    grad_norm: float = 0.0
    sequences: int = 0
    completion_tokens: int = 0
    micro_batch_size: int = 0  # rows of the largest micro-batch
    micro_batch_tokens: int = 0  # padded tokens of the largest micro-batch
    optimizer_steps: int = 0
    oom_halvings: int = 0  # out-of-memory retries with smaller micro-batches during this call
    skipped: str = ""  # why no step was taken (e.g. no group had signal)
    seconds: float = 0.0


@dataclass
class GenerateStats:
    """What sampling a round's local groups did."""

    generated_tokens: int = 0
    prompt_tokens: int = 0
    generate_s: float = 0.0
    score_s: float = 0.0
    calls: int = 1  # generate calls the prompts were split into (more after an out-of-memory)
    oom_halvings: int = 0
    timings: dict = field(default_factory=dict)


class SapoLearner:
    """A policy, its optimiser and the task bank; the algorithm side of one worker.

    ``config`` may hold ``auto`` values; they are decided here for the model's device (``self.config`` is
    the resolved copy). Out-of-memory errors shrink the work instead of crashing (:mod:`sapo.oom`).
    """

    def __init__(self, model, tokenizer, config: SapoConfig, *, experiment_seed: int = 0, bank: TaskBank | None = None,
                 autocast: torch.dtype | None = None):
        self.model = model
        self.autocast_dtype = autocast  # forward passes under torch.autocast in this dtype (None = off)
        self.experiment_seed = experiment_seed
        self.tokenizer = tokenizer
        self.config = config.resolved(self.device.type)
        self.bank = bank if bank is not None else TaskBank(config.tasks)
        # No dropout: the ratio old/new must compare the same function (TRL's GRPO disables it too).
        self.model.eval()
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer_kind = config.optimizer
        if self.optimizer_kind == "auto":
            self.optimizer_kind = "adamw_sr" if params and params[0].dtype == torch.bfloat16 else "adam"
        self.optimizer = make_optimizer(params, kind=self.optimizer_kind, lr=config.learning_rate,
                                        weight_decay=config.weight_decay, seed=experiment_seed)
        self.reference = None
        if config.kl_beta > 0:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        # After the reference copy: it only runs without gradients, where checkpointing does nothing.
        self.checkpointing = bool(self.config.gradient_checkpointing) and enable_activation_checkpointing(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Logits for completion tokens only, through the output head in chunks, when the model is body + head.
        self.split_head = head_split_matches(model)
        # What out-of-memory errors shrink: training micro-batches, and generate's batch.
        self.micro = MicroBatchLimits(self.config.micro_batch_size, self.config.micro_batch_tokens,
                                      self.config.oom_regrow_rounds)
        self.generate_split = GenerateSplit(self.config.oom_regrow_rounds)
        self._static_caches: dict[int, object] = {}  # rows -> the KV cache reused by every compiled generate
        # I and J of the next round: the config's, or moved by the reward trend (sapo.adaptive)
        total = self.config.num_train_samples + self.config.num_transplant_trees
        self.adaptive = (AdaptiveIJ(total=total, j=self.config.num_transplant_trees, alpha=config.adaptive_ij_alpha,
                                    beta=config.adaptive_ij_beta) if config.adaptive_ij else None)

    @property
    def split(self) -> tuple[int, int]:
        """(I, J) for the next round."""
        if self.adaptive is None:
            return self.config.num_train_samples, self.config.num_transplant_trees
        return self.adaptive.split

    def adapt(self, reward: float) -> tuple[int, int]:
        """Feed a round's mean training reward to adaptive I/J (when on); the (I, J) of the next round."""
        if self.adaptive is not None:
            self.adaptive.update(reward)
        return self.split

    def autocast(self):
        """The mixed-precision context for forward passes (a no-op context when off)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    @property
    def device(self) -> torch.device:
        """Where the policy's parameters live."""
        return next(self.model.parameters()).device

    # --- local groups -------------------------------------------------------------------------------
    def sample_questions(self, node_id: str, round_: int) -> list[Question]:
        """The I questions of this node and round: the same on every run and after a restart."""
        return self.bank.sample(self.experiment_seed, node_id, round_, self.split[0])

    def prompt_for(self, question_text: str) -> str:
        """The prompt text every node builds for a question (peers' prompts are checked against it)."""
        return build_prompt(question_text, self.tokenizer)

    def generate(self, questions: list[Question], *, seed: int | None = None, source: str = "") -> tuple[list[Group], GenerateStats]:
        """G completions for each question in one batched generate, each scored by its task."""
        cfg = self.config
        prompts = [self.prompt_for(q.text) for q in questions]
        prompt_ids = [encode_prompt(self.tokenizer, p, cfg.max_prompt_tokens) for p in prompts]
        stats = GenerateStats()
        t0 = time.perf_counter()
        sampled = self.sample(prompt_ids, seed=seed, new_tokens=cfg.max_new_tokens, stats=stats)
        t1 = time.perf_counter()
        groups = []
        for i, (question, prompt, ids, completions) in enumerate(zip(questions, prompts, prompt_ids, sampled)):
            rewards = [self.bank.score(question, c.text, cfg.format_reward) for c in completions]
            groups.append(Group(question, prompt, ids, completions, rewards, source=source, batch_id=str(i)))
        t2 = time.perf_counter()
        stats.generated_tokens = sum(len(c.token_ids) for g in groups for c in g.completions)
        stats.prompt_tokens = sum(len(ids) for ids in prompt_ids) * cfg.num_generations
        stats.generate_s, stats.score_s = t1 - t0, t2 - t1
        return groups, stats

    def sample(self, prompt_ids: list[list[int]], *, seed: int | None, new_tokens: int,
               stats: GenerateStats | None = None, min_new_tokens: int | None = None) -> list[list[Completion]]:
        """G completions per prompt, over ``generate_split.calls`` calls; an out-of-memory error doubles them.

        The RNG is seeded once per attempt, so a given number of calls always samples the same tokens.
        """
        stats = stats if stats is not None else GenerateStats()
        cfg = self.config

        def attempt():
            out = []
            with self.autocast():
                for k, chunk in enumerate(self.generate_split.chunks(prompt_ids)):
                    out += sample_completions(
                        self.model, self.tokenizer, chunk, num_generations=cfg.num_generations,
                        max_new_tokens=new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        seed=seed if k == 0 else None, cache=self._static_cache(len(chunk) * cfg.num_generations),
                        min_new_tokens=min_new_tokens, decode=cfg.decode,
                    )
            return out

        halvings_before = stats.oom_halvings
        sampled = retry_on_oom(attempt, lambda: self.generate_split.shrink(len(prompt_ids)),
                               lambda: self._after_oom(stats))
        stats.calls = self.generate_split.calls
        if self.generate_split.round_done(stats.oom_halvings > halvings_before):
            self._static_caches.clear()  # the old batch shape's cache would only hold memory
        return sampled

    def static_cache_len(self) -> int | None:
        """KV-cache positions for ``sapo.compile_generate`` (None: the default dynamic cache).

        One size for every round (the longest prompt plus the longest completion, within the model's
        positions), so the compiled decoding step never sees a new shape.
        """
        cfg = self.config
        if not cfg.compile_generate:
            return None
        length = cfg.max_prompt_tokens + cfg.max_new_tokens
        limit = max_positions(self.model)
        return min(length, limit) if limit else length

    def _static_cache(self, rows: int):
        """The KV cache for a generate of ``rows`` sequences: one object per batch size, reused every round.

        transformers would build a new static cache per call; its tensors are marked as static addresses
        for CUDA graphs, so new ones each round mean a re-recording per round, and torch stops re-recording
        after a limit (128) and runs the step without graphs from then on. One cache, reset before each
        use, keeps the addresses and the recorded graph.
        """
        length = self.static_cache_len()
        if length is None:
            return None
        if rows not in self._static_caches:
            self._static_caches[rows] = make_static_cache(self.model, rows, length)
        return self._static_caches[rows]

    # --- start-up warm-up ---------------------------------------------------------------------------
    def warmup(self):
        """The worst case of a round once, before the first one: see :func:`sapo.warmup.run_warmup`."""
        from sapo.warmup import run_warmup

        return run_warmup(self)

    # --- external groups ----------------------------------------------------------------------------
    def rebuild_external(self, shared: SharedGroup) -> Group | str:
        """One peer group re-scored with our tasks and tokenizer, or why it was dropped."""
        cfg = self.config
        return rebuild_group(
            shared,
            bank=self.bank,
            experiment_seed=self.experiment_seed,
            tokenizer=self.tokenizer,
            build_prompt=self.prompt_for,
            num_generations=cfg.num_generations,
            max_new_tokens=cfg.max_new_tokens,
            max_prompt_tokens=cfg.max_prompt_tokens,
            format_reward=cfg.format_reward,
        )

    def select_external(self, shared: list[SharedGroup], own_id: str, rng: random.Random) -> Selection:
        """J external groups from peers' shared groups (never our own), re-scored locally."""
        return select_external(
            shared, own_id=own_id, count=self.split[1], rng=rng, rebuild=self.rebuild_external
        )

    # --- the GRPO step ------------------------------------------------------------------------------
    def train(self, groups: list[Group]) -> TrainStats:
        """GRPO on these groups: advantages per group, then ``optimizer_steps_per_round`` steps."""
        t0 = time.perf_counter()
        stats = TrainStats(sequences=sum(len(g.completions) for g in groups))
        # The loss is a mean over every completion token of the round's batch (zero-signal groups
        # included). With beta = 0 a zero-advantage row adds exactly nothing to the gradient, so we
        # count its tokens in the normaliser but skip its forward pass.
        total_tokens = sum(len(c.token_ids) for g in groups for c in g.completions)
        used = groups if self.reference is not None else [g for g in groups if g.is_informative]
        if not used:
            stats.skipped = "no_signal"  # every advantage is 0: the gradient is exactly zero
            stats.seconds = time.perf_counter() - t0
            return stats
        advantages = ragged_group_advantages([g.rewards for g in used])
        batch = build_batch(used, advantages, self.pad_id).to(self.device)
        stats.completion_tokens = total_tokens
        old_logp = None
        if self.config.optimizer_steps_per_round > 1:
            old_logp = retry_on_oom(lambda: self._batch_log_probs(batch), lambda: self.micro.shrink(batch.lengths),
                                    lambda: self._after_oom(stats))
        for _ in range(self.config.optimizer_steps_per_round):
            self.step_with_oom_fallback(batch, old_logp, total_tokens, stats)
        self.micro.round_done(stats.oom_halvings > 0)
        stats.seconds = time.perf_counter() - t0
        return stats

    @contextlib.contextmanager
    def _checkpointed(self):
        """Train mode for the gradient pass when checkpointing (transformers checkpoints only in train mode;
        every dropout is 0, so it computes what eval mode does); a no-op otherwise."""
        if not self.checkpointing:
            yield
            return
        self.model.train()
        try:
            yield
        finally:
            self.model.eval()

    def _after_oom(self, stats) -> None:
        """After a failed attempt: count it, drop partial gradients, give cached blocks back to the device."""
        stats.oom_halvings += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def _batch_log_probs(self, batch: TrainBatch) -> torch.Tensor:
        """(K,) log-probs of every completion token under the current policy (the multi-step path's old policy)."""
        with self.autocast():
            parts = [completion_log_probs(self.model, batch.rows(a, b), self.config.temperature,
                                          split_head=self.split_head) for a, b in self.micro.plan(batch.lengths)]
        return torch.cat(parts)

    def step_with_oom_fallback(self, batch: TrainBatch, old_logp, total_tokens: int, stats: TrainStats,
                               step: bool = True) -> None:
        """:meth:`_step`, halving the micro-batches after each out-of-memory error (raised at one row each)."""
        retry_on_oom(lambda: self._step(batch, old_logp, total_tokens, stats, step=step),
                     lambda: self.micro.shrink(batch.lengths), lambda: self._after_oom(stats))

    def _step(self, batch: TrainBatch, old_logp: torch.Tensor | None, total_tokens: int, stats: TrainStats,
              step: bool = True) -> None:
        """Forward/backward over the micro-batches, then one optimizer step (``step=False``: the warm-up's
        dry run, which drops the gradients instead)."""
        cfg = self.config
        ranges = self.micro.plan(batch.lengths)
        mask, _ = predicted_positions(batch)
        offsets = [0] + torch.cumsum(mask.sum(dim=1), 0).tolist()  # row -> first of its tokens in old_logp
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = pg_sum = kl_sum = clip_weighted = 0.0
        for start, stop in ranges:
            micro = batch.rows(start, stop)
            with self.autocast(), self._checkpointed():  # forward only; backward runs outside, as autocast wants
                logp = completion_log_probs(self.model, micro, cfg.temperature, split_head=self.split_head)  # (k,)
                ref_logp = None
                if self.reference is not None:
                    with torch.no_grad():
                        ref_logp = completion_log_probs(self.reference, micro, cfg.temperature,
                                                        split_head=self.split_head)
            old = old_logp[offsets[start]:offsets[stop]] if old_logp is not None else logp.detach()
            parts = clipped_policy_loss(
                logp, old, token_advantages(micro), torch.ones_like(logp),
                eps_low=cfg.clip_eps_low, eps_high=cfg.clip_eps_high,
                ref_logp=ref_logp, beta=cfg.kl_beta, normalizer=float(max(total_tokens, 1)),
            )
            parts.loss.backward()  # gradients accumulate across micro-batches; the normaliser is global
            loss_sum += float(parts.loss.detach())
            pg_sum += parts.pg_loss
            kl_sum += parts.kl
            clip_weighted += parts.clip_fraction * parts.tokens
        stats.micro_batch_size = max(stop - start for start, stop in ranges)
        stats.micro_batch_tokens = padded_tokens(batch.lengths, ranges)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not step:
            if not self.optimizer.state and self.device.type == "cuda":
                # Adam creates exp_avg and exp_avg_sq at its first step: hold their size once, with the grads.
                held = [torch.empty_like(p) for p in params for _ in range(2)]
                del held
            self.optimizer.zero_grad(set_to_none=True)
            return
        if cfg.max_grad_norm > 0:
            stats.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats.optimizer_steps += 1
        stats.loss, stats.pg_loss, stats.kl = loss_sum, pg_sum, kl_sum
        stats.clip_fraction = clip_weighted / max(int(mask.sum()), 1)


def mean_reward(groups: list[Group]) -> float:
    """Mean reward over every completion of these groups (0.0 for none)."""
    rewards = [r for g in groups for r in g.rewards]
    return sum(rewards) / len(rewards) if rewards else 0.0

