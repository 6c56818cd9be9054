#!/usr/bin/env python3
"""Run the split-tasks experiment (configs/split-tasks-{j0,j2}.yaml x 3 seeds), then ``swarm report`` over the
six runs and a seed summary: does taking peers' groups (J>0) teach a worker the task it never samples itself?

    python scripts/run_split_experiment.py                        # 2 configs x seeds 42 1 2, then the reports
    python scripts/run_split_experiment.py --dry-run              # print the commands, run nothing
    python scripts/run_split_experiment.py --seeds 7 --set experiment.max_rounds=20 --root /tmp/split --fresh
    python scripts/run_split_experiment.py --report-only          # the reports of runs already done

Each (config, seed) is one experiment named ``<config name>-seed<S>`` under ``--root`` (``--set
experiment.seed=S experiment.name=... experiment.root=...``), run one after the other exactly as
scripts/run_toy_sweep.py runs one (``swarm launch CONFIG`` when available, else the nodes by hand). Then:

* ``swarm report`` over the experiment directories (``--report-dir``: report.md, report.json, the plots);
* ``--report-dir``/seeds.md: per config, mean ± sd over seeds of each worker's final held-out eval (accuracy
  and score per task, on the worker's own task and on the task it never samples locally) and of the cumulative
  reward, then the per-seed numbers; ``split_eval.png``: held-out score per task and eval round, the workers
  that sample the task locally vs those that never do, mean over seeds with the min/max band.

Held-out *score* is the task's mean reward on the held-out questions (partial credit), *accuracy* the share
scoring 1 (:mod:`sapo.evaluate`); the tiny model never copies a word exactly, so toy_copy's accuracy is 0 and
its score is the figure that moves. Exit code: 0 when every run finished and the reports were written, 1
otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import run_toy_sweep as sweep  # noqa: E402  (the same way of running one experiment)

DEFAULT_CONFIGS = [ROOT / "configs" / f"split-tasks-{j}.yaml" for j in ("j0", "j2")]
DEFAULT_SEEDS = [42, 1, 2]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run_split_experiment.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", type=Path, help="experiment configs (default: split-tasks-j0, split-tasks-j2)")
    p.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS, metavar="S",
                   help="experiment seeds, each run with every config (default 42 1 2)")
    p.add_argument("--root", default="./runs/split-tasks",
                   help="experiment.root of every run; a relative one means the repository's (default ./runs/split-tasks)")
    existing = sweep.add_run_arguments(p, logs_dir="runs/split-tasks/logs", timeout=1800.0,
                                       report_dir="runs/reports/split-tasks")
    existing.add_argument("--report-only", action="store_true", help="run nothing: report the runs already there")
    p.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        p.error(f"--seeds must be distinct non-negative integers; got {args.seeds}")
    if args.report_only and args.no_report:
        p.error("--report-only and --no-report leave nothing to do")
    return args


@dataclass(frozen=True)
class Run:
    """One (config, seed) experiment and the overrides that make it."""

    config: Path
    seed: int
    name: str
    overrides: tuple[str, ...]


def plan(args: argparse.Namespace, names: dict[Path, str]) -> list[Run]:
    """Every (config, seed) run, seeds outermost (a cut experiment still has both configs of its first seeds);
    ``names`` maps each config to its experiment.name."""
    runs = []
    for seed in args.seeds:
        for config in names:
            name = f"{names[config]}-seed{seed}"
            extra = (f"experiment.seed={seed}", f"experiment.name={name}", f"experiment.root={args.root}")
            runs.append(Run(config, seed, name, tuple(args.set) + extra))
    return runs


def _shown(path: Path) -> Path:
    """``path`` relative to the repository when inside it (the commands printed stay short), else as is."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def launch_command(run: Run) -> list[str]:
    """The ``swarm launch`` command of ``run`` (what the script runs when ``swarm`` is available)."""
    cmd = ["swarm", "launch", str(run.config)]
    for item in run.overrides:
        cmd += ["--set", item]
    return cmd


