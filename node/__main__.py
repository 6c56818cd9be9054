"""``python -m node``: run one node (coordinator or worker) of an experiment.

    python -m node --config configs/smoke-cpu.yaml --role worker --node-id worker_1
    NODE_ROLE=worker NODE_ID=worker_2 GDRIVE_PATH=/mnt/drive EXPERIMENT_NAME=exp python -m node

Identity comes from the flags or the seeds' variables NODE_ROLE / NODE_ID; everything else from the
config file, the seeds' environment overrides and ``--set``, and for a worker listed in the config's
``workers:`` its own entry (applied after the base config was checked against the experiment's). Several
such processes on one machine (or on hosts sharing one directory), pointed at one experiment, form a
swarm; the supervisor (``swarm launch``) is one way to start them. Exit codes: 0 finished, 143 stopped
on SIGTERM/SIGINT after a checkpoint, 2 configuration error, 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import types

import structlog

from node.config import plain_name_problem, resolve_config
from node.heartbeat import Heartbeat, default_runtime_dir
from node.layout import ExperimentLayout
from node.logs import bind, configure_logging
from node.runtime import (EXIT_CONFIG_ERROR, EXIT_FAILED, EXIT_STOPPED, PeerRegistration, StopFlag, StopRequested,
                          ensure_config_snapshot)
from node.retry import is_transient
from node.signing import KeyProblem, Signer, fingerprint, resolve_key
from node.storage import SharedStore
from sapo.config import ConfigError

log = structlog.get_logger("node")
ROLES = ("coordinator", "worker")
# Imported by reasoning-gym at its own import but used only when one of its datasets builds an item:
# cellpylib (game_of_life*) pulls in matplotlib.pyplot and mplot3d, ~0.45 s of every worker's start.
DEFERRED_IMPORTS = ("cellpylib",)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options of one node."""
    p = argparse.ArgumentParser(prog="python -m node", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="experiment YAML (optional: defaults + env work too)")
    p.add_argument("--role", choices=ROLES, help="coordinator or worker (env NODE_ROLE)")
    p.add_argument("--node-id", help="this node's id, e.g. worker_1 (env NODE_ID)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config override")
    p.add_argument("--key-file", help="the experiment key (hex), e.g. copied from the supervisor's runtime dir "
                   "(env SWARM_KEY, SWARM_KEY_FILE; default: <runtime dir>/swarm.key, created if absent)")
    return p.parse_args(argv)


def resolve_identity(args: argparse.Namespace) -> tuple[str, str]:
    """(role, node id) from flags, then NODE_ROLE / NODE_ID; ConfigError when missing or unsafe."""
    role = args.role or os.environ.get("NODE_ROLE") or "worker"
    if role not in ROLES:
        raise ConfigError("NODE_ROLE", f"must be one of {', '.join(ROLES)}; got {role!r}")
    node_id = args.node_id or os.environ.get("NODE_ID") or ("coordinator" if role == "coordinator" else "")
    if not node_id:
        raise ConfigError("NODE_ID", "a worker needs an id (--node-id or env NODE_ID), e.g. worker_1")
    problem = plain_name_problem(node_id)
    if problem:
        raise ConfigError("NODE_ID", problem)
    return role, node_id


def pick_device(configured: str) -> str:
    """``cpu`` or ``cuda:0``: $SWARM_DEVICE (set by the supervisor) wins, then the config.

    ``cuda:0`` is the first visible device: the supervisor makes the one it chose the only one
    (``CUDA_VISIBLE_DEVICES=<UUID>``); run by hand, it is the first of yours.
    """
    import torch

    wanted = os.environ.get("SWARM_DEVICE") or configured
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("supervisor.device", "cuda requested but torch sees no CUDA device")
        return "cuda:0"
    return "cpu"


