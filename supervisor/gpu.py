"""The GPU as the supervisor sees it: NVML behind a small interface, the chosen device, memory plans, PIDs.

:func:`open_gpu` returns an :class:`NvmlGpu` or None (no library, no driver, no device): the
supervisor then watches with psutil only and says so once. :func:`requested_gpu` reads which device the
operator asked for (``supervisor.gpu``, else an inherited ``CUDA_VISIBLE_DEVICES``, else GPU 0) and
:meth:`GpuInfo.device` turns it into a :class:`GpuDevice` (a whole GPU or a MIG instance) with its UUID,
which is what workers get in ``CUDA_VISIBLE_DEVICES``: a UUID means one device whatever the order.
Tests pass ``tests/doubles.py``'s ``FakeGpu`` instead. NVML reports PIDs as the host sees them; a node's
PID inside a container differs, so :func:`match_gpu_processes` tries every PID of the node's ``NSpid:``
line. Unknown is never zero: a process list NVML cannot give is None, a process whose memory NVML does
not report has ``used_bytes`` None. Never imports torch.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, NamedTuple, Protocol, Sequence

import structlog

GIB = 1024 ** 3
AUTO_RESERVE = 0.05  # share of the device kept free by memory_fraction: auto
NVML_VALUE_NOT_AVAILABLE = 2 ** 64 - 1  # unsigned long long -1: NVML's "not available" (MIG, containers)
PROCESS_QUERY_VERSIONS = ("v3", "v2", "v1")  # newest first; a driver < R510 has no _v3
_INDEX = re.compile(r"[0-9]+")


class GpuProcess(NamedTuple):
    pid: int  # as NVML reports it (the host's view)
    used_bytes: int | None  # None when the driver does not say (MIG, some containers): unknown, not 0


@dataclass(frozen=True)
class GpuDevice:
    """The device the workers share: a whole GPU, or one MIG instance with its own memory."""

    uuid: str  # GPU-… or MIG-…: what the workers get in CUDA_VISIBLE_DEVICES
    index: int | None  # NVML index of the GPU (of the parent GPU for a MIG instance): PCI bus order
    total_bytes: int  # this device's memory (a MIG instance: its slice, not the card)
    name: str = ""
    mig: bool = False

    def describe(self) -> str:
        where = f"GPU {self.index}" if self.index is not None else "a GPU"
        what = f"MIG instance {self.uuid} of {where}" if self.mig else f"{where} {self.uuid}"
        return f"{what} ({self.name + ', ' if self.name else ''}{_gib(self.total_bytes)} GiB)"


class NoSuchGpu(LookupError):
    """The requested index or UUID names no device NVML sees; the message lists what it sees."""


class Release(str, enum.Enum):
    """What :func:`wait_gpu_released` found. UNKNOWN is never taken for RELEASED."""

    RELEASED = "released"  # NVML no longer lists any of the pids
    HELD = "held"  # still listed when the wait ended
    UNKNOWN = "unknown"  # the process list could not be read


class GpuInfo(Protocol):
    """What the supervisor asks of a GPU backend."""

    def device_count(self) -> int: ...

    def device(self, spec: str) -> GpuDevice:
        """An NVML index ("1") or a UUID (or unique prefix) GPU-…/MIG-…; :class:`NoSuchGpu` otherwise.

        A GPU in MIG mode gives its first MIG instance: CUDA cannot use the card as a whole then.
        """

    def processes(self, device: GpuDevice) -> list[GpuProcess] | None:
        """Compute processes on ``device``; None when the list cannot be read (unknown, not empty)."""

    def utilization(self, device: GpuDevice) -> int | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class GpuRequest:
    """Which device the operator asked for, before NVML is asked whether it exists."""

    spec: str | None  # an NVML index ("1") or a UUID; None: CUDA_VISIBLE_DEVICES hides every GPU
    source: str  # "supervisor.gpu", "CUDA_VISIBLE_DEVICES" or "default"
    inherited: str | None = None  # CUDA_VISIBLE_DEVICES as inherited (None: unset)

    @property
    def field(self) -> str:
        """The setting to name in an error about this request."""
        return "CUDA_VISIBLE_DEVICES" if self.source == "CUDA_VISIBLE_DEVICES" else "supervisor.gpu"

    def describe(self) -> str:
        if self.source == "default":
            return "supervisor.gpu auto, no CUDA_VISIBLE_DEVICES"
        if self.source == "CUDA_VISIBLE_DEVICES":
            return f"CUDA_VISIBLE_DEVICES={self.inherited}"
        return f"supervisor.gpu={self.spec}"


def requested_gpu(configured: str | int, environ: Mapping[str, str]) -> GpuRequest:
    """``supervisor.gpu`` wins; with ``auto``, the first entry of an inherited ``CUDA_VISIBLE_DEVICES``
    (an index or a UUID, as CUDA reads it); without one, GPU 0.

    An empty ``CUDA_VISIBLE_DEVICES`` (or one starting with ``-1``, CUDA's "none") hides every GPU: spec None.
    Its indices are read in PCI bus order, NVML's and nvidia-smi's (CUDA's default order can differ on a box
    of mixed GPUs: a UUID is never ambiguous).
    """
    inherited = environ.get("CUDA_VISIBLE_DEVICES")
    if str(configured) != "auto":
        return GpuRequest(str(configured).strip(), "supervisor.gpu", inherited)
    if inherited is None:
        return GpuRequest("0", "default")
    first = inherited.split(",")[0].strip()
    if not first or first.startswith("-"):
        return GpuRequest(None, "CUDA_VISIBLE_DEVICES", inherited)
    return GpuRequest(first, "CUDA_VISIBLE_DEVICES", inherited)


def is_index(spec: str) -> bool:
    """True when ``spec`` names a GPU by its NVML index (else it is a UUID or a UUID prefix)."""
    return _INDEX.fullmatch(spec) is not None


def match_uuid(candidates: Sequence[GpuDevice], spec: str) -> GpuDevice:
    """The one candidate whose UUID is ``spec`` or starts with it (CUDA accepts unique prefixes too)."""
    exact = [d for d in candidates if d.uuid == spec]
    found = exact or [d for d in candidates if d.uuid.startswith(spec)]
    if len(found) == 1:
        return found[0]
    why = "is ambiguous" if found else "matches no device"
    raise NoSuchGpu(f"{spec} {why}; NVML sees {seen_text(candidates)}")


def _used_bytes(value) -> int | None:
    """``usedGpuMemory`` as bytes, or None when NVML does not know (None or the not-available sentinel)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < NVML_VALUE_NOT_AVAILABLE:
        return None
    return value


# --------------------------------------------------------------------------- NVML

class _ProcessInfoV1(ctypes.Structure):
    """``nvmlProcessInfo_v1_t``: what the unversioned C symbol fills; pynvml 13 knows only the v2/v3 layout."""

    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]


