"""The lean GPU path, checked on the CPU: completion-only chunked log-probs, token-bounded micro-batches,
out-of-memory fallbacks in generate and in every training path, the reused static KV cache.

Memory itself is measured on a GPU by scripts/bench_gpu.py and, for the activation and logits share, on a
CPU by scripts/bench_memory.py; here we check that each mechanism computes exactly what the plain one does.
"""

from __future__ import annotations

import pytest
import torch

from sapo.batch import (
    body_and_head,
    build_batch,
    chunked_log_probs,
    completion_log_probs,
    padded_tokens,
    plan_micro_batches,
    predicted_positions,
)
from sapo.config import SapoConfig, TaskSpec
from sapo.grpo import token_log_probs
from sapo.learner import SapoLearner
from sapo.oom import is_out_of_memory
from sapo.rollouts import Completion, Group, sample_completions
from sapo.tiny_model import build_tiny_gpt2


def _learner(**kw) -> SapoLearner:
    base = dict(num_train_samples=2, num_transplant_trees=0, num_generations=4, max_new_tokens=8,
                max_prompt_tokens=40, learning_rate=1e-3, tasks=(TaskSpec("toy_copy"),))
    return SapoLearner(*build_tiny_gpt2(seed=3), SapoConfig(**{**base, **kw}))


def _batch(pad_id=0):
    """Three rows with different prompt and completion lengths (the case the old path got wrong)."""
    groups = [
        Group(None, "", [5, 6, 7, 8, 9, 10, 11], [Completion([12, 13], "", True), Completion([14], "", True)], [1, 0]),
        Group(None, "", [20, 21], [Completion([22, 23, 24, 25], "", False)], [0.0]),
    ]
    return build_batch(groups, [[1.0, -1.0], [0.5]], pad_id)


