"""supervisor.report: the numbers in the table, the PNG files, running experiments, configs and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import CONFIG, Timeouts
from node.layout import ExperimentLayout
from node.signing import Signer
from node.storage import SharedStore
from supervisor.report import build_report, main
from supervisor.report_data import ReportError, load_experiment
from supervisor.report_table import moving_window, trailing_mean

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0 = 1_700_000_000.0

# Per-worker reward per round, chosen so the sums are easy to check by hand.
BASE = {"worker_1": [0.1, 0.2, 0.3, 0.4], "worker_2": [0.3, 0.2, 0.1, 0.0]}  # means 0.2 x 4 -> 0.8
SAPO = {"worker_1": [0.5, 0.5, 0.5, 0.5], "worker_2": [0.1, 0.3, 0.5, 0.7]}  # means 0.3 .. 0.6 -> 1.8


def metrics_line(node: str, rnd: int, reward: float, *, J: int, gpu: int | None = None) -> dict:
    line = {
        "node_id": node, "round": rnd, "timestamp": T0 + 10 * rnd, "reward_local": reward,
        "reward_external": None, "num_local_groups": 4 - J, "num_external_groups": J, "loss": 0.1,
        "tokens_generated": 64, "tokens_prompt": 512, "tokens_trained": 64,
        "timings": {"sample_s": 0.01, "generate_s": 0.5, "score_s": 0.01, "publish_s": 0.02, "wait_s": 0.1,
                    "fetch_s": 0.02, "select_s": 0.01, "train_s": 0.3, "round_s": 1.0},
    }
    if gpu is not None:
        line["gpu_peak_bytes"] = gpu
    return line


def write_experiment(shared: Path, name: str, rewards: dict[str, list[float]], *, I: int, J: int,  # noqa: E741
                     max_rounds: int = 4, gpu: bool = False, snapshot: bool = True) -> Path:
    exp = shared / "experiments" / name
    if snapshot:
        (exp / "state").mkdir(parents=True)
        config = {"experiment": {"name": name, "max_rounds": max_rounds, "seed": 42},
                  "sapo": {"num_train_samples": I, "num_transplant_trees": J, "num_generations": 4}}
        (exp / "state" / "config.json").write_text(json.dumps(
            {"schema_version": 1, "experiment": name, "written_by": "coordinator", "written_at": T0, "config": config}))
    for node, values in rewards.items():
        logs = exp / "logs" / node
        logs.mkdir(parents=True)
        lines = [metrics_line(node, r, v, J=J, gpu=(1 << 30) + r * (1 << 20) if gpu else None)
                 for r, v in enumerate(values)]
        (logs / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        events = [{"node_id": node, "event": "started", "timestamp": T0 - 5},
                  {"node_id": node, "event": "finished", "timestamp": T0 + 100, "round": len(values) - 1}]
        (logs / "training_events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return exp


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, f"{path} is suspiciously small ({len(data)} bytes)"


@pytest.fixture
def two_experiments(tmp_path):
    shared = tmp_path / "shared"
    base = write_experiment(shared, "toy-4loc0ext", BASE, I=4, J=0)
    sapo = write_experiment(shared, "toy-2loc2ext", SAPO, I=2, J=2, gpu=True)
    return base, sapo


def test_table_numbers_and_png_files(two_experiments, tmp_path):
    base, sapo = two_experiments
    out = tmp_path / "report"
    report = build_report([sapo, base], out)  # the J=0 baseline need not come first

    rows = {s.label: s for s in report.experiments}
    assert report.baseline == "toy-4loc0ext"
    b, s = rows["toy-4loc0ext"], rows["toy-2loc2ext"]
    assert b.cumulative_reward == pytest.approx(0.8)
    assert s.cumulative_reward == pytest.approx(1.8)
    assert b.cumulative_reward_all_nodes == pytest.approx(1.6)
    assert s.cumulative_reward_all_nodes == pytest.approx(3.6)
    assert s.mean_reward == pytest.approx(0.45)
    assert s.change_vs_baseline_pct == pytest.approx(125.0)
    assert b.change_vs_baseline_pct == pytest.approx(0.0)
    assert (s.num_train_samples, s.num_transplant_trees, s.num_generations) == (2, 2, 4)
    assert (s.workers, s.rounds, s.last_round, s.restarts, s.finished) == (2, 4, 3, 0, True)
    assert s.window == 1 and s.final_reward == pytest.approx(0.6)  # 4 rounds -> window ceil(4/10) = 1

    names = {p.relative_to(out).as_posix() for p in report.plots}
    assert {"reward_moving_average.png", "cumulative_reward.png", "toy-4loc0ext/reward_per_node.png",
            "toy-4loc0ext/groups.png", "toy-4loc0ext/round_time.png", "toy-2loc2ext/gpu_memory.png"} <= names
    assert "toy-4loc0ext/gpu_memory.png" not in names  # no gpu_peak_bytes in that experiment
    for path in report.plots:
        assert_png(path)

    saved = json.loads((out / "report.json").read_text())
    by_label = {e["label"]: e for e in saved["experiments"]}
    assert saved["baseline"] == "toy-4loc0ext" and saved["schema_version"] == 1
    assert by_label["toy-2loc2ext"]["cumulative_reward"] == pytest.approx(1.8)
    assert by_label["toy-2loc2ext"]["change_vs_baseline_pct"] == pytest.approx(125.0)
    assert sorted(saved["plots"]) == sorted(names)
    md = (out / "report.md").read_text()
    assert "| toy-2loc2ext | 2 | 2 | 4 | 2 | 4 | 1.80 | 3.60 |" in md
    assert "+125.0 %" in md and "baseline" in md
    for name in names:
        assert f"]({name})" in md


def test_running_experiment_truncated_line_duplicate_and_missing_node(two_experiments, tmp_path):
    base, _ = two_experiments
    shared = tmp_path / "shared"
    running = write_experiment(shared, "toy-1loc3ext", {"worker_1": [0.4, 0.4, 0.4]}, I=1, J=3, max_rounds=10)
    metrics = running / "logs" / "worker_1" / "metrics.jsonl"
    with metrics.open("a") as fh:
        fh.write(json.dumps(metrics_line("worker_1", 1, 0.9, J=3)) + "\n")  # a repeated (node, round): ignored
        fh.write(json.dumps(metrics_line("worker_1", 3, 0.8, J=3))[:40])  # being written: no newline yet
    (running / "logs" / "worker_2").mkdir()  # a worker that has not written anything yet
    events = running / "logs" / "worker_1" / "training_events.jsonl"
    events.write_text(events.read_text().splitlines()[0] + "\n" + json.dumps(
        {"node_id": "worker_1", "event": "resumed", "timestamp": T0 + 15, "round": 0}) + "\n")

    data = load_experiment(running)
    assert data.nodes == ["worker_1"]
    assert sorted(data.metrics["worker_1"]) == [0, 1, 2]
    assert data.metrics["worker_1"][1]["reward_local"] == 0.4  # the first line of a (node, round) wins
    assert (data.duplicate_lines, data.skipped_lines) == (1, 1)
    assert data.restarts() == [{"node": "worker_1", "event": "resumed", "timestamp": T0 + 15, "round": 2}]

    report = build_report([base, running], tmp_path / "out")
    row = {s.label: s for s in report.experiments}["toy-1loc3ext"]
    assert row.cumulative_reward == pytest.approx(1.2)
    # Compared with the baseline over the 3 rounds both have: 1.2 vs 0.6.
    assert (row.compared_rounds, row.change_vs_baseline_pct) == (3, pytest.approx(100.0))
    assert (row.finished, row.restarts, row.rounds) == (False, 1, 3)
    assert any("3 of 10 rounds" in w for w in report.warnings)
    assert any("repeated (node, round)" in w for w in report.warnings)
    md = report.markdown.read_text()
    assert "toy-1loc3ext (running or stopped)" in md and "+100.0 % over 3 rounds" in md
    for path in report.plots:
        assert_png(path)


def test_configs_with_env_overrides_and_no_baseline(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    write_experiment(shared, "renamed", SAPO, I=2, J=2, snapshot=False)
    config = tmp_path / "exp.yaml"
    config.write_text(f"experiment: {{name: original, root: {shared}}}\n"
                      "sapo: {num_train_samples: 2, num_transplant_trees: 2, num_generations: 4}\n"
                      "model: {name: builtin:tiny-gpt2}\n")
    monkeypatch.setenv("EXPERIMENT_NAME", "renamed")  # the seeds' env overrides apply to configs
    report = build_report([config], tmp_path / "out")
    (row,) = report.experiments
    assert row.label == "renamed" and row.num_transplant_trees == 2
    assert row.cumulative_reward == pytest.approx(1.8)
    assert report.baseline is None and row.change_vs_baseline_pct is None
    md = report.markdown.read_text()
    assert "| change vs J=0 |" not in md and "no change column" in md


def test_experiment_without_metrics_is_left_out_and_nothing_is_an_error(two_experiments, tmp_path):
    base, _ = two_experiments
    empty = tmp_path / "shared" / "experiments" / "empty"
    (empty / "logs").mkdir(parents=True)
    report = build_report([base, empty], tmp_path / "out")
    assert [s.label for s in report.experiments] == ["toy-4loc0ext"]
    assert any("empty: no metrics yet" in w for w in report.warnings)
    with pytest.raises(ReportError, match="nothing to report"):
        build_report([empty], tmp_path / "out2")
    with pytest.raises(ReportError, match="not an experiment directory"):
        build_report([tmp_path], tmp_path / "out3")


def test_main_prints_the_table_and_maps_mistakes_to_exit_2(two_experiments, tmp_path, capsys):
    base, sapo = two_experiments
    assert main([str(base), str(sapo), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "toy-2loc2ext" in printed and "125.0 %" in printed and (tmp_path / "out" / "report.md").is_file()
    assert main([str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "no such config file or experiment directory" in capsys.readouterr().err


def test_swarm_report_subcommand(two_experiments, tmp_path, capsys):
    from supervisor.cli import main as swarm

    base, sapo = two_experiments
    assert swarm(["report", str(base), str(sapo), "--out", str(tmp_path / "cli")]) == 0
    assert "125.0 %" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "report.json").read_text())
    assert swarm(["report", str(tmp_path / "missing")]) == 2


def test_report_does_not_import_torch(two_experiments, tmp_path):
    base, sapo = two_experiments
    code = ("import sys; from supervisor.report import main; "
            f"assert main([{str(base)!r}, {str(sapo)!r}, '--out', {str(tmp_path / 'o')!r}]) == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)


def _report(capsys, *experiments, out) -> tuple[int, str, str]:
    """``swarm report``'s function on ``experiments``: (exit code, stdout, stderr)."""
    code = main([*map(str, experiments), "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.timeout(60)  # a FIFO that were opened would block forever
def test_hostile_log_files_are_skipped_in_one_line_each(two_experiments, tmp_path, capsys):
    base, sapo = two_experiments
    logs = sapo / "logs"
    (logs / "worker_1" / "metrics.jsonl").unlink()
    (logs / "worker_1" / "metrics.jsonl").symlink_to("/dev/zero")
    (logs / "worker_2" / "training_events.jsonl").unlink()
    os.mkfifo(logs / "worker_2" / "training_events.jsonl")
    (logs / "worker_3").symlink_to(base / "logs" / "worker_1", target_is_directory=True)
    code, out, err = _report(capsys, base, sapo, out=tmp_path / "out")
    assert code == 0 and err == ""
    assert "- toy-2loc2ext: skipped logs/worker_1/metrics.jsonl: is a symlink\n" in out
    assert "- toy-2loc2ext: skipped logs/worker_2/training_events.jsonl: is not a regular file\n" in out
    assert "- toy-2loc2ext: skipped logs/worker_3: is a symlink\n" in out
    row = next(e for e in json.loads((tmp_path / "out" / "report.json").read_text())["experiments"]
               if e["label"] == "toy-2loc2ext")
    assert (row["workers"], row["finished"]) == (1, False)  # worker_2 only; its events were refused

    for name in ("metrics.jsonl", "training_events.jsonl"):  # nothing readable left: a one-line error
        (logs / "worker_2" / name).unlink()
        (logs / "worker_2" / name).symlink_to("/dev/zero")
    code, out, err = _report(capsys, sapo, out=tmp_path / "out2")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("report: nothing to report: ") and "logs/worker_2/metrics.jsonl: is a symlink" in err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind,reason", [
    ("dev_zero", "is a symlink"),
    ("fifo", "is not a regular file"),
    ("nan", "NaN is not allowed"),
    ("list", "not a config snapshot"),
])
def test_a_hostile_config_snapshot_is_skipped_in_one_line(two_experiments, tmp_path, capsys, kind, reason):
    _, sapo = two_experiments
    snapshot = sapo / "state" / "config.json"
    snapshot.unlink()
    if kind == "dev_zero":
        snapshot.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(snapshot)
    else:
        snapshot.write_text('{"config": {"sapo": {"num_train_samples": NaN}}}' if kind == "nan" else "[1]")
    code, out, err = _report(capsys, sapo, out=tmp_path / "out")
    assert code == 0 and err == ""
    (line,) = [x for x in out.splitlines() if "state/config.json" in x]
    assert line.startswith("- toy-2loc2ext: skipped state/config.json: ") and reason in line
    assert "| toy-2loc2ext | ? | ? | ? | 2 | 4 | 1.80 |" in out  # I/J/G unknown, the logs read as before


