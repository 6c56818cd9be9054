"""What one experiment recorded, for ``swarm report``: its I/J/G, each worker's metrics, evals and events.

An experiment is given as a config file (read with :func:`node.config.resolve_config`, so environment
overrides and ``--set`` apply; its I/J come from the config) or an experiment directory (I/J from its
``state/config.json``). Each worker's ``logs/<node>/metrics.jsonl``, ``evals.jsonl`` (held-out evals, when
the experiment ran them: :func:`eval_line`) and ``training_events.jsonl``, and the coordinator's ``round_switches.jsonl`` (:mod:`supervisor.switches`), are read tolerantly through
:mod:`node.fsio`, the one checked reader, so a running experiment works: a partial last line or any
unparseable line is skipped, a node without files is simply absent (an experiment from before the round
switch was logged has no switches), and a repeated (node, round) line keeps its first occurrence (the
one the worker wrote when it trained that round). Signed lines are read without the key: the ``hmac``
key is ignored like any key the report does not use.

Every host's workers are read: each ``logs/<id>/`` whose name is a node id (another host's
``<host>-worker_1`` too), names that look like the ids supervisors give first, at most :data:`MAX_NODES`
(the rest counted in one note), and each worker's host from its peer record (``peers/<id>.json``, also
naming workers that registered but have no metrics yet).

Everything under the experiment directory is untrusted (other machines write it). A file that is a
symlink, a FIFO or a device, a config snapshot that is too large or not strict JSON: each becomes one
"skipped" line in the report's warnings and is left out, never a traceback or a hang. Lines that are not
JSON objects, metrics lines that are not a :class:`node.schemas.MetricsLine`, and lines holding a number
out of bounds (:func:`supervisor.terminal.number_problem`: a 401-digit integer, ``1e300``) are left out
with one warning per file naming the first one and why. Names and reasons in the warnings are escaped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from node.config import plain_name_problem, resolve_config  # no torch: node.config is shared with the supervisor
from node.fsio import BadFile, iter_jsonl, read_capped
from node.records import EVALS_FILE
from node.schemas import ConfigSnapshot, PeerRecord, validate_metrics_line
from node.strict_json import parse_json_bytes
from sapo.config import ConfigError
from supervisor.status import NODE_ID_LIKE
from supervisor.switches import FILE_NAME as SWITCH_FILE, switch_line
from supervisor.terminal import escape_controls, finite_number, number_problem, short_value

CONFIG_SNAPSHOT_MAX_BYTES = 16 * 1024 * 1024  # a snapshot is a few KiB; this is a sanity cap
MAX_COUNT = 2 ** 63 - 1  # the largest round, I, J or G we take (node.schemas' Count)
SNAPSHOT_COUNTS = ("num_train_samples", "num_transplant_trees", "num_generations")
MAX_NODES = 256  # node directories read under logs/ (and peer records under peers/): junk cannot make it unbounded
PEER_MAX_BYTES = 64 * 1024  # a peer record is ~250 bytes


class ReportError(ValueError):
    """A user mistake (no such config or directory, nothing to report); the CLI prints it and exits 2."""


def count_or_none(value: Any) -> int | None:
    """``value`` when it is an int in ``[0, MAX_COUNT]``, else None."""
    return value if type(value) is int and 0 <= value <= MAX_COUNT else None


@dataclass
class ExperimentData:
    """What one experiment recorded: metrics lines deduplicated by (node, round), events, and its I/J/G."""

    label: str
    source: str
    experiment_dir: Path
    num_train_samples: int | None = None
    num_transplant_trees: int | None = None
    num_generations: int | None = None
    max_rounds: int | None = None
    metrics: dict[str, dict[int, dict]] = field(default_factory=dict)  # node -> round -> line
    evals: dict[str, dict[int, dict]] = field(default_factory=dict)  # node -> eval round -> checked eval line
    events: dict[str, list[dict]] = field(default_factory=dict)  # node -> events in file order
    switches: dict[int, dict] = field(default_factory=dict)  # round -> the checked round switch into it
    hosts: dict[str, str] = field(default_factory=dict)  # worker -> the host its peer record names
    registered: list[str] = field(default_factory=list)  # workers with a peer record and no metrics (yet)
    skipped_lines: int = 0
    duplicate_lines: int = 0
    notes: list[str] = field(default_factory=list)  # become the report's warnings

    @property
    def nodes(self) -> list[str]:
        return sorted(self.metrics)

    @property
    def rounds(self) -> list[int]:
        """Rounds recorded by at least one worker, sorted."""
        return sorted({r for per_node in self.metrics.values() for r in per_node})

    def rewards(self) -> dict[int, dict[str, float]]:
        """round -> node -> reward_local (lines without a finite reward are left out)."""
        out: dict[int, dict[str, float]] = {}
        for node, per_node in self.metrics.items():
            for r, line in per_node.items():
                value = finite_number(line.get("reward_local"))
                if value is not None:
                    out.setdefault(r, {})[node] = value
        return dict(sorted(out.items()))

    def eval_accuracy(self) -> dict[str, dict[str, dict[int, float]]]:
        """task -> node -> eval round -> accuracy (evals that evaluated none of a task's questions left out)."""
        out: dict[str, dict[str, dict[int, float]]] = {}
        for node, per_node in sorted(self.evals.items()):
            for r, line in sorted(per_node.items()):
                for task, score in line["tasks"].items():
                    if score["accuracy"] is not None:
                        out.setdefault(task, {}).setdefault(node, {})[r] = score["accuracy"]
        return dict(sorted(out.items()))

    def restarts(self) -> list[dict]:
        """One ``{"node", "event", "timestamp", "round"}`` per restart (a ``resumed`` event, or a ``started``
        event after the node's first); ``round`` is the first round the node recorded after it (by
        timestamp; else the resumed checkpoint's round + 1; None when neither is known)."""
        out = []
        for node, events in sorted(self.events.items()):
            starts = 0
            for ev in events:
                name = ev.get("event")
                if name == "started":
                    starts += 1
                if not (name == "resumed" or (name == "started" and starts > 1)):
                    continue
                ts = finite_number(ev.get("timestamp"))
                after = [r for r, line in self.metrics.get(node, {}).items()
                         if ts is not None and (finite_number(line.get("timestamp")) or -1.0) >= ts]
                resumed = count_or_none(ev.get("round"))
                first = min(after) if after else (resumed + 1 if resumed is not None else None)
                out.append({"node": node, "event": name, "timestamp": ts, "round": first})
        return out

    def finished(self) -> bool:
        """Every worker with metrics has a ``finished`` event."""
        return bool(self.metrics) and all(
            any(ev.get("event") == "finished" for ev in self.events.get(node, ())) for node in self.metrics)

    def skip(self, path: Path, reason: str) -> None:
        """Note a file (or directory) left out, by its path inside the experiment."""
        try:
            where = path.relative_to(self.experiment_dir).as_posix()
        except ValueError:
            where = str(path)
        self.notes.append(escape_controls(f"{self.label}: skipped {where}: {reason}"))  # a hostile name stays one line


# --------------------------------------------------------------------------------------------------
# The config snapshot (state/config.json)
# --------------------------------------------------------------------------------------------------


def read_snapshot(experiment_dir: Path) -> tuple[dict, dict, str | None]:
    """(sapo section, experiment section, why it was refused) of ``state/config.json``, read through
    :func:`node.fsio.read_capped` and strict JSON and checked as a :class:`node.schemas.ConfigSnapshot`. A
    missing file gives ``({}, {}, None)``, a refused one ``({}, {}, reason)``."""
    try:
        raw, _ = read_capped(experiment_dir / "state" / "config.json", CONFIG_SNAPSHOT_MAX_BYTES)
        obj = parse_json_bytes(raw)
    except FileNotFoundError:
        return {}, {}, None
    except BadFile as err:
        return {}, {}, err.reason
    except OSError as err:
        return {}, {}, err.strerror or type(err).__name__
    except ValueError as err:
        return {}, {}, str(err)
    try:
        config = ConfigSnapshot.from_json(obj).config
    except ValueError as err:  # SchemaError
        return {}, {}, f"not a config snapshot ({err})"
    sapo, exp = config.get("sapo"), config.get("experiment")
    return (sapo if isinstance(sapo, dict) else {}), (exp if isinstance(exp, dict) else {}), None


def _snapshot_counts(data: ExperimentData, sapo: dict, exp: dict) -> None:
    """I/J/G and max_rounds from a snapshot; a value present but not a count is a note, shown as ``?``."""
    fields = [("sapo", k, sapo.get(k)) for k in SNAPSHOT_COUNTS] + [("experiment", "max_rounds", exp.get("max_rounds"))]
    for section, key, value in fields:
        counted = count_or_none(value)
        setattr(data, key, counted)
        if value is not None and counted is None:
            data.notes.append(f"{data.label}: state/config.json: {section}.{key} is not an integer in "
                              f"[0, 2**63 - 1] ({short_value(value)}); ignored")


def _from_directory(path: Path, source: str) -> ExperimentData:
    sapo, exp, problem = read_snapshot(path)
    if not sapo and not (path / "logs").is_dir():
        why = f"state/config.json refused: {problem};" if problem else "no state/config.json"
        raise ReportError(f"{path}: not an experiment directory ({why} and no logs/)")
    name = exp.get("name")
    label = name if isinstance(name, str) and plain_name_problem(name) is None else escape_controls(path.name)
    data = ExperimentData(label=label, source=source, experiment_dir=path)
    if problem:
        data.skip(path / "state" / "config.json", problem)
    _snapshot_counts(data, sapo, exp)
    return data


def _from_config(path: Path, source: str, overrides: Sequence[str]) -> ExperimentData:
    try:
        config = resolve_config(path, overrides=overrides)
    except ConfigError as err:
        raise ReportError(f"{path}: {err}") from None
    data = ExperimentData(
        label=config.experiment.name, source=source, experiment_dir=config.experiment_dir,
        num_train_samples=config.sapo.num_train_samples, num_transplant_trees=config.sapo.num_transplant_trees,
        num_generations=config.sapo.num_generations, max_rounds=config.experiment.max_rounds,
    )
    recorded, _, problem = read_snapshot(config.experiment_dir)
    if problem:
        data.skip(config.experiment_dir / "state" / "config.json", problem)
    for key in SNAPSHOT_COUNTS:
        if key in recorded and recorded[key] != getattr(config.sapo, key):
            data.notes.append(f"{data.label}: sapo.{key} is {getattr(config.sapo, key)} in {path} but "
                              f"{short_value(recorded[key])} in the experiment's state/config.json; the table uses "
                              "the config")
    return data


def resolve_source(source: str | Path, overrides: Sequence[str] = ()) -> ExperimentData:
    """An empty :class:`ExperimentData` for a config file or an experiment directory (ReportError if neither)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_directory(path, str(source))
    if not path.is_file():
        raise ReportError(f"{path}: no such config file or experiment directory")
    return _from_config(path, str(source), overrides)


# --------------------------------------------------------------------------------------------------
# The workers' logs
# --------------------------------------------------------------------------------------------------


def _read_rows(data: ExperimentData, path: Path, check: Callable[[dict], Any]) -> list[dict]:
    """The lines of ``path`` (:func:`node.fsio.iter_jsonl`) that are JSON objects with every number in
    bounds and pass ``check`` (ValueError: why not). The others are counted in ``skipped_lines`` and noted
    once per file with the first one's reason; a refused or unreadable file is noted and gives none."""
    rows: list[dict] = []
    bad, first = 0, ""
    try:
        for number, value in iter_jsonl(path):
            try:
                if isinstance(value, Exception):
                    raise value
                if not isinstance(value, dict):
                    raise ValueError("not a JSON object")
                problem = number_problem(value)
                if problem:
                    raise ValueError(problem)
                check(value)
            except ValueError as err:
                bad += 1
                first = first or f"line {number}: {err}"
                continue
            rows.append(value)
    except BadFile as err:
        data.skip(path, err.reason)
        return []
    except OSError as err:
        data.skip(path, err.strerror or type(err).__name__)
        return []
    if bad:
        data.skipped_lines += bad
        data.skip(path, f"{bad} line(s) left out; the first, {first}")
    return rows


def _fraction(obj: dict, key: str, where: str) -> float | None:
    value = obj.get(key)
    number = finite_number(value)
    if value is not None and (number is None or not 0.0 <= number <= 1.0):
        raise ValueError(f"{where}.{key}: not a number in [0, 1] or null ({short_value(value)})")
    return number


def _task_score(name: Any, obj: Any) -> dict:
    if not isinstance(name, str) or plain_name_problem(name):
        raise ValueError(f"tasks: {short_value(name)} is not a task name")
    if not isinstance(obj, dict):
        raise ValueError(f"tasks.{name}: not a JSON object")
    n, planned = count_or_none(obj.get("n")), count_or_none(obj.get("planned", obj.get("n")))
    if n is None or planned is None or n > planned:
        raise ValueError(f"tasks.{name}: n and planned are not counts with n <= planned")
    accuracy = _fraction(obj, "accuracy", f"tasks.{name}")
    if (accuracy is None) != (n == 0):
        raise ValueError(f"tasks.{name}: accuracy must be null exactly when n is 0")
    seconds = finite_number(obj.get("seconds"))
    return {"accuracy": accuracy, "score": _fraction(obj, "score", f"tasks.{name}"), "n": n, "planned": planned,
            "seconds": seconds, "complete": n == planned}


def eval_line(obj: Any, *, expect_node: str | None = None) -> dict:
    """The fields of one held-out eval line (:mod:`node.records` writes them) the report uses: ``round``,
    ``final``, ``complete``, ``seconds`` and per task ``accuracy``, ``score``, ``n``, ``planned``, ``seconds``,
    ``complete``; ValueError naming the first problem. Other keys (``hmac``, ``timestamp``) are ignored."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if expect_node is not None and obj.get("node_id") != expect_node:
        raise ValueError(f"not an eval of {expect_node} (node_id {short_value(obj.get('node_id'))})")
    rnd = count_or_none(obj.get("round"))
    if rnd is None:
        raise ValueError(f"round: not an integer in [0, 2**63 - 1] ({short_value(obj.get('round'))})")
    tasks = obj.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError("tasks: not a non-empty JSON object")
    scores = {name: _task_score(name, value) for name, value in tasks.items()}
    return {"round": rnd, "final": obj.get("final") is True, "seconds": finite_number(obj.get("seconds")),
            "complete": all(t["complete"] for t in scores.values()), "tasks": scores}


def _event_line(node: str) -> Callable[[dict], None]:
    def check(line: dict) -> None:
        if line.get("node_id") != node or not isinstance(line.get("event"), str):
            raise ValueError(f"not an event of {node} (node_id and event)")
    return check


def _by_round(data: ExperimentData, path: Path, check: Callable[[dict], dict], into: dict[int, dict]) -> None:
    """The lines of ``path`` that ``check`` accepts, as ``check`` returns them, into ``into`` by round; a
    repeated round keeps its first line (the others are counted in ``duplicate_lines``)."""
    for line in _read_rows(data, path, check):
        checked = check(line)
        if checked["round"] in into:
            data.duplicate_lines += 1
            continue
        into[checked["round"]] = checked


def _load_node(data: ExperimentData, node_dir: Path) -> None:
    node = node_dir.name
    per_node: dict[int, dict] = {}
    # another node's line, no round, a round beyond 2**63 - 1, too deep...: SchemaError (a ValueError)
    _by_round(data, node_dir / "metrics.jsonl", lambda x: validate_metrics_line(x, expect_node=node), per_node)
    if per_node:
        data.metrics[node] = per_node
    evals: dict[int, dict] = {}
    _by_round(data, node_dir / EVALS_FILE, lambda x: eval_line(x, expect_node=node), evals)
    if evals:
        data.evals[node] = evals
    events = _read_rows(data, node_dir / "training_events.jsonl", _event_line(node))
    if events:
        data.events[node] = events
    _by_round(data, node_dir / SWITCH_FILE, lambda x: switch_line(x, expect_node=node), data.switches)


def _likely_first(names: list[str], limit: int) -> tuple[list[str], int]:
    """(``names`` sorted, the ids supervisors give first, then other node ids, then the rest, at most
    ``limit`` of them; how many more were left out)."""
    ordered = sorted(names, key=lambda n: (NODE_ID_LIKE.fullmatch(n) is None, plain_name_problem(n) is not None, n))
    return ordered[:limit], max(0, len(ordered) - limit)


def node_ids(names: list[str], limit: int = MAX_NODES) -> tuple[list[str], int]:
    """(the node ids among ``names``, those that look like the ids supervisors give first, at most ``limit``;
    how many more were left out). Other names (hidden, not plain) are not nodes."""
    return _likely_first([n for n in names if not n.startswith(".") and plain_name_problem(n) is None], limit)


def _listdir(data: ExperimentData, directory: Path) -> list[str]:
    """The names in ``directory`` ([] when it is missing; a symlink is noted, never entered)."""
    if directory.is_symlink():
        data.skip(directory, "is a symlink")
        return []
    try:
        return os.listdir(directory) if directory.is_dir() else []
    except OSError as err:
        data.skip(directory, err.strerror or type(err).__name__)
        return []


def _node_dirs(data: ExperimentData) -> list[Path]:
    """The directories under ``logs/``, node ids first, at most :data:`MAX_NODES` (any other name is read too:
    its lines name no such node, so only its refused files are noted); a symlink among them is noted and left
    out."""
    logs = data.experiment_dir / "logs"
    names, more = _likely_first(_listdir(data, logs), MAX_NODES)
    if more:
        data.notes.append(f"{data.label}: {more} more node directories under logs/ not read (at most {MAX_NODES})")
    entries = [logs / name for name in names]
    for p in entries:
        if p.is_symlink():
            data.skip(p, "is a symlink")
    return [p for p in entries if not p.is_symlink() and p.is_dir()]


def peer_record(path: Path, node: str) -> PeerRecord | None:
    """``node``'s peer record at ``path`` (capped, strict JSON, its schema; a signature is not checked), or None."""
    try:
        return PeerRecord.from_json(parse_json_bytes(read_capped(path, PEER_MAX_BYTES)[0]), expect_node=node)
    except (OSError, ValueError, BadFile):  # a refused or invalid record names no host
        return None


def _peers(data: ExperimentData) -> None:
    """Each worker's host (its peer record, unverified: the report reads without the key) and the workers
    that registered without a metrics line yet."""
    peers = data.experiment_dir / "peers"
    names, _ = node_ids([n[:-5] for n in _listdir(data, peers) if n.endswith(".json")])
    for node in dict.fromkeys([*sorted(data.metrics), *names]):
        record = peer_record(peers / f"{node}.json", node)
        if record is not None and record.role == "worker":
            data.hosts[node] = record.host
            if node not in data.metrics:
                data.registered.append(node)


def load_experiment(source: str | Path, overrides: Sequence[str] = ()) -> ExperimentData:
    """Read everything the report needs from one experiment (config path or directory)."""
    data = resolve_source(source, overrides)
    for node_dir in _node_dirs(data):
        _load_node(data, node_dir)
    _peers(data)
    return data
