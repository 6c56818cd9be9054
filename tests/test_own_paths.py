"""Own paths are ours (issue 12): whatever a peer plants at a path only this node writes (a FIFO, a
directory, a socket, a symlink or a hard link to a file outside) is moved aside into the quarantine, the
write lands in a fresh regular file, and nothing outside the experiment changes. Real files only."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import threading
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from node import fsio
from node.fsio import OwnPathTaken, RealFS
from node.layout import ExperimentLayout

DATA = b'{"node_id": "w1", "round": 3}\n'
HISTORY = b'{"node_id": "w1", "round": 0}\n'
WRITERS = {
    "append": lambda path, q, fs=fsio.REAL_FS: fsio.append_bytes(path, DATA, fs=fs, quarantine_dir=q),
    "atomic": lambda path, q, fs=fsio.REAL_FS: fsio.write_atomic(path, DATA, fs=fs, quarantine_dir=q),
}


@pytest.fixture
def exp(tmp_path):
    """(layout, own path, outside dir holding one file); the test runs in the own path's directory, so a
    socket can be bound by its short relative name."""
    layout = ExperimentLayout.for_experiment(tmp_path / "shared", "exp")
    layout.ensure_dirs()
    own = layout.metrics_file("w1")
    own.parent.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"not yours\n")
    return layout, own, outside


def snapshot(directory: Path) -> dict[str, tuple]:
    """Every entry under ``directory``: kind, bytes of regular files, inode and link count."""
    out = {}
    for dirpath, dirs, files in os.walk(directory):
        for name in dirs + files:
            p = Path(dirpath, name)
            st = p.lstat()
            out[str(p.relative_to(directory))] = (stat.S_IFMT(st.st_mode), st.st_ino, st.st_size,
                                                  p.read_bytes() if stat.S_ISREG(st.st_mode) else None)
    return out


@contextlib.contextmanager
def fifo_unblocked_after(path: Path, seconds: float = 30.0):
    """If a write blocks opening the FIFO at ``path`` (the bug), a reader opens it after ``seconds``, so
    the test fails instead of hanging."""
    reader: list[int] = []

    def unblock():
        with contextlib.suppress(OSError):
            reader.append(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    timer = threading.Timer(seconds, unblock)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        for fd in reader:
            os.close(fd)
    assert not reader, f"the write blocked opening the FIFO at {path}"


def plant(kind: str, own: Path, outside: Path, stack: contextlib.ExitStack) -> int:
    """Plant ``kind`` at ``own``; returns the file type (S_IFMT) expected in the quarantine."""
    if kind in ("fifo", "fifo_with_reader"):
        os.mkfifo(own)
        stack.enter_context(fifo_unblocked_after(own))
        if kind == "fifo_with_reader":
            reader = os.open(own, os.O_RDONLY | os.O_NONBLOCK)
            stack.callback(os.close, reader)
            stack.callback(lambda: assert_fifo_empty(reader))
        return stat.S_IFIFO
    if kind == "directory":
        own.mkdir()
        (own / "inside.txt").write_bytes(b"kept\n")
        return stat.S_IFDIR
    if kind == "symlink":
        own.symlink_to(outside / "secret.txt")
        return stat.S_IFLNK
    if kind == "socket":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stack.callback(sock.close)
        sock.bind(own.name)  # relative (cwd is own.parent): AF_UNIX paths are capped at 108 bytes
        return stat.S_IFSOCK
    raise AssertionError(kind)


def assert_fifo_empty(reader: int) -> None:
    try:
        assert os.read(reader, 4096) == b"", "something was written into the FIFO"
    except BlockingIOError:
        pass  # no data (a writer still holds it open)


def quarantined(layout: ExperimentLayout) -> list[Path]:
    return sorted(layout.quarantine_dir().iterdir())


def assert_fresh_file(own: Path, content: bytes = DATA) -> None:
    st = own.lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1
    assert own.read_bytes() == content


# -- the attacks, for both writers ----------------------------------------------------------------------
@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("kind", ["fifo", "fifo_with_reader", "directory", "symlink", "socket"])
def test_planted_thing_is_moved_aside_and_the_write_lands(exp, writer, kind, monkeypatch):
    layout, own, outside = exp
    monkeypatch.chdir(own.parent)
    with contextlib.ExitStack() as stack:
        planted_type = plant(kind, own, outside, stack)
        before = snapshot(outside)
        with capture_logs() as logs:
            WRITERS[writer](own, layout.quarantine_dir())
    assert_fresh_file(own)
    [moved] = quarantined(layout)
    assert moved.name.startswith("logs__w1__metrics.jsonl.")
    assert stat.S_IFMT(moved.lstat().st_mode) == planted_type  # moved, never followed nor deleted
    if kind == "directory":
        assert (moved / "inside.txt").read_bytes() == b"kept\n"
    if kind == "symlink":
        assert os.readlink(moved) == str(outside / "secret.txt")
    assert snapshot(outside) == before
    assert logs == [{"event": "own_path_quarantined", "log_level": "warning", "path": str(own),
                     "reason": kind.removesuffix("_with_reader"), "moved_to": str(moved)}]


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_never_writes_through_a_hard_link_to_a_file_outside(exp, writer):
    layout, own, outside = exp
    os.link(outside / "secret.txt", own)
    before = snapshot(outside)
    with capture_logs() as logs:
        WRITERS[writer](own, layout.quarantine_dir())
    assert_fresh_file(own)
    assert snapshot(outside) == before  # byte-identical, same inode
    if writer == "atomic":  # the replace gave our name a new inode: nothing to move aside
        assert quarantined(layout) == [] and logs == []
        return
    [moved] = quarantined(layout)
    assert moved.samefile(outside / "secret.txt")  # our name was moved, the file itself untouched
    assert [(e["event"], e["reason"]) for e in logs] == [("own_path_quarantined", "hard link (2 links)")]


def test_append_to_our_file_linked_from_outside_keeps_our_history_in_quarantine(exp):
    layout, own, outside = exp
    own.write_bytes(HISTORY)
    os.link(own, outside / "stolen.jsonl")  # someone reads our appends from outside the experiment
    with capture_logs() as logs:
        fsio.append_bytes(own, DATA, quarantine_dir=layout.quarantine_dir())
    assert_fresh_file(own)
    assert (outside / "stolen.jsonl").read_bytes() == HISTORY  # the new line did not leak
    [moved] = quarantined(layout)
    assert moved.read_bytes() == HISTORY
    assert len(logs) == 1


def test_ordinary_files_are_written_as_before_without_a_warning(exp):
    layout, own, _ = exp
    with capture_logs() as logs:
        for _ in range(2):
            fsio.append_bytes(own, DATA, quarantine_dir=layout.quarantine_dir())
        fsio.write_atomic(own.with_name("state.json"), DATA, quarantine_dir=layout.quarantine_dir())
    assert own.read_bytes() == DATA * 2 and own.with_name("state.json").read_bytes() == DATA
    assert quarantined(layout) == [] and logs == []


# -- without a quarantine: an error, nothing moved ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "fifo_with_reader", "directory", "symlink", "socket", "hard link"])
def test_append_without_quarantine_raises_and_moves_nothing(exp, kind, monkeypatch):
    layout, own, outside = exp
    monkeypatch.chdir(own.parent)
    with contextlib.ExitStack() as stack:
        if kind == "hard link":
            os.link(outside / "secret.txt", own)
        else:
            plant(kind, own, outside, stack)
        before = snapshot(outside), own.lstat()
        with capture_logs() as logs, pytest.raises(OwnPathTaken) as info:
            fsio.append_bytes(own, DATA)
    assert info.value.filename == str(own) and info.value.errno in (errno.ENXIO, errno.EISDIR, errno.ELOOP,
                                                                    errno.EMLINK)
    assert (snapshot(outside), own.lstat()) == before
    assert quarantined(layout) == [] and logs == []


def test_atomic_write_without_quarantine_still_fails_on_a_directory(exp):
    layout, own, _ = exp
    own.mkdir()
    with pytest.raises(IsADirectoryError):
        fsio.write_atomic(own, DATA)
    assert own.is_dir() and os.listdir(own.parent) == [own.name]  # no temp file left
    assert quarantined(layout) == []


# -- the move aside fails: a clear error ----------------------------------------------------------------
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_quarantine_that_is_not_a_real_directory_is_refused(exp, writer):
    layout, own, outside = exp
    own.mkdir()
    layout.quarantine_dir().rmdir()
    layout.quarantine_dir().symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    with pytest.raises(OSError) as info:
        WRITERS[writer](own, layout.quarantine_dir())
    assert info.value.errno == errno.ENOTDIR and info.value.filename == str(own)
    assert "cannot move the directory at own path" in str(info.value)
    assert own.is_dir() and snapshot(outside) == before


class CrossDeviceFS(RealFS):
    """A quarantine on another filesystem: every rename fails as the kernel says it then (EXDEV)."""

    def rename(self, src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_move_aside_failure_names_the_path(exp, writer):
    layout, own, _ = exp
    os.mkfifo(own)
    with fifo_unblocked_after(own), pytest.raises(OSError) as info:
        WRITERS[writer](own, layout.quarantine_dir(), CrossDeviceFS())
    assert info.value.errno == errno.EXDEV and info.value.filename == str(own)
    assert stat.S_ISFIFO(own.lstat().st_mode) and os.listdir(own.parent) == [own.name]


class ReplantingFS(RealFS):
    """A peer that plants a new directory as soon as the last one was moved aside."""

    def rename(self, src, dst):
        super().rename(src, dst)
        os.mkdir(src)


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_gives_up_after_a_few_moves_when_someone_keeps_planting(exp, writer):
    layout, own, _ = exp
    own.mkdir()
    with capture_logs() as logs, pytest.raises(OwnPathTaken):
        WRITERS[writer](own, layout.quarantine_dir(), ReplantingFS())
    assert len(quarantined(layout)) == len(logs) == fsio.MAX_SET_ASIDE
    assert own.is_dir() and os.listdir(own.parent) == [own.name]


# -- O_NONBLOCK and short writes ---------------------------------------------------------------------------
class ShortWriteFS(RealFS):
    """Writes at most 5 bytes a call, as a loaded FUSE mount may."""

    def write(self, fd, data):
        return super().write(fd, bytes(data[:5]))


def test_short_writes_still_complete_with_the_new_flags(exp):
    layout, own, _ = exp
    own.write_bytes(HISTORY)
    fsio.append_bytes(own, DATA, fs=ShortWriteFS(), quarantine_dir=layout.quarantine_dir())
    assert own.read_bytes() == HISTORY + DATA
    own.unlink()
    own.mkdir()
    fsio.append_bytes(own, DATA, fs=ShortWriteFS(), quarantine_dir=layout.quarantine_dir())
    assert_fresh_file(own)


# -- on a real FUSE mount, as the shared dir is in production -------------------------------------------------
def test_on_a_fuse_mount_planted_things_are_moved_aside_and_appends_work(flaky_mount):
    layout = ExperimentLayout.for_experiment(flaky_mount.mountpoint, "exp")
    layout.ensure_dirs()
    metrics, state = layout.metrics_file("w1"), layout.state_file()
    metrics.parent.mkdir()
    metrics.mkdir()
    state.mkdir()
    with capture_logs() as logs:
        fsio.append_bytes(metrics, DATA, quarantine_dir=layout.quarantine_dir())  # O_NONBLOCK through FUSE
        fsio.append_bytes(metrics, DATA, quarantine_dir=layout.quarantine_dir())
        fsio.write_atomic(state, DATA, quarantine_dir=layout.quarantine_dir())
    assert_fresh_file(metrics, DATA * 2)
    assert_fresh_file(state)
    assert [e["reason"] for e in logs] == ["directory", "directory"]
    assert all(p.is_dir() for p in quarantined(layout))
    # a hard link made through the mount (outside the experiment) shows in fstat and is moved aside
    stolen = flaky_mount.mountpoint / "stolen.jsonl"
    os.link(metrics, stolen)
    fsio.append_bytes(metrics, DATA, quarantine_dir=layout.quarantine_dir())
    assert_fresh_file(metrics)
    assert stolen.read_bytes() == DATA * 2
