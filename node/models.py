"""Load the policy model and its tokenizer by name: a built-in (``builtin:*``), a Hub id or a local directory.

Every failure comes out as one :class:`ModelLoadError` naming the model and saying what to do about it
(no network, gated repository, bad path), so a worker can log one line and exit. Weights go to the
device with ``.to(device)``, never ``device_map``: several worker processes share one GPU and each must
own exactly the copy it loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from huggingface_hub.utils import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sapo.tiny_model import build_builtin

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKEN_ENV_VARS = ("HUGGINGFACE_ACCESS_TOKEN", "HF_TOKEN")  # the seeds' name first, then the Hub's own
_TRUE = {"1", "ON", "YES", "TRUE"}


class ModelLoadError(RuntimeError):
    """A model that could not be loaded; the message names the model and the likely cause."""


@dataclass
class LoadedModel:
    """A model ready to use: weights on ``device`` in ``dtype``, and a tokenizer that has a pad token."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    dtype: torch.dtype
    device: torch.device


def resolve_dtype(dtype: str, device: str | torch.device) -> torch.dtype:
    """The torch dtype for a config value: "auto" is bfloat16 on a CUDA device that supports it, else float32."""
    if dtype == "auto":
        device = torch.device(device)
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def access_token(token: str | None = None) -> str | None:
    """The Hub token: ``token`` if given, else $HUGGINGFACE_ACCESS_TOKEN, else $HF_TOKEN, else None."""
    if token:
        return token
    for var in TOKEN_ENV_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; reading it per call also honours late changes.
    return any(os.environ.get(var, "").upper() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.isabs(name)


def _explain(name: str, exc: BaseException, token: str | None) -> str:
    """A one-line cause for ``exc``, looking through the chain for the Hub error transformers wraps."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    kinds = tuple(type(e) for e in chain)
    if any(issubclass(k, GatedRepoError) for k in kinds) or "gated repo" in str(exc).lower():
        given = "the token given has no access" if token else "no token was given"
        return (f"it is a gated repository ({given}): accept its licence on huggingface.co and set "
                "HUGGINGFACE_ACCESS_TOKEN (or HF_TOKEN)")
    if any(issubclass(k, RepositoryNotFoundError) for k in kinds):
        return ("no such repository on the Hugging Face Hub (check the name; a private one needs "
                "HUGGINGFACE_ACCESS_TOKEN)")
    if any(issubclass(k, (LocalEntryNotFoundError, OfflineModeIsEnabled)) for k in kinds):
        why = "HF_HUB_OFFLINE is set" if _offline() else "the Hub could not be reached"
        return (f"not found locally and no network ({why}): download it into the Hugging Face cache first, "
                "or set model.name to a local directory")
    if _looks_like_path(name) and not os.path.isdir(os.path.expanduser(name)):
        return "no such local directory"
    if any(issubclass(k, HFValidationError) for k in kinds):
        return "neither a local directory nor a valid Hub id (namespace/name)"
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line}"


def _from_pretrained(
    name: str, token: str | None, dtype: torch.dtype, attn_implementation: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    offline = _offline()
    # Tokenizer first: it is small, so a bad name or missing access fails before any weights move.
    tokenizer = AutoTokenizer.from_pretrained(name, token=token, local_files_only=offline)
    # transformers >= 4.56 calls it ``dtype``; ``torch_dtype`` is deprecated.
    extra = {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, token=token, local_files_only=offline, **extra)
    return model, tokenizer


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Batched generation needs a pad token; most causal LMs ship without one, so pad with eos."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def use_fused_gelu(model: torch.nn.Module) -> int:
    """Swap GPT-2's ``gelu_new`` for ``gelu_pytorch_tanh``, the same tanh approximation in one kernel.

    ``gelu_new`` is a chain of Python-level ops that keeps ~5 intermediate tensors per layer for backward;
    the fused one keeps its input only. The config is updated too, so a saved model loads the same way.
    Returns how many activations were swapped.
    """
    from transformers.activations import ACT2FN, NewGELUActivation

    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, ACT2FN["gelu_pytorch_tanh"])
                swapped += 1
    config = getattr(model, "config", None)
    if swapped and getattr(config, "activation_function", None) == "gelu_new":
        config.activation_function = "gelu_pytorch_tanh"
    return swapped


def load_model(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "auto",
    seed: int = 0,
    token: str | None = None,
    attn_implementation: str = "auto",
) -> LoadedModel:
    """Load ``name`` (``builtin:*``, a Hub id or a local directory) onto ``device``, in eval mode.

    ``dtype`` is "auto", "float32", "bfloat16" or "float16" (see :func:`resolve_dtype`). Weights that
    are initialised rather than loaded (all of a built-in's, a fresh head's) depend only on ``seed``;
    the caller's global RNG is left alone. GPT-2's ``gelu_new`` becomes the identical fused
    ``gelu_pytorch_tanh`` (:func:`use_fused_gelu`). ``attn_implementation`` ("auto" = transformers' default, "sdpa",
    "eager") picks the attention kernel. Any failure raises :class:`ModelLoadError`.
    """
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    token = access_token(token)
    try:
        with torch.random.fork_rng(devices=[]):  # weights are initialised on the CPU, then moved
            torch.manual_seed(seed)
            if name.startswith("builtin:"):
                model, tokenizer = build_builtin(name, seed)
                model = model.to(dtype=torch_dtype)
                if attn_implementation != "auto":
                    model.set_attn_implementation(attn_implementation)
            else:
                # Already in ``torch_dtype``; a blanket cast would undo modules kept in float32 on purpose.
                model, tokenizer = _from_pretrained(name, token, torch_dtype, attn_implementation)
        _ensure_pad_token(model, tokenizer)
        use_fused_gelu(model)
        model = model.to(device).eval()
    except Exception as exc:  # one error type for the worker to report, whatever went wrong below
        raise ModelLoadError(f"cannot load model {name!r}: {_explain(name, exc, token)}") from exc
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, dtype=torch_dtype, device=device)
