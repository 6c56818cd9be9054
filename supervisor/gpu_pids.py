"""Which NVML process is which worker, and waiting for a killed worker's GPU memory to be let go.

NVML reports PIDs as the host sees them; a node's PID inside a container differs, so
:func:`match_gpu_processes` tries every PID of the node's ``NSpid:`` line (:func:`nvml_pids_for`).
:func:`wait_gpu_released` never takes an unreadable process list for "released". Never imports torch.
"""

from __future__ import annotations

import enum
import os
import time
from typing import Callable, Iterable

from supervisor.gpu import GpuDevice, GpuInfo, GpuProcess


class Release(str, enum.Enum):
    """What :func:`wait_gpu_released` found. UNKNOWN is never taken for RELEASED."""

    RELEASED = "released"  # NVML no longer lists any of the pids
    HELD = "held"  # still listed when the wait ended
    UNKNOWN = "unknown"  # the process list could not be read


def nvml_pids_for(pid: int, proc_root: str | os.PathLike = "/proc") -> list[int]:
    """Every PID ``pid`` has across PID namespaces, from its ``NSpid:`` line in ``/proc/<pid>/status``.

    The first value is the view of the namespace that mounted ``proc_root`` (the host's, when read
    on the host), the last the innermost (the container's own). Without an NSpid line (old kernel)
    or a status file (process gone) the answer is ``[pid]``. NVML reports host PIDs, so record
    this while the process lives if you need it after its death.
    """
    try:
        with open(os.path.join(os.fspath(proc_root), str(pid), "status"), encoding="ascii",
                  errors="replace") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    pids: list[int] = []
                    for tok in line.split()[1:]:
                        if tok.isdigit() and int(tok) not in pids:
                            pids.append(int(tok))
                    if pid not in pids:
                        pids.append(pid)
                    return pids
    except OSError:
        pass
    return [pid]


def match_gpu_processes(child_pids: Iterable[int], gpu_processes: Iterable[GpuProcess], *,
                        proc_root: str | os.PathLike = "/proc") -> dict[int, int | None]:
    """``{child_pid: used_bytes}`` for the children NVML lists (any NSpid value may match).

    A child listed several times gets the sum; if NVML does not know the memory of any of its entries
    the child maps to None (unknown, never 0). Children NVML does not list are absent.
    """
    by_pid: dict[int, list[GpuProcess]] = {}
    for gp in gpu_processes:
        by_pid.setdefault(gp.pid, []).append(gp)
    out: dict[int, int | None] = {}
    for child in child_pids:
        for candidate in nvml_pids_for(child, proc_root):
            if candidate in by_pid:
                used = [gp.used_bytes for gp in by_pid[candidate]]
                out[child] = None if any(u is None for u in used) else sum(used)
                break
    return out


def wait_gpu_released(gpu: GpuInfo | None, device: GpuDevice | None, pids: Iterable[int], timeout_s: float,
                      poll_s: float = 0.5, sleep: Callable[[float], None] = time.sleep,
                      now: Callable[[], float] = time.monotonic) -> Release:
    """Wait (at most ``timeout_s``) until ``device`` no longer lists any of ``pids``.

    Call it before respawning a killed worker on a GPU: its memory can stay allocated for seconds.
    ``pids`` are as NVML reports them (see :func:`nvml_pids_for`). A process list that cannot be read
    (None, or an error) is never taken for "released": the wait goes on, and ends UNKNOWN if the list
    stayed unreadable to the end. No GPU, no device or no pids: RELEASED at once.
    """
    wanted = set(pids)
    if gpu is None or device is None or not wanted:
        return Release.RELEASED
    deadline = now() + max(0.0, timeout_s)
    while True:
        try:
            listed = gpu.processes(device)
        except Exception:  # noqa: BLE001 - a monitoring failure: unknown, never released
            listed = None
        if listed is not None and not wanted & {gp.pid for gp in listed}:
            return Release.RELEASED
        left = deadline - now()
        if left <= 0:
            return Release.UNKNOWN if listed is None else Release.HELD
        sleep(min(poll_s, left))
