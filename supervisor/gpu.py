"""The GPU device the workers share, as the supervisor names it: the types, the operator's choice, lookup.

:func:`requested_gpu` reads which device the operator asked for (``supervisor.gpu``, else an inherited
``CUDA_VISIBLE_DEVICES``, else GPU 0) and :meth:`GpuInfo.device` turns it into a :class:`GpuDevice` (a
whole GPU or a MIG instance) with its UUID, which is what workers get in ``CUDA_VISIBLE_DEVICES``: a UUID
means one device whatever the order. :func:`is_index` and :func:`match_uuid` are the lookup rules every
backend shares: :class:`supervisor.nvml.NvmlGpu` (the real one) and ``tests/doubles.py``'s ``FakeGpu``.
Unknown is never zero: a process list NVML cannot give is None, a process whose memory NVML does not
report has ``used_bytes`` None. Never imports torch.

The rest of the GPU story: :mod:`supervisor.nvml` (the backend), :mod:`supervisor.gpu_plan` (sharing the
device's memory among the workers), :mod:`supervisor.gpu_pids` (which NVML process is which worker, and
waiting for a killed one to let go).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Protocol, Sequence

GIB = 1024 ** 3
_INDEX = re.compile(r"[0-9]+")


class GpuProcess(NamedTuple):
    pid: int  # as NVML reports it (the host's view)
    used_bytes: int | None  # None when the driver does not say (MIG, some containers): unknown, not 0


@dataclass(frozen=True)
class GpuDevice:
    """The device the workers share: a whole GPU, or one MIG instance with its own memory."""

    uuid: str  # GPU-… or MIG-…: what the workers get in CUDA_VISIBLE_DEVICES
    index: int | None  # NVML index of the GPU (of the parent GPU for a MIG instance): PCI bus order
    total_bytes: int  # this device's memory (a MIG instance: its slice, not the card)
    name: str = ""
    mig: bool = False

    def describe(self) -> str:
        where = f"GPU {self.index}" if self.index is not None else "a GPU"
        what = f"MIG instance {self.uuid} of {where}" if self.mig else f"{where} {self.uuid}"
        return f"{what} ({self.name + ', ' if self.name else ''}{gib_text(self.total_bytes)} GiB)"


class NoSuchGpu(LookupError):
    """The requested index or UUID names no device NVML sees; the message lists what it sees."""


class GpuInfo(Protocol):
    """What the supervisor asks of a GPU backend."""

    def device_count(self) -> int: ...

    def device(self, spec: str) -> GpuDevice:
        """An NVML index ("1") or a UUID (or unique prefix) GPU-…/MIG-…; :class:`NoSuchGpu` otherwise.

        A GPU in MIG mode gives its first MIG instance: CUDA cannot use the card as a whole then.
        """

    def processes(self, device: GpuDevice) -> list[GpuProcess] | None:
        """Compute processes on ``device``; None when the list cannot be read (unknown, not empty)."""

    def utilization(self, device: GpuDevice) -> int | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class GpuRequest:
    """Which device the operator asked for, before NVML is asked whether it exists."""

    spec: str | None  # an NVML index ("1") or a UUID; None: CUDA_VISIBLE_DEVICES hides every GPU
    source: str  # "supervisor.gpu", "CUDA_VISIBLE_DEVICES" or "default"
    inherited: str | None = None  # CUDA_VISIBLE_DEVICES as inherited (None: unset)

    @property
    def field(self) -> str:
        """The setting to name in an error about this request."""
        return "CUDA_VISIBLE_DEVICES" if self.source == "CUDA_VISIBLE_DEVICES" else "supervisor.gpu"

    def describe(self) -> str:
        if self.source == "default":
            return "supervisor.gpu auto, no CUDA_VISIBLE_DEVICES"
        if self.source == "CUDA_VISIBLE_DEVICES":
            return f"CUDA_VISIBLE_DEVICES={self.inherited}"
        return f"supervisor.gpu={self.spec}"


def requested_gpu(configured: str | int, environ: Mapping[str, str]) -> GpuRequest:
    """``supervisor.gpu`` wins; with ``auto``, the first entry of an inherited ``CUDA_VISIBLE_DEVICES``
    (an index or a UUID, as CUDA reads it); without one, GPU 0.

    An empty ``CUDA_VISIBLE_DEVICES`` (or one starting with ``-1``, CUDA's "none") hides every GPU: spec None.
    Its indices are read in PCI bus order, NVML's and nvidia-smi's (CUDA's default order can differ on a box
    of mixed GPUs: a UUID is never ambiguous).
    """
    inherited = environ.get("CUDA_VISIBLE_DEVICES")
    if str(configured) != "auto":
        return GpuRequest(str(configured).strip(), "supervisor.gpu", inherited)
    if inherited is None:
        return GpuRequest("0", "default")
    first = inherited.split(",")[0].strip()
    if not first or first.startswith("-"):
        return GpuRequest(None, "CUDA_VISIBLE_DEVICES", inherited)
    return GpuRequest(first, "CUDA_VISIBLE_DEVICES", inherited)


def is_index(spec: str) -> bool:
    """True when ``spec`` names a GPU by its NVML index (else it is a UUID or a UUID prefix)."""
    return _INDEX.fullmatch(spec) is not None


def match_uuid(candidates: Sequence[GpuDevice], spec: str) -> GpuDevice:
    """The one candidate whose UUID is ``spec`` or starts with it (CUDA accepts unique prefixes too)."""
    exact = [d for d in candidates if d.uuid == spec]
    found = exact or [d for d in candidates if d.uuid.startswith(spec)]
    if len(found) == 1:
        return found[0]
    why = "is ambiguous" if found else "matches no device"
    raise NoSuchGpu(f"{spec} {why}; NVML sees {seen_text(candidates)}")


def seen_text(devices: Sequence[GpuDevice]) -> str:
    """``GPU 0 GPU-… (name, 80.0 GiB); …`` for error messages, or "no devices"."""
    if not devices:
        return "no devices"
    return "; ".join(d.describe() for d in devices)


def gib_text(n: float) -> str:
    """``n`` bytes in GiB with one decimal, for messages."""
    return f"{n / GIB:.1f}"