def _running_processes_v1(nv, handle) -> list:
    """``nvmlDeviceGetComputeRunningProcesses`` with the v1 struct (drivers before _v2, R450), as pynvml 11 did."""
    fn = nv._nvmlGetFunctionPointer("nvmlDeviceGetComputeRunningProcesses")  # NVMLError_FunctionNotFound
    count = ctypes.c_uint(0)
    ret = fn(handle, ctypes.byref(count), None)
    if ret == getattr(nv, "NVML_SUCCESS", 0):
        return []
    if ret != getattr(nv, "NVML_ERROR_INSUFFICIENT_SIZE", 7):
        raise nv.NVMLError(ret)
    count.value = count.value * 2 + 5  # room for processes started between the two calls
    infos = (_ProcessInfoV1 * count.value)()
    ret = fn(handle, ctypes.byref(count), infos)
    if ret != getattr(nv, "NVML_SUCCESS", 0):
        raise nv.NVMLError(ret)
    return [infos[i] for i in range(count.value)]


class NvmlGpu:
    """:class:`GpuInfo` over ``pynvml`` (package nvidia-ml-py). Construction calls ``nvmlInit``.

    Monitoring calls never raise: ``processes`` gives None and ``utilization`` None when NVML cannot
    answer (each failure kind logged once).
    """

    def __init__(self, log=None):
        import pynvml  # local: a missing package is open_gpu's business

        self._nv = pynvml
        self._log = log or structlog.get_logger(__name__)
        self._warned: set[str] = set()
        pynvml.nvmlInit()
        self._open = True
        self._handles: dict[str, object] = {}  # uuid -> handle of the devices handed out by device()
        self._process_query: str | None = None  # the _vN that works here; "none" when none does

    def _warn_once(self, what: str, err: Exception) -> None:
        if what not in self._warned:
            self._warned.add(what)
            self._log.warning("nvml_query_failed", query=what, error=f"{type(err).__name__}: {err}")

    def device_count(self) -> int:
        return int(self._nv.nvmlDeviceGetCount())

    # ----- choosing the device

    def device(self, spec: str) -> GpuDevice:
        nv = self._nv
        spec = str(spec).strip()
        if is_index(spec):
            index, count = int(spec), self.device_count()
            if index >= count:
                raise NoSuchGpu(f"no GPU {index}; NVML sees {self._seen()}")
            handle = nv.nvmlDeviceGetHandleByIndex(index)
        else:
            try:
                handle = nv.nvmlDeviceGetHandleByUUID(spec)
            except Exception:  # noqa: BLE001 - NVMLError_NotFound: a prefix, or a MIG UUID on an old driver
                inventory = self._inventory()
                handle = self._find_handle(match_uuid(inventory, spec).uuid)
            if self._is_mig(handle):
                return self._remember(self._describe(handle, mig=True), handle)
            index = self._index(handle)
        migs = self._mig_handles(handle)
        if migs:  # CUDA sees only MIG instances on a card in MIG mode: take the first, with its own memory
            return self._remember(self._describe(migs[0], mig=True, index=index), migs[0])
        return self._remember(self._describe(handle, mig=False, index=index), handle)

    def _remember(self, device: GpuDevice, handle) -> GpuDevice:
        self._handles[device.uuid] = handle
        return device

    def _uuid(self, handle) -> str:
        uuid = self._nv.nvmlDeviceGetUUID(handle)
        return uuid.decode() if isinstance(uuid, bytes) else str(uuid)

    def _name(self, handle) -> str:
        try:
            name = self._nv.nvmlDeviceGetName(handle)
        except Exception:  # noqa: BLE001 - the name is decoration
            return ""
        return name.decode() if isinstance(name, bytes) else str(name)

    def _index(self, handle) -> int | None:
        try:
            return int(self._nv.nvmlDeviceGetIndex(handle))
        except Exception:  # noqa: BLE001 - decoration too
            return None

    def _is_mig(self, handle) -> bool:
        try:
            flag = self._nv.nvmlDeviceIsMigDeviceHandle(handle)
        except Exception:  # noqa: BLE001 - a driver without MIG: not a MIG handle
            return False
        return bool(getattr(flag, "value", flag))

    def _describe(self, handle, *, mig: bool, index: int | None = None) -> GpuDevice:
        if mig and index is None:
            try:
                index = self._index(self._nv.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle))
            except Exception:  # noqa: BLE001
                index = None
        return GpuDevice(uuid=self._uuid(handle), index=index,
                         total_bytes=int(self._nv.nvmlDeviceGetMemoryInfo(handle).total),
                         name=self._name(handle), mig=mig)

    def _mig_handles(self, handle) -> list:
        """The MIG instances of a GPU in MIG mode ([] when MIG is off or the driver predates it)."""
        nv = self._nv
        try:
            current, _pending = nv.nvmlDeviceGetMigMode(handle)
            if current != getattr(nv, "NVML_DEVICE_MIG_ENABLE", 1):
                return []
            slots = int(nv.nvmlDeviceGetMaxMigDeviceCount(handle))
        except Exception:  # noqa: BLE001 - NVMLError_NotSupported, FunctionNotFound: no MIG
            return []
        out = []
        for slot in range(slots):
            try:
                out.append(nv.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot))
            except Exception:  # noqa: BLE001 - an empty slot (NVMLError_NotFound)
                continue
        return out

    def _all_handles(self) -> list[tuple[object, bool, int]]:
        """(handle, is MIG, GPU index) for every GPU and every MIG instance."""
        out = []
        for index in range(self.device_count()):
            handle = self._nv.nvmlDeviceGetHandleByIndex(index)
            out.append((handle, False, index))
            out.extend((m, True, index) for m in self._mig_handles(handle))
        return out

    def _inventory(self) -> list[GpuDevice]:
        return [self._describe(h, mig=mig, index=i) for h, mig, i in self._all_handles()]

    def _find_handle(self, uuid: str):
        for handle, _mig, _index in self._all_handles():
            if self._uuid(handle) == uuid:
                return handle
        raise NoSuchGpu(f"{uuid} vanished while it was looked up")

    def _seen(self) -> str:
        try:
            devices = self._inventory()
        except Exception as err:  # noqa: BLE001 - an error message must not fail
            return f"devices it cannot list ({type(err).__name__}: {err})"
        return seen_text(devices)

    def _handle_of(self, device: GpuDevice):
        if device.uuid not in self._handles:
            self._handles[device.uuid] = self._nv.nvmlDeviceGetHandleByUUID(device.uuid)
        return self._handles[device.uuid]

    # ----- monitoring

    def processes(self, device: GpuDevice) -> list[GpuProcess] | None:
        if self._process_query == "none":
            return None
        try:
            raw = self._running_processes(self._handle_of(device))
        except Exception as err:  # noqa: BLE001 - NVMLError (not supported, permissions...): unknown
            self._warn_once("processes", err)
            return None
        return [GpuProcess(int(p.pid), _used_bytes(getattr(p, "usedGpuMemory", None))) for p in raw]

    def _running_processes(self, handle) -> list:
        """``nvmlDeviceGetComputeRunningProcesses_v3``, else ``_v2``, else ``_v1``; the one that works is kept.

        pynvml 13's unversioned function calls only _v3, and on a driver without it (< R510, e.g. the 470
        LTS of rented A100s) raises ``NVMLLibraryMismatchError``, a plain Exception.
        """
        versions = (self._process_query,) if self._process_query else PROCESS_QUERY_VERSIONS
        missing = []
        for version in versions:
            fn = self._process_query_fn(version)
            if fn is None:
                missing.append(f"_{version}: not in pynvml")
                continue
            try:
                found = fn(handle)
            except Exception as err:  # noqa: BLE001 - sorted just below
                if not self._missing_function(err):
                    raise
                missing.append(f"_{version}: {type(err).__name__}")
                continue
            if self._process_query != version:
                self._process_query = version
                if version != PROCESS_QUERY_VERSIONS[0]:
                    self._log.info("nvml_process_query", version=version, skipped=missing,
                                   detail="an older driver: using an older process query")
            return found
        self._process_query = "none"
        raise RuntimeError("no nvmlDeviceGetComputeRunningProcesses this driver and pynvml share ("
                           + ", ".join(missing) + "): per-process GPU memory is unknown")

    def _process_query_fn(self, version: str):
        fn = getattr(self._nv, f"nvmlDeviceGetComputeRunningProcesses_{version}", None)
        if fn is None and version == "v1" and hasattr(self._nv, "_nvmlGetFunctionPointer"):
            fn = functools.partial(_running_processes_v1, self._nv)
        return fn

    def _missing_function(self, err: Exception) -> bool:
        """The driver lacks the function: pynvml's mismatch error, or an NVMLError FUNCTION_NOT_FOUND."""
        nv = self._nv
        mismatch = getattr(nv, "NVMLLibraryMismatchError", None)
        if isinstance(mismatch, type) and isinstance(err, mismatch):
            return True
        nvml_error = getattr(nv, "NVMLError", None)
        return (isinstance(nvml_error, type) and isinstance(err, nvml_error)
                and getattr(err, "value", None) == getattr(nv, "NVML_ERROR_FUNCTION_NOT_FOUND", 13))

    def utilization(self, device: GpuDevice) -> int | None:
        try:
            return int(self._nv.nvmlDeviceGetUtilizationRates(self._handle_of(device)).gpu)
        except Exception as err:  # noqa: BLE001 - NVMLError_NotSupported under MIG, mismatch errors...
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


