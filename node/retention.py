"""Retention of old rounds: the seeds' ROLLOUT_CLEANUP_ENABLED / ROLLOUT_KEEP_LAST_N_ROUNDS /
ROLLOUT_ARCHIVE_OLD, triggered when the coordinator advances a round (DESIGN.md §3).

For ``rollouts/`` and ``rewards/``, every ``round_R`` directory older than the last ``keep_last_n`` rounds
is deleted, or with ``archive`` moved to ``<shared>/archives/<name>/<kind>/round_R``: each file is copied
atomically (skipped when an identical-size copy is already there), and the source is deleted only once
every file of the round is archived. So an interrupted run leaves either the whole source or a complete
archive, and running again finishes the job (idempotent).

Guarantees: the current and the previous round are never touched, whatever ``keep_last_n`` says (it is
treated as at least 2), nor is any round ahead of ``current_round``. Symlinks are never followed (a
symlink in a round dir is unlinked, not archived). Concurrent deletion is fine; a transient error stops
that round's work, is reported, and the next call tries again. Runs under the store's ``retention`` lock;
if another process holds it, the call returns at once with ``skipped`` set.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path

import filelock
import structlog

from node.fsio import BadFile
from node.layout import ARCHIVE_KINDS, parse_round_dir, parse_stage_dir
from node.storage import SharedStore

log = structlog.get_logger(__name__)

MIN_KEEP = 2  # the current round and the previous one


@dataclass(frozen=True)
class RetentionReport:
    """What one retention pass did. Rounds are listed per kind, e.g. ``deleted["rollouts"] == (1, 2)``."""

    current_round: int
    enabled: bool
    archive: bool
    keep_last_n: int
    skipped: str = ""  # why nothing was done ("disabled", "locked by another process"), else ""
    deleted: dict[str, tuple[int, ...]] = field(default_factory=dict)
    archived: dict[str, tuple[int, ...]] = field(default_factory=dict)
    kept: dict[str, tuple[int, ...]] = field(default_factory=dict)
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


def rounds_to_remove(rounds: list[int] | tuple[int, ...], current_round: int, keep_last_n: int) -> list[int]:
    """The rounds retention may remove: older than the last ``max(keep_last_n, 2)`` rounds up to
    ``current_round`` (so never the current or the previous one, nor anything ahead)."""
    keep = max(int(keep_last_n), MIN_KEEP)
    oldest_kept = current_round - keep + 1
    return sorted(r for r in rounds if r < oldest_kept)


def apply_retention(
    store: SharedStore,
    current_round: int,
    *,
    enabled: bool,
    keep_last_n: int,
    archive: bool,
    lock_timeout: float = 0.0,
) -> RetentionReport:
    """One retention pass over ``rollouts/`` and ``rewards/`` of ``store``'s experiment (see module doc)."""
    if type(current_round) is not int or current_round < 0:
        raise ValueError(f"current_round must be a non-negative integer, got {current_round!r}")
    base = dict(current_round=current_round, enabled=enabled, archive=archive, keep_last_n=keep_last_n)
    if not enabled:
        return RetentionReport(**base, skipped="disabled")
    lock = store.lock("retention", timeout=lock_timeout)
    try:
        lock.acquire()
    except filelock.Timeout:
        log.info("retention_skipped", reason="locked by another process", round=current_round)
        return RetentionReport(**base, skipped="locked by another process")
    try:
        deleted: dict[str, tuple[int, ...]] = {}
        archived: dict[str, tuple[int, ...]] = {}
        kept: dict[str, tuple[int, ...]] = {}
        errors: list[str] = []
        for kind in ARCHIVE_KINDS:
            kind_dir = store.root / kind
            try:
                names = store.listdir(kind_dir, raise_unreachable=True)
            except OSError as err:
                errors.append(f"{kind}: cannot list: {err}")
                log.warning("retention_list_failed", kind=kind, error=str(err))
                continue
            rounds = sorted({r for r in (parse_round_dir(n) for n in names) if r is not None})
            old = rounds_to_remove(rounds, current_round, keep_last_n)
            kept[kind] = tuple(r for r in rounds if r not in old)
            done: list[int] = []
            for r in old:
                src = store.layout.round_dir(kind, r)
                try:
                    if archive:
                        _archive_round(store, src, store.layout.archive_dir(kind, r))
                    store.remove_tree(src)
                except (OSError, BadFile, ValueError) as err:
                    msg = f"{kind}/round_{r}: {type(err).__name__}: {err}"
                    errors.append(msg)
                    log.warning("retention_round_failed", kind=kind, round=r, error=str(err))
                    continue
                done.append(r)
            (archived if archive else deleted)[kind] = tuple(done)
            if done:
                log.info("retention_applied", kind=kind, rounds=done, action="archived" if archive else "deleted",
                         current_round=current_round)
        return RetentionReport(**base, deleted=deleted, archived=archived, kept=kept, errors=tuple(errors))
    finally:
        lock.release()


def _archive_round(store: SharedStore, src: Path, dst: Path) -> None:
    """Copy every regular file under ``src`` to ``dst`` (stage dirs kept); raise if any copy fails or
    any listing is unreachable (so the caller never deletes what it could not see). A round directory
    that is a symlink or a plain file is not archived (and then deleted as such)."""
    st = store.lstat(src, raise_unreachable=True)
    if st is None or not stat.S_ISDIR(st.st_mode):
        return
    for stage_name in store.listdir(src, raise_unreachable=True):
        stage_src = src / stage_name
        sst = store.lstat(stage_src, raise_unreachable=True)
        if sst is None or not stat.S_ISDIR(sst.st_mode) or parse_stage_dir(stage_name) is None:
            if sst is not None:
                log.warning("retention_entry_not_archived", path=str(stage_src), reason="not a stage directory")
            continue
        for name in store.listdir(stage_src, raise_unreachable=True):
            if name.startswith("."):  # temp files of interrupted writes
                continue
            _archive_file(store, stage_src / name, dst / stage_name / name)


def _archive_file(store: SharedStore, src: Path, dst: Path) -> None:
    st = store.lstat(src, raise_unreachable=True)
    if st is None:  # deleted meanwhile
        return
    if not stat.S_ISREG(st.st_mode):
        log.warning("retention_entry_not_archived", path=str(src), reason="not a regular file")
        return
    have = store.lstat(dst, raise_unreachable=True)
    if have is not None and stat.S_ISREG(have.st_mode) and have.st_size == st.st_size:
        return  # copied by an earlier, interrupted pass
    try:
        data = store.read_bytes_strict(src)
    except FileNotFoundError:
        return
    except BadFile as bad:  # over the size cap, swapped for a symlink...: garbage, not archived
        log.warning("retention_entry_not_archived", path=str(src), reason=bad.reason)
        return
    store.write_bytes_atomic(dst, data, retries=True)
