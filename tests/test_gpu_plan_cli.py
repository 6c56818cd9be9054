"""GPU planning and monitoring with a fake NVML: budget refusal, over-budget report, container PID mapping,
the wait for a killed worker's GPU memory, and a real swarm of fake nodes on a fake GPU."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest
import structlog

from fake_node import FAKE_NODE, drive, fake_config, kill_descendants, set_subreaper
from supervisor import cli, daemon
from supervisor.daemon import Supervisor, plan_launch, read_status
from supervisor.gpu import GIB, FakeGpu, PlanError
from supervisor.procs import FakeOS
from supervisor.sdnotify import SdNotifier
from supervisor.states import NodeState
from test_daemon import RecordingLog, advance, start_all

S = NodeState


@pytest.fixture(autouse=True)
def restore_logging():
    """`swarm launch` configures logging for the process; undo it after each test."""
    yield
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    structlog.reset_defaults()


def gpu_sup(tmp_path, gpu, *, workers=2, proc_root="/proc", **supervisor):
    fos = FakeOS()
    log = RecordingLog()
    sv = {"device": "cuda", "memory_fraction": "auto", "cuda_context_margin_gb": 0.5, **supervisor}
    cfg = fake_config(tmp_path / "shared", workers=workers, **sv)
    sup = Supervisor(cfg, os_=fos, gpu=gpu, runtime_dir=tmp_path / "rt", notifier=SdNotifier(environ={}), log=log,
                     environ={}, sample_processes=False, proc_root=proc_root)
    return sup, fos, log


def write_config(path, **supervisor):
    import yaml

    data = {"experiment": {"name": "gpu", "root": str(path.parent / "shared")},
            "sapo": {"tasks": [{"name": "toy_copy"}]}, "supervisor": supervisor}
    path.write_text(yaml.safe_dump(data))
    return path


def test_launch_refuses_an_impossible_plan_with_the_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SWARM_RUNTIME_DIR", str(tmp_path / "rt"))
    gpu = FakeGpu(16 * GIB)
    monkeypatch.setattr(daemon, "open_gpu", lambda log=None: gpu)
    cfg = write_config(tmp_path / "cfg.yaml", workers=4, device="cuda", memory_fraction=0.3)
    rc = cli.main(["launch", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "GPU plan refused" in err and "4 workers × 0.30 × 16.0 GiB + 4 × 0.5 GiB context = 21.2 GiB > 16.0 GiB" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert gpu.closed and not (tmp_path / "rt" / "supervisor.pid").exists()


def test_cuda_without_a_gpu_is_refused_and_auto_falls_back_to_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SWARM_RUNTIME_DIR", str(tmp_path / "rt"))
    monkeypatch.setattr(daemon, "open_gpu", lambda log=None: None)
    cfg = write_config(tmp_path / "cfg.yaml", workers=2, device="cuda")
    assert cli.main(["launch", str(cfg)]) == 2
    assert "no usable GPU" in capsys.readouterr().err
    auto = fake_config(tmp_path, device="auto")
    assert plan_launch(auto, None).device == "cpu"
    with pytest.raises(PlanError, match="no usable GPU"):
        plan_launch(fake_config(tmp_path, device="cuda"), None)


def test_worker_env_follows_the_plan(tmp_path):
    gpu = FakeGpu(80 * GIB)
    sup, fos, log = gpu_sup(tmp_path, gpu, workers=4)
    start_all(sup, fos)
    plan = sup.launch.gpu_plan
    assert sup.launch.device == "cuda" and plan.workers == 4
    assert plan.planned_bytes <= 80 * GIB
    coord, *workers = fos.spawned
    assert coord.env["CUDA_VISIBLE_DEVICES"] == "" and coord.env["SWARM_DEVICE"] == "cpu"
    assert "SWARM_MEMORY_FRACTION" not in coord.env
    for w in workers:
        assert w.env["CUDA_VISIBLE_DEVICES"] == "0" and w.env["SWARM_DEVICE"] == "cuda"
        assert float(w.env["SWARM_MEMORY_FRACTION"]) == pytest.approx(plan.fraction)
    snap = read_status(sup.paths)
    assert snap["launch"]["gpu_plan"]["workers"] == 4 and "GiB" in snap["launch"]["describe"]
    assert [kw for kw in log.named("gpu_plan")][0]["device"] == "cuda"


def test_over_budget_is_reported_in_status_and_the_log(tmp_path):
    gpu = FakeGpu(80 * GIB)
    sup, fos, log = gpu_sup(tmp_path, gpu, workers=2, memory_fraction=0.25)
    start_all(sup, fos)
    budget = sup.launch.gpu_plan.budget_bytes()  # 0.25 × 80 + 0.5 GiB
    assert budget == int(20.5 * GIB)
    w1, w2 = sup.nodes["worker_1"].proc.pid, sup.nodes["worker_2"].proc.pid
    for pid, used in ((w1, 24 * GIB), (w2, 10 * GIB)):
        gpu.used[pid] = used
        gpu.linger(pid)  # FakeOS pids are not real processes: keep them listed
    advance(sup, fos, 0.5)
    snap = read_status(sup.paths)
    assert snap["over_budget"] == ["worker_1"]
    assert snap["nodes"]["worker_1"]["over_budget"] is True and snap["nodes"]["worker_1"]["gpu_bytes"] == 24 * GIB
    assert snap["nodes"]["worker_2"]["over_budget"] is False and snap["nodes"]["worker_2"]["gpu_bytes"] == 10 * GIB
    warnings = log.named("node_over_budget")
    assert len(warnings) == 1 and warnings[0]["node"] == "worker_1" and "24.00 GiB used > 20.50 GiB" in warnings[0]["detail"]
    text = cli.render_status(snap, running_pid=os.getpid(), runtime_dir=sup.paths.root, experiment="fake")
    assert "OVER" in text and "over GPU memory budget: worker_1" in text
    gpu.used[w1] = 12 * GIB
    advance(sup, fos, 0.5)
    assert read_status(sup.paths)["over_budget"] == [] and log.named("node_within_budget")


def fake_proc_tree(root, pids, offset=50_000):
    """/proc/<pid>/status files whose NSpid says: host pid = container pid + offset."""
    for pid in pids:
        d = root / str(pid)
        d.mkdir(parents=True)
        (d / "status").write_text(f"Name:\tpython\nPid:\t{pid}\nNSpid:\t{pid + offset}\t{pid}\n")


def test_monitor_maps_container_pids_to_nvml_host_pids(tmp_path):
    proc_root = tmp_path / "proc"
    fake_proc_tree(proc_root, range(10_001, 10_010))
    gpu = FakeGpu(80 * GIB)
    sup, fos, log = gpu_sup(tmp_path, gpu, workers=2, proc_root=proc_root)
    start_all(sup, fos)
    w1 = sup.nodes["worker_1"]
    host = w1.proc.pid + 50_000
    assert w1.nvml_pids == [host, w1.proc.pid]  # captured at spawn, for after its death
    gpu.used[host] = 3 * GIB
    gpu.used[w1.proc.pid + 1] = 5 * GIB  # a pid that is nobody's container pid: ignored
    gpu.linger(host)
    advance(sup, fos, 0.5)
    snap = read_status(sup.paths)
    assert snap["nodes"]["worker_1"]["gpu_bytes"] == 3 * GIB
    assert snap["nodes"]["worker_2"]["gpu_bytes"] is None


def test_a_killed_gpu_worker_is_respawned_only_once_nvml_lets_go(tmp_path):
    gpu = FakeGpu(80 * GIB)
    sup, fos, log = gpu_sup(tmp_path, gpu, workers=2, backoff_initial_s=0.5)
    gpu.clock = fos.monotonic
    start_all(sup, fos)
    w1 = sup.nodes["worker_1"]
    old = w1.proc.pid
    gpu.used[old] = 10 * GIB
    gpu.linger(old)  # the driver still holds its memory after death
    fos.exit(old, -signal.SIGKILL)
    sup.tick()
    assert w1.status.state is S.BACKOFF
    advance(sup, fos, 2.0)
    assert w1.status.state is S.BACKOFF and w1.gpu_wait_since is not None
    assert log.named("gpu_wait_release")[0]["pids"] == [old]
    gpu.release(old)
    advance(sup, fos, 0.2)
    assert w1.status.state is S.STARTING and w1.proc.pid != old and log.named("gpu_released")


def test_the_gpu_release_wait_is_bounded(tmp_path):
    gpu = FakeGpu(80 * GIB)
    sup, fos, log = gpu_sup(tmp_path, gpu, workers=1, backoff_initial_s=0.1)
    sup.gpu_release_timeout_s = 3.0
    gpu.clock = fos.monotonic
    start_all(sup, fos)
    w1 = sup.nodes["worker_1"]
    old = w1.proc.pid
    gpu.used[old] = GIB
    gpu.linger(old)
    fos.exit(old, 1)
    advance(sup, fos, 2.5)
    assert w1.status.state is S.BACKOFF
    advance(sup, fos, 1.0)
    assert w1.status.state in (S.STARTING, S.RUNNING) and log.named("gpu_not_released")


@pytest.fixture
def reaper():
    since = time.time() - 0.05  # psutil start times are in clock ticks
    on = set_subreaper(True)
    sups = []
    try:
        yield sups
    finally:
        for sup in sups:
            if sup.exit_code is None:
                sup.request_stop()
                drive(sup, timeout=5)
        kill_descendants(since)
        if on:
            set_subreaper(False)


def test_real_children_on_a_fake_gpu(tmp_path, reaper):
    """NVML replaced by a fake that reports the real child pids: usage, over-budget, release wait."""
    gpu = FakeGpu(16 * GIB)
    cfg = fake_config(tmp_path / "shared", workers=2, device="cuda", memory_fraction=0.25)
    sup = Supervisor(cfg, node_command=FAKE_NODE, gpu=gpu, runtime_dir=tmp_path / "rt",
                     notifier=SdNotifier(environ={}), log=RecordingLog())
    reaper.append(sup)
    assert drive(sup, lambda: all(n.status.state is S.RUNNING for n in sup.nodes.values()), timeout=15)
    w1, w2 = sup.nodes["worker_1"], sup.nodes["worker_2"]
    gpu.used[w1.proc.pid] = 2 * GIB
    gpu.used[w2.proc.pid] = 6 * GIB  # budget: 0.25 × 16 + 0.5 = 4.5 GiB
    assert drive(sup, lambda: w2.over_budget and w1.gpu_bytes == 2 * GIB, timeout=5)
    assert not w1.over_budget and w1.rss_bytes and w1.rss_bytes > 1_000_000
    old = w1.proc.pid
    gpu.linger(old, 0.6)  # freed 0.6 s after death
    os.kill(old, signal.SIGKILL)
    assert drive(sup, lambda: w1.status.restarts == 1, timeout=10)
    waits = sup.log.named("gpu_wait_release")
    assert waits and waits[0]["node"] == "worker_1" and old in waits[0]["pids"]
