"""Shared fixtures: test helpers importable from every test directory, swarms of tests/harness.py, the
reaper of whatever a test leaves behind, a real flaky FUSE mount, and a real tiny tmpfs to fill."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # tests/harness.py, tests/fakes.py, ... from tests/chaos/ too

from fake_node import drive  # noqa: E402
from harness import Swarm, kill_descendants, set_subreaper, wait_for  # noqa: E402


@pytest.fixture
def make_swarm(tmp_path):
    """``make_swarm(*sets, config=..., shared=..., env=...)``: a :class:`harness.Swarm` rooted in tmp_path (a
    second one in tmp_path/swarm2, ...). All are closed at the end, and none may have left a process behind."""
    made: list[Swarm] = []

    def make(*sets: str, **kwargs) -> Swarm:
        made.append(Swarm(tmp_path / f"swarm{len(made) + 1}" if made else tmp_path, *sets, **kwargs))
        return made[-1]

    yield make
    left = [pid for swarm in made for pid in swarm.close()]
    assert not left, f"processes left behind: {left}"


@pytest.fixture
def reaper():
    """Supervisors the test appends are stopped (each gets its stop timeout); then every process the test
    left behind (orphans included: this process is a child subreaper meanwhile) is killed and reaped, and
    none may have been."""
    sups: list = []
    since = time.time() - 0.05  # psutil start times are in clock ticks
    on = set_subreaper(True)
    try:
        yield sups
    finally:
        for sup in sups:
            if sup.exit_code is None:
                sup.request_stop()
                drive(sup, timeout=sup.sv.stop_timeout_s + 2)
            sup.release_lock()
        left = kill_descendants(since)
        if on:
            set_subreaper(False)
    assert not left, f"processes left behind: {left}"


class FlakyMount:
    """Controls a running tests/flaky_mount.py server: ``down()`` = ENOTCONN on every call, ``up()``."""

    def __init__(self, root: Path):
        self.backing, self.mountpoint, self.control = root / "backing", root / "mnt", root / "control"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "FlakyMount":
        self.proc = subprocess.Popen(
            [sys.executable, str(TESTS / "flaky_mount.py"), str(self.backing), str(self.mountpoint), str(self.control)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: os.path.ismount(self.mountpoint), 10, "the FUSE mount",
                     fail_if=lambda: self.proc.poll() is not None and f"the server exited ({self.proc.returncode})")
        except AssertionError as err:
            self.stop()
            pytest.skip(f"FUSE mount could not be started here: {err}")
        return self

    def down(self) -> None:
        (self.control / "down").touch()

    def up(self) -> None:
        (self.control / "down").unlink(missing_ok=True)

    def delay(self, seconds: float) -> None:
        """Files others write to the backing dir show up here only ``seconds`` after they appeared, as another
        host's writes do on Drive (0: at once); files written through the mount are seen at once."""
        self.control.mkdir(parents=True, exist_ok=True)
        (self.control / "delay_s").write_text(f"{seconds}\n")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount", "-u", str(self.mountpoint)], capture_output=True)
        if os.path.ismount(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)


def fuse_usable() -> str | None:
    """Why a FUSE mount cannot be used here (None when it can)."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not shutil.which("fusermount") and not shutil.which("fusermount3"):
        return "fusermount not installed (apt-get install fuse3 libfuse2)"
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError, EnvironmentError) as err:
        return f"fusepy unusable: {err}"
    return None


@pytest.fixture
def flaky_mount(tmp_path):
    """A real passthrough FUSE mount that can be made to return ENOTCONN; always unmounted afterwards."""
    problem = fuse_usable()
    if problem:
        pytest.skip(problem)
    mount = FlakyMount(tmp_path / "fuse").start()
    try:
        yield mount
    finally:
        mount.up()
        mount.stop()


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 4 MiB tmpfs: writes past it fail with a real ENOSPC (skips where mounting is not allowed)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill_disk(directory: Path) -> Path:
    """Fill ``directory``'s filesystem (a :func:`tiny_disk`) to a real ENOSPC; delete the returned file to free it."""
    filler = directory / "filler.bin"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left over for close() to fail on
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler
