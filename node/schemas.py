"""Every file format of the shared experiment directory, one frozen dataclass each (DESIGN.md §3).

Each class has a ``SCHEMA_VERSION``, ``to_json() -> dict`` (what we write) and
``from_json(obj, *, expect_...) -> cls`` (what we accept from the shared directory, where everything is
untrusted). ``from_json`` raises :class:`SchemaError` (a ``ValueError``) with one clear reason:

- types are exact: a bool is not an int, a string is not a number; ints are accepted where a float is
  expected (JSON does not distinguish ``1`` from ``1.0``), and every float must be finite;
- identifiers (node ids, experiment names) must be plain names (:func:`node.config.plain_name_problem`);
- sizes are capped (groups per file, completions per group, string lengths): :class:`RolloutLimits`;
- a file whose ``schema_version`` is newer than ours is refused ("schema version N is newer than
  supported M"); an older version is accepted when its shape is fine;
- ``expect_round``/``expect_stage``/``expect_node`` reject a file whose contents do not match the path it
  was found at (a peer writing ``round: 7`` into ``round_5/`` is ignored, not trusted).

Unknown keys are ignored (a tolerant reader); what we write never carries them. No torch, no I/O here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

from node.config import plain_name_problem


class SchemaError(ValueError):
    """A file from the shared directory does not match its format; ``str(err)`` says why."""


# -- field checks -------------------------------------------------------------------------------------

_MAX_INT = 2**63 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_BATCH_ID = re.compile(r"0|[1-9][0-9]{0,8}")


def _get(obj: Mapping, key: str, where: str) -> Any:
    if key not in obj:
        raise SchemaError(f"{where}: missing field {key!r}")
    return obj[key]


def _int(obj: Mapping, key: str, where: str, *, min: int = 0, max: int = _MAX_INT) -> int:
    v = _get(obj, key, where)
    if type(v) is not int:
        raise SchemaError(f"{where}.{key}: must be an integer, got {type(v).__name__}")
    if not min <= v <= max:
        raise SchemaError(f"{where}.{key}: must be in [{min}, {max}], got {v}")
    return v


def _float(obj: Mapping, key: str, where: str, *, min: float | None = None) -> float:
    v = _get(obj, key, where)
    if type(v) is int:
        if abs(v) > 2**53:
            raise SchemaError(f"{where}.{key}: number out of range")
        v = float(v)
    elif type(v) is not float:
        raise SchemaError(f"{where}.{key}: must be a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise SchemaError(f"{where}.{key}: must be a finite number, got {v!r}")
    if min is not None and v < min:
        raise SchemaError(f"{where}.{key}: must be >= {min}, got {v}")
    return v


def _bool(obj: Mapping, key: str, where: str) -> bool:
    v = _get(obj, key, where)
    if type(v) is not bool:
        raise SchemaError(f"{where}.{key}: must be true or false, got {type(v).__name__}")
    return v


def _str(obj: Mapping, key: str, where: str, *, max_len: int, control_ok: bool = False) -> str:
    v = _get(obj, key, where)
    if type(v) is not str:
        raise SchemaError(f"{where}.{key}: must be a string, got {type(v).__name__}")
    if len(v) > max_len:
        raise SchemaError(f"{where}.{key}: longer than {max_len} characters ({len(v)})")
    if _SURROGATE.search(v):
        raise SchemaError(f"{where}.{key}: contains a lone surrogate (not valid UTF-8)")
    if not control_ok and _CONTROL.search(v):
        raise SchemaError(f"{where}.{key}: contains control characters")
    return v


def _name(obj: Mapping, key: str, where: str) -> str:
    v = _get(obj, key, where)
    if type(v) is not str:
        raise SchemaError(f"{where}.{key}: must be a string, got {type(v).__name__}")
    problem = plain_name_problem(v)
    if problem:
        raise SchemaError(f"{where}.{key}: {v[:80]!r} {problem}")
    return v


def _choice(obj: Mapping, key: str, where: str, choices: tuple[str, ...]) -> str:
    v = _get(obj, key, where)
    if type(v) is not str or v not in choices:
        shown = repr(v)[:80]
        raise SchemaError(f"{where}.{key}: must be one of {', '.join(choices)}; got {shown}")
    return v


def _mapping(obj: Any, where: str) -> Mapping:
    if not isinstance(obj, dict):
        raise SchemaError(f"{where}: must be a JSON object, got {type(obj).__name__}")
    return obj


def _version(obj: Mapping, where: str, supported: int) -> int:
    v = _get(obj, "schema_version", where)
    if type(v) is not int or v < 1:
        raise SchemaError(f"{where}.schema_version: must be a positive integer, got {repr(v)[:40]}")
    if v > supported:
        raise SchemaError(f"{where}: schema version {v} is newer than supported {supported}")
    return v


def _expect(where: str, what: str, found: Any, expected: Any) -> None:
    if expected is not None and found != expected:
        raise SchemaError(f"{where}: {what} {found!r} does not match its path ({expected!r})")


def _finite_float(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return value


# -- state/current_state.json ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RoundState:
    """The coordinator's view of the swarm: which round and stage is current, and whether it is over."""

    SCHEMA_VERSION: ClassVar[int] = 1

    experiment: str
    round: int
    stage: int
    started_at: float
    updated_at: float
    finished: bool
    max_rounds: int
    schema_version: int = 1

    def to_json(self) -> dict:
        return {
            "schema_version": self.SCHEMA_VERSION,
            "experiment": self.experiment,
            "round": self.round,
            "stage": self.stage,
            "started_at": _finite_float(self.started_at, "started_at"),
            "updated_at": _finite_float(self.updated_at, "updated_at"),
            "finished": bool(self.finished),
            "max_rounds": self.max_rounds,
        }

    @classmethod
    def from_json(cls, obj: Any, *, expect_experiment: str | None = None) -> "RoundState":
        w = "state"
        obj = _mapping(obj, w)
        version = _version(obj, w, cls.SCHEMA_VERSION)
        out = cls(
            experiment=_name(obj, "experiment", w),
            round=_int(obj, "round", w),
            stage=_int(obj, "stage", w),
            started_at=_float(obj, "started_at", w, min=0.0),
            updated_at=_float(obj, "updated_at", w, min=0.0),
            finished=_bool(obj, "finished", w),
            max_rounds=_int(obj, "max_rounds", w, min=1),
            schema_version=version,
        )
        _expect(w, "experiment", out.experiment, expect_experiment)
        return out


