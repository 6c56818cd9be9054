"""The experiment configuration: one YAML file, environment overrides, ``--set`` overrides.

Precedence, lowest first: dataclass defaults < YAML < environment (the seeds' variable names, see
:data:`ENV_OVERRIDES`) < ``--set section.field=value``. Every mistake raises one
:class:`~sapo.config.ConfigError` naming the field and the allowed values. No torch import here: the
supervisor loads configs too.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from sapo.config import BUILTIN_MODELS, ConfigError, SapoConfig, check_fields, from_mapping, option, to_mapping

PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def plain_name_problem(value: str) -> str | None:
    """Why ``value`` is not a safe file-name-like identifier (None when it is)."""
    if not PLAIN_NAME.match(value) or ".." in value:
        return "must be 1-64 characters of letters, digits, '_', '-', '.', starting with a letter or digit"
    return None


_GPU_UUID = re.compile(r"^(GPU|MIG)-[0-9A-Za-z][0-9A-Za-z/-]*$")


def _gpu_problem(value: Any) -> str | None:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return None
    if isinstance(value, str) and (re.fullmatch(r"[0-9]+", value) or _GPU_UUID.match(value)):
        return None
    return ("must be auto, a GPU index (0, 1, ... in PCI bus order, as nvidia-smi numbers them) or a UUID "
            f"from `nvidia-smi -L` (GPU-... or MIG-...); got {value!r}")


def _memory_fraction_problem(value: Any) -> str | None:
    if value == "auto":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value <= 1.0:
        return None
    return f"must be 'auto' or a number in (0, 1]; got {value!r}"


@dataclass(frozen=True)
class ExperimentSection:
    """Which experiment, where it lives, how long it runs."""

    name: str = option("sapo_experiment", "experiment name; its directory is ROOT/experiments/NAME (env EXPERIMENT_NAME)",
                       check=plain_name_problem)
    root: str = option("./runs", "the shared directory, e.g. a Drive mount (env GDRIVE_PATH)")
    seed: int = option(42, "experiment seed: question sampling, model init, exchange choices (env SEED)", min=0)
    max_rounds: int = option(2000, "rounds to run (env MAX_ROUNDS)", min=1)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class ModelSection:
    """Which model every worker trains."""

    name: str = option("openai-community/gpt2",
                       "Hugging Face model id or local path, or builtin:tiny-gpt2 (env MODEL_NAME)")
    dtype: str = option("auto", "weights dtype: auto = bfloat16 on a GPU that supports it, else float32",
                        choices=("auto", "float32", "bfloat16", "float16"))
    attn_implementation: str = option("auto", "attention kernel: auto = transformers' default (sdpa for GPT-2 "
                                      "in transformers 5), sdpa, or eager (the plain matmul/softmax path)",
                                      choices=("auto", "sdpa", "eager"))
    autocast: str = option("none", "mixed precision: run generate and the training forward passes under "
                           "torch.autocast in this dtype, the weights and Adam state staying in model.dtype "
                           "(e.g. float32 weights + bfloat16 autocast); none = off",
                           choices=("none", "bfloat16"))

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class CoordinatorSection:
    """How the coordinator advances rounds."""

    strategy: str = option("hybrid", "time: every interval; completion: when all live workers submitted; "
                           "hybrid: completion or round_timeout_s, whichever first",
                           choices=("time", "completion", "hybrid"))
    round_interval_s: float = option(60.0, "round length for the time strategy (env COORDINATOR_ROUND_INTERVAL)",
                                     gt=0.0)
    round_timeout_s: float = option(1800.0, "hybrid: advance after this long even if some worker is missing",
                                    gt=0.0)
    poll_interval_s: float = option(1.0, "how often the coordinator looks at submissions", gt=0.0)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class ExchangeSection:
    """How rollouts travel through the shared directory."""

    publish_frequency: str = option("stage", "when rollouts are written (env ROLLOUT_PUBLISH_FREQUENCY)",
                                    choices=("generation", "stage", "round"))
    fetch_timeout_s: float = option(60.0, "longest wait for peers' rollouts of the current round", min=0.0)
    fetch_max_peers: int = option(64, "read at most this many peers' files per round", min=1)
    max_file_bytes: int = option(16 * 1024 * 1024, "peer files larger than this are skipped", min=1024)
    lock_dir: str = option("", "where lock files live; empty = a local directory outside the shared dir")
    spool_dir: str = option("", "local spool for publishes the shared dir refused; empty = default local dir")
    cleanup_enabled: bool = option(False, "delete or archive old rounds (env ROLLOUT_CLEANUP_ENABLED)")
    keep_last_n_rounds: int = option(10, "rounds kept when cleanup is on (env ROLLOUT_KEEP_LAST_N_ROUNDS)", min=2)
    archive_old: bool = option(False, "archive old rounds instead of deleting them (env ROLLOUT_ARCHIVE_OLD)")

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class CheckpointSection:
    """When workers checkpoint and how many they keep."""

    every_rounds: int = option(10, "checkpoint every K rounds (and always on SIGTERM/SIGINT)", min=1)
    keep_last: int = option(3, "checkpoints kept per node", min=1)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class SupervisorSection:
    """Process lifecycle: how many workers, on which device, how they are watched and restarted."""

    workers: int = option(4, "number of training workers (plus one coordinator)", min=1, max=64)
    device: str = option("auto", "auto = the GPU (see gpu) when NVML sees one, else cpu",
                         choices=("auto", "cpu", "cuda"))
    gpu: int | str = option("auto", "the GPU the workers share: auto = the first entry of an inherited "
                            "CUDA_VISIBLE_DEVICES, else GPU 0; or an NVML index (PCI bus order, as nvidia-smi "
                            "numbers them) or a UUID from `nvidia-smi -L` (GPU-... or MIG-...); wins over "
                            "CUDA_VISIBLE_DEVICES", check=_gpu_problem)
    memory_fraction: float | str = option("auto", "per-worker share of GPU memory, or auto",
                                          check=_memory_fraction_problem)
    cuda_context_margin_gb: float = option(1.0, "GPU memory (GiB) each worker's CUDA context needs beyond its "
                                           "fraction (0.6-0.85 GiB measured on an H200)", min=0.0)
    heartbeat_interval_s: float = option(5.0, "how often nodes heartbeat", gt=0.0)
    heartbeat_timeout_s: float = option(300.0, "a node silent this long is hung: killed and restarted", gt=0.0)
    startup_timeout_s: float = option(600.0, "longest wait for a new node's first heartbeat", gt=0.0)
    monitor_interval_s: float = option(2.0, "how often the supervisor looks at its nodes", gt=0.0)
    stop_timeout_s: float = option(60.0, "SIGTERM -> SIGKILL grace period (nodes checkpoint in it)", gt=0.0)
    backoff_initial_s: float = option(2.0, "first restart delay", min=0.0)
    backoff_max_s: float = option(120.0, "restart delay cap (exponential backoff)", min=0.0)
    stable_after_s: float = option(300.0, "a node running this long has its backoff reset", gt=0.0)
    max_restarts: int = option(10, "failures within restart_window_s before a node is FATAL", min=0)
    restart_window_s: float = option(3600.0, "window for counting failures", gt=0.0)
    startup_failures_fatal: int = option(3, "consecutive failures before the first heartbeat: FATAL as a "
                                         "configuration error", min=1)
    on_event: str = option("", "shell command run on restart/FATAL/finish with SWARM_EVENT etc. in its env")

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: every section, each with defaults."""

    experiment: ExperimentSection = option(factory=ExperimentSection)
    model: ModelSection = option(factory=ModelSection)
    sapo: SapoConfig = option(factory=SapoConfig)
    coordinator: CoordinatorSection = option(factory=CoordinatorSection)
    exchange: ExchangeSection = option(factory=ExchangeSection)
    checkpoint: CheckpointSection = option(factory=CheckpointSection)
    supervisor: SupervisorSection = option(factory=SupervisorSection)

    def __post_init__(self):
        check_fields(self)

    @property
    def experiment_dir(self) -> Path:
        """``<root>/experiments/<name>``, the directory every node of this experiment shares."""
        return Path(self.experiment.root).expanduser() / "experiments" / self.experiment.name

    def to_dict(self) -> dict:
        """Plain dict form (lists, not tuples), ready for JSON/YAML."""
        return to_mapping(self)


