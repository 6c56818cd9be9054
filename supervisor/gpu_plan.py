"""Sharing one device's memory among the workers: :func:`plan_memory` gives a :class:`GpuPlan` or a
:class:`PlanError` with the numbers. The coordinator uses no GPU. Never imports torch.

Workers of a heterogeneous swarm (``workers:`` in the config) may train models of different sizes: each
worker's training state (weights, gradients, optimizer moments: :func:`training_bytes` of its model's
parameter count, :func:`model_params`) is its own, and with ``memory_fraction: auto`` each worker gets that
plus an equal share of what is left (activations, KV caches). Sizes come from the built-in models' table, a
local model directory or the Hugging Face cache (safetensors headers, no torch, no network); one unknown
size (a model not downloaded yet) means equal shares, as for a swarm of one model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from supervisor.gpu import GIB, gib_text

AUTO_RESERVE = 0.05  # share of the device kept free by memory_fraction: auto


class PlanError(ValueError):
    """A GPU memory plan that cannot fit the device; the message carries the numbers."""


@dataclass(frozen=True)
class GpuPlan:
    """How one device's memory is shared by the workers (the coordinator uses no GPU)."""

    total_bytes: int
    workers: int
    fraction: float  # per worker, of NVML's total (a worker recomputes it against torch's total)
    bytes_per_worker: int  # fraction × total: the worker's allocator cap, passed as SWARM_MEMORY_BYTES
    margin_bytes_per_worker: int  # CUDA context, outside the fraction
    margin_total_bytes: int
    headroom_bytes: int  # what is left when every worker uses its share and context
    auto: bool
    # Heterogeneous swarms: each worker's share (worker_1 first) when they differ; empty = bytes_per_worker each
    # (bytes_per_worker, and fraction, are then the largest share).
    worker_bytes: tuple[int, ...] = ()

    def share(self, worker: int) -> int:
        """Worker ``worker``'s share in bytes (1 = worker_1): its allocator cap, SWARM_MEMORY_BYTES."""
        if not 1 <= worker <= self.workers:
            raise ValueError(f"no worker {worker} in a plan for {self.workers}")
        return self.worker_bytes[worker - 1] if self.worker_bytes else self.bytes_per_worker

    @property
    def planned_bytes(self) -> int:
        shares = sum(self.worker_bytes) if self.worker_bytes else self.workers * self.bytes_per_worker
        return shares + self.workers * self.margin_bytes_per_worker

    def budget_bytes(self, worker: int | None = None) -> int:
        """What worker ``worker`` (the largest share when None) may hold on the device (its share plus its
        context) before it is over."""
        return (self.bytes_per_worker if worker is None else self.share(worker)) + self.margin_bytes_per_worker

    def describe(self) -> str:
        how = "auto" if self.auto else "configured"
        if self.worker_bytes:
            shares = ", ".join(f"worker_{i} {gib_text(b)}" for i, b in enumerate(self.worker_bytes, 1))
            return (f"{self.workers} workers' shares ({how}, from each one's model: {shares} GiB) + {self.workers} × "
                    f"{gib_text(self.margin_bytes_per_worker)} GiB context = {gib_text(self.planned_bytes)} GiB of "
                    f"{gib_text(self.total_bytes)} GiB ({gib_text(self.headroom_bytes)} GiB headroom)")
        return (f"{self.workers} workers × {_fmt_fraction(self.fraction)} ({how}) × "
                f"{gib_text(self.total_bytes)} GiB + {self.workers} × {gib_text(self.margin_bytes_per_worker)} GiB "
                f"context = {gib_text(self.planned_bytes)} GiB of {gib_text(self.total_bytes)} GiB "
                f"({gib_text(self.headroom_bytes)} GiB headroom)")


def _fmt_fraction(f: float) -> str:
    return f"{f:.2f}" if abs(round(f, 2) - f) < 1e-12 else f"{f:.4f}"


def plan_memory(total_bytes: int, workers: int, fraction: float | str, context_margin_gb: float,
                needs: Sequence[int | None] = (), models: Sequence[str] = ()) -> GpuPlan:
    """Share a device of ``total_bytes`` among ``workers``; raise :class:`PlanError` if it cannot fit.

    A number: each worker gets that fraction, and ``workers × (fraction × total + margin)`` must fit.
    ``"auto"``: ``(total − workers × margin − 5 % reserve) / workers / total``; when ``needs`` (each worker's
    training state in bytes, :func:`training_bytes`; ``models`` name them in messages) are all known and not all
    equal, each worker gets its need plus an equal share of the rest instead. Either way a worker whose known
    need exceeds its share is refused.
    """
    if workers < 1:
        raise PlanError(f"a GPU plan needs at least one worker, got {workers}")
    if total_bytes <= 0:
        raise PlanError(f"the device reports {total_bytes} bytes of memory")
    if context_margin_gb < 0:
        raise PlanError(f"cuda_context_margin_gb must be >= 0, got {context_margin_gb}")
    margin = int(context_margin_gb * GIB)
    margin_total = workers * margin
    auto = fraction == "auto"
    if auto:
        reserve = AUTO_RESERVE * total_bytes
        left = total_bytes - margin_total - reserve
        if left <= 0:
            raise PlanError(
                f"no room for {workers} workers: {workers} × {context_margin_gb:g} GiB context + "
                f"{AUTO_RESERVE:.0%} reserve = {gib_text(margin_total + reserve)} GiB >= {gib_text(total_bytes)} GiB")
        frac = left / workers / total_bytes
    else:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise PlanError(f"memory_fraction must be 'auto' or a number in (0, 1], got {fraction!r}")
        frac = float(fraction)
        need = workers * frac * total_bytes + margin_total
        if need > total_bytes:
            raise PlanError(
                f"{workers} workers × {_fmt_fraction(frac)} × {gib_text(total_bytes)} GiB + {workers} × "
                f"{context_margin_gb:g} GiB context = {gib_text(need)} GiB > {gib_text(total_bytes)} GiB; "
                f"lower memory_fraction or workers (auto would give {_auto_hint(total_bytes, workers, margin)})")
    per = int(frac * total_bytes)
    shares: tuple[int, ...] = ()
    if auto and len(needs) == workers and None not in needs and len(set(needs)) > 1:
        shares = _shares_by_need(list(needs), left, models)
        per, frac = max(shares), max(shares) / total_bytes
    plan = GpuPlan(total_bytes=int(total_bytes), workers=workers, fraction=frac, bytes_per_worker=per,
                   margin_bytes_per_worker=margin, margin_total_bytes=margin_total,
                   headroom_bytes=int(total_bytes - (sum(shares) or workers * per) - margin_total), auto=auto,
                   worker_bytes=shares)
    _check_needs(plan, needs, models)
    return plan