def memory_fraction_for(budget_bytes: int, device_total_bytes: int) -> float:
    """The fraction torch needs to cap this process at ``budget_bytes``.

    ``torch.cuda.set_per_process_memory_fraction`` multiplies by cudaMemGetInfo's total
    (``torch.cuda.mem_get_info()[1]``), which is not NVML's total (the supervisor's plan): so the
    supervisor passes bytes and the fraction is made here. Capped at 1.
    """
    if budget_bytes <= 0 or device_total_bytes <= 0:
        raise ValueError(f"need positive byte counts, got budget {budget_bytes} of {device_total_bytes}")
    return min(1.0, budget_bytes / device_total_bytes)


def _positive_env(name: str, text: str, parse, upper: float | None = None):
    try:
        value = parse(text.strip())
    except ValueError:
        value = None
    if value is None or not value > 0 or (upper is not None and not value <= upper):  # NaN fails too
        bound = f"a number in (0, {upper:g}]" if upper is not None else "a positive integer (bytes)"
        raise ConfigError(name, f"must be {bound}, got {text!r}")
    return value


def apply_memory_fraction(device: str, environ=None) -> float | None:
    """Cap this process's share of the GPU as the supervisor planned it; the fraction applied, or None.

    $SWARM_MEMORY_BYTES (the per-worker byte budget) wins; $SWARM_MEMORY_FRACTION, from an older
    supervisor, is applied as it is. Neither set, or not on CUDA: nothing to do.
    """
    env = os.environ if environ is None else environ
    budget, legacy = env.get("SWARM_MEMORY_BYTES"), env.get("SWARM_MEMORY_FRACTION")
    if not device.startswith("cuda") or not (budget or legacy):
        return None
    import torch

    index = torch.device(device).index or 0
    if budget:
        budget_bytes = _positive_env("SWARM_MEMORY_BYTES", budget, int)
        total = int(torch.cuda.mem_get_info(index)[1])
        fraction = memory_fraction_for(budget_bytes, total)
        log.info("memory_fraction_set", fraction=round(fraction, 6), budget_bytes=budget_bytes,
                 cuda_total_bytes=total, detail=f"{budget_bytes / 2**30:.2f} GiB of {total / 2**30:.2f} GiB")
    else:
        fraction = _positive_env("SWARM_MEMORY_FRACTION", legacy, float, upper=1.0)
        log.info("memory_fraction_set", fraction=fraction, source="SWARM_MEMORY_FRACTION")
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def main(argv=None) -> int:
    """Run one node; returns its exit code."""
    args = parse_args(argv)
    try:
        config = resolve_config(args.config, overrides=args.set)
        role, node_id = resolve_identity(args)
    except ConfigError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    runtime_dir = default_runtime_dir(config.experiment_dir)
    # Under the supervisor the JSON log file is the record; stderr then only carries what crashes print.
    supervised = bool(os.environ.get("SWARM_RUNTIME_DIR")) and not sys.stderr.isatty()
    configure_logging(runtime_dir / "logs" / f"{node_id}.log", console="none" if supervised else "auto")
    bind(node_id=node_id, role=role, pid=os.getpid())
    stop = StopFlag().install()
    layout = ExperimentLayout.from_config(config)
    try:
        signer = make_signer(config, args.key_file, runtime_dir)
    except KeyProblem as err:
        log.error("configuration_error", error=str(err))
        print(f"configuration error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    store = SharedStore.from_config(config, node_id=node_id, signer=signer)
    heartbeat = Heartbeat(runtime_dir, node_id, role, config.supervisor.heartbeat_interval_s)
    try:
        join_experiment(store, layout, config, node_id, stop, repair=role == "coordinator")
        tasks = config.experiment_tasks()  # the base config's answer: a worker's own mix replaces sapo.tasks
        config = own_config(config, node_id)
        log.info("node_starting", experiment=str(config.experiment_dir), model=config.model.name)
        if role == "coordinator":
            from node.coordinator import Coordinator

            heartbeat.start()
            return Coordinator(config, node_id, store=store, layout=layout, heartbeat=heartbeat, stop=stop,
                               local_state=runtime_dir / "coordinator.state.json").run()
        return run_worker(config, node_id, store=store, layout=layout, heartbeat=heartbeat, stop=stop,
                          experiment_tasks=tasks)
    except StopRequested:
        log.info("node_stopped_before_start")
        return EXIT_STOPPED
    except ConfigError as err:
        log.error("configuration_error", error=str(err))
        print(f"configuration error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except Exception:
        log.exception("node_crashed")
        raise
    finally:
        store.sync(timeout=10)  # writes made visible early (durable="later") are on disk before we exit
        heartbeat.stop()


def make_signer(config, key_file: str | None, runtime_dir) -> Signer:
    """The signer of this node's shared-dir files: the experiment key from ``--key-file``, ``$SWARM_KEY``,
    ``$SWARM_KEY_FILE`` or ``<runtime dir>/swarm.key`` (created there when there is none: every node of
    one host then shares it; nodes on other hosts must be given it)."""
    key, source = resolve_key(key_file=key_file, runtime_dir=runtime_dir, create=True)
    required = config.exchange.require_signatures
    log.info("experiment_key", source=source, fingerprint=fingerprint(key), require_signatures=required)
    if not required:
        log.warning("signatures_not_required", hint="exchange.require_signatures is false: unsigned files "
                    "in the shared directory are accepted (anyone who can write there can forge them)")
    return Signer(key, required=required)


def own_config(config, node_id: str):
    """The config this node runs: the base one (checked against the experiment's state/config.json, which holds
    the workers list too) with this worker's ``workers:`` entry applied, logged when there is one."""
    own = config.for_node(node_id)
    if own is not config:
        log.info("worker_overrides", model=own.model.name, init_seed=own.model_seed(),
                 tasks=[t.name for t in own.sapo.tasks], learning_rate=own.sapo.learning_rate,
                 num_train_samples=own.sapo.num_train_samples, num_transplant_trees=own.sapo.num_transplant_trees)
    return own


class MixedTaskBank:
    """A heterogeneous worker's tasks: questions sampled from its own mix, while peers' groups of any task of the
    experiment (the base mix and every worker's) are rebuilt and scored, so a worker learns from tasks it never
    samples itself. Each task's datasets live in one :class:`~sapo.tasks.TaskBank` (built once)."""

    def __init__(self, own, experiment):
        from sapo.tasks import TaskBank

        self.own = TaskBank(own)
        self.others = TaskBank([t for t in experiment if t.name not in self.own.names])
        self.names = self.own.names + self.others.names  # every task it can rebuild (and evaluate)

    def _bank(self, dataset):
        return self.own if dataset in self.own.names else self.others

    def sample(self, experiment_seed: int, node_id: str, round_: int, count: int):
        """This worker's questions, from its own mix only (:meth:`sapo.tasks.TaskBank.sample`)."""
        return self.own.sample(experiment_seed, node_id, round_, count)

    def rebuild(self, ref, experiment_seed=None):
        """The question behind ``ref``, a task of the experiment (:meth:`sapo.tasks.TaskBank.rebuild`)."""
        return self._bank(getattr(ref, "dataset", None)).rebuild(ref, experiment_seed)

    def score(self, question, completion, format_reward: float = 0.0) -> float:
        """A completion's reward (:meth:`sapo.tasks.TaskBank.score`)."""
        return self._bank(question.ref.dataset).score(question, completion, format_reward)


def task_bank(own_tasks, experiment_tasks):
    """A worker's task bank: None (the learner's own bank of its ``sapo.tasks``) when its own mix holds every task
    of the experiment (:meth:`~node.config.ExperimentConfig.experiment_tasks`), else a :class:`MixedTaskBank`."""
    own = {t.name for t in own_tasks}
    if all(t.name in own for t in experiment_tasks):
        return None
    return MixedTaskBank(own_tasks, experiment_tasks)


def join_experiment(store, layout, config, node_id: str, stop: StopFlag, *, retry_s: float = 5.0,
                    repair: bool = False) -> None:
    """Create the layout and check our config against the experiment's, waiting out a mount that is away.

    A Drive outage at start-up is not a configuration error: keep trying (the supervisor's start-up
    timeout bounds the wait) instead of crashing into a restart loop.
    """
    while True:
        try:
            store.ensure_layout()
            ensure_config_snapshot(store, layout, config, node_id, repair=repair)
            return
        except OSError as err:
            if not is_transient(err):
                raise
            log.warning("shared_dir_unreachable", error=str(err))
            stop.sleep(retry_s)


class DeferredModule(types.ModuleType):
    """A stand-in in ``sys.modules`` that imports the real module at its first attribute lookup.

    importlib's LazyLoader cannot do this job: an ``import`` statement reads the module's ``__spec__``, which
    loads a lazy module at once. The stand-in holds ``__spec__``, ``__file__`` and ``__path__``, so an
    ``import`` of it, or a walk over ``sys.modules``, costs nothing."""

    def __getattr__(self, attr):  # called only for what the stand-in lacks
        real = sys.modules.get(self.__name__)
        if real is None or real is self:
            sys.modules.pop(self.__name__, None)
            real = importlib.import_module(self.__name__)
        self.__dict__.update(real.__dict__)  # later lookups through the stand-in are plain ones
        return getattr(real, attr)


def defer_imports(names=DEFERRED_IMPORTS) -> list[str]:
    """Put a :class:`DeferredModule` in place of each top-level module in ``names``; the names deferred. One
    already imported, or not installed, is left alone."""
    deferred = []
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)  # a top-level name: found without running anything
        if spec is None:
            continue
        stand_in = DeferredModule(name)
        # What the import system and inspect.getmodule (torch's import walks sys.modules) read, without loading.
        stand_in.__spec__, stand_in.__loader__, stand_in.__file__ = spec, spec.loader, spec.origin
        stand_in.__package__ = spec.parent
        if spec.submodule_search_locations is not None:
            stand_in.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = stand_in
        deferred.append(name)
    return deferred


def run_worker(config, node_id: str, *, store, layout, heartbeat, stop, experiment_tasks=()) -> int:
    """Import torch and transformers, register, load the model, then train (heartbeats start only once the model
    is loaded: the first one, phase ``loaded``, is the supervisor's sign that the next worker may load its own).
    ``experiment_tasks``: every task of the experiment, whose peers' groups this worker takes (default: its own)."""
    defer_imports()  # before anything imports reasoning-gym
    import torch
    import transformers

    from node.models import ModelLoadError, load_model
    from node.worker import Worker
    from sapo.learner import SapoLearner

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    peer = PeerRegistration(store, layout, node_id, "worker", config.supervisor.heartbeat_interval_s)
    peer.update(round_=0, status="starting", force=True)
    device = pick_device(config.supervisor.device)
    apply_memory_fraction(device)
    try:
        loaded = load_model(config.model.name, device=device, dtype=config.model.dtype, seed=config.model_seed(),
                            attn_implementation=config.model.attn_implementation)
    except ModelLoadError as err:
        log.error("model_load_failed", error=str(err))
        print(f"model load failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    autocast = None if config.model.autocast == "none" else getattr(torch, config.model.autocast)
    learner = SapoLearner(loaded.model, loaded.tokenizer, config.sapo, experiment_seed=config.experiment.seed,
                          autocast=autocast, bank=task_bank(config.sapo.tasks, experiment_tasks))
    # The first heartbeat, phase "loaded": the model and the learner's copies of it are in memory. The supervisor's
    # stagger ("loaded", a GPU's default) starts the next worker on it; a failure before it is a start-up failure.
    heartbeat.progress("loaded")
    heartbeat.start()
    log.info("worker_ready", device=device, dtype=str(loaded.dtype), autocast=config.model.autocast,
             attn_implementation=loaded.model.config._attn_implementation)
    return Worker(config, node_id, store=store, layout=layout, learner=learner, heartbeat=heartbeat, stop=stop,
                  peer=peer).run()


if __name__ == "__main__":
    sys.exit(main())
