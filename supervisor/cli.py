"""``swarm``: launch, watch, stop and check one experiment's swarm (1 coordinator + N workers).

Every subcommand takes the experiment's CONFIG file plus ``--set section.field=value`` (repeatable) and
honours the same environment overrides as the nodes (``GDRIVE_PATH``, ``EXPERIMENT_NAME``, ``TEST_MODE``,
...; see ``node.config``), so ``swarm status CONFIG`` finds the supervisor that ``swarm launch CONFIG``
started. Local runtime files (lock, pid, status.json, logs, heartbeats) live in
``~/.cache/sapo-swarm/run/<name>-<hash>`` or ``$SWARM_RUNTIME_DIR``.

More machines join a running experiment through the shared directory with ``swarm launch CONFIG --join
[--workers N] [--host-id NAME] [--key-file F]``: workers only (``<host>-worker_K``), no coordinator, started
once the experiment exists, signing with the first host's key (copied to this machine); its runtime dir is
``<name>-<hash>-join-<host>``, so ``status``, ``stop``, ``logs`` and ``systemd-unit`` take ``--join`` too.

Exit codes: 0 success; 1 a node went FATAL / validation failed / stop timed out; 2 a user mistake
(configuration, impossible GPU plan, a supervisor already running), one line on stderr, no traceback;
3 ``status``: no supervisor is running; 128+N the supervisor was stopped by signal N (143 SIGTERM, 130 SIGINT).

This module only parses and dispatches. The work is done in :mod:`supervisor.live` (status, the live
table), :mod:`supervisor.statusview` (the status table), :mod:`supervisor.logview` (logs),
:mod:`supervisor.validate`, :mod:`supervisor.detach` (``--detach``) and :mod:`supervisor.report`; what a
terminal shows goes through :mod:`supervisor.terminal` (rich, plain text in a pipe, values escaped).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import time
from collections import deque
from typing import Iterable

import yaml

from node.config import resolve_config
from node.logs import configure_logging
from node.signing import KEY_ENV, KEY_FILE_ENV, KeyProblem, resolve_key
from sapo.config import ConfigError
from supervisor import detach, live, logview, procs, validate
from supervisor.daemon import Supervisor
from supervisor.gpu_plan import PlanError
from supervisor.launch import host_id, joiner_config
from supervisor.runfiles import AlreadyRunning, RuntimePaths, running_supervisor
from supervisor.status import read_status
from supervisor.systemd import render_unit, unit_name
from supervisor.terminal import console_for

NODE_COMMAND_ENV = "SWARM_NODE_COMMAND"  # tests and the bench run a fake node through this


class CommandError(Exception):
    """A user mistake: printed as one line on stderr, exit ``code`` (2 by default), no traceback."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- shared argument handling

def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="the experiment's YAML file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field (repeatable), as the nodes get it")


def _load(args, extra: Iterable[str] = ()):
    overrides = [*args.sets, *extra]
    return resolve_config(args.config, overrides=overrides), overrides


def _node_command() -> list[str] | None:
    raw = os.environ.get(NODE_COMMAND_ENV, "").strip()
    return shlex.split(raw) if raw else None


# --------------------------------------------------------------------------- the commands

def _join_host(args) -> str | None:
    """A joining host's id (``--join``, ``--host-id``), or None on the first host."""
    if not getattr(args, "join", False):
        if getattr(args, "host_id", None) is not None:
            raise CommandError("--host-id names a joining host: use it with --join")
        return None
    return host_id(args.host_id)


def _paths(args, config) -> RuntimePaths:
    return RuntimePaths.for_config(config, _join_host(args))