def _label(i: int, models: Sequence[str]) -> str:
    return f"worker_{i + 1}" + (f" ({models[i]})" if i < len(models) else "")


def _shares_by_need(needs: list[int], left: float, models: Sequence[str]) -> tuple[int, ...]:
    """Each worker's need plus an equal part of what ``left`` holds beyond all the needs."""
    spare = left - sum(needs)
    if spare < 0:
        listed = " + ".join(f"{gib_text(n)} ({_label(i, models)})" for i, n in enumerate(needs))
        raise PlanError(f"the workers' models do not fit: their training state (weights, gradients, optimizer) "
                        f"{listed} = {gib_text(sum(needs))} GiB > {gib_text(left)} GiB left after the context margins "
                        f"and the {AUTO_RESERVE:.0%} reserve; use smaller models or fewer workers")
    return tuple(int(n + spare / len(needs)) for n in needs)


def _check_needs(plan: GpuPlan, needs: Sequence[int | None], models: Sequence[str]) -> None:
    """A worker whose model's training state alone exceeds its share would only run out of memory: refuse now."""
    for i, need in enumerate(needs[: plan.workers]):
        if need is not None and need > plan.share(i + 1):
            hint = ("lower supervisor.workers" if plan.auto else
                    "raise memory_fraction, or set it to auto (each worker's share then follows its model)")
            raise PlanError(f"{_label(i, models)} needs about {gib_text(need)} GiB for its weights, gradients and "
                            f"optimizer state, more than its share of {gib_text(plan.share(i + 1))} GiB; {hint}")


def _auto_hint(total: int, workers: int, margin: int) -> str:
    left = total - workers * margin - AUTO_RESERVE * total
    return f"{left / workers / total:.2f}" if left > 0 else "no room either"


# --------------------------------------------------------------------------- what a worker's model needs

# Parameters of the built-in models (sapo.tiny_model; tests/test_hetero.py checks them against the real ones).
BUILTIN_PARAMS = {"builtin:tiny-gpt2": 198_400, "builtin:tiny-gpt2-wide": 1_022_720, "builtin:gpt2-124m": 124_439_808}
_MAX_HEADER = 64 << 20  # a safetensors header larger than this is not one we read


def training_bytes(params: int, dtype: str, optimizer: str = "auto", kl_beta: float = 0.0) -> int:
    """The memory a worker holds whatever its batch: weights and gradients in the weights' dtype (``auto`` is
    bfloat16 on a GPU), Adam's two moments (float32 for ``adamw_sr`` and float32 weights, else the weights'
    dtype) and, when ``kl_beta`` > 0, the frozen reference copy."""
    weight = 4 if dtype == "float32" else 2
    moments = 8 if weight == 4 or optimizer in ("auto", "adamw_sr") else 2 * weight
    return params * (2 * weight + moments + (weight if kl_beta > 0 else 0))


def model_params(name: str, environ: Mapping[str, str] | None = None) -> int | None:
    """How many parameters model ``name`` has, without torch or network: the built-in table, else the
    safetensors headers of a local directory or of the Hugging Face cache's snapshot; None when unknown."""
    if name in BUILTIN_PARAMS:
        return BUILTIN_PARAMS[name]
    env = os.environ if environ is None else environ
    local = Path(name).expanduser()
    folder = local if local.is_dir() else _hub_snapshot(name, env)
    return _safetensors_params(folder) if folder is not None else None


def _hub_snapshot(repo_id: str, env: Mapping[str, str]) -> Path | None:
    """The cached snapshot of ``repo_id``'s main revision (huggingface_hub's cache layout), if any."""
    if env.get("HF_HUB_CACHE"):
        root = Path(env["HF_HUB_CACHE"])
    elif env.get("HF_HOME"):
        root = Path(env["HF_HOME"]) / "hub"
    else:
        root = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface" / "hub"
    repo = root.expanduser() / f"models--{repo_id.replace('/', '--')}"
    try:
        revision = (repo / "refs" / "main").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    snapshot = repo / "snapshots" / revision
    return snapshot if revision and "/" not in revision and snapshot.is_dir() else None


def _safetensors_params(folder: Path) -> int | None:
    """The parameters in ``folder``'s safetensors file(s), counted from their headers (shapes only)."""
    try:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            return None
        total = 0
        for file in files:
            with open(folder / file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size <= _MAX_HEADER:
                    return None
                header = json.loads(f.read(size))
            total += sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__")
        return total
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
