"""Turning groups into right-padded training tensors, and the policy's per-token log-probs on them.

Each row is ``prompt_ids + completion_ids`` then padding: positions 0..len-1 are real tokens, so the
model's default position ids are right and no pad sits between a prompt and its completion.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from sapo.grpo import token_log_probs
from sapo.rollouts import Group


@dataclass
class TrainBatch:
    """N sequences of width T: ids, attention mask, completion-token mask, one advantage per row."""

    input_ids: torch.Tensor  # (N, T) long
    attention_mask: torch.Tensor  # (N, T) long
    completion_mask: torch.Tensor  # (N, T) float, 1 on completion tokens
    advantages: torch.Tensor  # (N,) float
    prompt_lengths: list[int]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def completion_tokens(self) -> int:
        """Tokens the loss is averaged over."""
        return int(self.completion_mask.sum())

    def rows(self, start: int, stop: int) -> "TrainBatch":
        """A micro-batch of rows [start, stop), trimmed to its own longest sequence."""
        width = int(self.attention_mask[start:stop].sum(dim=1).max())
        return TrainBatch(
            input_ids=self.input_ids[start:stop, :width],
            attention_mask=self.attention_mask[start:stop, :width],
            completion_mask=self.completion_mask[start:stop, :width],
            advantages=self.advantages[start:stop],
            prompt_lengths=self.prompt_lengths[start:stop],
        )

    def to(self, device) -> "TrainBatch":
        """The same batch on ``device``."""
        return TrainBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.completion_mask.to(device),
            self.advantages.to(device),
            self.prompt_lengths,
        )


def build_batch(groups: list[Group], advantages: list[list[float]], pad_id: int) -> TrainBatch:
    """Right-padded rows for every completion of every group; ``advantages[q][g]`` per completion."""
    rows, prompt_lengths, row_adv = [], [], []
    for group, group_adv in zip(groups, advantages, strict=True):
        for completion, adv in zip(group.completions, group_adv, strict=True):
            rows.append((group.prompt_ids, completion.token_ids))
            prompt_lengths.append(len(group.prompt_ids))
            row_adv.append(adv)
    width = max(len(p) + len(c) for p, c in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.float32)
    for i, (prompt, completion) in enumerate(rows):
        seq = prompt + completion
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
        completion_mask[i, len(prompt): len(seq)] = 1.0
    return TrainBatch(input_ids, attention_mask, completion_mask, torch.tensor(row_adv), prompt_lengths)


def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def completion_log_probs(model, batch: TrainBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the batch's tokens from the earliest completion start on.

    Returns (logp, mask), both (N, T - s) where s = the shortest prompt: logits before s are never
    needed, so we ask the model for only the last T - s + 1 positions (``logits_to_keep``), which keeps
    the (N, T, V) logits tensor from dominating memory on long prompts.
    """
    start = min(batch.prompt_lengths)  # first position holding a completion token in some row
    width = batch.input_ids.shape[1]
    keep = width - start + 1
    if _accepts_logits_to_keep(model):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep).logits
    else:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -keep:]
    targets = batch.input_ids[:, start:]  # (N, T - s)
    logp = token_log_probs(logits[:, :-1], targets, temperature)  # (N, T - s)
    return logp, batch.completion_mask[:, start:]
