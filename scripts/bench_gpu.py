#!/usr/bin/env python
"""GPU benchmark: the real supervised swarm (1 coordinator + N GPT-2 workers on cuda:0), timed and measured.

    python scripts/bench_gpu.py                                  # N = 1, 2, 4, 8; 20 rounds each
    python scripts/bench_gpu.py --workers 4 --rounds 30 --model openai-community/gpt2
    python scripts/bench_gpu.py --levers                         # each lever alone, N = 4 (--lever-workers)
    python scripts/bench_gpu.py --levers fp32,compile --rounds 10
    python scripts/bench_gpu.py --dry-run --levers               # print the swarm commands, run nothing

For each N (and each lever configuration with --levers) it runs `swarm launch` as a subprocess on a base
config (default configs/gpt2-5node-a100-2loc2ext.yaml) with `--set` overrides into a temporary experiment
root: I=2, J=2, G=4, max_new_tokens=256, model builtin:gpt2-124m (GPT-2 small's shape, random weights, no
download), --rounds rounds. While it runs it samples the supervisor's status.json (NVML memory per node
process, CUDA context included; monitor interval 0.5 s) and the device's used memory (pynvml). Afterwards
it reads every worker's metrics.jsonl and prints one row per run:

  start-up s       launch -> the last worker starts its first round (model load, CUDA init, warm-up)
  round s/worker   median of the workers' timings.round_s (generate + exchange + train), rounds after
                   the first --skip-rounds (default 1: warm-up/compilation excluded)
  period s/round   median wall time between a worker's consecutive metrics lines: the swarm's pace,
                   including the coordinator's round switch (poll interval)
  gen tok/s        sum over workers of tokens_generated / generate time (decoding throughput)
  swarm tok/s      every worker's generated tokens / the measured wall span (end-to-end)
  NVML peak GB     the largest process (worker) seen by NVML during the whole run, warm-up included
  NVML steady GB   the same, sampled only during the measured rounds
  torch peak GB    the largest gpu_peak_bytes (torch.cuda.max_memory_allocated) of a metrics line
  device GB        the device's used memory at its highest (all processes; MPS server included)
  util %           mean GPU utilisation (NVML) during the measured rounds
  2000 rounds h    2000 x period / 3600, next to the seeds' 21 h
GB = 10^9 bytes, as in the anchors.

Anchors (the seeds: 1 coordinator + 4 GPT-2 workers on one A100 80GB): 21 h for 2000 rounds, about 6.5 GB
of GPU memory per node. Targets: <= 2 h for 2000 rounds with 4 workers; <= 3 GB per training node.

Levers (--levers, each alone on top of the defaults, which are the baseline; --set applies to every run):
  baseline    model.dtype auto (bfloat16 on an A100/H100), SDPA attention (transformers 5's default for
              GPT-2), one batched generate per round, dynamic KV cache, warm-up on (auto on CUDA),
              no gradient checkpointing (never enabled), staggered start (always)
  fp32        model.dtype=float32
  mixed       model.dtype=float32 + model.autocast=bfloat16: float32 weights and Adam state, forward passes
              (generate, loss) under bfloat16 autocast. Pure bfloat16 weights round most lr-1e-5 Adam
              updates away (docs/PERFORMANCE.md); this is the precision-safe way to use bfloat16
  eager-attn  model.attn_implementation=eager (the non-SDPA attention, to see what SDPA buys)
  compile     sapo.compile_generate=true: static KV cache + transformers' torch.compile of decoding
  micro-batch-4  sapo.micro_batch_size=4: the (I+J)*G = 16 sequences' loss/backward in 4 micro-batches
              with gradient accumulation (activations and logits are most of a round's peak memory)
  no-warmup   sapo.warmup=false (start-up time and peak memory without the worst-case warm-up)
  fast-poll   coordinator.poll_interval_s=0.1 (the default 1 s poll adds up to ~1 s between rounds)
  mps         CUDA MPS: this script starts `nvidia-cuda-mps-control -d` with its own pipe/log directories
              for the run and stops it afterwards (the supervisor has no MPS option)

Exit codes: 0 done (rows that failed say so), 2 no CUDA device (one line) or a bad argument.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "gpt2-5node-a100-2loc2ext.yaml"
GB = 1e9

ANCHOR_HOURS = 21.0  # the seeds: 2000 rounds, 1 coordinator + 4 workers, A100 80GB
ANCHOR_GB_PER_NODE = 6.5
TARGET_HOURS = 2.0  # with 4 workers
TARGET_GB_PER_NODE = 3.0
PROJECT_ROUNDS = 2000

# name -> (--set overrides, start CUDA MPS, what it changes)
LEVERS: dict[str, tuple[tuple[str, ...], bool, str]] = {
    "baseline": ((), False, "defaults: dtype auto (bf16), SDPA, warm-up on, dynamic KV cache"),
    "fp32": (("model.dtype=float32",), False, "float32 weights instead of bfloat16"),
    "mixed": (("model.dtype=float32", "model.autocast=bfloat16"), False,
              "float32 weights + Adam, bfloat16 autocast forward passes"),
    "eager-attn": (("model.attn_implementation=eager",), False, "eager attention instead of SDPA"),
    "compile": (("sapo.compile_generate=true",), False, "static KV cache + torch.compile'd decoding"),
    "micro-batch-4": (("sapo.micro_batch_size=4",), False, "loss/backward 4 sequences at a time (less memory)"),
    "no-warmup": (("sapo.warmup=false",), False, "no worst-case warm-up at start-up"),
    "fast-poll": (("coordinator.poll_interval_s=0.1",), False, "coordinator/worker poll 0.1 s instead of 1 s"),
    "mps": ((), True, "CUDA MPS daemon started for the run"),
}


# --------------------------------------------------------------------------- the maths (tested on fake metrics)

@dataclass
class RunSummary:
    """One run's figures; None where nothing was measured."""

    label: str
    workers: int
    rounds_measured: int = 0
    startup_s: float | None = None
    round_s: float | None = None
    period_s: float | None = None
    gen_tokens_per_s: float | None = None
    swarm_tokens_per_s: float | None = None
    nvml_peak_bytes: int | None = None
    nvml_steady_bytes: int | None = None
    torch_peak_bytes: int | None = None
    device_peak_bytes: int | None = None
    util_percent: float | None = None
    projected_hours: float | None = None
    per_worker_peak_bytes: dict = field(default_factory=dict)
    error: str = ""


