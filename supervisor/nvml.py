"""NVML behind :class:`supervisor.gpu.GpuInfo`: :func:`open_gpu` and :class:`NvmlGpu` over ``pynvml``.

:func:`open_gpu` returns an :class:`NvmlGpu` or None (no library, no driver, no device): the supervisor
then watches with psutil only and says so once. The process list falls back from
``nvmlDeviceGetComputeRunningProcesses_v3`` to ``_v2`` to the unversioned v1 symbol (called through
ctypes, as pynvml 13 no longer can), so old drivers still report per-process memory. A GPU in MIG mode
gives its first MIG instance. Monitoring calls never raise. Never imports torch.
"""

from __future__ import annotations

import ctypes
import functools

import structlog

from supervisor.gpu import GpuDevice, GpuInfo, GpuProcess, NoSuchGpu, is_index, match_uuid, seen_text

NVML_VALUE_NOT_AVAILABLE = 2 ** 64 - 1  # unsigned long long -1: NVML's "not available" (MIG, containers)
PROCESS_QUERY_VERSIONS = ("v3", "v2", "v1")  # newest first; a driver < R510 has no _v3


def _used_bytes(value) -> int | None:
    """``usedGpuMemory`` as bytes, or None when NVML does not know (None or the not-available sentinel)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < NVML_VALUE_NOT_AVAILABLE:
        return None
    return value


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
