"""Memory-lean training state: activation checkpointing and the stochastic-rounding AdamW for bf16 weights."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sapo.config import ConfigError, SapoConfig, TaskSpec
from sapo.learner import SapoLearner
from sapo.optim import StochasticRoundingAdamW, make_optimizer, stochastic_round_to_bfloat16
from sapo.tiny_model import build_tiny_gpt2

CFG = SapoConfig(num_train_samples=2, num_transplant_trees=0, num_generations=4, max_new_tokens=8,
                 learning_rate=1e-3, tasks=(TaskSpec("toy_copy"),))


def test_stochastic_rounding_is_exact_on_average_and_never_leaves_the_two_neighbours():
    x = torch.full((200_000,), 1.0 + 2 ** -10)  # 1/8 of the way from 1.0 to the next bfloat16 (1 + 2**-7)
    gen = torch.Generator().manual_seed(0)
    rounded = stochastic_round_to_bfloat16(x, gen).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert rounded.mean().item() == pytest.approx(1.0 + 2 ** -10, abs=2e-5)
    exact = torch.tensor([0.5, -3.0, 0.0, float("inf"), -float("inf")])
    assert torch.equal(stochastic_round_to_bfloat16(exact, gen).float(), exact)
    assert torch.isnan(stochastic_round_to_bfloat16(torch.tensor([float("nan")]), gen)).all()


def test_float32_parameters_follow_torch_adamw_exactly():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 32))
    b = torch.nn.Parameter(a.detach().clone())
    ours = StochasticRoundingAdamW([a], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for step in range(5):
        g = torch.randn(64, 32, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_small_updates_survive_bfloat16_weights_only_with_stochastic_rounding():
    """lr 1e-5 on weights near 0.05: round-to-nearest bf16 loses the update, stochastic rounding keeps it on average."""
    torch.manual_seed(1)
    start = (0.05 + 0.01 * torch.rand(20_000)).to(torch.bfloat16)
    plain = torch.nn.Parameter(start.clone())
    sr = torch.nn.Parameter(start.clone())
    opts = [torch.optim.Adam([plain], lr=1e-5), StochasticRoundingAdamW([sr], lr=1e-5, seed=3)]
    for _ in range(20):
        for p, opt in zip((plain, sr), opts):
            p.grad = torch.ones_like(p)  # Adam's step is ~lr per element, downward
            opt.step()
    expected = -20 * 1e-5
    moved_plain = (plain.float() - start.float()).mean().item()
    moved_sr = (sr.float() - start.float()).mean().item()
    assert abs(moved_plain) < abs(expected) * 0.2  # nearly every update rounded away
    assert moved_sr == pytest.approx(expected, rel=0.1)


def test_the_same_seed_and_step_draw_the_same_rounding():
    def run():
        p = torch.nn.Parameter(torch.linspace(0.01, 0.1, 1000).to(torch.bfloat16))
        opt = StochasticRoundingAdamW([p], lr=1e-4, seed=7)
        for _ in range(3):
            p.grad = torch.ones_like(p)
            opt.step()
        return p.detach().clone(), opt.state_dict()

    (a, state), (b, _) = run(), run()
    assert torch.equal(a, b)
    # Resume from the state dict: the next step draws the same noise as an uninterrupted run.
    p = torch.nn.Parameter(a.clone())
    resumed = StochasticRoundingAdamW([p], lr=1e-4, seed=7)
    resumed.load_state_dict(state)
    q = torch.nn.Parameter(a.clone())
    straight = StochasticRoundingAdamW([q], lr=1e-4, seed=7)
    straight.load_state_dict(state)
    for x, opt in ((p, resumed), (q, straight)):
        x.grad = torch.ones_like(x)
        opt.step()
    assert torch.equal(p, q)


def test_make_optimizer_kinds():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert type(make_optimizer(params, kind="adam", lr=1e-3, weight_decay=0)) is torch.optim.Adam
    assert type(make_optimizer(params, kind="adam", lr=1e-3, weight_decay=0.1)) is torch.optim.AdamW
    assert isinstance(make_optimizer(params, kind="adamw_sr", lr=1e-3, weight_decay=0), StochasticRoundingAdamW)
    with pytest.raises(ValueError, match="adamw_sr"):
        make_optimizer(params, kind="sgd", lr=1e-3, weight_decay=0)
    with pytest.raises(ConfigError, match="optimizer"):
        SapoConfig(optimizer="sgd")


def test_the_learner_picks_stochastic_rounding_for_bfloat16_weights():
    model, tok = build_tiny_gpt2(seed=1)
    assert SapoLearner(model, tok, CFG).optimizer_kind == "adam"
    bf16 = SapoLearner(model.to(torch.bfloat16), tok, CFG)
    assert bf16.optimizer_kind == "adamw_sr" and isinstance(bf16.optimizer, StochasticRoundingAdamW)


def _signal_groups(learner):
    groups, _ = learner.generate(learner.sample_questions("w", 0), seed=1)
    for g in groups:
        g.rewards = [float(i % 2) for i in range(len(g.rewards))]
    return groups


def _step_gradients_and_saved_bytes(learner, groups):
    captured, saved = [], {}
    params = list(learner.model.parameters())
    learner.optimizer.step = lambda: captured.append([p.grad.detach().clone() for p in params])

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        learner.train(groups)
    return captured[0], sum(saved.values())


def test_activation_checkpointing_gives_the_same_gradients_from_far_fewer_saved_bytes():
    plain = SapoLearner(*build_tiny_gpt2(seed=3), CFG)
    lean = SapoLearner(*build_tiny_gpt2(seed=3), replace(CFG, gradient_checkpointing=True))
    assert (plain.checkpointing, lean.checkpointing) == (False, True)
    groups = _signal_groups(plain)
    g_plain, bytes_plain = _step_gradients_and_saved_bytes(plain, groups)
    g_lean, bytes_lean = _step_gradients_and_saved_bytes(lean, groups)
    for a, b in zip(g_plain, g_lean):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert bytes_lean < bytes_plain / 4
    assert not lean.model.training  # back in eval mode for generate
    assert all(m.p == 0.0 for m in lean.model.modules() if isinstance(m, torch.nn.Dropout))


def test_checkpointing_is_on_for_cuda_by_default_and_off_for_a_cpu():
    assert CFG.gradient_checkpointing == "auto"
    assert CFG.resolved("cuda").gradient_checkpointing is True
    assert CFG.resolved("cpu").gradient_checkpointing is False