def projected_hours(period_s: float | None, rounds: int = PROJECT_ROUNDS) -> float | None:
    """Hours for ``rounds`` rounds at one round per ``period_s`` seconds."""
    return None if period_s is None else rounds * period_s / 3600.0


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(label: str, workers: int, metrics: dict[str, list[dict]], *, skip_rounds: int = 1,
              launch_wall: float | None = None, node_samples: list[tuple[float, dict]] = (),
              device_samples: list[tuple[float, int]] = (), util_samples: list[tuple[float, int]] = ()) -> RunSummary:
    """The figures of one run from its workers' metrics lines and the memory samples taken meanwhile.

    ``metrics``: worker id -> its metrics lines (dicts with round, timestamp, timings, tokens_generated,
    gpu_peak_bytes). Rounds below ``skip_rounds`` (warm-up, compilation) are not measured. ``node_samples``:
    (wall time, {node id: NVML bytes or None}); ``device_samples``/``util_samples``: (wall time, value).
    """
    s = RunSummary(label=label, workers=workers)
    lines = {w: sorted((m for m in ms if isinstance(m.get("round"), int)), key=lambda m: m["round"])
             for w, ms in metrics.items()}
    measured = {w: [m for m in ms if m["round"] >= skip_rounds] for w, ms in lines.items()}
    s.rounds_measured = min((len(ms) for ms in measured.values()), default=0)
    starts = [ms[0]["timestamp"] - ms[0]["timings"]["round_s"] for ms in lines.values() if ms]
    if launch_wall is not None and starts and len(starts) == len(lines):
        s.startup_s = max(starts) - launch_wall
    s.round_s = _median(m["timings"].get("round_s") for ms in measured.values() for m in ms)

    # The measured span of a worker: from the end of its last skipped round (or the start of its first
    # measured one) to its last line.
    periods, span_start, span_end, tokens = [], [], [], 0
    gen_rates = []
    for w, ms in measured.items():
        if not ms:
            continue
        before = [m for m in lines[w] if m["round"] < skip_rounds]
        t0 = before[-1]["timestamp"] if before else ms[0]["timestamp"] - ms[0]["timings"]["round_s"]
        stamps = [t0] + [m["timestamp"] for m in ms]
        periods += [b - a for a, b in zip(stamps, stamps[1:])]
        span_start.append(t0)
        span_end.append(ms[-1]["timestamp"])
        tok = sum(m.get("tokens_generated", 0) for m in ms)
        gen_s = sum(m["timings"].get("generate_s", 0.0) for m in ms)
        tokens += tok
        if gen_s > 0:
            gen_rates.append(tok / gen_s)
    s.period_s = _median(periods)
    s.gen_tokens_per_s = sum(gen_rates) if gen_rates else None
    if span_start and max(span_end) > min(span_start):
        s.swarm_tokens_per_s = tokens / (max(span_end) - min(span_start))
    s.projected_hours = projected_hours(s.period_s)

    torch_peaks = [m.get("gpu_peak_bytes") for ms in measured.values() for m in ms]
    torch_peaks = [p for p in torch_peaks if isinstance(p, int)]
    s.torch_peak_bytes = max(torch_peaks) if torch_peaks else None

    workers_ids = set(metrics)
    measure_from = min(span_start) if span_start else None
    peak_all, peak_steady = {}, {}
    for t, nodes in node_samples:
        for node, used in nodes.items():
            if used is None or (workers_ids and node not in workers_ids):
                continue
            peak_all[node] = max(peak_all.get(node, 0), used)
            if measure_from is not None and t >= measure_from:
                peak_steady[node] = max(peak_steady.get(node, 0), used)
    s.per_worker_peak_bytes = dict(sorted(peak_all.items()))
    s.nvml_peak_bytes = max(peak_all.values()) if peak_all else None
    s.nvml_steady_bytes = max(peak_steady.values()) if peak_steady else None
    s.device_peak_bytes = max((b for _, b in device_samples), default=None)
    utils = [u for t, u in util_samples if u is not None and (measure_from is None or t >= measure_from)]
    s.util_percent = sum(utils) / len(utils) if utils else None
    return s


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


