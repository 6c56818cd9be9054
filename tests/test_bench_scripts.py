"""The benchmark scripts' arithmetic on fake metrics, their command lines, and (slow) their plumbing on a CPU.

scripts/bench_gpu.py needs a GPU to mean anything; here its table and projections are checked on made-up
metrics lines, its levers, --quick plan, --dir, CPU restrictions, --dry-run, no-CUDA exit and summary line
are checked, and one tiny `--device cpu --quick` run checks that it can drive `swarm launch`, sample
status.json and read the metrics back. scripts/bench_overhead.py likewise.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench_gpu = _load("bench_gpu")
bench_overhead = _load("bench_overhead")
GB = 1e9


def _line(worker, rnd, ts, round_s, generate_s=1.0, tokens=1024, peak=None):
    line = {"node_id": worker, "round": rnd, "timestamp": ts, "tokens_generated": tokens,
            "timings": {"round_s": round_s, "generate_s": generate_s, "train_s": 0.5}}
    if peak is not None:
        line["gpu_peak_bytes"] = peak
    return line


def _fake_run():
    """2 workers, rounds 0..4 ending every 4 s from t=100 (round 0 took 10 s: compilation)."""
    metrics = {
        "worker_1": [_line("worker_1", 0, 100.0, 10.0, peak=int(1.5 * GB))]
        + [_line("worker_1", r, 100.0 + 4 * r, 3.0, peak=int(1.2 * GB)) for r in range(1, 5)],
        "worker_2": [_line("worker_2", 0, 101.0, 10.0, generate_s=2.0)]
        + [_line("worker_2", r, 101.0 + 4 * r, 3.5, generate_s=2.0) for r in range(1, 5)],
    }
    nodes = [(95.0, {"coordinator": None, "worker_1": int(4.0 * GB), "worker_2": int(2.0 * GB)}),  # warm-up
             (105.0, {"coordinator": None, "worker_1": int(2.5 * GB), "worker_2": int(2.2 * GB)}),
             (110.0, {"coordinator": None, "worker_1": int(2.4 * GB), "worker_2": None})]
    device = [(95.0, int(6.5 * GB)), (105.0, int(5.0 * GB))]
    util = [(95.0, 10), (105.0, 80), (110.0, 90)]
    return metrics, nodes, device, util


def test_summarize_fake_run():
    metrics, nodes, device, util = _fake_run()
    s = bench_gpu.summarize("shipped", 2, metrics, skip_rounds=1, launch_wall=80.0, node_samples=nodes,
                            device_samples=device, util_samples=util)
    assert s.rounds_measured == 4
    assert s.startup_s == pytest.approx(91.0 - 80.0)  # worker_2 started round 0 at 101 - 10
    assert s.first_round_s == pytest.approx(10.0)
    assert s.round_s == pytest.approx(3.25)  # median of four 3.0 and four 3.5
    assert s.generate_s == pytest.approx(1.5) and s.train_s == pytest.approx(0.5)  # the phases, rounds 1..4
    assert s.period_s == pytest.approx(4.0)
    # worker_1: 4 x 1024 tokens in 4 x 1 s; worker_2: 4 x 1024 in 4 x 2 s
    assert s.gen_tokens_per_s == pytest.approx(1024 + 512)
    # 8 x 1024 tokens between the end of round 0 (t=100, worker_1) and the last line (t=117)
    assert s.swarm_tokens_per_s == pytest.approx(8 * 1024 / 17.0)
    assert s.projected_hours == pytest.approx(2000 * 4.0 / 3600)
    assert s.nvml_peak_bytes == int(4.0 * GB)  # the warm-up sample counts for the whole-run peak
    assert s.nvml_steady_bytes == int(2.5 * GB)  # but not for the measured rounds
    assert s.per_worker_peak_bytes == {"worker_1": int(4.0 * GB), "worker_2": int(2.2 * GB)}
    assert s.memory_unknown == []
    assert s.torch_peak_bytes == int(1.2 * GB)  # round 0 (1.5 GB) is not measured
    assert s.device_peak_bytes == int(6.5 * GB)
    assert s.util_percent == pytest.approx(85.0)


def test_summarize_without_samples_or_lines():
    s = bench_gpu.summarize("x", 4, {"worker_1": []})
    assert s.rounds_measured == 0 and s.period_s is None and s.projected_hours is None
    assert s.nvml_peak_bytes is None and s.gen_tokens_per_s is None and s.first_round_s is None


def test_projection_and_anchor_arithmetic():
    assert bench_gpu.projected_hours(1.8) == pytest.approx(1.0)  # the target's pace: 1.8 s per round
    assert bench_gpu.projected_hours(37.8) == pytest.approx(21.0)  # the seeds' pace: 37.8 s per round
    assert bench_gpu.projected_hours(None) is None


def _row(label="shipped", workers=4, period=1.5, peak_gb=2.1, steady_gb=None, **kw):
    return bench_gpu.RunSummary(label, workers, rounds_measured=7, period_s=period,
                                projected_hours=bench_gpu.projected_hours(period),
                                nvml_peak_bytes=None if peak_gb is None else int(peak_gb * GB),
                                nvml_steady_bytes=None if steady_gb is None else int(steady_gb * GB), **kw)


def test_table_has_anchors_targets_and_verdicts():
    fast = _row(round_s=1.4)
    slow = _row("fp32", period=5.0, peak_gb=3.4)
    one = _row(workers=1, period=1.0, peak_gb=2.0)
    failed = bench_gpu.RunSummary("mps", 4, error="CUDA MPS could not be started: not found")
    table = bench_gpu.format_table([one, fast, slow, failed])
    lines = table.splitlines()
    assert lines[0].startswith("config") and "2000 rounds h" in lines[0] and "NVML peak GB" in lines[0]
    for phase in ("start-up s", "1st round s", "gen s", "train s"):
        assert phase in lines[0]
    assert "0.83" in lines[2] and "25.2x" in lines[2]  # 2000 x 1.5 s = 0.83 h; 21 / 0.83 = 25.2
    assert "mps" in lines[4] and "FAILED: CUDA MPS could not be started" in lines[4]
    assert "21 h for 2000 rounds, 6.5 GB per node" in table
    assert "<= 1 h for 2000 rounds with 4 workers; <= 3 GB per training node" in table
    assert "shipped N=4: time 0.83 h <= 1 h: MET; memory 2.10 GB/node <= 3 GB: MET" in table
    assert "fp32 N=4: time 2.78 h > 1 h: MISSED; memory 3.40 GB/node > 3 GB: MISSED" in table
    assert "shipped N=1: memory 2.00 GB/node <= 3 GB: MET" in table  # no time verdict below 4 workers


@pytest.mark.parametrize("figures", [[None, None], [0, 0], [0, None]])
def test_unknown_memory_is_never_met(figures):
    """NVML without per-process accounting: None (or 0 from older supervisors) is unknown, not 0 bytes."""
    metrics, _, _, _ = _fake_run()
    nodes = [(105.0 + i, {"coordinator": None, "worker_1": f, "worker_2": f}) for i, f in enumerate(figures)]
    s = bench_gpu.summarize("shipped", 4, metrics, node_samples=nodes)
    assert s.nvml_peak_bytes is None and s.nvml_steady_bytes is None
    assert s.memory_unknown == ["worker_1", "worker_2"]
    verdict = "\n".join(bench_gpu.verdicts([s]))
    assert "memory unknown" in verdict and "GB: MET" not in verdict
    assert bench_gpu.summary_line([s]).endswith("peak_gb=- steady_gb=-")


def test_memory_unknown_for_one_worker():
    metrics, _, _, _ = _fake_run()
    under = [(105.0, {"worker_1": int(2.0 * GB), "worker_2": 0})]
    s = bench_gpu.summarize("shipped", 4, metrics, node_samples=under)
    assert s.memory_unknown == ["worker_2"]
    verdict = bench_gpu.memory_verdict(s)
    assert verdict == "memory unknown for worker_2 (the others <= 2.00 GB/node)"
    assert "peak_gb=- steady_gb=-" in bench_gpu.summary_line([s])  # a maximum over some nodes is no figure
    over = [(105.0, {"worker_1": int(3.5 * GB), "worker_2": None})]
    s = bench_gpu.summarize("shipped", 4, metrics, node_samples=over)
    assert bench_gpu.memory_verdict(s) == "memory 3.50 GB/node > 3 GB: MISSED (unknown for worker_2)"


def test_summary_line_format():
    rows = [_row(workers=1, period=1.0, peak_gb=1.0),
            _row("fp32", period=2.0, peak_gb=2.5),
            _row(period=1.5, peak_gb=2.345, steady_gb=2.04)]
    line = bench_gpu.summary_line(rows)
    assert line == "summary: hours_2000=0.83 peak_gb=2.3 steady_gb=2.0"  # the shipped 4-worker row
    assert re.fullmatch(r"summary: hours_2000=(\d+\.\d\d|-) peak_gb=(\d+\.\d|-) steady_gb=(\d+\.\d|-)", line)
    # no shipped 4-worker row: the first 4-worker row; none at all: the first row
    assert bench_gpu.summary_line(rows[:2]) == "summary: hours_2000=1.11 peak_gb=2.5 steady_gb=-"
    assert bench_gpu.summary_line(rows[:1]) == "summary: hours_2000=0.56 peak_gb=1.0 steady_gb=-"
    failed = bench_gpu.RunSummary("shipped", 4, error="timed out after 240 s")
    assert bench_gpu.summary_line([failed]) == "summary: hours_2000=- peak_gb=- steady_gb=-"
    assert bench_gpu.summary_line([]) == "summary: hours_2000=- peak_gb=- steady_gb=-"


EXPECTED_LEVERS = {
    "shipped": (),
    "fp32": ("model.dtype=float32", "model.autocast=none", "sapo.optimizer=adam"),
    "mixed": ("model.dtype=float32", "model.autocast=bfloat16", "sapo.optimizer=adam"),
    "bf16-adam": ("sapo.optimizer=adam",),
    "eager": ("sapo.compile_generate=false",),
    "no-micro-batch": ("sapo.micro_batch_tokens=0", "sapo.micro_batch_size=0"),
    "no-checkpointing": ("sapo.gradient_checkpointing=false",),
    "eager-attn": ("model.attn_implementation=eager",),
    "no-warmup": ("sapo.warmup=false",),
    "slow-poll": ("coordinator.poll_interval_s=1.0",),
    "mps": (),
}


def test_lever_overrides_per_label():
    assert {name: lever.sets for name, lever in bench_gpu.LEVERS.items()} == EXPECTED_LEVERS
    assert [name for name, lever in bench_gpu.LEVERS.items() if lever.mps] == ["mps"]
    what_runs = [(lever.sets, lever.mps) for lever in bench_gpu.LEVERS.values()]
    assert len(set(what_runs)) == len(what_runs)  # no two labels run the same setup
    assert all(lever.sets for name, lever in bench_gpu.LEVERS.items() if name not in ("shipped", "mps"))


@pytest.mark.parametrize("label", [name for name in EXPECTED_LEVERS if name != "shipped"])
def test_each_lever_resolves_to_its_overrides(tmp_path, label):
    """The nodes accept every lever's overrides, and the resolved settings show them (what actually runs)."""
    args = bench_gpu.parse_args([])
    settings = bench_gpu.resolved_settings(bench_gpu.DEFAULT_CONFIG, bench_gpu.run_overrides(args, 4, label, tmp_path))
    for item in bench_gpu.LEVERS[label].sets:
        assert item in settings.split()
    shipped = bench_gpu.resolved_settings(bench_gpu.DEFAULT_CONFIG,
                                          bench_gpu.run_overrides(args, 4, "shipped", tmp_path))
    assert settings != shipped or label == "mps"  # every lever changes what runs