# --- the seed summary -----------------------------------------------------------------------------------
def final_per_worker(data, local_tasks: dict[str, set[str]]) -> dict[str, dict]:
    """worker -> {task: {accuracy, score, local}} from its last eval line (tasks with no question evaluated
    left out)."""
    out = {}
    for node, evals in sorted(data.evals.items()):
        tasks = evals[max(evals)]["tasks"]
        out[node] = {task: {"accuracy": t["accuracy"], "score": t["score"], "local": task in local_tasks.get(node, ())}
                     for task, t in tasks.items() if t["accuracy"] is not None}
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def run_figures(data, local_tasks: dict[str, set[str]]) -> dict[str, float | None]:
    """One run's figures: final eval accuracy/score per task (mean over workers), overall (per worker over
    tasks, then over workers), on the workers' own and never-sampled tasks; the own/unseen score averaged
    over every eval of the run; the cumulative reward."""
    from supervisor.report_table import summarise

    final = final_per_worker(data, local_tasks)
    tasks = sorted({t for per in final.values() for t in per})
    fig: dict[str, float | None] = {}
    for kind in ("accuracy", "score"):
        for task in tasks:
            fig[f"{task} {kind}"] = _mean(per[task][kind] for per in final.values() if task in per)
        fig[f"overall {kind}"] = _mean(_mean(v[kind] for v in per.values()) for per in final.values())
        for where, local in (("own task", True), ("unseen task", False)):
            fig[f"{where} {kind}"] = _mean(_mean(v[kind] for v in per.values() if v["local"] == local)
                                           for per in final.values())
    # A skill can come and go between evals: each worker's score averaged over all its evals, too.
    for where, local in (("own task", True), ("unseen task", False)):
        fig[f"{where} score, mean over evals"] = _mean(
            _mean(_mean(t["score"] for task, t in line["tasks"].items() if (task in local_tasks.get(node, ())) == local)
                  for line in evals.values())
            for node, evals in data.evals.items())
    fig["cumulative reward"] = summarise(data, None)["cumulative_reward"]
    return fig


def _cell(values: list[float | None], digits: int = 3) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "–"
    sd = statistics.stdev(known) if len(known) > 1 else 0.0
    return f"{statistics.mean(known):.{digits}f} ± {sd:.{digits}f}" + ("" if len(known) == len(values) else " (some –)")


