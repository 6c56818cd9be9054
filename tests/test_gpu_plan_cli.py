"""GPU planning and monitoring with a fake NVML: the operator's device (supervisor.gpu, CUDA_VISIBLE_DEVICES,
MIG), budget refusal, the byte budget a worker turns into torch's fraction, over-budget and unknown-memory
reports, container PID mapping, the wait for a killed worker's GPU memory, and a real swarm of fake nodes on a
fake GPU."""

from __future__ import annotations

import logging
import os
import signal

import pytest
import structlog

from doubles import FakeGpu, FakeOS, fake_uuid
from fake_node import FAKE_NODE, drive, fake_config
from node import __main__ as node_main
from node.config import resolve_config
from sapo.config import ConfigError
from supervisor import cli, daemon, statusview
from supervisor.daemon import Supervisor
from supervisor.launch import cpu_share, plan_launch
from supervisor.status import read_status
from supervisor.gpu import GIB
from supervisor.gpu_plan import PlanError
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


def gpu_sup(tmp_path, fake_gpu, *, workers=2, proc_root="/proc", environ=None, **supervisor):
    fos = FakeOS()
    log = RecordingLog()
    sv = {"device": "cuda", "memory_fraction": "auto", "cuda_context_margin_gb": 0.5, **supervisor}
    cfg = fake_config(tmp_path / "shared", workers=workers, **sv)
    sup = Supervisor(cfg, os_=fos, gpu=fake_gpu, runtime_dir=tmp_path / "rt", notifier=SdNotifier(environ={}),
                     log=log, environ=environ or {}, sample_processes=False, proc_root=proc_root)
    return sup, fos, log


def write_config(path, **supervisor):
    import yaml

    data = {"experiment": {"name": "gpu", "root": str(path.parent / "shared")},
            "sapo": {"tasks": [{"name": "toy_copy"}]}, "supervisor": supervisor}
    path.write_text(yaml.safe_dump(data))
    return path


