"""Hand-computed cases for the GRPO maths in sapo.grpo and sapo.batch."""

import math

import torch
from torch.testing import assert_close

from sapo.batch import build_batch
from sapo.grpo import clipped_policy_loss, group_advantages, ragged_group_advantages, token_log_probs
from sapo.rollouts import Completion, Group


def test_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    # mean 0.25; unbiased std = sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    expected = torch.tensor([[1.5, -0.5, -0.5, -0.5]])
    assert_close(group_advantages(rewards), expected, rtol=0, atol=1e-6)


def test_zero_spread_group_has_zero_advantage():
    rewards = torch.tensor([[0.7, 0.7, 0.7], [0.0, 0.0, 0.0]])
    assert torch.equal(group_advantages(rewards), torch.zeros(2, 3))


def test_groups_are_normalised_independently():
    rewards = torch.tensor([[0.0, 2.0], [10.0, 14.0]])
    adv = group_advantages(rewards)
    s = 1.0 / math.sqrt(2.0)  # (r - mean) / unbiased std for two distinct values
    assert_close(adv, torch.tensor([[-s, s], [-s, s]]), rtol=0, atol=1e-6)


def test_ragged_groups_match_rectangular():
    ragged = ragged_group_advantages([[1.0, 0.0, 0.0, 0.0], [3.0, 1.0]])
    assert ragged[0] == group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64))[0].tolist()
    assert_close(torch.tensor(ragged[1]), torch.tensor([1 / math.sqrt(2), -1 / math.sqrt(2)]), rtol=0, atol=1e-6)


def test_token_log_probs_use_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])  # (N=1, T=1, V=2)
    targets = torch.tensor([[0]])
    for temp in (1.0, 2.0):
        p0 = math.exp(2.0 / temp) / (math.exp(2.0 / temp) + 1.0)
        assert_close(token_log_probs(logits, targets, temp), torch.tensor([[math.log(p0)]]))


def test_loss_at_ratio_one_is_minus_mean_advantage_over_tokens():
    # Two sequences: 2 and 1 completion tokens; the last column of row 2 is padding.
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    parts = clipped_policy_loss(logp, logp.detach(), adv, mask, eps_low=0.2, eps_high=0.28)
    # token mean over 3 tokens of -A: -(1 + 1 - 2) / 3 = 0
    assert_close(parts.loss, torch.tensor(0.0))
    parts.loss.backward()
    # d/dlogp of -ratio*A/3 at ratio 1 is -A/3 on real tokens, 0 on padding
    assert_close(logp.grad, torch.tensor([[-1 / 3, -1 / 3], [2 / 3, 0.0]]))
    assert parts.tokens == 3


def test_asymmetric_clipping():
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    # ratio e^{0.5} ~ 1.65 with A > 0: clipped at 1 + 0.28, no gradient through the clipped branch
    logp = torch.full((1, 2), 0.5, requires_grad=True)
    parts = clipped_policy_loss(logp, old, torch.tensor([1.0]), mask, eps_low=0.2, eps_high=0.28)
    assert_close(parts.loss, torch.tensor(-1.28))
    parts.loss.backward()
    assert torch.equal(logp.grad, torch.zeros(1, 2))
    assert parts.clip_fraction == 1.0
    # ratio e^{-0.5} ~ 0.61 with A < 0: min(0.61 * -1, 0.8 * -1) = -0.8 -> loss 0.8
    logp2 = torch.full((1, 2), -0.5, requires_grad=True)
    parts2 = clipped_policy_loss(logp2, old, torch.tensor([-1.0]), mask, eps_low=0.2, eps_high=0.28)
    assert_close(parts2.loss, torch.tensor(0.8))
    # inside the trust region nothing is clipped
    logp3 = torch.full((1, 2), 0.1)
    parts3 = clipped_policy_loss(logp3, old, torch.tensor([1.0]), mask, eps_low=0.2, eps_high=0.28)
    assert parts3.clip_fraction == 0.0
    assert_close(parts3.loss, torch.tensor(-math.exp(0.1)))


def test_kl_term_is_zero_at_reference_and_positive_away():
    logp = torch.tensor([[-1.0, -1.0]])
    mask = torch.ones(1, 2)
    adv = torch.zeros(1)
    same = clipped_policy_loss(logp, logp, adv, mask, eps_low=0.2, eps_high=0.28, ref_logp=logp, beta=0.5)
    assert_close(same.loss, torch.tensor(0.0))
    ref = torch.tensor([[-2.0, -1.0]])
    away = clipped_policy_loss(logp, logp, adv, mask, eps_low=0.2, eps_high=0.28, ref_logp=ref, beta=0.5)
    d = -1.0  # ref - logp on token 1; k3 = e^d - d - 1
    assert_close(away.loss, torch.tensor(0.5 * (math.exp(d) - d - 1.0) / 2))


def test_normalizer_makes_micro_batches_add_up():
    torch.manual_seed(0)
    logp = torch.randn(4, 5, requires_grad=True)
    mask = (torch.rand(4, 5) > 0.3).float()
    adv = torch.randn(4)
    whole = clipped_policy_loss(logp, logp.detach(), adv, mask, eps_low=0.2, eps_high=0.28)
    total = float(mask.sum())
    halves = sum(
        clipped_policy_loss(logp[i:i + 2], logp[i:i + 2].detach(), adv[i:i + 2], mask[i:i + 2],
                            eps_low=0.2, eps_high=0.28, normalizer=total).loss
        for i in (0, 2)
    )
    assert_close(halves, whole.loss)


def _group(prompt_ids, completions):
    return Group(question=None, prompt="p", prompt_ids=prompt_ids,
                 completions=[Completion(ids, "", True) for ids in completions], rewards=[0.0] * len(completions))


def test_batch_is_right_padded_with_completion_mask():
    groups = [_group([5, 6, 7], [[1, 2], [3]]), _group([8], [[4, 4, 4]])]
    batch = build_batch(groups, [[0.5, -0.5], [1.0]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 2], [5, 6, 7, 3, 0], [8, 4, 4, 4, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert batch.completion_mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0], [0, 1, 1, 1, 0]]
    assert batch.advantages.tolist() == [0.5, -0.5, 1.0]
    assert batch.completion_tokens == 6
    micro = batch.rows(1, 3)
    assert micro.input_ids.shape == (2, 4)  # trimmed to its own longest row