def cmd_launch(args) -> int:
    host = _join_host(args)
    # A joiner's --workers is its own count: the nodes keep the experiment's config (workers: names worker_1..N).
    extra = [f"supervisor.workers={args.workers}"] if args.workers is not None and host is None else []
    config, overrides = _load(args, extra)
    paths = RuntimePaths.for_config(config, host)
    pid = running_supervisor(paths)
    if pid is not None:
        raise AlreadyRunning(pid, paths.root)
    kwargs = dict(config_path=args.config, overrides=overrides, node_command=_node_command(),
                  environ=_environ_with_key(args.key_file, paths.root, join=host is not None),
                  runtime_dir=paths.root, host=host)
    if host is not None:
        if config.workers:
            print(f"swarm: note: the config's workers: entries name the first host's worker_1 ... worker_N; this "
                  f"host's workers ({host}-worker_1 ...) run the base config", file=sys.stderr)
        config = joiner_config(config, args.workers)
    if args.detach:
        return detach.launch_detached(config, kwargs, paths)
    console = console_for(sys.stdout) if sys.stderr.isatty() else None
    ring: deque = deque(maxlen=50)
    configure_logging(paths.supervisor_log, console="plain" if console is None else "none",
                      handlers=() if console is None else (live.RingHandler(ring),))
    sup = Supervisor(config, **kwargs)
    rc = sup.run() if console is None else live.run_live(sup, console, ring)
    print(f"swarm: supervisor exited with code {rc}: {sup.summary_line()}", file=sys.stderr)
    return rc


def _environ_with_key(key_file: str | None, runtime_dir, *, join: bool = False) -> dict[str, str]:
    """The supervisor's environment for its nodes: ours plus the experiment key (``--key-file``, ``$SWARM_KEY``,
    ``$SWARM_KEY_FILE``, or ``<runtime dir>/swarm.key``, created at the first launch) as ``$SWARM_KEY``. Only
    the nodes get it (each logs its fingerprint as experiment_key); this process's own environment, which
    tracker and hook subprocesses inherit, does not. A bad key is a configuration error before anything
    starts; on a joining host (``join``) so is none: it must be given the first host's key, never make one."""
    try:
        key, _ = resolve_key(key_file=key_file, runtime_dir=runtime_dir, create=not join)
    except KeyProblem as err:
        raise ConfigError("--key-file", str(err)) from None
    if key is None:
        raise CommandError(
            "a joining host needs the experiment's key and was given none: copy swarm.key from the first host's "
            "runtime dir (`swarm status CONFIG --json` there prints runtime_dir) to this machine, chmod 600 it, and "
            f"pass --key-file PATH (or put it at {runtime_dir}/swarm.key, or set $SWARM_KEY to its contents)")
    environ = {k: v for k, v in os.environ.items() if k != KEY_FILE_ENV}
    environ[KEY_ENV] = key.hex()
    return environ


def cmd_status(args) -> int:
    config, _ = _load(args)
    return live.show_status(_paths(args, config), config.experiment.name, as_json=args.json,
                            watch=args.watch, console=console_for(sys.stdout), config=config, key_file=args.key_file)


def cmd_stop(args) -> int:
    config, _ = _load(args)
    paths = _paths(args, config)
    pid = running_supervisor(paths)
    if pid is None:
        print(f"No supervisor is running for experiment {config.experiment.name!r}; nothing to stop.")
        return 0
    timeout = args.timeout if args.timeout is not None else config.supervisor.stop_timeout_s + 30
    os.kill(pid, signal.SIGTERM)
    print(f"Sent SIGTERM to supervisor pid {pid}; waiting up to {timeout:g} s for the nodes to checkpoint "
          f"and exit...", flush=True)
    deadline = time.monotonic() + timeout
    while procs.is_alive(pid):
        if time.monotonic() > deadline:
            print(f"swarm: supervisor pid {pid} is still running after {timeout:g} s; "
                  f"`kill -9 {pid}` kills it and every node (they die with it)", file=sys.stderr)
            return 1
        time.sleep(0.1)
    st = read_status(paths) or {}
    print(f"Stopped: supervisor exit code {st.get('exit_code', '?')} ({st.get('summary', 'no status')}).")
    return 0


def cmd_logs(args) -> int:
    config, _ = _load(args)
    try:
        return logview.show_logs(_paths(args, config), config, node=args.node, lines=args.lines,
                                 keep_following=args.follow, console=console_for(sys.stdout))
    except logview.UnknownNode as err:
        raise CommandError(str(err)) from None


def cmd_validate(args) -> int:
    config, _ = _load(args)
    return validate.show_checks(str(config.experiment_dir), validate.validate_experiment(config),
                                console_for(sys.stdout))


# --------------------------------------------------------------------------- config / systemd-unit