def test_every_run_trains_on_a_task_random_text_can_score_on(tmp_path):
    from node.config import resolve_config

    args = bench_gpu.parse_args([])
    config = resolve_config(bench_gpu.DEFAULT_CONFIG, overrides=bench_gpu.run_overrides(args, 4, "shipped", tmp_path))
    assert [t.name for t in config.sapo.tasks] == ["toy_copy"]
    mine = resolve_config(bench_gpu.DEFAULT_CONFIG, overrides=bench_gpu.run_overrides(
        bench_gpu.parse_args(["--set", "sapo.tasks=[{name: basic_arithmetic}]"]), 4, "shipped", tmp_path))
    assert [t.name for t in mine.sapo.tasks] == ["basic_arithmetic"]  # the user's --set wins


def test_rounds_that_did_not_train_are_counted_and_flagged():
    metrics = {"worker_1": [{"round": r, "timestamp": 100.0 + r, "timings": {"round_s": 1.0},
                             "optimizer_steps": 1 if r == 3 else 0} for r in range(5)]}
    row = bench_gpu.summarize("shipped", 1, metrics)
    assert row.trained_fraction == pytest.approx(0.25)
    assert any("only 25% of rounds trained" in line for line in bench_gpu.verdicts([row]))


def test_argument_parsing():
    assert bench_gpu.parse_workers("1,2,4,8") == [1, 2, 4, 8]
    with pytest.raises(Exception):
        bench_gpu.parse_workers("1,x")
    assert bench_gpu.parse_levers("fp32,bf16-adam") == ["shipped", "fp32", "bf16-adam"]
    assert bench_gpu.parse_levers("baseline,eager") == ["shipped", "eager"]  # the old name still works
    assert bench_gpu.parse_levers("all") == list(bench_gpu.LEVERS)
    with pytest.raises(Exception, match="unknown lever"):
        bench_gpu.parse_levers("turbo")
    args = bench_gpu.parse_args(["--levers"])
    assert bench_gpu.planned_runs(args) == [(4, name) for name in bench_gpu.LEVERS]
    args = bench_gpu.parse_args(["--workers", "2,4"])
    assert bench_gpu.planned_runs(args) == [(2, "shipped"), (4, "shipped")]
    assert args.rounds == 20 and args.timeout == 1800 and args.model == "builtin:gpt2-124m"