def _naive_log_probs(model, batch, temperature):
    """Full logits for every position, then the completion tokens picked out: the reference."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mask, targets = predicted_positions(batch)
    return token_log_probs(logits[:, :-1][mask], targets, temperature)


# --- micro-batch plans ----------------------------------------------------------------------------

def test_plan_bounds_rows_and_padded_tokens():
    lengths = [10, 10, 10, 10, 40, 40, 5, 5]
    assert plan_micro_batches(lengths) == [(0, 8)]
    assert plan_micro_batches(lengths, max_rows=3) == [(0, 3), (3, 6), (6, 8)]
    plan = plan_micro_batches(lengths, max_tokens=80)
    assert plan == [(0, 4), (4, 6), (6, 8)]
    assert padded_tokens(lengths, plan) == 80
    # A row longer than the budget still gets its own micro-batch; every row is covered once.
    plan = plan_micro_batches(lengths, max_tokens=20)
    assert [i for a, b in plan for i in range(a, b)] == list(range(8))
    assert all(b - a == 1 for a, b in plan if max(lengths[a:b]) > 20)


def test_plan_of_nothing_is_empty():
    assert plan_micro_batches([]) == [] and padded_tokens([], []) == 0


# --- completion-only log-probs ------------------------------------------------------------------------

def test_split_head_and_fallback_match_full_logits():
    model, _ = build_tiny_gpt2(seed=1)
    batch = _batch()
    with torch.no_grad():
        naive = _naive_log_probs(model, batch, 0.7)
        split = completion_log_probs(model, batch, 0.7)
        fallback = completion_log_probs(model, batch, 0.7, split_head=False)
    assert naive.shape == (7,)  # 2 + 1 + 4 completion tokens, every one predicted from the position before it
    torch.testing.assert_close(split, naive, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fallback, naive, rtol=1e-5, atol=1e-6)


def test_the_head_sees_completion_positions_only(monkeypatch):
    model, _ = build_tiny_gpt2(seed=1)
    batch = _batch()
    rows = []
    head = model.get_output_embeddings()
    real = head.forward
    monkeypatch.setattr(head, "forward", lambda x: (rows.append(x.shape[0]), real(x))[1])
    completion_log_probs(model, batch, 1.0)
    assert sum(rows) == int(batch.completion_mask.sum())  # never a prompt or padding position


def test_chunked_log_probs_and_their_gradients_match_one_chunk():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    whole = chunked_log_probs(head, hidden, targets, 0.8, chunk_elements=10 ** 6)
    (g_whole,) = torch.autograd.grad(whole.sum(), hidden)
    head.weight.grad = None
    pieces = chunked_log_probs(head, hidden, targets, 0.8, chunk_elements=5 * 50)  # 5 tokens per chunk
    (g_pieces,) = torch.autograd.grad(pieces.sum(), hidden)
    torch.testing.assert_close(pieces, whole)
    torch.testing.assert_close(g_pieces, g_whole)


def test_models_that_transform_their_logits_use_their_own_forward():
    model, _ = build_tiny_gpt2(seed=1)
    assert body_and_head(model) is not None
    model.config.final_logit_softcapping = 30.0
    assert body_and_head(model) is None


# --- out of memory ----------------------------------------------------------------------------------

@pytest.mark.parametrize("message, expected", [
    ("CUDA out of memory. Tried to allocate 20.00 MiB", True),
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
    ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True),
    ("cuFFT error: CUFFT_ALLOC_FAILED", True),
    ("CUDA error: device-side assert triggered", False),
    ("shape mismatch", False),
])
def test_allocation_failures_of_cuda_libraries_count_as_out_of_memory(message, expected):
    assert is_out_of_memory(RuntimeError(message)) is expected
    assert is_out_of_memory(ValueError(message)) is False


def _fail_generate_above(learner, monkeypatch, rows_limit):
    real = learner.model.generate
    seen = []

    def generate(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > rows_limit:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real(*args, **kwargs)

    monkeypatch.setattr(learner.model, "generate", generate)
    return seen


def test_generate_out_of_memory_splits_the_prompts_then_grows_back(monkeypatch):
    learner = _learner(num_train_samples=4, oom_regrow_rounds=2)
    seen = _fail_generate_above(learner, monkeypatch, rows_limit=4)  # one prompt's G=4 rows per call
    questions = learner.sample_questions("w", 0)
    groups, stats = learner.generate(questions, seed=1)
    assert [len(g.completions) for g in groups] == [4, 4, 4, 4]
    assert stats.oom_halvings == 2 and stats.calls == 4 and learner.generate_split.calls == 4
    assert seen[:3] == [16, 8, 4]
    monkeypatch.undo()
    learner.generate(questions, seed=1)  # one clean round: still split
    assert learner.generate_split.calls == 4
    learner.generate(questions, seed=1)  # the second clean round: doubles back
    assert learner.generate_split.calls == 2


def test_generate_with_the_same_split_samples_the_same_tokens(monkeypatch):
    a, b = _learner(), _learner()
    b.generate_split.calls = 2
    questions = a.sample_questions("w", 3)
    ga, _ = a.generate(questions, seed=5)
    gb, _ = b.generate(questions, seed=5)
    gb2, _ = b.generate(questions, seed=5)
    assert [[c.token_ids for c in g.completions] for g in gb] == [[c.token_ids for c in g.completions] for g in gb2]
    assert [len(g.completions) for g in ga] == [len(g.completions) for g in gb]


def _signal(groups):
    for g in groups:
        g.rewards = [float(i % 2) for i in range(len(g.rewards))]
    return groups


@pytest.mark.parametrize("steps", [1, 3])
def test_training_out_of_memory_halves_micro_batches_in_every_path(monkeypatch, steps):
    """With several optimizer steps the old-policy log-probs are computed first: that pass falls back too."""
    plain, small = _learner(optimizer_steps_per_round=steps), _learner(optimizer_steps_per_round=steps)
    groups = _signal(plain.generate(plain.sample_questions("w", 0), seed=2)[0])
    real = small.model.transformer.forward

    def small_memory(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real(*args, **kwargs)

    monkeypatch.setattr(small.model.transformer, "forward", small_memory)
    expected = plain.train(groups)
    got = small.train(groups)
    assert got.optimizer_steps == expected.optimizer_steps == steps
    assert got.oom_halvings >= 2 and got.micro_batch_size == 2
    for a, b in zip(plain.model.parameters(), small.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_training_out_of_memory_on_single_rows_is_raised(monkeypatch):
    learner = _learner()
    groups = _signal(learner.generate(learner.sample_questions("w", 0), seed=2)[0])

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (fake)")

    monkeypatch.setattr(learner.model.transformer, "forward", no_memory)
    with pytest.raises(torch.OutOfMemoryError):
        learner.train(groups)
    assert all(p.grad is None for p in learner.model.parameters())


def test_halved_micro_batches_grow_back_after_clean_rounds(monkeypatch):
    learner = _learner(oom_regrow_rounds=2)
    groups = _signal(learner.generate(learner.sample_questions("w", 0), seed=2)[0])
    real = learner.model.transformer.forward
    monkeypatch.setattr(learner.model.transformer, "forward", lambda *a, **k: (
        (_ for _ in ()).throw(torch.OutOfMemoryError("fake")) if k["input_ids"].shape[0] > 4 else real(*a, **k)))
    first = learner.train(groups)
    assert first.micro_batch_size == 4 and learner.micro.tokens > 0
    monkeypatch.undo()
    learner.train(groups)
    assert learner.micro.tokens > 0  # one clean round is not enough
    learner.train(groups)
    assert learner.micro.tokens == 0  # back to the configured "no limit" (a CPU's auto)
    assert learner.train(groups).micro_batch_size == 8


# --- the reused static KV cache ---------------------------------------------------------------------

def test_one_static_cache_is_reused_and_samples_what_the_dynamic_cache_does():
    compiled, plain = _learner(compile_generate=True), _learner()
    questions = plain.sample_questions("w", 1)
    first, _ = compiled.generate(questions, seed=9)
    (cache,) = compiled._static_caches.values()
    pointers = [layer.keys.data_ptr() for layer in cache.layers]
    second, _ = compiled.generate(questions, seed=9)
    assert list(compiled._static_caches.values()) == [cache]
    assert [layer.keys.data_ptr() for layer in cache.layers] == pointers  # same tensors: CUDA graphs stay valid
    expected, _ = plain.generate(questions, seed=9)
    tokens = [[c.token_ids for c in g.completions] for g in expected]
    assert [[c.token_ids for c in g.completions] for g in first] == tokens
    assert [[c.token_ids for c in g.completions] for g in second] == tokens  # the reset cache holds nothing old


def test_sample_completions_accepts_a_cache_object():
    model, tok = build_tiny_gpt2(seed=5)
    from sapo.rollouts import make_static_cache

    prompts = [tok("Copy this word: apple", add_special_tokens=False)["input_ids"]]
    kw = dict(num_generations=2, max_new_tokens=6, temperature=1.0, top_p=1.0, seed=4)
    cache = make_static_cache(model, 2, 64)
    assert ([[c.token_ids for c in g] for g in sample_completions(model, tok, prompts, cache=cache, **kw)]
            == [[c.token_ids for c in g] for g in sample_completions(model, tok, prompts, **kw)])
