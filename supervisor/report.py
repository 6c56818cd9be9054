"""``swarm report``: plots and a cumulative-reward table for one or more experiments, as in the SAPO paper.

    python -m supervisor.report configs/toy-4loc0ext.yaml configs/toy-2loc2ext.yaml --out reports/toy
    python -m supervisor.report runs/experiments/toy-2loc2ext            # an experiment directory works too

Inputs: an experiment config (read with :func:`node.config.resolve_config`, so environment overrides and
``--set`` apply; its I/J come from the config) or an experiment directory (I/J from its
``state/config.json``). Each worker's ``logs/<node>/metrics.jsonl`` and ``training_events.jsonl`` are read
tolerantly, so a running experiment works: a partial last line or any unparseable line is skipped, a
node without files is simply absent, and a repeated (node, round) line keeps its first occurrence (the
one the worker wrote when it trained that round).

Definitions (the numbers in ``report.md`` / ``report.json``):

* reward of a node in a round: its metrics line's ``reward_local``, the mean reward of the I×G
  completions it generated that round (external groups are not counted; their rewards are ours too,
  but they belong to the peers' questions);
* per-round mean: the mean of that over the workers that recorded the round;
* **cumulative reward**: the sum over rounds of the per-round mean. The SAPO paper reports cumulative
  reward "over all nodes and rounds"; with every worker recording every round that is the column
  ``cumulative (all nodes)`` = workers × cumulative reward, which we also give. The per-round mean makes
  configurations with different worker counts, or a worker that missed rounds, comparable;
* **change vs J=0**: ``100 × (C − C_base) / C_base`` where C and C_base are cumulative rewards over the
  rounds *both* experiments recorded (so a running experiment is compared fairly), and the baseline is
  the first given experiment with ``num_transplant_trees == 0``; no such experiment → no change column;
* moving average: trailing, over ``window`` rounds (fewer at the start), ``window`` = 100 as in the
  paper, or ``ceil(rounds / 10)`` when an experiment has fewer than 1000 rounds (10 for 100 rounds) so
  the curve is not flat; the band is the min/max over workers of each worker's own moving average;
* restarts: ``resumed`` events, and every ``started`` event of a node after its first.

Plots (PNG, matplotlib's Agg backend, no display needed): ``reward_moving_average.png`` and
``cumulative_reward.png`` comparing the experiments, and per experiment in ``<name>/``:
``reward_per_node.png`` (restarts marked), ``groups.png`` (local vs external groups used per round),
``round_time.png`` (stacked phase timings), ``gpu_memory.png`` (when the metrics carry
``gpu_peak_bytes``; restarts marked). This module never imports torch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

REPORT_SCHEMA_VERSION = 1
MAX_JSONL_BYTES = 512 * 1024 * 1024
PAPER_WINDOW = 100
TIMING_KEYS = ("sample_s", "generate_s", "score_s", "publish_s", "wait_s", "fetch_s", "select_s", "train_s")


class ReportError(ValueError):
    """A user mistake (no such config or directory, nothing to report); the CLI prints it and exits 2."""


# --------------------------------------------------------------------------------------------------
# Reading an experiment
# --------------------------------------------------------------------------------------------------


def read_jsonl(path: Path, max_bytes: int = MAX_JSONL_BYTES) -> tuple[list[dict], int]:
    """The JSON-object lines of ``path`` and how many lines were skipped (partial, not JSON, not an object).

    A missing file gives ``([], 0)``. Only the first ``max_bytes`` are read.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return [], 0
    rows, bad = [], 0
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:  # includes a partial last line of a file being appended to
            bad += 1
            continue
        if isinstance(obj, dict):
            rows.append(obj)
        else:
            bad += 1
    return rows, bad


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


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
    events: dict[str, list[dict]] = field(default_factory=dict)  # node -> events in file order
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
                value = _number(line.get("reward_local"))
                if value is not None:
                    out.setdefault(r, {})[node] = value
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
                ts = _number(ev.get("timestamp"))
                after = [r for r, line in self.metrics.get(node, {}).items()
                         if ts is not None and (_number(line.get("timestamp")) or -1.0) >= ts]
                rnd = ev.get("round")
                first = min(after) if after else (rnd + 1 if type(rnd) is int else None)
                out.append({"node": node, "event": name, "timestamp": ts, "round": first})
        return out

    def finished(self) -> bool:
        """Every worker with metrics has a ``finished`` event."""
        return bool(self.metrics) and all(
            any(ev.get("event") == "finished" for ev in self.events.get(node, ())) for node in self.metrics)