def test_quick_plan():
    args = bench_gpu.parse_args(["--quick"])
    assert bench_gpu.planned_runs(args) == [(4, "shipped")]
    assert (args.rounds, args.skip_rounds, args.timeout) == (8, 1, 240)
    assert args.model == "builtin:gpt2-124m" and args.max_new_tokens == 256 and args.device == "cuda"
    assert bench_gpu.planned_runs(bench_gpu.parse_args(["--quick", "--levers"])) == [(4, "shipped"), (4, "eager")]
    assert bench_gpu.planned_runs(bench_gpu.parse_args(["--quick", "--levers", "mixed"])) == [(4, "shipped"), (4, "mixed")]
    args = bench_gpu.parse_args(["--quick", "--rounds", "5", "--timeout", "100"])  # explicit values win
    assert (args.rounds, args.timeout) == (5, 100)


def test_dir_is_created_or_refused(tmp_path, capsys):
    missing = tmp_path / "a" / "b"
    args = bench_gpu.parse_args(["--quick", "--dir", str(missing)])
    assert missing.is_dir() and args.dir == missing
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as exc:
        bench_gpu.parse_args(["--dir", str(a_file)])
    assert exc.value.code == 2
    assert f"--dir {a_file} exists and is not a directory" in capsys.readouterr().err


