"""The production loop around ``Supervisor.tick``: main thread only, signals that only record, a wake-up pipe.

:func:`run` plans the launch and takes the lock (refusals are raised before anything is spawned), then
ticks until the supervisor is done, sleeping :meth:`Supervisor.next_wake` seconds between ticks. SIGTERM,
SIGINT and SIGHUP only record a stop request; they and SIGCHLD (a child exited) end the sleep early
through ``signal.set_wakeup_fd``. It must run in the main thread: ``PR_SET_PDEATHSIG`` is per thread and
signal handlers live there. If the loop itself fails, :func:`emergency_stop` stops every node first.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from supervisor.daemon import Supervisor

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# The supervisor's exit codes; stopped by signal N: 128+N (SIGTERM 143), or 0 after the experiment finished.
EXIT_FINISHED = 0  # every node finished
EXIT_FATAL = 1  # some node went FATAL (or the loop itself failed)
EXIT_USAGE = 2  # a user mistake: configuration, GPU plan, a second supervisor


class Wakeup:
    """Signal handlers that record stop requests, and a pipe that ends the loop's sleep when a signal comes."""

    def __init__(self) -> None:
        self._read: int | None = None
        self._write: int | None = None
        self._previous: dict = {}

    def install(self, on_stop: Callable[[int], None]) -> None:
        def record(signum, _frame):
            on_stop(signum)

        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, record)
        self._previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.siginterrupt(signal.SIGCHLD, False)
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._previous["wakeup_fd"] = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)

    def restore(self) -> None:
        signal.set_wakeup_fd(self._previous.pop("wakeup_fd", -1))
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
        for fd in (self._read, self._write):
            if fd is not None:
                os.close(fd)
        self._read = self._write = None

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``; a signal (stop request, child exit) ends the wait early."""
        try:
            ready, _, _ = select.select([self._read], [], [], max(0.0, seconds))
        except InterruptedError:
            ready = []
        if ready:
            try:
                while os.read(self._read, 512):
                    pass
            except (BlockingIOError, OSError):
                pass


def run(sup: "Supervisor", *, on_tick: Callable[["Supervisor"], None] | None = None,
        tick_interval: float | None = None, on_started: Callable[["Supervisor"], None] | None = None) -> int:
    """Plan, lock, tick until done; the exit code. See :meth:`Supervisor.run`."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("Supervisor.run must be called from the main thread")
    try:
        sup.prepare()
        sup.acquire_lock()
    except BaseException:
        sup.close_gpu()
        raise
    wakeup = Wakeup()
    wakeup.install(sup.request_stop)
    try:
        sup.log.info("supervisor_started", pid=os.getpid(), experiment=sup.config.experiment.name,
                     experiment_dir=str(sup.config.experiment_dir), runtime_dir=str(sup.paths.root),
                     workers=sup.sv.workers, node_command=sup.node_command, plan=sup.launch.describe())
        if on_started is not None:
            on_started(sup)
        while not _step(sup, on_tick):
            delay = sup.next_wake(sup.os.monotonic())
            if tick_interval is not None:
                delay = min(delay, tick_interval)
            if not sup.stop.pending:
                wakeup.wait(delay)
    except BaseException as err:
        sup.log.error("supervisor_crashed", error=f"{type(err).__name__}: {err}")
        emergency_stop(sup)
        sup.stop.reason = f"supervisor failure: {type(err).__name__}: {err}"
        sup.exit_code = EXIT_FATAL
        sup.write_status()
        raise
    finally:
        wakeup.restore()
        sup.wait_events()
        sup.notifier.close()
        sup.close_gpu()
        sup.release_lock()
    return int(sup.exit_code if sup.exit_code is not None else EXIT_FATAL)


def _step(sup: "Supervisor", on_tick) -> bool:
    done = sup.tick()
    if on_tick is not None:
        on_tick(sup)
    return done


def emergency_stop(sup: "Supervisor", timeout_s: float | None = None) -> None:
    """Stop every node now (SIGTERM, wait, SIGKILL), e.g. when the loop itself failed."""
    nodes = sup.nodes.values()
    if not any(n.proc is not None for n in nodes):
        return
    now = sup.os.monotonic()
    if not sup.stop.active:
        sup.stop.begin(nodes, now, "supervisor failure")
    deadline = now + (sup.sv.stop_timeout_s if timeout_s is None else timeout_s)
    while any(n.proc is not None for n in nodes):
        now = sup.os.monotonic()
        for node in nodes:
            if node.proc is not None and sup.os.reap(node.proc) is not None:
                node.proc = None
            elif node.proc is not None and now >= deadline and not node.kill_sent:
                node.kill_sent = True
                sup.send_signal(node, signal.SIGKILL)
        if now >= deadline + 10:
            break
        sup.os.sleep(0.05)
