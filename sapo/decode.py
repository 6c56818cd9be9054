"""Sampling without ``generate``: prefill each prompt once, then one token per step (the CPU default).

Shapes: P prompts, G completions each, B = P * G rows (prompt-major), Lp = padded prompt width, Tn = new
tokens, V = vocabulary, C = width, H = heads, D = head width.

On a CPU the model is small next to the Python around it. For builtin:tiny-gpt2 (8 rows, ~190-token
prompts, 1 thread) a decoding step of the model's forward takes ~0.9 ms, ~0.5 ms of it tensor work and the
rest transformers' wrappers (mask creation, output capturing, config look-ups); ``generate`` adds ~0.8 ms a
step (input preparation, an ``inspect.signature`` per logits processor per step, stopping criteria,
growing tensors) and prefills every prompt G times. This loop keeps the tensor work only.

It samples exactly what ``model.generate(do_sample=True, top_k=0, temperature=t, top_p=p, ...)`` samples
as :func:`sapo.rollouts.sample_completions` calls it: the same forward on the same inputs (left padding,
positions from the attention mask, a dynamic KV cache, logits of the last position only), transformers'
logits processors in generate's order, the same float32 softmax and ``torch.multinomial`` on the global
generator over every row (finished ones too, so the generator advances the same), finished rows fed the pad
token, and the same stop (every row past EOS, or ``max_new_tokens``). Where it leaves generate's path:

- the prefill runs the P distinct prompts, not B rows, and repeats their cache and logits G times: each
  row's numbers do not depend on the other rows of the batch;
- for GPT-2 with SDPA attention a decoding step is our own short forward through the model's weights
  (:class:`_Gpt2Decoder`): the same ATen ops on the same values as transformers' GPT-2 forward, the keys and
  values written in place into one buffer instead of concatenated. Its first step also runs through the
  model's forward and the two are compared bit for bit; on any difference (another transformers version, a
  patched module) the model's forward decodes the rest.

tests/test_decode.py checks token-for-token equality with ``generate`` (temperatures, top-p, EOS, left
padding, minimum lengths, bfloat16 autocast, other models). Anything this loop does not reproduce (a
generation config with repetition penalties and the like, a model whose ``generate`` is overridden,
encoder-decoders, transformers 4) keeps ``generate``: :func:`unsupported` says why. On CUDA the prefill's
smaller batch could pick other kernels; equality is only tested on the CPU, and ``sapo.decode: auto`` keeps
(compiled) generate on CUDA.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

# Generation-config fields this loop reproduces or that sample_completions passes to generate anyway.
_PLAIN_GENERATION_FIELDS = {
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version", "do_sample",
    "temperature", "top_p", "top_k", "max_length", "max_new_tokens", "use_cache", "output_attentions",
    "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
}


def unsupported(model) -> str | None:
    """Why this loop cannot stand in for ``model.generate`` (None: it can, bit for bit)."""
    import transformers
    from transformers import GenerationMixin

    if int(transformers.__version__.split(".")[0]) < 5:
        return f"transformers {transformers.__version__} (the loop follows transformers 5's generate)"
    if getattr(model.generate, "__func__", None) is not GenerationMixin.generate:
        return "the model's generate is overridden"
    if type(model).prepare_inputs_for_generation is not GenerationMixin.prepare_inputs_for_generation:
        return "the model prepares its own generation inputs"
    if getattr(model.config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    params = set(inspect.signature(model.forward).parameters)
    if not {"position_ids", "logits_to_keep", "use_cache"} <= params or not _cache_keyword(params):
        return "its forward takes no position_ids, logits_to_keep or cache"
    gc, default = model.generation_config, _default_generation_config()
    # Set fields other than ours could add a logits processor or change the loop: generate handles them.
    extra = sorted(k for k, v in vars(gc).items()
                   if not k.startswith("_") and k not in _PLAIN_GENERATION_FIELDS and v != default.get(k))
    if extra:
        return f"its generation config sets {extra}"
    if not gc.use_cache or gc.output_scores or gc.output_logits or gc.return_dict_in_generate:
        return "its generation config asks for no cache or for extra outputs"
    return None


@functools.lru_cache(maxsize=1)
def _default_generation_config() -> dict:
    """A default ``GenerationConfig``'s fields (building one costs ~0.2 ms: once per process)."""
    from transformers import GenerationConfig

    return dict(vars(GenerationConfig()))


