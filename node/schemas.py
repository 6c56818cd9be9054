"""Every file format of the shared experiment directory, one frozen pydantic dataclass each (DESIGN.md §3).

Each format has a ``SCHEMA_VERSION``, ``to_json() -> dict`` (what we write) and
``from_json(obj, *, expect_...) -> cls`` (what we accept from the shared directory, where everything is
untrusted). ``from_json`` raises :class:`SchemaError` (a ``ValueError``) with one clear reason:

- types are exact: a bool is not an int, a string is not a number; ints are accepted where a float is
  expected (JSON does not distinguish ``1`` from ``1.0``), and every float must be finite;
- identifiers (node ids, experiment names) must be plain names (:data:`node.config.PlainName`);
- sizes are capped (groups per file, completions per group, string lengths): :class:`RolloutLimits`;
- a file whose ``schema_version`` is newer than ours is refused ("schema version N is newer than
  supported M"); an older version is accepted when its shape is fine;
- ``expect_round``/``expect_stage``/``expect_node``/``expect_experiment`` (the validation context) reject a
  file whose contents do not match the path it was found at (a peer writing ``round: 7`` into
  ``round_5/`` is ignored, not trusted), before the rest of the file is looked at.

Unknown top-level and rollout keys are ignored (a tolerant reader: a newer writer may add fields); what we
write never carries them. A task reference is :class:`sapo.tasks.TaskRef`, whose keys are exact. Building
a format in code validates it the same way (a ValueError). No torch, no I/O here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Mapping

from pydantic import AfterValidator, ConfigDict, Field, JsonValue, TypeAdapter, ValidationError, ValidationInfo
from pydantic import field_serializer, field_validator, model_validator
from pydantic_core import PydanticCustomError

from node.config import PlainName
from sapo.tasks import TaskRef
from sapo.validation import Bool, Float, Int, Str, choice, explain, model, one_message, to_plain, validate

__all__ = ["ConfigSnapshot", "DEFAULT_ROLLOUT_LIMITS", "HeartbeatRecord", "PeerRecord", "Rollout", "RolloutFile", "RolloutLimits",
           "RoundResult", "RoundState", "SchemaError", "TaskRef", "VERSIONED_FORMATS", "validate_metrics_line"]


class SchemaError(ValueError):
    """A file from the shared directory does not match its format; ``str(err)`` says why."""


def schema_error(err: ValidationError, cls: type) -> SchemaError:
    """``<format>.<field>: <reason>`` for the first problem pydantic found."""
    path, message = explain(err, cls)
    where = getattr(cls, "WHERE", cls.__name__.lower())
    where = where if not path else f"{where}{'' if path.startswith('[') else '.'}{path}"
    return SchemaError(f"{where}: {message}")


_file_format = model(extra="ignore", error=schema_error)

# -- field types --------------------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _valid_utf8(value: str) -> str:
    if _SURROGATE.search(value):
        raise ValueError("contains a lone surrogate (not valid UTF-8)")
    return value


def _one_line(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("contains control characters")
    return value


Count = Annotated[Int, Field(ge=0, le=2**63 - 1)]
Version = Annotated[Int, Field(ge=1)]
GroupCount = Annotated[Int, Field(ge=0, le=1_000_000)]
Time = Annotated[Float, Field(ge=0.0)]
Text = Annotated[Str, AfterValidator(_valid_utf8)]
Line = Annotated[Text, AfterValidator(_one_line)]
BatchId = Annotated[Str, Field(pattern=r"^(0|[1-9][0-9]{0,8})$"),
                    one_message("a batch id: a non-negative integer as a string, without leading zeros")]


@dataclass(frozen=True)
class RolloutLimits:
    """Caps applied to a peer's rollout file (beyond the byte cap applied before parsing)."""

    max_groups: int = 256
    max_completions: int = 64
    max_prompt_chars: int = 32_768
    max_response_chars: int = 32_768


DEFAULT_ROLLOUT_LIMITS = RolloutLimits()


def _context(info: ValidationInfo) -> Mapping[str, Any]:
    return info.context or {}


def _limits(info: ValidationInfo) -> RolloutLimits:
    return _context(info).get("limits") or DEFAULT_ROLLOUT_LIMITS


