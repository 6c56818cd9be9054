"""The figures of ``swarm report`` (PNG, matplotlib's object API with the Agg backend: no pyplot state,
no display needed; matplotlib is imported only when a figure is drawn).

Comparing the experiments, in the output directory: ``reward_moving_average.png`` (band: min/max over
workers of each worker's own moving average) and ``cumulative_reward.png``. Per experiment, in
``<name>/``: ``reward_per_node.png`` (restarts marked), ``groups.png`` (local vs external groups used per
round), ``round_time.png`` (stacked phase timings and the round switch into each round; below, the switch in
ms: detect and start stacked, its p50 and p99), ``gpu_memory.png`` (when the metrics carry
``gpu_peak_bytes``; restarts marked), ``eval_accuracy.png`` (when the workers ran held-out evals: one panel per
task, a line per node over the eval rounds, an open marker where an eval ran out of time), and, comparing
the experiments that have evals, ``eval_accuracy_mean.png`` in the output directory (mean over tasks and nodes
per eval round). Definitions of the numbers: :mod:`supervisor.report_table`. This
module never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from supervisor.report_data import ExperimentData
from supervisor.report_table import moving_window, per_round_mean, trailing_mean
from supervisor.switches import percentile
from supervisor.terminal import finite_number

TIMING_KEYS = ("sample_s", "generate_s", "score_s", "publish_s", "wait_s", "fetch_s", "select_s", "train_s")
SWITCH_COLORS = ("tab:cyan", "midnightblue")  # detect, start: apart from the phases' (tab10's first nine)


def _figure(width: float = 8.0, height: float = 4.5):
    from matplotlib.figure import Figure  # the OO API: no pyplot state, no display, Agg for PNG

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _finish_by_round(fig, ax, path: Path, *, outside: bool, **labels) -> Path:
    """Rounds (integers) on the x axis, ``ax.set(**labels)``, the legend (beside the axes when ``outside``),
    and save to ``path``."""
    from matplotlib.ticker import MaxNLocator

    ax.set(xlabel="round", **labels)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not any(a.get_legend_handles_labels()[0] for a in (fig.axes if outside else [ax])):
        pass  # nothing labelled was drawn (no line carried these figures): no legend, no matplotlib warning
    elif outside:
        fig.legend(fontsize="small", loc="outside right upper")
    else:
        ax.legend(fontsize="small")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _mark_restarts(ax, restarts: list[dict], colors: Mapping[str, Any],
                   x_of: Callable[[dict], float | None]) -> None:
    """A dashed line per restart, in its node's colour, at ``x_of(restart)`` (None: not drawn)."""
    labelled = False
    for rs in restarts:
        x = x_of(rs)
        if x is None:
            continue
        ax.axvline(x, color=colors.get(rs["node"], "k"), linestyle="--", linewidth=1,
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
    _mark_restarts(ax, data.restarts(), colors, lambda rs: rs["round"])
    return _finish_by_round(fig, ax, path, outside=True, ylabel="reward (local completions)",
                            title=f"{data.label}: reward per node")


def plot_groups(data: ExperimentData, path: Path) -> Path:
    fig, ax = _figure(8.0, 3.5)
    local: dict[int, list[float]] = {}
    external: dict[int, list[float]] = {}
    for per_node in data.metrics.values():
        for r, line in per_node.items():
            loc, ext = finite_number(line.get("num_local_groups")), finite_number(line.get("num_external_groups"))
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
    return _finish_by_round(fig, ax, path, outside=True, ylabel="groups trained on (mean over workers)",
                            title=f"{data.label}: local vs external groups used")


def _phase_means(data: ExperimentData) -> dict[int, dict[str, float]]:
    """round -> phase (``TIMING_KEYS`` and ``other_s``) -> seconds, mean over the workers with timings."""
    sums: dict[int, dict[str, float]] = {}
    counts: dict[int, int] = {}
    for per_node in data.metrics.values():
        for r, line in per_node.items():
            t = line.get("timings")
            if not isinstance(t, dict):
                continue
            parts = {k: max(0.0, finite_number(t.get(k)) or 0.0) for k in TIMING_KEYS}
            total = finite_number(t.get("round_s"))
            parts["other_s"] = max(0.0, (total if total is not None else sum(parts.values())) - sum(parts.values()))
            acc = sums.setdefault(r, dict.fromkeys(parts, 0.0))
            for k, v in parts.items():
                acc[k] += v
            counts[r] = counts.get(r, 0) + 1
    return {r: {k: v / counts[r] for k, v in sums[r].items()} for r in sorted(sums)}


def _switch_series(data: ExperimentData, rounds: Sequence[int]) -> tuple[list[float], list[float]]:
    """(detect, start) of the switch into each of ``rounds`` in ms, 0 where unknown (an advance on a timer
    has no detect; a round without a switch line none at all)."""
    lines = [data.switches.get(r, {}) for r in rounds]
    return [x.get("detect_ms") or 0.0 for x in lines], [x.get("start_ms") or 0.0 for x in lines]


def plot_round_time(data: ExperimentData, path: Path) -> Path:
    """Above: the mean phase timings of each round stacked, the switch into it on top (seconds). Below: the
    switch in ms, detect and start stacked, with its p50 and p99; a note when the experiment has none."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 5.5), dpi=100, layout="constrained")
    ax, low = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    phases = _phase_means(data)
    rounds = sorted(phases)
    keys = (*TIMING_KEYS, "other_s")
    if rounds:
        series = [[phases[r][k] for r in rounds] for k in keys]
        colors = [f"C{i}" for i in range(len(keys))]
        if data.switches:  # labelled below
            series += [[ms / 1000 for ms in part] for part in _switch_series(data, rounds)]
            colors += SWITCH_COLORS
        ax.stackplot(rounds, *series, colors=colors, labels=[k[:-2] for k in keys])
    ax.set(ylabel="seconds (mean over workers)", title=f"{data.label}: round time by phase")
    _plot_switch(data, low)
    return _finish_by_round(fig, low, path, outside=True, ylabel="round switch (ms)")


def _plot_switch(data: ExperimentData, ax) -> None:
    """The switch into each round in ms (detect and start stacked) and its p50/p99 over the experiment."""
    rounds = sorted(data.switches)
    if not rounds:
        ax.text(0.5, 0.5, "round switch not recorded (no logs/coordinator/round_switches.jsonl)",
                transform=ax.transAxes, ha="center", va="center", fontsize="small")
        return
    detect, start = _switch_series(data, rounds)
    ax.stackplot(rounds, detect, start, colors=SWITCH_COLORS, labels=["switch: detect", "switch: start"])
    totals = [data.switches[r]["switch_ms"] for r in rounds if data.switches[r]["switch_ms"] is not None]
    for q, style in ((50, "--"), (99, ":")):
        value = percentile(totals, q)
        if value is not None:
            ax.axhline(value, color="k", linestyle=style, linewidth=1, label=f"switch p{q} {value:.1f} ms")


def plot_gpu_memory(data: ExperimentData, path: Path) -> Path | None:
    points = {}
    for node, per_node in sorted(data.metrics.items()):
        pairs = ((finite_number(line.get("timestamp")), finite_number(line.get("gpu_peak_bytes")))
                 for line in per_node.values())
        pts = sorted((t, b) for t, b in pairs if t is not None and b is not None)
        if pts:
            points[node] = pts
    if not points:
        return None
    t0 = min(p[0][0] for p in points.values())
    fig, ax = _figure(8.0, 4.0)
    colors = {}
    for node, pts in points.items():
        (line,) = ax.plot([(t - t0) / 60 for t, _ in pts], [b / 2**30 for _, b in pts], linewidth=1, label=node)
        colors[node] = line.get_color()
    _mark_restarts(ax, data.restarts(), colors,
                   lambda rs: None if rs["timestamp"] is None else (rs["timestamp"] - t0) / 60)
    ax.set(xlabel="minutes since the first recorded round", ylabel="peak GPU memory per round (GiB, torch)",
           title=f"{data.label}: GPU memory")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_eval_per_task(data: ExperimentData, path: Path) -> Path | None:
    """Held-out accuracy per task (one panel each) and node over the eval rounds; None without evals."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    accuracy = data.eval_accuracy()
    if not accuracy:
        return None
    columns = min(3, len(accuracy))
    rows = -(-len(accuracy) // columns)
    fig = Figure(figsize=(3.2 * columns + 1.6, 2.6 * rows + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).flatten()
    colors = {node: f"C{i % 10}" for i, node in enumerate(sorted(data.evals))}
    for ax, (task, per_node) in zip(axes, accuracy.items()):
        for node, points in per_node.items():
            rounds = sorted(points)
            ax.plot(rounds, [points[r] for r in rounds], color=colors[node], linewidth=1, label=node)
            complete = [data.evals[node][r]["tasks"][task]["complete"] for r in rounds]
            ax.scatter(rounds, [points[r] for r in rounds], s=14, color=colors[node], zorder=3,
                       facecolors=[colors[node] if c else "none" for c in complete])
        ax.set_title(task, fontsize="small")
        ax.set_ylim(-0.05, 1.05)
    for ax in axes[len(accuracy):]:
        ax.set_axis_off()
    for ax in axes[-columns:]:
        ax.set_xlabel("round")
    for ax in axes[::columns]:
        ax.set_ylabel("pass@1 (greedy)")
    from matplotlib.ticker import MaxNLocator

    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{data.label}: held-out accuracy per task and node", fontsize="medium")
    handles, labels = axes[0].get_legend_handles_labels()
    if any(not line["complete"] for per_node in data.evals.values() for line in per_node.values()):
        handles.append(Line2D([], [], marker="o", color="grey", markerfacecolor="none", linestyle=""))
        labels.append("eval cut by its time budget")
    fig.legend(handles, labels, fontsize="small", loc="outside lower center", ncols=min(4, len(labels)))
    return _save(fig, path)


def plot_eval_comparison(experiments: Sequence[ExperimentData], path: Path) -> Path | None:
    """Mean held-out accuracy (over tasks, then nodes) per eval round, one line per experiment; None when no
    experiment has evals."""
    with_evals = [d for d in experiments if d.evals]
    if not with_evals:
        return None
    fig, ax = _figure(8.0, 4.0)
    for data in with_evals:
        per_round: dict[int, list[float]] = {}
        for per_node in data.evals.values():
            for r, line in per_node.items():
                values = [t["accuracy"] for t in line["tasks"].values() if t["accuracy"] is not None]
                if values:
                    per_round.setdefault(r, []).append(sum(values) / len(values))
        rounds = sorted(per_round)
        ax.plot(rounds, [sum(per_round[r]) / len(per_round[r]) for r in rounds], marker="o", markersize=3,
                linewidth=1.5, label=_legend_label(data))
    ax.set_ylim(-0.05, 1.05)
    return _finish_by_round(fig, ax, path, outside=False, ylabel="held-out pass@1 (mean over tasks and nodes)",
                            title="held-out accuracy (greedy)")


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
        ax.fill_between(rounds, *_worker_band(rewards, rounds, window), color=line.get_color(), alpha=0.2,
                        linewidth=0)
    which = ", ".join(str(w) for w in sorted(windows)) or "-"
    return _finish_by_round(fig, ax, path, outside=False, ylabel="reward",
                            title=f"reward, moving average over {which} rounds (band: min/max across workers)")


def _worker_band(rewards: Mapping[int, Mapping[str, float]], rounds: Sequence[int],
                 window: int) -> tuple[list[float], list[float]]:
    """(min, max) over workers of each worker's own moving average, at every round."""
    per_node = {}
    for node in {n for per_round in rewards.values() for n in per_round}:
        xs = [r for r in rounds if node in rewards[r]]
        per_node[node] = dict(zip(xs, trailing_mean(xs, [rewards[r][node] for r in xs], window)))
    lo = [min(v[r] for v in per_node.values() if r in v) for r in rounds]
    hi = [max(v[r] for v in per_node.values() if r in v) for r in rounds]
    return lo, hi


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
    return _finish_by_round(fig, ax, path, outside=False, ylabel="cumulative reward (sum of per-round means)",
                            title="cumulative reward")


def _legend_label(data: ExperimentData) -> str:
    if data.num_train_samples is None or data.num_transplant_trees is None:
        return data.label
    return f"{data.label} (I={data.num_train_samples}, J={data.num_transplant_trees})"


def experiment_plots(data: ExperimentData, directory: Path) -> list[Path]:
    """The per-experiment figures, written under ``directory``."""
    drawn = [plot_reward_per_node(data, directory / "reward_per_node.png"),
             plot_groups(data, directory / "groups.png"),
             plot_round_time(data, directory / "round_time.png"),
             plot_gpu_memory(data, directory / "gpu_memory.png"),
             plot_eval_per_task(data, directory / "eval_accuracy.png")]
    return [p for p in drawn if p is not None]


def comparison_plots(experiments: Sequence[ExperimentData], out_dir: Path) -> list[Path]:
    """The figures comparing the experiments, written under ``out_dir``."""
    drawn = [plot_moving_average(experiments, out_dir / "reward_moving_average.png"),
             plot_cumulative(experiments, out_dir / "cumulative_reward.png"),
             plot_eval_comparison(experiments, out_dir / "eval_accuracy_mean.png")]
    return [p for p in drawn if p is not None]
