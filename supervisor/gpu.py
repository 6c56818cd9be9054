"""The GPU as the supervisor sees it: NVML behind a small interface, memory plans, PID mapping.

:func:`open_gpu` returns an :class:`NvmlGpu` or None (no library, no driver, no device): the
supervisor then watches with psutil only and says so once. :class:`FakeGpu` stands in for NVML in
tests and reports only PIDs that really live. NVML reports PIDs as the host sees them; a node's PID
inside a container differs, so :func:`match_gpu_processes` tries every PID of the node's ``NSpid:``
line. Never imports torch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, NamedTuple, Protocol

import psutil
import structlog

GIB = 1024 ** 3
AUTO_RESERVE = 0.05  # share of the device kept free by memory_fraction: auto


class GpuProcess(NamedTuple):
    pid: int  # as NVML reports it (the host's view)
    used_bytes: int | None  # None when the driver does not say (some containers / MIG)


class GpuInfo(Protocol):
    """What the supervisor asks of a GPU backend."""

    def device_count(self) -> int: ...

    def total_memory_bytes(self, index: int) -> int: ...

    def processes(self, index: int) -> list[GpuProcess]: ...

    def utilization(self, index: int) -> int | None: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- NVML

class NvmlGpu:
    """:class:`GpuInfo` over ``pynvml`` (package nvidia-ml-py). Construction calls ``nvmlInit``.

    Monitoring calls never raise an NVML error: ``processes`` gives [] and ``utilization`` None
    (each failure kind logged once).
    """

    def __init__(self, log=None):
        import pynvml  # local: a missing package is open_gpu's business

        self._nv = pynvml
        self._log = log or structlog.get_logger(__name__)
        self._warned: set[str] = set()
        pynvml.nvmlInit()
        self._open = True
        self._handles: dict[int, object] = {}

    def _handle(self, index: int):
        if index not in self._handles:
            self._handles[index] = self._nv.nvmlDeviceGetHandleByIndex(index)
        return self._handles[index]

    def _warn_once(self, what: str, err: Exception) -> None:
        if what not in self._warned:
            self._warned.add(what)
            self._log.warning("nvml_query_failed", query=what, error=str(err))

    def device_count(self) -> int:
        return int(self._nv.nvmlDeviceGetCount())

    def total_memory_bytes(self, index: int) -> int:
        return int(self._nv.nvmlDeviceGetMemoryInfo(self._handle(index)).total)

    def processes(self, index: int) -> list[GpuProcess]:
        try:
            procs = self._nv.nvmlDeviceGetComputeRunningProcesses(self._handle(index))
        except self._nv.NVMLError as err:
            self._warn_once("processes", err)
            return []
        out = []
        for p in procs:
            used = getattr(p, "usedGpuMemory", None)
            out.append(GpuProcess(int(p.pid), int(used) if isinstance(used, int) else None))
        return out

    def utilization(self, index: int) -> int | None:
        try:
            return int(self._nv.nvmlDeviceGetUtilizationRates(self._handle(index)).gpu)
        except self._nv.NVMLError as err:
            self._warn_once("utilization", err)
            return None

    def close(self) -> None:
        if self._open:
            self._open = False
            self._handles.clear()
            try:
                self._nv.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down, nothing useful to do
                pass


def open_gpu(log=None) -> GpuInfo | None:
    """An NVML-backed :class:`GpuInfo`, or None (logging one info line) when there is no usable GPU.

    Never raises: a missing package, library or driver, or zero devices, all give None.
    """
    log = log or structlog.get_logger(__name__)
    gpu = None
    try:
        gpu = NvmlGpu(log=log)
        if gpu.device_count() < 1:
            gpu.close()
            why = "no devices"
        else:
            return gpu
    except Exception as err:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, driver errors...
        if gpu is not None:
            gpu.close()
        why = f"{type(err).__name__}: {err}".strip().rstrip(":")
    log.info(f"NVML unavailable ({why}): monitoring with psutil only")
    return None


# --------------------------------------------------------------------------- fake

class FakeGpu:
    """A stand-in for tests: one or more devices of ``total_bytes``, a mutable ``used`` map pid→bytes.

    Like NVML it lists only processes that really exist (psutil, zombies excluded), except PIDs
    told to :meth:`linger`: those stay listed for a while after death, as a killed CUDA process's
    memory does until the driver frees it.
    """

    def __init__(self, total_bytes: int, used: Mapping[int, int] | None = None, *, devices: int = 1,
                 utilization: int | None = 0, clock: Callable[[], float] = time.monotonic):
        self.total_bytes = int(total_bytes)
        self.used: dict[int, int] = dict(used or {})
        self.devices = devices
        self.util = utilization
        self.clock = clock
        self.lingering: dict[int, float] = {}  # pid -> monotonic time it stops being listed
        self.closed = False

    def linger(self, pid: int, seconds: float = float("inf")) -> None:
        """Keep listing ``pid`` for ``seconds`` even once it is dead (until :meth:`release`)."""
        self.lingering[pid] = self.clock() + seconds

    def release(self, pid: int) -> None:
        """The driver freed ``pid``'s memory: stop listing it once it is dead."""
        self.lingering.pop(pid, None)
        self.used.pop(pid, None)

    def _listed(self, pid: int) -> bool:
        until = self.lingering.get(pid)
        if until is not None and self.clock() < until:
            return True
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:
            return True

    def _check(self, index: int) -> None:
        if self.closed:
            raise RuntimeError("FakeGpu used after close()")
        if not 0 <= index < self.devices:
            raise IndexError(f"no GPU {index} (have {self.devices})")

    def device_count(self) -> int:
        self._check(0)
        return self.devices

    def total_memory_bytes(self, index: int) -> int:
        self._check(index)
        return self.total_bytes

    def processes(self, index: int) -> list[GpuProcess]:
        self._check(index)
        if index != 0:
            return []
        return [GpuProcess(pid, used) for pid, used in sorted(self.used.items()) if self._listed(pid)]

    def utilization(self, index: int) -> int | None:
        self._check(index)
        return self.util

    def close(self) -> None:
        self.closed = True


