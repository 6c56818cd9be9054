"""``swarm validate``: did every round of every worker land? One function per check, then a PASS/FAIL table.

Checks (the seeds' validate_test_run): the final state reached max_rounds and finished; the config
snapshot, every peer file and every rollout/reward file parse (the node's own schemas); per worker, the
training events parse, the metrics have exactly one line per round (bar rounds it logged as skipped), and
every trained round has the worker's rollout file, unless retention removed that round without an
archive to check it against. The workers are every host's (:func:`discover_workers`): the config's
``worker_1..N`` and every plain node id with a worker's peer record or a ``logs/<id>/metrics.jsonl``
(another host's ``<host>-worker_1``), at most :data:`MAX_DISCOVERED` more (junk names cannot make a run of
validate unbounded; beyond that a failed ``workers`` check counts them). A worker that is not the config's
joined when its host did: rounds before its first trained round are not missing (its worker logs them as
skipped anyway when it joined a running experiment); with ``eval.every_rounds`` set (or an ``evals.jsonl`` present), the held-out
eval lines parse, name trained rounds, never repeat one, and cover every K-th trained round and the last.
Files are read through :mod:`node.fsio` (capped, no symlinks, strict JSON); a symlinked round or stage
directory is refused like a symlinked file, never entered. A refused file
(symlink, FIFO, device) or a line holding a number out of bounds (a 401-digit integer) is a finding in its
check, never a traceback or a hang; names that are not the files a check reads (no ``.json`` suffix,
hidden temp files) are ignored and change nothing.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from rich import box
from rich.console import Console
from rich.table import Table

from node import fsio
from node.layout import ExperimentLayout, parse_round_dir, parse_stage_dir
from node.records import evals_file
from node.schemas import ConfigSnapshot, PeerRecord, RolloutFile, RoundResult, RoundState, validate_metrics_line
from node.strict_json import parse_json_bytes
from supervisor.report_data import eval_line, node_ids, peer_record
from supervisor.terminal import MAX_MAGNITUDE, escape_controls, number_problem, styled

MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_DISCOVERED = 256  # workers checked beyond the config's worker_1..N
READ_ERRORS = (OSError, ValueError, fsio.BadFile)


@dataclass(frozen=True)
class Check:
    """One line of ``swarm validate``."""

    name: str
    ok: bool
    detail: str


# --------------------------------------------------------------------------- helpers

def read_json(path: Path) -> Any:
    data, _ = fsio.read_capped(path, MAX_JSON_BYTES)
    return parse_json_bytes(data)


def _load(path: Path, parse: Callable[[Any], Any], label: str) -> tuple[Any, str | None]:
    """(parsed, None), or (None, what is wrong with the file called ``label``): missing, refused, not strict
    JSON, a number out of bounds, or not its schema."""
    try:
        obj = read_json(path)
        problem = number_problem(obj)
        return (None, f"{label}: {problem}") if problem else (parse(obj), None)
    except FileNotFoundError:
        return None, f"{label} is missing"
    except READ_ERRORS as err:
        return None, f"{label}: {err}"


def _ranges(rounds: Iterable[int]) -> str:
    rs = sorted(set(rounds))
    if not rs:
        return "none"
    parts, start, prev = [], rs[0], rs[0]
    for r in rs[1:] + [None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(parts)


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _some(problems: list[str], limit: int = 3) -> str:
    more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def _numbered(directory: Path, parse: Callable[[str], int | None],
              refused: list[tuple[Path, str]]) -> list[tuple[int, Path]]:
    """(n, path) of the real directories in ``directory`` that ``parse`` reads a number from, sorted; a
    numbered entry that is a symlink or not a directory goes to ``refused`` (never entered)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = []
    for n, name in ((parse(name), name) for name in names):
        if n is None:
            continue
        try:
            st = os.lstat(directory / name)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            found.append((n, directory / name))
        else:
            refused.append((directory / name, "symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"))
    return sorted(found)


def round_files(base: Path) -> tuple[list[tuple[int, int, Path]], list[tuple[Path, str]]]:
    """(round, stage, path) of every ``base/round_R/stage_S/*.json``, and the refused entries there
    (symlinks, not regular files or directories) with the reason."""
    files: list[tuple[int, int, Path]] = []
    refused: list[tuple[Path, str]] = []
    if os.path.islink(base):  # rollouts/ (or the archive's) planted as a symlink: never entered
        return files, [(base, "symlink")]
    for r, rdir in _numbered(base, parse_round_dir, refused):
        for s, sdir in _numbered(rdir, parse_stage_dir, refused):
            ok, bad = fsio.list_files(sdir, suffix=".json")
            files += [(r, s, f) for f in ok]
            refused += [(p, reason) for p, reason, sig in bad if sig != ("wrong_suffix",)]
    return files, refused