class FileFormat:
    """What every shared-dir format shares: the version rule, path expectations, to_json and from_json.

    ``PATH_FIELDS`` maps a ``from_json`` keyword (``expect_round``...) to the field it pins; ``WHERE`` names
    the format in error messages.
    """

    SCHEMA_VERSION: ClassVar[int | None] = 1
    WHERE: ClassVar[str] = "file"
    PATH_FIELDS: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _version_and_path(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):  # built in code, or not an object at all: the fields decide
            return data
        if cls.SCHEMA_VERSION is not None:
            version = data.get("schema_version")
            if "schema_version" not in data:
                raise PydanticCustomError("missing_field", "missing field 'schema_version'")
            if type(version) is int and version > cls.SCHEMA_VERSION:
                raise PydanticCustomError("newer_version", "schema version {found} is newer than supported {ours}",
                                          {"found": version, "ours": cls.SCHEMA_VERSION})
        for keyword, name in cls.PATH_FIELDS.items():
            expected = _context(info).get(keyword)
            if expected is not None and name in data and data[name] != expected:
                raise PydanticCustomError("wrong_path", "{name} {found} does not match its path ({expected})",
                                          {"name": name, "found": repr(data[name])[:80], "expected": repr(expected)})
        return data

    def to_json(self) -> dict:
        """What we write: the current schema version first, then every field."""
        body = {k: v for k, v in to_plain(self).items() if k != "schema_version"}
        return {"schema_version": self.SCHEMA_VERSION, **body} if self.SCHEMA_VERSION else body

    @classmethod
    def from_json(cls, obj: Any, *, limits: RolloutLimits | None = None, **expect: Any):
        """Parse an untrusted object; ``expect`` pins fields to the path the file was found at."""
        unknown = sorted(set(expect) - set(cls.PATH_FIELDS))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_json() got unexpected keyword arguments {unknown}")
        try:
            return validate(cls, obj, context={**expect, "limits": limits})
        except ValidationError as err:
            raise schema_error(err, cls) from None


# -- state/current_state.json ---------------------------------------------------------------------------

@_file_format
class RoundState(FileFormat):
    """The coordinator's view of the swarm: which round and stage is current, and whether it is over."""

    WHERE: ClassVar[str] = "state"
    PATH_FIELDS: ClassVar[Mapping[str, str]] = {"expect_experiment": "experiment"}

    experiment: PlainName
    round: Count
    stage: Count
    started_at: Time
    updated_at: Time
    finished: Bool
    max_rounds: Annotated[Int, Field(ge=1, le=2**63 - 1)]
    schema_version: Version = 1


# -- state/config.json ----------------------------------------------------------------------------------

@_file_format
class ConfigSnapshot(FileFormat):
    """The resolved config written once into the experiment, so later nodes can check theirs against it.
    ``config`` is :meth:`ExperimentConfig.to_dict`; its field-level validation is ``node.config``'s job."""

    WHERE: ClassVar[str] = "config_snapshot"
    PATH_FIELDS: ClassVar[Mapping[str, str]] = {"expect_experiment": "experiment"}

    experiment: PlainName
    written_by: PlainName
    written_at: Time
    config: dict[Str, JsonValue]
    schema_version: Version = 1


# -- peers/<node>.json ------------------------------------------------------------------------------------

PEER_ROLES = ("coordinator", "worker")
PEER_STATUSES = ("starting", "running", "finished", "stopping")


@_file_format
class PeerRecord(FileFormat):
    """A node's registration and heartbeat. ``progress`` is a counter the main loop bumps, so a loop that is
    stuck (while a heartbeat thread still runs) is visible to the supervisor."""

    WHERE: ClassVar[str] = "peer"
    PATH_FIELDS: ClassVar[Mapping[str, str]] = {"expect_node": "node_id"}

    node_id: PlainName
    role: choice(*PEER_ROLES)
    pid: Annotated[Int, Field(ge=0, le=2**31 - 1)]
    host: Annotated[Line, Field(max_length=255)]
    started_at: Time
    heartbeat_at: Time
    round: Count
    progress: Count
    status: choice(*PEER_STATUSES)
    schema_version: Version = 1


# -- <runtime dir>/<node>.heartbeat.json (local disk, read by the supervisor) --------------------------

@_file_format
class HeartbeatRecord(FileFormat):
    """What one heartbeat says (node.heartbeat writes it). Times are wall-clock seconds (time.time()).
    Not a shared-dir file, but read by another process all the same: validated like one. No version."""

    SCHEMA_VERSION: ClassVar[int | None] = None
    WHERE: ClassVar[str] = "heartbeat"

    node_id: PlainName
    role: Annotated[Line, Field(max_length=32)]
    pid: Annotated[Int, Field(ge=0, le=2**31 - 1)]
    heartbeat_at: Float
    progress: Count
    progress_at: Float
    phase: Annotated[Line, Field(max_length=64)]
    round: Annotated[Int, Field(ge=-1, le=2**63 - 1)]  # -1 before the node's first round
    status: Annotated[Line, Field(max_length=32)]  # starting | running | finished | stopping


# -- rollouts/round_R/stage_S/<node>.json -------------------------------------------------------------

# Files under round_R/stage_S/ carry their round and stage.
_ROUND_PATH = {"expect_round": "round", "expect_stage": "stage"}

@_file_format
class Rollout:
    """One completion of a question, with the reward its author gave it (never trusted by a receiver)."""

    prompt: Text
    response: Text
    reward: Float
    finished: Bool
    task: TaskRef

    @field_validator("prompt", "response")
    @classmethod
    def _within_limits(cls, value: str, info: ValidationInfo) -> str:
        limits = _limits(info)
        cap = limits.max_prompt_chars if info.field_name == "prompt" else limits.max_response_chars
        if len(value) > cap:
            raise ValueError(f"longer than {cap} characters ({len(value)})")
        return value


