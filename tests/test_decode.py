"""The lean decoding loop (sapo/decode.py) samples exactly what ``generate`` samples, and does less work for it.

Every equality below is token for token (and finished flag for finished flag) against
``sample_completions(..., decode="generate")``, the path that calls transformers' ``generate``, for the
same seed: temperatures, nucleus sampling, left-padded and unpadded prompts, rows that stop early at EOS,
a minimum length, bfloat16 autocast, the fused GELU the worker loads, eager attention and a non-GPT-2
model (both through the model's own forward), and a step that disagrees with the model (the fallback).
"""

from __future__ import annotations

import functools

import pytest
import torch

import sapo.decode as decode
from node.models import use_fused_gelu
from sapo.config import SapoConfig, TaskSpec
from sapo.learner import SapoLearner
from sapo.rollouts import choose_decode, sample_completions
from sapo.tiny_model import build_tiny_gpt2

TEXTS = ["Copy this word: apple", "What is 3 + 4? Answer in tags.", "Sunday"]


def _prompts(tok, texts=TEXTS) -> list[list[int]]:
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _eos_prone(seed: int, alpha: float):
    """A tiny GPT-2 whose EOS logit is raised by ``alpha`` (3: some rows stop early, 5: every row does)."""
    model, tok = build_tiny_gpt2(seed=seed)
    with torch.no_grad():
        u = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(0))
        model.transformer.ln_f.bias.copy_(u)
        model.transformer.wte.weight[tok.eos_token_id] = alpha * u / u.norm() ** 2  # tied with the head
    return model, tok


def _sampled(model, tok, prompts, decode_loop, **kw):
    """Token ids and finished flags of every completion, and the next draw of the global generator."""
    args = dict(num_generations=4, max_new_tokens=16, temperature=1.0, top_p=1.0, seed=7)
    groups = sample_completions(model, tok, prompts, decode=decode_loop, **{**args, **kw})
    return [[(c.token_ids, c.finished) for c in g] for g in groups], torch.rand(2)


def _assert_same(model, tok, prompts, **kw):
    expected, rng_after = _sampled(model, tok, prompts, "generate", **kw)
    got, rng_after_lean = _sampled(model, tok, prompts, "lean", **kw)
    assert got == expected
    assert torch.equal(rng_after_lean, rng_after), "the loop must draw from the generator exactly as generate does"
    return got


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.9), (1.0, 0.5)])
def test_same_tokens_as_generate_for_left_padded_prompts(temperature, top_p):
    model, tok = build_tiny_gpt2(seed=5)
    prompts = _prompts(tok)
    assert len({len(p) for p in prompts}) == 3  # three lengths: left padding in every step
    got = _assert_same(model, tok, prompts, temperature=temperature, top_p=top_p)
    assert all(len(ids) == 16 for g in got for ids, _ in g)


def test_temperature_zero_is_greedy_on_both_loops_and_draws_nothing():
    model, tok = _eos_prone(seed=8, alpha=3)
    got = _assert_same(model, tok, _prompts(tok), temperature=0.0)  # the generator is left as generate leaves it
    assert all(g[0] == c for g in got for c in g)  # greedy: the G completions of a prompt are identical


def test_same_tokens_as_generate_for_prompts_of_one_length():
    model, tok = build_tiny_gpt2(seed=6)
    prompts = _prompts(tok, ["abc", "xyz"])
    assert len(prompts[0]) == len(prompts[1])  # no padding: transformers passes no attention mask to SDPA
    _assert_same(model, tok, prompts, temperature=0.9)


def test_same_tokens_when_some_rows_stop_at_eos():
    model, tok = _eos_prone(seed=5, alpha=3.0)
    got = _assert_same(model, tok, _prompts(tok), max_new_tokens=20)
    lengths = [len(ids) for g in got for ids, _ in g]
    finished = [f for g in got for _, f in g]
    assert any(finished) and not all(finished) and min(lengths) < 20 == max(lengths)
    assert all(ids[-1] == tok.eos_token_id for g in got for ids, f in g if f)


def test_same_tokens_when_every_row_stops_early():
    model, tok = _eos_prone(seed=5, alpha=5.0)
    got = _assert_same(model, tok, _prompts(tok), max_new_tokens=30)
    assert all(f for g in got for _, f in g) and max(len(ids) for g in got for ids, _ in g) < 30


def test_same_tokens_with_a_minimum_length():
    """The warm-up's worst case: EOS is suppressed until ``min_new_tokens``."""
    model, tok = _eos_prone(seed=5, alpha=5.0)
    got = _assert_same(model, tok, _prompts(tok), max_new_tokens=12, min_new_tokens=12)
    assert all(len(ids) == 12 for g in got for ids, _ in g)


