"""The benchmark scripts' arithmetic on fake metrics, their command lines, and (slow) their plumbing on a CPU.

scripts/bench_gpu.py needs a GPU to mean anything; here its table and projections are checked on made-up
metrics lines, its --dry-run and no-CUDA exit are checked, and one tiny CPU run checks that it can drive
`swarm launch`, sample status.json and read the metrics back. scripts/bench_overhead.py likewise.
"""

from __future__ import annotations

import importlib.util
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
    s = bench_gpu.summarize("baseline", 2, metrics, skip_rounds=1, launch_wall=80.0, node_samples=nodes,
                            device_samples=device, util_samples=util)
    assert s.rounds_measured == 4
    assert s.startup_s == pytest.approx(91.0 - 80.0)  # worker_2 started round 0 at 101 - 10
    assert s.round_s == pytest.approx(3.25)  # median of four 3.0 and four 3.5
    assert s.period_s == pytest.approx(4.0)
    # worker_1: 4 x 1024 tokens in 4 x 1 s; worker_2: 4 x 1024 in 4 x 2 s
    assert s.gen_tokens_per_s == pytest.approx(1024 + 512)
    # 8 x 1024 tokens between the end of round 0 (t=100, worker_1) and the last line (t=117)
    assert s.swarm_tokens_per_s == pytest.approx(8 * 1024 / 17.0)
    assert s.projected_hours == pytest.approx(2000 * 4.0 / 3600)
    assert s.nvml_peak_bytes == int(4.0 * GB)  # the warm-up sample counts for the whole-run peak
    assert s.nvml_steady_bytes == int(2.5 * GB)  # but not for the measured rounds
    assert s.per_worker_peak_bytes == {"worker_1": int(4.0 * GB), "worker_2": int(2.2 * GB)}
    assert s.torch_peak_bytes == int(1.2 * GB)  # round 0 (1.5 GB) is not measured
    assert s.device_peak_bytes == int(6.5 * GB)
    assert s.util_percent == pytest.approx(85.0)


def test_summarize_without_samples_or_lines():
    s = bench_gpu.summarize("x", 4, {"worker_1": []})
    assert s.rounds_measured == 0 and s.period_s is None and s.projected_hours is None
    assert s.nvml_peak_bytes is None and s.gen_tokens_per_s is None


def test_projection_and_anchor_arithmetic():
    assert bench_gpu.projected_hours(3.6) == pytest.approx(2.0)
    assert bench_gpu.projected_hours(37.8) == pytest.approx(21.0)  # the seeds' pace: 37.8 s per round
    assert bench_gpu.projected_hours(None) is None


def test_table_has_anchors_targets_and_verdicts():
    fast = bench_gpu.RunSummary("baseline", 4, rounds_measured=19, period_s=3.0, round_s=2.8,
                                projected_hours=bench_gpu.projected_hours(3.0), nvml_peak_bytes=int(2.1 * GB))
    slow = bench_gpu.RunSummary("fp32", 4, rounds_measured=19, period_s=5.0,
                                projected_hours=bench_gpu.projected_hours(5.0), nvml_peak_bytes=int(3.4 * GB))
    one = bench_gpu.RunSummary("baseline", 1, rounds_measured=19, period_s=2.0,
                               projected_hours=bench_gpu.projected_hours(2.0), nvml_peak_bytes=int(2.0 * GB))
    failed = bench_gpu.RunSummary("mps", 4, error="CUDA MPS could not be started: not found")
    table = bench_gpu.format_table([one, fast, slow, failed])
    lines = table.splitlines()
    assert lines[0].startswith("config") and "2000 rounds h" in lines[0] and "NVML peak GB" in lines[0]
    assert "1.67" in lines[2] and "12.6x" in lines[2]  # 2000 x 3 s = 1.67 h; 21 / 1.67 = 12.6
    assert "mps" in lines[4] and "FAILED: CUDA MPS could not be started" in lines[4]
    assert "21 h for 2000 rounds, 6.5 GB per node" in table
    assert "<= 2 h for 2000 rounds with 4 workers; <= 3 GB per training node" in table
    assert "baseline N=4: time 1.67 h <= 2 h: MET; memory 2.10 GB/node <= 3 GB: MET" in table
    assert "fp32 N=4: time 2.78 h > 2 h: MISSED; memory 3.40 GB/node > 3 GB: MISSED" in table
    assert "baseline N=1: memory 2.00 GB/node <= 3 GB: MET" in table  # no time verdict below 4 workers


