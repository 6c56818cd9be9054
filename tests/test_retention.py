"""node.retention: keep-last-N, archive, the current/previous-round guarantee, interrupted runs, and
directories swapped for symlinks while retention works (node.fdtree: nothing outside is ever deleted)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from node import fdtree
from node.fsio import RealFS
from node.layout import ExperimentLayout
from node.retention import apply_retention, rounds_to_remove
from node.storage import SharedStore


class Hooks:
    """One ``hook(op, path)`` for the store's path calls and retention's fd-relative ones; it may raise to
    inject a failure, or change the tree (a hostile peer acting between two calls)."""

    def __init__(self):
        self.hook = None

    def __call__(self, op, path):
        if self.hook is not None:
            self.hook(op, Path(path))


class HookFS(RealFS):
    """RealFS calling ``hooks(op, path)`` before every call that names a path."""

    def __init__(self, hooks: Hooks):
        self.hooks = hooks


for _op in ("open", "lstat", "stat", "replace", "listdir", "unlink", "rmdir", "makedirs"):
    def _make(name):
        real = getattr(RealFS, name)

        def method(self, path, *args, **kwargs):
            self.hooks(name, path)
            return real(self, path, *args, **kwargs)
        return method
    setattr(HookFS, _op, _make(_op))


class HookOps(fdtree.FdOps):
    """fdtree.FdOps calling ``hooks(op, path)`` before each call; it remembers which path each fd was
    opened as, so a hook sees ``scandir`` of ``.../stage_0`` rather than of fd 7."""

    def __init__(self, hooks: Hooks):
        self.hooks = hooks
        self.paths: dict[int, Path] = {}

    def _path(self, name, dir_fd):
        return Path(name) if dir_fd is None else self.paths.get(dir_fd, Path("?")) / name

    def open(self, name, flags, dir_fd=None):
        path = self._path(name, dir_fd)
        self.hooks("open", path)
        fd = super().open(name, flags, dir_fd=dir_fd)
        self.paths[fd] = Path(os.path.normpath(path))
        return fd

    def scandir(self, fd):
        self.hooks("scandir", self.paths.get(fd, Path("?")))
        return super().scandir(fd)

    def unlink(self, name, dir_fd):
        self.hooks("unlink", self._path(name, dir_fd))
        super().unlink(name, dir_fd=dir_fd)

    def rmdir(self, name, dir_fd):
        self.hooks("rmdir", self._path(name, dir_fd))
        super().rmdir(name, dir_fd=dir_fd)


@pytest.fixture
def layout(tmp_path) -> ExperimentLayout:
    layout = ExperimentLayout.for_experiment(tmp_path / "shared", "exp")
    layout.ensure_dirs()
    return layout


@pytest.fixture
def hooks():
    return Hooks()


@pytest.fixture
def store(layout, tmp_path, hooks) -> SharedStore:
    return SharedStore(layout, node_id="coordinator", lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool",
                       fs=HookFS(hooks), sleep=lambda s: None, retry_attempts=2)


@pytest.fixture
def retain(store, hooks):
    """``apply_retention(store, ...)`` with the hooked fd-relative calls."""
    ops = HookOps(hooks)
    return lambda *args, **kwargs: apply_retention(store, *args, ops=ops, **kwargs)


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


def test_keep_last_n_deletes_older_rounds(retain, layout):
    populate(layout, range(10))
    populate(layout, [12])  # ahead of the coordinator's round: never touched
    rep = retain(9, enabled=True, keep_last_n=3, archive=False)
    assert rep.ok and rep.skipped == ""
    assert rep.deleted == {"rollouts": (0, 1, 2, 3, 4, 5, 6), "rewards": (0, 1, 2, 3, 4, 5, 6)}
    assert present(layout) == [7, 8, 9, 12] and present(layout, "rewards") == [7, 8, 9, 12]
    assert not layout.archive_root.exists()
    again = retain(9, enabled=True, keep_last_n=3, archive=False)
    assert again.deleted == {"rollouts": (), "rewards": ()}


@pytest.mark.parametrize("keep", [0, 1, 2])
def test_current_and_previous_round_always_kept(retain, layout, keep):
    populate(layout, range(6))
    rep = retain(5, enabled=True, keep_last_n=keep, archive=False)
    assert rep.ok
    assert present(layout) == [4, 5] and present(layout, "rewards") == [4, 5]
    rep = retain(5, enabled=True, keep_last_n=keep, archive=True)
    assert rep.ok and present(layout) == [4, 5]


def test_disabled_touches_nothing(retain, layout):
    content = populate(layout, range(5))
    rep = retain(4, enabled=False, keep_last_n=2, archive=True)
    assert rep.skipped == "disabled"
    assert all(p.read_bytes() == data for p, data in content.items())


def test_archive_moves_old_rounds(retain, layout):
    content = populate(layout, range(5))
    rep = retain(4, enabled=True, keep_last_n=2, archive=True)
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


def test_interrupted_archive_is_finished_by_a_rerun(retain, layout, hooks):
    content = populate(layout, range(4), nodes=("w1", "w2", "w3"))
    calls = {"replace": 0}

    def crash_midway(op, path):  # the 4th archive copy dies (a non-transient error: no retry)
        if op == "replace":
            calls["replace"] += 1
            if calls["replace"] == 4:
                raise OSError(errno.EACCES, "simulated crash")

    hooks.hook = crash_midway
    rep = retain(3, enabled=True, keep_last_n=2, archive=True)
    assert not rep.ok and rep.errors
    # Nothing was deleted that was not archived: every source of an unfinished round is still there.
    for p, data in content.items():
        r = int(p.relative_to(layout.root).parts[1].split("_")[1])
        assert p.exists() or (layout.archive_dir(p.relative_to(layout.root).parts[0], r) / "stage_0" / p.name).exists()
    hooks.hook = None
    rep2 = retain(3, enabled=True, keep_last_n=2, archive=True)
    assert rep2.ok
    assert present(layout) == [2, 3] and present(layout, "rewards") == [2, 3]
    for p, data in content.items():
        rel = p.relative_to(layout.root)
        r = int(rel.parts[1].split("_")[1])
        if r < 2:
            assert (layout.archive_dir(rel.parts[0], r) / "stage_0" / p.name).read_bytes() == data
    archive_files = [p for p in layout.archive_root.rglob("*") if p.is_file()]
    assert len(archive_files) == 2 * 2 * 3  # 2 rounds x 2 kinds x 3 nodes, no temp files left


def test_interrupted_delete_after_copy(retain, layout, hooks):
    populate(layout, range(4))

    def no_unlink(op, path):
        if op == "unlink":
            raise OSError(errno.EPERM, "simulated")

    hooks.hook = no_unlink
    rep = retain(3, enabled=True, keep_last_n=2, archive=True)
    assert rep.errors and present(layout) == [0, 1, 2, 3]
    hooks.hook = None
    assert retain(3, enabled=True, keep_last_n=2, archive=True).ok
    assert present(layout) == [2, 3]
    assert len([p for p in layout.archive_root.rglob("*.json")]) == 2 * 2 * 2


def test_transient_errors_reported_not_raised(retain, layout, hooks):
    content = populate(layout, range(5))
    calls = {"unlink": 0}

    def flaky(op, path):
        if op in ("unlink", "rmdir"):
            calls[op] = calls.get(op, 0) + 1
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    hooks.hook = flaky
    rep = retain(4, enabled=True, keep_last_n=2, archive=False)
    assert len(rep.errors) == 2 * 3 and all(p.exists() for p in content)
    assert calls["unlink"] == 2 * 3 * 2  # each round's first unlink, retried once (retry_attempts=2)
    hooks.hook = None
    assert retain(4, enabled=True, keep_last_n=2, archive=False).ok
    assert present(layout) == [3, 4]


def test_unreachable_listing_never_deletes_unarchived(retain, layout, hooks):
    content = populate(layout, range(4))
    failures = {"n": 0}

    def flaky_listing(op, path):  # listing a stage dir fails past the retries once, then the mount is back
        if op == "scandir" and path.name == "stage_0" and failures["n"] < 2:
            failures["n"] += 1
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    hooks.hook = flaky_listing
    rep = retain(3, enabled=True, keep_last_n=2, archive=True)
    assert rep.errors
    for p, data in content.items():
        rel = p.relative_to(layout.root)
        r = int(rel.parts[1].split("_")[1])
        archived = layout.archive_dir(rel.parts[0], r) / "stage_0" / p.name
        assert p.exists() or archived.read_bytes() == data
    hooks.hook = None
    assert retain(3, enabled=True, keep_last_n=2, archive=True).ok
    assert len(list(layout.archive_root.rglob("*.json"))) == 2 * 2 * 2


def test_concurrent_deletion_is_fine(retain, layout, hooks):
    populate(layout, range(5))

    def someone_else_deletes(op, path):
        if op == "scandir" and path.name == "round_1":
            shutil.rmtree(path)

    hooks.hook = someone_else_deletes
    rep = retain(4, enabled=True, keep_last_n=2, archive=False)
    assert rep.ok, rep.errors
    assert present(layout) == [3, 4]


def test_symlinked_round_dir_is_unlinked_not_followed(retain, layout, tmp_path):
    populate(layout, range(4))
    victim = tmp_path / "victim"
    (victim / "stage_0").mkdir(parents=True)
    (victim / "stage_0" / "precious.json").write_text("{}")
    shutil.rmtree(layout.root / "rollouts" / "round_0")
    os.symlink(victim, layout.root / "rollouts" / "round_0", target_is_directory=True)
    rep = retain(3, enabled=True, keep_last_n=2, archive=True)
    assert rep.ok, rep.errors
    assert (victim / "stage_0" / "precious.json").exists()
    assert not os.path.lexists(layout.root / "rollouts" / "round_0")
    assert not (layout.archive_rollouts_dir(0) / "stage_0" / "precious.json").exists()


def test_deep_hostile_tree_is_removed(retain, layout):
    populate(layout, range(4))
    deep = layout.rollouts_dir(0, 0)
    for _ in range(1500):  # deeper than Python's recursion limit
        deep = deep / "d"
        os.mkdir(deep)
    assert retain(3, enabled=True, keep_last_n=2, archive=False).ok
    assert present(layout) == [2, 3]


def test_locked_by_another_process_skips(retain, layout, tmp_path):
    populate(layout, range(5))
    other = SharedStore(layout, lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool2")
    with other.lock("retention"):
        rep = retain(4, enabled=True, keep_last_n=2, archive=False)
    assert rep.skipped == "locked by another process"
    assert present(layout) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        retain(-1, enabled=True, keep_last_n=2, archive=False)


# -- directories swapped while retention works (node.fdtree) -----------------------------------------------
@pytest.fixture
def victim(tmp_path) -> Path:
    """A directory outside the experiment, shaped like a round dir, that retention must never touch."""
    d = tmp_path / "victim"
    (d / "stage_0").mkdir(parents=True)
    (d / "stage_0" / "precious.json").write_text('{"precious": true}')
    (d / "top.txt").write_text("keep")
    return d


def victim_intact(victim: Path) -> bool:
    return (victim / "stage_0" / "precious.json").read_text() == '{"precious": true}' and \
        (victim / "top.txt").read_text() == "keep"


def swap_once(hooks, op: str, target: Path, swap) -> dict:
    """Run ``swap()`` once, just before the first ``op`` on ``target`` (a peer racing retention)."""
    done = {"swapped": False}

    def hook(seen_op, path):
        if seen_op == op and path == target and not done["swapped"]:
            done["swapped"] = True
            swap()
    hooks.hook = hook
    return done


@pytest.mark.parametrize("archive", [False, True])
def test_round_dir_swapped_for_a_symlink_after_listing_deletes_nothing_outside(retain, layout, hooks, victim,
                                                                                tmp_path, archive):
    populate(layout, range(4))
    round_0 = layout.root / "rollouts" / "round_0"

    def swap():  # listed as a directory; by the time retention opens it, it leads outside
        os.rename(round_0, tmp_path / "moved_round_0")
        os.symlink(victim, round_0, target_is_directory=True)
    done = swap_once(hooks, "open", round_0, swap)
    rep = retain(3, enabled=True, keep_last_n=2, archive=archive)
    assert done["swapped"] and rep.ok, rep.errors
    assert victim_intact(victim)
    assert not os.path.lexists(round_0)  # the link itself is unlinked
    assert (tmp_path / "moved_round_0" / "stage_0" / "w1.json").exists()  # never entered once moved away
    assert not (layout.archive_rollouts_dir(0) / "stage_0" / "precious.json").exists()
    assert present(layout) == [2, 3] and present(layout, "rewards") == [2, 3]


@pytest.mark.parametrize("archive", [False, True])
def test_stage_dir_swapped_for_a_symlink_inside_an_open_round_deletes_nothing_outside(retain, layout, hooks, victim,
                                                                                       archive):
    populate(layout, range(4))
    round_1 = layout.root / "rollouts" / "round_1"

    def swap():  # the round dir is open already; its stage dir becomes a link out
        shutil.rmtree(round_1 / "stage_0")
        os.symlink(victim / "stage_0", round_1 / "stage_0", target_is_directory=True)
    done = swap_once(hooks, "scandir", round_1, swap)
    rep = retain(3, enabled=True, keep_last_n=2, archive=archive)
    assert done["swapped"] and rep.ok, rep.errors
    assert victim_intact(victim)
    assert not os.path.lexists(round_1)
    assert not (layout.archive_rollouts_dir(1) / "stage_0" / "precious.json").exists()


def test_file_swapped_for_a_symlink_before_archiving_is_neither_copied_nor_followed(retain, layout, hooks, victim):
    populate(layout, range(4))
    peer_file = layout.rollout_file(0, 0, "w1")

    def swap():
        peer_file.unlink()
        os.symlink(victim / "stage_0" / "precious.json", peer_file)
    done = swap_once(hooks, "open", peer_file, swap)
    rep = retain(3, enabled=True, keep_last_n=2, archive=True)
    assert done["swapped"] and rep.ok, rep.errors
    assert victim_intact(victim)
    assert not (layout.archive_rollouts_dir(0) / "stage_0" / "w1.json").exists()
    assert (layout.archive_rollouts_dir(0) / "stage_0" / "w2.json").exists()


class CountingOps(fdtree.FdOps):
    """Real calls, counting the fds open at once; ``on_scandir(path)`` may act on the tree."""

    def __init__(self, on_scandir=None):
        self.open_now = self.most = 0
        self.paths: dict[int, Path] = {}
        self.on_scandir = on_scandir

    def open(self, name, flags, dir_fd=None):
        fd = super().open(name, flags, dir_fd=dir_fd)
        self.paths[fd] = Path(os.path.normpath(Path(name) if dir_fd is None else self.paths[dir_fd] / name))
        self.open_now += 1
        self.most = max(self.most, self.open_now)
        return fd

    def close(self, fd):
        super().close(fd)
        self.open_now -= 1

    def scandir(self, fd):
        if self.on_scandir is not None:
            self.on_scandir(self.paths[fd])
        return super().scandir(fd)


def _deep_tree(top: Path, depth: int) -> list[Path]:
    levels = [top]
    for i in range(depth):
        levels.append(levels[-1] / f"d{i}")
    levels[-1].mkdir(parents=True)
    for level in levels:
        (level / "f.txt").write_text("x")
        os.symlink("/", level / "root_link")  # unlinked, never entered
    return levels


def test_deep_tree_removal_keeps_few_fds_open(tmp_path):
    _deep_tree(tmp_path / "tree", 200)
    ops = CountingOps()
    parent = fdtree.open_dir(tmp_path, [], ops=ops)
    try:
        fdtree.remove_entry(parent, "tree", ops=ops, max_fds=4)
    finally:
        ops.close(parent)
    assert not os.path.lexists(tmp_path / "tree")
    assert ops.most <= 4 + 1 and ops.open_now == 0  # the bound, plus the caller's parent fd


def test_deep_tree_moved_out_midway_stops_at_the_moved_directory(tmp_path, victim):
    levels = _deep_tree(tmp_path / "tree", 40)

    def move_out(path):  # at the bottom, a peer moves level 10 (with everything below it) outside
        if path == levels[-1] and levels[10].exists():
            os.rename(levels[10], victim / "moved")
    ops = CountingOps(move_out)
    parent = fdtree.open_dir(tmp_path, [], ops=ops)
    try:
        with pytest.raises(fdtree.TreeMoved):
            fdtree.remove_entry(parent, "tree", ops=ops, max_fds=4)
    finally:
        ops.close(parent)
    # Going back up through "..", level 10's parent is now the victim dir: nothing of it was deleted.
    assert victim_intact(victim) and (victim / "moved").is_dir()
    assert ops.open_now == 0


def test_remove_path_refuses_paths_outside_the_base(tmp_path, victim):
    with pytest.raises(ValueError):
        fdtree.remove_path(tmp_path / "exp", victim)
    with pytest.raises(ValueError):
        fdtree.remove_path(tmp_path / "exp", tmp_path / "exp" / ".." / "victim")
    (tmp_path / "exp").mkdir()
    os.symlink(victim, tmp_path / "exp" / "link", target_is_directory=True)
    with pytest.raises(OSError) as err:  # a symlinked parent is never walked through
        fdtree.remove_path(tmp_path / "exp", tmp_path / "exp" / "link" / "top.txt")
    assert fdtree.is_not_a_dir(err.value)
    fdtree.remove_path(tmp_path / "exp", tmp_path / "exp" / "link")
    assert victim_intact(victim) and not os.path.lexists(tmp_path / "exp" / "link")
    (tmp_path / "archive" / "round_1").mkdir(parents=True)
    fdtree.remove_under([tmp_path / "exp", tmp_path / "archive"], tmp_path / "archive" / "round_1")
    assert not (tmp_path / "archive" / "round_1").exists()
    with pytest.raises(ValueError):
        fdtree.remove_under([tmp_path / "exp", tmp_path / "archive"], victim / "top.txt")
    assert victim_intact(victim)


def test_fifos_and_oversized_files_are_neither_archived_nor_blocking(retain, layout, store):
    populate(layout, range(4))
    stage = layout.rollouts_dir(0, 0)
    os.mkfifo(stage / "fifo.json")  # opening it for reading without O_NONBLOCK would hang
    with open(stage / "huge.json", "wb") as f:
        f.truncate(store.max_file_bytes + 1)  # sparse: refused by its size, never read
    rep = retain(3, enabled=True, keep_last_n=2, archive=True)
    assert rep.ok, rep.errors
    archived = sorted(p.name for p in layout.archive_rollouts_dir(0).rglob("*.json"))
    assert archived == ["w1.json", "w2.json"]
    assert present(layout) == [2, 3]