def _snapshot_sapo(experiment_dir: Path) -> tuple[dict, dict]:
    """(sapo section, experiment section) of ``state/config.json``; empty dicts when unreadable."""
    try:
        obj = json.loads((experiment_dir / "state" / "config.json").read_text(encoding="utf-8"))
        config = obj["config"]
        return dict(config.get("sapo") or {}), dict(config.get("experiment") or {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}, {}


def _int_or_none(value: Any) -> int | None:
    return value if type(value) is int else None


def resolve_source(source: str | Path, overrides: Sequence[str] = ()) -> ExperimentData:
    """An empty :class:`ExperimentData` for a config file or an experiment directory (ReportError if neither)."""
    path = Path(source).expanduser()
    if path.is_dir():
        sapo, exp = _snapshot_sapo(path)
        if not sapo and not (path / "logs").is_dir():
            raise ReportError(f"{path}: not an experiment directory (no state/config.json and no logs/)")
        return ExperimentData(
            label=str(exp.get("name") or path.name), source=str(source), experiment_dir=path,
            num_train_samples=_int_or_none(sapo.get("num_train_samples")),
            num_transplant_trees=_int_or_none(sapo.get("num_transplant_trees")),
            num_generations=_int_or_none(sapo.get("num_generations")),
            max_rounds=_int_or_none(exp.get("max_rounds")),
        )
    if not path.is_file():
        raise ReportError(f"{path}: no such config file or experiment directory")
    from node.config import resolve_config  # no torch: node.config is shared with the supervisor
    from sapo.config import ConfigError

    try:
        config = resolve_config(path, overrides=overrides)
    except ConfigError as err:
        raise ReportError(f"{path}: {err}") from None
    data = ExperimentData(
        label=config.experiment.name, source=str(source), experiment_dir=config.experiment_dir,
        num_train_samples=config.sapo.num_train_samples, num_transplant_trees=config.sapo.num_transplant_trees,
        num_generations=config.sapo.num_generations, max_rounds=config.experiment.max_rounds,
    )
    recorded, _ = _snapshot_sapo(config.experiment_dir)
    for key in ("num_train_samples", "num_transplant_trees", "num_generations"):
        if key in recorded and recorded[key] != getattr(config.sapo, key):
            data.notes.append(f"{data.label}: sapo.{key} is {getattr(config.sapo, key)} in {path} but "
                              f"{recorded[key]!r} in the experiment's state/config.json; the table uses the config")
    return data


def load_experiment(source: str | Path, overrides: Sequence[str] = ()) -> ExperimentData:
    """Read everything :func:`build_report` needs from one experiment (config path or directory)."""
    data = resolve_source(source, overrides)
    logs = data.experiment_dir / "logs"
    node_dirs = sorted(p for p in logs.iterdir() if p.is_dir()) if logs.is_dir() else []
    for node_dir in node_dirs:
        node = node_dir.name
        lines, bad = read_jsonl(node_dir / "metrics.jsonl")
        data.skipped_lines += bad
        per_node: dict[int, dict] = {}
        for line in lines:
            rnd = line.get("round")
            if line.get("node_id") != node or type(rnd) is not int or rnd < 0:
                data.skipped_lines += 1
                continue
            if rnd in per_node:
                data.duplicate_lines += 1
                continue
            per_node[rnd] = line
        if per_node:
            data.metrics[node] = per_node
        events, bad = read_jsonl(node_dir / "training_events.jsonl")
        data.skipped_lines += bad
        events = [e for e in events if e.get("node_id") == node and isinstance(e.get("event"), str)]
        if events:
            data.events[node] = events
    return data


# --------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------


def moving_window(rounds: int) -> int:
    """The moving-average window for an experiment of ``rounds`` rounds (see the module docstring)."""
    if rounds >= 10 * PAPER_WINDOW:
        return PAPER_WINDOW
    return max(1, math.ceil(rounds / 10))


def trailing_mean(xs: Sequence[int], ys: Sequence[float], window: int) -> list[float]:
    """At each x, the mean of the ys whose x lies in ``(x - window, x]`` (xs sorted ascending)."""
    out, start, total = [], 0, 0.0
    for i, (x, y) in enumerate(zip(xs, ys)):
        total += y
        while xs[start] <= x - window:
            total -= ys[start]
            start += 1
        out.append(total / (i - start + 1))
    return out


def per_round_mean(rewards: Mapping[int, Mapping[str, float]]) -> dict[int, float]:
    """round -> mean reward over the workers that recorded it."""
    return {r: sum(v.values()) / len(v) for r, v in rewards.items() if v}


@dataclass(frozen=True)
class ExperimentSummary:
    """One row of the table."""

    label: str
    source: str
    experiment_dir: str
    num_train_samples: int | None
    num_transplant_trees: int | None
    num_generations: int | None
    workers: int
    rounds: int
    last_round: int | None
    max_rounds: int | None
    finished: bool
    cumulative_reward: float
    cumulative_reward_all_nodes: float
    mean_reward: float
    final_reward: float | None
    window: int
    change_vs_baseline_pct: float | None
    compared_rounds: int | None
    restarts: int
    skipped_lines: int
    duplicate_lines: int
    plots: tuple[str, ...] = ()


@dataclass(frozen=True)
class Report:
    """What :func:`build_report` wrote and computed."""

    out_dir: Path
    experiments: tuple[ExperimentSummary, ...]
    baseline: str | None
    markdown: Path
    json: Path
    plots: tuple[Path, ...]
    warnings: tuple[str, ...] = ()


def _summarise(data: ExperimentData) -> dict:
    rewards = data.rewards()
    means = per_round_mean(rewards)
    rounds = sorted(means)
    window = moving_window(len(rounds))
    cumulative = sum(means.values())
    last = [means[r] for r in rounds[-window:]]
    return dict(
        label=data.label, source=data.source, experiment_dir=str(data.experiment_dir),
        num_train_samples=data.num_train_samples, num_transplant_trees=data.num_transplant_trees,
        num_generations=data.num_generations, workers=len(data.metrics), rounds=len(rounds),
        last_round=rounds[-1] if rounds else None, max_rounds=data.max_rounds, finished=data.finished(),
        cumulative_reward=cumulative, cumulative_reward_all_nodes=sum(sum(v.values()) for v in rewards.values()),
        mean_reward=cumulative / len(rounds) if rounds else 0.0,
        final_reward=sum(last) / len(last) if last else None, window=window,
        change_vs_baseline_pct=None, compared_rounds=None, restarts=len(data.restarts()),
        skipped_lines=data.skipped_lines, duplicate_lines=data.duplicate_lines,
    )


def change_vs_baseline(data: ExperimentData, base: ExperimentData) -> tuple[float | None, int]:
    """(% change of cumulative reward vs ``base`` over the rounds both recorded, number of such rounds)."""
    mine, theirs = per_round_mean(data.rewards()), per_round_mean(base.rewards())
    common = sorted(set(mine) & set(theirs))
    c, c_base = sum(mine[r] for r in common), sum(theirs[r] for r in common)
    if not common or c_base == 0:
        return None, len(common)
    return 100.0 * (c - c_base) / abs(c_base), len(common)


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _figure(width: float = 8.0, height: float = 4.5):
    from matplotlib.figure import Figure  # the OO API: no pyplot state, no display, Agg for PNG

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _round_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _mark_restarts_by_round(ax, restarts: list[dict], colors: Mapping[str, Any]) -> None:
    labelled = False
    for rs in restarts:
        if rs["round"] is None:
            continue
        ax.axvline(rs["round"], color=colors.get(rs["node"], "k"), linestyle="--", linewidth=1,
                   label=None if labelled else "restart")
        labelled = True


def plot_reward_per_node(data: ExperimentData, path: Path) -> Path:
    fig, ax = _figure()
    rewards = data.rewards()
    colors = {}
    for node in data.nodes:
        xs = [r for r in rewards if node in rewards[r]]
        (line,) = ax.plot(xs, [rewards[r][node] for r in xs], linewidth=0.8, alpha=0.7, label=node)
        colors[node] = line.get_color()
    means = per_round_mean(rewards)
    ax.plot(list(means), list(means.values()), color="black", linewidth=1.5, label="mean over workers")
    _mark_restarts_by_round(ax, data.restarts(), colors)
    ax.set(ylabel="reward (local completions)", title=f"{data.label}: reward per node")
    _round_axis(ax)
    fig.legend(fontsize="small", loc="outside right upper")
    return _save(fig, path)


def plot_groups(data: ExperimentData, path: Path) -> Path:
    fig, ax = _figure(8.0, 3.5)
    local: dict[int, list[float]] = {}
    external: dict[int, list[float]] = {}
    for per_node in data.metrics.values():
        for r, line in per_node.items():
            loc, ext = _number(line.get("num_local_groups")), _number(line.get("num_external_groups"))
            if loc is not None:
                local.setdefault(r, []).append(loc)
            if ext is not None:
                external.setdefault(r, []).append(ext)
    rounds = sorted(set(local) | set(external))
    loc_mean = [sum(local.get(r, [0.0])) / max(1, len(local.get(r, []))) for r in rounds]
    ext_mean = [sum(external.get(r, [0.0])) / max(1, len(external.get(r, []))) for r in rounds]
    if rounds:
        ax.stackplot(rounds, loc_mean, ext_mean, labels=["local groups", "external groups"], alpha=0.8)
    if data.num_train_samples is not None and data.num_transplant_trees is not None:
        ax.axhline(data.num_train_samples + data.num_transplant_trees, color="k", linestyle=":", linewidth=1,
                   label=f"I + J = {data.num_train_samples + data.num_transplant_trees}")
    ax.set(ylabel="groups trained on (mean over workers)", title=f"{data.label}: local vs external groups used")
    _round_axis(ax)
    fig.legend(fontsize="small", loc="outside right upper")
    return _save(fig, path)


def plot_round_time(data: ExperimentData, path: Path) -> Path:
    fig, ax = _figure(8.0, 4.0)
    sums: dict[int, dict[str, float]] = {}
    counts: dict[int, int] = {}
    for per_node in data.metrics.values():
        for r, line in per_node.items():
            t = line.get("timings")
            if not isinstance(t, dict):
                continue
            parts = {k: max(0.0, _number(t.get(k)) or 0.0) for k in TIMING_KEYS}
            total = _number(t.get("round_s"))
            parts["other_s"] = max(0.0, (total if total is not None else sum(parts.values())) - sum(parts.values()))
            acc = sums.setdefault(r, dict.fromkeys(parts, 0.0))
            for k, v in parts.items():
                acc[k] += v
            counts[r] = counts.get(r, 0) + 1
    rounds = sorted(sums)
    keys = (*TIMING_KEYS, "other_s")
    if rounds:
        series = [[sums[r][k] / counts[r] for r in rounds] for k in keys]
        ax.stackplot(rounds, *series, labels=[k[:-2] for k in keys])
    ax.set(ylabel="seconds (mean over workers)", title=f"{data.label}: round time by phase")
    _round_axis(ax)
    fig.legend(fontsize="small", loc="outside right upper")
    return _save(fig, path)


def plot_gpu_memory(data: ExperimentData, path: Path) -> Path | None:
    points = {node: sorted((line["timestamp"], line["gpu_peak_bytes"]) for line in per_node.values()
                           if _number(line.get("timestamp")) is not None and _number(line.get("gpu_peak_bytes")) is not None)
              for node, per_node in data.metrics.items()}
    points = {n: p for n, p in points.items() if p}
    if not points:
        return None
    t0 = min(p[0][0] for p in points.values())
    fig, ax = _figure(8.0, 4.0)
    colors = {}
    for node, pts in sorted(points.items()):
        (line,) = ax.plot([(t - t0) / 60 for t, _ in pts], [b / 2**30 for _, b in pts], linewidth=1, label=node)
        colors[node] = line.get_color()
    labelled = False
    for rs in data.restarts():
        if rs["timestamp"] is not None:
            ax.axvline((rs["timestamp"] - t0) / 60, color=colors.get(rs["node"], "k"), linestyle="--", linewidth=1,
                       label=None if labelled else "restart")
            labelled = True
    ax.set(xlabel="minutes since the first recorded round", ylabel="peak GPU memory per round (GiB, torch)",
           title=f"{data.label}: GPU memory")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_moving_average(experiments: Sequence[ExperimentData], path: Path) -> Path:
    fig, ax = _figure()
    windows = set()
    for data in experiments:
        rewards = data.rewards()
        means = per_round_mean(rewards)
        rounds = sorted(means)
        if not rounds:
            continue
        window = moving_window(len(rounds))
        windows.add(window)
        (line,) = ax.plot(rounds, trailing_mean(rounds, [means[r] for r in rounds], window), linewidth=1.5,
                          label=_legend_label(data))
        # Band: min / max over workers of each worker's own moving average, at every round.
        per_node = {}
        for node in data.nodes:
            xs = [r for r in rounds if node in rewards[r]]
            per_node[node] = dict(zip(xs, trailing_mean(xs, [rewards[r][node] for r in xs], window)))
        lo = [min(v[r] for v in per_node.values() if r in v) for r in rounds]
        hi = [max(v[r] for v in per_node.values() if r in v) for r in rounds]
        ax.fill_between(rounds, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    which = ", ".join(str(w) for w in sorted(windows)) or "-"
    ax.set(ylabel="reward", title=f"reward, moving average over {which} rounds (band: min/max across workers)")
    _round_axis(ax)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_cumulative(experiments: Sequence[ExperimentData], path: Path) -> Path:
    fig, ax = _figure(8.0, 4.0)
    for data in experiments:
        means = per_round_mean(data.rewards())
        rounds = sorted(means)
        total, ys = 0.0, []
        for r in rounds:
            total += means[r]
            ys.append(total)
        ax.plot(rounds, ys, linewidth=1.5, label=_legend_label(data))
    ax.set(ylabel="cumulative reward (sum of per-round means)", title="cumulative reward")
    _round_axis(ax)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _legend_label(data: ExperimentData) -> str:
    if data.num_train_samples is None or data.num_transplant_trees is None:
        return data.label
    return f"{data.label} (I={data.num_train_samples}, J={data.num_transplant_trees})"


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def _unique_dirnames(labels: Iterable[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label) or "experiment"
        n = seen.get(safe, 0)
        seen[safe] = n + 1
        out.append(safe if n == 0 else f"{safe}-{n + 1}")
    return out


def build_report(experiments: Sequence[str | Path | ExperimentData], out_dir: Path, *,
                 overrides: Sequence[str] = ()) -> Report:
    """Read each experiment (a config path, an experiment directory, or already loaded data), write the
    plots, ``report.md`` and ``report.json`` under ``out_dir``, and return what was computed.

    Experiments without any metrics line yet are listed in the warnings and left out of the table and
    the plots; ReportError when none has any.
    """
    if not experiments:
        raise ReportError("give at least one experiment (config file or experiment directory)")
    loaded = [e if isinstance(e, ExperimentData) else load_experiment(e, overrides) for e in experiments]
    warnings = []
    usable = []
    for data in loaded:
        warnings += data.notes
        if not data.metrics:
            warnings.append(f"{data.label}: no metrics yet in {data.experiment_dir / 'logs'}; left out")
        else:
            usable.append(data)
        if data.skipped_lines:
            warnings.append(f"{data.label}: skipped {data.skipped_lines} unreadable or foreign line(s)")
        if data.duplicate_lines:
            warnings.append(f"{data.label}: ignored {data.duplicate_lines} repeated (node, round) line(s)")
    if not usable:
        raise ReportError("nothing to report: " + "; ".join(warnings))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    base = next((d for d in usable if d.num_transplant_trees == 0), None)
    summaries, plots = [], []
    for data, dirname in zip(usable, _unique_dirnames(d.label for d in usable)):
        row = _summarise(data)
        if base is not None:
            row["change_vs_baseline_pct"], row["compared_rounds"] = change_vs_baseline(data, base)
        own = [plot_reward_per_node(data, out_dir / dirname / "reward_per_node.png"),
               plot_groups(data, out_dir / dirname / "groups.png"),
               plot_round_time(data, out_dir / dirname / "round_time.png"),
               plot_gpu_memory(data, out_dir / dirname / "gpu_memory.png")]
        own = [p for p in own if p is not None]
        plots += own
        row["plots"] = tuple(p.relative_to(out_dir).as_posix() for p in own)
        summaries.append(ExperimentSummary(**row))
        if data.max_rounds is not None and row["rounds"] < data.max_rounds:
            warnings.append(f"{data.label}: {row['rounds']} of {data.max_rounds} rounds recorded (still running, "
                            "or stopped early)")
    plots = [plot_moving_average(usable, out_dir / "reward_moving_average.png"),
             plot_cumulative(usable, out_dir / "cumulative_reward.png")] + plots
    report = Report(out_dir=out_dir, experiments=tuple(summaries), baseline=base.label if base else None,
                    markdown=out_dir / "report.md", json=out_dir / "report.json", plots=tuple(plots),
                    warnings=tuple(warnings))
    report.json.write_text(json.dumps(_report_json(report), indent=2) + "\n", encoding="utf-8")
    report.markdown.write_text(render_markdown(report), encoding="utf-8")
    return report


DEFINITION = ("cumulative reward = sum over rounds of the mean, over the workers that recorded the round, of "
              "each worker's mean local reward (reward_local); cumulative (all nodes) = sum over rounds and "
              "workers, as the SAPO paper reports it; change vs J=0 compares cumulative rewards over the rounds "
              "both experiments recorded")


def _report_json(report: Report) -> dict:
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "generated_at": time.time(),
        "definition": DEFINITION,
        "baseline": report.baseline,
        "experiments": [asdict(s) | {"plots": list(s.plots)} for s in report.experiments],
        "plots": [p.relative_to(report.out_dir).as_posix() for p in report.plots],
        "warnings": list(report.warnings),
    }


def _fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def render_markdown(report: Report) -> str:
    """``report.md``: the table, the definitions, the plots."""
    with_change = report.baseline is not None
    head = ["experiment", "I", "J", "G", "workers", "rounds", "cumulative reward", "cumulative (all nodes)",
            "mean / round", "final (last W)"] + (["change vs J=0"] if with_change else []) + ["restarts"]
    base_rounds = next((s.rounds for s in report.experiments if s.label == report.baseline), None)
    lines = ["# SAPO report", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in report.experiments:
        status = "" if s.finished else " (running or stopped)"
        cells = [f"{s.label}{status}", str(s.num_train_samples if s.num_train_samples is not None else "?"),
                 str(s.num_transplant_trees if s.num_transplant_trees is not None else "?"),
                 str(s.num_generations if s.num_generations is not None else "?"), str(s.workers), str(s.rounds),
                 _fmt(s.cumulative_reward), _fmt(s.cumulative_reward_all_nodes), _fmt(s.mean_reward, 3),
                 f"{_fmt(s.final_reward, 3)} (W={s.window})"]
        if with_change:
            if s.label == report.baseline:
                cells.append("baseline")
            else:
                # Say so when the comparison did not cover every round of both experiments.
                partial = s.compared_rounds is not None and not (s.compared_rounds == s.rounds == base_rounds)
                note = f" over {s.compared_rounds} rounds" if partial else ""
                change = s.change_vs_baseline_pct
                cells.append(("–" if change is None else f"{change:+.1f} %") + note)
        cells.append(str(s.restarts))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Definitions: " + DEFINITION + ". Final (last W) is the mean of the per-round means over the "
              "last W rounds, W being the moving-average window.", ""]
    if not with_change:
        lines += ["No experiment with J=0 (num_transplant_trees: 0) was given, so there is no change column.", ""]
    if report.warnings:
        lines += ["Warnings:", ""] + [f"- {w}" for w in report.warnings] + [""]
    lines += ["## Plots", ""]
    for p in report.plots:
        rel = p.relative_to(report.out_dir).as_posix()
        lines.append(f"![{rel}]({rel})")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


DESCRIPTION = ("Plots and a table of cumulative reward per configuration (change vs the J=0 one) for SAPO "
               "experiments, given as config files or experiment directories; works on running experiments.")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The report's options (shared by ``swarm report`` and ``python -m supervisor.report``)."""
    p.add_argument("experiments", nargs="+", metavar="CONFIG_OR_EXPDIR",
                   help="experiment config files or experiment directories")
    p.add_argument("--out", type=Path, default=Path("report"), help="output directory (default ./report)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config override applied to every config given")
    return p


def run(args: argparse.Namespace) -> int:
    """Write the report and print its table. 0 on success, 2 on a user mistake."""
    try:
        report = build_report(args.experiments, args.out, overrides=args.set)
    except ReportError as err:
        print(f"report: {err}", file=sys.stderr)
        return 2
    table = render_markdown(report).split("\n## Plots")[0]
    print(table.rstrip())
    print(f"\nwrote {report.markdown}, {report.json} and {len(report.plots)} plot(s) in {report.out_dir}")
    return 0


def main(argv=None) -> int:
    """``python -m supervisor.report``: the same as ``swarm report``."""
    return run(add_arguments(argparse.ArgumentParser(prog="swarm report", description=DESCRIPTION)).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