def seen_text(devices: Sequence[GpuDevice]) -> str:
    """``GPU 0 GPU-… (name, 80.0 GiB); …`` for error messages, or "no devices"."""
    if not devices:
        return "no devices"
    return "; ".join(d.describe() for d in devices)


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
                        proc_root: str | os.PathLike = "/proc") -> dict[int, int | None]:
    """``{child_pid: used_bytes}`` for the children NVML lists (any NSpid value may match).

    A child listed several times gets the sum; if NVML does not know the memory of any of its entries
    the child maps to None (unknown, never 0). Children NVML does not list are absent.
    """
    by_pid: dict[int, list[GpuProcess]] = {}
    for gp in gpu_processes:
        by_pid.setdefault(gp.pid, []).append(gp)
    out: dict[int, int | None] = {}
    for child in child_pids:
        for candidate in nvml_pids_for(child, proc_root):
            if candidate in by_pid:
                used = [gp.used_bytes for gp in by_pid[candidate]]
                out[child] = None if any(u is None for u in used) else sum(used)
                break
    return out


def wait_gpu_released(gpu: GpuInfo | None, device: GpuDevice | None, pids: Iterable[int], timeout_s: float,
                      poll_s: float = 0.5, sleep: Callable[[float], None] = time.sleep,
                      now: Callable[[], float] = time.monotonic) -> Release:
    """Wait (at most ``timeout_s``) until ``device`` no longer lists any of ``pids``.

    Call it before respawning a killed worker on a GPU: its memory can stay allocated for seconds.
    ``pids`` are as NVML reports them (see :func:`nvml_pids_for`). A process list that cannot be read
    (None, or an error) is never taken for "released": the wait goes on, and ends UNKNOWN if the list
    stayed unreadable to the end. No GPU, no device or no pids: RELEASED at once.
    """
    wanted = set(pids)
    if gpu is None or device is None or not wanted:
        return Release.RELEASED
    deadline = now() + max(0.0, timeout_s)
    while True:
        try:
            listed = gpu.processes(device)
        except Exception:  # noqa: BLE001 - a monitoring failure: unknown, never released
            listed = None
        if listed is not None and not wanted & {gp.pid for gp in listed}:
            return Release.RELEASED
        left = deadline - now()
        if left <= 0:
            return Release.UNKNOWN if listed is None else Release.HELD
        sleep(min(poll_s, left))


# --------------------------------------------------------------------------- memory plan

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
