"""What the supervisor starts: the device and its memory plan, the nodes' names, command lines and environment.

:func:`plan_launch` resolves ``supervisor.gpu`` / an inherited ``CUDA_VISIBLE_DEVICES`` to one GPU or MIG
instance by UUID and shares its memory among the workers (:func:`supervisor.gpu_plan.plan_memory`, each
worker's share from its own model in a heterogeneous swarm), or chooses the CPU. :func:`node_argv` and :func:`node_env` are the node contract: ``--config/--role/--node-id/--set``
on the command line; ``NODE_ROLE``, ``NODE_ID``, ``SWARM_RUNTIME_DIR``, ``SWARM_DEVICE``,
``CUDA_VISIBLE_DEVICES`` (the UUID for GPU workers, empty for the coordinator), ``SWARM_MEMORY_BYTES`` and
``OMP_NUM_THREADS`` in the environment (and ``SWARM_HOST_ID`` on a joining host). Pure functions of their
arguments (and the CPU affinity).

A **joining host** (``swarm launch CONFIG --join``) runs workers only, for an experiment whose coordinator runs
elsewhere: :func:`host_id` names it (a plain-name form of the hostname, or ``--host-id``), :func:`node_names`
names its workers ``<host>-worker_K``, and :func:`joiner_config` is the supervisor's own view of it (its N
workers, no ``workers:`` entries: those name the first host's ``worker_1 ... worker_N``, so a joiner's workers
run the base config). The nodes still get the experiment's config (file and ``--set``), unchanged.
:class:`ExperimentGate` holds its spawns until the experiment exists.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from node import fsio
from node.config import plain_name_problem
from node.runtime import HOST_ID_ENV  # a joining host's id, handed to its nodes (the host in their peer records)
from node.signing import SignatureError, Signer, fingerprint
from sapo.config import ConfigError
from supervisor.gpu import GpuDevice, GpuInfo, NoSuchGpu, requested_gpu
from supervisor.gpu_plan import GpuPlan, PlanError, model_params, plan_memory, training_bytes
from supervisor.sdnotify import child_env

DEFAULT_NODE_COMMAND: tuple[str, ...] = (sys.executable, "-m", "node")


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

    def budget_bytes(self) -> int | None:
        """A worker's planned GPU memory (fraction + CUDA context; the largest one's in a heterogeneous swarm),
        or None on the CPU."""
        return self.gpu_plan.budget_bytes() if self.gpu_plan else None

    def worker_bytes(self, node_id: str) -> int:
        """Worker ``node_id``'s share of the GPU (its allocator cap, SWARM_MEMORY_BYTES); needs a GPU plan."""
        assert self.gpu_plan is not None
        number = _WORKER_NUMBER.match(node_id)
        if number is None or not 1 <= int(number.group(1)) <= self.gpu_plan.workers:
            return self.gpu_plan.bytes_per_worker
        return self.gpu_plan.share(int(number.group(1)))

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
    models, needs = worker_needs(config, environ)
    plan = plan_memory(device.total_bytes, sv.workers, sv.memory_fraction, sv.cuda_context_margin_gb, needs, models)
    notes = []
    if len(set(models)) > 1 and None in needs:
        unknown = ", ".join(f"worker_{i} ({m})" for i, (m, n) in enumerate(zip(models, needs), 1) if n is None)
        notes.append(f"model size unknown for {unknown} (not a built-in, a local directory or in the Hugging Face "
                     f"cache): the workers get equal shares of the GPU")
    if request.source == "supervisor.gpu" and request.inherited is not None:
        notes.extend(_overridden(gpu, device, request.inherited))
    return LaunchPlan("cuda", plan, f"{request.describe()}: {device.describe()}", gpu_device=device,
                      notes=tuple(notes))


