"""The experiment configuration: one YAML file, environment overrides, ``--set`` overrides.

Precedence, lowest first: defaults < YAML < environment (the seeds' variable names, see
:data:`ENV_OVERRIDES`) < ``--set section.field=value``. Every section is a pydantic dataclass
(:func:`sapo.config.section`); every mistake raises one :class:`~sapo.config.ConfigError` naming the field
and the allowed values. :func:`config_json_schema` describes the YAML file. No torch import here: the
supervisor loads configs too.

Heterogeneous swarms: the ``workers:`` list gives single workers their own model, init seed, task mix,
learning rate, I and J (:data:`PER_WORKER_FIELDS`). Every node resolves the same base config (the one
``state/config.json`` holds, the list included); :meth:`ExperimentConfig.for_node` applies a worker's entry.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Mapping, Optional, Union

import yaml
from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from sapo.config import BUILTIN_MODELS, ConfigError, SapoConfig, TaskSpec, section
from sapo.validation import (Bool, Float, Int, Str, adapter, choice, field_type, from_mapping, one_message, shown,
                             to_plain)

PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PLAIN_NAME_RULE = "must be 1-64 characters of letters, digits, '_', '-', '.', starting with a letter or digit"


def plain_name_problem(value: str) -> str | None:
    """Why ``value`` is not a safe file-name-like identifier (None when it is)."""
    if not PLAIN_NAME.match(value) or ".." in value:
        return _PLAIN_NAME_RULE
    return None


def _plain_name(value: str) -> str:
    if plain_name_problem(value):
        raise PydanticCustomError("plain_name", "{rule}; got {got}", {"rule": _PLAIN_NAME_RULE, "got": shown(value)})
    return value


# A node id or experiment name: safe as one path component (also in the JSON Schema, as a pattern).
PlainName = Annotated[Str, AfterValidator(_plain_name), Field(json_schema_extra={"pattern": PLAIN_NAME.pattern})]


def _builtin_known(name: str) -> str:
    if name.startswith("builtin:") and name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model; allowed: {', '.join(BUILTIN_MODELS)}")
    return name


AutoFraction = Annotated[Union[Literal["auto"], Annotated[float, Field(strict=True, gt=0.0, le=1.0)]],
                         one_message("'auto' or a number in (0, 1]")]
AutoSeconds = Annotated[Union[Literal["auto"], Annotated[Float, Field(gt=0.0)]],
                        one_message("'auto' or a number of seconds > 0")]
_GPU_NAME = r"^([0-9]+|(GPU|MIG)-[0-9A-Za-z][0-9A-Za-z/-]*)$"  # an index as text, or a UUID from nvidia-smi -L
GpuChoice = Annotated[Union[Literal["auto"], Annotated[int, Field(strict=True, ge=0)],
                            Annotated[str, Field(strict=True, pattern=_GPU_NAME)]],
                      one_message("auto, a GPU index (0, 1, ... in PCI bus order, as nvidia-smi numbers them) or a "
                                  "UUID from `nvidia-smi -L` (GPU-... or MIG-...)")]


@section
class ExperimentSection:
    """Which experiment, where it lives, how long it runs."""

    name: PlainName = Field("sapo_experiment", description="experiment name; its directory is "
                            "ROOT/experiments/NAME (env EXPERIMENT_NAME)")
    root: Str = Field("./runs", description="the shared directory, e.g. a Drive mount (env GDRIVE_PATH)")
    seed: Int = Field(42, ge=0, description="experiment seed: question sampling, model init, exchange choices "
                      "(env SEED)")
    max_rounds: Int = Field(2000, ge=1, description="rounds to run (env MAX_ROUNDS)")


@section
class ModelSection:
    """Which model the workers train (an entry of ``workers:`` may give one worker another)."""

    name: Annotated[Str, AfterValidator(_builtin_known)] = Field(
        "openai-community/gpt2", description="Hugging Face model id or local path, or a built-in: "
        f"{', '.join(BUILTIN_MODELS)} (env MODEL_NAME)")
    init_seed: Optional[Int] = Field(
        None, ge=0, description="seed of the initial weights (all of a built-in model's, any a Hub model "
        "initialises rather than loads); null = experiment.seed. A worker may set its own (workers:)")
    dtype: choice("auto", "float32", "bfloat16", "float16") = Field(
        "auto", description="weights dtype: auto = bfloat16 on a GPU that supports it, else float32")
    attn_implementation: choice("auto", "sdpa", "eager") = Field(
        "auto", description="attention kernel: auto = transformers' default (sdpa for GPT-2 in transformers 5), "
        "sdpa, or eager (the plain matmul/softmax path)")
    autocast: choice("none", "bfloat16") = Field(
        "none", description="mixed precision: run generate and the training forward passes under torch.autocast "
        "in this dtype, the weights and Adam state staying in model.dtype (e.g. float32 weights + bfloat16 "
        "autocast); none = off")


@section
class CoordinatorSection:
    """How the coordinator advances rounds."""

    strategy: choice("time", "completion", "hybrid") = Field(
        "hybrid", description="time: every interval; completion: when all live workers submitted; hybrid: "
        "completion or round_timeout_s, whichever first")
    round_interval_s: Float = Field(60.0, gt=0.0, description="round length for the time strategy "
                                    "(env COORDINATOR_ROUND_INTERVAL)")
    round_timeout_s: Float = Field(1800.0, gt=0.0, description="hybrid: advance after this long even if some "
                                   "worker is missing")
    poll_interval_s: AutoSeconds = Field(
        "auto", description="the longest a node waits before looking again at what it waits for (results, the "
        "state, peers' rollouts); file events wake it sooner on this host. auto = 1.0 s on local disk (events do "
        "the work), 0.5 s on a network or FUSE mount (other hosts' writes are seen only by polling), 0.1 s with "
        "events off (SWARM_NO_INOTIFY); see node/mounts.py")


@section
class ExchangeSection:
    """How rollouts travel through the shared directory."""

    publish_frequency: choice("generation", "stage", "round") = Field(
        "stage", description="when rollouts are written (env ROLLOUT_PUBLISH_FREQUENCY)")
    fetch_timeout_s: Float = Field(60.0, ge=0.0, description="longest wait for peers' rollouts of the current "
                                   "round")
    fetch_max_peers: Int = Field(64, ge=1, description="read at most this many peers' files per round")
    max_file_bytes: Int = Field(16 * 1024 * 1024, ge=1024, description="peer files larger than this are skipped")
    lock_dir: Str = Field("", description="where lock files live; empty = a local directory outside the shared "
                          "dir")
    spool_dir: Str = Field("", description="local spool for publishes the shared dir refused; empty = default "
                           "local dir")
    cleanup_enabled: Bool = Field(False, description="delete or archive old rounds (env ROLLOUT_CLEANUP_ENABLED)")
    keep_last_n_rounds: Int = Field(10, ge=2, description="rounds kept when cleanup is on "
                                    "(env ROLLOUT_KEEP_LAST_N_ROUNDS)")
    archive_old: Bool = Field(False, description="archive old rounds instead of deleting them "
                              "(env ROLLOUT_ARCHIVE_OLD)")
    require_signatures: Bool = Field(True, description="refuse shared-dir files without a valid HMAC signature "
                                     "(the experiment key); false accepts unsigned files, for a directory shared "
                                     "with older versions (files with a wrong signature are still refused)")


@section
class CheckpointSection:
    """When workers checkpoint and how many they keep."""

    every_rounds: Int = Field(10, ge=1, description="checkpoint every K rounds (and always on SIGTERM/SIGINT)")
    keep_last: Int = Field(3, ge=1, description="checkpoints kept per node")


@section
class SupervisorSection:
    """Process lifecycle: how many workers, on which device, how they are watched and restarted."""

    workers: Int = Field(4, ge=1, le=64, description="number of training workers (plus one coordinator)")
    device: choice("auto", "cpu", "cuda") = Field(
        "auto", description="auto = the GPU (see gpu) when NVML sees one, else cpu")
    gpu: GpuChoice = Field(
        "auto", description="the GPU the workers share: auto = the first entry of an inherited "
        "CUDA_VISIBLE_DEVICES, else GPU 0; or an NVML index (PCI bus order, as nvidia-smi numbers them) or a UUID "
        "from `nvidia-smi -L` (GPU-... or MIG-...); wins over CUDA_VISIBLE_DEVICES")
    memory_fraction: AutoFraction = Field("auto", description="per-worker share of GPU memory, or auto")
    cuda_context_margin_gb: Float = Field(
        1.0, ge=0.0, description="GPU memory (GiB) each worker's CUDA context needs beyond its fraction "
        "(0.6-0.85 GiB measured on an H200)")
    heartbeat_interval_s: Float = Field(5.0, gt=0.0, description="how often nodes heartbeat")
    heartbeat_timeout_s: Float = Field(300.0, gt=0.0, description="a node silent this long is hung: killed and "
                                       "restarted")
    startup_timeout_s: Float = Field(600.0, gt=0.0, description="longest wait for a new node's first heartbeat")
    stagger: choice("auto", "none", "heartbeat", "loaded") = Field(
        "auto", description="how start-ups are spread out (GPU memory spikes while a model loads): none = every "
        "node at once; heartbeat = one at a time, each once the previous node's first heartbeat came; loaded = "
        "the next worker once every starting worker has loaded its model (the coordinator loads none); "
        "auto = none on the CPU, loaded on a GPU")
    monitor_interval_s: Float = Field(2.0, gt=0.0, description="how often the supervisor looks at its nodes")
    stop_timeout_s: Float = Field(60.0, gt=0.0, description="SIGTERM -> SIGKILL grace period (nodes checkpoint "
                                  "in it)")
    backoff_initial_s: Float = Field(2.0, ge=0.0, description="first restart delay")
    backoff_max_s: Float = Field(120.0, ge=0.0, description="restart delay cap (exponential backoff)")
    stable_after_s: Float = Field(300.0, gt=0.0, description="a node running this long has its backoff reset")
    max_restarts: Int = Field(10, ge=0, description="failures within restart_window_s before a node is FATAL")
    restart_window_s: Float = Field(3600.0, gt=0.0, description="window for counting failures")
    startup_failures_fatal: Int = Field(3, ge=1, description="consecutive failures before the first heartbeat: "
                                        "FATAL as a configuration error")
    on_event: Str = Field("", description="shell command run on restart/FATAL/finish with SWARM_EVENT etc. in its "
                          "env")


@section
class EvalSection:
    """Held-out evaluation: pass@1 with greedy decoding on a fixed question set per task, identical for every
    worker and disjoint from training (its questions come from seeds training never draws)."""

    every_rounds: Int = Field(0, ge=0, description="evaluate every K rounds and at the end; 0 = off")
    questions_per_task: Int = Field(16, ge=1, le=10_000, description="held-out questions per task of the mix")
    seed: Int = Field(1_000_003, ge=0, description="the held-out set's seed (training seeds are derived from "
                      "experiment.seed and never use this stream)")
    max_new_tokens: Int = Field(0, ge=0, description="tokens per answer; 0 = sapo.max_new_tokens")
    time_budget_s: Float = Field(60.0, gt=0.0, description="an eval stops after this long (the rest is counted as "
                                 "not evaluated), so a round is never stalled by it")


REPORT_TO = ("tensorboard", "wandb")


@section
class TrackingSection:
    """Experiment trackers, fed by the supervisor from the metrics files (the nodes never wait for them)."""

    report_to: tuple[choice(*REPORT_TO), ...] = Field(
        (), description="trackers every metrics and eval line (per node, per round) is streamed to, like TRL's "
        "report_to: tensorboard, wandb; optional extras: pip install -e '.[tensorboard]' / '.[wandb]'")
    wandb_project: Str = Field("sapo-swarm", description="the W&B project")
    wandb_mode: choice("offline", "online") = Field(
        "offline", description="offline (default): a run dir under the experiment, `wandb sync` it later; online "
        "needs network and WANDB_API_KEY")


# What one worker may set for itself in ``workers:``. Everything else is the experiment's and equal on every
# node, because the exchange depends on it: G (a peer's group is used only if it holds G completions),
# max_new_tokens (peers' completions are re-tokenised and cut at the receiver's limit: a longer one would be
# trained on a cut the reward never saw), experiment.seed (questions travel as references whose dataset seeds
# derive from it; model.init_seed is the per-worker seed of the weights). max_prompt_tokens would not break the
# exchange (each node encodes prompts itself) but stays part of the experiment's identity.
PER_WORKER_FIELDS: dict[str, tuple[str, ...]] = {
    "model": ("name", "init_seed"),
    "sapo": ("tasks", "learning_rate", "num_train_samples", "num_transplant_trees"),
}
_SHARED_WHY = {
    "experiment.seed": "questions travel between workers as references whose dataset seeds derive from it "
                       "(model.init_seed seeds a worker's weights)",
    "sapo.num_generations": "a peer's group is used only if it holds G completions",
    "sapo.max_new_tokens": "peers' completions are re-tokenised and cut at the receiver's limit",
    "sapo.max_prompt_tokens": "it is part of the experiment's identity (state/config.json)",
}
_WORKER_NAME = re.compile(r"^worker_([1-9][0-9]*)$")  # supervisor.launch.node_names: worker_1 ... worker_N


def _per_worker(section_cls: type, name: str) -> Any:
    """The type of a per-worker override of ``section_cls``'s field ``name``: null (not set: the base config's
    value), or a value the base field itself would take (the same type, bounds and checks)."""
    info = section_cls.__pydantic_fields__[name]
    inner = Annotated[(info.annotation, *info.metadata)]
    about = re.sub(r" ?\(env [A-Z_]+\)", "", info.description)  # the environment sets the base config's value
    return Annotated[Optional[inner], Field(description=f"this worker's own value; null = the base config's. {about}")]


@section
class WorkerModel:
    """A worker's own model: its name and the seed of its initial weights."""

    name: _per_worker(ModelSection, "name") = None
    init_seed: _per_worker(ModelSection, "init_seed") = None


