"""Sampling G completions for each of I prompts in one batch: ``generate``, or our lean loop (:mod:`sapo.decode`).

Shapes: P prompts, G completions each, B = P * G sequences, Lp = longest prompt, Tn = new tokens.

Sampling runs on a left-padded batch (what decoder-only ``generate`` needs). Training later rebuilds each
sequence as ``prompt tokens + completion tokens`` right-padded (see :mod:`sapo.batch`): no pad token ever
sits between a prompt and its completion. The reference trainer re-tokenised decoded text with left
padding, which put pads inside sequences and shifted positions; we keep the sampled token ids instead.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field

import torch

from sapo.tasks import Question


@dataclass
class Completion:
    """One sampled completion: the exact token ids (EOS included when the model stopped) and its text."""

    token_ids: list[int]
    text: str
    finished: bool  # the model emitted EOS before max_new_tokens


@dataclass
class Group:
    """One question with G completions: the unit GRPO normalises over and SAPO shares.

    ``source`` is the node that generated it (our own id for local groups). ``rewards`` are always our
    own scores: for external groups they come from local re-scoring, never from the peer.
    """

    question: Question | None
    prompt: str
    prompt_ids: list[int]
    completions: list[Completion]
    rewards: list[float] = field(default_factory=list)
    source: str = ""
    batch_id: str = ""

    @property
    def is_informative(self) -> bool:
        """A group whose rewards all agree has zero advantage everywhere: no learning signal."""
        return len(set(self.rewards)) > 1


def encode_prompt(tokenizer, prompt: str, max_prompt_tokens: int) -> list[int]:
    """Token ids of a prompt, cut from the left to ``max_prompt_tokens`` (the question's end matters most).

    ``add_special_tokens=False``: chat templates already carry their special tokens, and GPT-2 adds none.
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ids[-max_prompt_tokens:]


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def split_completion(new_tokens: list[int], eos_id: int | None) -> tuple[list[int], bool]:
    """Cut a generated row at its first EOS (kept) and drop trailing padding."""
    if eos_id is not None and eos_id in new_tokens:
        end = new_tokens.index(eos_id)
        return new_tokens[: end + 1], True
    # No EOS: the row ran to max_new_tokens, and generate pads only rows that already finished.
    return list(new_tokens), False


def decode_completion(tokenizer, token_ids: list[int]) -> str:
    """The text a peer sees: special tokens (EOS) removed."""
    return tokenizer.decode(token_ids, skip_special_tokens=True)


def max_positions(model) -> int | None:
    """The longest sequence the model's position embeddings allow, when its config says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def make_static_cache(model, rows: int, max_len: int):
    """A static KV cache of ``max_len`` positions for ``rows`` sequences, to pass to :func:`sample_completions`
    (and reuse) with ``cache=``. Its tensors are allocated by the first generate that uses it."""
    from transformers import StaticCache

    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    kwargs = {"config": config, "max_cache_len": max_len}
    if "max_batch_size" in inspect.signature(StaticCache.__init__).parameters:  # transformers 4.x allocates now
        param = next(model.parameters())
        kwargs.update(max_batch_size=rows, device=param.device, dtype=param.dtype)
    return StaticCache(**kwargs)


def _cache_argument() -> str:
    """``generate``'s keyword for a cache object: ``past_key_values`` up to transformers 5 (late 5.x releases
    accept it with a FutureWarning, renamed ``cache``), ``cache`` from 6 on, where the old name is gone."""
    import transformers

    return "cache" if int(transformers.__version__.split(".")[0]) >= 6 else "past_key_values"


def choose_decode(model, decode: str, cache=None) -> str:
    """The loop that samples: ``"lean"`` (:mod:`sapo.decode`) or ``"generate"``.

    ``decode`` is ``sapo.decode``: "generate", "lean" (our loop wherever it reproduces generate exactly, else
    generate) or "auto" (lean on a CPU, generate elsewhere). A static cache means compiled generate.
    """
    from sapo.decode import unsupported

    device = next(model.parameters()).device
    if cache is not None or decode == "generate" or (decode == "auto" and device.type != "cpu"):
        return "generate"
    return "generate" if unsupported(model) else "lean"


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    num_generations: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None = None,
    min_new_tokens: int | None = None,
    cache=None,
    decode: str = "auto",
) -> list[list[Completion]]:
    """G completions for each prompt, all in one batch; returns ``[prompt][g]``.

    ``decode``: "generate" (one ``generate`` call), "lean" (:func:`sapo.decode.lean_sample`: the same tokens
    bit for bit, without generate's per-step overhead and with each prompt prefilled once) or "auto" (lean on
    a CPU); see :func:`choose_decode`.
    ``cache``: a static KV cache from :func:`make_static_cache` for exactly P * G rows, reset and reused
    (None: transformers' growing dynamic cache); it implies generate. Its shape and tensors stay the same
    from round to round, so on CUDA transformers compiles the decoding step once (its auto-compile for static
    caches) and the CUDA graphs recorded for it stay valid.
    ``min_new_tokens``: never stop before that many tokens (the start-up warm-up's worst case).
    ``temperature=0``: greedy decoding (the argmax at every step; ``top_p`` and the seed do not matter).
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    if seed is not None:
        torch.manual_seed(seed)  # also seeds every CUDA device
    # A pad token distinct from EOS is not text: never sample it (it would also confuse masks later).
    suppress = [pad_id] if pad_id != eos_id else None
    was_training = model.training
    model.eval()
    try:
        if choose_decode(model, decode, cache) == "lean":
            from sapo.decode import lean_sample

            ids, mask = _left_pad(prompt_ids, pad_id, device)  # (P, Lp): each prompt once
            new = lean_sample(model, ids, mask, num_generations=num_generations, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, pad_id=pad_id, eos_id=eos_id, suppress=suppress,
                              min_new_tokens=min_new_tokens)  # (B, Tn)
        else:
            new = _generate(model, prompt_ids, num_generations=num_generations, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, pad_id=pad_id, eos_id=eos_id, suppress=suppress,
                            min_new_tokens=min_new_tokens, cache=cache)  # (B, Tn)
    finally:
        model.train(was_training)
    return _groups_of(tokenizer, new.tolist(), len(prompt_ids), num_generations)


def _generate(model, prompt_ids, *, num_generations, max_new_tokens, temperature, top_p, pad_id, eos_id, suppress,
              min_new_tokens, cache) -> torch.Tensor:
    """New tokens (B, Tn) from one ``generate`` call over the prompt-major rows."""
    rows = [ids for ids in prompt_ids for _ in range(num_generations)]  # B = P * G, prompt-major
    input_ids, attention_mask = _left_pad(rows, pad_id, next(model.parameters()).device)  # (B, Lp)
    extra = {}
    if cache is not None:
        cache.reset()
        extra[_cache_argument()] = cache
    if min_new_tokens:
        extra["min_new_tokens"] = min_new_tokens
    if temperature == 0:  # greedy: the argmax at every step
        sampling = dict(do_sample=False)
    else:  # pure temperature/nucleus sampling; transformers defaults top_k to 50
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **sampling,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            suppress_tokens=suppress,
            **extra,
        )  # (B, Lp + Tn)
    return out[:, input_ids.shape[1]:]


def _groups_of(tokenizer, new_tokens: list[list[int]], prompts: int, num_generations: int) -> list[list[Completion]]:
    """Prompt-major generated rows (B, Tn) -> ``[prompt][g]`` completions, each cut at its first EOS."""
    groups: list[list[Completion]] = []
    for p in range(prompts):
        group = []
        for g in range(num_generations):
            ids, finished = split_completion(new_tokens[p * num_generations + g], tokenizer.eos_token_id)
            group.append(Completion(token_ids=ids, text=decode_completion(tokenizer, ids), finished=finished))
        groups.append(group)
    return groups


def encode_completion(tokenizer, text: str, finished: bool, max_new_tokens: int) -> Completion:
    """Rebuild a peer's completion from its text with our tokenizer (we train on our own token ids)."""
    finished = finished and tokenizer.eos_token_id is not None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_new_tokens - int(finished)]
    if finished:
        ids.append(tokenizer.eos_token_id)
    return Completion(token_ids=ids, text=text, finished=finished)