# Seeds' environment variables -> config field. TEST_MODE is handled separately (it sets several).
ENV_OVERRIDES: dict[str, str] = {
    "GDRIVE_PATH": "experiment.root",
    "EXPERIMENT_NAME": "experiment.name",
    "SEED": "experiment.seed",
    "MAX_ROUNDS": "experiment.max_rounds",
    "MODEL_NAME": "model.name",
    "NUM_TRAIN_SAMPLES": "sapo.num_train_samples",
    "NUM_GENERATIONS": "sapo.num_generations",
    "NUM_TRANSPLANT_TREES": "sapo.num_transplant_trees",
    "COORDINATOR_ROUND_INTERVAL": "coordinator.round_interval_s",
    "ROLLOUT_PUBLISH_FREQUENCY": "exchange.publish_frequency",
    "ROLLOUT_CLEANUP_ENABLED": "exchange.cleanup_enabled",
    "ROLLOUT_KEEP_LAST_N_ROUNDS": "exchange.keep_last_n_rounds",
    "ROLLOUT_ARCHIVE_OLD": "exchange.archive_old",
}

# What the seeds' TEST_MODE meant: a quick validation run.
TEST_MODE_VALUES = {"experiment.max_rounds": 3, "sapo.num_train_samples": 4, "sapo.num_generations": 4}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(text: str, where: str) -> bool:
    """The seeds wrote 'True'/'False'; accept the usual spellings, reject anything else."""
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(where, f"must be a boolean (true/false/1/0), got {text!r}")


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is not a section")
        node = child
    node[parts[-1]] = value


