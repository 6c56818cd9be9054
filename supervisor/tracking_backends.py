"""The trackers :mod:`supervisor.tracking` feeds: TensorBoard event files and W&B runs, optional packages.

Every tracker has the same small surface, called from the tracking thread only: ``write(entry)`` (one
node's scalars at one step), ``flush()`` (what was written is on disk, or handed to the tracker's own
process), ``resume_state()`` (JSON the next supervisor hands back as ``resume``) and ``close()``. An
exception from any of them disables that tracker (:mod:`supervisor.tracking`); the package is imported
only in the tracking thread, so a slow or broken install never holds up the supervisor's loop.

- :class:`TensorBoardTracker`: ``<experiment>/tensorboard/<node>/events.out.tfevents.*``, one directory (a
  TensorBoard "run") per node, one event per line: step = round, wall time = the line's timestamp, one
  ``simple_value`` per scalar. Written with TensorBoard's own ``EventFileWriter`` — the writer
  ``torch.utils.tensorboard.SummaryWriter`` wraps — so the supervisor never imports torch. Exactly once
  across supervisor restarts: the state file records each event file's size after every flush, and the
  next supervisor cuts the previous file back to that size (the events of a batch written but not yet
  recorded are streamed again, never twice); a node whose earlier event file was deleted gets all its
  steps again (``lost_nodes``).
- :class:`WandbTracker`: one W&B run per node (name = node, ``group`` = experiment, ``job_type`` = worker),
  ``mode`` offline by default, run files under ``<experiment>/wandb/`` (``wandb sync`` them later). One run
  per node rather than one run with node prefixes because W&B compares runs: a group overlays the nodes on
  every chart under the same metric names, and each node's round is its own monotonic step (one run
  would need a step metric per node). The run id is stable per (experiment, node), so a restarted
  supervisor and a later ``wandb sync`` continue the same run; W&B ignores a step it has already passed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import stat
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

from supervisor.tracking_lines import Entry

TB_DIR = "tensorboard"


def missing_package(module: str | None) -> bool:
    """True when ``module`` cannot be imported here (looked up, not imported: no cost at launch)."""
    if module is None:
        return False
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


class TensorBoardTracker:
    """Event files per node under ``<experiment>/tensorboard/`` (see the module docstring). ``resume``: the
    previous supervisor's :meth:`resume_state`; ``confine(path)`` refuses a path leading out of the
    experiment (a planted symlink) with ValueError."""

    name = "tensorboard"
    module = "tensorboard"

    def __init__(self, *, experiment_dir: Path, nodes: Iterable[str], resume: dict, confine: Callable[[Path], Path],
                 log: Any, **_settings):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        self.root = Path(experiment_dir) / TB_DIR
        self.log = log
        previous = resume.get("files") if isinstance(resume.get("files"), dict) else {}
        self._writers: dict[str, Any] = {}
        self._files: dict[str, Path] = {}
        self._committed: dict[str, dict] = {}
        self.lost_nodes: set[str] = set()  # nodes whose earlier event file is gone: streamed again from round 0
        for node in nodes:
            directory = confine(self.root / node / "events").parent  # the node's directory too
            if _cut_back(directory, previous.get(node), log) == "gone":
                self.lost_nodes.add(node)
            suffix = f".{uuid.uuid4().hex[:12]}"  # names our new file among any others in the directory
            self._writers[node] = EventFileWriter(str(directory), flush_secs=3600, filename_suffix=suffix)
            self._files[node] = next(directory / n for n in os.listdir(directory) if n.endswith(suffix))
            self._committed[node] = {"name": self._files[node].name, "size": os.lstat(self._files[node]).st_size}

    def write(self, entry: Entry) -> None:
        values = [self._summary.Value(tag=tag, simple_value=v) for tag, v in entry.scalars.items()]
        event = self._event(wall_time=entry.wall_time, step=entry.step, summary=self._summary(value=values))
        self._writers[entry.node].add_event(event)

    def flush(self) -> None:
        for node, writer in self._writers.items():
            writer.flush()
            self._committed[node]["size"] = os.lstat(self._files[node]).st_size

    def resume_state(self) -> dict:
        return {"files": {node: dict(c) for node, c in self._committed.items()}}

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()


def _cut_back(directory: Path, committed: Any, log: Any) -> str | None:
    """Cut the previous supervisor's event file back to the size its state file recorded: the bytes after
    it are events of a batch whose steps were never recorded, and are about to be written again. "gone"
    when that file no longer exists (someone deleted the event files to have them written again)."""
    if not (isinstance(committed, dict) and isinstance(committed.get("name"), str)
            and type(committed.get("size")) is int and committed["size"] >= 0):
        return None
    name = committed["name"]
    if os.sep in name or name.startswith("."):
        return None
    path = directory / name
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return "gone"
    except OSError:
        return None  # not ours any more: nothing to cut
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size > committed["size"]:
            os.ftruncate(fd, committed["size"])
            log.info("tracking_uncommitted_events_cut", path=str(path), size=st.st_size, cut_to=committed["size"])
    finally:
        os.close(fd)
    return None


class WandbTracker:
    """One W&B run per node (see the module docstring); ``mode`` and ``project`` from ``tracking``."""

    name = "wandb"
    module = "wandb"

    def __init__(self, *, experiment_dir: Path, nodes: Iterable[str], experiment: str, project: str, mode: str,
                 log: Any, **_settings):
        import wandb

        self._wandb = wandb
        self.dir = Path(experiment_dir)
        self._runs: dict[str, Any] = {}
        settings = wandb.Settings(console="off", silent=True, disable_git=True, save_code=False, x_disable_stats=True)
        for node in nodes:
            self._runs[node] = wandb.init(
                project=project, group=experiment, name=node, job_type="worker", id=run_id(self.dir, experiment, node),
                dir=str(self.dir), mode=mode, resume="allow", reinit="create_new", settings=settings,
                config={"experiment": experiment, "node": node})

    def write(self, entry: Entry) -> None:
        self._runs[entry.node].log(entry.scalars, step=entry.step)

    def flush(self) -> None:
        """Nothing: ``run.log`` hands each step to W&B's own process, which writes it."""

    def resume_state(self) -> dict:
        return {}

    def close(self) -> None:
        try:
            for run in self._runs.values():
                run.finish()
        finally:
            self._wandb.teardown()  # ends W&B's service process: nothing outlives the supervisor


def run_id(experiment_dir: Path, experiment: str, node: str) -> str:
    """A W&B run id stable per (experiment directory, node): ``<experiment>-<node>-<8 hex>``."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(experiment_dir)) + b"\0" + node.encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{experiment[:40]}-{node[:40]}-{digest}")


BACKENDS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}  # report_to name -> tracker class
