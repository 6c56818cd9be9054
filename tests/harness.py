"""What tests share to wait and to run real swarms: :func:`wait_for`, the process helpers, and :class:`Swarm`.

- :func:`wait_for` polls a predicate and, on a timeout, raises an AssertionError naming what it waited for
  and the last value it saw. Every test waits through it.
- :class:`Swarm` is one swarm of a config in a temp root: ``swarm launch CONFIG --set ...`` as a subprocess
  (or its nodes started by hand, as a user without the supervisor would), its shared dir, locks, spool and
  runtime dir (``SWARM_RUNTIME_DIR``) all inside the root. It reads ``status.json`` through
  :func:`supervisor.status.read_status` and metrics, events and logs through :func:`node.fsio.read_jsonl`,
  records every pid it sees, kills nodes, stops the supervisor, and :meth:`Swarm.close` always leaves no
  process behind (SIGKILL to each process group, then reap).
- A joining host (``Swarm(..., join_host="hostb")``): ``swarm launch CONFIG --join --host-id hostb`` with its own
  runtime dir, workers ``hostb-worker_K`` only; ``status``/``stop``/``logs`` get ``--join`` too.
- :class:`Timeouts`: how long a correct swarm may take, from its config (``startup_timeout_s`` per node of
  the staggered start, ``round_timeout_s`` per round, ...), never from how fast an idle machine is: the
  tests must pass while other processes keep every core busy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import psutil

from node.config import ExperimentConfig, resolve_config
from node.fsio import read_jsonl
from supervisor.runfiles import RuntimePaths
from supervisor.status import read_status

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smoke-cpu.yaml"
PY = sys.executable
MARGIN_S = 60.0  # on top of every derived timeout: a final checkpoint, an exit, a slow first import
PR_SET_CHILD_SUBREAPER = 36


# --------------------------------------------------------------------------- waiting

def wait_for(predicate: Callable[[], object], timeout: float, what: str = "the condition", poll: float = 0.05, *,
             fail_if: Callable[[], str | None] | None = None, details: Callable[[], str] | None = None):
    """Call ``predicate()`` every ``poll`` s until it returns something truthy, and return that.

    Raises AssertionError saying what it waited for and the last value seen when ``timeout`` s passed, or
    as soon as ``fail_if()`` gives a reason (say, the process that should get there exited);
    ``details()`` adds text to the message (an output tail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        reason = fail_if() if fail_if is not None else None
        if not reason and time.monotonic() >= deadline:
            reason = f"timed out after {timeout:.0f} s"
        if reason:
            seen = repr(value)
            message = f"{reason} waiting for {what}; last value: {seen[:500]}{'...' if len(seen) > 500 else ''}"
            raise AssertionError(message + (f"\n{details()}" if details is not None else ""))
        time.sleep(poll)


# --------------------------------------------------------------------------- processes

def alive(pid: int) -> bool:
    """Alive and not a zombie: PID 1 here does not reap orphans promptly, so a killed orphan stays a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def still_alive(pids, within: float) -> list[int]:
    """Those of ``pids`` still alive after up to ``within`` s (a SIGKILL is delivered asynchronously)."""
    pids = [p for p in pids if p]
    try:
        wait_for(lambda: not any(alive(p) for p in pids), within, "the processes to die", poll=0.05)
    except AssertionError:
        pass
    return [p for p in pids if alive(p)]


def set_subreaper(on: bool) -> bool:
    """Adopt orphaned descendants (killed supervisors' nodes) so the tests can reap them."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap(pids, timeout: float = 5.0) -> None:
    """Collect the exit status of those ``pids`` that are our children (adopted orphans included)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break  # not ours, or already reaped
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.01)


def kill_descendants(since: float = 0.0, timeout: float = 5.0) -> list[int]:
    """SIGKILL and reap every descendant of this process started at or after ``since`` (time.time());
    returns the pids that were still alive. Older descendants (other fixtures' servers) are left alone."""
    me = psutil.Process()
    left = []
    for child in me.children(recursive=True):
        try:
            if child.create_time() < since:
                continue
            if child.status() != psutil.STATUS_ZOMBIE:
                left.append(child.pid)
            child.kill()
        except psutil.Error:
            pass
    reap([c.pid for c in me.children() if c.pid in left or not alive(c.pid)], timeout)
    return left


class ProcessTracker:
    """Every pid a test saw, with its start time (so a reused pid is never mistaken for ours)."""

    def __init__(self):
        self.seen: dict[int, float | None] = {}
        self._lock = threading.Lock()

    def see(self, pid) -> None:
        if not isinstance(pid, int) or pid <= 0:
            return
        with self._lock:
            if pid in self.seen:
                return
            try:
                self.seen[pid] = psutil.Process(pid).create_time()
            except psutil.Error:
                self.seen[pid] = None  # already gone

    def see_tree(self, pid: int) -> list[int]:
        """``pid`` and its descendants, all recorded; returns them."""
        found = [pid]
        try:
            found += [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            pass
        for p in found:
            self.see(p)
        return found

    def alive(self) -> list[int]:
        with self._lock:
            items = list(self.seen.items())
        out = []
        for pid, created in items:
            try:
                proc = psutil.Process(pid)
                if created is None or abs(proc.create_time() - created) > 0.01 \
                        or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                out.append(pid)
            except psutil.Error:
                continue
        return out

    def wait_dead(self, timeout: float) -> list[int]:
        """Those still alive after up to ``timeout`` s (SIGKILL is delivered asynchronously)."""
        return still_alive(self.alive(), timeout)

    def kill_all(self) -> list[int]:
        """SIGKILL every tracked process still alive, with its process group when it leads one; returns them."""
        left = self.alive()
        for pid in left:
            try:
                if os.getpgid(pid) == pid and pid != os.getpgid(0):
                    os.killpg(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return left


def iso_ts(text: str) -> float:
    """A log line's ISO timestamp as time.time()."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# --------------------------------------------------------------------------- timeouts from the config

@dataclass(frozen=True)
class Timeouts:
    """How long a correct swarm of ``config`` may take to get somewhere, from the config alone."""

    config: ExperimentConfig

    @classmethod
    def of(cls, config: Path = CONFIG, *sets: str) -> "Timeouts":
        return cls(resolve_config(config, overrides=sets))

    @property
    def nodes(self) -> int:
        return self.config.supervisor.workers + 1

    @property
    def launch(self) -> float:
        """The staggered start: each node may take ``startup_timeout_s`` to its first heartbeat."""
        return self.config.supervisor.startup_timeout_s * self.nodes

    def rounds(self, n: int) -> float:
        """``n`` rounds, each advanced after ``round_timeout_s`` at the latest, plus the coordinator's wait
        for the workers before round 0 (or after a restart), which ``round_timeout_s`` bounds too."""
        return self.config.coordinator.round_timeout_s * (n + 1)

    @property
    def restart(self) -> float:
        """A killed node back: the longest backoff, then its start."""
        return self.config.supervisor.backoff_max_s + self.config.supervisor.startup_timeout_s

    @property
    def hang(self) -> float:
        """A hung node noticed: ``heartbeat_timeout_s`` and a monitor tick."""
        return self.config.supervisor.heartbeat_timeout_s + self.config.supervisor.monitor_interval_s

    @property
    def stop(self) -> float:
        """A graceful stop: nodes get ``stop_timeout_s`` to checkpoint before SIGKILL."""
        return self.config.supervisor.stop_timeout_s

    def budget(self, *, launches: int = 1, rounds: int = 0, restarts: int = 0, hangs: int = 0,
               stops: int = 0) -> float:
        """The sum of those allowances, plus :data:`MARGIN_S`."""
        return (launches * self.launch + (self.rounds(rounds) if rounds else 0) + restarts * self.restart
                + hangs * self.hang + stops * self.stop + MARGIN_S)


# --------------------------------------------------------------------------- one swarm

class Swarm:
    """One swarm of ``config`` in ``root``: `swarm launch` (:meth:`launch`) or nodes by hand
    (:meth:`start_node`), watched by a sampler thread that records every pid, every node's (pid, state)
    change and every state round seen. :meth:`close` SIGKILLs whatever is still alive and reaps it."""

    def __init__(self, root: Path, *sets: str, config: Path = CONFIG, shared: Path | None = None,
                 env: dict | None = None, tracker: ProcessTracker | None = None, join_host: str | None = None,
                 join_workers: int | None = None, key_file: Path | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path = Path(config)
        self.sets = [f"experiment.root={shared or self.root / 'shared'}", f"exchange.lock_dir={self.root / 'locks'}",
                     f"exchange.spool_dir={self.root / 'spool'}", *sets]
        self.runtime = self.root / "run"
        self.env = {**os.environ, "SWARM_RUNTIME_DIR": str(self.runtime), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.config = resolve_config(self.config_path, environ=self.env, overrides=self.sets)
        self.t = Timeouts(self.config)
        self.exp = self.config.experiment_dir
        self.workers = tuple(f"worker_{i}" for i in range(1, self.config.supervisor.workers + 1))
        self.names = ("coordinator", *self.workers)
        self.join_host = join_host  # a joining host (`swarm launch --join`): its workers only
        self.join_args: list[str] = []
        self.launch_args: list[str] = []
        if join_host is not None:
            n = join_workers or self.config.supervisor.workers
            self.workers = tuple(f"{join_host}-worker_{i}" for i in range(1, n + 1))
            self.names = self.workers
            self.join_args = ["--join", "--host-id", join_host]
            self.launch_args = ["--workers", str(n), *(["--key-file", str(key_file)] if key_file else [])]
        self.tracker = tracker or ProcessTracker()
        self.proc: subprocess.Popen | None = None  # the supervisor
        self.nodes: dict[str, subprocess.Popen] = {}  # nodes started by hand
        self.rounds: list[tuple[float, int, bool]] = []  # (wall time, state round, finished) on change
        self.history: dict[str, list[tuple[float, int | None, str]]] = {}  # node -> (wall, pid, state) on change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Attack scenarios forge the state file: set this to sample only states signed with the swarm's key,
        # and add to ``replayed_states`` the bytes of signed states they replay (old, but signed).
        self.sample_signed_states_only = False
        self.replayed_states: set[bytes] = set()

    # -- running
    def command(self, sub: str, *extra: str) -> list[str]:
        if self.join_args and sub in ("launch", "status", "stop", "logs"):
            extra = (*self.join_args, *(self.launch_args if sub == "launch" else ()), *extra)
        cmd = [PY, "-m", "supervisor.cli", sub, str(self.config_path), *extra]
        for item in self.sets:
            cmd += ["--set", item]
        return cmd

    def _popen(self, args: list[str], out: str) -> subprocess.Popen:
        with open(self.root / out, "ab") as log:
            proc = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.tracker.see(proc.pid)
        if self._thread is None:
            self._thread = threading.Thread(target=self._sample_loop, daemon=True, name="swarm-sampler")
            self._thread.start()
        return proc

    def launch(self) -> subprocess.Popen:
        """`swarm launch` in the background (output to ``root/supervisor.out``)."""
        self.proc = self._popen(self.command("launch"), "supervisor.out")
        return self.proc

    def run_to_end(self) -> int:
        """`swarm launch` to its exit (within the time every round may take); its exit code."""
        self.launch()
        return self.wait_exit(self.t.budget(rounds=self.config.experiment.max_rounds))

    def cli(self, sub: str, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Another `swarm` command on the same config (validate, status, a second launch...)."""
        return subprocess.run(self.command(sub, *extra), cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def wait_exit(self, timeout: float) -> int:
        """The supervisor's exit code; an AssertionError with its output when it runs longer."""
        return self._wait(self.proc, timeout, "the supervisor", "supervisor.out")

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int:
        """Signal the supervisor and wait for its exit (by default within its nodes' stop timeout)."""
        self.proc.send_signal(sig)
        return self.wait_exit(self.t.stop + MARGIN_S if timeout is None else timeout)

    def start_node(self, node_id: str) -> subprocess.Popen:
        """``python -m node`` by hand, as a user without the supervisor would (output to ``root/<id>.out``)."""
        role = "coordinator" if node_id == "coordinator" else "worker"
        args = [PY, "-m", "node", "--config", str(self.config_path), "--role", role, "--node-id", node_id]
        for item in self.sets:
            args += ["--set", item]
        self.nodes[node_id] = self._popen(args, f"{node_id}.out")
        return self.nodes[node_id]

    def wait_node(self, node_id: str, timeout: float) -> int:
        return self._wait(self.nodes[node_id], timeout, node_id, f"{node_id}.out")

    def _wait(self, proc: subprocess.Popen, timeout: float, who: str, out: str) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{who} did not exit within {timeout:.0f} s; output:\n{self.output(out)[-3000:]}") \
                from None

    def kill(self, node: str, sig: int = signal.SIGKILL) -> int:
        """Signal a node (by hand: its process; launched: the pid in status.json); returns the pid."""
        pid = self.nodes[node].pid if node in self.nodes else self.node(node).get("pid")
        assert pid, f"no pid for {node} in status.json: {self.node(node)}"
        self.tracker.see(pid)
        os.kill(pid, sig)
        return pid

    def close(self) -> list[int]:
        """Stop sampling; SIGKILL whatever we saw that is still alive (each process group too) and reap it;
        returns those pids."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.proc is not None and self.proc.poll() is None:
            self.tracker.see_tree(self.proc.pid)
        left = self.tracker.kill_all()
        for proc in [self.proc, *self.nodes.values()]:
            if proc is not None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        reap(left)
        return left

    # -- sampling
    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - the sampler must never die
                pass
            self._stop.wait(0.15)

    def sample(self) -> None:
        """Record the pids, node states and state round seen now."""
        now = time.time()
        if self.proc is not None and self.proc.poll() is None:
            self.tracker.see_tree(self.proc.pid)
        st = self.status()
        self.tracker.see((st.get("supervisor") or {}).get("pid"))
        for name, node in (st.get("nodes") or {}).items():
            pid, state = node.get("pid"), node.get("state")
            self.tracker.see(pid)
            hist = self.history.setdefault(name, [])
            if not hist or hist[-1][1:] != (pid, state):
                hist.append((now, pid, state))
        state = self.signed_state() if self.sample_signed_states_only else self.state()
        if state is not None:
            key = (state.get("round"), bool(state.get("finished")))
            if not self.rounds or self.rounds[-1][1:] != key:
                self.rounds.append((now, *key))

    def recovered_at(self, name: str, old_pid: int, after: float) -> float | None:
        """Wall time the sampler first saw ``name`` RUNNING with a pid other than ``old_pid`` after ``after``."""
        for t, pid, state in self.history.get(name, []):
            if t >= after and state == "RUNNING" and pid and pid != old_pid:
                return t
        return None

    # -- reading
    def status(self) -> dict:
        """The last ``status.json`` (``{}`` before the first)."""
        return read_status(RuntimePaths(self.runtime)) or {}

    def node(self, name: str) -> dict:
        return (self.status().get("nodes") or {}).get(name) or {}

    def running_pid(self, name: str) -> int | None:
        """The pid of ``name`` when status.json says RUNNING and it is alive."""
        n = self.node(name)
        pid = n.get("pid")
        self.tracker.see(pid)
        return pid if n.get("state") == "RUNNING" and pid and alive(pid) else None

    def state(self) -> dict | None:
        """``state/current_state.json`` (None while missing or half-written)."""
        try:
            obj = json.loads((self.exp / "state" / "current_state.json").read_text())
        except (OSError, ValueError):
            return None
        return obj if isinstance(obj, dict) else None

    def signed_state(self) -> dict | None:
        """The state file when it carries a valid signature of the swarm's key (``<runtime>/swarm.key``), as
        the nodes accept it; None while it is missing, half-written, unsigned, forged or one of
        :attr:`replayed_states`."""
        from node.signing import KEY_FILE_NAME, Signer, SignatureError, read_key_file

        try:
            signer = Signer(read_key_file(self.runtime / KEY_FILE_NAME))
            data = (self.exp / "state" / "current_state.json").read_bytes()
            if data in self.replayed_states:
                return None
            obj = json.loads(signer.verify(data, "state/current_state.json"))
        except (OSError, ValueError, SignatureError):
            return None
        return obj if isinstance(obj, dict) else None

    def signed_round(self) -> int:
        """The round of :meth:`signed_state`, -1 without one."""
        st = self.signed_state()
        return int(st["round"]) if st and isinstance(st.get("round"), int) else -1

    def state_round(self) -> int:
        st = self.state()
        return int(st["round"]) if st and isinstance(st.get("round"), int) else -1

    def metrics(self, node: str) -> list[dict]:
        return read_jsonl(self.exp / "logs" / node / "metrics.jsonl")[0]

    def events(self, node: str) -> list[dict]:
        return read_jsonl(self.exp / "logs" / node / "training_events.jsonl")[0]

    def node_log(self, node: str) -> list[dict]:
        return read_jsonl(self.runtime / "logs" / f"{node}.log")[0]

    def supervisor_log(self) -> list[dict]:
        return read_jsonl(self.runtime / "logs" / "supervisor.log")[0]

    def event_times(self, event: str, **match) -> list[float]:
        """When the supervisor logged ``event`` (with those fields), as time.time()."""
        return [iso_ts(e["timestamp"]) for e in self.supervisor_log()
                if e.get("event") == event and all(e.get(k) == v for k, v in match.items()) and "timestamp" in e]

    def output(self, name: str = "supervisor.out") -> str:
        """The supervisor's (or a hand-started node's: ``<id>.out``) console output so far."""
        try:
            return (self.root / name).read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str, poll: float = 0.1):
        """:func:`wait_for`, giving up as soon as a launched supervisor exits; the output tail in the message."""
        proc = self.proc

        def exited() -> str | None:
            return f"the supervisor exited ({proc.returncode})" if proc is not None and proc.poll() is not None \
                else None

        def outputs() -> str:
            names = ["supervisor.out"] if proc is not None else [f"{n}.out" for n in self.nodes]
            return "\n".join(f"{name}:\n{self.output(name)[-2000:]}" for name in names)

        return wait_for(predicate, timeout, what, poll, fail_if=exited, details=outputs)