# -- state/config.json ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConfigSnapshot:
    """The resolved config written once into the experiment, so later nodes can check theirs against it.
    ``config`` is :meth:`ExperimentConfig.to_dict`; its field-level validation is ``node.config``'s job."""

    SCHEMA_VERSION: ClassVar[int] = 1

    experiment: str
    written_by: str
    written_at: float
    config: Mapping[str, Any]
    schema_version: int = 1

    def to_json(self) -> dict:
        return {
            "schema_version": self.SCHEMA_VERSION,
            "experiment": self.experiment,
            "written_by": self.written_by,
            "written_at": _finite_float(self.written_at, "written_at"),
            "config": dict(self.config),
        }

    @classmethod
    def from_json(cls, obj: Any, *, expect_experiment: str | None = None) -> "ConfigSnapshot":
        w = "config_snapshot"
        obj = _mapping(obj, w)
        version = _version(obj, w, cls.SCHEMA_VERSION)
        config = _mapping(_get(obj, "config", w), f"{w}.config")
        out = cls(
            experiment=_name(obj, "experiment", w),
            written_by=_name(obj, "written_by", w),
            written_at=_float(obj, "written_at", w, min=0.0),
            config=config,
            schema_version=version,
        )
        _expect(w, "experiment", out.experiment, expect_experiment)
        return out


# -- peers/<node>.json ------------------------------------------------------------------------------------

PEER_ROLES = ("coordinator", "worker")
PEER_STATUSES = ("starting", "running", "finished", "stopping")