def test_argument_parsing():
    assert bench_gpu.parse_workers("1,2,4,8") == [1, 2, 4, 8]
    with pytest.raises(Exception):
        bench_gpu.parse_workers("1,x")
    assert bench_gpu.parse_levers("fp32,compile") == ["baseline", "fp32", "compile"]
    with pytest.raises(Exception, match="unknown lever"):
        bench_gpu.parse_levers("turbo")
    args = bench_gpu.parse_args(["--levers"])
    assert bench_gpu.planned_runs(args) == [(4, name) for name in bench_gpu.LEVERS]
    args = bench_gpu.parse_args(["--workers", "2,4"])
    assert bench_gpu.planned_runs(args) == [(2, "baseline"), (4, "baseline")]


def test_run_overrides_are_the_issue_workload(tmp_path):
    args = bench_gpu.parse_args(["--set", "sapo.micro_batch_size=8"])
    sets = bench_gpu.run_overrides(args, 4, "compile", tmp_path)
    for item in ("sapo.num_train_samples=2", "sapo.num_transplant_trees=2", "sapo.num_generations=4",
                 "sapo.max_new_tokens=256", "model.name=builtin:gpt2-124m", "supervisor.workers=4",
                 "supervisor.device=cuda", "experiment.max_rounds=20", "sapo.compile_generate=true",
                 "sapo.micro_batch_size=8", f"experiment.root={tmp_path / 'shared'}"):
        assert item in sets
    # every override is a valid config for the nodes too
    from node.config import resolve_config

    config = resolve_config(bench_gpu.DEFAULT_CONFIG, environ={}, overrides=sets)
    assert config.sapo.compile_generate and config.supervisor.workers == 4


def test_dry_run_prints_the_commands():
    out = subprocess.run([sys.executable, "scripts/bench_gpu.py", "--dry-run", "--levers", "mps"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    launches = [x for x in lines if "supervisor.cli launch" in x]
    assert len(launches) == 2  # baseline + mps
    assert all("SWARM_RUNTIME_DIR=" in x and "--set sapo.max_new_tokens=256" in x for x in launches)
    assert "nvidia-cuda-mps-control -d" in lines and "echo quit | nvidia-cuda-mps-control" in lines


def test_no_cuda_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(bench_gpu, "cuda_problem", lambda: "no CUDA device (torch.cuda.is_available() is False)")
    assert bench_gpu.main(["--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench_gpu: no CUDA device")


@pytest.mark.slow
def test_bench_gpu_plumbing_on_cpu(tmp_path):
    """A real (tiny, CPU) `swarm launch` driven by the script: status sampling, metrics, the table."""
    out = subprocess.run([sys.executable, "scripts/bench_gpu.py", "--device", "cpu", "--model", "builtin:tiny-gpt2",
                          "--workers", "1", "--rounds", "3", "--max-new-tokens", "8", "--dir", str(tmp_path),
                          "--json", str(tmp_path / "runs.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr
    row = next(x for x in out.stdout.splitlines() if x.startswith("baseline"))
    assert "FAILED" not in row
    import json

    record = json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[0])
    assert record["rounds_measured"] == 2 and record["exit_code"] == 0 and record["period_s"] > 0


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


@pytest.mark.slow
def test_bench_trl_runs_when_trl_is_installed():
    pytest.importorskip("trl")  # the bench extra; CI does not install it
    out = subprocess.run([sys.executable, "scripts/bench_trl.py", "--rounds", "2", "--max-new-tokens", "8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "ratio (ours / TRL)" in out.stdout