def test_launch_refuses_an_impossible_plan_with_the_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SWARM_RUNTIME_DIR", str(tmp_path / "rt"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpu = FakeGpu(16 * GIB)
    monkeypatch.setattr(daemon, "open_gpu", lambda log=None: gpu)
    cfg = write_config(tmp_path / "cfg.yaml", workers=4, device="cuda", memory_fraction=0.3)
    rc = cli.main(["launch", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2  # the default context margin is 1 GiB (0.6-0.85 GiB measured on an H200)
    assert "GPU plan refused" in err and "4 workers × 0.30 × 16.0 GiB + 4 × 1 GiB context = 23.2 GiB > 16.0 GiB" in err
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
    assert "SWARM_MEMORY_FRACTION" not in coord.env and "SWARM_MEMORY_BYTES" not in coord.env
    for w in workers:
        assert w.env["CUDA_VISIBLE_DEVICES"] == fake_uuid(0) and w.env["SWARM_DEVICE"] == "cuda"
        assert w.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert int(w.env["SWARM_MEMORY_BYTES"]) == plan.bytes_per_worker == int(plan.fraction * 80 * GIB)
        assert "SWARM_MEMORY_FRACTION" not in w.env
        # GPU workers share the cores too: idle OpenMP teams spinning in 4 processes would slow kernel launches
        assert w.env["OMP_NUM_THREADS"] == str(cpu_share(4))
    assert coord.env["OMP_NUM_THREADS"] == "1"
    snap = read_status(sup.paths)
    assert snap["launch"]["gpu_plan"]["workers"] == 4 and "GiB" in snap["launch"]["describe"]
    assert snap["launch"]["gpu_device"]["uuid"] == fake_uuid(0) and snap["gpu"]["device"]["uuid"] == fake_uuid(0)
    assert f"(supervisor.gpu auto, no CUDA_VISIBLE_DEVICES: GPU 0 {fake_uuid(0)} (Fake GPU, 80.0 GiB))" \
        in snap["launch"]["describe"]
    assert [kw for kw in log.named("gpu_plan")][0]["device"] == "cuda"


def worker_envs(fos):
    return [p.env for p in fos.spawned if p.env["NODE_ROLE"] == "worker"]


@pytest.mark.parametrize("inherited,chosen", [
    ("1", 1),
    ("1,0", 1),  # the first entry
    (fake_uuid(1) + "," + fake_uuid(0), 1),
    ("GPU-00000001", 1),  # a unique prefix, as CUDA accepts it
    (fake_uuid(0), 0),
])
def test_an_inherited_cuda_visible_devices_is_respected(tmp_path, inherited, chosen):
    gpu = FakeGpu(80 * GIB, devices=2, totals={1: 40 * GIB})
    sup, fos, log = gpu_sup(tmp_path, gpu, workers=2,
                            environ={"CUDA_VISIBLE_DEVICES": inherited, "SWARM_MEMORY_FRACTION": "0.9"})
    start_all(sup, fos)
    assert sup.launch.gpu_plan.total_bytes == (40 if chosen else 80) * GIB  # that device's memory
    assert f"CUDA_VISIBLE_DEVICES={inherited}" in sup.launch.why
    for env in worker_envs(fos):
        assert env["CUDA_VISIBLE_DEVICES"] == fake_uuid(chosen) and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert "SWARM_MEMORY_FRACTION" not in env  # an inherited one would override the plan
    coord = fos.spawned[0].env
    assert coord["CUDA_VISIBLE_DEVICES"] == "" and "SWARM_MEMORY_BYTES" not in coord
    assert not log.named("gpu_choice")


def test_supervisor_gpu_wins_over_cuda_visible_devices_and_says_so_once(tmp_path):
    gpu = FakeGpu(80 * GIB, devices=2)
    sup, fos, log = gpu_sup(tmp_path, gpu, workers=2, gpu=0, environ={"CUDA_VISIBLE_DEVICES": "1"})
    start_all(sup, fos)
    advance(sup, fos, 1.0)
    assert all(env["CUDA_VISIBLE_DEVICES"] == fake_uuid(0) for env in worker_envs(fos))
    notes = log.named("gpu_choice")
    assert len(notes) == 1 and "supervisor.gpu wins over the inherited CUDA_VISIBLE_DEVICES='1'" in notes[0]["detail"]
    assert read_status(sup.paths)["launch"]["notes"] == [notes[0]["detail"]]


@pytest.mark.parametrize("configured,inherited", [(1, fake_uuid(1)), (fake_uuid(1), "1"), ("1", None)])
def test_supervisor_gpu_agreeing_with_the_environment_is_quiet(tmp_path, configured, inherited):
    gpu = FakeGpu(80 * GIB, devices=2)
    env = {"CUDA_VISIBLE_DEVICES": inherited} if inherited else {}
    sup, fos, log = gpu_sup(tmp_path, gpu, workers=1, gpu=configured, environ=env)
    start_all(sup, fos)
    assert worker_envs(fos)[0]["CUDA_VISIBLE_DEVICES"] == fake_uuid(1)
    assert f"supervisor.gpu={configured}" in sup.launch.why and not log.named("gpu_choice")


def test_an_empty_cuda_visible_devices_hides_the_gpu(tmp_path):
    gpu = FakeGpu(80 * GIB)
    sup, fos, log = gpu_sup(tmp_path, gpu, workers=1, device="auto", environ={"CUDA_VISIBLE_DEVICES": ""})
    start_all(sup, fos)
    assert sup.launch.device == "cpu" and "CUDA_VISIBLE_DEVICES='' hides every GPU" in sup.launch.why
    assert worker_envs(fos)[0]["CUDA_VISIBLE_DEVICES"] == "" and worker_envs(fos)[0]["SWARM_DEVICE"] == "cpu"
    with pytest.raises(PlanError, match="supervisor.device is 'cuda' but CUDA_VISIBLE_DEVICES='' hides every GPU"):
        plan_launch(fake_config(tmp_path, device="cuda"), gpu, {"CUDA_VISIBLE_DEVICES": ""})
    plan = plan_launch(fake_config(tmp_path, device="cuda", gpu=0), gpu, {"CUDA_VISIBLE_DEVICES": ""})
    assert plan.gpu_device.uuid == fake_uuid(0) and "CUDA_VISIBLE_DEVICES=''" in plan.notes[0]  # the config wins


def test_a_mig_instance_is_planned_with_its_own_memory(tmp_path):
    gpu = FakeGpu(80 * GIB, devices=2, mig={0: [20 * GIB, 10 * GIB]})
    sup, fos, log = gpu_sup(tmp_path, gpu, workers=2, memory_fraction=0.4)
    start_all(sup, fos)
    dev, plan = sup.launch.gpu_device, sup.launch.gpu_plan
    assert dev.mig and dev.uuid == fake_uuid(0, 0) and plan.total_bytes == 20 * GIB  # not the whole card
    assert all(env["CUDA_VISIBLE_DEVICES"] == fake_uuid(0, 0) for env in worker_envs(fos))
    assert int(worker_envs(fos)[0]["SWARM_MEMORY_BYTES"]) == int(0.4 * 20 * GIB)
    assert "MIG instance" in sup.launch.describe()
    small = plan_launch(fake_config(tmp_path, device="cuda", gpu=fake_uuid(0, 1), workers=1), gpu, {})
    assert small.gpu_plan.total_bytes == 10 * GIB
    with pytest.raises(PlanError, match=r"2 workers × 0.40 × 20.0 GiB \+ 2 × 4 GiB context = 24.0 GiB > 20.0 GiB"):
        plan_launch(fake_config(tmp_path, device="cuda", memory_fraction=0.4, cuda_context_margin_gb=4.0), gpu, {})


@pytest.mark.parametrize("bad", ["cuda:1", "-1", "gpu-8932f937", "GPU-", "all", "1,2"])
def test_bad_supervisor_gpu_values_are_rejected_naming_the_field(bad):
    with pytest.raises(ConfigError) as exc:
        resolve_config(overrides=[f"supervisor.gpu={bad}"])
    assert exc.value.field == "supervisor.gpu" and "a UUID from `nvidia-smi -L`" in str(exc.value)


def test_launch_refuses_a_device_that_does_not_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SWARM_RUNTIME_DIR", str(tmp_path / "rt"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    opened = []
    monkeypatch.setattr(daemon, "open_gpu", lambda log=None: opened.append(FakeGpu(16 * GIB, devices=2)) or opened[-1])
    cfg = write_config(tmp_path / "cfg.yaml", workers=1, device="cuda")
    assert cli.main(["launch", str(cfg), "--set", "supervisor.gpu=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("swarm: configuration error: supervisor.gpu: no GPU 5; NVML sees GPU 0 GPU-00000000")
    assert len(err.strip().splitlines()) == 1 and opened[0].closed
    assert cli.main(["launch", str(cfg), "--set", "supervisor.gpu=cuda:1"]) == 2
    assert "configuration error: supervisor.gpu: must be auto, a GPU index" in capsys.readouterr().err
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-feed")
    assert cli.main(["launch", str(cfg)]) == 2
    assert "configuration error: CUDA_VISIBLE_DEVICES: GPU-feed matches no device" in capsys.readouterr().err
    assert not (tmp_path / "rt" / "supervisor.pid").exists()


@pytest.mark.parametrize("budget,cuda_total,expected", [
    (20 * GIB, 80 * GIB, 0.25),
    (int(0.3 * 79.1 * GIB), int(79.1 * GIB), 0.3),
    (150 * GIB, 139 * GIB, 1.0),  # capped
    (1, 4, 0.25),
])
def test_the_byte_budget_becomes_a_fraction_of_torchs_total(budget, cuda_total, expected):
    assert node_main.memory_fraction_for(budget, cuda_total) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError):
        node_main.memory_fraction_for(0, cuda_total)


def test_apply_memory_fraction_uses_cudamemgetinfo_total(monkeypatch):
    """NVML says 80 GiB, cudaMemGetInfo 79.2: a 20 GiB budget is 20/79.2 of what torch multiplies by."""
    torch = pytest.importorskip("torch")
    applied = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * GIB, int(79.2 * GIB)))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: applied.append((f, d)))
    got = node_main.apply_memory_fraction("cuda:0", {"SWARM_MEMORY_BYTES": str(20 * GIB),
                                                     "SWARM_MEMORY_FRACTION": "0.9"})
    assert got == pytest.approx(20 / 79.2) and applied == [(got, 0)]
    assert node_main.apply_memory_fraction("cuda:0", {"SWARM_MEMORY_FRACTION": "0.3"}) == 0.3  # an older supervisor
    assert applied[-1] == (0.3, 0)
    assert node_main.apply_memory_fraction("cpu", {"SWARM_MEMORY_BYTES": "1"}) is None
    assert node_main.apply_memory_fraction("cuda:0", {}) is None and len(applied) == 2
    for name, bad in (("SWARM_MEMORY_BYTES", "lots"), ("SWARM_MEMORY_BYTES", "0"), ("SWARM_MEMORY_FRACTION", "1.5")):
        with pytest.raises(ConfigError) as exc:
            node_main.apply_memory_fraction("cuda:0", {name: bad})
        assert exc.value.field == name


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
    text = statusview.render_status(snap, running_pid=os.getpid(), runtime_dir=sup.paths.root, experiment="fake")
    assert "OVER" in text and "over GPU memory budget: worker_1" in text
    gpu.used[w1] = 12 * GIB
    advance(sup, fos, 0.5)
    assert read_status(sup.paths)["over_budget"] == [] and log.named("node_within_budget")