@dataclass(frozen=True)
class PeerRecord:
    """A node's registration and heartbeat. ``progress`` is a counter the main loop bumps, so a loop that is
    stuck (while a heartbeat thread still runs) is visible to the supervisor."""

    SCHEMA_VERSION: ClassVar[int] = 1

    node_id: str
    role: str
    pid: int
    host: str
    started_at: float
    heartbeat_at: float
    round: int
    progress: int
    status: str
    schema_version: int = 1

    def __post_init__(self):
        if self.role not in PEER_ROLES:
            raise ValueError(f"role must be one of {', '.join(PEER_ROLES)}; got {self.role!r}")
        if self.status not in PEER_STATUSES:
            raise ValueError(f"status must be one of {', '.join(PEER_STATUSES)}; got {self.status!r}")

    def to_json(self) -> dict:
        return {
            "schema_version": self.SCHEMA_VERSION,
            "node_id": self.node_id,
            "role": self.role,
            "pid": self.pid,
            "host": self.host,
            "started_at": _finite_float(self.started_at, "started_at"),
            "heartbeat_at": _finite_float(self.heartbeat_at, "heartbeat_at"),
            "round": self.round,
            "progress": self.progress,
            "status": self.status,
        }

    @classmethod
    def from_json(cls, obj: Any, *, expect_node: str | None = None) -> "PeerRecord":
        w = "peer"
        obj = _mapping(obj, w)
        version = _version(obj, w, cls.SCHEMA_VERSION)
        out = cls(
            node_id=_name(obj, "node_id", w),
            role=_choice(obj, "role", w, PEER_ROLES),
            pid=_int(obj, "pid", w, max=2**31 - 1),
            host=_str(obj, "host", w, max_len=255),
            started_at=_float(obj, "started_at", w, min=0.0),
            heartbeat_at=_float(obj, "heartbeat_at", w, min=0.0),
            round=_int(obj, "round", w),
            progress=_int(obj, "progress", w),
            status=_choice(obj, "status", w, PEER_STATUSES),
            schema_version=version,
        )
        _expect(w, "node_id", out.node_id, expect_node)
        return out


# -- rollouts/round_R/stage_S/<node>.json -------------------------------------------------------------

@dataclass(frozen=True)
class RolloutLimits:
    """Caps applied to a peer's rollout file (beyond the byte cap applied before parsing)."""

    max_groups: int = 256
    max_completions: int = 64
    max_prompt_chars: int = 32_768
    max_response_chars: int = 32_768
    max_dataset_chars: int = 128


DEFAULT_ROLLOUT_LIMITS = RolloutLimits()


@dataclass(frozen=True)
class TaskRef:
    """Where a question comes from, so the receiver can rebuild question and answer and re-score locally:
    ``reasoning_gym.create_dataset(dataset, size=..., seed=seed)[index]``."""

    dataset: str
    seed: int
    index: int

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "seed": self.seed, "index": self.index}

    @classmethod
    def from_json(cls, obj: Any, where: str = "task", *, limits: RolloutLimits = DEFAULT_ROLLOUT_LIMITS) -> "TaskRef":
        obj = _mapping(obj, where)
        return cls(
            dataset=_str(obj, "dataset", where, max_len=limits.max_dataset_chars),
            seed=_int(obj, "seed", where),
            index=_int(obj, "index", where),
        )


@dataclass(frozen=True)
class Rollout:
    """One completion of a question, with the reward its author gave it (never trusted by a receiver)."""

    prompt: str
    response: str
    reward: float
    finished: bool
    task: TaskRef

    def to_json(self) -> dict:
        return {
            "prompt": self.prompt,
            "response": self.response,
            "reward": _finite_float(self.reward, "reward"),
            "finished": bool(self.finished),
            "task": self.task.to_json(),
        }

    @classmethod
    def from_json(cls, obj: Any, where: str = "rollout", *,
                  limits: RolloutLimits = DEFAULT_ROLLOUT_LIMITS) -> "Rollout":
        obj = _mapping(obj, where)
        return cls(
            prompt=_str(obj, "prompt", where, max_len=limits.max_prompt_chars, control_ok=True),
            response=_str(obj, "response", where, max_len=limits.max_response_chars, control_ok=True),
            reward=_float(obj, "reward", where),
            finished=_bool(obj, "finished", where),
            task=TaskRef.from_json(_get(obj, "task", where), f"{where}.task", limits=limits),
        )