@_file_format
class RolloutFile(FileFormat):
    """One node's rollouts for one (round, stage), in the seeds' shape::

        {"schema_version": 1, "peer_id": "worker_1", "round": 5, "stage": 0, "timestamp": 1.7e9,
         "rollouts": {"0": [{"prompt", "response", "reward", "finished", "task": {...}}, ...], "1": [...]}}

    Each batch id (a non-negative integer as a string) is one question group: G completions sharing one
    prompt and one task reference. ``rollouts`` is read-only (a mapping proxy of tuples).
    """

    WHERE: ClassVar[str] = "rollout_file"
    PATH_FIELDS: ClassVar[Mapping[str, str]] = {**_ROUND_PATH, "expect_node": "peer_id"}

    peer_id: PlainName
    round: Count
    stage: Count
    timestamp: Time
    rollouts: Mapping[BatchId, Annotated[tuple[Rollout, ...], Field(min_length=1)]] = Field(default_factory=dict)
    schema_version: Version = 1

    @field_validator("rollouts", mode="before")
    @classmethod
    def _counts_within_limits(cls, groups: Any, info: ValidationInfo) -> Any:
        """Count groups and completions before parsing them: an oversized file costs no more than that."""
        limits = _limits(info)
        if isinstance(groups, Mapping):
            if len(groups) > limits.max_groups:
                raise ValueError(f"{len(groups)} groups, more than the limit {limits.max_groups}")
            for batch_id, group in groups.items():
                if isinstance(group, (list, tuple)) and len(group) > limits.max_completions:
                    raise ValueError(f"group {str(batch_id)[:20]!r}: {len(group)} completions, more than the "
                                     f"limit {limits.max_completions}")
        return groups

    @field_validator("rollouts")
    @classmethod
    def _groups_share_question(cls, groups: Mapping[str, tuple[Rollout, ...]]) -> Mapping[str, tuple[Rollout, ...]]:
        for batch_id, group in groups.items():
            for i, item in enumerate(group[1:], 1):
                differs = "prompt" if item.prompt != group[0].prompt else "task reference"
                if differs == "prompt" or item.task != group[0].task:
                    raise ValueError(f"group {batch_id!r}, completion {i}: {differs} differs from the group's first")
        return MappingProxyType(dict(groups))

    @field_serializer("rollouts", mode="wrap")
    def _plain_rollouts(self, groups: Mapping, handler: Any) -> Any:
        return handler(dict(groups))  # the read-only proxy, dumped as the dict it wraps

    @property
    def num_groups(self) -> int:
        return len(self.rollouts)


# -- rewards/round_R/stage_S/<node>.json --------------------------------------------------------------

@_file_format
class RoundResult(FileFormat):
    """A worker's result for one (round, stage): the coordinator's completion signal."""

    WHERE: ClassVar[str] = "round_result"
    PATH_FIELDS: ClassVar[Mapping[str, str]] = {**_ROUND_PATH, "expect_node": "node_id"}

    node_id: PlainName
    round: Count
    stage: Count
    mean_reward: Float
    num_local_groups: GroupCount
    num_external_groups: GroupCount
    submitted_at: Time
    schema_version: Version = 1


# -- logs/<node>/metrics.jsonl ----------------------------------------------------------------------------

_METRICS_MAX_DEPTH = 8


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value (0 for a scalar), computed without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((v, depth + 1) for v in children)
    return deepest


def _shallow(line: dict) -> dict:
    if _depth(line) > _METRICS_MAX_DEPTH:
        raise ValueError(f"nested deeper than {_METRICS_MAX_DEPTH} levels")
    return line


@_file_format
class MetricsLine(FileFormat):
    """A metrics line: free-form JSON, but an object with a plain ``node_id`` and an integer ``round`` >= 0,
    only finite numbers (write ``None`` for a NaN loss) and at most eight levels deep."""

    SCHEMA_VERSION: ClassVar[int | None] = None
    WHERE: ClassVar[str] = "metrics_line"
    PATH_FIELDS: ClassVar[Mapping[str, str]] = {"expect_node": "node_id"}

    node_id: PlainName
    round: Count


_JSON_OBJECT = TypeAdapter(Annotated[dict[str, JsonValue], AfterValidator(_shallow)],
                           config=ConfigDict(allow_inf_nan=False))


def validate_metrics_line(obj: Any, *, expect_node: str | None = None) -> dict:
    """Check one metrics line (see :class:`MetricsLine`); returns ``obj``, or raises SchemaError."""
    MetricsLine.from_json(obj, expect_node=expect_node)
    try:
        _JSON_OBJECT.validate_python(obj)
    except ValidationError as err:
        raise schema_error(err, MetricsLine) from None
    return obj


# All formats with a version, for tooling and tests.
VERSIONED_FORMATS = (RoundState, ConfigSnapshot, PeerRecord, RolloutFile, RoundResult)
