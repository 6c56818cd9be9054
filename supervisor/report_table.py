"""The numbers of ``swarm report`` and the table that shows them (``report.md``, ``report.json``).

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
* restarts: ``resumed`` events, and every ``started`` event of a node after its first;
* **round time**: a worker's round is its metrics line's ``timings.round_s`` (the plot splits it by phase);
  ``round p50`` is the median over rounds of the mean over workers. The **round switch** into a round is
  the coordinator's line in ``round_switches.jsonl`` (:mod:`supervisor.switches`): from the last result of
  the previous round written to every worker having started this one, split into detect (until the
  coordinator wrote the next state) and start (from then until the last worker started); p50/p99 over
  every switch logged (linear interpolation). Older experiments did not log it: "not recorded".
* **workers**: every host's workers (``logs/<id>/``; the host from each one's peer record), each with its
  rounds recorded, first and last round (a worker that joined a running experiment starts later), mean
  ``reward_local`` and restarts; workers that registered without a metrics line yet are listed with none;
* **final eval accuracy**: held-out pass@1 with greedy decoding (``eval:``, :mod:`sapo.evaluate`), from each
  worker's last line in ``evals.jsonl`` (the weights it ended with, or has now in a running experiment):
  the mean over the tasks of its accuracy (tasks the line evaluated no question of left out), then the mean
  over workers; per task, the mean over workers. An experiment without evals shows "–".
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

from supervisor.report_data import ExperimentData
from supervisor.switches import percentile, summarise_switches
from supervisor.terminal import finite_number

REPORT_SCHEMA_VERSION = 1
PAPER_WINDOW = 100
DEFINITION = ("cumulative reward = sum over rounds of the mean, over the workers that recorded the round, of "
              "each worker's mean local reward (reward_local); cumulative (all nodes) = sum over rounds and "
              "workers, as the SAPO paper reports it; change vs J=0 compares cumulative rewards over the rounds "
              "both experiments recorded")
EVAL_DEFINITION = ("Final eval accuracy: held-out pass@1 with greedy decoding (eval: in the config), each worker's "
                   "last eval averaged over tasks, then over workers; – when the experiment recorded no eval.")


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
    round_s_p50: float | None = None
    round_switch: dict | None = None  # supervisor.switches.summarise_switches; None: not recorded
    final_eval_accuracy: float | None = None  # None: no eval recorded
    final_eval_by_task: dict | None = None  # task -> mean over workers of their last eval's accuracy
    eval_rounds: int = 0  # distinct rounds any worker evaluated
    per_worker: tuple[dict, ...] = ()  # per_worker(): node, host, rounds, first/last round, mean reward, restarts
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


def summarise(data: ExperimentData, base: ExperimentData | None) -> dict:
    """The fields of ``data``'s :class:`ExperimentSummary` but ``plots``; the change column against ``base``
    (None: no baseline, no change)."""
    rewards = data.rewards()
    means = per_round_mean(rewards)
    rounds = sorted(means)
    window = moving_window(len(rounds))
    cumulative = sum(means.values())
    last = [means[r] for r in rounds[-window:]]
    change, compared = change_vs_baseline(data, base) if base is not None else (None, None)
    return dict(
        label=data.label, source=data.source, experiment_dir=str(data.experiment_dir),
        num_train_samples=data.num_train_samples, num_transplant_trees=data.num_transplant_trees,
        num_generations=data.num_generations, workers=len(data.metrics), rounds=len(rounds),
        last_round=rounds[-1] if rounds else None, max_rounds=data.max_rounds, finished=data.finished(),
        cumulative_reward=cumulative, cumulative_reward_all_nodes=sum(sum(v.values()) for v in rewards.values()),
        mean_reward=cumulative / len(rounds) if rounds else 0.0,
        final_reward=sum(last) / len(last) if last else None, window=window,
        change_vs_baseline_pct=change, compared_rounds=compared, restarts=len(data.restarts()),
        skipped_lines=data.skipped_lines, duplicate_lines=data.duplicate_lines,
        round_s_p50=percentile(list(round_seconds(data).values()), 50),
        round_switch=summarise_switches([data.switches[r] for r in sorted(data.switches)]),
        per_worker=per_worker(data), **final_eval(data),
    )


def per_worker(data: ExperimentData) -> tuple[dict, ...]:
    """One row per worker of every host (see the module docstring), by host then node; registered workers
    without metrics last."""
    restarts: dict[str, int] = {}
    for r in data.restarts():
        restarts[r["node"]] = restarts.get(r["node"], 0) + 1
    rows = []
    for node in [*data.nodes, *data.registered]:
        per_round = data.metrics.get(node, {})
        rewards = [v for v in (finite_number(line.get("reward_local")) for line in per_round.values()) if v is not None]
        rows.append({"node": node, "host": data.hosts.get(node), "rounds": len(per_round),
                     "first_round": min(per_round) if per_round else None,
                     "last_round": max(per_round) if per_round else None,
                     "mean_reward": _mean(rewards), "restarts": restarts.get(node, 0)})
    return tuple(sorted(rows, key=lambda row: (row["rounds"] == 0, row["host"] or "", row["node"])))


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def final_eval(data: ExperimentData) -> dict:
    """``final_eval_accuracy``, ``final_eval_by_task`` and ``eval_rounds`` (see the module docstring)."""
    per_node, by_task = [], {}
    for node, evals in sorted(data.evals.items()):
        last = evals[max(evals)]["tasks"]
        accuracies = {task: t["accuracy"] for task, t in last.items() if t["accuracy"] is not None}
        for task, value in accuracies.items():
            by_task.setdefault(task, []).append(value)
        if accuracies:
            per_node.append(_mean(list(accuracies.values())))
    rounds = {r for evals in data.evals.values() for r in evals}
    return dict(final_eval_accuracy=_mean(per_node),
                final_eval_by_task={task: _mean(v) for task, v in sorted(by_task.items())} or None,
                eval_rounds=len(rounds))


def round_seconds(data: ExperimentData) -> dict[int, float]:
    """round -> mean over the workers that recorded it of their ``timings.round_s``."""
    per_round: dict[int, list[float]] = {}
    for per_node in data.metrics.values():
        for r, line in per_node.items():
            t = line.get("timings")
            value = finite_number(t.get("round_s")) if isinstance(t, dict) else None
            if value is not None:
                per_round.setdefault(r, []).append(value)
    return {r: sum(v) / len(v) for r, v in sorted(per_round.items())}


def change_vs_baseline(data: ExperimentData, base: ExperimentData) -> tuple[float | None, int]:
    """(% change of cumulative reward vs ``base`` over the rounds both recorded, number of such rounds)."""
    mine, theirs = per_round_mean(data.rewards()), per_round_mean(base.rewards())
    common = sorted(set(mine) & set(theirs))
    c, c_base = sum(mine[r] for r in common), sum(theirs[r] for r in common)
    if not common or c_base == 0:
        return None, len(common)
    return 100.0 * (c - c_base) / abs(c_base), len(common)


def report_json(report: Report) -> dict:
    """``report.json``: the table's rows, the plots and the warnings."""
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "generated_at": time.time(),
        "definition": DEFINITION,
        "baseline": report.baseline,
        "experiments": [asdict(s) | {"plots": list(s.plots)} for s in report.experiments],
        "plots": [p.relative_to(report.out_dir).as_posix() for p in report.plots],
        "warnings": list(report.warnings),
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _known(value: int | None) -> str:
    return "?" if value is None else str(value)