def test_same_tokens_under_bfloat16_autocast():
    model, tok = build_tiny_gpt2(seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _assert_same(model, tok, _prompts(tok), temperature=0.8)


def test_same_tokens_with_the_fused_gelu_the_worker_loads():
    model, tok = build_tiny_gpt2(seed=9)
    assert use_fused_gelu(model) == model.config.n_layer
    _assert_same(model, tok, _prompts(tok))


def test_eager_attention_and_other_models_decode_through_their_own_forward(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    eager, tok = build_tiny_gpt2(seed=10)
    eager.config._attn_implementation = "eager"
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    own_steps = []
    monkeypatch.setattr(decode._Gpt2Decoder, "_forward", lambda *a: own_steps.append(1))
    for model in (eager, llama):
        assert decode.unsupported(model) is None
        _assert_same(model, tok, _prompts(tok), temperature=0.9, top_p=0.95)
    assert own_steps == []


def test_a_step_that_disagrees_with_the_model_hands_over_to_its_forward(monkeypatch):
    model, tok = build_tiny_gpt2(seed=11)
    real_norm = decode._norm
    monkeypatch.setattr(decode, "_norm", lambda layer, x: real_norm(layer, x) * 1.0001)
    verdicts = []
    real_step = decode._Gpt2Decoder.step

    def spy(self, *args):
        out = real_step(self, *args)
        verdicts.append(self.trusted)
        return out

    monkeypatch.setattr(decode._Gpt2Decoder, "step", spy)
    _assert_same(model, tok, _prompts(tok))
    assert verdicts and set(verdicts) == {False}


def test_gpt2_prefills_each_prompt_once_and_checks_one_step_with_its_forward(monkeypatch):
    model, tok = build_tiny_gpt2(seed=12)
    rows = []
    real_forward = model.forward

    @functools.wraps(real_forward)  # the same signature: the loop checks what the forward accepts
    def spy(*args, **kwargs):
        rows.append(tuple(kwargs["input_ids"].shape))
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    prompts = _prompts(tok)
    sample_completions(model, tok, prompts, num_generations=4, max_new_tokens=16, temperature=1.0, top_p=1.0,
                       seed=1, decode="lean")
    width = max(len(p) for p in prompts)
    # The prefill sees P = 3 rows (not P * G = 12); one step through the model's forward checks ours.
    assert rows == [(3, width), (12, 1)]


# --- when the loop applies --------------------------------------------------------------------------

def test_unsupported_settings_keep_generate():
    model, tok = build_tiny_gpt2(seed=13)
    assert decode.unsupported(model) is None
    model.generation_config.repetition_penalty = 1.2
    assert "repetition_penalty" in decode.unsupported(model)
    assert choose_decode(model, "lean") == "generate"
    model.generation_config.repetition_penalty = 1.0
    model.generate = lambda **kw: None  # a wrapper around this model's generate must be the one called
    assert decode.unsupported(model) == "the model's generate is overridden"
    assert choose_decode(model, "auto") == "generate"


def test_choose_decode_per_setting():
    model, _ = build_tiny_gpt2(seed=14)
    assert choose_decode(model, "auto") == "lean"  # the CPU default
    assert choose_decode(model, "lean") == "lean"
    assert choose_decode(model, "generate") == "generate"
    assert choose_decode(model, "auto", cache=object()) == "generate"  # a static cache is compiled generate


def _learner(**kw) -> SapoLearner:
    cfg = SapoConfig(num_train_samples=2, num_generations=4, max_new_tokens=12, max_prompt_tokens=48,
                     tasks=(TaskSpec("toy_copy"),), **kw)
    return SapoLearner(*build_tiny_gpt2(seed=15), cfg)


def test_learner_samples_with_the_lean_loop_on_a_cpu_and_gets_generates_groups(monkeypatch):
    calls = []
    real = decode.lean_sample
    monkeypatch.setattr(decode, "lean_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    lean, plain = _learner(), _learner(decode="generate")
    assert (lean.config.decode, plain.config.decode) == ("lean", "generate")
    questions = lean.sample_questions("worker_1", 0)
    got, _ = lean.generate(questions, seed=3)
    assert calls == [1]
    expected, _ = plain.generate(questions, seed=3)
    assert calls == [1]
    assert [[c.token_ids for c in g.completions] for g in got] == [[c.token_ids for c in g.completions]
                                                                 for g in expected]