COLUMNS = [
    ("config", 13, lambda r: r.label),
    ("N", 3, lambda r: str(r.workers)),
    ("start-up s", 10, lambda r: _fmt(r.startup_s, ".1f")),
    ("round s/worker", 14, lambda r: _fmt(r.round_s, ".2f")),
    ("period s/round", 14, lambda r: _fmt(r.period_s, ".2f")),
    ("gen tok/s", 10, lambda r: _fmt(r.gen_tokens_per_s, ".0f")),
    ("swarm tok/s", 11, lambda r: _fmt(r.swarm_tokens_per_s, ".0f")),
    ("NVML peak GB", 12, lambda r: _fmt(r.nvml_peak_bytes, ".2f", GB)),
    ("NVML steady GB", 14, lambda r: _fmt(r.nvml_steady_bytes, ".2f", GB)),
    ("torch peak GB", 13, lambda r: _fmt(r.torch_peak_bytes, ".2f", GB)),
    ("device GB", 9, lambda r: _fmt(r.device_peak_bytes, ".1f", GB)),
    ("util %", 6, lambda r: _fmt(r.util_percent, ".0f")),
    ("2000 rounds h", 13, lambda r: _fmt(r.projected_hours, ".2f")),
    ("vs 21 h", 7, lambda r: "-" if not r.projected_hours else f"{ANCHOR_HOURS / r.projected_hours:.1f}x"),
]