def _change_cell(s: ExperimentSummary, report: Report, base_rounds: int | None) -> str:
    if s.label == report.baseline:
        return "baseline"
    # Say so when the comparison did not cover every round of both experiments.
    partial = s.compared_rounds is not None and not (s.compared_rounds == s.rounds == base_rounds)
    note = f" over {s.compared_rounds} rounds" if partial else ""
    change = s.change_vs_baseline_pct
    return ("–" if change is None else f"{change:+.1f} %") + note


def _table(report: Report) -> list[str]:
    """The markdown table, one row per experiment; the change column only when there is a baseline."""
    with_change = report.baseline is not None
    head = ["experiment", "I", "J", "G", "workers", "rounds", "cumulative reward", "cumulative (all nodes)",
            "final eval accuracy", "mean / round", "final (last W)"] + (["change vs J=0"] if with_change else []) + ["restarts"]
    base_rounds = next((s.rounds for s in report.experiments if s.label == report.baseline), None)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in report.experiments:
        status = "" if s.finished else " (running or stopped)"
        cells = [f"{s.label}{status}", _known(s.num_train_samples), _known(s.num_transplant_trees),
                 _known(s.num_generations), str(s.workers), str(s.rounds), _fmt(s.cumulative_reward),
                 _fmt(s.cumulative_reward_all_nodes), _fmt(s.final_eval_accuracy, 3), _fmt(s.mean_reward, 3),
                 f"{_fmt(s.final_reward, 3)} (W={s.window})"]
        if with_change:
            cells.append(_change_cell(s, report, base_rounds))
        cells.append(str(s.restarts))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ms_pair(figure: object) -> str:
    """``p50 / p99`` of one figure of a switch summary, in ms."""
    pair = figure if isinstance(figure, dict) else {}
    return f"{_fmt(pair.get('p50'), 1)} / {_fmt(pair.get('p99'), 1)}"