def _line_problem(obj: Any) -> str | None:
    """Why a JSONL line is refused: not JSON (the parser's reason), not an object, or a number out of bounds."""
    if isinstance(obj, Exception):
        return f"not JSON ({obj})"
    if not isinstance(obj, dict):
        return "not a JSON object"
    return number_problem(obj)


# --------------------------------------------------------------------------- the checks

def state_check(layout: ExperimentLayout, name: str, max_rounds: int) -> Check:
    path = layout.state_file()
    state, problem = _load(path, lambda d: RoundState.from_json(d, expect_experiment=name), layout.relative(path))
    if state is None:
        return Check("state", False, problem)
    reached = state.round >= max_rounds
    return Check("state", state.finished and reached,
                 f"round {state.round} of {max_rounds}, {'finished' if state.finished else 'NOT finished'}"
                 + ("" if reached else f": max_rounds ({max_rounds}) not reached"))


def snapshot_check(layout: ExperimentLayout, name: str) -> tuple[Check, ConfigSnapshot | None]:
    path = layout.config_file()
    snap, problem = _load(path, lambda d: ConfigSnapshot.from_json(d, expect_experiment=name), layout.relative(path))
    if snap is None:
        return Check("config snapshot", False, problem), None
    return Check("config snapshot", True, f"written by {snap.written_by}"), snap


def peers_check(layout: ExperimentLayout) -> Check:
    files, refused = fsio.list_files(layout.peers_dir(), suffix=".json")
    bad = [f"{p.name}: {reason}" for p, reason, sig in refused if sig != ("wrong_suffix",)]
    for f in files:
        _, problem = _load(f, lambda d: PeerRecord.from_json(d, expect_node=f.stem), f.name)
        if problem:
            bad.append(problem)
    detail = f"{len(files)} peer files valid" if files else "no peer files"
    return Check("peers", not bad and bool(files), _some(bad) if bad else detail)


def files_check(layout: ExperimentLayout, kind: str, parse) -> tuple[Check, dict[str, set[int]]]:
    """Every ``<kind>`` file parses; the rounds each node has a valid file for."""
    files, refused = round_files(layout.root / kind)
    bad = [f"{layout.relative(p)}: {reason}" for p, reason in refused]
    present: dict[str, set[int]] = {}
    for r, s, f in files:
        _, problem = _load(f, lambda d: parse(d, expect_round=r, expect_stage=s, expect_node=f.stem),
                           layout.relative(f))
        if problem:
            bad.append(problem)
        else:
            present.setdefault(f.stem, set()).add(r)
    return Check(f"{kind} files", not bad, _some(bad) if bad else f"{len(files)} files valid"), present


def archived_rounds(layout: ExperimentLayout) -> dict[str, set[int]] | None:
    """The rounds each node has an archived rollout file for; None when there is no archive."""
    archive = layout.archive_root / "rollouts" if layout.archive_root is not None else None
    if archive is None or not archive.is_dir():
        return None
    present: dict[str, set[int]] = {}
    for r, _, f in round_files(archive)[0]:
        present.setdefault(f.stem, set()).add(r)
    return present


def pruned_below(layout: ExperimentLayout, config, snap: ConfigSnapshot | None, archived: bool) -> int:
    """Rounds below this were removed by retention without an archive to check them against (0: none).

    The experiment's own settings (its config snapshot) decide, since the run may have been launched with
    overrides this command was not given; the oldest round directory still present says how far it got.
    """
    exchange = {"cleanup_enabled": config.exchange.cleanup_enabled, "archive_old": config.exchange.archive_old}
    if snap is not None and isinstance(snap.config.get("exchange"), dict):
        exchange.update(snap.config["exchange"])
    if not exchange.get("cleanup_enabled") or (exchange.get("archive_old") and archived):
        return 0
    rounds = layout.rounds_present("rollouts")
    return rounds[0] if rounds else 0