def test_a_401_digit_integer_is_a_skipped_line_not_a_traceback(two_experiments, tmp_path, capsys):
    base, sapo = two_experiments
    huge = 10 ** 400
    snapshot = sapo / "state" / "config.json"
    obj = json.loads(snapshot.read_text())
    obj["config"]["sapo"]["num_train_samples"] = huge
    snapshot.write_text(json.dumps(obj))
    metrics = sapo / "logs" / "worker_1" / "metrics.jsonl"
    with metrics.open("a") as fh:
        fh.write(json.dumps(metrics_line("worker_1", 5, 0.5, J=2) | {"round": huge}) + "\n")  # skipped
        fh.write(json.dumps(metrics_line("worker_1", 4, huge, J=2) | {"timestamp": huge, "gpu_peak_bytes": huge,
                                                                       "num_local_groups": huge}) + "\n")
    events = sapo / "logs" / "worker_1" / "training_events.jsonl"
    with events.open("a") as fh:
        fh.write(json.dumps({"node_id": "worker_1", "event": "resumed", "timestamp": huge, "round": huge}) + "\n")
    code, out, err = _report(capsys, base, sapo, out=tmp_path / "out")
    assert code == 0 and err == ""
    assert ("- toy-2loc2ext: state/config.json: sapo.num_train_samples is not an integer in [0, 2**63 - 1] "
            "(a 401-digit integer); ignored\n") in out
    assert ("- toy-2loc2ext: skipped logs/worker_1/metrics.jsonl: 2 line(s) left out; the first, line 5: round: "
            "a 401-digit integer is out of range (|x| <= 2**63)\n") in out
    assert ("- toy-2loc2ext: skipped logs/worker_1/training_events.jsonl: 1 line(s) left out; the first, line 3: "
            "timestamp: a 401-digit integer is out of range (|x| <= 2**63)\n") in out
    assert "| toy-2loc2ext | ? | 2 | 4 | 2 | 4 | 1.80 |" in out  # rounds 4 and 5 left out
    rows = {e["label"]: e for e in json.loads((tmp_path / "out" / "report.json").read_text())["experiments"]}
    assert rows["toy-2loc2ext"]["restarts"] == 0 and rows["toy-2loc2ext"]["num_train_samples"] is None
    assert rows["toy-2loc2ext"]["skipped_lines"] == 3