def _round_time(report: Report) -> list[str]:
    """The round-time section: a worker's round beside the round switch (p50/p99, detect and start)."""
    head = ["experiment", "round p50 (s)", "switch p50 / p99 (ms)", "detect p50 / p99 (ms)",
            "start p50 / p99 (ms)", "switches logged"]
    lines = ["## Round time", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    absent = []
    for s in report.experiments:
        sw = s.round_switch
        if sw is None:
            absent.append(s.label)
            cells = ["not recorded"] * 3 + ["0"]
        else:
            incomplete = f" ({sw['incomplete']} timed out)" if sw["incomplete"] else ""
            cells = [_ms_pair(sw.get(k)) for k in ("switch_ms", "detect_ms", "start_ms")] + [
                f"{sw['rounds']}{incomplete}"]
        lines.append("| " + " | ".join([s.label, _fmt(s.round_s_p50)] + cells) + " |")
    lines += ["", "The round switch into a round: from the last result of the previous round written to every "
              "worker having started this one (detect: until the coordinator wrote the next state; start: from "
              "then until the last worker started), logged per round by the coordinator in "
              "logs/coordinator/round_switches.jsonl; the plot round_time.png shows it per round."]
    if absent:
        lines.append(f"Round switch not recorded for {', '.join(absent)}: no round_switches.jsonl (an experiment "
                     "from before the switch was logged, or no round has switched yet).")
    return lines + [""]


def _eval_section(report: Report) -> list[str]:
    """Final eval accuracy per task and experiment (nothing when no experiment recorded an eval)."""
    tasks = sorted({t for s in report.experiments for t in (s.final_eval_by_task or {})})
    if not tasks:
        return []
    head = ["experiment", "eval rounds", *tasks, "mean"]
    lines = ["## Held-out eval (final, per task)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in report.experiments:
        by_task = s.final_eval_by_task or {}
        cells = [s.label, str(s.eval_rounds), *(_fmt(by_task.get(t), 3) for t in tasks), _fmt(s.final_eval_accuracy, 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "Pass@1 with greedy decoding on each task's held-out questions (eval.questions_per_task, "
                    "seeds training never draws), from each worker's last eval, mean over workers; the plots "
                    "<experiment>/eval_accuracy.png show every eval per task and node.", ""]


def _cell(value: object, limit: int = 64) -> str:
    """An untrusted value as one markdown table cell (``|`` escaped, cut)."""
    return "–" if value is None else str(value)[:limit].replace("|", "\\|")


def _workers_section(report: Report) -> list[str]:
    """Every worker of every host, per experiment (nothing when no experiment has one)."""
    head = ["experiment", "worker", "host", "rounds", "first–last", "mean reward", "restarts"]
    lines = ["## Workers", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in report.experiments:
        for w in s.per_worker:
            span = "–" if w["first_round"] is None else f"{w['first_round']}–{w['last_round']}"
            lines.append("| " + " | ".join([s.label, w["node"], _cell(w["host"]), str(w["rounds"]), span,
                                             _fmt(w["mean_reward"], 3), str(w["restarts"])]) + " |")
    if len(lines) == 4:
        return []
    return lines + ["", "Every host's workers: logs/<id>/ and the host its peer record names (peers/<id>.json); a "
                    "worker that joined a running experiment starts at a later round.", ""]


def render_markdown(report: Report) -> str:
    """``report.md``: the table, the definitions, the round time, the warnings, the plots."""
    lines = ["# SAPO report", "", *_table(report), "", "Definitions: " + DEFINITION + ". Final (last W) is the "
             "mean of the per-round means over the last W rounds, W being the moving-average window. "
             + EVAL_DEFINITION, ""]
    if report.baseline is None:
        lines += ["No experiment with J=0 (num_transplant_trees: 0) was given, so there is no change column.", ""]
    lines += _eval_section(report)
    lines += _workers_section(report)
    lines += _round_time(report)
    if report.warnings:
        lines += ["Warnings:", ""] + [f"- {w}" for w in report.warnings] + [""]
    lines += ["## Plots", ""]
    for p in report.plots:
        rel = p.relative_to(report.out_dir).as_posix()
        lines.append(f"![{rel}]({rel})")
    return "\n".join(lines) + "\n"
