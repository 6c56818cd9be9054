"""Test doubles for the supervisor: a scripted OS (:class:`FakeOS`) and a fake NVML (:class:`FakeGpu`).

Both are honest stand-ins: ``FakeOS`` has manual clocks and scripted exits and obeys signals as real
processes would; ``FakeGpu`` lists only PIDs that really live (psutil), as NVML does.
"""

from __future__ import annotations

import signal as _signal
import time
from typing import Callable, Mapping, Sequence


from supervisor import procs
from supervisor.gpu import GIB, GpuDevice, GpuProcess, NoSuchGpu, is_index, match_uuid, seen_text


# --------------------------------------------------------------------------- the OS

class FakeProcess:
    """A scripted process of :class:`FakeOS` (quacks like the bits of Popen the loop uses)."""

    def __init__(self, pid: int, argv: Sequence[str], env, cwd):
        self.pid = pid
        self.args = list(argv)
        self.env = dict(env or {})
        self.cwd = cwd
        self.returncode: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.returncode


class FakeOS:
    """An honest stand-in for tests of the state machine: manual clocks, scripted exits.

    ``spawn`` records the call and returns a :class:`FakeProcess`; ``exit(pid, code)`` scripts its
    end (a negative code is a signal). ``signal_group`` records the signal; with ``obey_signals``
    (default) SIGTERM/SIGINT/SIGKILL end the process as a real one would. ``spawn_error`` makes the
    next spawns raise it. ``sleep`` advances the clocks.
    """

    def __init__(self, start: float = 1000.0, *, obey_signals: bool = True):
        self.mono = start
        self.wall = 1_700_000_000.0
        self.obey_signals = obey_signals
        self.next_pid = 10_000
        self.procs: dict[int, FakeProcess] = {}
        self.spawned: list[FakeProcess] = []
        self.sent: list[tuple[int, int]] = []
        self.spawn_error: OSError | None = None

    # clocks
    def monotonic(self) -> float:
        return self.mono

    def now(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))

    # processes
    def spawn(self, argv, *, env, cwd, stdout_path, stderr_path) -> FakeProcess:
        if self.spawn_error is not None:
            raise self.spawn_error
        self.next_pid += 1
        proc = FakeProcess(self.next_pid, argv, env, cwd)
        self.procs[proc.pid] = proc
        self.spawned.append(proc)
        return proc

    def exit(self, pid: int, returncode: int) -> None:
        proc = self.procs[pid]
        if proc.returncode is None:
            proc.returncode = returncode

    def signal_group(self, pid: int, sig: int) -> bool:
        self.sent.append((pid, int(sig)))
        proc = self.procs.get(pid)
        if proc is None or proc.returncode is not None:
            return False
        proc.signals.append(int(sig))
        if self.obey_signals and sig in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGKILL):
            proc.returncode = -int(sig)
        return True

    def is_alive(self, pid: int) -> bool:
        proc = self.procs.get(pid)
        return proc is not None and proc.returncode is None

    def reap(self, popen: FakeProcess) -> int | None:
        return popen.poll()


# --------------------------------------------------------------------------- the GPU

def fake_uuid(gpu: int, mig: int | None = None) -> str:
    """The UUID :class:`FakeGpu` gives GPU ``gpu`` (or its MIG instance ``mig``)."""
    if mig is None:
        return f"GPU-{gpu:08x}-0000-4000-8000-000000000000"
    return f"MIG-{gpu:04x}{mig:04x}-0000-4000-8000-000000000000"


class FakeGpu:
    """A stand-in for tests: ``devices`` GPUs of ``total_bytes``, a mutable ``used`` map pid→bytes (None: unknown).

    Like NVML it lists only processes that really exist (psutil, zombies excluded), except PIDs
    told to :meth:`linger`: those stay listed for a while after death, as a killed CUDA process's
    memory does until the driver frees it. ``used`` is the process table of whichever device is asked
    (the supervisor asks about one). ``totals={1: bytes}`` gives GPU 1 another size than ``total_bytes``;
    ``mig={0: [bytes, …]}`` puts GPU 0 in MIG mode with instances of those sizes; ``readable = False``
    makes the process list unreadable (``processes`` gives None).
    """

    def __init__(self, total_bytes: int, used: Mapping[int, int | None] | None = None, *, devices: int = 1,
                 utilization: int | None = 0, clock: Callable[[], float] = time.monotonic,
                 totals: Mapping[int, int] | None = None, mig: Mapping[int, Sequence[int]] | None = None):
        self.total_bytes = int(total_bytes)
        self.totals = {int(k): int(v) for k, v in (totals or {}).items()}
        self.used: dict[int, int | None] = dict(used or {})
        self.devices = devices
        self.util = utilization
        self.clock = clock
        self.mig = {int(k): [int(b) for b in v] for k, v in (mig or {}).items()}
        self.readable = True
        self.lingering: dict[int, float] = {}  # pid -> monotonic time it stops being listed
        self.closed = False
        self.asked: list[GpuDevice] = []  # every device processes() was asked about

    def linger(self, pid: int, seconds: float = float("inf")) -> None:
        """Keep listing ``pid`` for ``seconds`` even once it is dead (until :meth:`release`)."""
        self.lingering[pid] = self.clock() + seconds

    def release(self, pid: int) -> None:
        """The driver freed ``pid``'s memory: stop listing it once it is dead."""
        self.lingering.pop(pid, None)
        self.used.pop(pid, None)

    def _listed(self, pid: int) -> bool:
        until = self.lingering.get(pid)
        if until is not None and self.clock() < until:
            return True
        return procs.is_alive(pid)  # like NVML: live processes only, zombies excluded

    def _check(self) -> None:
        if self.closed:
            raise RuntimeError("FakeGpu used after close()")

    def _gpus(self) -> list[GpuDevice]:
        return [GpuDevice(fake_uuid(i), i, self.totals.get(i, self.total_bytes), "Fake GPU")
                for i in range(self.devices)]

    def _migs(self, index: int) -> list[GpuDevice]:
        return [GpuDevice(fake_uuid(index, j), index, size, f"Fake GPU MIG {size // GIB}gb", mig=True)
                for j, size in enumerate(self.mig.get(index, []))]

    def device_count(self) -> int:
        self._check()
        return self.devices

    def device(self, spec: str) -> GpuDevice:
        self._check()
        spec = str(spec).strip()
        inventory = [d for g in self._gpus() for d in (g, *self._migs(g.index))]
        if is_index(spec):
            if int(spec) >= self.devices:
                raise NoSuchGpu(f"no GPU {int(spec)}; NVML sees {seen_text(inventory)}")
            found = self._gpus()[int(spec)]
        else:
            found = match_uuid(inventory, spec)
        if not found.mig and self._migs(found.index):
            return self._migs(found.index)[0]
        return found

    def processes(self, device: GpuDevice) -> list[GpuProcess] | None:
        self._check()
        self.asked.append(device)
        if not self.readable:
            return None
        return [GpuProcess(pid, used) for pid, used in sorted(self.used.items()) if self._listed(pid)]

    def utilization(self, device: GpuDevice) -> int | None:
        self._check()
        return None if device.mig else self.util  # NVML: not supported on a MIG instance

    def close(self) -> None:
        self.closed = True
