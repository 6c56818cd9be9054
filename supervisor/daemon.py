"""The supervisor daemon: one coordinator and N workers, watched and restarted from one ``tick(now)``.

:class:`Supervisor` owns one :class:`ManagedNode` per node (``coordinator``, ``worker_1`` … ``worker_N``),
each wrapping a :class:`~supervisor.states.NodeStatus`. Every decision happens in :meth:`Supervisor.tick`,
in this order:

1. a recorded stop request (signal handlers only record) starts the stop: SIGTERM to every process
   group, one shared deadline (``stop_timeout_s``), then SIGKILL;
2. exits are reaped and classified in one line (:func:`supervisor.procs.classify_exit` over the log
   tail written since this spawn): exit 0 → EXITED (never restarted), exit 2 → FATAL "configuration
   error", a requested stop → STOPPED, anything else → BACKOFF (capped exponential) or FATAL
   (:class:`~supervisor.states.RestartPolicy`);
3. heartbeats (``node.heartbeat``, on local disk): the first one moves STARTING → RUNNING; a node silent
   for ``heartbeat_timeout_s``, whose main loop made no progress for as long, or without a first
   heartbeat within ``startup_timeout_s``, is hung: SIGKILL its group, then restart it;
4. spawns, one start-up at a time (the coordinator, then each worker once the previous one heartbeats or
   gave up; simultaneous CUDA start-ups fail), a killed GPU worker only once NVML no longer lists it
   (bounded by ``gpu_release_timeout_s``; a process list NVML cannot read waits the whole bound);
5. every ``monitor_interval_s``: psutil RSS/CPU and NVML memory per node (container PIDs mapped through
   NSpid; memory NVML does not report stays unknown, never 0), the over-budget flag, the status file,
   sd_notify.

The device: :func:`plan_launch` resolves ``supervisor.gpu`` / an inherited ``CUDA_VISIBLE_DEVICES`` to one
GPU or MIG instance by UUID; GPU workers get ``CUDA_VISIBLE_DEVICES=<that UUID>``, the coordinator none.

The OS (:class:`supervisor.procs.RealOS` / ``FakeOS``) and the GPU (:func:`supervisor.gpu.open_gpu` /
``FakeGpu``) are injected, so state-machine tests run on scripted histories. :meth:`Supervisor.run` is the
production loop: it must run in the main thread (``PR_SET_PDEATHSIG`` is per thread, and signal handlers
live there). Never imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import filelock
import psutil
import structlog

from node.heartbeat import HeartbeatRecord, default_runtime_dir, heartbeat_path, read_heartbeat
from node.layout import ExperimentLayout
from node.schemas import RoundState
from sapo.config import ConfigError
from supervisor import procs
from supervisor.gpu import GpuDevice, GpuInfo, GpuPlan, NoSuchGpu, PlanError, Release, match_gpu_processes, \
    nvml_pids_for, open_gpu, plan_memory, requested_gpu, wait_gpu_released
from supervisor.sdnotify import SdNotifier, child_env
from supervisor.states import (
    TERMINAL_STATES, ExitInfo, NodeState, NodeStatus, RestartPolicy, change_state,
)

S = NodeState
DEFAULT_NODE_COMMAND: tuple[str, ...] = (sys.executable, "-m", "node")
STATUS_VERSION = 1
EXIT_FINISHED = 0  # every node finished
EXIT_FATAL = 1  # some node went FATAL (or the loop itself failed)
EXIT_USAGE = 2  # a user mistake: configuration, GPU plan, a second supervisor
EXIT_CONFIG_ERROR = 2  # what a node returns for a configuration error (never retried)
STARTING_POLL_S = 0.25  # heartbeat polling while a node is starting (faster start-ups, restarts)
MAX_EVENT_COMMANDS = 8  # on_event commands running at once; more are skipped with a warning
_AUTO: Any = object()


class AlreadyRunning(RuntimeError):
    """A second supervisor for one experiment: the lock is held by ``pid``."""

    def __init__(self, pid: int | None, runtime_dir: Path):
        self.pid = pid
        self.runtime_dir = runtime_dir
        who = f"pid {pid}" if pid else "another process (pid unknown)"
        super().__init__(f"a supervisor is already running for this experiment: {who} "
                         f"(lock {runtime_dir / 'supervisor.lock'}); stop it with `swarm stop CONFIG`")


# --------------------------------------------------------------------------- runtime files

def cpu_share(workers: int) -> int:
    """Threads per CPU worker: the cores this process may use, divided among the workers (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers))


@dataclass(frozen=True)
class RuntimePaths:
    """Files of the local runtime dir (never the shared dir): lock, pid, status, logs, heartbeats."""

    root: Path

    @classmethod
    def for_config(cls, config) -> "RuntimePaths":
        """``node.heartbeat.default_runtime_dir`` of the experiment (``$SWARM_RUNTIME_DIR`` wins)."""
        return cls(Path(default_runtime_dir(config.experiment_dir)))

    @property
    def lock(self) -> Path:
        return self.root / "supervisor.lock"

    @property
    def pid_file(self) -> Path:
        return self.root / "supervisor.pid"

    @property
    def status_file(self) -> Path:
        return self.root / "status.json"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def supervisor_log(self) -> Path:
        """The supervisor's own JSON log (one event per line)."""
        return self.logs_dir / "supervisor.log"

    @property
    def detached_output(self) -> Path:
        """stdout/stderr of a ``--detach``-ed supervisor (tracebacks end up here)."""
        return self.logs_dir / "supervisor.out"

    @property
    def events_log(self) -> Path:
        """Output of the ``on_event`` commands."""
        return self.logs_dir / "on_event.log"

    def stdout_log(self, node_id: str) -> Path:
        return self.logs_dir / f"{node_id}.stdout.log"

    def stderr_log(self, node_id: str) -> Path:
        return self.logs_dir / f"{node_id}.stderr.log"

    def node_log(self, node_id: str) -> Path:
        """The node's own structured log (written by the node, not by us)."""
        return self.logs_dir / f"{node_id}.log"

    def heartbeat(self, node_id: str) -> Path:
        return heartbeat_path(self.root, node_id)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Temp file in the same directory, then ``os.replace``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_pid_file(path: Path) -> tuple[int, float | None] | None:
    """(pid, process create time or None) from ``supervisor.pid``, or None when absent or garbled."""
    try:
        parts = path.read_text(encoding="ascii", errors="replace").split()
    except OSError:
        return None
    try:
        pid = int(parts[0])
    except (IndexError, ValueError):
        return None
    try:
        created = float(parts[1]) if len(parts) > 1 else None
    except ValueError:
        created = None
    return pid, created


