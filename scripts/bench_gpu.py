#!/usr/bin/env python
"""GPU benchmark: the real supervised swarm (1 coordinator + N GPT-2 workers on cuda:0), timed and measured.

    python scripts/bench_gpu.py                                  # N = 1, 2, 4, 8; 20 rounds each
    python scripts/bench_gpu.py --quick                          # N = 4, 8 rounds, shipped config: < 5 min
    python scripts/bench_gpu.py --quick --levers                 # the same, then the eager lever beside it
    python scripts/bench_gpu.py --workers 4 --rounds 30 --model openai-community/gpt2
    python scripts/bench_gpu.py --levers                         # each lever alone, N = 4 (--lever-workers)
    python scripts/bench_gpu.py --levers fp32,bf16 --rounds 10
    python scripts/bench_gpu.py --dry-run --levers               # print the swarm commands, run nothing
    python scripts/bench_gpu.py --device cpu --quick             # this script's plumbing on a CPU (tiny model)

For each N (and each lever with --levers) it runs `swarm launch` as a subprocess on a base config (default
configs/gpt2-5node-a100-2loc2ext.yaml) with `--set` overrides into a temporary experiment root (under --dir,
created if missing): I=2, J=2, G=4, max_new_tokens=256, model builtin:gpt2-124m (GPT-2 small's shape, random
weights, no download), --rounds rounds. The overrides are resolved and validated before anything starts, and
the settings that the levers touch are printed as resolved for each run. While a run goes on the script
samples the supervisor's status.json (NVML memory per node process, CUDA context included; monitor interval
0.5 s) and the device's used memory (pynvml). Afterwards it reads every worker's metrics.jsonl and prints one
row per run:

  start-up s       launch -> the last worker starts its first round (model load, CUDA init, warm-up)
  1st round s      median over workers of round 0's round_s (first generate: compilation, cache set-up)
  round s/worker   median of the workers' timings.round_s (generate + exchange + train), rounds after
                   the first --skip-rounds (default 1: warm-up/compilation excluded)
  gen s, train s   the same median for timings.generate_s and timings.train_s (the phases of a round)
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
GB = 10^9 bytes, as in the anchors. NVML figures that are missing or 0 (no per-process accounting, e.g. in a
container or on a CPU) count as unknown, never as a measurement: a node without a figure makes the memory
verdict "unknown" (or MISSED when a known node is already over the target).

Anchors (the seeds: 1 coordinator + 4 GPT-2 workers on one A100 80GB): 21 h for 2000 rounds, about 6.5 GB
of GPU memory per node. Targets: <= 1 h for 2000 rounds with 4 workers; <= 3 GB per training node.

Levers (--levers: all, or a comma-separated subset; each alone on top of the base config, shipped first;
--set applies to every run). The shipped configs/gpt2-5node-a100-*.yaml set model.dtype=auto (bfloat16 on an A100/H100) with
sapo.optimizer=auto (stochastic-rounding AdamW, float32 moments), sapo.compile_generate=auto (one reused
static KV cache + torch.compile'd decoding on CUDA), sapo.micro_batch_tokens=auto (at most 2048 padded
tokens per forward/backward on CUDA), sapo.gradient_checkpointing=auto and sapo.warmup=auto (on for CUDA),
model.attn_implementation=auto (SDPA for GPT-2) and coordinator.poll_interval_s=0.1. Every run also sets
sapo.tasks to toy_copy, whose partial credit gives random text a reward spread: on reasoning-gym a
random-weight model scores 0, so every round would skip training ("trained %" shows the share that trained):
  shipped         no overrides: the base config as shipped ("baseline" is accepted as an alias)
  fp32            model.dtype=float32 model.autocast=none sapo.optimizer=adam: float32 everything
  mixed           model.dtype=float32 model.autocast=bfloat16 sapo.optimizer=adam: float32 weights and Adam,
                  bfloat16 compute (the precision shipped before)
  bf16-adam       sapo.optimizer=adam: bfloat16 weights with torch's Adam (bfloat16 moments, round-to-nearest:
                  loses most lr-1e-5 updates, scripts/bench_precision.py; for speed and memory only)
  eager           sapo.compile_generate=false: dynamic KV cache, no torch.compile of decoding
  no-micro-batch  sapo.micro_batch_tokens=0 sapo.micro_batch_size=0: the (I+J)*G = 16 sequences' loss/backward
                  in one pass
  no-checkpointing  sapo.gradient_checkpointing=false: layer activations stored instead of recomputed
  eager-attn      model.attn_implementation=eager: the non-SDPA attention, to see what SDPA buys
  no-warmup       sapo.warmup=false: start-up time and peak memory without the worst-case warm-up
  slow-poll       coordinator.poll_interval_s=1.0: the coordinator's poll the shipped 0.1 s replaced
  mps             no overrides; CUDA MPS: this script starts `nvidia-cuda-mps-control -d` with its own
                  pipe/log directories for the run and stops it afterwards (the supervisor has no MPS
                  option). GPU only: refused with --device cpu

--quick: one run that fits a 5-minute device budget: N=4 workers (--workers 4), 8 rounds (--rounds 8; the
first not measured), the shipped config, --timeout 240 s per run; with --levers (no names) it adds the eager
lever as the comparison point (shipped, then eager: two runs), with --levers NAMES those levers. Explicit
--workers/--rounds/--timeout win over the quick defaults.

--device cpu checks this script's plumbing only (its figures mean nothing for a GPU): it passes
--set supervisor.device=cpu to the swarm, defaults --model to builtin:tiny-gpt2 and --max-new-tokens to 16,
and refuses GPU-only levers (mps) by name; a bare --levers leaves them out.

The last line on stdout is machine-readable, for the shipped 4-worker row if there is one, else the first
4-worker row, else the first row (a missing figure is "-"; on a CPU the GB figures are "-"):
  summary: hours_2000=N.NN peak_gb=N.N steady_gb=N.N

Exit codes: 0 done (rows that failed say so), 2 no CUDA device (one line), a bad argument or a bad override.
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
TARGET_HOURS = 1.0  # with 4 workers
TARGET_WORKERS = 4
TARGET_GB_PER_NODE = 3.0
PROJECT_ROUNDS = 2000

QUICK_WORKERS = 4
QUICK_ROUNDS = 8
QUICK_TIMEOUT_S = 240.0
QUICK_LEVERS = ("shipped", "eager")  # --quick --levers: the comparison point next to the shipped config
DEVICE_DEFAULTS = {  # --device -> (--model, --max-new-tokens) when not given
    "cuda": ("builtin:gpt2-124m", 256),
    "cpu": ("builtin:tiny-gpt2", 16),
}


@dataclass(frozen=True)
class Lever:
    """One benchmark configuration: ``--set`` overrides on the base config, and whether CUDA MPS runs."""

    sets: tuple[str, ...]
    what: str
    mps: bool = False

    @property
    def gpu_only(self) -> bool:
        return self.mps


LEVERS: dict[str, Lever] = {
    "shipped": Lever((), "the base config as shipped, no overrides"),
    "fp32": Lever(("model.dtype=float32", "model.autocast=none", "sapo.optimizer=adam"),
                  "float32 weights, Adam and compute"),
    "mixed": Lever(("model.dtype=float32", "model.autocast=bfloat16", "sapo.optimizer=adam"),
                   "float32 weights and Adam, bfloat16 autocast compute (the precision shipped before)"),
    "bf16-adam": Lever(("sapo.optimizer=adam",), "bfloat16 weights with torch's Adam (bf16 moments, no "
                       "stochastic rounding: loses small updates)"),
    "eager": Lever(("sapo.compile_generate=false",), "dynamic KV cache, no torch.compile of decoding"),
    "no-micro-batch": Lever(("sapo.micro_batch_tokens=0", "sapo.micro_batch_size=0"),
                            "loss/backward on all (I+J)*G sequences at once"),
    "no-checkpointing": Lever(("sapo.gradient_checkpointing=false",), "layer activations stored, not recomputed"),
    "eager-attn": Lever(("model.attn_implementation=eager",), "eager attention instead of SDPA"),
    "no-warmup": Lever(("sapo.warmup=false",), "no worst-case warm-up at start-up"),
    "slow-poll": Lever(("coordinator.poll_interval_s=1.0",), "coordinator polls every 1 s"),
    "mps": Lever((), "the base config as shipped, CUDA MPS daemon started for the run", mps=True),
}
LEVER_ALIASES = {"baseline": "shipped"}
BARE_LEVERS = object()  # --levers without names (argparse would pass a string const through parse_levers)

# The settings the levers touch, printed as resolved for each run (what actually runs).
RESOLVED_FIELDS = ("model.dtype", "model.autocast", "model.attn_implementation", "sapo.optimizer",
                   "sapo.compile_generate", "sapo.micro_batch_size", "sapo.micro_batch_tokens",
                   "sapo.gradient_checkpointing", "sapo.warmup", "coordinator.poll_interval_s", "supervisor.device")
# A random-weight model (builtin:gpt2-124m) never scores on reasoning-gym: every group has zero reward spread,
# so every round skips its training step and a benchmark would measure generation only. toy_copy gives
# partial credit for letters, so random text has spread and every round trains. --set sapo.tasks=... wins.
BENCH_TASKS = "sapo.tasks=[{name: toy_copy}]"


# --------------------------------------------------------------------------- the maths (tested on fake metrics)

@dataclass
class RunSummary:
    """One run's figures; None where nothing was measured."""

    label: str
    workers: int
    rounds_measured: int = 0
    startup_s: float | None = None
    first_round_s: float | None = None
    round_s: float | None = None
    generate_s: float | None = None
    train_s: float | None = None
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
    memory_unknown: list = field(default_factory=list)  # workers NVML never gave a (non-zero) figure for
    trained_fraction: float | None = None  # measured rounds that took an optimizer step
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
    (wall time, {node id: NVML bytes or None}); None or 0 is an unknown figure, not a measurement.
    ``device_samples``/``util_samples``: (wall time, value).
    """
    s = RunSummary(label=label, workers=workers)
    lines = {w: sorted((m for m in ms if isinstance(m.get("round"), int)), key=lambda m: m["round"])
             for w, ms in metrics.items()}
    measured = {w: [m for m in ms if m["round"] >= skip_rounds] for w, ms in lines.items()}
    s.rounds_measured = min((len(ms) for ms in measured.values()), default=0)
    starts = [ms[0]["timestamp"] - ms[0]["timings"]["round_s"] for ms in lines.values() if ms]
    if launch_wall is not None and starts and len(starts) == len(lines):
        s.startup_s = max(starts) - launch_wall
    s.first_round_s = _median(ms[0]["timings"].get("round_s") for ms in lines.values() if ms and ms[0]["round"] == 0)
    s.round_s = _median(m["timings"].get("round_s") for ms in measured.values() for m in ms)
    s.generate_s = _median(m["timings"].get("generate_s") for ms in measured.values() for m in ms)
    s.train_s = _median(m["timings"].get("train_s") for ms in measured.values() for m in ms)
    all_measured = [m for ms in measured.values() for m in ms]
    if all_measured:
        s.trained_fraction = sum(1 for m in all_measured if (m.get("optimizer_steps") or 0) > 0) / len(all_measured)

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
    torch_peaks = [p for p in torch_peaks if isinstance(p, int) and p > 0]
    s.torch_peak_bytes = max(torch_peaks) if torch_peaks else None

    workers_ids = set(metrics)
    measure_from = min(span_start) if span_start else None
    peak_all, peak_steady = {}, {}
    for t, nodes in node_samples:
        for node, used in nodes.items():
            # NVML without per-process accounting reports None (or, from older supervisors, 0): unknown.
            if not isinstance(used, int) or used <= 0 or (workers_ids and node not in workers_ids):
                continue
            peak_all[node] = max(peak_all.get(node, 0), used)
            if measure_from is not None and t >= measure_from:
                peak_steady[node] = max(peak_steady.get(node, 0), used)
    s.per_worker_peak_bytes = dict(sorted(peak_all.items()))
    s.memory_unknown = sorted(workers_ids - set(peak_all))
    s.nvml_peak_bytes = max(peak_all.values()) if peak_all else None
    s.nvml_steady_bytes = max(peak_steady.values()) if peak_steady else None
    s.device_peak_bytes = max((b for _, b in device_samples if b), default=None)
    utils = [u for t, u in util_samples if u is not None and (measure_from is None or t >= measure_from)]
    s.util_percent = sum(utils) / len(utils) if utils else None
    return s


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


COLUMNS = [
    ("config", 14, lambda r: r.label),
    ("N", 3, lambda r: str(r.workers)),
    ("start-up s", 10, lambda r: _fmt(r.startup_s, ".1f")),
    ("1st round s", 11, lambda r: _fmt(r.first_round_s, ".1f")),
    ("round s/worker", 14, lambda r: _fmt(r.round_s, ".2f")),
    ("gen s", 6, lambda r: _fmt(r.generate_s, ".2f")),
    ("train s", 7, lambda r: _fmt(r.train_s, ".2f")),
    ("trained %", 9, lambda r: _fmt(None if r.trained_fraction is None else 100 * r.trained_fraction, ".0f")),
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
    """The results table, the anchors and targets under it, and one verdict line per measured row."""
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
    out.append(f"targets: <= {TARGET_HOURS:g} h for {PROJECT_ROUNDS} rounds with {TARGET_WORKERS} workers; "
               f"<= {TARGET_GB_PER_NODE:g} GB per training node (NVML, CUDA context included)")
    out += verdicts(rows)
    return "\n".join(out)


def memory_verdict(r: RunSummary) -> str:
    """'MET' only when NVML gave every worker a figure and the largest is within the target."""
    if r.nvml_peak_bytes is None:
        return "memory unknown (NVML gave no per-process figure)"
    gb = r.nvml_peak_bytes / GB
    over = gb > TARGET_GB_PER_NODE
    if r.memory_unknown:
        unknown = ", ".join(r.memory_unknown)
        if over:
            return f"memory {gb:.2f} GB/node > {TARGET_GB_PER_NODE:g} GB: MISSED (unknown for {unknown})"
        return f"memory unknown for {unknown} (the others <= {gb:.2f} GB/node)"
    return (f"memory {gb:.2f} GB/node {'>' if over else '<='} {TARGET_GB_PER_NODE:g} GB: "
            f"{'MISSED' if over else 'MET'}")


def verdicts(rows: list[RunSummary]) -> list[str]:
    """'MET'/'MISSED'/unknown against the targets: time for 4-worker rows, memory for every measured row."""
    lines = []
    for r in rows:
        if r.rounds_measured == 0:
            continue
        parts = []
        if r.workers == TARGET_WORKERS and r.projected_hours is not None:
            ok = r.projected_hours <= TARGET_HOURS
            parts.append(f"time {r.projected_hours:.2f} h {'<=' if ok else '>'} {TARGET_HOURS:g} h: "
                         f"{'MET' if ok else 'MISSED'}")
        parts.append(memory_verdict(r))
        if r.trained_fraction is not None and r.trained_fraction < 0.5:
            parts.append(f"only {r.trained_fraction:.0%} of rounds trained (no reward spread): the figures "
                         "miss most training steps")
        lines.append(f"  {r.label} N={r.workers}: " + "; ".join(parts))
    return lines


def summary_row(rows: list[RunSummary]) -> RunSummary | None:
    """The row the summary line is about: shipped at 4 workers, else any 4-worker row, else the first."""
    for wanted in (lambda r: r.label == "shipped" and r.workers == TARGET_WORKERS,
                   lambda r: r.workers == TARGET_WORKERS, lambda r: True):
        for r in rows:
            if wanted(r):
                return r
    return None


def summary_line(rows: list[RunSummary]) -> str:
    """``summary: hours_2000=N.NN peak_gb=N.N steady_gb=N.N``; '-' for a missing figure.

    The GB figures are '-' also when some worker's NVML memory is unknown: a maximum over the others would
    read as a measurement of every node.
    """
    r = summary_row(rows)
    hours = r.projected_hours if r else None
    known = r is not None and not r.memory_unknown
    peak = r.nvml_peak_bytes if known else None
    steady = r.nvml_steady_bytes if known else None
    return (f"summary: hours_{PROJECT_ROUNDS}={_fmt(hours, '.2f')} peak_gb={_fmt(peak, '.1f', GB)} "
            f"steady_gb={_fmt(steady, '.1f', GB)}")


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


def parse_levers(text: str) -> list[str]:
    """'all' = every lever; else a comma-separated subset (aliases allowed). shipped first, no repeats."""
    names = list(LEVERS) if text == "all" else [x.strip() for x in text.split(",") if x.strip()]
    names = [LEVER_ALIASES.get(n, n) for n in names]
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown lever(s) {', '.join(unknown)}; known: {', '.join(LEVERS)} "
                                         f"(aliases: {', '.join(f'{a}={b}' for a, b in LEVER_ALIASES.items())})")
    return list(dict.fromkeys(["shipped", *names]))


def run_name(workers: int, label: str) -> str:
    """experiment.name of one run."""
    return f"bench-gpu-{label}-n{workers}"


def run_overrides(args, workers: int, label: str, tmp: Path) -> list[str]:
    """The --set overrides of one run: the issue's workload in a temporary experiment root, then the lever's."""
    return [
        f"experiment.root={tmp / 'shared'}", f"experiment.name={run_name(workers, label)}",
        f"experiment.max_rounds={args.rounds}", f"model.name={args.model}",
        "sapo.num_train_samples=2", "sapo.num_transplant_trees=2", "sapo.num_generations=4",
        f"sapo.max_new_tokens={args.max_new_tokens}",
        f"supervisor.workers={workers}", f"supervisor.device={args.device}", "supervisor.monitor_interval_s=0.5",
        f"exchange.lock_dir={tmp / 'locks'}", f"exchange.spool_dir={tmp / 'spool'}",
        "checkpoint.every_rounds=1000000",  # the final checkpoint only: no checkpoint I/O inside the measurement
        BENCH_TASKS, *LEVERS[label].sets, *args.set,
    ]


def resolved_settings(config_path: Path, sets: list[str]) -> str:
    """The settings the levers touch, as the nodes will resolve them ('model.dtype=float32 ...').

    Raises node.config's ConfigError (a ValueError) for an override the nodes would refuse.
    """
    from node.config import resolve_config

    config = resolve_config(config_path, overrides=sets)
    parts = []
    for dotted in RESOLVED_FIELDS:
        section, name = dotted.split(".")
        if not hasattr(getattr(config, section), name):
            continue
        value = getattr(getattr(config, section), name)
        parts.append(f"{dotted}={str(value).lower() if isinstance(value, bool) else value}")
    return " ".join(parts)


def swarm_command(config: Path, sets: list[str]) -> list[str]:
    """``python -m supervisor.cli launch CONFIG --set ...``."""
    cmd = [sys.executable, "-m", "supervisor.cli", "launch", str(config)]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def read_metrics(exp_dir: Path) -> dict[str, list[dict]]:
    """worker id -> its metrics lines (node.fsio's one JSONL reader: bad or partial lines skipped)."""
    from node.fsio import read_jsonl

    return {path.parent.name: read_jsonl(path)[0] for path in sorted((exp_dir / "logs").glob("*/metrics.jsonl"))}


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
    tmp = Path(tempfile.mkdtemp(prefix=f"{run_name(workers, label)}-", dir=args.dir))
    sets = run_overrides(args, workers, label, tmp)
    env = {**os.environ, "SWARM_RUNTIME_DIR": str(tmp / "run")}
    mps = Mps(tmp / "mps") if LEVERS[label].mps else None
    summary = RunSummary(label=label, workers=workers)
    node_samples, device_samples, util_samples = [], [], []
    status_file = tmp / "run" / "status.json"
    exp_dir = tmp / "shared" / "experiments" / run_name(workers, label)
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
    """Command-line options, with the --quick and --device defaults filled in."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=parse_workers, default=None,
                   help=f"worker counts N (default 1,2,4,8; {QUICK_WORKERS} with --quick)")
    p.add_argument("--rounds", type=int, default=None,
                   help=f"rounds per run (default 20; {QUICK_ROUNDS} with --quick)")
    p.add_argument("--skip-rounds", type=int, default=1,
                   help="first rounds not measured: warm-up, compilation (default 1)")
    p.add_argument("--quick", action="store_true",
                   help=f"one run for a 5-minute device budget: N={QUICK_WORKERS}, {QUICK_ROUNDS} rounds, the "
                        f"shipped config, --timeout {QUICK_TIMEOUT_S:.0f}; with a bare --levers, shipped and eager")
    p.add_argument("--model", default=None,
                   help="model.name (default builtin:gpt2-124m, builtin:tiny-gpt2 with --device cpu; "
                        "openai-community/gpt2 with a cache or network)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="sapo.max_new_tokens (default 256, 16 with --device cpu)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="base config (default %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="extra override for every run (repeatable), e.g. a lever that won")
    p.add_argument("--levers", nargs="?", const=BARE_LEVERS, default=None, type=parse_levers, metavar="NAMES",
                   help=f"measure levers one by one at --lever-workers workers: all (the default without "
                        f"NAMES; {','.join(QUICK_LEVERS)} with --quick), or a subset of {','.join(LEVERS)}")
    p.add_argument("--lever-workers", type=int, default=QUICK_WORKERS,
                   help=f"N for --levers (default {QUICK_WORKERS})")
    p.add_argument("--timeout", type=float, default=None,
                   help=f"seconds before a run is stopped (default 1800; {QUICK_TIMEOUT_S:.0f} with --quick)")
    p.add_argument("--dir", type=Path, default=None,
                   help="where temporary experiment roots go, created if missing (default: the system temp)")
    p.add_argument("--keep", action="store_true", help="keep each run's directory (failed runs are always kept)")
    p.add_argument("--json", default=None, help="append one JSON line per run to this file")
    p.add_argument("--dry-run", action="store_true", help="print the swarm commands and exit")
    p.add_argument("--device", choices=tuple(DEVICE_DEFAULTS), default="cuda",
                   help="cpu only checks this script's plumbing (tiny model, supervisor.device=cpu, no GPU-only "
                        "levers): its figures mean nothing for a GPU (default cuda)")
    args = p.parse_args(argv)

    if args.levers is BARE_LEVERS:  # --levers without names: all that this device can run
        args.levers = [name for name in (QUICK_LEVERS if args.quick else LEVERS)
                       if args.device == "cuda" or not LEVERS[name].gpu_only]
    if args.workers is None:
        args.workers = [QUICK_WORKERS] if args.quick else [1, 2, 4, 8]
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else 20
    if args.timeout is None:
        args.timeout = QUICK_TIMEOUT_S if args.quick else 1800.0
    model, max_new_tokens = DEVICE_DEFAULTS[args.device]
    args.model = model if args.model is None else args.model
    args.max_new_tokens = max_new_tokens if args.max_new_tokens is None else args.max_new_tokens

    if args.rounds <= args.skip_rounds:
        p.error("--rounds must be larger than --skip-rounds")
    if args.device == "cpu":
        gpu_only = [name for name in args.levers or () if LEVERS[name].gpu_only]
        if gpu_only:
            p.error(f"--device cpu: lever(s) {', '.join(gpu_only)} need a GPU (CUDA MPS); drop them or use a GPU")
    if args.dir is not None:
        if args.dir.exists() and not args.dir.is_dir():
            p.error(f"--dir {args.dir} exists and is not a directory")
        if not args.dry_run:
            try:
                args.dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                p.error(f"--dir {args.dir} cannot be created: {err}")
    return args


def planned_runs(args) -> list[tuple[int, str]]:
    """(N, lever) pairs in the order they run."""
    if args.levers:
        return [(args.lever_workers, name) for name in args.levers]
    return [(n, "shipped") for n in args.workers]


def cuda_problem() -> str | None:
    """Why this machine cannot run the benchmark (None when it can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def check_overrides(args, runs: list[tuple[int, str]]) -> dict[tuple[int, str], str] | str:
    """Each run's resolved lever settings, or the first override the nodes would refuse (as a message)."""
    out = {}
    for workers, label in runs:
        tmp = Path(args.dir or tempfile.gettempdir()) / f"{run_name(workers, label)}-XXXX"
        try:
            out[(workers, label)] = resolved_settings(args.config, run_overrides(args, workers, label, tmp))
        except (ValueError, OSError) as err:
            return f"{label}, N={workers}: {err}"
    return out


def describe_run(settings: dict[tuple[int, str], str], workers: int, label: str) -> str:
    """The lever's description and its resolved settings, flagging a lever that changes nothing here."""
    mine, shipped = settings[(workers, label)], settings.get((workers, "shipped"))
    same = label != "shipped" and not LEVERS[label].mps and mine == shipped
    return (f"{label}, N={workers}: {LEVERS[label].what}\n    resolved: {mine}"
            + ("\n    (resolves the same as shipped with this config: it measures nothing new)" if same else ""))


def main(argv=None) -> int:
    """Run (or print) the benchmark."""
    args = parse_args(argv)
    runs = planned_runs(args)
    settings = check_overrides(args, runs)
    if isinstance(settings, str):
        print(f"bench_gpu: bad override for {settings}", file=sys.stderr)
        return 2
    if args.dry_run:
        for workers, label in runs:
            tmp = Path(args.dir or tempfile.gettempdir()) / f"{run_name(workers, label)}-XXXX"
            print("# " + describe_run(settings, workers, label).replace("\n", "\n#"))
            if LEVERS[label].mps:
                print(f"export CUDA_MPS_PIPE_DIRECTORY={tmp}/mps/pipe CUDA_MPS_LOG_DIRECTORY={tmp}/mps/log")
                print("nvidia-cuda-mps-control -d")
            print(f"SWARM_RUNTIME_DIR={shlex.quote(str(tmp / 'run'))} "
                  f"{shlex.join(swarm_command(args.config, run_overrides(args, workers, label, tmp)))}")
            if LEVERS[label].mps:
                print("echo quit | nvidia-cuda-mps-control")
        return 0
    problem = cuda_problem() if args.device == "cuda" else None
    if problem:
        print(f"bench_gpu: {problem}; this benchmark needs a GPU (try --dry-run, or --device cpu --quick)",
              file=sys.stderr)
        return 2
    import torch
    import transformers

    nvml = Nvml()
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (plumbing check only)"
    print(f"bench_gpu: {where} ({nvml.describe()}); torch {torch.__version__}, "
          f"transformers {transformers.__version__}; model {args.model}, I=2 J=2 G=4, max_new_tokens "
          f"{args.max_new_tokens}, {args.rounds} rounds per run (first {args.skip_rounds} not measured)"
          f"{', quick' if args.quick else ''}", flush=True)
    rows = []
    for workers, label in runs:
        print(f"... {describe_run(settings, workers, label)}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        rows.append(run_one(args, workers, label, nvml))
        print(f"    done in {time.monotonic() - t0:.0f} s{': ' + rows[-1].error if rows[-1].error else ''}",
              file=sys.stderr, flush=True)
    print(format_table(rows))
    if args.device == "cpu":
        print("note: --device cpu checks the plumbing only; these figures and verdicts say nothing about a GPU")
    print(summary_line(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