# --------------------------------------------------------------------------- PID mapping

def nvml_pids_for(pid: int, proc_root: str | os.PathLike = "/proc") -> list[int]:
    """Every PID ``pid`` has across PID namespaces, from its ``NSpid:`` line in ``/proc/<pid>/status``.

    The first value is the view of the namespace that mounted ``proc_root`` (the host's, when read
    on the host), the last the innermost (the container's own). Without an NSpid line (old kernel)
    or a status file (process gone) the answer is ``[pid]``. NVML reports host PIDs, so record
    this while the process lives if you need it after its death.
    """
    try:
        with open(os.path.join(os.fspath(proc_root), str(pid), "status"), encoding="ascii",
                  errors="replace") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    pids: list[int] = []
                    for tok in line.split()[1:]:
                        if tok.isdigit() and int(tok) not in pids:
                            pids.append(int(tok))
                    if pid not in pids:
                        pids.append(pid)
                    return pids
    except OSError:
        pass
    return [pid]


def match_gpu_processes(child_pids: Iterable[int], gpu_processes: Iterable[GpuProcess], *,
                        proc_root: str | os.PathLike = "/proc") -> dict[int, int]:
    """``{child_pid: used_bytes}`` for the children NVML lists (any NSpid value may match).

    A child listed on several devices gets the sum; unknown usage (None) counts as 0 bytes but
    the child still appears. Children NVML does not list are absent.
    """
    by_pid: dict[int, list[GpuProcess]] = {}
    for gp in gpu_processes:
        by_pid.setdefault(gp.pid, []).append(gp)
    out: dict[int, int] = {}
    for child in child_pids:
        for candidate in nvml_pids_for(child, proc_root):
            if candidate in by_pid:
                out[child] = sum(gp.used_bytes or 0 for gp in by_pid[candidate])
                break
    return out


def wait_gpu_released(gpu: GpuInfo | None, pids: Iterable[int], timeout_s: float, poll_s: float = 0.5,
                      sleep: Callable[[float], None] = time.sleep,
                      now: Callable[[], float] = time.monotonic) -> bool:
    """Wait (at most ``timeout_s``) until no device lists any of ``pids``; True when released.

    Call it before respawning a killed worker on a GPU: its memory can stay allocated for seconds.
    ``pids`` are as NVML reports them (see :func:`nvml_pids_for`). No GPU: True at once.
    """
    wanted = set(pids)
    if gpu is None or not wanted:
        return True
    deadline = now() + max(0.0, timeout_s)
    while True:
        listed = {gp.pid for i in range(gpu.device_count()) for gp in gpu.processes(i)}
        if not wanted & listed:
            return True
        left = deadline - now()
        if left <= 0:
            return False
        sleep(min(poll_s, left))


# --------------------------------------------------------------------------- memory plan

class PlanError(ValueError):
    """A GPU memory plan that cannot fit the device; the message carries the numbers."""


@dataclass(frozen=True)
class GpuPlan:
    """How one device's memory is shared by the workers (the coordinator uses no GPU)."""

    total_bytes: int
    workers: int
    fraction: float  # per worker, for torch.cuda.set_per_process_memory_fraction
    bytes_per_worker: int  # fraction × total
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
                f"{_gib(self.total_bytes)} GiB + {self.workers} × {_gib(self.margin_bytes_per_worker)} GiB "
                f"context = {_gib(self.planned_bytes)} GiB of {_gib(self.total_bytes)} GiB "
                f"({_gib(self.headroom_bytes)} GiB headroom)")


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


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
                f"{AUTO_RESERVE:.0%} reserve = {_gib(margin_total + reserve)} GiB >= {_gib(total_bytes)} GiB")
        frac = left / workers / total_bytes
    else:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise PlanError(f"memory_fraction must be 'auto' or a number in (0, 1], got {fraction!r}")
        frac = float(fraction)
        need = workers * frac * total_bytes + margin_total
        if need > total_bytes:
            raise PlanError(
                f"{workers} workers × {_fmt_fraction(frac)} × {_gib(total_bytes)} GiB + {workers} × "
                f"{context_margin_gb:g} GiB context = {_gib(need)} GiB > {_gib(total_bytes)} GiB; "
                f"lower memory_fraction or workers (auto would give {_auto_hint(total_bytes, workers, margin)})")
    per = int(frac * total_bytes)
    return GpuPlan(total_bytes=int(total_bytes), workers=workers, fraction=frac, bytes_per_worker=per,
                   margin_bytes_per_worker=margin, margin_total_bytes=margin_total,
                   headroom_bytes=int(total_bytes - workers * (per + margin)), auto=auto)


def _auto_hint(total: int, workers: int, margin: int) -> str:
    left = total - workers * margin - AUTO_RESERVE * total
    return f"{left / workers / total:.2f}" if left > 0 else "no room either"
