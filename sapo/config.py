"""SAPO hyper-parameters and the small schema toolkit every config section is built with.

Each section is a frozen dataclass whose fields are declared with :func:`option` (default, help, and the
allowed values). :func:`from_mapping` turns a plain mapping (parsed YAML, env, ``--set``) into a section,
rejecting unknown keys, wrong types and out-of-range values with one :class:`ConfigError` that names the
field and says what is allowed. This module is pure: no torch, no files, so the supervisor can use it.

Defaults follow the SAPO paper (arXiv:2509.08721, §4 experimental setup) and Gensyn's reference GRPO
trainer (genrl ``GRPOTrainerModule``): KL beta 0, asymmetric clipping 0.2 / 0.28 ("clip-higher" from
DAPO, which the reference trainer uses), Adam with learning rate 1e-5 and no scheduler, temperature 1.0,
top_p 1.0, 256 new tokens.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


# Models built in-process (no files, no downloads); sapo.tiny_model builds them.
BUILTIN_MODELS = ("builtin:tiny-gpt2", "builtin:gpt2-124m")


class ConfigError(ValueError):
    """A user mistake in configuration; ``field`` is the dotted path of the offending field."""

    def __init__(self, field_path: str, message: str):
        self.field = field_path
        self.reason = message
        super().__init__(f"{field_path}: {message}" if field_path else message)

    def under(self, prefix: str) -> "ConfigError":
        """The same error with ``prefix.`` in front of the field path."""
        return ConfigError(f"{prefix}.{self.field}" if self.field else prefix, self.reason)


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    gt: float | None = None,
    choices: tuple | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """Declare a config field: its default, help text and allowed values.

    ``min``/``max`` are inclusive bounds, ``gt`` an exclusive lower bound, ``choices`` the legal values,
    ``check`` a callable returning an error message (or None) for anything else.
    """
    meta = {"help": help, "min": min, "max": max, "gt": gt, "choices": choices, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    if tp is bool:
        return "a boolean (true/false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    return getattr(tp, "__name__", str(tp))


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (no silent coercion beyond int -> float)."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(path, f"must be {_type_name(inner)}, got null")
    tp = inner
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_mapping(tp, value, path)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be a list, got {type(value).__name__}")
        return tuple(_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(tp):
            try:
                return _convert(value, alt, path)
            except ConfigError:
                continue
        names = " or ".join(_type_name(a) for a in typing.get_args(tp))
        raise ConfigError(path, f"must be {names}, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(path, f"must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a declaration mistake, not a user one
        raise TypeError(f"unsupported config type {tp!r} at {path}")
    raise ConfigError(path, f"must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def check_fields(obj: Any) -> None:
    """Validate every field of a config dataclass against its declared bounds and choices.

    Called from ``__post_init__`` so that sections built in code are as safe as those read from YAML.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        value = _convert(value, hints[f.name], f.name)
        object.__setattr__(obj, f.name, value)
        meta = f.metadata
        if meta.get("choices") is not None and value not in meta["choices"]:
            allowed = ", ".join(str(c) for c in meta["choices"])
            raise ConfigError(f.name, f"must be one of {allowed}; got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lo, hi, gt = meta.get("min"), meta.get("max"), meta.get("gt")
            if lo is not None and value < lo:
                raise ConfigError(f.name, f"must be >= {lo}; got {value!r}")
            if hi is not None and value > hi:
                raise ConfigError(f.name, f"must be <= {hi}; got {value!r}")
            if gt is not None and value <= gt:
                raise ConfigError(f.name, f"must be > {gt}; got {value!r}")
        if meta.get("check") is not None:
            problem = meta["check"](value)
            if problem:
                raise ConfigError(f.name, problem)


T = typing.TypeVar("T")


def from_mapping(cls: type[T], data: Any, path: str = "") -> T:
    """Build the dataclass ``cls`` from a mapping; unknown keys and bad values raise ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"must be a mapping of {cls.__name__} fields, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = key if isinstance(key, str) and key else repr(key)  # an empty or non-string key still gets a name
        sub = f"{path}.{name}" if path else name
        if key not in names:
            raise ConfigError(sub, f"unknown key; allowed keys: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], sub)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(path) if path else err


def to_mapping(obj: Any) -> Any:
    """The plain (JSON/YAML-ready) form of a config dataclass; tuples become lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    return obj


def describe(cls: type) -> list[tuple[str, Any, str]]:
    """(name, default, help) for each field of a section: the source of the README's config table."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f.name, to_mapping(default), f.metadata.get("help", "")))
    return rows


@dataclass(frozen=True)
class TaskSpec:
    """One entry of the task mix: a reasoning-gym dataset (or a built-in toy task) and its weight."""

    name: str = option("basic_arithmetic", "reasoning-gym dataset name, or a built-in toy task (toy_*)")
    weight: float = option(1.0, "relative sampling weight", gt=0.0)

    def __post_init__(self):
        check_fields(self)


DEFAULT_TASKS = tuple(
    TaskSpec(name)
    for name in (
        "arc_1d",
        "basic_arithmetic",
        "base_conversion",
        "bf",
        "binary_matrix",
        "calendar_arithmetic",
        "decimal_arithmetic",
        "fraction_simplification",
        "propositional_logic",
    )
)


# Padded tokens per forward/backward on CUDA: two worst-case GPT-2 rows (768-token prompt + 256 new tokens), or
# ~5 typical ones; GPT-2 small's activations for them stay well under 1 GB in bfloat16 (docs/PERFORMANCE.md).
AUTO_CUDA_MICRO_BATCH_TOKENS = 2048


def _auto_or_bool(value: Any) -> str | None:
    if isinstance(value, bool) or value == "auto":
        return None
    return f"must be true, false or 'auto'; got {value!r}"


def _auto_or_count(value: Any) -> str | None:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return None
    return f"must be 'auto' or an integer >= 0; got {value!r}"


def _unique_tasks(tasks: tuple) -> str | None:
    names = [t.name for t in tasks]
    if not names:
        return "must list at least one task"
    if len(set(names)) != len(names):
        return f"task names must be unique; got {names}"
    return None


@dataclass(frozen=True)
class SapoConfig:
    """The algorithm's knobs: the I/J/G split, sampling, GRPO loss and optimiser."""

    num_train_samples: int = option(8, "I: local questions per round (env NUM_TRAIN_SAMPLES)", min=1)
    num_transplant_trees: int = option(
        0, "J: external question groups taken from peers per round (env NUM_TRANSPLANT_TREES)", min=0
    )
    num_generations: int = option(8, "G: completions per question (env NUM_GENERATIONS)", min=2)
    max_new_tokens: int = option(256, "longest completion, in tokens", min=1)
    max_prompt_tokens: int = option(768, "prompts longer than this are cut from the left", min=8)
    temperature: float = option(1.0, "sampling temperature; log-probs use logits / temperature", gt=0.0)
    top_p: float = option(1.0, "nucleus sampling mass", gt=0.0, max=1.0)
    learning_rate: float = option(1e-5, "Adam learning rate (no scheduler, as in the paper)", gt=0.0)
    weight_decay: float = option(0.0, "Adam(W) weight decay", min=0.0)
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 disables", min=0.0)
    kl_beta: float = option(0.0, "weight of the KL penalty to a frozen reference model (0 = no reference)", min=0.0)
    clip_eps_low: float = option(0.2, "lower PPO clip: ratio >= 1 - eps_low", min=0.0, max=1.0)
    clip_eps_high: float = option(0.28, "upper PPO clip: ratio <= 1 + eps_high", min=0.0)
    optimizer_steps_per_round: int = option(1, "policy-gradient steps on each round's batch", min=1)
    micro_batch_size: int = option(
        0, "most sequences per forward/backward (gradients accumulate across micro-batches); 0 = no row limit",
        min=0,
    )
    micro_batch_tokens: int | str = option(
        "auto", "most padded tokens (rows x longest row) per forward/backward, so activation memory is bounded "
        "whatever the prompt lengths; 0 = no limit; auto = 2048 on CUDA, no limit on a CPU", check=_auto_or_count
    )
    oom_regrow_rounds: int = option(
        50, "after an out-of-memory halving, rounds without one before the micro-batch (or generate chunk) "
        "doubles back towards the configured size; 0 = never", min=0
    )
    gradient_checkpointing: bool | str = option(
        "auto", "recompute each layer's activations in backward instead of storing them (about one more forward "
        "pass of training compute, most of the activation memory saved); auto = on for CUDA", check=_auto_or_bool
    )
    optimizer: str = option(
        "auto", "adam (torch's Adam/AdamW) or adamw_sr (float32 moments, bfloat16 weights updated with "
        "stochastic rounding); auto = adamw_sr for bfloat16 weights, adam otherwise",
        choices=("auto", "adam", "adamw_sr"),
    )
    format_reward: float = option(0.0, "bonus for a well-formed <answer>...</answer> span (0 = off)", min=0.0)
    compile_generate: bool | str = option(
        "auto", "sample with one reused static KV cache sized max_prompt_tokens + max_new_tokens, so that "
        "transformers compiles the decoding step with torch.compile (CUDA graphs); auto = on for CUDA, off for "
        "a CPU (where only the static cache would apply)", check=_auto_or_bool
    )
    warmup: bool | str = option(
        "auto", "before the first round, one worst-case generate + loss/backward (no optimizer step), so an "
        "out-of-memory shows at start-up; auto = on for CUDA, off for CPU", check=_auto_or_bool
    )
    tasks: tuple[TaskSpec, ...] = option(
        help="weighted task mix", factory=lambda: DEFAULT_TASKS, check=_unique_tasks
    )

    def __post_init__(self):
        check_fields(self)

    def resolved(self, device_type: str) -> "SapoConfig":
        """This config with every ``auto`` decided for a device type ("cuda", "cpu", ...)."""
        cuda = device_type == "cuda"
        return dataclasses.replace(
            self,
            micro_batch_tokens=(AUTO_CUDA_MICRO_BATCH_TOKENS if cuda else 0) if self.micro_batch_tokens == "auto"
            else self.micro_batch_tokens,
            compile_generate=cuda if self.compile_generate == "auto" else self.compile_generate,
            warmup=cuda if self.warmup == "auto" else self.warmup,
            gradient_checkpointing=cuda if self.gradient_checkpointing == "auto" else self.gradient_checkpointing,
        )
