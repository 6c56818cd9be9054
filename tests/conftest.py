"""Shared fixtures: test helpers importable from every test directory, and a real flaky FUSE mount."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # tests/fakes.py, tests/swarm_helpers.py from tests/chaos/ too


class FlakyMount:
    """Controls a running tests/flaky_mount.py server: ``down()`` = ENOTCONN on every call, ``up()``."""

    def __init__(self, root: Path):
        self.backing, self.mountpoint, self.control = root / "backing", root / "mnt", root / "control"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "FlakyMount":
        self.proc = subprocess.Popen(
            [sys.executable, str(TESTS / "flaky_mount.py"), str(self.backing), str(self.mountpoint), str(self.control)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.skip("FUSE mount could not be started here")
            time.sleep(0.05)
        return self

    def down(self) -> None:
        (self.control / "down").touch()

    def up(self) -> None:
        (self.control / "down").unlink(missing_ok=True)

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