def test_the_round_switch_beside_the_round_time_signed_and_plain_lines(two_experiments, tmp_path, capsys):
    base, sapo = two_experiments
    layout = ExperimentLayout(sapo)
    store = SharedStore(layout, node_id="coordinator", lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool",
                        signer=Signer(bytes(range(32))))
    path = layout.round_switch_file()
    line = {"node_id": "coordinator", "timestamp": T0, "reason": "all_live_workers_submitted", "workers": 2,
            "missing": []}
    store.append_jsonl(path, line | {"round": 1, "switch_ms": 30.0, "detect_ms": 20.0, "start_ms": 10.0})
    store.append_jsonl(path, line | {"round": 2, "switch_ms": 50.0, "detect_ms": 20.0, "start_ms": 30.0})
    with path.open("a") as fh:  # plain lines (an unsigned experiment), a timer's advance, and bad ones
        fh.write(json.dumps(line | {"round": 3, "reason": "interval", "switch_ms": 40.0, "detect_ms": None,
                                    "start_ms": 40.0, "missing": ["worker_2"]}) + "\n")
        fh.write(json.dumps(line | {"round": 4, "switch_ms": -1.0, "detect_ms": 1.0, "start_ms": 1.0}) + "\n")
        fh.write(json.dumps(line | {"round": 2, "switch_ms": 999.0, "detect_ms": 1.0, "start_ms": 1.0}) + "\n")
        fh.write(json.dumps(line | {"round": 5})[:25])  # being appended
    assert '"hmac":' in path.read_text().splitlines()[0]

    code, out, err = _report(capsys, base, sapo, out=tmp_path / "out")
    assert code == 0 and err == ""
    rows = {e["label"]: e for e in json.loads((tmp_path / "out" / "report.json").read_text())["experiments"]}
    sw = rows["toy-2loc2ext"]["round_switch"]
    assert (sw["rounds"], sw["measured"], sw["incomplete"]) == (3, 3, 1)
    assert sw["switch_ms"] == {"p50": 40.0, "p99": 49.8} and sw["detect_ms"] == {"p50": 20.0, "p99": 20.0}
    assert sw["start_ms"] == {"p50": 30.0, "p99": 39.8}
    assert rows["toy-2loc2ext"]["round_s_p50"] == pytest.approx(1.0)
    assert rows["toy-4loc0ext"]["round_switch"] is None  # an older experiment: absent, not an error
    assert "| toy-2loc2ext | 1.00 | 40.0 / 49.8 | 20.0 / 20.0 | 30.0 / 39.8 | 3 (1 timed out) |" in out
    assert "| toy-4loc0ext | 1.00 | not recorded | not recorded | not recorded | 0 |" in out
    assert "Round switch not recorded for toy-4loc0ext" in out
    assert ("- toy-2loc2ext: skipped logs/coordinator/round_switches.jsonl: 2 line(s) left out; the first, line 4: "
            "switch_ms: not a number >= 0 or null (-1.0)\n") in out  # the partial last line is one more skipped
    assert "toy-2loc2ext: ignored 1 repeated (node, round) line(s)" in out  # round 2 again: the first one counts
    assert_png(tmp_path / "out" / "toy-2loc2ext" / "round_time.png")
    assert_png(tmp_path / "out" / "toy-4loc0ext" / "round_time.png")


