"""What the supervisor measures beside the state machine: psutil per node, NVML per node, the shared dir.

- :class:`ProcessSampler`: RSS (the node plus its descendants) and CPU % per node, and the supervisor's
  own, with psutil. The ``psutil.Process`` objects are kept between samples (``cpu_percent`` needs the
  same object), and the descendants are looked up only every :data:`TREE_REFRESH_S`: psutil finds
  children by reading the parent of *every* process on the host, which was most of the supervisor's CPU.
- :class:`GpuWatch`: NVML's process list and utilisation of the chosen device, matched to the nodes
  through ``NSpid`` (container PIDs differ from NVML's host PIDs), the over-budget flag, and the wait
  for a killed worker's memory to be released before it is respawned. Memory NVML does not report stays
  unknown, never 0.
- :class:`SharedPoller`: the round state, the workers' last rewards, the last round switches and every
  node of the swarm (:class:`supervisor.status.SwarmScan`), read from the shared dir in a helper thread (a
  Drive/FUSE mount may block; the loop never waits on it), through :mod:`node.fsio` (a FIFO, symlink or
  device there is refused without blocking), the schemas of :mod:`node.schemas` and
  :func:`supervisor.switches.switch_line`.

Monitoring never takes the supervisor down: psutil and NVML errors leave figures unknown.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

import psutil

from node import fsio
from node.heartbeat import default_runtime_dir
from node.layout import ExperimentLayout
from node.schemas import RoundState, validate_metrics_line
from node.strict_json import parse_json_bytes
from supervisor.gpu import GpuDevice, GpuInfo
from supervisor.gpu_pids import Release, match_gpu_processes, nvml_pids_for, wait_gpu_released
from supervisor.logview import tail_text
from supervisor.status import SwarmScan, line_reward, swarm_store
from supervisor.switches import STATUS_WINDOW, parse_tail, status_summary

TREE_REFRESH_S = 30.0  # how often each node's descendants are looked up again (a scan of every process)
SELF_SAMPLE_S = 5.0  # the supervisor's own CPU % is averaged over this long (status.json's refresh)


class ProcessSampler:
    """psutil RSS/CPU of each live node (``node.proc``) and of this process, written onto the nodes."""

    def __init__(self, tree_refresh_s: float = TREE_REFRESH_S, self_every_s: float = SELF_SAMPLE_S):
        self.tree_refresh_s = tree_refresh_s
        self.self_every_s = self_every_s
        self._procs: dict[int, psutil.Process] = {}  # node pid -> its Process (cpu_percent needs the same one)
        self._trees: dict[int, tuple[float, list[psutil.Process]]] = {}  # node pid -> (looked up at, descendants)
        self._me: psutil.Process | None = None
        self._me_at: float | None = None
        self.me: dict = {"rss_bytes": None, "cpu_percent": None}

    def sample(self, nodes: Iterable[Any], now: float) -> None:
        """Set ``rss_bytes`` and ``cpu_percent`` of every node with a process; forget processes gone."""
        live = set()
        for node in nodes:
            if node.proc is not None:
                live.add(node.proc.pid)
                node.rss_bytes, node.cpu_percent = self._usage(node.proc.pid, now)
        for pid in set(self._procs) - live:
            self._procs.pop(pid, None)
            self._trees.pop(pid, None)

    def sample_self(self, now: float) -> None:
        """The supervisor's own RSS and CPU % (``self.me``), at most every ``self_every_s``."""
        if self._me_at is not None and now - self._me_at < self.self_every_s:
            return
        self._me_at = now
        try:
            if self._me is None:
                self._me = psutil.Process()
                self._me.cpu_percent(None)
            self.me = {"rss_bytes": self._me.memory_info().rss, "cpu_percent": self._me.cpu_percent(None)}
        except psutil.Error:
            self.me = {"rss_bytes": None, "cpu_percent": None}

    def _usage(self, pid: int, now: float) -> tuple[int | None, float | None]:
        try:
            proc = self._procs.get(pid)
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(None)  # the first call only starts the measurement
            rss = proc.memory_info().rss
            cpu = proc.cpu_percent(None)
        except psutil.Error:
            return None, None
        for child in self._descendants(proc, now):
            try:
                rss += child.memory_info().rss
            except psutil.Error:
                pass  # it ended since the last look-up
        return rss, cpu

    def _descendants(self, proc: psutil.Process, now: float) -> list[psutil.Process]:
        seen = self._trees.get(proc.pid)
        if seen is None or now - seen[0] >= self.tree_refresh_s:
            try:
                children = proc.children(recursive=True)
            except psutil.Error:
                children = []
            seen = self._trees[proc.pid] = (now, children)
        return seen[1]


class GpuWatch:
    """NVML's view of the workers on ``device``: memory per node, the over-budget flag, release waits."""

    def __init__(self, gpu: GpuInfo, device: GpuDevice, budget_bytes: int | None, *, proc_root, log: Any):
        self.gpu, self.device, self.budget = gpu, device, budget_bytes
        self.proc_root = proc_root
        self.log = log
        self.utilization: int | None = None
        self.readable: bool | None = None  # could NVML list the device's processes last time?
        self._error: str | None = None

    def note_spawn(self, node: Any) -> None:
        """Keep NVML's view of a new worker's pid (its NSpid line): after its death /proc has none."""
        if node.role == "worker":
            node.nvml_pids = nvml_pids_for(node.proc.pid, self.proc_root)

    def sample(self, nodes: Iterable[Any]) -> None:
        """Set ``gpu_bytes``, ``gpu_unknown`` and ``over_budget`` of every node with a process."""
        try:
            listed = self.gpu.processes(self.device)
            self.utilization = self.gpu.utilization(self.device)
        except Exception as err:  # noqa: BLE001 - monitoring never takes the supervisor down
            if str(err) != self._error:  # once per kind of failure, not every tick
                self._error = str(err)
                self.log.warning("gpu_monitor_failed", error=str(err))
            listed = None
        self.readable = listed is not None
        live = {n.proc.pid: n for n in nodes if n.proc is not None}
        used = match_gpu_processes(live, listed or [], proc_root=self.proc_root)
        for pid, node in live.items():
            on_gpu = node.role == "worker"
            node.gpu_bytes = used.get(pid)
            # Unknown: listed without a figure, or a worker when the list itself cannot be read. Never 0.
            node.gpu_unknown = (pid in used and node.gpu_bytes is None) or (listed is None and on_gpu)
            self._budget_check(node, pid, on_gpu)

    def _budget_check(self, node: Any, pid: int, on_gpu: bool) -> None:
        budget = self.budget
        over = bool(budget and on_gpu and node.gpu_bytes is not None and node.gpu_bytes > budget)
        if over and not node.over_budget:
            self.log.warning("node_over_budget", node=node.name, pid=pid, gpu_bytes=node.gpu_bytes,
                             budget_bytes=budget, detail=f"{node.gpu_bytes / 2**30:.2f} GiB used > "
                             f"{budget / 2**30:.2f} GiB planned (fraction + CUDA context)")
        elif node.over_budget and not over and node.gpu_bytes is not None:
            self.log.info("node_within_budget", node=node.name, pid=pid, gpu_bytes=node.gpu_bytes)
        node.over_budget = over

    def released(self, node: Any, now: float, timeout_s: float) -> bool:
        """True once NVML no longer lists the node's old pid, or the wait passed ``timeout_s``.

        A process list NVML cannot read is not "released": the wait then lasts ``timeout_s``.
        """
        if not node.nvml_pids or node.role != "worker":
            return True
        found = wait_gpu_released(self.gpu, self.device, node.nvml_pids, timeout_s=0.0)
        if found is Release.RELEASED:
            if node.gpu_wait_since is not None:
                self.log.info("gpu_released", node=node.name, waited_s=round(now - node.gpu_wait_since, 3))
            node.gpu_wait_since, node.nvml_pids = None, []
            return True
        if node.gpu_wait_since is None:
            node.gpu_wait_since = now
            self.log.info("gpu_wait_release", node=node.name, pids=node.nvml_pids, listing=found.value,
                          timeout_s=timeout_s)
            return False
        if now - node.gpu_wait_since >= timeout_s:
            why = ("NVML cannot list the device's processes, so their release cannot be seen"
                   if found is Release.UNKNOWN else "NVML still lists it")
            self.log.warning("gpu_not_released", node=node.name, pids=node.nvml_pids, listing=found.value,
                             waited_s=round(now - node.gpu_wait_since, 3),
                             detail=f"{why}; respawning anyway; it may run out of GPU memory")
            node.gpu_wait_since, node.nvml_pids = None, []
            return True
        return False