def test_unknown_gpu_memory_is_shown_as_unknown_and_never_over_budget(tmp_path):
    gpu = FakeGpu(80 * GIB)
    sup, fos, log = gpu_sup(tmp_path, gpu, workers=2, memory_fraction=0.25)
    start_all(sup, fos)
    w1, w2 = sup.nodes["worker_1"].proc.pid, sup.nodes["worker_2"].proc.pid
    gpu.used[w1], gpu.used[w2] = 30 * GIB, 2 * GIB  # worker_1 over its 20.5 GiB
    gpu.linger(w1)
    gpu.linger(w2)
    advance(sup, fos, 0.5)
    assert read_status(sup.paths)["over_budget"] == ["worker_1"]
    gpu.used[w1] = None  # MIG / a container: NVML lists it without a figure
    advance(sup, fos, 0.5)
    snap = read_status(sup.paths)
    n1, n2 = snap["nodes"]["worker_1"], snap["nodes"]["worker_2"]
    assert n1["gpu_bytes"] is None and n1["gpu_unknown"] is True and n1["over_budget"] is False
    assert n2["gpu_bytes"] == 2 * GIB and n2["gpu_unknown"] is False
    assert snap["over_budget"] == [] and not log.named("node_within_budget")  # unknown is not "within"
    text = statusview.render_status(snap, running_pid=os.getpid(), runtime_dir=sup.paths.root, experiment="fake")
    row = next(line for line in text.splitlines() if line.startswith("worker_1"))
    assert " ?/20.5G " in row and "OVER" not in row and "GPU MEM ?: NVML does not report" in text
    coord_row = next(line for line in text.splitlines() if line.startswith("coordinator"))
    assert "?" not in coord_row

    gpu.readable = False  # the list itself cannot be read: every worker unknown, the coordinator not on the GPU
    advance(sup, fos, 0.5)
    snap = read_status(sup.paths)
    assert snap["gpu"]["processes_readable"] is False
    assert [snap["nodes"][n]["gpu_unknown"] for n in ("coordinator", "worker_1", "worker_2")] == [False, True, True]
    assert all(snap["nodes"][n]["gpu_bytes"] is None for n in snap["nodes"])


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