def worker_needs(config, environ: Mapping[str, str]) -> tuple[list[str], list[int | None]]:
    """Each worker's model (worker_1 first, its ``workers:`` entry applied) and the bytes its training state needs
    on the GPU (:func:`supervisor.gpu_plan.training_bytes`; None when the model's size is unknown here)."""
    models, needs = [], []
    for name, role in node_names(config.supervisor.workers):
        if role != "worker":
            continue
        own = config.for_node(name)
        params = model_params(own.model.name, environ)
        models.append(own.model.name)
        needs.append(None if params is None else
                     training_bytes(params, own.model.dtype, own.sapo.optimizer, own.sapo.kl_beta))
    return models, needs


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


# --------------------------------------------------------------------------- the node contract

_WORKER_NUMBER = re.compile(r"^worker_([1-9][0-9]*)$")
MAX_HOST_ID = 48  # <host>-worker_<K> must stay a plain name (64 characters at most)


def node_names(workers: int, host: str | None = None) -> list[tuple[str, str]]:
    """``[("coordinator", "coordinator"), ("worker_1", "worker"), …]`` in start order; on a joining ``host``
    its workers only: ``[("<host>-worker_1", "worker"), …]``."""
    if host is not None:
        return [(f"{host}-worker_{i}", "worker") for i in range(1, workers + 1)]
    return [("coordinator", "coordinator")] + [(f"worker_{i}", "worker") for i in range(1, workers + 1)]


def host_id(requested: str | None = None, hostname: str | None = None) -> str:
    """A joining host's id: ``requested`` (``--host-id``) checked, else a plain-name form of the hostname (every
    character outside letters, digits, ``_ - .`` replaced by ``-``, at most :data:`MAX_HOST_ID` characters).
    ConfigError naming ``--host-id`` when the id cannot make plain node names."""
    if requested is not None:
        problem = plain_name_problem(requested)
        if problem or len(requested) > MAX_HOST_ID:
            raise ConfigError("--host-id", problem or f"at most {MAX_HOST_ID} characters (it prefixes the worker "
                              f"ids: <host>-worker_K); got {len(requested)}")
        return requested
    raw = hostname if hostname is not None else socket.gethostname()
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", raw).replace("..", "-").lstrip("-_.")[:MAX_HOST_ID].rstrip("-_.")
    return name or "host"


def joiner_config(config, workers: int | None):
    """The supervisor's own view of a joining host: ``workers`` workers (None: ``supervisor.workers``), no
    ``workers:`` entries (they name the first host's worker_1 ... worker_N; a joiner's workers run the base
    config). Its nodes are still given the experiment's config, unchanged."""
    n = config.supervisor.workers if workers is None else workers
    if n < 1:
        raise ConfigError("--workers", f"a joining host needs at least one worker; got {n}")
    return dataclasses.replace(config, supervisor=dataclasses.replace(config.supervisor, workers=n), workers=())


