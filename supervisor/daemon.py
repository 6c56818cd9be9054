"""The supervisor daemon: one coordinator and N workers, watched and restarted from one ``tick(now)``.

:class:`Supervisor` owns one :class:`ManagedNode` per node (``coordinator``, ``worker_1`` … ``worker_N``),
each wrapping a :class:`~supervisor.states.NodeStatus`. On a joining host (``swarm launch --join``, ``host``
set) it owns workers only, ``<host>-worker_1`` … ``<host>-worker_N``, for an experiment whose coordinator runs
elsewhere, and spawns them once the experiment exists (:class:`supervisor.launch.ExperimentGate`; until then
the summary line says what it waits for, and ``waiting_for_experiment`` is logged every :data:`WAIT_LOG_S`).
Every decision happens in :meth:`Supervisor.tick`, in this order:

1. a recorded stop request starts the stop (:mod:`supervisor.stopping`: SIGTERM to every process
   group, one shared deadline ``stop_timeout_s``, then SIGKILL);
2. exits are reaped and classified (:func:`exit_info` over the log tail written since this spawn):
   exit 0 → EXITED (never restarted), exit 2 → FATAL "configuration error", a requested stop →
   STOPPED, anything else → BACKOFF (capped exponential) or FATAL (:class:`~supervisor.states.RestartPolicy`);
3. heartbeats (``node.heartbeat``, on local disk): the first one moves STARTING → RUNNING; a node silent
   for ``heartbeat_timeout_s``, whose main loop made no progress for as long, or without a first
   heartbeat within ``startup_timeout_s``, is hung: SIGKILL its group, then restart it. Unless the
   runtime dir's filesystem is full (:class:`supervisor.managed.RuntimeDisk`): then no node can write a
   heartbeat, so a silent one is held under the ``runtime_disk_full`` condition instead, the error
   ``runtime_disk_full`` is logged (once a minute) and shown in the summary line, and all resumes when
   space returns;
4. spawns, as ``supervisor.stagger`` allows (:data:`~supervisor.states.STAGGER_POLICIES`): on the CPU every
   node at once; on a GPU the coordinator and the first worker, then each next worker once no worker is still
   loading its model (simultaneous CUDA model loads spike past the memory plan); ``heartbeat`` is one start-up
   at a time. A killed GPU worker is respawned only once NVML no longer lists it
   (:meth:`supervisor.watch.GpuWatch.released`, bounded by ``gpu_release_timeout_s``);
5. every ``monitor_interval_s``: psutil and NVML figures and the shared dir (:mod:`supervisor.watch`);
   every tick, sd_notify and ``status.json``, rewritten only when something lasting changed or its
   refresh is due (:class:`supervisor.status.StatusFile`); every :data:`LOG_CHECK_S`, the logs other
   processes hold open are copied and truncated past their size limit (:mod:`node.logs` lists every
   log and its bound). The first tick starts the tracking thread (:mod:`supervisor.tracking`,
   ``tracking.report_to``), the last one stops it after it streamed the nodes' last lines.

The rest lives beside it: the launch plan and node contract (:mod:`supervisor.launch`), the runtime dir,
lock and pid file (:mod:`supervisor.runfiles`), ``on_event`` (:mod:`supervisor.hooks`) and the production
loop with its signal handling (:mod:`supervisor.loop`). The OS (:class:`supervisor.procs.RealOS`) and
the GPU (:func:`supervisor.gpu.open_gpu`) are injected, so state-machine tests run on scripted histories
(``tests/doubles.py``). Never imports torch.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import structlog

from node.layout import ExperimentLayout
from node.logs import LOG_MAX_BYTES, rotate_if_large, truncate_if_large
from node.signing import KEY_ENV, KeyProblem, parse_key
from supervisor import loop, procs, status
from supervisor.gpu import GpuInfo
from supervisor.hooks import EventHooks
from supervisor.launch import (
    DEFAULT_NODE_COMMAND, ExperimentGate, LaunchPlan, node_argv, node_env, node_names, plan_launch,
)
from supervisor.loop import EXIT_FATAL, EXIT_FINISHED
from supervisor.managed import ManagedNode, RuntimeDisk, exit_info, hung_verdict
from supervisor.nvml import open_gpu
from supervisor.runfiles import RuntimePaths, SupervisorLock
from supervisor.sdnotify import SdNotifier, SupervisorNotices
from supervisor.states import (
    TERMINAL_STATES, ExitInfo, NodeState, NodeStatus, RestartPolicy, change_state, resolve_stagger, set_condition,
    spawn_held_by,
)
from supervisor.stopping import StopSequence
from supervisor.tracking import Tracking
from supervisor.watch import GpuWatch, ProcessSampler, SharedPoller

S = NodeState
STARTING_POLL_S = 0.25  # heartbeat polling while a node is starting (faster start-ups, restarts)
LOG_CHECK_S = 30.0  # how often the captured logs are checked against their size limit
TRACKING_CLOSE_S = 30.0  # at the end, how long the tracking thread may take to stream the last lines
DISK_FULL = "runtime_disk_full"  # the condition of a node held while the runtime disk is full
WAIT_LOG_S = 30.0  # a joining host waiting for the experiment says so this often
_AUTO: Any = object()


class Supervisor:
    """Spawns, watches, restarts and stops the nodes of one experiment (see the module docstring).

    Typical use: ``Supervisor(config, config_path=path).run()`` returns the exit code: 0 every node
    finished, 1 some node went FATAL, 128+N stopped by signal N (SIGTERM 143, SIGINT 130), or 0 when
    stopped after the experiment's final state was written. Tests drive :meth:`tick` directly.
    """

    def __init__(
        self, config, *, config_path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
        node_command: Sequence[str] | None = None, os_: Any = None, gpu: Any = _AUTO,
        runtime_dir: str | os.PathLike | None = None, notifier: SdNotifier | None = None, log: Any = None,
        environ: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
        sample_processes: bool = True, proc_root: str | os.PathLike = "/proc", gpu_release_timeout_s: float = 30.0,
        shared_poll_s: float = 5.0, log_max_bytes: int = LOG_MAX_BYTES, host: str | None = None,
    ):
        self.config = config
        self.host = host  # a joining host's id (workers only); None on the first host
        self.sv = sv = config.supervisor
        self.config_path = str(Path(config_path).absolute()) if config_path else None
        self.overrides = list(overrides)
        self.node_command = list(node_command or DEFAULT_NODE_COMMAND)
        self.os = os_ or procs.RealOS()
        self._gpu_arg = gpu
        self.gpu: GpuInfo | None = None if gpu is _AUTO else gpu
        self._own_gpu = False
        self.paths = RuntimePaths(Path(runtime_dir)) if runtime_dir else RuntimePaths.for_config(config, host)
        self.log = log or structlog.get_logger("supervisor")
        self.notifier = notifier if notifier is not None else SdNotifier(log=self.log)
        self.environ = dict(os.environ if environ is None else environ)
        self.cwd = str(cwd) if cwd else os.getcwd()
        self.sample_processes = sample_processes
        self.proc_root = proc_root
        self.gpu_release_timeout_s = gpu_release_timeout_s
        self.policy = RestartPolicy.from_section(sv)
        self.nodes: dict[str, ManagedNode] = (_JoinerNodes if host is not None else dict)(
            (name, ManagedNode(NodeStatus(name, role))) for name, role in node_names(sv.workers, host))
        self.launch: LaunchPlan | None = None
        self.stagger: str | None = None  # the resolved supervisor.stagger (prepare() sets it with the device)
        self.exit_code: int | None = None
        self.started_wall = self.os.now()
        self.stop = StopSequence(sv.stop_timeout_s, send=self.send_signal, notifier=self.notifier, log=self.log)
        self.hooks = EventHooks(sv.on_event, environ=self.environ, cwd=self.cwd, paths=self.paths,
                                experiment=config.experiment.name, log=self.log)
        self.sampler = ProcessSampler()
        self.gpu_watch: GpuWatch | None = None  # set by prepare() when the workers run on a GPU
        # The swarm's peer records are checked with the key the nodes get (a joiner's is only in self.environ).
        self.shared = SharedPoller(ExperimentLayout.from_config(config),
                                   [n.name for n in self.nodes.values() if n.role == "worker"],
                                   interval_s=shared_poll_s, log=self.log, runtime_dir=self.paths.root,
                                   environ=self.environ, require_signatures=config.exchange.require_signatures)
        self.status_file = status.StatusFile(self.paths.status_file, self.log)
        # tracking.report_to: metrics and eval lines streamed to TensorBoard/W&B from a thread of its own
        self.tracking = Tracking(config, [n.name for n in self.nodes.values() if n.role == "worker"], self.paths.root,
                                 environ=self.environ, log=self.log, interval_s=shared_poll_s)
        self._lock = SupervisorLock(self.paths)
        self.notices = SupervisorNotices(self.notifier)
        self._next_monitor: float | None = None
        self.runtime_disk = RuntimeDisk(self.paths.root, self.log)
        self.log_max_bytes = log_max_bytes
        self._next_log_check: float | None = None
        self.gate = self._gate() if host is not None else None
        self._wait_logged: tuple[float, str] | None = None  # when the wait for the experiment was last logged

    def _gate(self) -> ExperimentGate:
        """A joining host's wait for the experiment, checked with the key its nodes get (``$SWARM_KEY``)."""
        raw = self.environ.get(KEY_ENV)
        try:
            key = parse_key(raw, source=f"${KEY_ENV}") if raw else None
        except KeyProblem:
            key = None  # the nodes refuse it at start with the reason (a configuration error)
        return ExperimentGate.for_layout(ExperimentLayout.from_config(self.config), key,
                                         required=self.config.exchange.require_signatures)

    # ------------------------------------------------------------------ setup and the outside world

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
        self.stagger = resolve_stagger(self.sv.stagger, self.launch.device)
        chosen = self.launch.gpu_device
        self.log.info("gpu_plan", device=self.launch.device, plan=self.launch.describe(), workers=self.sv.workers,
                      gpu_uuid=chosen.uuid if chosen else None, stagger=self.stagger)
        for note in self.launch.notes:
            self.log.warning("gpu_choice", detail=note)
        if chosen is None:
            self.close_gpu()  # running on the CPU (e.g. CUDA_VISIBLE_DEVICES hides the GPUs): nothing to watch
        elif self.gpu is not None:
            self.gpu_watch = GpuWatch(self.gpu, chosen, self.launch.budget_bytes(), proc_root=self.proc_root,
                                      log=self.log)
        return self.launch

    def close_gpu(self) -> None:
        if self._own_gpu and self.gpu is not None:
            self.gpu.close()
        if self._own_gpu:
            self.gpu = None

    def acquire_lock(self) -> None:
        """One supervisor per experiment: take ``supervisor.lock`` or raise :class:`AlreadyRunning`."""
        self._lock.acquire()

    def release_lock(self) -> None:
        self._lock.release()

    def command_for(self, node: ManagedNode) -> list[str]:
        return node_argv(self.node_command, self.config_path, self.overrides, role=node.role, node_id=node.name)

    def env_for(self, node: ManagedNode) -> dict[str, str]:
        return node_env(self.environ, self.launch, role=node.role, node_id=node.name, runtime_dir=self.paths.root,
                        workers=self.sv.workers, host=self.host)

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Record a stop (safe from a signal handler); a second request kills without waiting."""
        self.stop.request(signum)

    def send_signal(self, node: ManagedNode, sig: int) -> None:
        """``sig`` to the node's process group (an EPERM on a live process is logged, nothing better to do)."""
        try:
            self.os.signal_group(node.proc.pid, sig)
        except OSError as err:
            self.log.warning("signal_failed", node=node.name, pid=node.proc.pid, signal=procs.signal_name(sig),
                             error=str(err))

    # ------------------------------------------------------------------ the tick

    def tick(self, now: float | None = None) -> bool:
        """One step of the monitor loop; True once the supervisor is done (:attr:`exit_code` is set)."""
        if self.exit_code is not None:
            return True
        if self.launch is None:
            self.prepare()
        now = self.os.monotonic() if now is None else now
        if self.stop.pending:
            self.stop.begin(self.nodes.values(), now, f"{procs.signal_name(self.stop.signal)} received")
        for node in self.nodes.values():
            self._reap(node, now)
        if self.stop.active:
            self.stop.escalate(self.nodes.values(), now)
        else:
            wall = self.os.now()
            for node in self.nodes.values():
                self._check_liveness(node, now, wall)
            held = self._held_nodes()
            if held:
                self.runtime_disk.report(now, held)
            self._check_doomed(now)
            if not self.stop.active:
                self._spawn_next(now)
        self.hooks.reap()
        done = self._is_done()
        if done:
            self.shared.poll(wait_s=5.0)
            self.exit_code = self._compute_exit_code()
        if self._next_monitor is None or now >= self._next_monitor or done:
            self._next_monitor = now + self.sv.monitor_interval_s
            self._monitor(now)
        # A joiner waiting for the experiment is up and doing its job (systemd's start timeout must not fire).
        ready = status.launch_complete(self) or self.waiting_for() is not None
        self.notices.update(now, ready=ready, summary=self.summary_line, done=done)
        self.write_status(now, force=done)
        if done:
            self._finish()
        return done

    def _reap(self, node: ManagedNode, now: float) -> None:
        if node.proc is None:
            return
        rc = self.os.reap(node.proc)
        if rc is None:
            return
        tail = node.run_tail(self.paths)
        info = exit_info(node, rc, tail)
        node.end_run()
        if info.is_failure or info.reason == "config_error":
            node.log_tail = [line[:400] for line in tail.splitlines()[-15:]]
        emit = self.log.info if not info.is_failure else self.log.warning
        emit("node_exited", node=node.name, role=node.role, pid=info.pid, returncode=rc, reason=info.reason,
             exit=info.one_line(), uptime_s=round(now - (node.status.started_at or now), 3))
        if info.finished or info.reason == "stopped":
            self.policy.record_failure(node.status, info, now)
            new, why = (S.EXITED, "finished (exit 0)") if info.finished else (S.STOPPED, info.detail)
            change_state(node.status, new, reason=why, now=now, log=self.log)
        else:
            self._on_failure(node, info, now)
        node.status.pid = None

    def _on_failure(self, node: ManagedNode, info: ExitInfo, now: float) -> None:
        st = node.status
        self.policy.record_failure(st, info, now)
        if self.stop.active and st.state is S.STOPPING:  # e.g. a hung node reaped while we stop
            change_state(st, S.STOPPED, reason=f"{info.one_line()} (while stopping)", now=now, log=self.log)
            return
        why = self.policy.should_give_up(st, now)
        if info.reason == "config_error":
            why = f"configuration error, not retried: {info.one_line()}"
        if why:
            self._fatal(node, why, now)
            return
        st.backoff_until = self.policy.next_start(st, now)
        delay = st.backoff_until - now
        change_state(st, S.BACKOFF, reason=f"{info.one_line()}; restart in {delay:.1f} s", now=now, log=self.log)
        self.hooks.fire("restart", node.name, info.one_line())

    def _fatal(self, node: ManagedNode, why: str, now: float) -> None:
        node.status.fatal_reason = why
        change_state(node.status, S.FATAL, reason=why, now=now, log=self.log)
        self.hooks.fire("fatal", node.name, why)

    def _check_liveness(self, node: ManagedNode, now: float, wall: float) -> None:
        st = node.status
        if st.state not in (S.STARTING, S.RUNNING) or node.proc is None:
            return
        rec = node.read_heartbeat(self.paths.heartbeat(node.name))
        if st.state is S.STARTING and rec is not None:
            st.mark_heartbeat()
            change_state(st, S.RUNNING, reason=f"first heartbeat after {now - (st.started_at or now):.1f} s",
                         now=now, log=self.log)
            return
        hang = hung_verdict(node, now, wall, self.sv)
        silent = hang is not None and hang.silent
        if (silent or st.condition == DISK_FULL) and self._held_by_full_disk(node, now):
            return
        if hang is not None:
            self._kill_hung(node, now, hang.detail)

    def _held_by_full_disk(self, node: ManagedNode, now: float) -> bool:
        """True while the runtime dir's filesystem is full: ``node`` is held under ``runtime_disk_full`` (not
        killed) and the error reported. Ends the condition once space returns (:func:`hung_verdict` then
        gives the node its timeout to beat again)."""
        full = self.runtime_disk.check(now)
        st = node.status
        if full is None:
            if st.condition == DISK_FULL:
                set_condition(st, None, reason="the runtime disk has space again", now=now, log=self.log)
            return False
        set_condition(st, DISK_FULL, reason=full.one_line(), now=now, log=self.log)
        return True

    def _held_nodes(self) -> list[str]:
        """The nodes held under ``runtime_disk_full``: silent, not killed."""
        return [n.name for n in self.nodes.values() if n.status.condition == DISK_FULL]

    def _kill_hung(self, node: ManagedNode, now: float, detail: str) -> None:
        node.hung_detail = detail
        self.log.warning("node_hung", node=node.name, role=node.role, pid=node.proc.pid, detail=detail)
        self.send_signal(node, signal.SIGKILL)
        change_state(node.status, S.STOPPING, reason=f"hung: {detail}", now=now, log=self.log)

    def waiting_for(self) -> str | None:
        """What a joining host still waits for before it spawns its workers (one line), or None."""
        return self.gate.waiting if self.gate is not None else None

    def _experiment_ready(self, now: float) -> bool:
        """True once a joining host may spawn (always on the first host); logs the wait every WAIT_LOG_S."""
        if self.gate is None:
            return True
        waiting = self.gate.check(now)
        if waiting is None:
            if self._wait_logged is not None:
                self.log.info("experiment_found", path=str(self.gate.path), host=self.host)
                self._wait_logged = None
            return True
        last = self._wait_logged
        if self.gate.reads and (last is None or now - last[0] >= WAIT_LOG_S or last[1] != waiting):
            self._wait_logged = (now, waiting)
            self.log.warning("waiting_for_experiment", host=self.host, detail=waiting)
        return False

    def _spawn_next(self, now: float) -> None:
        """Spawn the nodes that are due (STOPPED, or BACKOFF with its delay passed), in start order, while the
        stagger policy lets them (:func:`~supervisor.states.spawn_held_by`): all of them with ``none``. A
        joining host spawns nothing before the experiment exists."""
        if not self._experiment_ready(now):
            return
        for node in self.nodes.values():
            if self._spawn_held() is not None:
                return
            st = node.status
            if st.state is S.STOPPED:
                self._spawn(node, now)
            elif st.state is S.BACKOFF and st.backoff_until is not None and now >= st.backoff_until:
                if self.gpu_watch is not None and not self.gpu_watch.released(node, now, self.gpu_release_timeout_s):
                    continue
                self._spawn(node, now)

    def _spawn_held(self) -> str | None:
        """The node whose start-up holds back the next spawn, or None."""
        return spawn_held_by(self.stagger or "heartbeat", (n.status for n in self.nodes.values()))

    def _spawn(self, node: ManagedNode, now: float) -> None:
        st = node.status
        argv, env = self.command_for(node), self.env_for(node)
        out, err = self.paths.stdout_log(node.name), self.paths.stderr_log(node.name)
        try:
            self.paths.heartbeat(node.name).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.log.warning("stale_heartbeat_not_removed", node=node.name, error=str(exc))
        for captured in (out, err):  # the node's own JSON log rotates itself; these the node only appends to
            rotate_if_large(captured, self.log_max_bytes)
        node.stdout_offset, node.stderr_offset = procs.file_size(out), procs.file_size(err)
        wall = self.os.now()
        try:
            proc = self.os.spawn(argv, env=env, cwd=self.cwd, stdout_path=out, stderr_path=err)
        except OSError as exc:
            info = procs.spawn_failure(exc, argv)
            self.log.error("node_spawn_failed", node=node.name, error=info.detail)
            self.policy.record_failure(st, info, now)
            self._fatal(node, f"configuration error, not retried: {info.one_line()}", now)
            return
        restart = st.state is S.BACKOFF
        if restart:
            st.restarts += 1
        st.mark_spawned(proc.pid, now)
        node.begin_run(proc, wall)
        if self.gpu_watch is not None:
            self.gpu_watch.note_spawn(node)
        change_state(st, S.STARTING, reason=f"restart #{st.restarts}" if restart else "launch", now=now,
                     log=self.log)
        self.log.info("node_spawned", node=node.name, role=node.role, pid=proc.pid, restarts=st.restarts,
                      device=env["SWARM_DEVICE"], stdout=str(out), stderr=str(err))

    def _check_doomed(self, now: float) -> None:
        """Stop everything when the swarm cannot progress: the coordinator or every worker is FATAL."""
        if all(n.status.state in TERMINAL_STATES for n in self.nodes.values()):
            return  # done anyway
        workers = [n.status for n in self.nodes.values() if n.role == "worker"]
        coordinator = self.nodes.get("coordinator")  # none on a joining host
        if coordinator is not None and coordinator.status.state is S.FATAL:
            self.stop.begin(self.nodes.values(), now, "the coordinator is FATAL: the swarm cannot progress")
        elif workers and all(w.state is S.FATAL for w in workers):
            self.stop.begin(self.nodes.values(), now, "every worker is FATAL: the swarm cannot progress")

    def _is_done(self) -> bool:
        if any(n.proc is not None for n in self.nodes.values()):
            return False
        return self.stop.active or all(n.status.state in TERMINAL_STATES for n in self.nodes.values())

    def _compute_exit_code(self) -> int:
        states = [n.status.state for n in self.nodes.values()]
        if all(s is S.EXITED for s in states):
            return EXIT_FINISHED
        if any(s is S.FATAL for s in states):
            return EXIT_FATAL
        if self.stop.signal is not None:
            rs = self.shared.round_state
            return EXIT_FINISHED if rs is not None and rs.finished else 128 + self.stop.signal
        return EXIT_FATAL

    def _finish(self) -> None:
        fatal = [n.name for n in self.nodes.values() if n.status.state is S.FATAL]
        self.tracking.close(TRACKING_CLOSE_S)  # after a last pass over the lines the nodes wrote
        if self.exit_code == EXIT_FINISHED:
            self.hooks.fire("finish", "", "every node finished" if self.stop.signal is None else
                            "stopped after the experiment finished")
        self.log.info("supervisor_exiting", exit_code=self.exit_code, fatal=fatal, stop_reason=self.stop.reason)

    def _monitor(self, now: float) -> None:
        self.tracking.start()  # the first tick, once the lock is held; nothing when report_to is empty
        if self.sample_processes:
            self.sampler.sample(self.nodes.values(), now)
        self.sampler.sample_self(now)
        if self.gpu_watch is not None:
            self.gpu_watch.sample(self.nodes.values())
        self.shared.maybe_poll(now)
        for node in self.nodes.values():
            self.policy.reset_if_stable(node.status, now)
        if self._next_log_check is None or now >= self._next_log_check:
            self._next_log_check = now + LOG_CHECK_S
            self._bound_logs()

    def _bound_logs(self) -> None:
        """Copy and truncate the logs other processes hold open once past the size limit: each node's
        captured stdout/stderr (its run tail then starts at 0), a detached supervisor's own output, the
        on_event output (:mod:`node.logs`: every log and its bound)."""
        for node in self.nodes.values():
            if self._truncate(self.paths.stdout_log(node.name)):
                node.stdout_offset = 0
            if self._truncate(self.paths.stderr_log(node.name)):
                node.stderr_offset = 0
        self._truncate(self.paths.detached_output)
        self._truncate(self.paths.events_log)

    def _truncate(self, path: Path) -> bool:
        try:
            done = truncate_if_large(path, self.log_max_bytes)
        except OSError as err:
            self.log.warning("log_rotation_failed", path=str(path), error=str(err))
            return False
        if done:
            self.log.info("log_rotated", path=str(path), max_bytes=self.log_max_bytes)
        return done

    # ------------------------------------------------------------------ what others see

    def summary_line(self) -> str:
        """One line for STATUS= and the console: round, node counts, restarts; a full runtime disk first."""
        line = status.summary_line(self)
        waiting = self.waiting_for()
        if waiting is not None and self.exit_code is None:
            line = f"{waiting}; {line}"
        full, held = self.runtime_disk.full, self._held_nodes()
        if full is not None and held:
            line = f"ERROR {full.one_line()}: {', '.join(held)} silent, not killed, waiting for space; {line}"
        return line

    def snapshot(self, now: float | None = None) -> dict:
        """Everything ``swarm status`` shows, JSON-ready (the summary as :meth:`summary_line` says it)."""
        snap = status.snapshot(self, now)
        snap["summary"] = self.summary_line()
        full = self.runtime_disk.full
        snap["runtime_disk_full"] = dataclasses.asdict(full) if full is not None else None
        snap["join_host"] = self.host
        snap["waiting_for"] = self.waiting_for()
        return snap

    def write_status(self, now: float | None = None, *, force: bool = True) -> None:
        """``status.json`` now (``force``), or only if something lasting changed or the refresh is due."""
        now = self.os.monotonic() if now is None else now
        self.status_file.offer(self.snapshot(now), now, force=force)

    def wait_events(self, timeout_s: float = 5.0) -> None:
        """Give running on_event commands a moment (a finish alert) before the supervisor exits."""
        self.hooks.wait(timeout_s)

    # ------------------------------------------------------------------ the loop

    def next_wake(self, now: float) -> float:
        """Seconds until the next tick is useful (signals and child exits wake the loop earlier)."""
        t = self._next_monitor if self._next_monitor is not None else now
        held = self._spawn_held() is not None
        floor = now + STARTING_POLL_S if held else now  # no spawn while a start-up holds the next one back
        for n in self.nodes.values():
            st = n.status
            if st.state is S.STARTING or (st.state is S.STOPPED and not self.stop.active):
                t = min(t, now + STARTING_POLL_S)
            elif st.state is S.BACKOFF and st.backoff_until is not None:
                gpu_wait = now + 0.5 if n.gpu_wait_since is not None else now
                t = min(t, max(st.backoff_until, floor, gpu_wait))
        if self.stop.active and self.stop.deadline is not None:
            t = min(t, max(self.stop.deadline, now + 0.05), now + 1.0)
        return max(0.01, t - now)

    def run(self, *, on_tick: Callable[["Supervisor"], None] | None = None, tick_interval: float | None = None,
            on_started: Callable[["Supervisor"], None] | None = None) -> int:
        """The production loop (main thread only): plan, lock, tick until done; returns the exit code.

        ``on_tick`` runs after every tick (the live display), at least every ``tick_interval`` seconds.
        ``on_started`` runs once the lock is held (``--detach`` reports success there).
        Raises :class:`PlanError` or :class:`AlreadyRunning` before anything is spawned.
        """
        return loop.run(self, on_tick=on_tick, tick_interval=tick_interval, on_started=on_started)



class _JoinerNodes(dict):
    """A joining host's nodes: its workers, no coordinator. ``supervisor.status.current_round`` falls back on
    ``nodes["coordinator"]`` (its heartbeat's round) while no state file was read; on a joiner that lookup sees
    a coordinator that never ran here (round unknown) instead of a KeyError. Iteration, ``get`` and ``in`` see the
    workers only."""

    def __missing__(self, key: str) -> ManagedNode:
        if key == "coordinator":
            return ManagedNode(NodeStatus("coordinator", "coordinator"))
        raise KeyError(key)