def format_table(rows: list[RunSummary]) -> str:
    """The results table, the anchors and targets under it, and one verdict line per 4-worker row."""
    out = ["  ".join(f"{name:>{w}}" if i else f"{name:<{w}}" for i, (name, w, _) in enumerate(COLUMNS))]
    for r in rows:
        if r.error and r.rounds_measured == 0:
            out.append(f"{r.label:<{COLUMNS[0][1]}}  {r.workers:>3}  FAILED: {r.error}")
            continue
        cells = [get(r) for _, _, get in COLUMNS]
        out.append("  ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, (_, w, _)) in enumerate(zip(cells, COLUMNS))))
        if r.error:
            out.append(f"{'':<{COLUMNS[0][1]}}       (incomplete: {r.error})")
    out.append(f"anchors (the seeds, A100 80GB, 1 coordinator + 4 workers): {ANCHOR_HOURS:g} h for {PROJECT_ROUNDS} "
               f"rounds, {ANCHOR_GB_PER_NODE:g} GB per node")
    out.append(f"targets: <= {TARGET_HOURS:g} h for {PROJECT_ROUNDS} rounds with 4 workers; "
               f"<= {TARGET_GB_PER_NODE:g} GB per training node (NVML, CUDA context included)")
    out += verdicts(rows)
    return "\n".join(out)


def verdicts(rows: list[RunSummary]) -> list[str]:
    """'met'/'missed' against the targets, for every row with 4 workers (time) and every row (memory)."""
    lines = []
    for r in rows:
        if r.rounds_measured == 0:
            continue
        parts = []
        if r.workers == 4 and r.projected_hours is not None:
            ok = r.projected_hours <= TARGET_HOURS
            parts.append(f"time {r.projected_hours:.2f} h {'<=' if ok else '>'} {TARGET_HOURS:g} h: "
                         f"{'MET' if ok else 'MISSED'}")
        if r.nvml_peak_bytes is not None:
            gb = r.nvml_peak_bytes / GB
            ok = gb <= TARGET_GB_PER_NODE
            parts.append(f"memory {gb:.2f} GB/node {'<=' if ok else '>'} {TARGET_GB_PER_NODE:g} GB: "
                         f"{'MET' if ok else 'MISSED'}")
        if parts:
            lines.append(f"  {r.label} N={r.workers}: " + "; ".join(parts))
    return lines


# --------------------------------------------------------------------------- running a swarm

def parse_workers(text: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8]."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers wants a comma-separated list of integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--workers wants integers >= 1, got {text!r}")
    return values


def parse_levers(text: str | None) -> list[str]:
    """--levers with no value = all of them (baseline first); else a comma-separated subset."""
    if text is None:
        return []
    names = list(LEVERS) if text == "all" else [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown lever(s) {', '.join(unknown)}; known: {', '.join(LEVERS)}")
    return (["baseline"] if "baseline" not in names else []) + names


def run_overrides(args, workers: int, label: str, tmp: Path) -> list[str]:
    """The --set overrides of one run: the issue's workload in a temporary experiment root."""
    name = f"bench-gpu-{label}-n{workers}"
    return [
        f"experiment.root={tmp / 'shared'}", f"experiment.name={name}", f"experiment.max_rounds={args.rounds}",
        f"model.name={args.model}",
        "sapo.num_train_samples=2", "sapo.num_transplant_trees=2", "sapo.num_generations=4",
        f"sapo.max_new_tokens={args.max_new_tokens}",
        f"supervisor.workers={workers}", f"supervisor.device={args.device}", "supervisor.monitor_interval_s=0.5",
        f"exchange.lock_dir={tmp / 'locks'}", f"exchange.spool_dir={tmp / 'spool'}",
        "checkpoint.every_rounds=1000000",  # the final checkpoint only: no checkpoint I/O inside the measurement
        *LEVERS[label][0], *args.set,
    ]


def swarm_command(config: Path, sets: list[str]) -> list[str]:
    """``python -m supervisor.cli launch CONFIG --set ...``."""
    cmd = [sys.executable, "-m", "supervisor.cli", "launch", str(config)]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def read_metrics(exp_dir: Path) -> dict[str, list[dict]]:
    """worker id -> its metrics lines."""
    out = {}
    for path in sorted((exp_dir / "logs").glob("*/metrics.jsonl")):
        lines = []
        for raw in path.read_text().splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
        out[path.parent.name] = lines
    return out


class Nvml:
    """Device memory and utilisation straight from pynvml (None when unavailable)."""

    def __init__(self):
        self.nv = self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no driver / library: status.json still has the per-process figures
            self.nv = None

    def used_bytes(self) -> int | None:
        if self.nv is None:
            return None
        try:
            return int(self.nv.nvmlDeviceGetMemoryInfo(self.handle).used)
        except Exception:
            return None

    def describe(self) -> str:
        if self.nv is None:
            return "NVML unavailable"
        try:
            name = self.nv.nvmlDeviceGetName(self.handle)
            name = name.decode() if isinstance(name, bytes) else name
            total = self.nv.nvmlDeviceGetMemoryInfo(self.handle).total
            driver = self.nv.nvmlSystemGetDriverVersion()
            driver = driver.decode() if isinstance(driver, bytes) else driver
            return f"{name}, {total / GB:.1f} GB, driver {driver}"
        except Exception as err:
            return f"NVML error: {err}"


class Mps:
    """A private CUDA MPS daemon (own pipe and log directories) for one run."""

    def __init__(self, root: Path):
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(root / "log")}
        for d in self.env.values():
            Path(d).mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        control = shutil.which("nvidia-cuda-mps-control")
        if control is None:
            raise RuntimeError("nvidia-cuda-mps-control not found on PATH")
        subprocess.run([control, "-d"], env={**os.environ, **self.env}, check=True, timeout=30)

    def stop(self) -> None:
        control = shutil.which("nvidia-cuda-mps-control")
        if control:
            subprocess.run([control], input=b"quit\n", env={**os.environ, **self.env}, timeout=60, check=False)