def cmd_config(args) -> int:
    if args.schema:  # the file's JSON Schema: needs no valid config (editors validate configs with it)
        from node.config import config_json_schema

        sys.stdout.write(json.dumps(config_json_schema(), indent=2) + "\n")
        return 0
    config, _ = _load(args)
    sys.stdout.write(yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False))
    return 0


def cmd_systemd_unit(args) -> int:
    host = _join_host(args)
    config, overrides = _load(args)
    if host is not None:
        config = joiner_config(config, args.workers)
    elif args.workers is not None or args.key_file is not None:
        raise CommandError("--workers and --key-file go into a joining host's unit: use them with --join "
                           "(the first host's: --set supervisor.workers=N; its key is its runtime dir's swarm.key)")
    if args.name_only:
        print(unit_name(config, host))
        return 0
    sys.stdout.write(render_unit(config, config_path=args.config, overrides=overrides, user=args.user, host=host,
                                 key_file=args.key_file))
    return 0


def cmd_export(args) -> int:
    config, _ = _load(args)
    # A refusal is this command's one error line; the store's warnings about it go nowhere (not to stderr).
    configure_logging(None, console="none", handlers=(logging.NullHandler(),))
    import transformers  # torch and transformers: only for this command

    from node.export import ExportError, export_checkpoint

    transformers.utils.logging.set_verbosity_error()  # one line of our own, no progress bars
    transformers.utils.logging.disable_progress_bar()
    try:
        done = export_checkpoint(config, args.node, out=args.out, round_=args.round, key_file=args.key_file,
                                 force=args.force)
    except ExportError as err:
        raise CommandError(str(err)) from None
    print(f"Exported {done.node} round {done.round} ({done.model}, {done.dtype}, sha256 {done.sha256[:12]}) "
          f"to {done.out}")
    return 0


# --------------------------------------------------------------------------- main