class SharedPoller:
    """The coordinator's round state, each worker's last reward, the last round switches and the whole
    swarm, read in a helper thread.

    :meth:`poll` starts a read unless the previous one is still running (a slow mount: logged once, the
    status shows older figures); :meth:`maybe_poll` does so at most every ``interval_s``. Only the
    helper thread writes :attr:`round_state`, :attr:`rewards`, :attr:`round_switch` and :attr:`swarm`.
    The swarm's peer records are checked with the experiment key looked up in ``environ`` and
    ``runtime_dir`` as a node looks it up (default: this process's environment and the experiment's
    default runtime dir), again at every poll until there is one. Every read goes
    through :mod:`node.fsio` (regular files only, ``O_NONBLOCK``: a FIFO planted at the state file is
    refused, the thread never parks on it) and reads a bounded amount (the state file capped, the end of
    each log file); a refused or invalid file keeps the last good figures and is warned about once per
    reason (``shared_file_refused``), and so are bad round switch lines (``shared_lines_skipped``).
    """

    STATE_MAX_BYTES = 1024 * 1024  # the state file is a few hundred bytes
    TAIL_BYTES = 16384  # the end of a metrics file holding its last lines
    SWITCH_TAIL_BYTES = 65536  # the end of round_switches.jsonl: ~250 bytes a line, more when it names workers

    def __init__(self, layout: ExperimentLayout, workers: Iterable[str], *, interval_s: float, log: Any,
                 runtime_dir: Path | str | None = None, environ: Mapping[str, str] | None = None,
                 require_signatures: bool = True):
        self.layout = layout
        self.workers = list(workers)
        self.interval_s = interval_s
        self.log = log
        self.round_state: RoundState | None = None
        self.rewards: dict[str, float] = {}
        self.round_switch: dict | None = None  # supervisor.switches.status_summary of the last switches
        self.swarm: dict | None = None  # SwarmScan.scan(): every node in the shared dir
        self._key_lookup = dict(runtime_dir=runtime_dir if runtime_dir is not None else default_runtime_dir(layout.root),
                                environ=dict(os.environ if environ is None else environ), required=require_signatures)
        self._scan: SwarmScan | None = None
        self._thread: threading.Thread | None = None
        self._slow = False
        self._next: float | None = None
        self._refused: dict[str, str] = {}  # path -> the reason last warned about (helper thread only)

    def maybe_poll(self, now: float) -> None:
        if self._next is None or now >= self._next:
            self._next = now + self.interval_s
            self.poll()

    def poll(self, wait_s: float | None = None) -> None:
        """Start a read of the shared dir (and wait for it up to ``wait_s`` when given)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            if thread is not None and self._slow:
                self._slow = False
                self.log.info("shared_dir_responsive_again")
            thread = threading.Thread(target=self._read, name="shared-poll", daemon=True)
            self._thread = thread
            thread.start()
        elif not self._slow:
            self._slow = True
            self.log.warning("shared_dir_slow", detail="the previous read of the shared dir has not returned; "
                                                       "status shows older round/reward figures")
        if wait_s is not None:
            thread.join(wait_s)

    def _read(self) -> None:
        self._read_round_state()
        for node_id in self.workers:
            reward = self._last_reward(node_id)
            if reward is not None:
                self.rewards[node_id] = reward
        self._read_round_switches()
        self._read_swarm()

    def _read_swarm(self) -> None:
        """Every node of the swarm (:class:`SwarmScan`, bounded); its store is made again while it has no key."""
        try:
            if self._scan is None or not self._scan.store.signer.enabled:
                store, note = swarm_store(self.layout, **self._key_lookup)
                if self._scan is None or store.signer.enabled:
                    self._scan = SwarmScan(store, key_note=note, first=["coordinator", *self.workers])
            self.swarm = self._scan.scan()
        except Exception as err:  # noqa: BLE001 - monitoring never takes the supervisor down
            self._refuse(self.layout.peers_dir(), err, event="swarm_scan_failed")

    def _read_round_state(self) -> None:
        """The coordinator's state file as a :class:`RoundState` (missing: nothing; refused or invalid: one
        warning, the last good state kept; the next poll retries)."""
        path = self.layout.state_file()
        try:
            data, _ = fsio.read_capped(path, self.STATE_MAX_BYTES)
            state = RoundState.from_json(parse_json_bytes(data))
        except FileNotFoundError:
            return
        except (fsio.BadFile, OSError, ValueError) as err:  # SchemaError is a ValueError
            self._refuse(path, err)
            return
        self._refused.pop(str(path), None)
        self.round_state = state

    def _last_reward(self, node_id: str) -> float | None:
        """``reward_local`` (or another reward field) of the node's last valid metrics line (a
        :func:`validate_metrics_line` of this node, the value a bounded number); None when there is none."""
        path = self.layout.metrics_file(node_id)
        try:
            text = tail_text(path, max_bytes=self.TAIL_BYTES, lines=3)
        except (fsio.BadFile, OSError) as err:
            self._refuse(path, err)
            return None
        self._refused.pop(str(path), None)
        for line in reversed(text.splitlines()):
            try:
                obj = validate_metrics_line(parse_json_bytes(line.encode("utf-8")), expect_node=node_id)
            except ValueError:
                continue
            reward = line_reward(obj)
            if reward is not None:
                return reward
        return None

    def _read_round_switches(self) -> None:
        """The coordinator's last :data:`~supervisor.switches.STATUS_WINDOW` round switches (the end of its
        ``round_switches.jsonl``) as :attr:`round_switch`; missing: nothing; refused: the last good figures
        kept; bad lines are left out and warned about once per reason."""
        path = self.layout.round_switch_file()
        try:
            data, begin, _ = fsio.read_end(path, max_bytes=self.SWITCH_TAIL_BYTES)
        except FileNotFoundError:
            return
        except (fsio.BadFile, OSError) as err:
            self._refuse(path, err)
            return
        lines, bad, first = parse_tail(data, mid_line=begin > 0, window=STATUS_WINDOW, expect_node="coordinator")
        if bad:
            self._refuse(path, ValueError(f"a line left out: {first}"), event="shared_lines_skipped")
        else:
            self._refused.pop(str(path), None)
        if lines:
            self.round_switch = status_summary(lines)

    def _refuse(self, path, err: Exception, event: str = "shared_file_refused") -> None:
        """Warn about a refused file (or its bad lines) once per reason (the poll repeats every few seconds)."""
        reason = err.reason if isinstance(err, fsio.BadFile) else (str(err) or type(err).__name__)
        if self._refused.get(str(path)) != reason:
            self._refused[str(path)] = reason
            self.log.warning(event, path=str(path), reason=reason)