def events_check(layout: ExperimentLayout, worker: str) -> tuple[Check, set[int]]:
    """The worker's training events parse; the rounds it logged as skipped."""
    name, path = f"{worker} events", layout.events_file(worker)
    if not path.exists():
        return Check(name, False, f"{layout.relative(path)} is missing"), set()
    try:
        lines = list(fsio.iter_jsonl(path))
    except (OSError, fsio.BadFile) as err:
        return Check(name, False, f"{layout.relative(path)}: {err}"), set()
    broken = [f"line {n}: {problem}" for n, obj in lines if (problem := _line_problem(obj))]
    skipped = {r for _, obj in lines if not _line_problem(obj) and obj.get("event") == "rounds_skipped"
               for r in _list(obj.get("rounds")) if type(r) is int and 0 <= r < MAX_MAGNITUDE}
    return Check(name, not broken, _some(broken) if broken else f"{len(lines)} events"), skipped


def _line_rounds(layout: ExperimentLayout, path: Path, check: Callable[[Any], dict]) -> tuple[list[int], list[str]]:
    """(the round of every line ``check`` accepts, in file order; the problems: bad lines, an unreadable file,
    rounds with more than one line)."""
    rounds: list[int] = []
    problems = []
    try:
        for n, obj in fsio.iter_jsonl(path):
            problem = _line_problem(obj)
            if problem is None:
                try:
                    rounds.append(check(obj)["round"])
                except ValueError as err:
                    problem = str(err)
            if problem:
                problems.append(f"line {n}: {problem}")
    except (OSError, fsio.BadFile) as err:
        problems.append(f"{layout.relative(path)}: {err}")
    dups = sorted({r for r in rounds if rounds.count(r) > 1})
    if dups:
        problems.append(f"rounds with more than one line: {_ranges(dups)}")
    return rounds, problems


def metrics_check(layout: ExperimentLayout, worker: str, max_rounds: int, skipped: set[int], *,
                  joined_late: bool = False) -> tuple[Check, list[int] | None]:
    """One valid metrics line per round (bar skipped ones); the rounds trained (None: no metrics file).
    ``joined_late``: a worker another host added to a running experiment; rounds before its first trained
    round are not missing."""
    name, path = f"{worker} metrics", layout.metrics_file(worker)
    if not path.exists():
        return Check(name, False, f"{layout.relative(path)} is missing"), None
    trained, problems = _line_rounds(layout, path, lambda obj: validate_metrics_line(obj, expect_node=worker))
    first = min(trained) if joined_late and trained else 0
    missing = set(range(first, max_rounds)) - set(trained) - skipped
    if missing:
        problems.append(f"no line for rounds {_ranges(missing)}")
    detail = f"{len(trained)} lines, rounds {_ranges(trained)}" + (f", skipped {_ranges(skipped)}" if skipped else "")
    if first > 0 and not set(range(first)) <= skipped:
        detail += f", joined at round {first}"
    return Check(name, not problems, "; ".join(problems[:4]) if problems else detail), trained


def evals_check(layout: ExperimentLayout, worker: str, every: int, trained: list[int]) -> Check | None:
    """Held-out eval lines (:mod:`node.records`): valid, one per round, on trained rounds; with evals on
    (``every`` > 0), one for every trained round r with (r + 1) % every == 0 and for the last trained round.
    None when evals are off and the worker wrote none."""
    name, path = f"{worker} evals", evals_file(layout, worker)
    if not path.exists():
        return None if every == 0 else Check(name, False, f"{layout.relative(path)} is missing")
    rounds, problems = _line_rounds(layout, path, lambda obj: eval_line(obj, expect_node=worker))
    untrained = set(rounds) - set(trained)
    if untrained:
        problems.append(f"lines for rounds never trained: {_ranges(untrained)}")
    due = {r for r in trained if every and (r + 1) % every == 0} | ({max(trained)} if every and trained else set())
    if due - set(rounds):
        problems.append(f"no eval for rounds {_ranges(due - set(rounds))}")
    return Check(name, not problems, "; ".join(problems[:4]) if problems else f"{len(rounds)} lines, rounds "
                 f"{_ranges(rounds)}")


def rollouts_check(worker: str, trained: list[int], present: set[int], pruned_below: int) -> Check:
    """Every trained round has this worker's rollout file, unless retention removed that round."""
    pruned = {r for r in trained if r < pruned_below} - present
    missing = set(trained) - present - pruned
    if not trained:
        return Check(f"{worker} rollouts", False, "no trained rounds")
    if missing:
        return Check(f"{worker} rollouts", False, f"no rollout file for trained rounds {_ranges(missing)}")
    detail = f"rollout files for rounds {_ranges(set(trained) & present)}"
    if pruned:
        detail += f"; rounds {_ranges(pruned)} pruned by retention"
    return Check(f"{worker} rollouts", True, detail)


