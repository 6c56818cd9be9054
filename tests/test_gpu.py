"""supervisor.gpu, .nvml, .gpu_plan, .gpu_pids: NVML absence, a fake pynvml (old drivers, MIG, unknown
memory), the device choice, the fake GPU, memory plans, container PID mapping, release waits."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import types

import pytest

from doubles import FakeGpu, fake_uuid
from harness import wait_for
from supervisor import gpu as gpumod
from supervisor.gpu import GIB, GpuDevice, GpuProcess, NoSuchGpu, requested_gpu
from supervisor.gpu_pids import Release, match_gpu_processes, nvml_pids_for, wait_gpu_released
from supervisor.gpu_plan import PlanError, plan_memory
from supervisor.nvml import NvmlGpu, open_gpu


class RecordingLog:
    def __init__(self):
        self.lines = []

    def info(self, event, **kw):
        self.lines.append(("info", event, kw))

    def warning(self, event, **kw):
        self.lines.append(("warning", event, kw))


class Clock:
    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


@pytest.fixture
def children():
    procs: list[subprocess.Popen] = []

    def start(n=1):
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        return procs[-n:]

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=5)


def test_open_gpu_is_none_here_without_raising(monkeypatch):
    log = RecordingLog()
    assert open_gpu(log=log) is None  # no NVML driver on developer/CI machines
    assert len(log.lines) == 1
    level, text, _ = log.lines[0]
    assert level == "info" and text.startswith("NVML unavailable (") and text.endswith(
        "): monitoring with psutil only")


def test_open_gpu_none_when_pynvml_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    log = RecordingLog()
    assert open_gpu(log=log) is None
    assert "ModuleNotFoundError" in log.lines[0][1] and len(log.lines) == 1


NOT_AVAILABLE = 2 ** 64 - 1  # what NVML writes for memory it does not know


def fake_pynvml(procs=(), *, gpus=1, driver=("v3", "v2", "v1"), python=("v3", "v2"), mig=None,
                mig_uuid_lookup=True, fail_procs=None, v3_raises=None):
    """A stand-in ``pynvml`` module shaped like nvidia-ml-py 13, over a scripted driver.

    ``procs``: (pid, usedGpuMemory) listed on every device; a callable is re-read on every call.
    ``driver``: the process-query symbols the driver exports (``v1`` is the unversioned C symbol);
    ``python``: the versioned wrappers the module defines (pynvml 13 has _v3 and _v2, no _v1: its
    unversioned function calls _v3 and raises NVMLLibraryMismatchError when the driver lacks it).
    ``mig``: {gpu index: [MIG instance sizes]}; ``mig_uuid_lookup=False``: an old driver that cannot
    find MIG UUIDs with nvmlDeviceGetHandleByUUID. ``fail_procs``: an NVML error code every query
    returns; ``v3_raises="mismatch"``: _v3 raises NVMLLibraryMismatchError instead of answering.
    """
    calls = []
    mod = types.ModuleType("pynvml")
    mod.NVML_SUCCESS, mod.NVML_ERROR_NOT_SUPPORTED, mod.NVML_ERROR_NOT_FOUND = 0, 3, 6
    mod.NVML_ERROR_INSUFFICIENT_SIZE, mod.NVML_ERROR_FUNCTION_NOT_FOUND, mod.NVML_DEVICE_MIG_ENABLE = 7, 13, 1

    class NVMLError(Exception):
        def __init__(self, value):
            super().__init__(value)
            self.value = value

        def __str__(self):
            return {3: "Not Supported", 6: "Not Found", 13: "Function Not Found"}.get(self.value, str(self.value))

    class NVMLError_FunctionNotFound(NVMLError):  # noqa: N801 - pynvml's name
        def __init__(self, value=13):
            super().__init__(13)

    class NVMLLibraryMismatchError(Exception):
        pass

    def error(code):
        return NVMLError_FunctionNotFound() if code == 13 else NVMLError(code)

    mod.NVMLError, mod.NVMLError_FunctionNotFound = NVMLError, NVMLError_FunctionNotFound
    mod.NVMLLibraryMismatchError = NVMLLibraryMismatchError
    mig = mig or {}
    uuids = {("gpu", i): f"GPU-{i:x}aaaaaaa-1111-2222-3333-444444444444" for i in range(gpus)}
    uuids.update({("mig", i, j): f"MIG-{i:x}{j:x}bbbbbb-1111-2222-3333-444444444444"
                  for i, sizes in mig.items() for j in range(len(sizes))})
    totals = {("gpu", i): 141 * GIB for i in range(gpus)}
    totals.update({("mig", i, j): size for i, sizes in mig.items() for j, size in enumerate(sizes)})

    def listed():
        rows = procs() if callable(procs) else procs
        if fail_procs is not None:
            raise error(fail_procs)
        return [(pid, NOT_AVAILABLE if used is None else used) for pid, used in rows]

    def wrapper(version):
        def query(handle):
            calls.append(f"procs_{version}")
            if version == "v3" and v3_raises == "mismatch":
                raise NVMLLibraryMismatchError("Unversioned function called and the pyNVML version does not match")
            if version not in driver:  # pynvml's _nvmlGetFunctionPointer finds no symbol
                raise NVMLError_FunctionNotFound()
            # pynvml turns NVML_VALUE_NOT_AVAILABLE into None
            return [types.SimpleNamespace(pid=pid, usedGpuMemory=None if used == NOT_AVAILABLE else used,
                                          gpuInstanceId=0, computeInstanceId=0) for pid, used in listed()]
        return query

    for version in python:
        setattr(mod, f"nvmlDeviceGetComputeRunningProcesses_{version}", wrapper(version))

    def unversioned(handle):  # pynvml 13: only _v3, behind @throwOnVersionMismatch
        try:
            return wrapper("v3")(handle)
        except NVMLError_FunctionNotFound:
            raise NVMLLibraryMismatchError("Unversioned function called and the pyNVML version does not match")
    mod.nvmlDeviceGetComputeRunningProcesses = unversioned

    def v1_symbol(handle, count_ref, infos):  # the C ABI: writes the count and the structs through pointers
        calls.append("procs_v1")
        count, rows = count_ref._obj, listed()
        if infos is None or count.value < len(rows):
            count.value = len(rows)
            return 7 if rows else 0
        for i, (pid, used) in enumerate(rows):
            infos[i].pid, infos[i].usedGpuMemory = pid, used
        count.value = len(rows)
        return 0

    def get_function_pointer(name):
        if name == "nvmlDeviceGetComputeRunningProcesses" and "v1" in driver:
            return v1_symbol
        raise NVMLError_FunctionNotFound()
    mod._nvmlGetFunctionPointer = get_function_pointer

    def by_uuid(uuid):
        for key, value in uuids.items():
            if value == uuid and (key[0] == "gpu" or mig_uuid_lookup):
                return key
        raise NVMLError(6)

    def mig_handle(handle, slot):
        sizes = mig.get(handle[1], [])
        if slot >= len(sizes):
            raise NVMLError(6)
        return ("mig", handle[1], slot)

    def utilization(handle):
        if handle[0] == "mig":
            raise NVMLError(3)
        return types.SimpleNamespace(gpu=37, memory=5)

    def index_of(handle):
        if handle[0] == "mig":
            raise NVMLError(3)
        return handle[1]

    mod.__dict__.update(
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: gpus,
        nvmlDeviceGetHandleByIndex=lambda i: ("gpu", i) if i < gpus else (_ for _ in ()).throw(NVMLError(6)),
        nvmlDeviceGetHandleByUUID=by_uuid,
        nvmlDeviceGetUUID=lambda h: uuids[h],
        nvmlDeviceGetName=lambda h: "NVIDIA H200" if h[0] == "gpu" else "NVIDIA H200 MIG 3g.71gb",
        nvmlDeviceGetIndex=index_of,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=totals[h], used=0, free=totals[h]),
        nvmlDeviceGetUtilizationRates=utilization,
        nvmlDeviceGetMigMode=lambda h: [1 if h[0] == "gpu" and h[1] in mig else 0, 0],
        nvmlDeviceGetMaxMigDeviceCount=lambda h: 7,
        nvmlDeviceGetMigDeviceHandleByIndex=mig_handle,
        nvmlDeviceIsMigDeviceHandle=lambda h: ctypes.c_uint(h[0] == "mig"),
        nvmlDeviceGetDeviceHandleFromMigDeviceHandle=lambda h: ("gpu", h[1]),
    )
    return mod, calls


def open_fake(monkeypatch, mod, log=None) -> NvmlGpu:
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    gpu = open_gpu(log=log or RecordingLog())
    assert isinstance(gpu, NvmlGpu)
    return gpu


def test_nvml_gpu_over_a_fake_pynvml(monkeypatch, children):
    a, b = children(2)
    mod, calls = fake_pynvml([(a.pid, 3 * GIB), (b.pid, 0)], gpus=2)
    gpu = open_fake(monkeypatch, mod)
    assert gpu.device_count() == 2
    dev = gpu.device("1")
    assert dev == GpuDevice("GPU-1aaaaaaa-1111-2222-3333-444444444444", 1, 141 * GIB, "NVIDIA H200", mig=False)
    assert gpu.device(dev.uuid) == dev and gpu.device("GPU-1aaa") == dev  # CUDA accepts unique prefixes too
    assert gpu.processes(dev) == [GpuProcess(a.pid, 3 * GIB), GpuProcess(b.pid, 0)]  # 0 is a figure, kept
    assert gpu.utilization(dev) == 37
    assert calls.count("procs_v3") == 1
    gpu.close()
    gpu.close()
    assert calls[0] == "init" and calls[-1] == "shutdown" and calls.count("shutdown") == 1


def test_no_such_device_names_what_nvml_sees(monkeypatch):
    gpu = open_fake(monkeypatch, fake_pynvml(gpus=2)[0])
    with pytest.raises(NoSuchGpu, match=r"no GPU 2; NVML sees GPU 0 GPU-0aaaaaaa.*\(NVIDIA H200, 141.0 GiB\); GPU 1"):
        gpu.device("2")
    with pytest.raises(NoSuchGpu, match="GPU-dead matches no device"):
        gpu.device("GPU-dead")
    with pytest.raises(NoSuchGpu, match="GPU- is ambiguous"):
        gpu.device("GPU-")


@pytest.mark.parametrize("lookup", [True, False], ids=["uuid-lookup", "old-driver-search"])
def test_mig_instances_are_planned_with_their_own_memory(monkeypatch, lookup):
    mod, _ = fake_pynvml(gpus=2, mig={0: [71 * GIB, 35 * GIB]}, mig_uuid_lookup=lookup)
    gpu = open_fake(monkeypatch, mod)
    first = gpu.device("0")  # a card in MIG mode: CUDA sees only its instances; the first one
    assert first.mig and first.total_bytes == 71 * GIB and first.uuid.startswith("MIG-00")
    assert first.index == 0 and "MIG instance MIG-00" in first.describe()
    second = gpu.device("MIG-01bbbbbb-1111-2222-3333-444444444444")
    assert second.mig and second.total_bytes == 35 * GIB and second.index == 0
    assert gpu.device("GPU-0aaaaaaa-1111-2222-3333-444444444444") == first  # the card's UUID: its first instance
    assert not gpu.device("1").mig and gpu.device("1").total_bytes == 141 * GIB
    assert gpu.utilization(second) is None  # not supported on a MIG instance: unknown


def test_an_r470_driver_without_v3_falls_back_to_v2_once(monkeypatch, children):
    (a,) = children(1)
    mod, calls = fake_pynvml([(a.pid, 2 * GIB)], driver=("v2", "v1"))
    with pytest.raises(mod.NVMLLibraryMismatchError):  # what the unversioned call does on such a driver
        mod.nvmlDeviceGetComputeRunningProcesses(("gpu", 0))
    log = RecordingLog()
    gpu = open_fake(monkeypatch, mod, log)
    dev = gpu.device("0")
    assert gpu.processes(dev) == [GpuProcess(a.pid, 2 * GIB)]
    assert gpu.processes(dev) == [GpuProcess(a.pid, 2 * GIB)]
    assert calls.count("procs_v3") == 2 and calls.count("procs_v2") == 2  # v3 only tried the first time
    assert [ln[1] for ln in log.lines] == ["nvml_process_query"]  # one line, and no warning
    assert log.lines[0][2]["version"] == "v2" and log.lines[0][0] == "info"


def test_a_mismatch_error_from_v3_is_caught(monkeypatch, children):
    (a,) = children(1)
    mod, calls = fake_pynvml([(a.pid, GIB)], v3_raises="mismatch")  # a plain Exception, not an NVMLError
    log = RecordingLog()
    gpu = open_fake(monkeypatch, mod, log)
    assert gpu.processes(gpu.device("0")) == [GpuProcess(a.pid, GIB)]
    assert [ln[2]["version"] for ln in log.lines] == ["v2"]


@pytest.mark.parametrize("python", [("v3", "v2"), ()], ids=["pynvml-13", "no-versioned-wrappers"])
def test_a_driver_with_only_the_v1_symbol_is_read_through_ctypes(monkeypatch, children, python):
    a, b = children(2)
    mod, calls = fake_pynvml([(a.pid, 5 * GIB), (b.pid, None)], driver=("v1",), python=python)
    log = RecordingLog()
    gpu = open_fake(monkeypatch, mod, log)
    dev = gpu.device("0")
    assert gpu.processes(dev) == [GpuProcess(a.pid, 5 * GIB), GpuProcess(b.pid, None)]  # sentinel: unknown
    assert log.lines[-1][1] == "nvml_process_query" and log.lines[-1][2]["version"] == "v1"
    assert gpu.processes(dev) == [GpuProcess(a.pid, 5 * GIB), GpuProcess(b.pid, None)]
    assert calls.count("procs_v3") == (1 if python else 0)


def test_no_process_query_at_all_is_unknown_warned_once_and_not_retried(monkeypatch, children):
    (a,) = children(1)
    mod, calls = fake_pynvml([(a.pid, GIB)], driver=())
    log = RecordingLog()
    gpu = open_fake(monkeypatch, mod, log)
    dev = gpu.device("0")
    assert gpu.processes(dev) is None and gpu.processes(dev) is None  # unknown, not "nothing runs"
    assert [ln[1] for ln in log.lines] == ["nvml_query_failed"]
    assert "_v3: NVMLError_FunctionNotFound" in log.lines[0][2]["error"] and "_v1" in log.lines[0][2]["error"]
    assert calls.count("procs_v3") == 1 and calls.count("procs_v2") == 1  # not every tick


def test_unknown_memory_stays_unknown(monkeypatch, children):
    a, b = children(2)
    mod, _ = fake_pynvml([(a.pid, None), (b.pid, 4 * GIB)])
    gpu = open_fake(monkeypatch, mod)
    listed = gpu.processes(gpu.device("0"))
    assert listed == [GpuProcess(a.pid, None), GpuProcess(b.pid, 4 * GIB)]
    assert match_gpu_processes([a.pid, b.pid, os.getpid()], listed) == {a.pid: None, b.pid: 4 * GIB}
    raw = [GpuProcess(a.pid, GIB), GpuProcess(a.pid, None)]  # listed twice, once without a figure
    assert match_gpu_processes([a.pid], raw) == {a.pid: None}


def test_nvml_errors_while_monitoring_do_not_raise(monkeypatch):
    mod, calls = fake_pynvml([], fail_procs=3)  # Not Supported
    log = RecordingLog()
    gpu = open_fake(monkeypatch, mod, log)
    dev = gpu.device("0")
    assert gpu.processes(dev) is None and gpu.processes(dev) is None
    assert [ln[1] for ln in log.lines] == ["nvml_query_failed"]  # logged once
    assert calls.count("procs_v3") == 2  # an error that is not a missing function does not demote v3


class FakeLibNvml:
    """A stand-in for libnvidia-ml.so under the *real* pynvml: each C function a Python callable writing
    through the ctypes pointers pynvml passes, exporting only the symbols of one driver generation
    (pynvml turns a missing symbol into NVMLError_FunctionNotFound)."""

    UUID = b"GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"

    def __init__(self, procs, process_symbols):
        self.procs = procs  # callable -> [(pid, usedGpuMemory)], NOT_AVAILABLE for unknown
        self.calls = []
        names = {"v3": "nvmlDeviceGetComputeRunningProcesses_v3", "v2": "nvmlDeviceGetComputeRunningProcesses_v2",
                 "v1": "nvmlDeviceGetComputeRunningProcesses"}
        self.symbols = {names[v]: self._query(names[v]) for v in process_symbols}

    def _query(self, name):
        def query(handle, count_ref, infos):
            self.calls.append(name)
            count, rows = count_ref._obj, self.procs()
            if infos is None or count.value < len(rows):
                count.value = len(rows)
                return 7 if rows else 0  # NVML_ERROR_INSUFFICIENT_SIZE / NVML_SUCCESS
            for i, (pid, used) in enumerate(rows):
                infos[i].pid, infos[i].usedGpuMemory = pid, used
            count.value = len(rows)
            return 0
        return query

    def __getattr__(self, name):
        if name in self.symbols:
            return self.symbols[name]
        fixed = {
            "nvmlInitWithFlags": lambda flags: 0,
            "nvmlShutdown": lambda: 0,
            "nvmlDeviceGetCount_v2": lambda ref: setattr(ref._obj, "value", 1) or 0,
            "nvmlDeviceGetHandleByIndex_v2": lambda index, ref: 0 if index.value == 0 else 2,
            "nvmlDeviceGetHandleByUUID": lambda uuid, ref: 0 if uuid.value == self.UUID else 6,
            "nvmlDeviceGetUUID": lambda h, buf, size: setattr(buf, "value", self.UUID) or 0,
            "nvmlDeviceGetName": lambda h, buf, size: setattr(buf, "value", b"NVIDIA A100-SXM4-80GB") or 0,
            "nvmlDeviceGetIndex": lambda h, ref: setattr(ref._obj, "value", 0) or 0,
            "nvmlDeviceGetMemoryInfo": lambda h, ref: setattr(ref._obj, "total", 80 * GIB) or 0,
            "nvmlDeviceGetUtilizationRates": lambda h, ref: setattr(ref._obj, "gpu", 12) or 0,
            "nvmlDeviceGetMigMode": lambda h, cur, pend: setattr(cur._obj, "value", 0) or 0,
            "nvmlDeviceIsMigDeviceHandle": lambda h, ref: setattr(ref._obj, "value", 0) or 0,
        }
        if name in fixed:
            return fixed[name]
        raise AttributeError(name)


@pytest.fixture
def real_pynvml(monkeypatch):
    """The installed pynvml, its library swapped for a :class:`FakeLibNvml` (no driver needed)."""
    pynvml = pytest.importorskip("pynvml")

    def install(lib):
        monkeypatch.setattr(pynvml, "nvmlLib", lib)
        monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer_cache", {})
        monkeypatch.setitem(sys.modules, "pynvml", pynvml)
        return pynvml
    return install


@pytest.mark.parametrize("symbols,used", [
    (("v3", "v2", "v1"), "v3"),  # R510 and later
    (("v2", "v1"), "v2"),  # R470 LTS: pynvml 13's unversioned call raises NVMLLibraryMismatchError here
    (("v1",), "v1"),  # before R450: only the unversioned symbol, read with the v1 struct
], ids=["r510+", "r470", "r440"])
def test_the_real_pynvml_over_each_driver_generation(real_pynvml, children, symbols, used):
    a, b = children(2)
    lib = FakeLibNvml(lambda: [(a.pid, 3 * GIB), (b.pid, NOT_AVAILABLE)], symbols)
    pynvml = real_pynvml(lib)
    if used != "v3":
        with pytest.raises(pynvml.NVMLLibraryMismatchError):  # what the supervisor used to call
            pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(0))
        assert not isinstance(pynvml.NVMLLibraryMismatchError("x"), pynvml.NVMLError)  # a plain Exception
    log = RecordingLog()
    gpu = open_gpu(log=log)
    assert isinstance(gpu, NvmlGpu)
    dev = gpu.device("0")
    assert dev == GpuDevice(FakeLibNvml.UUID.decode(), 0, 80 * GIB, "NVIDIA A100-SXM4-80GB")
    assert gpu.device(FakeLibNvml.UUID.decode()) == dev
    for _ in range(3):
        assert gpu.processes(dev) == [GpuProcess(a.pid, 3 * GIB), GpuProcess(b.pid, None)]
    assert gpu.utilization(dev) == 12
    assert not [ln for ln in log.lines if ln[0] == "warning"]
    assert [ln[2]["version"] for ln in log.lines if ln[1] == "nvml_process_query"] == ([] if used == "v3" else [used])
    symbol = {"v3": "_v3", "v2": "_v2", "v1": ""}[used]
    assert lib.calls.count(f"nvmlDeviceGetComputeRunningProcesses{symbol}") == 6  # remembered: 2 calls a query
    gpu.close()


def test_the_real_pynvml_without_any_process_symbol(real_pynvml, children):
    (a,) = children(1)
    real_pynvml(FakeLibNvml(lambda: [(a.pid, GIB)], ()))
    log = RecordingLog()
    gpu = open_gpu(log=log)
    dev = gpu.device("0")
    assert gpu.processes(dev) is None and gpu.processes(dev) is None
    assert [ln[1] for ln in log.lines] == ["nvml_query_failed"]
    assert wait_gpu_released(gpu, dev, [a.pid], timeout_s=0.0) is Release.UNKNOWN
    gpu.close()


def test_open_gpu_none_when_no_devices(monkeypatch):
    mod, calls = fake_pynvml([], gpus=0)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    log = RecordingLog()
    assert open_gpu(log=log) is None
    assert "no devices" in log.lines[0][1] and calls == ["init", "shutdown"]


@pytest.mark.parametrize("configured,env,expected", [
    ("auto", {}, ("0", "default")),
    ("auto", {"CUDA_VISIBLE_DEVICES": "1"}, ("1", "CUDA_VISIBLE_DEVICES")),
    ("auto", {"CUDA_VISIBLE_DEVICES": " 2,0"}, ("2", "CUDA_VISIBLE_DEVICES")),
    ("auto", {"CUDA_VISIBLE_DEVICES": "GPU-8932f937-d72c,GPU-aa"}, ("GPU-8932f937-d72c", "CUDA_VISIBLE_DEVICES")),
    ("auto", {"CUDA_VISIBLE_DEVICES": "MIG-1b2c3d4e-aaaa"}, ("MIG-1b2c3d4e-aaaa", "CUDA_VISIBLE_DEVICES")),
    ("auto", {"CUDA_VISIBLE_DEVICES": ""}, (None, "CUDA_VISIBLE_DEVICES")),
    ("auto", {"CUDA_VISIBLE_DEVICES": "-1"}, (None, "CUDA_VISIBLE_DEVICES")),
    (1, {"CUDA_VISIBLE_DEVICES": "0"}, ("1", "supervisor.gpu")),
    ("GPU-abc", {}, ("GPU-abc", "supervisor.gpu")),
])
def test_requested_gpu(configured, env, expected):
    req = requested_gpu(configured, env)
    assert (req.spec, req.source) == expected
    assert req.inherited == env.get("CUDA_VISIBLE_DEVICES")
    assert req.field == ("CUDA_VISIBLE_DEVICES" if expected[1] == "CUDA_VISIBLE_DEVICES" else "supervisor.gpu")


def test_fake_gpu_reports_only_real_live_children(children):
    a, b = children(2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=10)
    fake = FakeGpu(24 * GIB, {a.pid: 2 * GIB, b.pid: 3 * GIB, dead.pid: 1 * GIB})
    dev = fake.device("0")
    assert fake.device_count() == 1 and dev.total_bytes == 24 * GIB and dev.uuid == fake_uuid(0)
    assert fake.processes(dev) == [GpuProcess(p.pid, u) for p, u in sorted([(a, 2 * GIB), (b, 3 * GIB)],
                                                                           key=lambda x: x[0].pid)]
    assert match_gpu_processes([a.pid, b.pid, os.getpid()], fake.processes(dev)) == {a.pid: 2 * GIB,
                                                                                     b.pid: 3 * GIB}
    os.kill(b.pid, signal.SIGKILL)
    wait_for(lambda: [gp.pid for gp in fake.processes(dev)] == [a.pid], 5,
             "the killed process gone from the list")  # gone even before it is reaped
    fake.readable = False
    assert fake.processes(dev) is None


def test_fake_gpu_chooses_devices_like_nvml():
    fake = FakeGpu(80 * GIB, devices=2, mig={1: [20 * GIB, 10 * GIB]})
    assert fake.device("0") == GpuDevice(fake_uuid(0), 0, 80 * GIB, "Fake GPU")
    assert fake.device("1") == fake.device(fake_uuid(1, 0)) == fake.device(fake_uuid(1))  # MIG mode: 1st instance
    assert fake.device("1").mig and fake.device("1").total_bytes == 20 * GIB
    assert fake.device(fake_uuid(1, 1)).total_bytes == 10 * GIB
    with pytest.raises(NoSuchGpu, match="no GPU 2; NVML sees GPU 0"):
        fake.device("2")
    with pytest.raises(NoSuchGpu, match="GPU-ffff matches no device"):
        fake.device("GPU-ffff")


def test_plan_refusal_names_the_numbers():
    with pytest.raises(PlanError) as exc:
        plan_memory(80 * GIB, 4, 0.30, 0.5)
    assert str(exc.value).startswith(
        "4 workers × 0.30 × 80.0 GiB + 4 × 0.5 GiB context = 98.0 GiB > 80.0 GiB")
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1, "half", True])
def test_plan_rejects_bad_fractions(bad):
    with pytest.raises(PlanError, match="memory_fraction"):
        plan_memory(80 * GIB, 2, bad, 0.5)


def test_explicit_plan_fits():
    plan = plan_memory(80 * GIB, 4, 0.2, 0.5)
    assert plan.fraction == 0.2 and not plan.auto
    assert plan.bytes_per_worker == int(0.2 * 80 * GIB)
    assert plan.margin_total_bytes == 2 * GIB
    assert plan.headroom_bytes == 80 * GIB - 4 * (int(0.2 * 80 * GIB) + GIB // 2)
    assert "4 workers × 0.20 (configured) × 80.0 GiB" in plan.describe()


@pytest.mark.parametrize("total_gib,workers,margin", [(80, 4, 0.5), (16, 2, 0.5), (24, 8, 0.3), (8, 1, 0.0)])
def test_auto_plan_fits(total_gib, workers, margin):
    total = total_gib * GIB
    plan = plan_memory(total, workers, "auto", margin)
    assert plan.auto and 0 < plan.fraction < 1
    expected = (total - workers * margin * GIB - 0.05 * total) / workers / total
    assert plan.fraction == pytest.approx(expected)
    assert plan.planned_bytes <= total and plan.headroom_bytes >= 0.05 * total - workers
    assert plan.budget_bytes() == plan.bytes_per_worker + plan.margin_bytes_per_worker


def test_auto_plan_refuses_when_contexts_do_not_fit():
    with pytest.raises(PlanError, match=r"64 × 0.5 GiB context \+ 5% reserve = 32.4 GiB >= 8.0 GiB"):
        plan_memory(8 * GIB, 64, "auto", 0.5)


def write_status(root, pid, nspid_line):
    d = root / str(pid)
    d.mkdir(parents=True)
    lines = ["Name:\tpython", "State:\tS (sleeping)", f"Pid:\t{pid}"]
    if nspid_line is not None:
        lines.append(nspid_line)
    (d / "status").write_text("\n".join(lines) + "\n")


def test_nspid_mapping_with_a_fake_proc_tree(tmp_path):
    proc = tmp_path / "proc"
    write_status(proc, 7, "NSpid:\t48213\t7")  # host view first, container's own last
    write_status(proc, 8, "NSpid:\t900\t300\t8")  # nested namespaces
    write_status(proc, 9, None)  # an old kernel without NSpid
    assert nvml_pids_for(7, proc) == [48213, 7]
    assert nvml_pids_for(8, proc) == [900, 300, 8]
    assert nvml_pids_for(9, proc) == [9]
    assert nvml_pids_for(10, proc) == [10]  # no such process
    nvml = [GpuProcess(48213, 5 * GIB), GpuProcess(300, None), GpuProcess(55555, GIB), GpuProcess(9, GIB)]
    assert match_gpu_processes([7, 8, 9, 10], nvml, proc_root=proc) == {7: 5 * GIB, 8: None, 9: GIB}  # not 0


def test_nspid_of_a_real_process_includes_itself():
    pids = nvml_pids_for(os.getpid())
    assert pids[-1] == os.getpid() or os.getpid() in pids


def test_wait_gpu_released_times_out_on_a_lingering_pid(children):
    (child,) = children(1)
    clock = Clock()
    fake = FakeGpu(16 * GIB, {child.pid: GIB}, clock=clock)
    child.kill()
    child.wait(timeout=5)
    fake.linger(child.pid)  # the driver never frees it
    found = wait_gpu_released(fake, fake.device("0"), [child.pid], timeout_s=5.0, poll_s=0.5, sleep=clock.sleep,
                              now=clock)
    assert found is Release.HELD and clock.t == pytest.approx(105.0)


def test_wait_gpu_released_succeeds_once_released(children):
    (child,) = children(1)
    clock = Clock()
    fake = FakeGpu(16 * GIB, {child.pid: GIB}, clock=clock)
    dev = fake.device("0")
    child.kill()
    child.wait(timeout=5)
    fake.linger(child.pid, seconds=2.0)  # memory freed two seconds after the kill
    found = wait_gpu_released(fake, dev, [child.pid], timeout_s=10.0, poll_s=0.5, sleep=clock.sleep, now=clock)
    assert found is Release.RELEASED and clock.t == pytest.approx(102.0)
    fake.linger(child.pid)
    fake.release(child.pid)
    assert wait_gpu_released(fake, dev, [child.pid], timeout_s=10.0, sleep=clock.sleep, now=clock) is Release.RELEASED
    assert wait_gpu_released(None, None, [child.pid], timeout_s=10.0) is Release.RELEASED  # no GPU: nothing to wait


def test_an_unreadable_process_list_is_never_released(children):
    """A dead worker whose memory NVML cannot show: wait the whole timeout, then say UNKNOWN, not RELEASED."""
    (child,) = children(1)
    clock = Clock()
    fake = FakeGpu(16 * GIB, {}, clock=clock)
    dev = fake.device("0")
    child.kill()
    child.wait(timeout=5)
    fake.readable = False
    found = wait_gpu_released(fake, dev, [child.pid], timeout_s=5.0, poll_s=0.5, sleep=clock.sleep, now=clock)
    assert found is Release.UNKNOWN and clock.t == pytest.approx(105.0)

    def readable_after_one_second(s):
        clock.sleep(s)
        fake.readable = clock.t >= 106.0
    assert wait_gpu_released(fake, dev, [child.pid], timeout_s=5.0, poll_s=0.5, sleep=readable_after_one_second,
                             now=clock) is Release.RELEASED
    assert clock.t == pytest.approx(106.0)


def test_wait_gpu_released_over_a_driver_without_any_process_query(monkeypatch, children):
    (child,) = children(1)
    gpu = open_fake(monkeypatch, fake_pynvml([(child.pid, GIB)], driver=())[0])
    clock = Clock()
    found = wait_gpu_released(gpu, gpu.device("0"), [child.pid], timeout_s=2.0, sleep=clock.sleep, now=clock)
    assert found is Release.UNKNOWN and clock.t == pytest.approx(102.0)  # the old code said "released" at once


def test_gpu_module_does_not_import_torch():
    code = "import sys; import supervisor.gpu, supervisor.nvml, supervisor.gpu_plan, supervisor.gpu_pids, " \
           "supervisor.procs, supervisor.states, supervisor.sdnotify; " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(gpumod.__file__)))
    assert out.stdout.strip() == "False", out.stderr