def _command(sub, name: str, func, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand taking CONFIG and --set, run by ``func(args)``."""
    p = sub.add_parser(name, help=help, description=description)
    _config_args(p)
    p.set_defaults(func=func)
    return p


def _join_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--join", action="store_true", help=what)
    p.add_argument("--host-id", metavar="NAME", help="with --join: this host's id, the prefix of its worker ids "
                   "(default: the hostname as a plain name)")


def _run_commands(sub) -> None:
    """launch, status, stop, logs: the running swarm."""
    p = _command(sub, "launch", cmd_launch, "start the coordinator and N workers under the supervisor",
                 "Start the swarm and supervise it: restarts crashed or hung nodes, exits 0 when the experiment "
                 "finished. Foreground with a live status table on a terminal (plain log lines otherwise), "
                 "or --detach. With --join, this machine joins an experiment whose coordinator runs on another "
                 "host sharing the directory: workers only, named <host>-worker_K, started once the experiment "
                 "exists, with the first host's key (--key-file, $SWARM_KEY).")
    p.add_argument("--workers", type=int, metavar="N", help="number of workers (= --set supervisor.workers=N; with "
                   "--join: this host's workers, default supervisor.workers)")
    _join_args(p, "join a running experiment from another machine: workers only, no coordinator (needs the first "
               "host's key)")
    p.add_argument("--detach", action="store_true",
                   help="run in the background (new session); prints its pid; logs in the runtime dir")
    p.add_argument("--key-file", metavar="PATH",
                   help="the experiment key to sign and verify shared-dir files with (default: "
                   "<runtime dir>/swarm.key, created at the first launch; env SWARM_KEY, SWARM_KEY_FILE)")
    p = _command(sub, "status", cmd_status, "show the supervisor's status (per-node state, round, memory)",
                 "Show status.json of the running supervisor, or say that none runs. "
                 "Exit code 0 when a supervisor runs, 3 when none does.")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--watch", action="store_true", help="redraw every second until Ctrl-C")
    _join_args(p, "the joining host's supervisor (swarm launch --join)")
    p.add_argument("--key-file", metavar="PATH", help="the experiment key, to verify the swarm's peer records (default "
                   "as the nodes: env SWARM_KEY, SWARM_KEY_FILE, then <runtime dir>/swarm.key)")
    p = _command(sub, "stop", cmd_stop, "stop the supervisor gracefully (nodes checkpoint first)",
                 "SIGTERM the supervisor; it SIGTERMs every node, waits stop_timeout_s for checkpoints, then "
                 "SIGKILLs. Waits for it to exit.")
    p.add_argument("--timeout", type=float, metavar="S", help="wait at most S seconds (default stop_timeout_s + 30)")
    _join_args(p, "the joining host's supervisor (swarm launch --join)")
    p = _command(sub, "logs", cmd_logs, "merged, readable logs of every node (or one)",
                 "Print the last lines of every node's logs merged by time, each prefixed with its node id; "
                 "-f keeps following.")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until Ctrl-C")
    p.add_argument("--node", metavar="ID", help="only this node (coordinator, worker_1, ..., supervisor)")
    p.add_argument("-n", "--lines", type=int, default=50, metavar="N", help="lines of history to print (50)")
    _join_args(p, "the joining host's logs (swarm launch --join)")


def _file_commands(sub) -> None:
    """validate, config, systemd-unit, export, report: files about the experiment."""
    _command(sub, "validate", cmd_validate, "check a finished experiment directory (pass/fail table)",
             "Check that the state reached max_rounds and finished, that every worker has one metrics line per "
             "round, rollout files for every round it trained and training events, and that every file parses. "
             "Exit 0 pass, 1 fail.")
    p = _command(sub, "config", cmd_config, "print the resolved config (file + env + --set) as YAML",
                 "Print the configuration the nodes would run with, as YAML; with --schema, the JSON Schema of "
                 "the YAML file instead (for editors' validation).")
    p.add_argument("--schema", action="store_true", help="print the config file's JSON Schema and exit")
    p = _command(sub, "systemd-unit", cmd_systemd_unit, "print a systemd unit file for this experiment",
                 "Print a Type=notify unit running `swarm launch CONFIG` with this venv's python; "
                 "scripts/install_service.sh installs it.")
    p.add_argument("--user", help="User= of the service (default: you)")
    p.add_argument("--name-only", action="store_true", help="print only the unit's file name")
    _join_args(p, "a joining host's unit: swarm launch CONFIG --join --host-id NAME --workers N")
    p.add_argument("--workers", type=int, metavar="N", help="with --join: this host's workers")
    p.add_argument("--key-file", metavar="PATH", help="with --join: the first host's key, copied here (the path "
                   "goes into the unit, never the key)")
    p = _command(sub, "export", cmd_export, "write one node's checkpoint as a Hugging Face model directory",
                 "Take NODE's newest checkpoint listed in its signed index (or --round R), check its size, sha256, "
                 "zip archive and tensor shapes, load it into the model the worker builds (model.name, dtype) and "
                 "write it with save_pretrained, tokenizer included, plus sapo_export.json (where it came from). "
                 "AutoModelForCausalLM.from_pretrained(DIR) and AutoTokenizer.from_pretrained(DIR) load it.")
    p.add_argument("--node", required=True, metavar="ID", help="the worker whose model to export, e.g. worker_1")
    p.add_argument("--round", type=int, metavar="R", help="this round's checkpoint (it must be listed in the index)")
    p.add_argument("--out", required=True, metavar="DIR", help="the directory to write (new or empty)")
    p.add_argument("--force", action="store_true", help="write into a DIR that is not empty")
    p.add_argument("--key-file", metavar="PATH",
                   help="the experiment key (default as the nodes: env SWARM_KEY, SWARM_KEY_FILE, then "
                   "<runtime dir>/swarm.key)")
    from supervisor import report  # matplotlib is imported lazily, only when a report is drawn

    p = sub.add_parser("report", help="plots and a cumulative-reward table comparing experiments",
                       description=report.DESCRIPTION)
    report.add_arguments(p)
    p.set_defaults(func=report.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm", description="\n\n".join(__doc__.split("\n\n")[i] for i in (0, 2, 3)),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _run_commands(sub)
    _file_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``swarm`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or an argparse usage error (already printed)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        return int(args.func(args))
    except CommandError as err:
        print(f"swarm: {err}", file=sys.stderr)
        return err.code
    except ConfigError as err:
        print(f"swarm: configuration error: {err}", file=sys.stderr)
        return 2
    except PlanError as err:
        print(f"swarm: GPU plan refused: {err}", file=sys.stderr)
        return 2
    except AlreadyRunning as err:
        print(f"swarm: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `swarm logs | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