@section
class WorkerSapo:
    """A worker's own task mix (what it samples locally), learning rate, I and J."""

    tasks: _per_worker(SapoConfig, "tasks") = None
    learning_rate: _per_worker(SapoConfig, "learning_rate") = None
    num_train_samples: _per_worker(SapoConfig, "num_train_samples") = None
    num_transplant_trees: _per_worker(SapoConfig, "num_transplant_trees") = None


@section
class WorkerEntry:
    """One worker's overrides of the base config; what it does not set is the base config's."""

    name: PlainName = Field(description="the worker: worker_1 ... worker_N (N = supervisor.workers), the "
                            "supervisor's node names")
    model: WorkerModel = Field(default_factory=WorkerModel)
    sapo: WorkerSapo = Field(default_factory=WorkerSapo)

    def changes(self) -> dict[str, dict[str, Any]]:
        """``{section: {field: value}}`` of what this entry sets (its non-null fields)."""
        out = {sec: {f: getattr(getattr(self, sec), f) for f in fields} for sec, fields in PER_WORKER_FIELDS.items()}
        return {sec: {f: v for f, v in values.items() if v is not None} for sec, values in out.items()}


@section
class ExperimentConfig:
    """A whole experiment: every section, each with defaults."""

    experiment: ExperimentSection = Field(default_factory=ExperimentSection)
    model: ModelSection = Field(default_factory=ModelSection)
    sapo: SapoConfig = Field(default_factory=SapoConfig)
    coordinator: CoordinatorSection = Field(default_factory=CoordinatorSection)
    exchange: ExchangeSection = Field(default_factory=ExchangeSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    supervisor: SupervisorSection = Field(default_factory=SupervisorSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    workers: tuple[WorkerEntry, ...] = Field(
        (), description="heterogeneous swarms: per-worker overrides of model.name, model.init_seed, sapo.tasks, "
        "sapo.learning_rate, sapo.num_train_samples (I) and sapo.num_transplant_trees (J); workers not listed run "
        "the base config")

    def for_node(self, node_id: str) -> "ExperimentConfig":
        """The config node ``node_id`` runs: the base with its ``workers:`` entry applied (the base itself for the
        coordinator and for workers not listed). A value the section refuses is a ConfigError naming the entry,
        e.g. ``workers[1] (worker_3).sapo.num_transplant_trees``."""
        for i, entry in enumerate(self.workers):
            if entry.name == node_id:
                changed = {}
                for sec, values in entry.changes().items():
                    try:
                        changed[sec] = replace(getattr(self, sec), **values)
                    except ConfigError as err:
                        raise err.under(f"{_entry_label(i, entry.name)}.{sec}") from None
                return replace(self, **changed)
        return self

    def model_seed(self) -> int:
        """The seed of the initial weights: ``model.init_seed``, else ``experiment.seed``."""
        return self.experiment.seed if self.model.init_seed is None else self.model.init_seed

    def experiment_tasks(self) -> tuple[TaskSpec, ...]:
        """Every task of the experiment: the base mix, then any other task a worker's own mix names. A worker
        samples its questions from its own mix, and takes peers' groups of any of these. Ask the base config:
        in a worker's (:meth:`for_node`) ``sapo.tasks`` is that worker's own mix."""
        tasks = {t.name: t for t in self.sapo.tasks}
        for entry in self.workers:
            for t in entry.sapo.tasks or ():
                tasks.setdefault(t.name, t)
        return tuple(tasks.values())

    @property
    def experiment_dir(self) -> Path:
        """``<root>/experiments/<name>``, the directory every node of this experiment shares."""
        return Path(self.experiment.root).expanduser() / "experiments" / self.experiment.name

    def to_dict(self) -> dict:
        """Plain dict form (lists, not tuples), ready for JSON/YAML."""
        return to_plain(self)


def config_json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of the YAML config file: every section, field, default and bound."""
    schema = adapter(ExperimentConfig).json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema,
            "title": "SAPO swarm experiment config"}


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


def _parse_env_value(name: str, text: str, dotted: str) -> Any:
    tp = field_type(ExperimentConfig, tuple(dotted.split(".")))
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


TOP_LEVEL_FIELDS = ("workers",)  # fields of ExperimentConfig that are not sections


def parse_set_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["a.b=c", ...]`` -> ``{"a.b": value}``; values are parsed as YAML scalars (3, true, [..]). A top-level
    field that is not a section (``workers``) is set by its name alone: ``--set 'workers=[...]'``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or ("." not in key and key not in TOP_LEVEL_FIELDS):
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
    try:
        config = from_mapping(ExperimentConfig, tree)
    except ConfigError as err:
        raise _worker_error(err, tree) from None
    _check_workers(config)
    _check_task_names(config)
    return config


def _check_task_names(config: ExperimentConfig) -> None:
    # reasoning-gym's names from a cache keyed by its install: the supervisor and the coordinator never import it
    from node.task_names import known_task_names

    known = set(known_task_names())
    mixes = [("sapo", config.sapo.tasks)] + [(f"{_entry_label(i, e.name)}.sapo", e.sapo.tasks or ())
                                             for i, e in enumerate(config.workers)]
    for where, tasks in mixes:
        for i, task in enumerate(tasks):
            if task.name not in known:
                raise ConfigError(f"{where}.tasks[{i}].name",
                                  f"unknown task {task.name!r}; allowed: {', '.join(sorted(known))}")


def _entry_label(index: int, name: Any) -> str:
    """``workers[1] (worker_3)``: how messages name an entry of the workers list."""
    return f"workers[{index}] ({name})" if isinstance(name, str) and not plain_name_problem(name) else \
        f"workers[{index}]"


def _worker_range(n: int) -> str:
    return "worker_1" if n == 1 else f"worker_1 ... worker_{n}"


def _check_workers(config: ExperimentConfig) -> None:
    """Each entry names one of the supervisor's workers (worker_1 ... worker_N), once, and applies cleanly."""
    n, seen = config.supervisor.workers, {}
    for i, entry in enumerate(config.workers):
        label = _entry_label(i, entry.name)
        number = _WORKER_NAME.match(entry.name)
        if number is None:
            raise ConfigError(f"{label}.name", f"must name a worker of this swarm: {_worker_range(n)} (the "
                              f"supervisor's node names)")
        if int(number.group(1)) > n:
            raise ConfigError(f"{label}.name", f"no such worker: supervisor.workers is {n} ({_worker_range(n)}); "
                              f"raise supervisor.workers or drop this entry")
        if entry.name in seen:
            raise ConfigError(label, f"{entry.name} is listed twice (also workers[{seen[entry.name]}])")
        seen[entry.name] = i
        config.for_node(entry.name)  # the section's own cross-field checks, with this entry applied


def _worker_error(err: ConfigError, tree: dict) -> ConfigError:
    """Name the worker in an error inside the workers list; a field no worker may set says why."""
    m = re.match(r"^workers\[(\d+)\](.*)$", err.field)
    entries = tree.get("workers")
    if m is None or not isinstance(entries, list):
        return err
    i, rest = int(m.group(1)), m.group(2)
    entry = entries[i] if i < len(entries) else None
    label = _entry_label(i, entry.get("name") if isinstance(entry, dict) else None)
    dotted = rest.lstrip(".")
    section_name, _, key = dotted.partition(".")
    sections = ExperimentConfig.__pydantic_fields__
    if key:  # a field of a section the entry may name (model, sapo): is it a real field of that section?
        shared = "." not in key and key in getattr(field_type(ExperimentConfig, (section_name,)),
                                                   "__pydantic_fields__", {})
    else:  # a whole section (experiment, supervisor, ...)
        shared = section_name in sections and section_name != "workers"
    if err.reason.startswith("unknown key") and shared:
        why = _SHARED_WHY.get(dotted, "every node of the experiment uses the base config's value")
        allowed = ", ".join(f"{sec}.{f}" for sec, fs in PER_WORKER_FIELDS.items() for f in fs)
        return ConfigError(f"{label}{rest}", f"cannot be set per worker ({why}); a worker may set: {allowed}")
    return ConfigError(f"{label}{rest}", err.reason)


def with_overrides(config: ExperimentConfig, **sections: Mapping[str, Any]) -> ExperimentConfig:
    """A copy of ``config`` with some fields of some sections replaced (tests and tools use this)."""
    changed = {name: replace(getattr(config, name), **values) for name, values in sections.items()}
    return replace(config, **changed)
