"""The start-up warm-up: the worst case of a round, once, so running out of memory happens now, not at round 500.

It also traces what a compiled decoding step will see in every round (left-padded prompts), so that
compilation is paid at start-up rather than in round 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sapo.batch import build_batch
from sapo.grpo import ragged_group_advantages
from sapo.rollouts import Group, max_positions

FILLER = "The quick brown fox jumps over the lazy dog; 12 + 34 = 46. "


@dataclass
class WarmupStats:
    """What the start-up warm-up did (one worst-case generate + loss/backward, no optimizer step)."""

    sequences_generated: int = 0
    sequences_trained: int = 0
    prompt_tokens: int = 0  # per sequence
    new_tokens: int = 0  # per sequence
    generate_s: float = 0.0
    train_s: float = 0.0
    micro_batch_size: int = 0  # rows of the largest micro-batch, after any out-of-memory halving
    micro_batch_tokens: int = 0
    generate_calls: int = 1
    oom_halvings: int = 0
    peak_bytes: int | None = None  # torch.cuda.max_memory_allocated() on CUDA


def worst_case_lengths(learner) -> tuple[int, int]:
    """(prompt tokens, new tokens): the configured maxima, cut to fit the model's positions."""
    cfg = learner.config
    new_tokens, prompt_len = cfg.max_new_tokens, cfg.max_prompt_tokens
    limit = max_positions(learner.model)
    if limit:
        new_tokens = min(new_tokens, limit - 1)
        prompt_len = max(1, min(prompt_len, limit - new_tokens))
    return prompt_len, new_tokens


def filler_ids(tokenizer, pad_id: int, length: int) -> list[int]:
    """``length`` token ids of ordinary text (never the pad token)."""
    unit = [t for t in tokenizer(FILLER, add_special_tokens=False)["input_ids"] if t != pad_id]
    return (unit * (length // max(len(unit), 1) + 1))[:length]


def run_warmup(learner) -> WarmupStats:
    """Run ``learner``'s worst case of a round once.

    Generates I*G completions of exactly ``max_new_tokens`` (cut to the model's positions) from prompts of
    different lengths, the longest ``max_prompt_tokens``: a round's generate always pads, and the compiled
    decoding step is traced for the padded case here rather than in round 0. Then one loss/backward over
    (I+J)*G rows of the longest prompt plus a full completion (the J external groups are copies of local
    ones) in the micro-batches a round would use, with the same out-of-memory fallback as training; on
    CUDA it also holds Adam's two state tensors per parameter for a moment if they do not exist yet, as
    the first real step will. Then the gradients are dropped: the optimizer never steps, the weights do
    not change, and the caller's RNG state (CPU and CUDA) is restored.
    """
    from sapo.learner import GenerateStats, TrainStats

    cfg = learner.config
    stats = WarmupStats()
    prompt_len, new_tokens = worst_case_lengths(learner)
    ids = filler_ids(learner.tokenizer, learner.pad_id, prompt_len)
    # The longest prompt first, then shorter ones: left padding, as in every real round.
    prompts = [ids[: max(1, prompt_len * (cfg.num_train_samples - k) // cfg.num_train_samples)]
               for k in range(cfg.num_train_samples)]
    stats.prompt_tokens, stats.new_tokens = len(ids), new_tokens
    device = learner.device
    cuda = device.type == "cuda"
    gen, train = GenerateStats(), TrainStats()
    with torch.random.fork_rng(devices=[device.index or 0] if cuda else []):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        sampled = learner.sample(prompts, seed=0, new_tokens=new_tokens, stats=gen, min_new_tokens=new_tokens)
        if cuda:
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        stats.generate_s = t1 - t0
        stats.sequences_generated = sum(len(g) for g in sampled)
        spread = [float(i % 2) for i in range(cfg.num_generations)]  # every group informative
        groups = [Group(None, "", ids, completions, list(spread)) for completions in sampled]
        groups += [groups[k % len(groups)] for k in range(cfg.num_transplant_trees)]
        batch = build_batch(groups, ragged_group_advantages([g.rewards for g in groups]), learner.pad_id).to(device)
        total_tokens = sum(len(c.token_ids) for g in groups for c in g.completions)
        learner.step_with_oom_fallback(batch, None, total_tokens, train, step=False)
        if cuda:
            torch.cuda.synchronize(device)
        stats.train_s = time.perf_counter() - t1
        stats.sequences_trained = len(batch)
    stats.micro_batch_size, stats.micro_batch_tokens = train.micro_batch_size, train.micro_batch_tokens
    stats.generate_calls = learner.generate_split.calls
    stats.oom_halvings = gen.oom_halvings + train.oom_halvings
    if cuda:
        stats.peak_bytes = int(torch.cuda.max_memory_allocated(device))
        del batch, groups, sampled
        torch.cuda.empty_cache()  # give the worst case's cached blocks back; rounds allocate their own
    return stats
