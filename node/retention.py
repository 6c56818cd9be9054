"""Retention of old rounds: the seeds' ROLLOUT_CLEANUP_ENABLED / ROLLOUT_KEEP_LAST_N_ROUNDS /
ROLLOUT_ARCHIVE_OLD, triggered when the coordinator advances a round (DESIGN.md §3).

For ``rollouts/`` and ``rewards/``, every ``round_R`` directory older than the last ``keep_last_n`` rounds
is deleted, or with ``archive`` moved to ``<shared>/archives/<name>/<kind>/round_R``: each file is copied
atomically (skipped when an identical-size copy is already there), and the source is deleted only once
every file of the round is archived. So an interrupted run leaves either the whole source or a complete
archive, and running again finishes the job (idempotent).

Guarantees: the current and the previous round are never touched, whatever ``keep_last_n`` says (it is
treated as at least 2), nor is any round ahead of ``current_round``. Symlinks are never followed: every
directory is opened relative to its parent's fd with ``O_NOFOLLOW`` (:mod:`node.fdtree`), so a round or
stage dir swapped for a symlink between listing and deleting is unlinked, never entered, and no path is
resolved twice (a symlink in a round dir is unlinked, not archived). Concurrent deletion is fine; a
transient error (retried first, as every store call) stops that round's work, is reported, and the next
call tries again. Runs under the store's ``retention`` lock; if another process holds it, the call returns
at once with ``skipped`` set.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path

import filelock
import structlog

from node import fdtree
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
    ops: fdtree.FdOps = fdtree.REAL_OPS,
) -> RetentionReport:
    """One retention pass over ``rollouts/`` and ``rewards/`` of ``store``'s experiment (see module doc).
    ``ops`` makes the fd-relative OS calls (a faulty double in tests); archive copies go through the store."""
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
        walk = _Walk(store, ops)
        done: dict[str, tuple[int, ...]] = {}
        kept: dict[str, tuple[int, ...]] = {}
        errors: list[str] = []
        for kind in ARCHIVE_KINDS:
            try:
                kind_fd = fdtree.open_dir(store.root, [kind], ops=ops, call=walk.call)
            except FileNotFoundError:
                done[kind], kept[kind] = (), ()
                continue
            except OSError as err:
                errors.append(f"{kind}: cannot list: {err}")
                log.warning("retention_list_failed", kind=kind, error=str(err))
                continue
            try:
                done[kind], kept[kind] = walk.kind(kind, kind_fd, current_round, keep_last_n, archive, errors)
            finally:
                ops.close(kind_fd)
            if done[kind]:
                log.info("retention_applied", kind=kind, rounds=list(done[kind]),
                         action="archived" if archive else "deleted", current_round=current_round)
        return RetentionReport(**base, deleted={} if archive else done, archived=done if archive else {}, kept=kept,
                               errors=tuple(errors))
    finally:
        lock.release()


class _Walk:
    """One pass's fd-relative walk: ``ops`` for the OS calls, the store's retry policy around each."""

    def __init__(self, store: SharedStore, ops: fdtree.FdOps):
        self.store, self.ops = store, ops
        self.call = store._retry  # the store's policy: transient errors retried as for every other call

    def kind(self, kind: str, kind_fd: int, current_round: int, keep_last_n: int, archive: bool,
             errors: list[str]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(rounds removed, rounds kept) of one kind directory; failures are appended to ``errors``."""
        try:
            names = fdtree.scan(kind_fd, ops=self.ops, call=self.call)
        except OSError as err:
            errors.append(f"{kind}: cannot list: {err}")
            log.warning("retention_list_failed", kind=kind, error=str(err))
            return (), ()
        rounds = sorted({r for r in (parse_round_dir(n) for n, _ in names) if r is not None})
        old = rounds_to_remove(rounds, current_round, keep_last_n)
        done: list[int] = []
        for r in old:
            name = f"round_{r}"
            try:
                if archive:
                    self.archive_round(kind_fd, name, self.store.layout.archive_dir(kind, r))
                fdtree.remove_entry(kind_fd, name, ops=self.ops, call=self.call)
            except (OSError, BadFile, ValueError) as err:
                errors.append(f"{kind}/{name}: {type(err).__name__}: {err}")
                log.warning("retention_round_failed", kind=kind, round=r, error=str(err))
                continue
            done.append(r)
        return tuple(done), tuple(r for r in rounds if r not in old)

    def archive_round(self, kind_fd: int, name: str, dst: Path) -> None:
        """Copy every regular file of the round dir ``name`` (stage dirs kept) to ``dst``; raise if any copy
        fails or any listing is unreachable (so the caller never deletes what it could not see). A round
        entry that is a symlink or a plain file is not archived (and then deleted as such)."""
        round_fd = self._open(kind_fd, name)
        if round_fd is None:
            return
        try:
            for stage_name, is_dir in fdtree.scan(round_fd, ops=self.ops, call=self.call):
                stage_fd = self._open(round_fd, stage_name) if is_dir and parse_stage_dir(stage_name) is not None \
                    else None
                if stage_fd is None:
                    log.warning("retention_entry_not_archived", path=f"{name}/{stage_name}",
                                reason="not a stage directory")
                    continue
                try:
                    for file_name, _ in fdtree.scan(stage_fd, ops=self.ops, call=self.call):
                        if not file_name.startswith("."):  # temp files of interrupted writes
                            self.archive_file(stage_fd, file_name, dst / stage_name / file_name)
                finally:
                    self.ops.close(stage_fd)
        finally:
            self.ops.close(round_fd)

    def _open(self, dir_fd: int, name: str) -> int | None:
        """The directory ``name`` in ``dir_fd``; None when it is gone, a symlink or no directory."""
        try:
            return fdtree.open_child(dir_fd, name, ops=self.ops, call=self.call)
        except FileNotFoundError:
            return None
        except OSError as err:
            if fdtree.is_not_a_dir(err):
                return None
            raise

    def archive_file(self, stage_fd: int, name: str, dst: Path) -> None:
        try:
            data = fdtree.read_file_at(stage_fd, name, self.store.max_file_bytes, ops=self.ops, call=self.call)
        except FileNotFoundError:  # deleted meanwhile
            return
        except BadFile as bad:  # a symlink, a fifo, over the size cap...: garbage, not archived
            log.warning("retention_entry_not_archived", path=str(dst), reason=bad.reason)
            return
        have = self.store.lstat(dst, raise_unreachable=True)
        if have is not None and stat.S_ISREG(have.st_mode) and have.st_size == len(data):
            return  # copied by an earlier, interrupted pass
        self.store.write_bytes_atomic(dst, data, retries=True)