@dataclass(frozen=True)
class RolloutFile:
    """One node's rollouts for one (round, stage), in the seeds' shape::

        {"schema_version": 1, "peer_id": "worker_1", "round": 5, "stage": 0, "timestamp": 1.7e9,
         "rollouts": {"0": [{"prompt", "response", "reward", "finished", "task": {...}}, ...], "1": [...]}}

    Each batch id (a non-negative integer as a string) is one question group: G completions sharing one
    prompt and one task reference. ``rollouts`` is read-only (a mapping proxy of tuples).
    """

    SCHEMA_VERSION: ClassVar[int] = 1

    peer_id: str
    round: int
    stage: int
    timestamp: float
    rollouts: Mapping[str, tuple[Rollout, ...]] = field(default_factory=dict)
    schema_version: int = 1

    def __post_init__(self):
        frozen = {}
        for batch_id, group in dict(self.rollouts).items():
            if not isinstance(batch_id, str) or not _BATCH_ID.fullmatch(batch_id):
                raise ValueError(f"batch id must be a non-negative integer as a string, got {batch_id!r}")
            group = tuple(group)
            if group and any(r.prompt != group[0].prompt or r.task != group[0].task for r in group):
                raise ValueError(f"group {batch_id}: every completion must share one prompt and task")
            frozen[batch_id] = group
        object.__setattr__(self, "rollouts", MappingProxyType(frozen))

    @property
    def num_groups(self) -> int:
        return len(self.rollouts)

    def to_json(self) -> dict:
        return {
            "schema_version": self.SCHEMA_VERSION,
            "peer_id": self.peer_id,
            "round": self.round,
            "stage": self.stage,
            "timestamp": _finite_float(self.timestamp, "timestamp"),
            "rollouts": {bid: [r.to_json() for r in group] for bid, group in self.rollouts.items()},
        }

    @classmethod
    def from_json(
        cls,
        obj: Any,
        *,
        expect_round: int | None = None,
        expect_stage: int | None = None,
        expect_node: str | None = None,
        limits: RolloutLimits = DEFAULT_ROLLOUT_LIMITS,
    ) -> "RolloutFile":
        w = "rollout_file"
        obj = _mapping(obj, w)
        version = _version(obj, w, cls.SCHEMA_VERSION)
        peer_id = _name(obj, "peer_id", w)
        rnd = _int(obj, "round", w)
        stage = _int(obj, "stage", w)
        # Path consistency first: a misplaced file is rejected before its (possibly large) body is checked.
        _expect(w, "peer_id", peer_id, expect_node)
        _expect(w, "round", rnd, expect_round)
        _expect(w, "stage", stage, expect_stage)
        timestamp = _float(obj, "timestamp", w, min=0.0)
        groups = _mapping(_get(obj, "rollouts", w), f"{w}.rollouts")
        if len(groups) > limits.max_groups:
            raise SchemaError(f"{w}.rollouts: {len(groups)} groups, more than the limit {limits.max_groups}")
        parsed: dict[str, tuple[Rollout, ...]] = {}
        for batch_id, group in groups.items():
            gw = f"{w}.rollouts[{batch_id[:20]!r}]"
            if not _BATCH_ID.fullmatch(batch_id):
                raise SchemaError(f"{gw}: batch id must be a non-negative integer as a string")
            if not isinstance(group, list):
                raise SchemaError(f"{gw}: must be a list of completions, got {type(group).__name__}")
            if not group:
                raise SchemaError(f"{gw}: empty group")
            if len(group) > limits.max_completions:
                raise SchemaError(f"{gw}: {len(group)} completions, more than the limit {limits.max_completions}")
            items = tuple(Rollout.from_json(item, f"{gw}[{i}]", limits=limits) for i, item in enumerate(group))
            first = items[0]
            for i, item in enumerate(items[1:], 1):
                if item.prompt != first.prompt:
                    raise SchemaError(f"{gw}[{i}]: prompt differs from the group's first completion")
                if item.task != first.task:
                    raise SchemaError(f"{gw}[{i}]: task reference differs from the group's first completion")
            parsed[batch_id] = items
        return cls(peer_id=peer_id, round=rnd, stage=stage, timestamp=timestamp, rollouts=parsed,
                   schema_version=version)