def _one_worker_with_a_3s_release_bound(tmp_path):
    """(gpu, sup, fos, log, worker_1, its pid): one running GPU worker, the release wait bounded at 3 s."""
    gpu = FakeGpu(80 * GIB)
    sup, fos, log = gpu_sup(tmp_path, gpu, workers=1, backoff_initial_s=0.1)
    sup.gpu_release_timeout_s = 3.0
    gpu.clock = fos.monotonic
    start_all(sup, fos)
    w1 = sup.nodes["worker_1"]
    return gpu, sup, fos, log, w1, w1.proc.pid


def test_the_gpu_release_wait_is_bounded(tmp_path):
    gpu, sup, fos, log, w1, old = _one_worker_with_a_3s_release_bound(tmp_path)
    gpu.used[old] = GIB
    gpu.linger(old)
    fos.exit(old, 1)
    advance(sup, fos, 2.5)
    assert w1.status.state is S.BACKOFF
    advance(sup, fos, 1.0)
    assert w1.status.state in (S.STARTING, S.RUNNING) and log.named("gpu_not_released")


def test_an_unreadable_process_list_waits_out_the_release_bound(tmp_path):
    """NVML cannot list the processes: a killed worker's memory may still be held, so wait the whole bound."""
    gpu, sup, fos, log, w1, old = _one_worker_with_a_3s_release_bound(tmp_path)
    gpu.readable = False
    fos.exit(old, 1)
    advance(sup, fos, 2.5)
    assert w1.status.state is S.BACKOFF and log.named("gpu_wait_release")[0]["listing"] == "unknown"
    advance(sup, fos, 1.0)
    assert w1.status.state in (S.STARTING, S.RUNNING) and w1.proc.pid != old
    late = log.named("gpu_not_released")
    assert late[0]["listing"] == "unknown" and "cannot list the device's processes" in late[0]["detail"]