def _cache_keyword(forward_parameters) -> str | None:
    """The forward's keyword for a KV cache: ``cache`` in late transformers 5 releases, ``past_key_values`` before."""
    return next((name for name in ("cache", "past_key_values") if name in forward_parameters), None)


def _logits_processors(prompt_width: int, *, temperature: float, top_p: float, eos_id: int | None,
                       suppress: list[int] | None, min_new_tokens: int | None, device) -> list:
    """transformers' own processors, in the order ``generate`` builds them for our arguments."""
    from transformers.generation.logits_process import (
        MinNewTokensLengthLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper)

    procs = []
    if min_new_tokens and eos_id is not None:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_width, min_new_tokens, eos_id, device=device))
    if suppress:
        procs.append(_Suppress(suppress, device))
    if temperature == 0:
        return procs  # greedy: generate(do_sample=False) applies no warpers
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))  # top_k=0: no top-k warper, as the caller asks generate
    return procs


class _Suppress:
    """transformers' ``SuppressTokensLogitsProcessor`` (suppressed tokens' scores set to -inf) with its token
    mask built once instead of every step."""

    def __init__(self, tokens: list[int], device):
        self.tokens, self.device, self.mask = torch.tensor(tokens, device=device), device, None

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        if self.mask is None or self.mask.shape[-1] != scores.shape[-1]:
            self.mask = torch.isin(torch.arange(scores.shape[-1], device=scores.device), self.tokens)  # (V,)
        return torch.where(self.mask, -float("inf"), scores)


@torch.inference_mode()
def lean_sample(model, prompt_ids: torch.Tensor, attention_mask: torch.Tensor, *, num_generations: int,
                max_new_tokens: int, temperature: float, top_p: float, pad_id: int, eos_id: int | None,
                suppress: list[int] | None = None, min_new_tokens: int | None = None) -> torch.Tensor:
    """New tokens for G completions of each left-padded prompt: (P * G, T) prompt-major, T <= max_new_tokens.

    ``prompt_ids``/``attention_mask``: (P, Lp), one row per distinct prompt. Rows that stopped are padded
    with ``pad_id`` after their EOS, and the loop ends when every row has stopped, as generate's output does.
    The caller seeds the global generator and puts the model in eval mode.
    """
    G, device = num_generations, prompt_ids.device
    P, Lp = prompt_ids.shape
    B = P * G
    procs = _logits_processors(Lp, temperature=temperature, top_p=top_p, eos_id=eos_id, suppress=suppress,
                               min_new_tokens=min_new_tokens, device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # (P, Lp), as generate
    # Rows' ids (prompt, then new tokens) and their attention mask, both for every step at once.
    seqs = torch.full((B, Lp + max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, Lp + Tn)
    seqs[:, :Lp] = prompt_ids.repeat_interleave(G, dim=0)
    mask = torch.ones((B, Lp + max_new_tokens), dtype=attention_mask.dtype, device=device)  # (B, Lp + Tn)
    mask[:, :Lp] = attention_mask.repeat_interleave(G, dim=0)
    positions = position_ids[:, -1:].repeat_interleave(G, dim=0)  # (B, 1)

    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    cache_kw = _cache_keyword(inspect.signature(model.forward).parameters)
    out = model(input_ids=prompt_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=1, **{cache_kw: cache})  # each prompt once: (P, 1, V)
    logits = out.logits[:, -1].to(copy=True, dtype=torch.float32).repeat_interleave(G, dim=0)  # (B, V)
    del out
    cache.batch_repeat_interleave(G)  # the same keys and values for the G rows of a prompt
    decoder = _ModelDecoder(model, cache, cache_kw)
    decoder = _Gpt2Decoder.attach(decoder, padded=bool((attention_mask == 0).any()), room=max_new_tokens) or decoder

    unfinished = torch.ones(B, dtype=torch.bool, device=device)  # (B,)
    pad = torch.tensor(pad_id, device=device)
    t = 0
    while True:
        scores = logits
        if procs:
            so_far = seqs[:, : Lp + t]  # (B, Lp + t): the ids generate's processors see
            for proc in procs:
                scores = proc(so_far, scores)
        if temperature == 0:  # greedy, as generate(do_sample=False): the argmax, no random draw
            tokens = scores.argmax(dim=-1)  # (B,)
        else:
            probs = F.softmax(scores, dim=-1)
            tokens = torch.multinomial(probs, num_samples=1).squeeze(1)  # (B,)
        if eos_id is not None:  # generate pads rows that already stopped, and only when it knows an EOS
            tokens = torch.where(unfinished, tokens, pad)
            unfinished &= tokens != eos_id
        seqs[:, Lp + t] = tokens
        t += 1
        if t == max_new_tokens or not bool(unfinished.any()):
            break
        positions = positions + 1
        logits = decoder.step(tokens, positions, mask[:, : Lp + t])
    return seqs[:, Lp: Lp + t]


class _ModelDecoder:
    """generate's decoding step: the model's forward on one new token per row, with transformers' cache."""

    def __init__(self, model, cache, cache_kw: str):
        self.model, self.cache, self.cache_kw = model, cache, cache_kw

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, mask2d: torch.Tensor) -> torch.Tensor:
        """Float32 logits (B, V) for ``tokens`` (B,) at ``positions`` (B, 1); ``mask2d`` (B, Lp + t) covers them."""
        out = self.model(input_ids=tokens[:, None], attention_mask=mask2d, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self.cache_kw: self.cache})
        return out.logits[:, -1].to(copy=True, dtype=torch.float32)