# -- rewards/round_R/stage_S/<node>.json --------------------------------------------------------------

@dataclass(frozen=True)
class RoundResult:
    """A worker's result for one (round, stage): the coordinator's completion signal."""

    SCHEMA_VERSION: ClassVar[int] = 1

    node_id: str
    round: int
    stage: int
    mean_reward: float
    num_local_groups: int
    num_external_groups: int
    submitted_at: float
    schema_version: int = 1

    def to_json(self) -> dict:
        return {
            "schema_version": self.SCHEMA_VERSION,
            "node_id": self.node_id,
            "round": self.round,
            "stage": self.stage,
            "mean_reward": _finite_float(self.mean_reward, "mean_reward"),
            "num_local_groups": self.num_local_groups,
            "num_external_groups": self.num_external_groups,
            "submitted_at": _finite_float(self.submitted_at, "submitted_at"),
        }

    @classmethod
    def from_json(
        cls,
        obj: Any,
        *,
        expect_round: int | None = None,
        expect_stage: int | None = None,
        expect_node: str | None = None,
    ) -> "RoundResult":
        w = "round_result"
        obj = _mapping(obj, w)
        version = _version(obj, w, cls.SCHEMA_VERSION)
        out = cls(
            node_id=_name(obj, "node_id", w),
            round=_int(obj, "round", w),
            stage=_int(obj, "stage", w),
            mean_reward=_float(obj, "mean_reward", w),
            num_local_groups=_int(obj, "num_local_groups", w, max=1_000_000),
            num_external_groups=_int(obj, "num_external_groups", w, max=1_000_000),
            submitted_at=_float(obj, "submitted_at", w, min=0.0),
            schema_version=version,
        )
        _expect(w, "node_id", out.node_id, expect_node)
        _expect(w, "round", out.round, expect_round)
        _expect(w, "stage", out.stage, expect_stage)
        return out


# -- logs/<node>/metrics.jsonl ----------------------------------------------------------------------------

_METRICS_MAX_DEPTH = 8


def validate_metrics_line(obj: Any, *, expect_node: str | None = None) -> dict:
    """A metrics line is free-form JSON but must be an object with a plain ``node_id`` and an integer
    ``round`` >= 0, and only finite numbers (write ``None`` for a NaN loss). Returns ``obj``."""
    w = "metrics_line"
    obj = _mapping(obj, w)
    node_id = _name(obj, "node_id", w)
    _int(obj, "round", w)
    _expect(w, "node_id", node_id, expect_node)
    stack: list[tuple[Any, str, int]] = [(obj, w, 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > _METRICS_MAX_DEPTH:
            raise SchemaError(f"{where}: nested deeper than {_METRICS_MAX_DEPTH} levels")
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise SchemaError(f"{where}: keys must be strings, got {type(k).__name__}")
                stack.append((v, f"{where}.{k}", depth + 1))
        elif isinstance(value, (list, tuple)):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise SchemaError(f"{where}: must be a finite number (use null), got {value!r}")
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            raise SchemaError(f"{where}: {type(value).__name__} is not a JSON value")
    return obj


# All formats with a version, for tooling and tests.
VERSIONED_FORMATS = (RoundState, ConfigSnapshot, PeerRecord, RolloutFile, RoundResult)