def running_supervisor(paths: RuntimePaths) -> int | None:
    """The pid of the live supervisor of this runtime dir, or None (no pid file, dead, or a reused pid)."""
    found = read_pid_file(paths.pid_file)
    if found is None:
        return None
    pid, created = found
    if not procs.is_alive(pid):
        return None
    if created is not None:
        try:
            if abs(psutil.Process(pid).create_time() - created) > 1.0:
                return None  # the pid was reused by an unrelated process (e.g. after a reboot)
        except psutil.Error:
            return None
    return pid


def read_status(paths: RuntimePaths) -> dict | None:
    """The last ``status.json`` written, or None."""
    try:
        with open(paths.status_file, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


# --------------------------------------------------------------------------- the launch plan

@dataclass(frozen=True)
class LaunchPlan:
    """Where the workers run: ``cpu``, or ``cuda`` on one GPU (or MIG instance) with a memory plan for it."""

    device: str
    gpu_plan: GpuPlan | None
    why: str  # one line: how the device was chosen
    gpu_device: GpuDevice | None = None
    notes: tuple[str, ...] = ()  # worth a warning at launch (e.g. supervisor.gpu overrode CUDA_VISIBLE_DEVICES)

    def describe(self) -> str:
        if self.gpu_plan is None:
            return f"device cpu ({self.why})"
        return f"device cuda ({self.why}): {self.gpu_plan.describe()}"

    def to_dict(self) -> dict:
        plan = dataclasses.asdict(self.gpu_plan) if self.gpu_plan else None
        if plan is not None:
            plan["budget_bytes_per_worker"] = self.gpu_plan.budget_bytes()
        return {"device": self.device, "why": self.why, "gpu_plan": plan, "describe": self.describe(),
                "gpu_device": dataclasses.asdict(self.gpu_device) if self.gpu_device else None,
                "notes": list(self.notes)}


def plan_launch(config, gpu: GpuInfo | None, environ: Mapping[str, str] | None = None) -> LaunchPlan:
    """Choose the device and share its memory among the workers.

    The device: ``supervisor.gpu``, else the first entry of ``environ``'s ``CUDA_VISIBLE_DEVICES``, else
    GPU 0 (see :func:`supervisor.gpu.requested_gpu`), looked up in NVML; a MIG instance is planned with
    its own memory. :class:`~sapo.config.ConfigError` naming the setting when that device does not
    exist, :class:`PlanError` when the plan cannot fit.
    """
    sv = config.supervisor
    environ = os.environ if environ is None else environ
    if sv.device == "cpu":
        return LaunchPlan("cpu", None, "supervisor.device is cpu")
    request = requested_gpu(sv.gpu, environ)
    if request.spec is None:
        hidden = f"CUDA_VISIBLE_DEVICES={request.inherited!r} hides every GPU"
        if sv.device == "cuda":
            raise PlanError(f"supervisor.device is 'cuda' but {hidden}; unset it, or choose one with "
                            f"--set supervisor.gpu=INDEX|UUID")
        return LaunchPlan("cpu", None, f"supervisor.device is auto and {hidden}")
    if gpu is None:
        if sv.device == "cuda":
            raise PlanError("supervisor.device is 'cuda' but no usable GPU was found (NVML unavailable or no "
                            "device); use --set supervisor.device=cpu (or auto) to run on the CPU")
        return LaunchPlan("cpu", None, "supervisor.device is auto and no GPU was found")
    device = _lookup(gpu, request.spec, request.field)
    plan = plan_memory(device.total_bytes, sv.workers, sv.memory_fraction, sv.cuda_context_margin_gb)
    notes = []
    if request.source == "supervisor.gpu" and request.inherited is not None:
        notes.extend(_overridden(gpu, device, request.inherited))
    return LaunchPlan("cuda", plan, f"{request.describe()}: {device.describe()}", gpu_device=device,
                      notes=tuple(notes))


def _lookup(gpu: GpuInfo, spec: str, field_name: str) -> GpuDevice:
    try:
        return gpu.device(spec)
    except NoSuchGpu as err:
        raise ConfigError(field_name, f"{err}") from None
    except Exception as err:  # noqa: BLE001 - an NVML failure while reading the device: one line, no traceback
        raise PlanError(f"cannot read GPU {spec} ({field_name}) from NVML: {type(err).__name__}: {err}") from None


def _overridden(gpu: GpuInfo, chosen: GpuDevice, inherited: str) -> list[str]:
    """A note when supervisor.gpu and an inherited CUDA_VISIBLE_DEVICES name different devices."""
    first = inherited.split(",")[0].strip()
    other = None
    if first and not first.startswith("-"):
        try:
            other = gpu.device(first).uuid
        except Exception:  # noqa: BLE001 - a device NVML does not know differs from ours
            other = None
    if other == chosen.uuid:
        return []
    return [f"supervisor.gpu wins over the inherited CUDA_VISIBLE_DEVICES={inherited!r}: "
            f"the workers use {chosen.uuid}"]


# --------------------------------------------------------------------------- one node

@dataclass
class ManagedNode:
    """A node as the supervisor sees it: its :class:`NodeStatus` plus the current process's details."""

    status: NodeStatus
    proc: Any = None  # a Popen (or FakeProcess) while a process exists
    spawn_wall: float = 0.0  # wall-clock time of the current spawn (heartbeats are wall-clock)
    stdout_offset: int = 0  # log sizes at spawn: the classification reads only this run's tail
    stderr_offset: int = 0
    nvml_pids: list[int] = field(default_factory=list)  # NSpid view of the pid, for the GPU release wait
    hung_detail: str | None = None  # set when we SIGKILLed it for silence
    stop_requested: bool = False  # we asked it to stop (SIGTERM), so its exit is not a failure
    kill_sent: bool = False  # SIGKILL sent after the stop deadline
    heartbeat: HeartbeatRecord | None = None
    gpu_bytes: int | None = None  # None: not listed by NVML, or listed with unknown memory (gpu_unknown)
    gpu_unknown: bool = False  # on the GPU but NVML does not say how much it holds: shown as "?"
    rss_bytes: int | None = None
    cpu_percent: float | None = None
    over_budget: bool = False
    log_tail: list[str] = field(default_factory=list)  # last lines of the last failed run
    gpu_wait_since: float | None = None
    reward: float | None = None
    psproc: Any = None  # psutil.Process of the current pid (cpu_percent needs the same object)

    @property
    def name(self) -> str:
        return self.status.name

    @property
    def role(self) -> str:
        return self.status.role


def node_names(workers: int) -> list[tuple[str, str]]:
    """``[("coordinator", "coordinator"), ("worker_1", "worker"), …]`` in start order."""
    return [("coordinator", "coordinator")] + [(f"worker_{i}", "worker") for i in range(1, workers + 1)]


# --------------------------------------------------------------------------- the supervisor

class Supervisor:
    """Spawns, watches, restarts and stops the nodes of one experiment (see the module docstring).

    Typical use: ``Supervisor(config, config_path=path).run()`` returns the exit code: 0 every node
    finished, 1 some node went FATAL, 128+N stopped by signal N (SIGTERM 143, SIGINT 130), or 0 when
    stopped after the experiment's final state was written. Tests drive :meth:`tick` directly.
    """

    def __init__(
        self,
        config,
        *,
        config_path: str | os.PathLike | None = None,
        overrides: Sequence[str] = (),
        node_command: Sequence[str] | None = None,
        os_: Any = None,
        gpu: Any = _AUTO,
        runtime_dir: str | os.PathLike | None = None,
        notifier: SdNotifier | None = None,
        log: Any = None,
        environ: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        sample_processes: bool = True,
        proc_root: str | os.PathLike = "/proc",
        gpu_release_timeout_s: float = 30.0,
        shared_poll_s: float = 5.0,
    ):
        self.config = config
        self.sv = config.supervisor
        self.config_path = str(Path(config_path).absolute()) if config_path else None
        self.overrides = list(overrides)
        self.node_command = list(node_command or DEFAULT_NODE_COMMAND)
        self.os = os_ or procs.RealOS()
        self._gpu_arg = gpu
        self.gpu: GpuInfo | None = None if gpu is _AUTO else gpu
        self._own_gpu = False
        self.paths = RuntimePaths(Path(runtime_dir) if runtime_dir else default_runtime_dir(config.experiment_dir))
        self.log = log or structlog.get_logger("supervisor")
        self.notifier = notifier if notifier is not None else SdNotifier(log=self.log)
        self.environ = dict(os.environ if environ is None else environ)
        self.cwd = str(cwd) if cwd else os.getcwd()
        self.sample_processes = sample_processes
        self.proc_root = proc_root
        self.gpu_release_timeout_s = gpu_release_timeout_s
        self.shared_poll_s = shared_poll_s
        self.policy = RestartPolicy.from_section(self.sv)
        self.layout = ExperimentLayout.from_config(config)
        self.nodes: dict[str, ManagedNode] = {
            name: ManagedNode(NodeStatus(name, role)) for name, role in node_names(self.sv.workers)}
        self.launch: LaunchPlan | None = None
        self.exit_code: int | None = None
        self.started_wall = self.os.now()
        self._stop_signal: int | None = None  # recorded by the handler
        self._kill_now = False  # a second stop signal: SIGKILL without waiting
        self._stopping = False
        self._stop_reason: str | None = None
        self._stop_deadline: float | None = None
        self._ready_sent = False
        self._next_monitor: float | None = None
        self._next_shared: float | None = None
        self._shared_thread: threading.Thread | None = None
        self._shared_slow = False
        self._last_watchdog: float | None = None
        self._last_status_line: str | None = None
        self._round_state: RoundState | None = None
        self._gpu_util: int | None = None
        self._gpu_readable: bool | None = None  # could NVML list the device's processes last time?
        self._gpu_monitor_error: str | None = None
        self._events: list[subprocess.Popen] = []
        self._lock: filelock.BaseFileLock | None = None
        self._self_proc: psutil.Process | None = None
        self._wake_r: int | None = None
        self._wake_w: int | None = None

    # ------------------------------------------------------------------ setup

    def prepare(self) -> LaunchPlan:
        """Open NVML (unless injected), choose the device, plan GPU memory.

        :class:`PlanError` when the plan is impossible, :class:`~sapo.config.ConfigError` when the chosen
        device does not exist; either way NVML is closed again.
        """
        if self.launch is not None:
            return self.launch
        if self._gpu_arg is _AUTO:
            self.gpu = open_gpu(self.log) if self.sv.device != "cpu" else None
            self._own_gpu = self.gpu is not None
        try:
            self.launch = plan_launch(self.config, self.gpu, self.environ)
        except BaseException:  # PlanError, ConfigError (no such device), or worse
            self.close_gpu()
            raise
        chosen = self.launch.gpu_device
        self.log.info("gpu_plan", device=self.launch.device, plan=self.launch.describe(), workers=self.sv.workers,
                      gpu_uuid=chosen.uuid if chosen else None)
        for note in self.launch.notes:
            self.log.warning("gpu_choice", detail=note)
        if self.launch.gpu_device is None:
            self.close_gpu()  # running on the CPU (e.g. CUDA_VISIBLE_DEVICES hides the GPUs): nothing to watch
        return self.launch

    def close_gpu(self) -> None:
        if self._own_gpu and self.gpu is not None:
            self.gpu.close()
        if self._own_gpu:
            self.gpu = None

    def acquire_lock(self) -> None:
        """One supervisor per experiment: take ``supervisor.lock`` or raise :class:`AlreadyRunning`."""
        self.paths.root.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.paths.lock))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            found = read_pid_file(self.paths.pid_file)
            raise AlreadyRunning(found[0] if found else None, self.paths.root) from None
        self._lock = lock
        try:
            created = psutil.Process().create_time()
        except psutil.Error:
            created = 0.0
        tmp = self.paths.pid_file.with_name(f".supervisor.pid.{os.getpid()}.tmp")
        tmp.write_text(f"{os.getpid()}\n{created:.3f}\n", encoding="ascii")
        os.replace(tmp, self.paths.pid_file)

    def release_lock(self) -> None:
        if self._lock is None:
            return
        found = read_pid_file(self.paths.pid_file)
        if found and found[0] == os.getpid():
            try:
                self.paths.pid_file.unlink()
            except OSError:
                pass
        self._lock.release()
        self._lock = None

    # ------------------------------------------------------------------ the node contract

    def command_for(self, node: ManagedNode) -> list[str]:
        """``[*node_command, --config, PATH, --role, ROLE, --node-id, ID, --set k=v, …]``."""
        argv = list(self.node_command)
        if self.config_path:
            argv += ["--config", self.config_path]
        argv += ["--role", node.role, "--node-id", node.name]
        for item in self.overrides:
            argv += ["--set", item]
        return argv

    def env_for(self, node: ManagedNode) -> dict[str, str]:
        """The environment of ``node``: ours minus systemd's variables, plus the contract's variables."""
        env = child_env(self.environ)
        device = self.launch.device if self.launch else "cpu"
        env.update(NODE_ROLE=node.role, NODE_ID=node.name, SWARM_RUNTIME_DIR=str(self.paths.root))
        env.pop("SWARM_MEMORY_FRACTION", None)
        env.pop("SWARM_MEMORY_BYTES", None)
        if node.role == "coordinator" or device != "cuda":
            env["SWARM_DEVICE"] = "cpu" if node.role == "coordinator" else device
            env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            assert self.launch is not None and self.launch.gpu_plan is not None and self.launch.gpu_device
            env["SWARM_DEVICE"] = "cuda"
            # A UUID names one device whatever CUDA's order; PCI_BUS_ID makes any index agree with nvidia-smi.
            env["CUDA_VISIBLE_DEVICES"] = self.launch.gpu_device.uuid
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            # Bytes, not a fraction: torch applies its fraction to cudaMemGetInfo's total, not NVML's.
            env["SWARM_MEMORY_BYTES"] = str(int(self.launch.gpu_plan.bytes_per_worker))
        if "OMP_NUM_THREADS" not in self.environ:
            # torch gives every process one thread per core: N CPU workers would oversubscribe the cores
            # (measured: a 2-worker CPU swarm on 2 cores ran 9x slower). Share them; the coordinator needs one.
            # GPU workers too: their CPU-side ops (sampling bookkeeping, batching, scoring) start OpenMP teams
            # whose spinning threads would compete with the other workers' kernel-launching threads.
            env["OMP_NUM_THREADS"] = str(1 if node.role == "coordinator" else cpu_share(self.sv.workers))
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    # ------------------------------------------------------------------ stop requests

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Record a stop (safe from a signal handler); a second request kills without waiting."""
        if self._stop_signal is not None:
            self._kill_now = True
            return
        self._stop_signal = int(signum)

    # ------------------------------------------------------------------ the tick

    def tick(self, now: float | None = None) -> bool:
        """One step of the monitor loop; True once the supervisor is done (:attr:`exit_code` is set)."""
        if self.exit_code is not None:
            return True
        if self.launch is None:
            self.prepare()
        now = self.os.monotonic() if now is None else now
        wall = self.os.now()
        if self._stop_signal is not None and not self._stopping:
            name = procs.signal_name(self._stop_signal)
            self._begin_stop(now, f"{name} received")
        for node in self.nodes.values():
            self._reap(node, now)
        if self._stopping:
            self._escalate(now)
        else:
            for node in self.nodes.values():
                self._check_liveness(node, now, wall)
            self._check_doomed(now)
            if not self._stopping:
                self._spawn_next(now)
        self._reap_events()
        done = self._is_done()
        if done:
            self.poll_shared(wait_s=5.0)
            self.exit_code = self._compute_exit_code()
        heavy = self._next_monitor is None or now >= self._next_monitor or done
        if heavy:
            self._next_monitor = now + self.sv.monitor_interval_s
            self._monitor(now)
        self._notify(now, done)
        if heavy or done:
            self.write_status(now)
        if done:
            self._finish(now)
        return done

    # ----- exits

    def _reap(self, node: ManagedNode, now: float) -> None:
        if node.proc is None:
            return
        rc = self.os.reap(node.proc)
        if rc is None:
            return
        pid = node.proc.pid
        tail = procs.tail_file(self.paths.stderr_log(node.name), start=node.stderr_offset, lines=20)
        if not tail.strip():
            tail = procs.tail_file(self.paths.stdout_log(node.name), start=node.stdout_offset, lines=20)
        if node.hung_detail is not None:
            info = procs.classify_exit(rc, requested_stop=False, hung=True, pid=pid)
            info = dataclasses.replace(info, detail=f"hung: {node.hung_detail}; killed by the supervisor")
        elif node.stop_requested:
            info = procs.classify_exit(rc, requested_stop=True, pid=pid)
        elif rc == EXIT_CONFIG_ERROR:
            last = _last_line(tail)
            info = ExitInfo(pid, rc, None, "config_error",
                            "configuration error (exit code 2)" + (f": {last}" if last else ""))
        else:
            info = procs.classify_exit(rc, requested_stop=False, log_tail=tail, pid=pid)
        node.proc = None
        node.psproc = None
        node.rss_bytes = node.cpu_percent = node.gpu_bytes = None
        node.gpu_unknown = False
        if info.is_failure or info.reason == "config_error":
            node.log_tail = [line[:400] for line in tail.splitlines()[-15:]]
        emit = self.log.info if not info.is_failure else self.log.warning
        emit("node_exited", node=node.name, role=node.role, pid=pid, returncode=rc, reason=info.reason,
             exit=info.one_line(), uptime_s=round(now - (node.status.started_at or now), 3))
        if info.finished:
            self.policy.record_failure(node.status, info, now)
            change_state(node.status, S.EXITED, reason="finished (exit 0)", now=now, log=self.log)
        elif info.reason == "stopped":
            self.policy.record_failure(node.status, info, now)
            change_state(node.status, S.STOPPED, reason=info.detail, now=now, log=self.log)
        else:
            self._on_failure(node, info, now)
        node.status.pid = None

    def _on_failure(self, node: ManagedNode, info: ExitInfo, now: float) -> None:
        st = node.status
        self.policy.record_failure(st, info, now)
        if self._stopping and st.state is S.STOPPING:  # e.g. a hung node reaped while we stop
            change_state(st, S.STOPPED, reason=f"{info.one_line()} (while stopping)", now=now, log=self.log)
            return
        why = self.policy.should_give_up(st, now)
        if info.reason == "config_error":
            why = f"configuration error, not retried: {info.one_line()}"
        if why:
            st.fatal_reason = why
            change_state(st, S.FATAL, reason=why, now=now, log=self.log)
            self._event("fatal", node.name, why)
            return
        st.backoff_until = self.policy.next_start(st, now)
        delay = st.backoff_until - now
        change_state(st, S.BACKOFF, reason=f"{info.one_line()}; restart in {delay:.1f} s", now=now, log=self.log)
        self._event("restart", node.name, info.one_line())

    # ----- heartbeats

    def _check_liveness(self, node: ManagedNode, now: float, wall: float) -> None:
        st = node.status
        if st.state not in (S.STARTING, S.RUNNING) or node.proc is None:
            return
        rec = read_heartbeat(self.paths.heartbeat(node.name))
        if rec is not None and (rec.pid == node.proc.pid or rec.heartbeat_at >= node.spawn_wall - 1.0):
            node.heartbeat = rec
        else:
            rec = None
        timeout = self.sv.heartbeat_timeout_s
        if st.state is S.STARTING:
            if rec is not None:
                st.mark_heartbeat()
                change_state(st, S.RUNNING, reason=f"first heartbeat after {now - (st.started_at or now):.1f} s",
                             now=now, log=self.log)
            elif now - (st.started_at or now) > self.sv.startup_timeout_s:
                self._kill_hung(node, now, f"no first heartbeat within startup_timeout_s={self.sv.startup_timeout_s:g}")
            return
        hb = node.heartbeat
        last_beat = max(node.spawn_wall, hb.heartbeat_at if hb else node.spawn_wall)
        if wall - last_beat > timeout:
            self._kill_hung(node, now, f"no heartbeat for {wall - last_beat:.1f} s "
                                       f"(heartbeat_timeout_s={timeout:g}): the process is frozen")
        elif hb is not None and hb.status not in ("finished", "stopping") and wall - hb.progress_at > timeout:
            self._kill_hung(node, now, f"main loop made no progress for {wall - hb.progress_at:.1f} s in phase "
                                       f"{hb.phase!r} (heartbeat_timeout_s={timeout:g}) while its heartbeat "
                                       f"thread is alive")

    def _kill_hung(self, node: ManagedNode, now: float, detail: str) -> None:
        node.hung_detail = detail
        pid = node.proc.pid
        self.log.warning("node_hung", node=node.name, role=node.role, pid=pid, detail=detail)
        self._signal(node, signal.SIGKILL)
        change_state(node.status, S.STOPPING, reason=f"hung: {detail}", now=now, log=self.log)

    def _signal(self, node: ManagedNode, sig: int) -> None:
        try:
            self.os.signal_group(node.proc.pid, sig)
        except OSError as err:  # EPERM on a live process: nothing better to do than say so
            self.log.warning("signal_failed", node=node.name, pid=node.proc.pid, signal=procs.signal_name(sig),
                             error=str(err))

    # ----- spawning

    def _spawn_next(self, now: float) -> None:
        """Spawn at most one node: none while another one is starting (one start-up at a time)."""
        if any(n.status.state is S.STARTING for n in self.nodes.values()):
            return
        for node in self.nodes.values():
            st = node.status
            if st.state is S.STOPPED:
                self._spawn(node, now)
                return
            if st.state is S.BACKOFF and st.backoff_until is not None and now >= st.backoff_until:
                if not self._gpu_released(node, now):
                    continue
                self._spawn(node, now)
                return

    def _gpu_released(self, node: ManagedNode, now: float) -> bool:
        """True once NVML no longer lists the node's old pid, or the wait passed its bound.

        A process list NVML cannot read is not "released": the wait then lasts ``gpu_release_timeout_s``.
        """
        if self.gpu is None or not node.nvml_pids or self.launch is None or self.launch.gpu_device is None \
                or node.role != "worker":
            return True
        found = wait_gpu_released(self.gpu, self.launch.gpu_device, node.nvml_pids, timeout_s=0.0)
        if found is Release.RELEASED:
            if node.gpu_wait_since is not None:
                self.log.info("gpu_released", node=node.name, waited_s=round(now - node.gpu_wait_since, 3))
            node.gpu_wait_since = None
            node.nvml_pids = []
            return True
        if node.gpu_wait_since is None:
            node.gpu_wait_since = now
            self.log.info("gpu_wait_release", node=node.name, pids=node.nvml_pids, listing=found.value,
                          timeout_s=self.gpu_release_timeout_s)
            return False
        if now - node.gpu_wait_since >= self.gpu_release_timeout_s:
            why = ("NVML cannot list the device's processes, so their release cannot be seen"
                   if found is Release.UNKNOWN else "NVML still lists it")
            self.log.warning("gpu_not_released", node=node.name, pids=node.nvml_pids, listing=found.value,
                             waited_s=round(now - node.gpu_wait_since, 3),
                             detail=f"{why}; respawning anyway; it may run out of GPU memory")
            node.gpu_wait_since = None
            node.nvml_pids = []
            return True
        return False

    def _spawn(self, node: ManagedNode, now: float) -> None:
        st = node.status
        argv = self.command_for(node)
        out, err = self.paths.stdout_log(node.name), self.paths.stderr_log(node.name)
        try:
            self.paths.heartbeat(node.name).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.log.warning("stale_heartbeat_not_removed", node=node.name, error=str(exc))
        node.stdout_offset, node.stderr_offset = procs.file_size(out), procs.file_size(err)
        wall = self.os.now()
        try:
            proc = self.os.spawn(argv, env=self.env_for(node), cwd=self.cwd, stdout_path=out, stderr_path=err)
        except OSError as exc:
            info = procs.spawn_failure(exc, argv)
            self.log.error("node_spawn_failed", node=node.name, error=info.detail)
            self.policy.record_failure(st, info, now)
            st.fatal_reason = f"configuration error, not retried: {info.one_line()}"
            change_state(st, S.FATAL, reason=st.fatal_reason, now=now, log=self.log)
            self._event("fatal", node.name, st.fatal_reason)
            return
        restart = st.state is S.BACKOFF
        if restart:
            st.restarts += 1
        st.mark_spawned(proc.pid, now)
        node.proc, node.spawn_wall = proc, wall
        node.hung_detail, node.stop_requested, node.kill_sent = None, False, False
        node.heartbeat, node.psproc, node.gpu_wait_since = None, None, None
        node.over_budget = False
        if self.launch is not None and self.launch.gpu_device is not None and node.role == "worker":
            node.nvml_pids = nvml_pids_for(proc.pid, self.proc_root)  # NVML's view, kept for after its death
        change_state(st, S.STARTING, reason=f"restart #{st.restarts}" if restart else "launch", now=now,
                     log=self.log)
        self.log.info("node_spawned", node=node.name, role=node.role, pid=proc.pid, restarts=st.restarts,
                      device=self.env_for(node)["SWARM_DEVICE"], stdout=str(out), stderr=str(err))

    # ----- the swarm as a whole

    def _check_doomed(self, now: float) -> None:
        """Stop everything when the swarm cannot progress: the coordinator or every worker is FATAL."""
        coord = self.nodes["coordinator"].status
        workers = [n.status for n in self.nodes.values() if n.role == "worker"]
        if all(n.status.state in TERMINAL_STATES for n in self.nodes.values()):
            return  # done anyway
        if coord.state is S.FATAL:
            self._begin_stop(now, "the coordinator is FATAL: the swarm cannot progress")
        elif workers and all(w.state is S.FATAL for w in workers):
            self._begin_stop(now, "every worker is FATAL: the swarm cannot progress")

    def _begin_stop(self, now: float, reason: str) -> None:
        self._stopping = True
        self._stop_reason = reason
        self._stop_deadline = now + self.sv.stop_timeout_s
        self.notifier.stopping()
        self.log.info("supervisor_stopping", reason=reason, stop_timeout_s=self.sv.stop_timeout_s)
        for node in self.nodes.values():
            st = node.status
            if st.state in (S.STARTING, S.RUNNING):
                node.stop_requested = True
                self._signal(node, signal.SIGTERM)
                change_state(st, S.STOPPING, reason=reason, now=now, log=self.log)
            elif st.state is S.BACKOFF:
                change_state(st, S.STOPPED, reason=reason, now=now, log=self.log)

    def _escalate(self, now: float) -> None:
        """SIGKILL every group still alive once the shared stop deadline passed."""
        if not (self._kill_now or (self._stop_deadline is not None and now >= self._stop_deadline)):
            return
        for node in self.nodes.values():
            if node.proc is not None and not node.kill_sent:
                node.kill_sent = True
                self.log.warning("node_killed", node=node.name, pid=node.proc.pid,
                                 reason="second stop request" if self._kill_now else
                                 f"still running {self.sv.stop_timeout_s:g} s after SIGTERM")
                self._signal(node, signal.SIGKILL)

    def _is_done(self) -> bool:
        if any(n.proc is not None for n in self.nodes.values()):
            return False
        if self._stopping:
            return True
        return all(n.status.state in TERMINAL_STATES for n in self.nodes.values())

    def _compute_exit_code(self) -> int:
        states = [n.status.state for n in self.nodes.values()]
        if all(s is S.EXITED for s in states):
            return EXIT_FINISHED
        if any(s is S.FATAL for s in states):
            return EXIT_FATAL
        if self._stop_signal is not None:
            if self._round_state is not None and self._round_state.finished:
                return EXIT_FINISHED
            return 128 + self._stop_signal
        return EXIT_FATAL

    def _finish(self, now: float) -> None:
        code = self.exit_code
        fatal = [n.name for n in self.nodes.values() if n.status.state is S.FATAL]
        if code == EXIT_FINISHED:
            self._event("finish", "", "every node finished" if not self._stop_signal else
                        "stopped after the experiment finished")
        self.log.info("supervisor_exiting", exit_code=code, fatal=fatal, stop_reason=self._stop_reason)

    # ----- monitoring

    def _monitor(self, now: float) -> None:
        if self.sample_processes:
            for node in self.nodes.values():
                self._sample(node)
        if self.gpu is not None:
            self._sample_gpu()
        if self._next_shared is None or now >= self._next_shared:
            self._next_shared = now + self.shared_poll_s
            self.poll_shared()
        for node in self.nodes.values():
            self.policy.reset_if_stable(node.status, now)

    def _sample(self, node: ManagedNode) -> None:
        if node.proc is None:
            return
        try:
            if node.psproc is None or node.psproc.pid != node.proc.pid:
                node.psproc = psutil.Process(node.proc.pid)
                node.psproc.cpu_percent(None)
            rss = node.psproc.memory_info().rss
            cpu = node.psproc.cpu_percent(None)
            for child in node.psproc.children(recursive=True):
                try:
                    rss += child.memory_info().rss
                except psutil.Error:
                    pass
            node.rss_bytes, node.cpu_percent = rss, cpu
        except psutil.Error:
            node.rss_bytes = node.cpu_percent = None

    def _sample_gpu(self) -> None:
        device = self.launch.gpu_device if self.launch else None
        if device is None:
            return
        try:
            listed = self.gpu.processes(device)
            self._gpu_util = self.gpu.utilization(device)
        except Exception as err:  # noqa: BLE001 - monitoring never takes the supervisor down
            if str(err) != self._gpu_monitor_error:  # once per kind of failure, not every tick
                self._gpu_monitor_error = str(err)
                self.log.warning("gpu_monitor_failed", error=str(err))
            listed = None
        self._gpu_readable = listed is not None
        live = {n.proc.pid: n for n in self.nodes.values() if n.proc is not None}
        used = match_gpu_processes(live, listed or [], proc_root=self.proc_root)
        budget = self.launch.gpu_plan.budget_bytes() if self.launch and self.launch.gpu_plan else None
        for pid, node in live.items():
            on_gpu = node.role == "worker"
            node.gpu_bytes = used.get(pid)
            # Unknown: listed without a figure, or a worker when the list itself cannot be read. Never 0.
            node.gpu_unknown = (pid in used and node.gpu_bytes is None) or (listed is None and on_gpu)
            over = bool(budget and on_gpu and node.gpu_bytes is not None and node.gpu_bytes > budget)
            if over and not node.over_budget:
                self.log.warning("node_over_budget", node=node.name, pid=pid, gpu_bytes=node.gpu_bytes,
                                 budget_bytes=budget, detail=f"{node.gpu_bytes / 2**30:.2f} GiB used > "
                                 f"{budget / 2**30:.2f} GiB planned (fraction + CUDA context)")
            elif node.over_budget and not over and node.gpu_bytes is not None:
                self.log.info("node_within_budget", node=node.name, pid=pid, gpu_bytes=node.gpu_bytes)
            node.over_budget = over

    def poll_shared(self, wait_s: float | None = None) -> None:
        """Read the round state and the workers' last rewards from the shared dir in a helper thread.

        The shared dir may be a Drive/FUSE mount that blocks: the loop never waits on it (except up to
        ``wait_s`` when asked). A poll still running from last time is not started again.
        """
        thread = self._shared_thread
        if thread is None or not thread.is_alive():
            if thread is not None and self._shared_slow:
                self._shared_slow = False
                self.log.info("shared_dir_responsive_again")
            thread = threading.Thread(target=self._read_shared, name="shared-poll", daemon=True)
            self._shared_thread = thread
            thread.start()
        elif not self._shared_slow:
            self._shared_slow = True
            self.log.warning("shared_dir_slow", detail="the previous read of the shared dir has not returned; "
                                                       "status shows older round/reward figures")
        if wait_s is not None:
            thread.join(wait_s)

    def _read_shared(self) -> None:
        self._read_round_state()
        for node in list(self.nodes.values()):
            if node.role == "worker":
                reward = self._last_reward(node.name)
                if reward is not None:
                    node.reward = reward

    def _read_round_state(self) -> None:
        """The coordinator's state file (shared dir; errors are ignored, the next poll retries)."""
        try:
            with open(self.layout.state_file(), "rb") as f:
                data = f.read(1024 * 1024)
            self._round_state = RoundState.from_json(json.loads(data))
        except (OSError, ValueError):
            pass

    def _last_reward(self, node_id: str) -> float | None:
        """``reward_local`` (or another reward field) of the node's last metrics line."""
        try:
            text = procs.tail_file(self.layout.metrics_file(node_id), max_bytes=16384, lines=3)
        except (OSError, ValueError):
            return None
        for line in reversed(text.splitlines()):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                for key in ("reward_local", "mean_reward", "reward"):
                    value = obj.get(key)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        return float(value)
        return None

    # ----- sd_notify and status

    def summary_line(self) -> str:
        """One line for STATUS= and the console: round, node counts, restarts."""
        counts: dict[str, int] = {}
        for n in self.nodes.values():
            counts[n.status.state.value] = counts.get(n.status.state.value, 0) + 1
        rs = self._round_state
        rnd = self._current_round()
        round_text = (f"round {rnd}/{self.config.experiment.max_rounds}" if rnd is not None else "round -")
        if rs is not None and rs.finished:
            round_text += " (finished)"
        parts = ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items()))
        restarts = sum(n.status.restarts for n in self.nodes.values())
        text = f"{round_text}: {parts}; restarts {restarts}"
        if self.exit_code is not None:
            text = f"exited with code {self.exit_code}" + (f" ({self._stop_reason})" if self._stop_reason else "") \
                + "; " + text
        elif self._stopping:
            text = f"stopping ({self._stop_reason}); " + text
        return text

    def _current_round(self) -> int | None:
        if self._round_state is not None:
            return self._round_state.round
        hb = self.nodes["coordinator"].heartbeat
        if hb is not None and hb.round >= 0:
            return hb.round
        return None

    def _notify(self, now: float, done: bool) -> None:
        if not self.notifier.enabled:
            return
        if not self._ready_sent and self._launch_complete():
            self._ready_sent = True
            self.notifier.ready()
        if self._last_watchdog is None or now - self._last_watchdog >= 1.0 or done:
            self._last_watchdog = now
            self.notifier.watchdog()
        line = self.summary_line()
        if line != self._last_status_line:
            self._last_status_line = line
            self.notifier.status(line)

    def _launch_complete(self) -> bool:
        """Every node RUNNING, or the first launch is over (each node left STOPPED/STARTING once)."""
        states = [n.status.state for n in self.nodes.values()]
        if all(s is S.RUNNING for s in states):
            return True
        return not any(s in (S.STOPPED, S.STARTING) for s in states) and not self._stopping

    def snapshot(self, now: float | None = None) -> dict:
        """Everything ``swarm status`` shows, JSON-ready."""
        now = self.os.monotonic() if now is None else now
        wall = self.os.now()
        if self.exit_code is not None:
            state = "exited"
        elif self._stopping:
            state = "stopping"
        elif self._launch_complete():
            state = "running"
        else:
            state = "starting"
        nodes = {}
        budget = self.launch.gpu_plan.budget_bytes() if self.launch and self.launch.gpu_plan else None
        for n in self.nodes.values():
            d = n.status.to_dict(now)
            hb = n.heartbeat if n.proc is not None else None
            d.update(
                heartbeat_age_s=round(wall - hb.heartbeat_at, 3) if hb else None,
                progress_age_s=round(wall - hb.progress_at, 3) if hb else None,
                phase=hb.phase if hb else None,
                round=hb.round if hb else None,
                node_status=hb.status if hb else None,
                rss_bytes=n.rss_bytes, cpu_percent=n.cpu_percent, gpu_bytes=n.gpu_bytes, gpu_unknown=n.gpu_unknown,
                gpu_budget_bytes=budget if n.role == "worker" else None, over_budget=n.over_budget,
                reward=n.reward, log_tail=list(n.log_tail),
                waiting_for_gpu_release=n.gpu_wait_since is not None,
                logs={"stdout": str(self.paths.stdout_log(n.name)), "stderr": str(self.paths.stderr_log(n.name)),
                      "structured": str(self.paths.node_log(n.name))},
            )
            nodes[n.name] = d
        me = self._self_usage()
        rs = self._round_state
        return {
            "version": STATUS_VERSION,
            "state": state,
            "summary": self.summary_line(),
            "updated_at": wall,
            "supervisor": {"pid": os.getpid(), "started_at": self.started_wall, **me},
            "experiment": self.config.experiment.name,
            "experiment_dir": str(Path(self.config.experiment_dir).absolute()),
            "config_path": self.config_path,
            "runtime_dir": str(self.paths.root),
            "workers": self.sv.workers,
            "launch": self.launch.to_dict() if self.launch else None,
            "gpu": {"available": self.gpu is not None, "utilization": self._gpu_util,
                    "device": dataclasses.asdict(self.launch.gpu_device) if self.launch and self.launch.gpu_device
                    else None, "processes_readable": self._gpu_readable},
            "round": self._current_round(),
            "max_rounds": self.config.experiment.max_rounds,
            "finished": bool(rs.finished) if rs else False,
            "fatal": [{"node": n.name, "reason": n.status.fatal_reason} for n in self.nodes.values()
                      if n.status.state is S.FATAL],
            "over_budget": [n.name for n in self.nodes.values() if n.over_budget],
            "stop_reason": self._stop_reason,
            "exit_code": self.exit_code,
            "nodes": nodes,
        }

    def _self_usage(self) -> dict:
        try:
            if self._self_proc is None:
                self._self_proc = psutil.Process()
                self._self_proc.cpu_percent(None)
            return {"rss_bytes": self._self_proc.memory_info().rss, "cpu_percent": self._self_proc.cpu_percent(None)}
        except psutil.Error:
            return {"rss_bytes": None, "cpu_percent": None}

    def write_status(self, now: float | None = None) -> None:
        try:
            write_json_atomic(self.paths.status_file, self.snapshot(now))
        except OSError as err:
            self.log.warning("status_write_failed", path=str(self.paths.status_file), error=str(err))

    # ----- on_event

    def _event(self, kind: str, node: str, reason: str) -> None:
        """Fire and forget ``supervisor.on_event`` via /bin/sh -c (reaped by later ticks)."""
        command = self.sv.on_event
        if not command:
            return
        self._reap_events()
        if len(self._events) >= MAX_EVENT_COMMANDS:
            self.log.warning("on_event_skipped", kind=kind, node=node, running=len(self._events))
            return
        env = child_env(self.environ)
        env.update(SWARM_EVENT=kind, SWARM_NODE=node, SWARM_REASON=reason,
                   SWARM_EXPERIMENT=self.config.experiment.name, SWARM_RUNTIME_DIR=str(self.paths.root))
        try:
            self.paths.logs_dir.mkdir(parents=True, exist_ok=True)
            with open(self.paths.events_log, "ab") as out:
                proc = subprocess.Popen(["/bin/sh", "-c", command], env=env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        except OSError as err:
            self.log.warning("on_event_failed", kind=kind, node=node, error=str(err))
            return
        self._events.append(proc)
        self.log.info("on_event_started", kind=kind, node=node, pid=proc.pid)

    def _reap_events(self) -> None:
        still = []
        for proc in self._events:
            rc = proc.poll()
            if rc is None:
                still.append(proc)
            elif rc != 0:
                self.log.warning("on_event_exit", pid=proc.pid, returncode=rc, log=str(self.paths.events_log))
        self._events = still

    def wait_events(self, timeout_s: float = 5.0) -> None:
        """Give running on_event commands a moment (a finish alert) before the supervisor exits."""
        deadline = time.monotonic() + timeout_s
        for proc in self._events:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log.warning("on_event_still_running", pid=proc.pid)
        self._reap_events()

    # ------------------------------------------------------------------ the loop

    def next_wake(self, now: float) -> float:
        """Seconds until the next tick is useful (signals and child exits wake the loop earlier)."""
        t = self._next_monitor if self._next_monitor is not None else now
        starting = any(n.status.state is S.STARTING for n in self.nodes.values())
        floor = now + STARTING_POLL_S if starting else now  # no spawn while another node is starting
        for n in self.nodes.values():
            st = n.status
            if st.state is S.STARTING or (st.state is S.STOPPED and not self._stopping):
                t = min(t, now + STARTING_POLL_S)
            elif st.state is S.BACKOFF and st.backoff_until is not None:
                gpu_wait = now + 0.5 if n.gpu_wait_since is not None else now
                t = min(t, max(st.backoff_until, floor, gpu_wait))
        if self._stopping and self._stop_deadline is not None:
            t = min(t, max(self._stop_deadline, now + 0.05), now + 1.0)
        return max(0.01, t - now)

    def run(self, *, on_tick: Callable[["Supervisor"], None] | None = None, tick_interval: float | None = None,
            on_started: Callable[["Supervisor"], None] | None = None) -> int:
        """The production loop (main thread only): plan, lock, tick until done; returns the exit code.

        ``on_tick`` runs after every tick (the live display), at least every ``tick_interval`` seconds.
        ``on_started`` runs once the lock is held (``--detach`` reports success there).
        Raises :class:`PlanError` or :class:`AlreadyRunning` before anything is spawned.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Supervisor.run must be called from the main thread")
        try:
            self.prepare()
            self.acquire_lock()
        except BaseException:
            self.close_gpu()
            raise
        previous = self._install_signals()
        try:
            self.log.info("supervisor_started", pid=os.getpid(), experiment=self.config.experiment.name,
                          experiment_dir=str(self.config.experiment_dir), runtime_dir=str(self.paths.root),
                          workers=self.sv.workers, node_command=self.node_command, plan=self.launch.describe())
            if on_started is not None:
                on_started(self)
            while True:
                done = self.tick()
                if on_tick is not None:
                    on_tick(self)
                if done:
                    break
                delay = self.next_wake(self.os.monotonic())
                if tick_interval is not None:
                    delay = min(delay, tick_interval)
                self._wait(delay)
        except BaseException as err:
            self.log.error("supervisor_crashed", error=f"{type(err).__name__}: {err}")
            self.emergency_stop()
            self._stop_reason = f"supervisor failure: {type(err).__name__}: {err}"
            self.exit_code = EXIT_FATAL
            self.write_status()
            raise
        finally:
            self._restore_signals(previous)
            self.wait_events()
            self.notifier.close()
            self.close_gpu()
            self.release_lock()
        return int(self.exit_code if self.exit_code is not None else EXIT_FATAL)

    def emergency_stop(self, timeout_s: float | None = None) -> None:
        """Stop every node now (SIGTERM, wait, SIGKILL), e.g. when the loop itself failed."""
        if not any(n.proc is not None for n in self.nodes.values()):
            return
        now = self.os.monotonic()
        if not self._stopping:
            self._begin_stop(now, "supervisor failure")
        deadline = now + (self.sv.stop_timeout_s if timeout_s is None else timeout_s)
        while any(n.proc is not None for n in self.nodes.values()):
            now = self.os.monotonic()
            for node in self.nodes.values():
                if node.proc is not None and self.os.reap(node.proc) is not None:
                    node.proc = None
                elif node.proc is not None and now >= deadline and not node.kill_sent:
                    node.kill_sent = True
                    self._signal(node, signal.SIGKILL)
            if now >= deadline + 10:
                break
            self.os.sleep(0.05)

    def _install_signals(self) -> dict:
        previous: dict = {}

        def record(signum, _frame):
            self.request_stop(signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            previous[sig] = signal.signal(sig, record)
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.siginterrupt(signal.SIGCHLD, False)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        previous["wakeup_fd"] = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        return previous

    def _restore_signals(self, previous: dict) -> None:
        signal.set_wakeup_fd(previous.pop("wakeup_fd", -1))
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = None

    def _wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``; a signal (stop request, child exit) ends the wait early."""
        if self._wake_r is None:
            self.os.sleep(seconds)
            return
        if self._stop_signal is not None and not self._stopping:
            return
        try:
            ready, _, _ = select.select([self._wake_r], [], [], max(0.0, seconds))
        except InterruptedError:
            ready = []
        if ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except (BlockingIOError, OSError):
                pass


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1]
    return line if len(line) <= 300 else line[:297] + "..."
