"""``swarm report``: plots and a cumulative-reward table for one or more experiments, as in the SAPO paper.

    python -m supervisor.report configs/toy-4loc0ext.yaml configs/toy-2loc2ext.yaml --out reports/toy
    python -m supervisor.report runs/experiments/toy-2loc2ext            # an experiment directory works too

:func:`build_report` reads each experiment (:mod:`supervisor.report_data`), draws the figures
(:mod:`supervisor.report_plots`) and writes the table (:mod:`supervisor.report_table`, which defines
the numbers) as ``report.md`` and ``report.json``; :func:`run` is the command. Works on running
experiments. What it prints is escaped (:func:`supervisor.terminal.escape_controls`): labels, paths and
the "skipped" warnings come from an untrusted directory. This module never imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Sequence

from supervisor.report_data import ExperimentData, ReportError, load_experiment
from supervisor.report_plots import comparison_plots, experiment_plots
from supervisor.report_table import ExperimentSummary, Report, render_markdown, report_json, summarise
from supervisor.terminal import escape_controls

DESCRIPTION = ("Plots and a table of cumulative reward per configuration (change vs the J=0 one; final held-out "
               "eval accuracy when the workers ran evals) for SAPO experiments, given as config files or experiment "
               "directories; works on running experiments.")


def _unique_dirnames(labels: Iterable[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label) or "experiment"
        n = seen.get(safe, 0)
        seen[safe] = n + 1
        out.append(safe if n == 0 else f"{safe}-{n + 1}")
    return out


def _usable(loaded: Sequence[ExperimentData], warnings: list[str]) -> list[ExperimentData]:
    """The experiments with metrics; what was skipped or left out goes to ``warnings``."""
    usable = []
    for data in loaded:
        warnings += data.notes
        if not data.metrics:
            warnings.append(f"{data.label}: no metrics yet in {data.experiment_dir / 'logs'}; left out")
        else:
            usable.append(data)
        if data.duplicate_lines:
            warnings.append(f"{data.label}: ignored {data.duplicate_lines} repeated (node, round) line(s)")
    return usable


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
    warnings: list[str] = []
    usable = _usable(loaded, warnings)
    if not usable:
        raise ReportError("nothing to report: " + "; ".join(warnings))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    base = next((d for d in usable if d.num_transplant_trees == 0), None)
    summaries, plots = [], []
    for data, dirname in zip(usable, _unique_dirnames(d.label for d in usable)):
        own = experiment_plots(data, out_dir / dirname)
        plots += own
        row = ExperimentSummary(**summarise(data, base), plots=tuple(p.relative_to(out_dir).as_posix() for p in own))
        summaries.append(row)
        if data.max_rounds is not None and row.rounds < data.max_rounds:
            warnings.append(f"{data.label}: {row.rounds} of {data.max_rounds} rounds recorded (still running, "
                            "or stopped early)")
    report = Report(out_dir=out_dir, experiments=tuple(summaries), baseline=base.label if base else None,
                    markdown=out_dir / "report.md", json=out_dir / "report.json",
                    plots=tuple(comparison_plots(usable, out_dir) + plots), warnings=tuple(warnings))
    report.json.write_text(json.dumps(report_json(report), indent=2) + "\n", encoding="utf-8")
    report.markdown.write_text(render_markdown(report), encoding="utf-8")
    return report


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
        print(escape_controls(f"report: {err}"), file=sys.stderr)
        return 2
    table = render_markdown(report).split("\n## Plots")[0]
    print("\n".join(map(escape_controls, table.rstrip().split("\n"))))
    print()
    print(escape_controls(f"wrote {report.markdown}, {report.json} and {len(report.plots)} plot(s) in {report.out_dir}"))
    return 0


def main(argv=None) -> int:
    """``python -m supervisor.report``: the same as ``swarm report``."""
    return run(add_arguments(argparse.ArgumentParser(prog="swarm report", description=DESCRIPTION)).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