def seeds_markdown(figures: dict[str, dict[int, dict]]) -> str:
    """config -> seed -> run_figures: the mean ± sd table per config, then the per-seed numbers."""
    columns = list(dict.fromkeys(c for per_seed in figures.values() for f in per_seed.values() for c in f))
    seeds = sorted({s for per_seed in figures.values() for s in per_seed})
    lines = ["# Split tasks: final held-out eval and cumulative reward over seeds", "",
             f"Mean ± sd over seeds {', '.join(map(str, seeds))} (sd of the per-seed values). Each figure is per run: "
             "held-out figures are from each worker's last eval, averaged over workers; own / unseen task: each "
             "worker's figure on the task(s) it samples locally / never samples, then averaged over workers.", "",
             "| config | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for config, per_seed in figures.items():
        cells = [_cell([per_seed[s].get(c) for s in sorted(per_seed)], 2 if c == "cumulative reward" else 3)
                 for c in columns]
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed:", "", "| config | seed | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for config, per_seed in figures.items():
        for seed in sorted(per_seed):
            cells = ["–" if per_seed[seed].get(c) is None else f"{per_seed[seed][c]:.3f}" for c in columns]
            lines.append(f"| {config} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_split_eval(series: dict[str, list[tuple[object, dict[str, set[str]]]]], path: Path) -> Path | None:
    """Held-out score per task (a panel each) over the eval rounds: per config, the workers that sample the
    task locally (solid) and those that never do (dashed), mean over seeds, band min/max over seeds."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    curves: dict[tuple[str, str, bool], dict[int, list[float]]] = {}  # (task, config, local) -> round -> per seed
    for config, runs in series.items():
        for data, local_tasks in runs:
            per_run: dict[tuple[str, bool], dict[int, list[float]]] = {}
            for node, evals in data.evals.items():
                for round_, line in evals.items():
                    for task, t in line["tasks"].items():
                        if t["score"] is not None:
                            key = (task, task in local_tasks.get(node, ()))
                            per_run.setdefault(key, {}).setdefault(round_, []).append(t["score"])
            for (task, local), by_round in per_run.items():  # mean over this run's workers, one value per seed
                for round_, scores in by_round.items():
                    curves.setdefault((task, config, local), {}).setdefault(round_, []).append(_mean(scores))
    if not curves:
        return None
    tasks = sorted({k[0] for k in curves})
    fig = Figure(figsize=(4.2 * len(tasks), 3.4), dpi=80, layout="constrained")
    axes = fig.subplots(1, len(tasks), sharey=True, squeeze=False)[0]
    colors = {config: f"C{i}" for i, config in enumerate(series)}
    for ax, task in zip(axes, tasks):
        for (t, config, local), by_round in sorted(curves.items()):
            if t != task:
                continue
            rounds = sorted(by_round)
            ax.plot(rounds, [statistics.mean(by_round[r]) for r in rounds], color=colors[config],
                    linestyle="-" if local else "--", label=f"{config}, {'own' if local else 'never sampled'}")
            ax.fill_between(rounds, [min(by_round[r]) for r in rounds], [max(by_round[r]) for r in rounds],
                            color=colors[config], alpha=0.12, linewidth=0)
        ax.set(title=task, xlabel="round", ylim=(-0.02, 1.02))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("held-out score (greedy)")
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize="small", loc="outside lower center", ncols=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def write_reports(args: argparse.Namespace, runs: list[Run], resolved: dict[Run, object]) -> int:
    """``swarm report`` over the runs' directories, then seeds.md and split_eval.png; 0 when written."""
    from supervisor.report import main as report_main
    from supervisor.report_data import ReportError, load_experiment

    dirs = [str(resolved[r].experiment_dir) for r in runs]
    print("$ " + shlex.join(["swarm", "report", *dirs, "--out", str(args.report_dir)]), flush=True)
    code = report_main([*dirs, "--out", str(args.report_dir)])
    figures: dict[str, dict[int, dict]] = {}
    series: dict[str, list] = {}
    for run in runs:
        config = resolved[run]
        try:
            data = load_experiment(config.experiment_dir)
        except ReportError as err:
            print(f"  {run.name}: {err}", file=sys.stderr)
            code = code or 1
            continue
        if not data.metrics:
            continue
        local = {w: {t.name for t in config.for_node(w).sapo.tasks} for w in data.metrics}
        label = run.config.stem
        figures.setdefault(label, {})[run.seed] = run_figures(data, local)
        series.setdefault(label, []).append((data, local))
    if not figures:
        print("no run has metrics: no seed summary", file=sys.stderr)
        return 1
    seeds_md = args.report_dir / "seeds.md"
    seeds_md.write_text(seeds_markdown(figures))
    plot = plot_split_eval(series, args.report_dir / "split_eval.png")
    print(seeds_md.read_text())
    print(f"report: {args.report_dir / 'report.md'} (plots beside it; eval_accuracy.png per run)")
    print(f"seed summary: {seeds_md}" + (f"; held-out score, own vs never-sampled task: {plot}" if plot else ""))
    return code


def main(argv=None) -> int:
    args = parse_args(argv)
    configs = [_shown(c.resolve()) for c in (args.configs or DEFAULT_CONFIGS)]  # before the chdir
    args.report_dir, args.logs_dir = _shown(args.report_dir.resolve()), _shown(args.logs_dir.resolve())
    os.chdir(ROOT)  # relative roots (./runs) mean the repository, as for the nodes
    from node.config import resolve_config
    from sapo.config import ConfigError

    try:
        names = {path: resolve_config(path, overrides=args.set).experiment.name for path in configs}
        runs = plan(args, names)
        resolved = {run: resolve_config(run.config, overrides=list(run.overrides)) for run in runs}
    except ConfigError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        for run in runs:
            print("$ " + shlex.join(launch_command(run)))
        dirs = [str(resolved[r].experiment_dir) for r in runs]
        print("$ " + shlex.join(["swarm", "report", *dirs, "--out", str(args.report_dir)]))
        return 0
    ok = True
    if not args.report_only:
        ok = run_all(args, runs, resolved)
        if ok is None:
            return 1
    if args.no_report:
        return 0 if ok else 1
    return 0 if write_reports(args, runs, resolved) == 0 and ok else 1


def run_all(args: argparse.Namespace, runs: list[Run], resolved: dict) -> bool | None:
    """Run every experiment one after the other; True when all finished, None when stopped by a signal
    (or refused: an existing directory without --fresh/--resume)."""
    for run in runs:
        if resolved[run].experiment_dir.exists() and not (args.fresh or args.resume):
            print(f"{resolved[run].experiment_dir} exists (from an earlier run?): pass --fresh to delete it, "
                  "--resume to continue it or --report-only", file=sys.stderr)
            return None
    use_swarm = not args.by_hand and sweep.swarm_available()
    print(f"running {len(runs)} experiment(s) {'with `swarm launch`' if use_swarm else 'by hand (python -m node)'}",
          flush=True)
    signal.signal(signal.SIGTERM, sweep._raise_stop)
    ok = True
    try:
        for run in runs:
            ok = sweep.run_one(run.config, list(run.overrides), resolved[run], fresh=args.fresh, use_swarm=use_swarm,
                               logs_dir=args.logs_dir, timeout=args.timeout) and ok
    except (KeyboardInterrupt, sweep.Stop) as why:
        print(f"stopped ({why or 'SIGINT'})", file=sys.stderr)
        return None
    return ok


if __name__ == "__main__":
    sys.exit(main())
