"""GRPO maths: group-relative advantages, per-token log-probs, the clipped policy-gradient loss.

Tensor in, tensor out; no I/O. Shapes: Q groups of G completions, N = sum of group sizes sequences,
T tokens per (right-padded) sequence, V vocabulary.

Choices, with their sources:
- advantage = (r - mean) / (std + 1e-8) per group with the *unbiased* std (GRPO, DeepSeekMath §4.1;
  Gensyn's genrl GRPOTrainerModule). A group whose rewards all agree gets A = 0.
- clipped surrogate with asymmetric epsilon 0.2 low / 0.28 high (DAPO's clip-higher, the reference
  trainer's default); KL to a frozen reference with the k3 estimator exp(q - p) - (q - p) - 1
  (Schulman's approximation, as in GRPO), weighted by beta (0 by default, as in the SAPO paper).
- loss = mean over *all* completion tokens of the batch (token-level normalisation, DAPO §3.3), so long
  completions are not down-weighted; with micro-batches the caller passes the batch's token count.
- log-probs are computed from logits / temperature, matching the distribution we sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADVANTAGE_EPS = 1e-8


def group_advantages(rewards: torch.Tensor, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """(Q, G) rewards -> (Q, G) advantages, normalised within each group (row)."""
    mean = rewards.mean(dim=-1, keepdim=True)  # (Q, 1)
    std = rewards.std(dim=-1, keepdim=True, unbiased=True)  # (Q, 1)
    return (rewards - mean) / (std + eps)


def ragged_group_advantages(groups: list[list[float]], eps: float = ADVANTAGE_EPS) -> list[list[float]]:
    """Advantages for groups of possibly different sizes (each >= 2), one group at a time."""
    return [group_advantages(torch.tensor(r, dtype=torch.float64)[None], eps)[0].tolist() for r in groups]


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) under softmax(logits / temperature): (N, T, V), (N, T) -> (N, T), in float32."""
    logits = logits.float() / temperature  # (N, T, V)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N, T)
    return picked - torch.logsumexp(logits, dim=-1)  # (N, T)


@dataclass
class LossParts:
    """The loss and what it is made of, for metrics (all detached floats except ``loss``)."""

    loss: torch.Tensor
    pg_loss: float
    kl: float
    clip_fraction: float
    tokens: int


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    normalizer: float | None = None,
) -> LossParts:
    """The GRPO surrogate over completion tokens.

    logp, old_logp, ref_logp, mask: (N, T) with advantages (N,) (one per row), or all of them flat (K,)
    with one advantage per token (what :func:`sapo.batch.completion_log_probs` gives). ``normalizer`` is the number of completion
    tokens the mean is taken over (defaults to this batch's; pass the whole batch's when micro-batching).
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)  # (N, T)
    adv = advantages.to(logp.dtype)
    if adv.dim() < logp.dim():
        adv = adv[:, None]  # (N, 1): one advantage per row
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)  # (N, T)
    kl_value = 0.0
    if ref_logp is not None and beta > 0.0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1.0  # (N, T), >= 0
        per_token = per_token + beta * kl
        kl_value = float((kl * mask).sum().detach())
    tokens = float(mask.sum().detach())
    denom = normalizer if normalizer is not None else max(tokens, 1.0)
    loss = (per_token * mask).sum() / denom
    with torch.no_grad():
        was_clipped = (unclipped != clipped).to(logp.dtype)
        clip_fraction = float((was_clipped * mask).sum()) / max(tokens, 1.0)
        pg = float((-torch.minimum(unclipped, clipped) * mask).sum()) / denom
    return LossParts(loss=loss, pg_loss=pg, kl=kl_value / denom, clip_fraction=clip_fraction, tokens=int(tokens))
