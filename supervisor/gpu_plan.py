"""Sharing one device's memory among the workers: :func:`plan_memory` gives a :class:`GpuPlan` or a
:class:`PlanError` with the numbers. The coordinator uses no GPU. Never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def planned_bytes(self) -> int:
        return self.workers * (self.bytes_per_worker + self.margin_bytes_per_worker)

    def budget_bytes(self) -> int:
        """What one worker may hold on the device (its share plus its context) before it is over."""
        return self.bytes_per_worker + self.margin_bytes_per_worker

    def describe(self) -> str:
        how = "auto" if self.auto else "configured"
        return (f"{self.workers} workers × {_fmt_fraction(self.fraction)} ({how}) × "
                f"{gib_text(self.total_bytes)} GiB + {self.workers} × {gib_text(self.margin_bytes_per_worker)} GiB "
                f"context = {gib_text(self.planned_bytes)} GiB of {gib_text(self.total_bytes)} GiB "
                f"({gib_text(self.headroom_bytes)} GiB headroom)")


def _fmt_fraction(f: float) -> str:
    return f"{f:.2f}" if abs(round(f, 2) - f) < 1e-12 else f"{f:.4f}"


def plan_memory(total_bytes: int, workers: int, fraction: float | str, context_margin_gb: float) -> GpuPlan:
    """Share a device of ``total_bytes`` among ``workers``; raise :class:`PlanError` if it cannot fit.

    A number: each worker gets that fraction, and ``workers × (fraction × total + margin)`` must fit.
    ``"auto"``: ``(total − workers × margin − 5 % reserve) / workers / total``.
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
    return GpuPlan(total_bytes=int(total_bytes), workers=workers, fraction=frac, bytes_per_worker=per,
                   margin_bytes_per_worker=margin, margin_total_bytes=margin_total,
                   headroom_bytes=int(total_bytes - workers * (per + margin)), auto=auto)


def _auto_hint(total: int, workers: int, margin: int) -> str:
    left = total - workers * margin - AUTO_RESERVE * total
    return f"{left / workers / total:.2f}" if left > 0 else "no room either"
