"""The built-in tiny GPT-2 and node.models.load_model: determinism, tokenizer round trips, HF save/load, errors."""

import time

import pytest
import torch

from node.models import LoadedModel, ModelLoadError, access_token, load_model, resolve_dtype, use_fused_gelu
from sapo.tiny_model import build_builtin, build_tiny_gpt2, build_tokenizer

REASONING_TEXT = (
    "Question: What is 17 + 25?\n"
    "<think>\n17 + 25 = 42, so   the answer is 42.\t</think>\n"
    "<answer>42</answer>\n"
    "Unicode: café, 日本語, ∑x², emoji 🙂, Monday → Tuesday"
)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- the built-in model ----


def test_tiny_model_is_deterministic_per_seed():
    m1, _ = build_tiny_gpt2(seed=3)
    m2, _ = build_tiny_gpt2(seed=3)
    m3, _ = build_tiny_gpt2(seed=4)
    assert _same_state(m1, m2)
    assert not _same_state(m1, m3)


def test_tiny_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny_gpt2(seed=0)
    torch.testing.assert_close(torch.rand(4), expected)


def test_tiny_model_size_and_special_ids():
    model, tok = build_tiny_gpt2()
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 <= n_params <= 1_000_000
    vocab = model.config.vocab_size
    assert vocab == len(tok)
    for token_id in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                     model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id):
        assert token_id is not None and 0 <= token_id < vocab
    assert tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert next(model.parameters()).dtype == torch.float32


def test_build_builtin_dispatch():
    model, _ = build_builtin("builtin:tiny-gpt2", seed=1)
    assert _same_state(model, build_tiny_gpt2(seed=1)[0])
    with pytest.raises(ValueError, match="builtin:tiny-gpt2"):
        build_builtin("builtin:nope", seed=0)


# ---- the built-in tokenizer ----


def test_tokenizer_is_deterministic_fast_and_fresh():
    start = time.perf_counter()
    a = build_tokenizer()
    assert time.perf_counter() - start < 1.0
    b = build_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert 256 < len(a) <= 520
    assert a.model_max_length == 1024
    assert a.chat_template is None
    a.padding_side = "left"  # callers may mutate their copy...
    assert build_tokenizer().padding_side == "right"  # ...without touching anyone else's


def test_tokenizer_round_trips_reasoning_text():
    tok = build_tokenizer()
    ids = tok(REASONING_TEXT)["input_ids"]
    assert tok.eos_token_id not in ids and tok.pad_token_id not in ids  # no special tokens added
    assert tok.decode(ids) == REASONING_TEXT
    assert tok.decode(tok("<answer>42</answer>")["input_ids"]) == "<answer>42</answer>"
    # The corpus taught it common pieces: far fewer tokens than bytes.
    assert len(tok("<answer>Monday</answer>")["input_ids"]) < len("<answer>Monday</answer>") // 2


def test_tiny_model_generates_for_left_padded_batch():
    model, tok = build_tiny_gpt2()
    tok.padding_side = "left"
    batch = tok(["What is 2 + 2?", "Think step by step about Monday."], return_tensors="pt", padding=True)
    assert (batch["input_ids"][0] == tok.pad_token_id).any()  # the shorter prompt really is padded
    torch.manual_seed(0)
    out = model.generate(**batch, max_new_tokens=5, do_sample=True, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 2
    assert batch["input_ids"].shape[1] < out.shape[1] <= batch["input_ids"].shape[1] + 5


# ---- node.models.load_model ----


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="allowed"):
        resolve_dtype("int8", "cpu")


def test_access_token_precedence(monkeypatch):
    monkeypatch.delenv("HUGGINGFACE_ACCESS_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert access_token() is None
    monkeypatch.setenv("HF_TOKEN", "hf")
    assert access_token() == "hf"
    monkeypatch.setenv("HUGGINGFACE_ACCESS_TOKEN", "seed")
    assert access_token() == "seed"
    assert access_token("explicit") == "explicit"


def test_load_builtin():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    loaded = load_model("builtin:tiny-gpt2", seed=5, dtype="auto")
    torch.testing.assert_close(torch.rand(4), expected)  # the caller's RNG is untouched
    assert isinstance(loaded, LoadedModel)
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert loaded.name == "builtin:tiny-gpt2"
    assert _same_state(loaded.model, build_tiny_gpt2(seed=5)[0])
    assert load_model("builtin:tiny-gpt2", dtype="bfloat16").model.dtype == torch.bfloat16


def test_load_saved_model_matches_original(tmp_path):
    model, tok = build_tiny_gpt2(seed=7)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    loaded = load_model(str(tmp_path), dtype="float32")
    assert loaded.dtype == torch.float32
    assert loaded.tokenizer(REASONING_TEXT)["input_ids"] == tok(REASONING_TEXT)["input_ids"]
    assert loaded.tokenizer.decode(loaded.tokenizer(REASONING_TEXT)["input_ids"]) == REASONING_TEXT
    assert loaded.tokenizer.pad_token_id == tok.pad_token_id
    ids = torch.tensor([tok(REASONING_TEXT)["input_ids"]])
    with torch.no_grad():
        use_fused_gelu(model)  # load_model swaps GPT-2's activation; the weights must come back bit for bit
        torch.testing.assert_close(loaded.model(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)

    bf16 = load_model(str(tmp_path), dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())


def test_missing_pad_token_falls_back_to_eos(tmp_path):
    model, tok = build_tiny_gpt2()
    tok.pad_token = None
    model.config.pad_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.tokenizer.pad_token_id == tok.eos_token_id
    assert loaded.model.config.pad_token_id == tok.eos_token_id


def test_unknown_hub_name_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "nobody-sapo-test/no-such-model"
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=name) as info:
        load_model(name)
    assert time.perf_counter() - start < 5.0
    assert "no network" in str(info.value)


def test_missing_local_directory(tmp_path):
    missing = str(tmp_path / "nothing-here")
    with pytest.raises(ModelLoadError, match="no such local directory"):
        load_model(missing)


def test_unknown_builtin_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="builtin:nope.*allowed: builtin:tiny-gpt2"):
        load_model("builtin:nope")


def test_gpt2_gelu_becomes_the_fused_kernel_with_the_same_outputs(tmp_path):
    from transformers.activations import GELUTanh, NewGELUActivation

    original, tok = build_tiny_gpt2(seed=4)
    original.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32").model
    acts = [type(m) for m in loaded.modules() if isinstance(m, (GELUTanh, NewGELUActivation))]
    assert acts and set(acts) == {GELUTanh}
    assert loaded.config.activation_function == "gelu_pytorch_tanh"
    ids = torch.tensor([tok(REASONING_TEXT)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, original.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(GELUTanh()(x), NewGELUActivation()(x), rtol=1e-6, atol=1e-6)
    loaded.save_pretrained(tmp_path / "again")  # what `swarm export` will write loads with the fused kernel too
    again = load_model(str(tmp_path / "again"), dtype="float32").model
    assert {type(m) for m in again.modules() if isinstance(m, (GELUTanh, NewGELUActivation))} == {GELUTanh}