def eval_line(node: str, rnd: int, accuracy: dict[str, float | None], *, n: int = 4, final: bool = False) -> dict:
    tasks = {task: {"accuracy": a, "score": a, "n": 0 if a is None else n, "planned": n, "seconds": 0.5,
                    "complete": a is not None} for task, a in accuracy.items()}
    return {"node_id": node, "round": rnd, "timestamp": T0 + 10 * rnd, "final": final, "seconds": 1.0,
            "complete": all(t["complete"] for t in tasks.values()), "tasks": tasks}


def test_eval_accuracy_per_task_and_node_and_the_final_one_beside_cumulative_reward(two_experiments, tmp_path,
                                                                                     capsys):
    base, sapo = two_experiments
    evals = {"worker_1": [eval_line("worker_1", 1, {"toy_copy": 0.25, "basic_arithmetic": 0.0}),
                          eval_line("worker_1", 3, {"toy_copy": 0.75, "basic_arithmetic": 0.25}, final=True)],
             "worker_2": [eval_line("worker_2", 1, {"toy_copy": 0.5, "basic_arithmetic": None}),  # cut: no arithmetic
                          eval_line("worker_2", 3, {"toy_copy": 0.5, "basic_arithmetic": 0.5}, final=True)]}
    layout = ExperimentLayout(sapo)
    for node, lines in evals.items():  # signed lines (as a worker writes them), read without the key
        store = SharedStore(layout, node_id=node, lock_dir=tmp_path / "locks", spool_dir=tmp_path / f"spool-{node}",
                            signer=Signer(bytes(range(32))))
        for line in lines:
            store.append_jsonl(sapo / "logs" / node / "evals.jsonl", line)
    with (sapo / "logs" / "worker_2" / "evals.jsonl").open("a") as fh:
        fh.write(json.dumps(eval_line("worker_2", 3, {"toy_copy": 1.0, "basic_arithmetic": 1.0})) + "\n")  # repeated
        fh.write(json.dumps(eval_line("worker_2", 5, {"toy_copy": 1.5})) + "\n")  # not an accuracy
        fh.write(json.dumps(eval_line("worker_1", 7, {"toy_copy": 1.0})) + "\n")  # another node's line

    data = load_experiment(sapo)
    assert data.eval_accuracy() == {"basic_arithmetic": {"worker_1": {1: 0.0, 3: 0.25}, "worker_2": {3: 0.5}},
                                    "toy_copy": {"worker_1": {1: 0.25, 3: 0.75}, "worker_2": {1: 0.5, 3: 0.5}}}
    code, out, err = _report(capsys, base, sapo, out=tmp_path / "out")
    assert code == 0 and err == ""
    rows = {e["label"]: e for e in json.loads((tmp_path / "out" / "report.json").read_text())["experiments"]}
    row = rows["toy-2loc2ext"]
    # worker_1's last eval: (0.75 + 0.25) / 2 = 0.5; worker_2's: 0.5 -> 0.5
    assert row["final_eval_accuracy"] == pytest.approx(0.5) and row["eval_rounds"] == 2
    assert row["final_eval_by_task"] == {"basic_arithmetic": pytest.approx(0.375), "toy_copy": pytest.approx(0.625)}
    assert rows["toy-4loc0ext"]["final_eval_accuracy"] is None and rows["toy-4loc0ext"]["eval_rounds"] == 0
    assert "| toy-2loc2ext | 2 | 2 | 4 | 2 | 4 | 1.80 | 3.60 | 0.500 |" in out  # beside cumulative reward
    assert "| toy-4loc0ext | 4 | 0 | 4 | 2 | 4 | 0.80 | 1.60 | – |" in out  # no evals: still reported
    assert "| toy-2loc2ext | 2 | 0.375 | 0.625 | 0.500 |" in out and "| toy-4loc0ext | 0 | – | – | – |" in out
    assert "skipped logs/worker_2/evals.jsonl: 2 line(s) left out; the first, line 4: tasks.toy_copy.accuracy: " \
           "not a number in [0, 1] or null (1.5)" in out
    assert "toy-2loc2ext: ignored 1 repeated (node, round) line(s)" in out
    assert_png(tmp_path / "out" / "toy-2loc2ext" / "eval_accuracy.png")
    assert_png(tmp_path / "out" / "eval_accuracy_mean.png")
    assert not (tmp_path / "out" / "toy-4loc0ext" / "eval_accuracy.png").exists()
    # Runs without any eval: no eval plot, no eval section, the column shows –.
    code, out, _ = _report(capsys, base, out=tmp_path / "plain")
    assert code == 0 and "Held-out eval" not in out and not (tmp_path / "plain" / "eval_accuracy_mean.png").exists()


