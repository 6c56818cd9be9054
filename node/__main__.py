"""``python -m node``: run one node (coordinator or worker) of an experiment.

    python -m node --config configs/smoke-cpu.yaml --role worker --node-id worker_1
    NODE_ROLE=worker NODE_ID=worker_2 GDRIVE_PATH=/mnt/drive EXPERIMENT_NAME=exp python -m node

Identity comes from the flags or the seeds' variables NODE_ROLE / NODE_ID; everything else from the
config file, the seeds' environment overrides and ``--set``. Several such processes on one machine (or
on hosts sharing one directory), pointed at one experiment, form a swarm; the supervisor (``swarm
launch``) is one way to start them. Exit codes: 0 finished, 143 stopped on SIGTERM/SIGINT after a
checkpoint, 2 configuration error, 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys

import structlog

from node.config import plain_name_problem, resolve_config
from node.heartbeat import Heartbeat, default_runtime_dir
from node.layout import ExperimentLayout
from node.logs import bind, configure_logging
from node.runtime import (EXIT_CONFIG_ERROR, EXIT_FAILED, EXIT_STOPPED, PeerRegistration, StopFlag, StopRequested,
                          ensure_config_snapshot)
from node.storage import SharedStore, is_transient
from sapo.config import ConfigError

log = structlog.get_logger("node")
ROLES = ("coordinator", "worker")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options of one node."""
    p = argparse.ArgumentParser(prog="python -m node", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="experiment YAML (optional: defaults + env work too)")
    p.add_argument("--role", choices=ROLES, help="coordinator or worker (env NODE_ROLE)")
    p.add_argument("--node-id", help="this node's id, e.g. worker_1 (env NODE_ID)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config override")
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
    """``cpu`` or ``cuda:0``: $SWARM_DEVICE (set by the supervisor) wins, then the config."""
    import torch

    wanted = os.environ.get("SWARM_DEVICE") or configured
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("supervisor.device", "cuda requested but torch sees no CUDA device")
        return "cuda:0"
    return "cpu"


def apply_memory_fraction(device: str) -> None:
    """Cap this process's share of the GPU as planned by the supervisor ($SWARM_MEMORY_FRACTION)."""
    fraction = os.environ.get("SWARM_MEMORY_FRACTION")
    if device.startswith("cuda") and fraction:
        import torch

        torch.cuda.set_per_process_memory_fraction(float(fraction), 0)
        log.info("memory_fraction_set", fraction=float(fraction))


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
    configure_logging(runtime_dir / "logs" / f"{node_id}.log", console=not supervised)
    bind(node_id=node_id, role=role, pid=os.getpid())
    stop = StopFlag().install()
    layout = ExperimentLayout.from_config(config)
    store = SharedStore.from_config(config, node_id=node_id)
    heartbeat = Heartbeat(runtime_dir, node_id, role, config.supervisor.heartbeat_interval_s)
    try:
        join_experiment(store, layout, config, node_id, stop)
        log.info("node_starting", experiment=str(config.experiment_dir), model=config.model.name)
        if role == "coordinator":
            from node.coordinator import Coordinator

            heartbeat.start()
            return Coordinator(config, node_id, store=store, layout=layout, heartbeat=heartbeat, stop=stop).run()
        return run_worker(config, node_id, store=store, layout=layout, heartbeat=heartbeat, stop=stop)
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
        heartbeat.stop()


def join_experiment(store, layout, config, node_id: str, stop: StopFlag, *, retry_s: float = 5.0) -> None:
    """Create the layout and check our config against the experiment's, waiting out a mount that is away.

    A Drive outage at start-up is not a configuration error: keep trying (the supervisor's start-up
    timeout bounds the wait) instead of crashing into a restart loop.
    """
    while True:
        try:
            store.ensure_layout()
            ensure_config_snapshot(store, layout, config, node_id)
            return
        except OSError as err:
            if not is_transient(err):
                raise
            log.warning("shared_dir_unreachable", error=str(err))
            stop.sleep(retry_s)


def run_worker(config, node_id: str, *, store, layout, heartbeat, stop) -> int:
    """Register, load the model, then train (heartbeats start only once the model is loaded)."""
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
        loaded = load_model(config.model.name, device=device, dtype=config.model.dtype, seed=config.experiment.seed,
                            attn_implementation=config.model.attn_implementation)
    except ModelLoadError as err:
        log.error("model_load_failed", error=str(err))
        print(f"model load failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    autocast = None if config.model.autocast == "none" else getattr(torch, config.model.autocast)
    learner = SapoLearner(loaded.model, loaded.tokenizer, config.sapo, experiment_seed=config.experiment.seed,
                          autocast=autocast)
    heartbeat.start()
    log.info("worker_ready", device=device, dtype=str(loaded.dtype), autocast=config.model.autocast,
             attn_implementation=loaded.model.config._attn_implementation)
    return Worker(config, node_id, store=store, layout=layout, learner=learner, heartbeat=heartbeat, stop=stop,
                  peer=peer).run()


if __name__ == "__main__":
    sys.exit(main())