# --------------------------------------------------------------------------- every host's workers

def _listdir(path: Path) -> list[str]:
    try:
        return [] if os.path.islink(path) else os.listdir(path)
    except OSError:
        return []


def _has_metrics(layout: ExperimentLayout, node: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(layout.log_dir(node)).st_mode) and os.path.lexists(layout.metrics_file(node))
    except OSError:
        return False


def _worker_record(layout: ExperimentLayout, node: str) -> bool:
    record = peer_record(layout.peer_file(node), node)
    return record is not None and record.role == "worker"


def discover_workers(layout: ExperimentLayout, configured: Iterable[str], limit: int = MAX_DISCOVERED
                     ) -> tuple[list[str], list[str], int]:
    """(the config's workers, the other workers found, how many more names were not looked at). Another
    worker is a plain node id, not the coordinator, with a ``logs/<id>/metrics.jsonl`` or a peer record of
    role worker; at most ``limit`` candidates are looked at (:func:`supervisor.report_data.node_ids`: ids
    like the ones supervisors give first), the rest counted."""
    configured = list(configured)
    known = set(configured) | {"coordinator"}
    names = set(_listdir(layout.logs_dir())) | {n[:-5] for n in _listdir(layout.peers_dir()) if n.endswith(".json")}
    candidates, more = node_ids(list(names - known), limit)
    found = sorted(n for n in candidates if _has_metrics(layout, n) or _worker_record(layout, n))
    return configured, found, more


# --------------------------------------------------------------------------- all of them

def validate_experiment(config) -> list[Check]:
    """Every check, in the order shown."""
    layout = ExperimentLayout.from_config(config)
    name, max_rounds = config.experiment.name, config.experiment.max_rounds
    if not layout.root.is_dir():
        return [Check("experiment dir", False, f"{layout.root} does not exist")]
    snapshot, snap = snapshot_check(layout, name)
    checks = [state_check(layout, name, max_rounds), snapshot, peers_check(layout)]
    rollouts_files, rollouts = files_check(layout, "rollouts", RolloutFile.from_json)
    checks += [rollouts_files, files_check(layout, "rewards", RoundResult.from_json)[0]]
    archived = archived_rounds(layout)
    for node, rounds in (archived or {}).items():
        rollouts.setdefault(node, set()).update(rounds)
    below = pruned_below(layout, config, snap, archived is not None)
    configured, others, unchecked = discover_workers(layout, [f"worker_{i}" for i in range(1, config.supervisor.workers + 1)])
    if unchecked:
        checks.append(Check("workers", False, f"{len(configured) + len(others)} workers checked; {unchecked} more "
                            f"node names under logs/ and peers/ not looked at (at most {MAX_DISCOVERED})"))
    for w in configured + others:
        events, skipped = events_check(layout, w)
        metrics, trained = metrics_check(layout, w, max_rounds, skipped, joined_late=w in others)
        checks += [events, metrics]
        if trained is not None:
            checks.append(rollouts_check(w, trained, rollouts.get(w, set()), below))
            evals = evals_check(layout, w, config.eval.every_rounds, trained)
            checks += [evals] if evals is not None else []
    return checks


def show_checks(title: str, checks: list[Check], console: Console | None) -> int:
    """The PASS/FAIL table and the count; 0 when every check passed, else 1."""
    failed = sum(not c.ok for c in checks)
    verdict = f"{len(checks) - failed}/{len(checks)} checks passed" + (": FAILED" if failed else ": OK")
    if console is None:
        width = max(len(c.name) for c in checks)
        print(f"validate {escape_controls(title)}")
        for c in checks:
            print(f"{'PASS' if c.ok else 'FAIL'}  {c.name:<{width}}  {escape_controls(c.detail)}")
        print(verdict)
        return 1 if failed else 0
    table = Table(title=styled([(f"validate {escape_controls(title)}", "bold")]), box=box.SIMPLE_HEAD,
                  title_justify="left", header_style="bold", show_edge=False, padding=(0, 1, 0, 0))
    for column in ("", "CHECK", "DETAIL"):
        table.add_column(column, no_wrap=column != "DETAIL", overflow="fold")
    for c in checks:
        table.add_row(styled([("PASS", "green") if c.ok else ("FAIL", "bold red")]),
                      styled([(c.name, "")]), styled([(escape_controls(c.detail), "" if c.ok else "red")]))
    console.print(table)
    console.print(styled([(verdict, "bold red" if failed else "bold green")]))
    return 1 if failed else 0