def test_moving_average_helpers():
    assert [moving_window(n) for n in (1, 4, 10, 100, 120, 999, 1000, 2000)] == [1, 1, 1, 10, 12, 100, 100, 100]
    # Trailing window over round numbers, partial at the start, gaps allowed.
    assert trailing_mean([0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert trailing_mean([0, 1, 5], [1.0, 3.0, 5.0], 3) == [1.0, 2.0, 5.0]


@pytest.mark.slow
@pytest.mark.timeout(Timeouts.of(CONFIG, "experiment.max_rounds=4").budget(rounds=4))
def test_report_on_a_real_two_worker_swarm(make_swarm, tmp_path):
    swarm = make_swarm("experiment.max_rounds=4", "eval.every_rounds=2", "eval.questions_per_task=4")
    for node in swarm.names:
        swarm.start_node(node)
    for node in swarm.names:
        assert swarm.wait_node(node, swarm.t.budget(rounds=4)) == 0, swarm.output(f"{node}.out")[-3000:]
    report = build_report([swarm.exp], tmp_path / "report")
    (row,) = report.experiments
    lines = {w: swarm.metrics(w) for w in ("worker_1", "worker_2")}
    expected = sum((lines["worker_1"][r]["reward_local"] + lines["worker_2"][r]["reward_local"]) / 2 for r in range(4))
    assert row.cumulative_reward == pytest.approx(expected)
    assert (row.workers, row.rounds, row.finished, row.num_transplant_trees) == (2, 4, True, 2)
    assert report.warnings == () and row.skipped_lines == 0  # every line a real node writes is taken
    # The coordinator's signed round switches (into rounds 1-3; a late one may have timed out) beside them.
    sw = row.round_switch
    assert sw is not None and 1 <= sw["rounds"] <= 3 and sw["switch_ms"]["p50"] is not None, sw
    assert sw["switch_ms"]["p50"] <= sw["switch_ms"]["p99"]
    assert f"| {row.label} | {row.round_s_p50:.2f} | {sw['switch_ms']['p50']:.1f} / " in report.markdown.read_text()
    # Held-out evals after rounds 1 and 3 (the end), 4 questions per task, by both workers.
    assert row.eval_rounds == 2 and row.final_eval_accuracy is not None and 0.0 <= row.final_eval_accuracy <= 1.0
    assert set(row.final_eval_by_task) == {"toy_copy", "basic_arithmetic"}
    assert f"{row.final_eval_accuracy:.3f} |" in report.markdown.read_text()
    assert (tmp_path / "report" / row.label / "eval_accuracy.png") in report.plots
    for path in report.plots:
        assert_png(path)
