"""node.retention: keep-last-N, archive, the current/previous-round guarantee, interrupted runs."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from node.layout import ExperimentLayout
from node.retention import apply_retention, rounds_to_remove
from node.fsio import RealFS
from node.storage import SharedStore


class HookFS(RealFS):
    """RealFS that calls ``hook(op, args)`` before every call; the hook may raise to inject a failure."""

    def __init__(self):
        self.hook = None


for _op in ("open", "read", "write", "fsync", "close", "fstat", "lstat", "stat", "replace", "listdir", "unlink",
            "rmdir", "makedirs"):
    def _make(name):
        real = getattr(RealFS, name)

        def method(self, *args, **kwargs):
            if self.hook is not None:
                self.hook(name, args)
            return real(self, *args, **kwargs)
        return method
    setattr(HookFS, _op, _make(_op))


@pytest.fixture
def layout(tmp_path) -> ExperimentLayout:
    layout = ExperimentLayout.for_experiment(tmp_path / "shared", "exp")
    layout.ensure_dirs()
    return layout


@pytest.fixture
def fs():
    return HookFS()


@pytest.fixture
def store(layout, tmp_path, fs) -> SharedStore:
    return SharedStore(layout, node_id="coordinator", lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool",
                       fs=fs, sleep=lambda s: None, retry_attempts=2)


def populate(layout: ExperimentLayout, rounds, nodes=("w1", "w2")) -> dict[Path, bytes]:
    content = {}
    for r in rounds:
        for n in nodes:
            for p in (layout.rollout_file(r, 0, n), layout.reward_file(r, 0, n)):
                p.parent.mkdir(parents=True, exist_ok=True)
                data = f'{{"round": {r}, "node": "{n}", "kind": "{p.parts[-4]}"}}'.encode()
                p.write_bytes(data)
                content[p] = data
    return content


def present(layout, kind="rollouts"):
    return layout.rounds_present(kind)


def test_rounds_to_remove_never_current_or_previous():
    assert rounds_to_remove(list(range(10)), 9, 3) == [0, 1, 2, 3, 4, 5, 6]
    for keep in (-5, 0, 1, 2):
        assert rounds_to_remove(list(range(10)), 9, keep) == list(range(8))
    assert rounds_to_remove([0, 1, 2, 20], 2, 2) == [0]  # rounds ahead of current are kept too
    assert rounds_to_remove([0, 1], 1, 2) == []


def test_keep_last_n_deletes_older_rounds(store, layout):
    populate(layout, range(10))
    populate(layout, [12])  # ahead of the coordinator's round: never touched
    rep = apply_retention(store, 9, enabled=True, keep_last_n=3, archive=False)
    assert rep.ok and rep.skipped == ""
    assert rep.deleted == {"rollouts": (0, 1, 2, 3, 4, 5, 6), "rewards": (0, 1, 2, 3, 4, 5, 6)}
    assert present(layout) == [7, 8, 9, 12] and present(layout, "rewards") == [7, 8, 9, 12]
    assert not layout.archive_root.exists()
    again = apply_retention(store, 9, enabled=True, keep_last_n=3, archive=False)
    assert again.deleted == {"rollouts": (), "rewards": ()}


@pytest.mark.parametrize("keep", [0, 1, 2])
def test_current_and_previous_round_always_kept(store, layout, keep):
    populate(layout, range(6))
    rep = apply_retention(store, 5, enabled=True, keep_last_n=keep, archive=False)
    assert rep.ok
    assert present(layout) == [4, 5] and present(layout, "rewards") == [4, 5]
    rep = apply_retention(store, 5, enabled=True, keep_last_n=keep, archive=True)
    assert rep.ok and present(layout) == [4, 5]


def test_disabled_touches_nothing(store, layout):
    content = populate(layout, range(5))
    rep = apply_retention(store, 4, enabled=False, keep_last_n=2, archive=True)
    assert rep.skipped == "disabled"
    assert all(p.read_bytes() == data for p, data in content.items())


def test_archive_moves_old_rounds(store, layout):
    content = populate(layout, range(5))
    rep = apply_retention(store, 4, enabled=True, keep_last_n=2, archive=True)
    assert rep.ok and rep.archived == {"rollouts": (0, 1, 2), "rewards": (0, 1, 2)}
    assert present(layout) == [3, 4]
    for p, data in content.items():
        rel = p.relative_to(layout.root)
        kind, round_dir = rel.parts[0], rel.parts[1]
        r = int(round_dir.split("_")[1])
        if r <= 2:
            assert not p.exists()
            archived = layout.archive_dir(kind, r) / Path(*rel.parts[2:])
            assert archived.read_bytes() == data
        else:
            assert p.read_bytes() == data
    assert layout.archive_rollouts_dir(0).is_dir()


def test_interrupted_archive_is_finished_by_a_rerun(store, layout, fs):
    content = populate(layout, range(4), nodes=("w1", "w2", "w3"))
    calls = {"replace": 0}

    def crash_midway(op, args):  # the 4th archive copy dies (a non-transient error: no retry)
        if op == "replace":
            calls["replace"] += 1
            if calls["replace"] == 4:
                raise OSError(errno.EACCES, "simulated crash")

    fs.hook = crash_midway
    rep = apply_retention(store, 3, enabled=True, keep_last_n=2, archive=True)
    assert not rep.ok and rep.errors
    # Nothing was deleted that was not archived: every source of an unfinished round is still there.
    for p, data in content.items():
        r = int(p.relative_to(layout.root).parts[1].split("_")[1])
        assert p.exists() or (layout.archive_dir(p.relative_to(layout.root).parts[0], r) / "stage_0" / p.name).exists()
    fs.hook = None
    rep2 = apply_retention(store, 3, enabled=True, keep_last_n=2, archive=True)
    assert rep2.ok
    assert present(layout) == [2, 3] and present(layout, "rewards") == [2, 3]
    for p, data in content.items():
        rel = p.relative_to(layout.root)
        r = int(rel.parts[1].split("_")[1])
        if r < 2:
            assert (layout.archive_dir(rel.parts[0], r) / "stage_0" / p.name).read_bytes() == data
    archive_files = [p for p in layout.archive_root.rglob("*") if p.is_file()]
    assert len(archive_files) == 2 * 2 * 3  # 2 rounds x 2 kinds x 3 nodes, no temp files left


def test_interrupted_delete_after_copy(store, layout, fs):
    populate(layout, range(4))

    def no_unlink(op, args):
        if op == "unlink":
            raise OSError(errno.EPERM, "simulated")

    fs.hook = no_unlink
    rep = apply_retention(store, 3, enabled=True, keep_last_n=2, archive=True)
    assert rep.errors and present(layout) == [0, 1, 2, 3]
    fs.hook = None
    assert apply_retention(store, 3, enabled=True, keep_last_n=2, archive=True).ok
    assert present(layout) == [2, 3]
    assert len([p for p in layout.archive_root.rglob("*.json")]) == 2 * 2 * 2


def test_transient_errors_reported_not_raised(store, layout, fs):
    content = populate(layout, range(5))

    def flaky(op, args):
        if op in ("unlink", "rmdir", "open"):
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    fs.hook = flaky
    rep = apply_retention(store, 4, enabled=True, keep_last_n=2, archive=False)
    assert rep.errors and all(p.exists() for p in content)
    fs.hook = None
    assert apply_retention(store, 4, enabled=True, keep_last_n=2, archive=False).ok
    assert present(layout) == [3, 4]


def test_unreachable_listing_never_deletes_unarchived(store, layout, fs):
    content = populate(layout, range(4))
    failures = {"n": 0}

    def flaky_listing(op, args):  # listing a stage dir fails past the retries once, then the mount is back
        if op == "listdir" and Path(args[0]).name == "stage_0" and failures["n"] < 2:
            failures["n"] += 1
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    fs.hook = flaky_listing
    rep = apply_retention(store, 3, enabled=True, keep_last_n=2, archive=True)
    assert rep.errors
    for p, data in content.items():
        rel = p.relative_to(layout.root)
        r = int(rel.parts[1].split("_")[1])
        archived = layout.archive_dir(rel.parts[0], r) / "stage_0" / p.name
        assert p.exists() or archived.read_bytes() == data
    fs.hook = None
    assert apply_retention(store, 3, enabled=True, keep_last_n=2, archive=True).ok
    assert len(list(layout.archive_root.rglob("*.json"))) == 2 * 2 * 2


def test_concurrent_deletion_is_fine(store, layout, fs):
    populate(layout, range(5))

    def someone_else_deletes(op, args):
        if op == "listdir" and Path(args[0]).name == "round_1":
            shutil.rmtree(args[0])

    fs.hook = someone_else_deletes
    rep = apply_retention(store, 4, enabled=True, keep_last_n=2, archive=False)
    assert rep.ok, rep.errors
    assert present(layout) == [3, 4]


def test_symlinked_round_dir_is_unlinked_not_followed(store, layout, tmp_path):
    populate(layout, range(4))
    victim = tmp_path / "victim"
    (victim / "stage_0").mkdir(parents=True)
    (victim / "stage_0" / "precious.json").write_text("{}")
    shutil.rmtree(layout.root / "rollouts" / "round_0")
    os.symlink(victim, layout.root / "rollouts" / "round_0", target_is_directory=True)
    rep = apply_retention(store, 3, enabled=True, keep_last_n=2, archive=True)
    assert rep.ok, rep.errors
    assert (victim / "stage_0" / "precious.json").exists()
    assert not os.path.lexists(layout.root / "rollouts" / "round_0")
    assert not (layout.archive_rollouts_dir(0) / "stage_0" / "precious.json").exists()


def test_deep_hostile_tree_is_removed(store, layout):
    populate(layout, range(4))
    deep = layout.rollouts_dir(0, 0)
    for _ in range(1500):  # deeper than Python's recursion limit
        deep = deep / "d"
        os.mkdir(deep)
    assert apply_retention(store, 3, enabled=True, keep_last_n=2, archive=False).ok
    assert present(layout) == [2, 3]


def test_locked_by_another_process_skips(store, layout, tmp_path):
    populate(layout, range(5))
    other = SharedStore(layout, lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool2")
    with other.lock("retention"):
        rep = apply_retention(store, 4, enabled=True, keep_last_n=2, archive=False)
    assert rep.skipped == "locked by another process"
    assert present(layout) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        apply_retention(store, -1, enabled=True, keep_last_n=2, archive=False)