def _field_type(dotted: str) -> Any:
    """The annotation of a dotted field, used to parse env strings (None when the path is unknown)."""
    import dataclasses
    import typing

    cls: Any = ExperimentConfig
    tp: Any = None
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        tp = hints[part]
        cls = tp
    return tp


def _parse_env_value(name: str, text: str, dotted: str) -> Any:
    tp = _field_type(dotted)
    where = f"{dotted} (from ${name})"
    if tp is bool:
        return parse_bool(text, where)
    if tp in (int, float):
        try:
            return tp(text.strip())
        except ValueError:
            raise ConfigError(where, f"must be {'an integer' if tp is int else 'a number'}, got {text!r}") from None
    return text


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Dotted-path overrides from the seeds' environment variables (TEST_MODE first, then explicit ones)."""
    out: dict[str, Any] = {}
    if "TEST_MODE" in environ and parse_bool(environ["TEST_MODE"], "TEST_MODE"):
        out.update(TEST_MODE_VALUES)
    for name, dotted in ENV_OVERRIDES.items():
        if name in environ and environ[name] != "":
            out[dotted] = _parse_env_value(name, environ[name], dotted)
    return out


def parse_set_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["a.b=c", ...]`` -> ``{"a.b": value}``; values are parsed as YAML scalars (3, true, [..])."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or "." not in key:
            raise ConfigError(key or item, f"--set wants section.field=value, got {item!r}")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(key, f"value {raw!r} is not valid YAML: {err}") from None
    return out


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a config file; a missing file or broken YAML is a ConfigError naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(str(p), f"cannot read config file: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(str(p), f"is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(p), f"must hold a mapping of sections, got {type(data).__name__}")
    return data


def resolve_config(
    path: str | os.PathLike | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Iterable[str] = (),
) -> ExperimentConfig:
    """Defaults < YAML file < environment < ``--set`` overrides, validated as a whole."""
    tree: dict = read_yaml(path) if path else {}
    env = os.environ if environ is None else environ
    for dotted, value in {**env_overrides(env), **parse_set_overrides(overrides)}.items():
        _set_path(tree, dotted, value)
    config = from_mapping(ExperimentConfig, tree)
    if config.model.name.startswith("builtin:"):
        if config.model.name not in BUILTIN_MODELS:
            raise ConfigError("model.name", f"unknown built-in model; allowed: {', '.join(BUILTIN_MODELS)}")
    _check_task_names(config)
    return config


def _check_task_names(config: ExperimentConfig) -> None:
    from sapo.tasks import known_task_names  # imports reasoning-gym (~1 s, no torch) only when needed

    known = set(known_task_names())
    for i, task in enumerate(config.sapo.tasks):
        if task.name not in known:
            raise ConfigError(f"sapo.tasks[{i}].name",
                              f"unknown task {task.name!r}; allowed: {', '.join(sorted(known))}")


def with_overrides(config: ExperimentConfig, **sections: Mapping[str, Any]) -> ExperimentConfig:
    """A copy of ``config`` with some fields of some sections replaced (tests and tools use this)."""
    changed = {name: replace(getattr(config, name), **values) for name, values in sections.items()}
    return replace(config, **changed)