class _Gpt2Decoder:
    """One GPT-2 decoding step through the model's own weights, without transformers' wrappers.

    Mirrors ``GPT2Model.forward`` + ``GPT2Attention`` + ``sdpa_attention_forward`` (transformers 5) for one new
    token per row: the same ops in the same order on the same values, so the same bits. Its first step also
    runs through the model's forward and the two are compared; on a difference (another transformers
    version, a patched module) the model's forward, whose cache holds the state, decodes the rest.
    """

    def __init__(self, fallback: _ModelDecoder, padded: bool, room: int):
        self.model, self.fallback, self.padded, self.room = fallback.model, fallback, padded, room
        # From the first step on, per layer: keys and values (B, H, Lp + room, D) filled up to ``length``,
        # written in place, so that a step copies one position instead of the whole cache (torch.cat).
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.length = 0
        self.trusted: bool | None = None  # None until the first step has been compared

    @classmethod
    def attach(cls, fallback: _ModelDecoder, padded: bool, room: int) -> "_Gpt2Decoder | None":
        """A decoder for a plain GPT-2 with SDPA attention and standard modules (None for any other model)."""
        from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2Block, GPT2LMHeadModel
        from transformers.pytorch_utils import Conv1D

        model = fallback.model
        if type(model) is not GPT2LMHeadModel or not hasattr(fallback.cache, "layers"):
            return None
        config, tr = model.config, model.transformer
        kinds = [(tr.wte, torch.nn.Embedding), (tr.wpe, torch.nn.Embedding), (tr.ln_f, torch.nn.LayerNorm),
                 (model.lm_head, torch.nn.Linear)]
        for b in tr.h:
            kinds += [(b, GPT2Block), (b.attn, GPT2Attention), (b.ln_1, torch.nn.LayerNorm),
                      (b.ln_2, torch.nn.LayerNorm), (b.attn.c_attn, Conv1D), (b.attn.c_proj, Conv1D),
                      (b.mlp.c_fc, Conv1D), (b.mlp.c_proj, Conv1D)]
        if (config._attn_implementation != "sdpa" or config.add_cross_attention or model.training
                or model.lm_head.bias is not None or any(type(m) is not kind for m, kind in kinds)):
            return None
        return cls(fallback, padded, room)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, mask2d: torch.Tensor) -> torch.Tensor:
        """Float32 logits (B, V) for ``tokens`` (B,) at ``positions`` (B, 1); ``mask2d`` (B, Lp + t) covers them."""
        if self.trusted is False:
            return self.fallback.step(tokens, positions, mask2d)
        if self.trusted is None:
            layers = self.fallback.cache.layers
            self.kv = [(_with_room(layer.keys, self.room), _with_room(layer.values, self.room)) for layer in layers]
            self.length = layers[0].keys.shape[2]
        logits = self._forward(tokens, positions, mask2d)
        self.length += 1
        if self.trusted is None:  # the first step: the model's own forward must give the same bits
            expected = self.fallback.step(tokens, positions, mask2d)
            self.trusted = torch.equal(logits, expected)
            if not self.trusted:
                return expected
            self.fallback.cache = None  # ours from here on: free transformers' copy of the keys and values
        return logits

    def _forward(self, tokens, positions, mask2d):
        tr = self.model.transformer
        # transformers' SDPA mask for one query per row: None without padding, else the padding mask as bool.
        attn_mask = mask2d.bool()[:, None, None, :] if self.padded else None  # (B, 1, 1, Lp + t)
        hidden = tr.wte(tokens[:, None]) + tr.wpe(positions)  # (B, 1, C); dropouts are identities in eval mode
        n = self.length  # positions cached so far; this step's keys and values go to position n
        for block, (keys, values) in zip(tr.h, self.kv):
            attn, mlp = block.attn, block.mlp
            q, k, v = _conv1d(attn.c_attn, _norm(block.ln_1, hidden)).split(attn.split_size, dim=2)  # (B, 1, C)
            q, k, v = (x.view(*x.shape[:-1], -1, attn.head_dim).transpose(1, 2) for x in (q, k, v))  # (B, H, 1, D)
            keys[:, :, n: n + 1], values[:, :, n: n + 1] = k, v
            k, v = keys[:, :, : n + 1], values[:, :, : n + 1]  # (B, H, Lp + t, D), views
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0, scale=attn.scaling,
                                               is_causal=False)  # (B, H, 1, D)
            y = y.reshape(y.shape[0], -1, 1, v.shape[-1]).transpose(1, 2).contiguous()  # (B, 1, H, D)
            y = y.reshape(*y.shape[:-2], -1).contiguous()  # (B, 1, C)
            hidden = _conv1d(attn.c_proj, y) + hidden
            hidden = hidden + _conv1d(mlp.c_proj, mlp.act(_conv1d(mlp.c_fc, _norm(block.ln_2, hidden))))
        hidden = _norm(tr.ln_f, hidden)
        logits = F.linear(hidden[:, -1:, :], self.model.lm_head.weight)  # (B, 1, V)
        return logits[:, -1].to(copy=True, dtype=torch.float32)


def _with_room(x: torch.Tensor, room: int) -> torch.Tensor:
    """``x`` (B, H, L, D) copied into a buffer with ``room`` more positions along L."""
    buf = x.new_empty((*x.shape[:2], x.shape[2] + room, x.shape[3]))
    buf[:, :, : x.shape[2]] = x
    return buf


def _conv1d(layer, x: torch.Tensor) -> torch.Tensor:
    """transformers' ``Conv1D.forward`` (x @ W + b, W stored (in, out)) without the module call."""
    return torch.addmm(layer.bias, x.view(-1, x.size(-1)), layer.weight).view(*x.shape[:-1], layer.nf)


def _norm(layer: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``nn.LayerNorm.forward`` without the module call."""
    return F.layer_norm(x, layer.normalized_shape, layer.weight, layer.bias, layer.eps)
