"""supervisor.gpu: NVML absence, the fake GPU, memory plans, container PID mapping, release waits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types

import pytest

from supervisor import gpu as gpumod
from supervisor.gpu import (
    GIB, FakeGpu, GpuProcess, NvmlGpu, PlanError, match_gpu_processes, nvml_pids_for, open_gpu, plan_memory,
    wait_gpu_released,
)


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


def fake_pynvml(procs, *, count=1, fail_procs=False):
    class NVMLError(Exception):
        pass

    calls = []
    mod = types.SimpleNamespace(
        NVMLError=NVMLError,
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: count,
        nvmlDeviceGetHandleByIndex=lambda i: ("handle", i),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=80 * GIB, used=0, free=80 * GIB),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=37, memory=5),
    )

    def running(h):
        if fail_procs:
            raise NVMLError("Not Supported")
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in procs]

    mod.nvmlDeviceGetComputeRunningProcesses = running
    return mod, calls


def test_nvml_gpu_over_a_fake_pynvml(monkeypatch):
    mod, calls = fake_pynvml([(11, 3 * GIB), (12, None)])
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    gpu = open_gpu(log=RecordingLog())
    assert isinstance(gpu, NvmlGpu)
    assert gpu.device_count() == 1 and gpu.total_memory_bytes(0) == 80 * GIB
    assert gpu.processes(0) == [GpuProcess(11, 3 * GIB), GpuProcess(12, None)]
    assert gpu.utilization(0) == 37
    gpu.close()
    gpu.close()
    assert calls == ["init", "shutdown"]


def test_nvml_errors_while_monitoring_do_not_raise(monkeypatch):
    mod, calls = fake_pynvml([], fail_procs=True)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    log = RecordingLog()
    gpu = NvmlGpu(log=log)
    assert gpu.processes(0) == [] and gpu.processes(0) == []
    assert [ln[1] for ln in log.lines] == ["nvml_query_failed"]  # logged once


def test_open_gpu_none_when_no_devices(monkeypatch):
    mod, calls = fake_pynvml([], count=0)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    log = RecordingLog()
    assert open_gpu(log=log) is None
    assert "no devices" in log.lines[0][1] and calls == ["init", "shutdown"]


def test_fake_gpu_reports_only_real_live_children(children):
    a, b = children(2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=10)
    fake = FakeGpu(24 * GIB, {a.pid: 2 * GIB, b.pid: 3 * GIB, dead.pid: 1 * GIB})
    assert fake.device_count() == 1 and fake.total_memory_bytes(0) == 24 * GIB
    assert fake.processes(0) == [GpuProcess(p.pid, u) for p, u in sorted([(a, 2 * GIB), (b, 3 * GIB)],
                                                                         key=lambda x: x[0].pid)]
    assert match_gpu_processes([a.pid, b.pid, os.getpid()], fake.processes(0)) == {a.pid: 2 * GIB,
                                                                                   b.pid: 3 * GIB}
    os.kill(b.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(gp.pid == b.pid for gp in fake.processes(0)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [gp.pid for gp in fake.processes(0)] == [a.pid]  # gone even before it is reaped


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
    assert match_gpu_processes([7, 8, 9, 10], nvml, proc_root=proc) == {7: 5 * GIB, 8: 0, 9: GIB}


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
    assert wait_gpu_released(fake, [child.pid], timeout_s=5.0, poll_s=0.5, sleep=clock.sleep, now=clock) is False
    assert clock.t == pytest.approx(105.0)


def test_wait_gpu_released_succeeds_once_released(children):
    (child,) = children(1)
    clock = Clock()
    fake = FakeGpu(16 * GIB, {child.pid: GIB}, clock=clock)
    child.kill()
    child.wait(timeout=5)
    fake.linger(child.pid, seconds=2.0)  # memory freed two seconds after the kill
    assert wait_gpu_released(fake, [child.pid], timeout_s=10.0, poll_s=0.5, sleep=clock.sleep, now=clock)
    assert clock.t == pytest.approx(102.0)
    fake.linger(child.pid)
    fake.release(child.pid)
    assert wait_gpu_released(fake, [child.pid], timeout_s=10.0, sleep=clock.sleep, now=clock)
    assert wait_gpu_released(None, [child.pid], timeout_s=10.0)  # no GPU: nothing to wait for


def test_gpu_module_does_not_import_torch():
    code = "import sys; import supervisor.gpu, supervisor.procs, supervisor.states, supervisor.sdnotify; " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(gpumod.__file__)))
    assert out.stdout.strip() == "False", out.stderr