def test_real_children_on_a_fake_gpu(tmp_path, reaper):
    """NVML replaced by a fake that reports the real child pids: usage, over-budget, release wait."""
    gpu = FakeGpu(16 * GIB)
    cfg = fake_config(tmp_path / "shared", workers=2, device="cuda", memory_fraction=0.25, cuda_context_margin_gb=0.5)
    environ = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}  # the fake has GPU 0 only
    sup = Supervisor(cfg, node_command=FAKE_NODE, gpu=gpu, runtime_dir=tmp_path / "rt",
                     notifier=SdNotifier(environ={}), log=RecordingLog(), environ=environ)
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


def test_two_model_sizes_get_their_own_shares(tmp_path):
    """A heterogeneous swarm (workers:): worker_2's GPT-2-sized model gets its training state on top of an equal
    share; every worker is told its own budget."""
    from dataclasses import replace

    from node.config import WorkerEntry, WorkerModel
    from supervisor.gpu_plan import training_bytes

    fos = FakeOS()
    cfg = fake_config(tmp_path / "shared", workers=3, device="cuda", memory_fraction="auto", cuda_context_margin_gb=0.5)
    cfg = replace(cfg, model=replace(cfg.model, name="builtin:tiny-gpt2"),
                  workers=(WorkerEntry(name="worker_2", model=WorkerModel(name="builtin:gpt2-124m")),))
    sup = Supervisor(cfg, os_=fos, gpu=FakeGpu(80 * GIB), runtime_dir=tmp_path / "rt",
                     notifier=SdNotifier(environ={}), log=RecordingLog(), environ={}, sample_processes=False)
    start_all(sup, fos)
    plan = sup.launch.gpu_plan
    budgets = {env["NODE_ID"]: int(env["SWARM_MEMORY_BYTES"]) for env in worker_envs(fos)}
    assert budgets == {"worker_1": plan.share(1), "worker_2": plan.share(2), "worker_3": plan.share(3)}
    extra = training_bytes(124_439_808, "auto") - training_bytes(198_400, "auto")  # bf16 weights + grads, fp32 moments
    assert budgets["worker_1"] == budgets["worker_3"] and abs(budgets["worker_2"] - budgets["worker_1"] - extra) <= 1
    assert plan.planned_bytes + plan.headroom_bytes == 80 * GIB and plan.headroom_bytes >= 0.05 * 80 * GIB - 3
    launch = read_status(sup.paths)["launch"]
    assert launch["gpu_plan"]["worker_bytes"] == [budgets[f"worker_{i}"] for i in (1, 2, 3)]
    assert "from each one's model: worker_1 " in launch["describe"]


def test_launch_refuses_a_share_too_small_for_a_workers_model(tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.setenv("SWARM_RUNTIME_DIR", str(tmp_path / "rt"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(daemon, "open_gpu", lambda log=None: FakeGpu(4 * GIB))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "experiment": {"name": "gpu", "root": str(tmp_path / "shared")}, "model": {"name": "builtin:tiny-gpt2"},
        "sapo": {"tasks": [{"name": "toy_copy"}]},
        "supervisor": {"workers": 2, "device": "cuda", "memory_fraction": 0.2, "cuda_context_margin_gb": 0.5},
        "workers": [{"name": "worker_2", "model": {"name": "builtin:gpt2-124m"}}]}))
    assert cli.main(["launch", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "GPU plan refused" in err and "worker_2 (builtin:gpt2-124m) needs about 1.4 GiB for its weights, " \
        "gradients and optimizer state, more than its share of 0.8 GiB" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "rt" / "supervisor.pid").exists()