def run_one(args, workers: int, label: str, nvml: Nvml) -> RunSummary:
    """Launch one swarm, sample memory until it exits, and summarise it."""
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-gpu-{label}-n{workers}-", dir=args.dir))
    sets = run_overrides(args, workers, label, tmp)
    env = {**os.environ, "SWARM_RUNTIME_DIR": str(tmp / "run")}
    mps = Mps(tmp / "mps") if LEVERS[label][1] else None
    summary = RunSummary(label=label, workers=workers)
    node_samples, device_samples, util_samples = [], [], []
    status_file = tmp / "run" / "status.json"
    exp_dir = tmp / "shared" / "experiments" / f"bench-gpu-{label}-n{workers}"
    out_path = tmp / "supervisor.out"
    if mps is not None:
        try:
            mps.start()
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            summary.error = f"CUDA MPS could not be started: {err}"
            return summary
        env.update(mps.env)
    try:
        launch_wall = time.time()
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(swarm_command(args.config, sets), cwd=REPO, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + args.timeout
            last_status = 0.0
            while proc.poll() is None:
                now = time.time()
                device_samples.append((now, nvml.used_bytes()))
                try:
                    st = json.loads(status_file.read_text())
                except (OSError, ValueError):
                    st = None
                if st and st.get("updated_at", 0) > last_status:
                    last_status = st["updated_at"]
                    node_samples.append((st["updated_at"], {n: d.get("gpu_bytes") for n, d in st["nodes"].items()}))
                    util_samples.append((st["updated_at"], (st.get("gpu") or {}).get("utilization")))
                if time.monotonic() > deadline:
                    summary.error = f"timed out after {args.timeout:.0f} s"
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=120)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                    break
                time.sleep(0.25)
        code = proc.returncode
    finally:
        if mps is not None:
            mps.stop()
    metrics = read_metrics(exp_dir)
    s = summarize(label, workers, metrics, skip_rounds=args.skip_rounds, launch_wall=launch_wall,
                  node_samples=node_samples, device_samples=[(t, b) for t, b in device_samples if b is not None],
                  util_samples=util_samples)
    s.error = summary.error
    if code != 0 and not s.error:
        tail = out_path.read_text(errors="replace").strip().splitlines()[-1:] if out_path.exists() else []
        s.error = f"swarm launch exited {code}: {tail[0][:200] if tail else 'no output'} (see {tmp})"
    if args.json:
        s_dict = asdict(s)
        s_dict.update(tmp=str(tmp), command=shlex.join(swarm_command(args.config, sets)), exit_code=code)
        with open(args.json, "a") as f:
            f.write(json.dumps(s_dict) + "\n")
    if not args.keep and not s.error:
        shutil.rmtree(tmp, ignore_errors=True)
    return s


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=parse_workers, default=[1, 2, 4, 8], help="worker counts N (default 1,2,4,8)")
    p.add_argument("--rounds", type=int, default=20, help="rounds per run (default 20)")
    p.add_argument("--skip-rounds", type=int, default=1,
                   help="first rounds not measured: warm-up, compilation (default 1)")
    p.add_argument("--model", default="builtin:gpt2-124m",
                   help="model.name (default builtin:gpt2-124m; openai-community/gpt2 with a cache or network)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="sapo.max_new_tokens (default 256)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="base config (default %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="extra override for every run (repeatable), e.g. a lever that won")
    p.add_argument("--levers", nargs="?", const=list(LEVERS), default=None, type=parse_levers, metavar="NAMES",
                   help=f"measure levers one by one at --lever-workers workers: all, or a subset of "
                        f"{','.join(LEVERS)}")
    p.add_argument("--lever-workers", type=int, default=4, help="N for --levers (default 4)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is stopped (default 1800)")
    p.add_argument("--dir", default=None, help="where temporary experiment roots go (default: the system temp)")
    p.add_argument("--keep", action="store_true", help="keep each run's directory (failed runs are always kept)")
    p.add_argument("--json", default=None, help="append one JSON line per run to this file")
    p.add_argument("--dry-run", action="store_true", help="print the swarm commands and exit")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu only checks this script's plumbing (with --model builtin:tiny-gpt2): its figures "
                        "mean nothing for a GPU (default cuda)")
    args = p.parse_args(argv)
    if args.rounds <= args.skip_rounds:
        p.error("--rounds must be larger than --skip-rounds")
    return args


