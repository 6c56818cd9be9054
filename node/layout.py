"""Every path of the shared experiment directory, in one place (DESIGN.md §3, the seeds' layout).

Paths relative to the experiment directory ``<root>/experiments/<name>/``::

    state/current_state.json              coordinator only (RoundState)
    state/config.json                     first launcher (ConfigSnapshot)
    state/supervisor/                     the supervisor's status file etc.
    peers/<node>.json                     that node (PeerRecord)
    rollouts/round_R/stage_S/<node>.json  that node (RolloutFile)
    rewards/round_R/stage_S/<node>.json   that node (RoundResult)
    checkpoints/round_R/<node>.pt         that node
    logs/<node>/metrics.jsonl             that node
    logs/<node>/training_events.jsonl     that node
    logs/coordinator/round_switches.jsonl the coordinator: how long each round switch took
    quarantine/                           what a peer planted at a node's own path, moved aside
                                          (node.fsio.quarantine; never read, never deleted by us)

and beside ``experiments/``: ``<root>/archives/<name>/{rollouts,rewards}/round_R/`` (retention).

This module only computes paths (and lists round directories); it never reads or writes file contents,
which is :mod:`node.storage`'s job. Every node id is checked with
:func:`node.config.plain_name_problem`, and every path is checked, without resolving symlinks, to stay
inside the experiment (or archive) directory, so no id from an untrusted file can point elsewhere.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from node.config import plain_name_problem

# Strict: ASCII digits, no sign, no leading zeros (``round_05`` would alias ``round_5``), at most 9 digits.
_ROUND_DIR = re.compile(r"round_(0|[1-9][0-9]{0,8})")
_STAGE_DIR = re.compile(r"stage_(0|[1-9][0-9]{0,8})")

# Directory kinds that hold ``round_R`` subdirectories.
ROUND_KINDS = ("rollouts", "rewards", "checkpoints")
ARCHIVE_KINDS = ("rollouts", "rewards")


def parse_round_dir(name: str) -> int | None:
    """``"round_12"`` -> 12; anything else (``round_012``, ``round_-1``, ``round_1.tmp``) -> None."""
    m = _ROUND_DIR.fullmatch(name)
    return int(m.group(1)) if m else None


def parse_stage_dir(name: str) -> int | None:
    """``"stage_0"`` -> 0; anything else -> None (same strict rules as :func:`parse_round_dir`)."""
    m = _STAGE_DIR.fullmatch(name)
    return int(m.group(1)) if m else None


def check_node_id(node_id: object) -> str:
    """``node_id`` itself when it is a plain name; ValueError naming the problem otherwise."""
    if not isinstance(node_id, str):
        raise ValueError(f"node id must be a string, got {type(node_id).__name__}")
    problem = plain_name_problem(node_id)
    if problem:
        raise ValueError(f"node id {node_id!r} {problem}")
    return node_id


def _check_index(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > 999_999_999:
        raise ValueError(f"{what} must be an integer in [0, 999999999], got {value!r}")
    return value


def _inside(base: Path, path: Path) -> Path:
    """``path`` when its normalised form stays under ``base`` (no symlink resolution); else ValueError."""
    b = os.path.normpath(os.fspath(base))
    p = os.path.normpath(os.fspath(path))
    if p != b and not p.startswith(b.rstrip(os.sep) + os.sep):
        raise ValueError(f"path {p!r} escapes {b!r}")
    return path


@dataclass(frozen=True)
class ExperimentLayout:
    """Paths of one experiment. ``root`` is ``<shared>/experiments/<name>``; ``archive_root`` defaults to
    ``<shared>/archives/<name>``."""

    root: Path
    archive_root: Path | None = None

    def __post_init__(self):
        root = Path(self.root)
        object.__setattr__(self, "root", root)
        if self.archive_root is None:
            object.__setattr__(self, "archive_root", root.parent.parent / "archives" / root.name)
        else:
            object.__setattr__(self, "archive_root", Path(self.archive_root))

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def for_experiment(cls, shared_root: str | os.PathLike, name: str) -> "ExperimentLayout":
        """The layout of experiment ``name`` under the shared directory (``GDRIVE_PATH``)."""
        problem = plain_name_problem(name) if isinstance(name, str) else "must be a string"
        if problem:
            raise ValueError(f"experiment name {name!r} {problem}")
        shared = Path(shared_root).expanduser()
        return cls(shared / "experiments" / name, shared / "archives" / name)

    @classmethod
    def from_config(cls, config) -> "ExperimentLayout":
        """From a :class:`node.config.ExperimentConfig` (its ``experiment.root`` and ``experiment.name``)."""
        return cls.for_experiment(config.experiment.root, config.experiment.name)

    @property
    def name(self) -> str:
        return self.root.name

    def _p(self, *parts: str) -> Path:
        return _inside(self.root, self.root.joinpath(*parts))

    # -- state ----------------------------------------------------------------------------------------
    def state_dir(self) -> Path:
        return self._p("state")

    def state_file(self) -> Path:
        """``state/current_state.json``: written by the coordinator only."""
        return self._p("state", "current_state.json")

    def config_file(self) -> Path:
        """``state/config.json``: the resolved config, written once by the first launcher."""
        return self._p("state", "config.json")

    def supervisor_dir(self) -> Path:
        """``state/supervisor/``: the supervisor's status file and friends."""
        return self._p("state", "supervisor")

    # -- peers ----------------------------------------------------------------------------------------
    def peers_dir(self) -> Path:
        return self._p("peers")

    def peer_file(self, node_id: str) -> Path:
        """``peers/<node>.json``: role, pid, heartbeat, round, progress."""
        return self._p("peers", f"{check_node_id(node_id)}.json")

    # -- rollouts and round results ---------------------------------------------------------------
    def round_dir(self, kind: str, round: int) -> Path:
        """``<kind>/round_R`` for kind in :data:`ROUND_KINDS`."""
        if kind not in ROUND_KINDS:
            raise ValueError(f"kind must be one of {', '.join(ROUND_KINDS)}; got {kind!r}")
        return self._p(kind, f"round_{_check_index(round, 'round')}")

    def rollouts_dir(self, round: int, stage: int) -> Path:
        """``rollouts/round_R/stage_S``."""
        return self._p("rollouts", f"round_{_check_index(round, 'round')}", f"stage_{_check_index(stage, 'stage')}")

    def rollout_file(self, round: int, stage: int, node_id: str) -> Path:
        """``rollouts/round_R/stage_S/<node>.json``."""
        return _inside(self.root, self.rollouts_dir(round, stage) / f"{check_node_id(node_id)}.json")

    def rewards_dir(self, round: int, stage: int) -> Path:
        """``rewards/round_R/stage_S``."""
        return self._p("rewards", f"round_{_check_index(round, 'round')}", f"stage_{_check_index(stage, 'stage')}")

    def reward_file(self, round: int, stage: int, node_id: str) -> Path:
        """``rewards/round_R/stage_S/<node>.json``: the node's round result (completion signal)."""
        return _inside(self.root, self.rewards_dir(round, stage) / f"{check_node_id(node_id)}.json")

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoints_dir(self, round: int) -> Path:
        """``checkpoints/round_R``."""
        return self.round_dir("checkpoints", round)

    def checkpoint_file(self, round: int, node_id: str) -> Path:
        """``checkpoints/round_R/<node>.pt``."""
        return _inside(self.root, self.checkpoints_dir(round) / f"{check_node_id(node_id)}.pt")

    # -- logs -----------------------------------------------------------------------------------------
    def logs_dir(self) -> Path:
        return self._p("logs")

    def log_dir(self, node_id: str) -> Path:
        """``logs/<node>/``."""
        return self._p("logs", check_node_id(node_id))

    def metrics_file(self, node_id: str) -> Path:
        """``logs/<node>/metrics.jsonl``: one line per (node, round)."""
        return _inside(self.root, self.log_dir(node_id) / "metrics.jsonl")

    def events_file(self, node_id: str) -> Path:
        """``logs/<node>/training_events.jsonl``."""
        return _inside(self.root, self.log_dir(node_id) / "training_events.jsonl")

    def round_switch_file(self, node_id: str = "coordinator") -> Path:
        """``logs/<coordinator>/round_switches.jsonl``: one line per round switch (its latency)."""
        return _inside(self.root, self.log_dir(node_id) / "round_switches.jsonl")

    # -- quarantine -----------------------------------------------------------------------------------
    def quarantine_dir(self) -> Path:
        """``quarantine/``: where a node moves what it finds planted at its own paths (a directory, FIFO,
        symlink, hard link, ...), so a write goes on into a fresh file and nothing is deleted."""
        return self._p("quarantine")

    # -- archives -------------------------------------------------------------------------------------
    def archive_dir(self, kind: str, round: int) -> Path:
        """``<shared>/archives/<name>/<kind>/round_R`` for kind in :data:`ARCHIVE_KINDS`."""
        if kind not in ARCHIVE_KINDS:
            raise ValueError(f"archive kind must be one of {', '.join(ARCHIVE_KINDS)}; got {kind!r}")
        base = self.archive_root
        assert base is not None
        return _inside(base, base / kind / f"round_{_check_index(round, 'round')}")

    def archive_rollouts_dir(self, round: int) -> Path:
        """``<shared>/archives/<name>/rollouts/round_R``."""
        return self.archive_dir("rollouts", round)

    # -- helpers ----------------------------------------------------------------------------------
    def fixed_dirs(self) -> tuple[Path, ...]:
        """The directories every experiment has (what :meth:`ensure_dirs` creates)."""
        return (
            self.state_dir(), self.supervisor_dir(), self.peers_dir(), self._p("rollouts"), self._p("rewards"),
            self._p("checkpoints"), self.logs_dir(), self.quarantine_dir(),
        )

    def ensure_dirs(self, makedirs: Callable[..., None] = os.makedirs) -> None:
        """Create the fixed directories (idempotent). ``makedirs(path, exist_ok=True)`` is injectable, e.g.
        a :class:`node.storage.SharedStore`'s ``makedirs`` with retries."""
        for d in self.fixed_dirs():
            makedirs(d, exist_ok=True)

    def rounds_present(self, kind: str, listdir: Callable[[Path], Iterable[str]] = os.listdir) -> list[int]:
        """Rounds that have a ``<kind>/round_R`` entry, sorted; other names are ignored; a missing
        directory gives ``[]``. Only names are parsed: whether an entry is a real directory is the
        caller's business (retention checks with lstat)."""
        if kind not in ROUND_KINDS:
            raise ValueError(f"kind must be one of {', '.join(ROUND_KINDS)}; got {kind!r}")
        try:
            names = listdir(self._p(kind))
        except (FileNotFoundError, NotADirectoryError):
            return []
        rounds = {r for r in (parse_round_dir(n) for n in names) if r is not None}
        return sorted(rounds)

    def relative(self, path: Path) -> str:
        """``path`` relative to the experiment dir, with '/' separators (ValueError when outside)."""
        _inside(self.root, Path(path))
        return Path(os.path.normpath(path)).relative_to(os.path.normpath(self.root)).as_posix()
