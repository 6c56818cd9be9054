"""``builtin:gpt2-124m``: GPT-2 small's shape with random weights and a 50257-token in-process tokenizer.

Building it takes a few seconds on a CPU (most of it the 124M-parameter random init), so the tests that
build the model are marked slow; the tokenizer-only ones are not.
"""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from node.config import resolve_config
from sapo.config import BUILTIN_MODELS
from sapo.tiny_model import GPT2_VOCAB_SIZE, build_builtin, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Question: What is 17 + 25?\n<answer>42</answer>\nUnicode: café, 日本語 🙂"
GPT2_SMALL_PARAMS = 124_439_808  # openai-community/gpt2, tied embeddings


def _fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().float().flatten()[::9973].numpy().tobytes())
    return h.hexdigest()


def test_gpt2_124m_tokenizer_has_gpt2_vocab_size_and_round_trips():
    tok = build_tokenizer(GPT2_VOCAB_SIZE)
    assert len(tok) == GPT2_VOCAB_SIZE == 50257
    assert tok.decode(tok(TEXT)["input_ids"]) == TEXT
    assert tok.pad_token_id != tok.eos_token_id
    # Every id decodes to text (no holes in the vocabulary).
    assert all(tok.convert_ids_to_tokens(i) is not None for i in range(0, GPT2_VOCAB_SIZE, 997))
    assert "builtin:gpt2-124m" in BUILTIN_MODELS


def test_gpt2_124m_is_accepted_by_the_config(tmp_path):
    config = resolve_config(None, environ={}, overrides=["model.name=builtin:gpt2-124m"])
    assert config.model.name == "builtin:gpt2-124m"


@pytest.mark.slow
def test_gpt2_124m_shape_and_determinism():
    model, tok = build_builtin("builtin:gpt2-124m", seed=7)
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions, cfg.vocab_size) == (12, 12, 768, 1024, 50257)
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - GPT2_SMALL_PARAMS) < 1_000_000
    assert model.get_input_embeddings().weight.shape == (50257, 768)
    assert cfg.pad_token_id == tok.pad_token_id and cfg.eos_token_id == tok.eos_token_id
    first = _fingerprint(model)
    again, _ = build_builtin("builtin:gpt2-124m", seed=7)
    assert _fingerprint(again) == first
    del again
    other, _ = build_builtin("builtin:gpt2-124m", seed=8)
    assert _fingerprint(other) != first


@pytest.mark.slow
def test_gpt2_124m_tokenizer_is_identical_across_processes():
    code = ("import hashlib; from sapo.tiny_model import _tokenizer_json; "
            "print(hashlib.sha256(_tokenizer_json(50257).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip() for _ in range(2)}
    assert len(digests) == 1
