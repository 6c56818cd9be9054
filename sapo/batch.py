"""Turning groups into right-padded training tensors, micro-batches, and the policy's log-probs on them.

Each row is ``prompt_ids + completion_ids`` then padding: positions 0..len-1 are real tokens, so the
model's default position ids are right and no pad sits between a prompt and its completion.

Memory is what limits a GPU worker, and logits are most of it (GPT-2: 50257 floats per position), so
log-probs are taken for completion tokens only: the model's body runs on the whole rows, the hidden
states that predict completion tokens are gathered into one flat (K, H) tensor, and the output head turns
them into log-probs a few hundred at a time, recomputed in backward rather than stored. Micro-batches are
bounded by padded tokens, not only rows, so a long prompt cannot blow the activation budget.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

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
    lengths: list[int]  # real (unpadded) tokens of each row: kept as Python ints, so planning never syncs a GPU

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def completion_tokens(self) -> int:
        """Tokens the loss is averaged over."""
        return int(self.completion_mask.sum())

    def rows(self, start: int, stop: int) -> "TrainBatch":
        """A micro-batch of rows [start, stop), trimmed to its own longest sequence."""
        width = max(self.lengths[start:stop])
        return TrainBatch(
            input_ids=self.input_ids[start:stop, :width],
            attention_mask=self.attention_mask[start:stop, :width],
            completion_mask=self.completion_mask[start:stop, :width],
            advantages=self.advantages[start:stop],
            prompt_lengths=self.prompt_lengths[start:stop],
            lengths=self.lengths[start:stop],
        )

    def to(self, device) -> "TrainBatch":
        """The same batch on ``device``."""
        return TrainBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.completion_mask.to(device),
            self.advantages.to(device),
            self.prompt_lengths,
            self.lengths,
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
    return TrainBatch(input_ids, attention_mask, completion_mask, torch.tensor(row_adv), prompt_lengths,
                      [len(p) + len(c) for p, c in rows])


def plan_micro_batches(lengths: list[int], *, max_rows: int = 0, max_tokens: int = 0) -> list[tuple[int, int]]:
    """Consecutive row ranges [start, stop) covering every row, each within both limits (0 = none).

    A range's cost is rows x its longest row (what a right-padded forward pass allocates), so long
    prompts get fewer rows per micro-batch and activation memory stays bounded whatever the prompt
    lengths. A single row over ``max_tokens`` still gets a range of its own.
    """
    ranges, start, widest = [], 0, 0
    for i, length in enumerate(lengths):
        rows = i - start
        grown = max(widest, length)
        full = (max_rows and rows >= max_rows) or (max_tokens and (rows + 1) * grown > max_tokens)
        if rows and full:
            ranges.append((start, i))
            start, grown = i, length
        widest = grown
    if lengths:
        ranges.append((start, len(lengths)))
    return ranges


def padded_tokens(lengths: list[int], ranges: list[tuple[int, int]]) -> int:
    """The largest rows x longest-row over ``ranges``: the biggest forward pass of a plan."""
    return max(((stop - start) * max(lengths[start:stop]) for start, stop in ranges), default=0)


# --------------------------------------------------------------------------- log-probs of completion tokens

# Elements of one chunk of logits (chunk tokens x vocabulary): 2**23 floats = 32 MiB, ~167 GPT-2 tokens; the
# transient peak is ~3.5 such tensors (the head's output, its float32 copy, the scaled copy, logsumexp's).
LOGITS_CHUNK_ELEMENTS = 2 ** 23


def predicted_positions(batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, targets): which positions' outputs predict a completion token, and those tokens.

    ``mask`` is (N, T - 1) bool over positions 0..T-2 (position t predicts token t + 1); ``targets`` is
    the flat (K,) completion tokens in row-major order, K = completion tokens of the batch.
    """
    mask = batch.completion_mask[:, 1:] > 0  # (N, T - 1)
    return mask, batch.input_ids[:, 1:][mask]


def token_advantages(batch: TrainBatch) -> torch.Tensor:
    """(K,) each completion token's row advantage, in the order of :func:`completion_log_probs`."""
    mask, _ = predicted_positions(batch)
    return batch.advantages[:, None].expand(mask.shape)[mask]


def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# Config fields of models that change the logits after the output projection (soft-capping, scaling).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def body_and_head(model):
    """(body, head) with ``logits == head(body(...).last_hidden_state)``, or None when the model is not built so.

    Hugging Face causal LMs are a base model (``base_model``) plus an output projection
    (``get_output_embeddings``); some scale or soft-cap the logits on top (Gemma 2, Cohere, Granite), so
    callers verify the split once with :func:`head_split_matches` before trusting it.
    """
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    body = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if body is None or body is model or head is None:
        return None
    return body, head


@torch.no_grad()
def head_split_matches(model, tokens: int = 8) -> bool:
    """True when :func:`body_and_head` reproduces the model's own logits on a short input."""
    split = body_and_head(model)
    if split is None:
        return False
    body, head = split
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    ids = (torch.arange(tokens, device=device) * 7919 % vocab)[None]  # any in-vocabulary tokens
    mask = torch.ones_like(ids)
    try:
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        ours = head(body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state).float()
    except Exception:  # noqa: BLE001 - an unusual model: fall back to its own forward
        return False
    return full.shape == ours.shape and torch.allclose(full, ours, rtol=1e-2, atol=1e-2)


def _chunk_log_probs(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(hidden).float()  # (k, V): one chunk, the only full-vocabulary tensor alive at a time
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (k,)


def chunked_log_probs(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                      chunk_elements: int = LOGITS_CHUNK_ELEMENTS) -> torch.Tensor:
    """log p(target) for each (K, H) hidden state through ``head``, a few hundred rows of logits at a time.

    With gradients on, each chunk is checkpointed: its logits are recomputed in backward instead of being
    kept, so the peak holds one chunk of logits, not K x V (GPT-2: 50257 floats per token).
    """
    weight = getattr(head, "weight", None)
    vocab = int(weight.shape[0]) if weight is not None else 1
    step = max(1, chunk_elements // max(vocab, 1))
    parts = []
    for i in range(0, hidden.shape[0], step):
        h, t = hidden[i:i + step], targets[i:i + step]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_chunk_log_probs, head, h, t, temperature, use_reentrant=False))
        else:
            parts.append(_chunk_log_probs(head, h, t, temperature))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def completion_log_probs(model, batch: TrainBatch, temperature: float, *, split_head: bool = True) -> torch.Tensor:
    """(K,) float32 log-probs of the batch's completion tokens, row by row (see :func:`predicted_positions`).

    ``split_head``: run the model's body, keep only the hidden states that predict completion tokens, and
    project those through the output head in chunks. No logits are made for prompt or padding positions,
    and none of them is kept for backward. Without it (a model whose head does more than a projection),
    the model's own forward is used, asking for logits from the shortest prompt on (``logits_to_keep``).
    """
    mask, targets = predicted_positions(batch)
    split = body_and_head(model) if split_head else None
    if split is not None:
        body, head = split
        # use_cache=False: a forward outside generate must not build a KV cache (it would hold every layer's K/V).
        hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
        return chunked_log_probs(head, hidden[:, :-1][mask], targets, temperature)  # (K,)
    start = max(min(batch.prompt_lengths), 1) - 1  # first position whose output predicts a completion token
    keep = batch.input_ids.shape[1] - start
    if _accepts_logits_to_keep(model):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep,
                       use_cache=False).logits
    else:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits[:, -keep:]
    logits = logits[:, :-1][mask[:, start:]]  # (K, V): completion positions only
    return token_log_probs(logits, targets, temperature)