def test_cpu_defaults_and_restrictions(tmp_path, capsys):
    args = bench_gpu.parse_args(["--device", "cpu", "--quick"])
    assert args.model == "builtin:tiny-gpt2" and args.max_new_tokens == 16
    assert "supervisor.device=cpu" in bench_gpu.run_overrides(args, 4, "shipped", tmp_path)
    args = bench_gpu.parse_args(["--device", "cpu", "--model", "builtin:gpt2-124m", "--max-new-tokens", "32"])
    assert args.model == "builtin:gpt2-124m" and args.max_new_tokens == 32  # explicit values win
    assert "mps" not in bench_gpu.parse_args(["--device", "cpu", "--levers"]).levers  # a bare --levers skips it
    with pytest.raises(SystemExit) as exc:
        bench_gpu.parse_args(["--device", "cpu", "--levers", "fp32,mps"])
    assert exc.value.code == 2
    assert "--device cpu: lever(s) mps need a GPU" in capsys.readouterr().err


def test_run_overrides_are_the_issue_workload(tmp_path):
    args = bench_gpu.parse_args(["--set", "sapo.max_prompt_tokens=512"])
    sets = bench_gpu.run_overrides(args, 4, "eager", tmp_path)
    for item in ("sapo.num_train_samples=2", "sapo.num_transplant_trees=2", "sapo.num_generations=4",
                 "sapo.max_new_tokens=256", "model.name=builtin:gpt2-124m", "supervisor.workers=4",
                 "supervisor.device=cuda", "experiment.max_rounds=20", "sapo.compile_generate=false",
                 "sapo.max_prompt_tokens=512", f"experiment.root={tmp_path / 'shared'}"):
        assert item in sets
    # every override is a valid config for the nodes too
    from node.config import resolve_config

    config = resolve_config(bench_gpu.DEFAULT_CONFIG, environ={}, overrides=sets)
    assert config.sapo.compile_generate is False and config.supervisor.workers == 4