def cpu_share(workers: int) -> int:
    """Threads per CPU worker: the cores this process may use, divided among the workers (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers))


def node_argv(node_command: Sequence[str], config_path: str | None, overrides: Sequence[str], *, role: str,
              node_id: str) -> list[str]:
    """``[*node_command, --config, PATH, --role, ROLE, --node-id, ID, --set k=v, …]``."""
    argv = list(node_command)
    if config_path:
        argv += ["--config", config_path]
    argv += ["--role", role, "--node-id", node_id]
    for item in overrides:
        argv += ["--set", item]
    return argv


def node_env(environ: Mapping[str, str], launch: LaunchPlan | None, *, role: str, node_id: str,
             runtime_dir: Path, workers: int, host: str | None = None) -> dict[str, str]:
    """The environment of a node: ``environ`` minus systemd's variables, plus the contract's variables
    (``SWARM_HOST_ID`` when ``host``, a joining host's id, is given)."""
    env = child_env(environ)
    device = launch.device if launch else "cpu"
    env.update(NODE_ROLE=role, NODE_ID=node_id, SWARM_RUNTIME_DIR=str(runtime_dir))
    if host is not None:
        env[HOST_ID_ENV] = host
    env.pop("SWARM_MEMORY_FRACTION", None)
    env.pop("SWARM_MEMORY_BYTES", None)
    if role == "coordinator" or device != "cuda":
        env["SWARM_DEVICE"] = "cpu" if role == "coordinator" else device
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        assert launch is not None and launch.gpu_plan is not None and launch.gpu_device
        env["SWARM_DEVICE"] = "cuda"
        # A UUID names one device whatever CUDA's order; PCI_BUS_ID makes any index agree with nvidia-smi.
        env["CUDA_VISIBLE_DEVICES"] = launch.gpu_device.uuid
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        # Bytes, not a fraction: torch applies its fraction to cudaMemGetInfo's total, not NVML's.
        env["SWARM_MEMORY_BYTES"] = str(int(launch.worker_bytes(node_id)))
    if "OMP_NUM_THREADS" not in environ:
        # torch gives every process one thread per core: N CPU workers would oversubscribe the cores
        # (measured: a 2-worker CPU swarm on 2 cores ran 9x slower). Share them; the coordinator needs one.
        # GPU workers too: their CPU-side ops (sampling bookkeeping, batching, scoring) start OpenMP teams
        # whose spinning threads would compete with the other workers' kernel-launching threads.
        env["OMP_NUM_THREADS"] = str(1 if role == "coordinator" else cpu_share(workers))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# --------------------------------------------------------------------------- a joining host's wait

class ExperimentGate:
    """A joining host's wait for the experiment it joins: ``state/config.json`` (the first host's first node writes
    it) present and signed with the key this host was given. Its workers are spawned only then: a joiner pointed
    at the wrong directory must not create an experiment of its own, and one given the wrong key would wait
    forever for a state it cannot verify.

    :meth:`check` returns None once open (it stays open), else one line saying what it waits for. The file is
    read in a helper thread at most every ``interval_s`` (a mount that hangs never blocks the supervisor's loop),
    through :mod:`node.fsio` (regular files only, size capped) and checked with :class:`node.signing.Signer`.
    """

    MAX_BYTES = 1024 * 1024  # a config snapshot is a few KiB

    def __init__(self, path: Path, context: str, key: bytes | None, *, required: bool = True,
                 interval_s: float = 0.5):
        self.path, self.context, self.interval_s = Path(path), context, interval_s
        self.signer = Signer(key, required=required)
        self.key_text = f"fingerprint {fingerprint(key)}" if key is not None else "no key"
        self.waiting: str | None = f"waiting for the experiment: looking for {self.path}"
        self.reads = 0  # reads finished: the first verdict is worth logging, the placeholder above is not
        self._thread: threading.Thread | None = None
        self._next: float | None = None

    @classmethod
    def for_layout(cls, layout, key: bytes | None, *, required: bool = True, interval_s: float = 0.5):
        """The gate on ``layout``'s ``state/config.json`` (signature context: its path in the experiment)."""
        path = layout.config_file()
        return cls(path, path.relative_to(layout.root).as_posix(), key, required=required, interval_s=interval_s)

    def check(self, now: float) -> str | None:
        """None when the experiment is there to join, else why this host still waits (``now``: monotonic)."""
        if self.waiting is not None and (self._next is None or now >= self._next):
            self._next = now + self.interval_s
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._read, name="experiment-gate", daemon=True)
                self._thread.start()
        return self.waiting

    def _read(self) -> None:
        where = f"waiting for the experiment: {self.path}"
        try:
            data, _ = fsio.read_capped(self.path, self.MAX_BYTES)
            self.signer.verify(data, self.context)
        except FileNotFoundError:
            self.waiting = f"{where} does not exist yet (the first host's `swarm launch` writes it)"
        except SignatureError as err:
            self.waiting = (f"{where} is {err.reason} for this host's key ({self.key_text}): give this host the "
                            f"first host's swarm.key (--key-file, $SWARM_KEY)")
        except (OSError, fsio.BadFile) as err:
            reason = err.reason if isinstance(err, fsio.BadFile) else (err.strerror or str(err))
            self.waiting = f"{where} cannot be read ({reason})"
        else:
            self.waiting = None
        finally:
            self.reads += 1