def planned_runs(args) -> list[tuple[int, str]]:
    """(N, lever) pairs in the order they run."""
    if args.levers:
        return [(args.lever_workers, name) for name in args.levers]
    return [(n, "baseline") for n in args.workers]


def cuda_problem() -> str | None:
    """Why this machine cannot run the benchmark (None when it can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def main(argv=None) -> int:
    """Run (or print) the benchmark."""
    args = parse_args(argv)
    runs = planned_runs(args)
    if args.dry_run:
        for workers, label in runs:
            tmp = Path(args.dir or tempfile.gettempdir()) / f"bench-gpu-{label}-n{workers}-XXXX"
            print(f"# {label}, N={workers}: {LEVERS[label][2]}")
            if LEVERS[label][1]:
                print(f"export CUDA_MPS_PIPE_DIRECTORY={tmp}/mps/pipe CUDA_MPS_LOG_DIRECTORY={tmp}/mps/log")
                print("nvidia-cuda-mps-control -d")
            print(f"SWARM_RUNTIME_DIR={shlex.quote(str(tmp / 'run'))} "
                  f"{shlex.join(swarm_command(args.config, run_overrides(args, workers, label, tmp)))}")
            if LEVERS[label][1]:
                print("echo quit | nvidia-cuda-mps-control")
        return 0
    problem = cuda_problem() if args.device == "cuda" else None
    if problem:
        print(f"bench_gpu: {problem}; this benchmark needs a GPU (try --dry-run)", file=sys.stderr)
        return 2
    import torch
    import transformers

    nvml = Nvml()
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (plumbing check only)"
    print(f"bench_gpu: {where} ({nvml.describe()}); torch {torch.__version__}, "
          f"transformers {transformers.__version__}; model {args.model}, I=2 J=2 G=4, max_new_tokens "
          f"{args.max_new_tokens}, {args.rounds} rounds per run (first {args.skip_rounds} not measured)",
          flush=True)
    rows = []
    for workers, label in runs:
        print(f"... {label}, N={workers}: {LEVERS[label][2]}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        rows.append(run_one(args, workers, label, nvml))
        print(f"    done in {time.monotonic() - t0:.0f} s{': ' + rows[-1].error if rows[-1].error else ''}",
              file=sys.stderr, flush=True)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