def test_bad_override_is_refused_before_any_run(capsys):
    assert bench_gpu.main(["--dry-run", "--set", "sapo.no_such_field=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench_gpu: bad override for shipped, N=1")


def test_dry_run_prints_the_commands():
    out = subprocess.run([sys.executable, "scripts/bench_gpu.py", "--dry-run", "--levers", "mps"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    launches = [x for x in lines if "supervisor.cli launch" in x]
    assert len(launches) == 2  # shipped + mps
    assert all("SWARM_RUNTIME_DIR=" in x and "--set sapo.max_new_tokens=256" in x for x in launches)
    assert "nvidia-cuda-mps-control -d" in lines and "echo quit | nvidia-cuda-mps-control" in lines
    assert sum("resolved: model.dtype=" in x for x in lines) == 2


def test_no_cuda_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(bench_gpu, "cuda_problem", lambda: "no CUDA device (torch.cuda.is_available() is False)")
    assert bench_gpu.main(["--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench_gpu: no CUDA device")


def test_summary_is_the_last_stdout_line(monkeypatch, capsys, tmp_path):
    """main with the swarm runs faked: table, then the summary line last."""
    calls = []

    def fake_run_one(args, workers, label, nvml):
        calls.append((workers, label, args.rounds, args.timeout))
        return _row(label, workers, period=2.7, peak_gb=None)

    monkeypatch.setattr(bench_gpu, "run_one", fake_run_one)
    assert bench_gpu.main(["--device", "cpu", "--quick", "--dir", str(tmp_path)]) == 0
    assert calls == [(4, "shipped", 8, 240)]
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "summary: hours_2000=1.50 peak_gb=- steady_gb=-"
    assert any(x.startswith("shipped ") for x in out)
    assert "  shipped N=4: time 1.50 h > 1 h: MISSED; memory unknown (NVML gave no per-process figure)" in out


@pytest.mark.slow
def test_bench_gpu_quick_on_cpu(tmp_path):
    """A real (tiny, CPU) `swarm launch` driven by the script: status sampling, metrics, the table, the summary."""
    out = subprocess.run([sys.executable, "scripts/bench_gpu.py", "--device", "cpu", "--quick",
                          "--dir", str(tmp_path / "new"), "--json", str(tmp_path / "runs.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    row = next(x for x in lines if x.startswith("shipped"))
    assert "FAILED" not in row and "incomplete" not in out.stdout
    assert re.fullmatch(r"summary: hours_2000=\d+\.\d\d peak_gb=- steady_gb=-", lines[-1])  # no NVML on a CPU
    record = json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[0])
    assert record["label"] == "shipped" and record["workers"] == 4
    assert record["rounds_measured"] == 7 and record["exit_code"] == 0 and record["period_s"] > 0
    assert "--set supervisor.device=cpu" in record["command"] and "model.name=builtin:tiny-gpt2" in record["command"]


# --------------------------------------------------------------------------- bench_overhead

def _overhead_metrics():
    return {"worker_1": [
        {"round": r, "timestamp": 50.0 + r, "tokens_generated": 100 + r, "timings": {"round_s": 0.4, "generate_s": 0.3}}
        for r in range(5)]}


def test_overhead_swarm_side_and_ratio():
    swarm = bench_overhead.swarm_side("swarm", _overhead_metrics(), launch_wall=40.0, end_wall=60.0, skip_rounds=1)
    assert swarm.startup_s == pytest.approx(49.6 - 40.0)
    assert swarm.wall_s == pytest.approx(20.0)
    assert swarm.per_round_s == pytest.approx(1.0)  # rounds 1..4 end at 51..54, round 0 at 50
    assert swarm.compute_round_s == pytest.approx(0.4)
    assert swarm.phases == {"generate_s": pytest.approx(0.3)}
    single = bench_overhead.Side("one process", per_round_s=0.8, compute_round_s=0.8,
                                 tokens={("worker_1", r): 100 + r for r in range(5)})
    assert bench_overhead.ratio(swarm, single) == pytest.approx(1.25)
    assert bench_overhead.same_work(swarm, single).startswith("yes")
    single.tokens[("worker_1", 3)] = 7
    assert bench_overhead.same_work(swarm, single).startswith("NO")
    table = bench_overhead.format_variant("t", single, [swarm])
    assert "1.25x" in table and "MISSED" in table and "+200" in table


@pytest.mark.slow
def test_bench_overhead_runs_on_cpu():
    out = subprocess.run([sys.executable, "scripts/bench_overhead.py", "--variant", "one", "--rounds", "3",
                          "--max-new-tokens", "8", "--polls", "0.1", "--repeat", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "same work: yes" in out.stdout
    assert "ratio per round vs one process" in out.stdout
    summary = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"summary: ratio_1w=\d+\.\d\dx ratio_2w=NA switch_p50_ms=\d+ switch_p99_ms=\d+ "
                        r"startup_s=\d+\.\d", summary), summary


def test_bench_overhead_summary_line():
    single = bench_overhead.Side("one process", per_round_s=0.2)
    swarm = bench_overhead.Side("swarm", per_round_s=0.21, startup_s=4.25, switch_ms=[5.0, 6.0, 7.0, 90.0])
    two = bench_overhead.Side("swarm", per_round_s=0.3, startup_s=5.0, switch_ms=[8.0])
    line = bench_overhead.summary_line({1: (single, swarm), 2: (bench_overhead.Side("one", per_round_s=0.4), two)})
    assert line == "summary: ratio_1w=1.05x ratio_2w=0.75x switch_p50_ms=7 switch_p99_ms=90 startup_s=4.2"
    assert bench_overhead.summary_line({}) == ("summary: ratio_1w=NA ratio_2w=NA switch_p50_ms=NA switch_p99_ms=NA "
                                               "startup_s=NA")


@pytest.mark.slow
def test_bench_trl_runs_when_trl_is_installed():
    pytest.importorskip("trl")  # the bench extra; CI does not install it
    out = subprocess.run([sys.executable, "scripts/bench_trl.py", "--rounds", "2", "--max-new-tokens", "8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "ratio (ours / TRL)" in out.stdout


def test_bench_exchange_prints_the_exchange_and_the_cost_of_signing(capsys):
    """The exchange table, then the signing comparison: without/with a key side by side, the signature work
    alone as a % of the exchange against the 5 % goal (tiny sizes: the plumbing, not the figures)."""
    bench_exchange = _load("bench_exchange")
    assert bench_exchange.main(["--peers", "2", "3", "--rounds", "2", "--sign-peers", "4"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["2", "3"] and all(float(x) > 0 for r in rows for x in r[1:])
    m = re.search(r"signing at 4 peers .*without a key ([0-9.]+), with a key ([0-9.]+) \(paired difference "
                  r"[-+][0-9.]+ %\)", out)
    assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, out
    m = re.search(r"verify 4 files\): ([0-9.]+) ms = ([0-9.]+) % of the exchange \(goal < 5 %: (OK|OVER)\)", out)
    assert m and float(m.group(1)) > 0, out


def test_bench_exchange_signed_files_verify_and_unsigned_ones_are_refused(tmp_path):
    """The signed side of the comparison really signs: its peers' files verify with its key, and a store
    with that key refuses the unsigned side's files."""
    bench_exchange = _load("bench_exchange")
    signed = bench_exchange.Exchange(tmp_path, 3, 1, 2, b"k" * 32, "-signed")
    plain = bench_exchange.Exchange(tmp_path, 3, 1, 2, None, "-plain")
    signed.round(0, signed.prepare(0))
    plain.prepare(0)
    crypto_ms, context_ms = signed.signature_ms(0, bench_exchange.make_file("worker_0", 0, 1, 2, signed.rng).to_json())
    assert crypto_ms > 0 and context_ms > 0  # every file of the round verified (SignatureError otherwise)
    path = signed.layout.rollout_file(0, 0, "worker_1")
    assert signed.store.read_as(path, lambda obj: obj)["peer_id"] == "worker_1"
    path.write_bytes(plain.layout.rollout_file(0, 0, "worker_1").read_bytes())
    assert signed.store.read_as(path, lambda obj: obj) is None and signed.store.rejected["unsigned"] == 1


def test_split_experiment_arguments_and_plan():
    """scripts/run_split_experiment.py: both split-tasks configs x 3 seeds by default, seeds outermost, each run
    its own experiment (seed, name, root overrides after the user's --set); bad seeds refused."""
    split = _load("run_split_experiment")
    args = split.parse_args([])
    assert args.seeds == [42, 1, 2] and args.root == "./runs/split-tasks" and not args.dry_run
    assert [c.name for c in split.DEFAULT_CONFIGS] == ["split-tasks-j0.yaml", "split-tasks-j2.yaml"]
    args = split.parse_args(["--seeds", "7", "8", "--set", "experiment.max_rounds=5", "--root", "/tmp/x"])
    names = {Path("a.yaml"): "split-a", Path("b.yaml"): "split-b"}
    runs = split.plan(args, names)
    assert [(r.config.name, r.seed, r.name) for r in runs] == [
        ("a.yaml", 7, "split-a-seed7"), ("b.yaml", 7, "split-b-seed7"),
        ("a.yaml", 8, "split-a-seed8"), ("b.yaml", 8, "split-b-seed8")]
    assert runs[1].overrides == ("experiment.max_rounds=5", "experiment.seed=7", "experiment.name=split-b-seed7",
                                 "experiment.root=/tmp/x")
    assert split.launch_command(runs[0])[:3] == ["swarm", "launch", "a.yaml"]
    for bad in (["--seeds", "1", "1"], ["--seeds", "-1"], ["--report-only", "--no-report"], ["--fresh", "--resume"]):
        with pytest.raises(SystemExit) as exc:
            split.parse_args(bad)
        assert exc.value.code == 2


def test_split_experiment_dry_run_prints_the_commands(tmp_path):
    """--dry-run resolves the shipped configs with the overrides, prints one `swarm launch` per (config, seed)
    and the `swarm report` over their directories, and runs or writes nothing."""
    out = subprocess.run([sys.executable, "scripts/run_split_experiment.py", "--dry-run", "--seeds", "5", "6",
                          "--root", str(tmp_path / "root"), "--report-dir", str(tmp_path / "rep")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    launches = [x for x in lines if x.startswith("$ swarm launch ")]
    assert len(launches) == 4 and "configs/split-tasks-j0.yaml" in launches[0] and "split-tasks-j2.yaml" in launches[1]
    assert "--set experiment.seed=6 --set experiment.name=split-tasks-j2-seed6" in launches[3]
    report = [x for x in lines if x.startswith("$ swarm report ")]
    assert len(report) == 1 and report[0].endswith(f"--out {tmp_path / 'rep'}")
    assert str(tmp_path / "root" / "experiments" / "split-tasks-j0-seed5") in report[0]
    assert list(tmp_path.iterdir()) == []
    bad = subprocess.run([sys.executable, "scripts/run_split_experiment.py", "--dry-run", "--set", "sapo.nope=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "configuration error" in bad.stderr
