"""supervisor.procs with real child processes: files, process groups, parent-death signal, exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from doubles import FakeOS
from harness import reap, set_subreaper, wait_for
from supervisor import procs
from supervisor.procs import RealOS, classify_exit, is_alive, signal_group, spawn, tail_file

REPO = Path(__file__).resolve().parents[1]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().split()
    except OSError:
        return None
    return int(text[0]) if text else None


@pytest.fixture
def cleanup():
    """Register pids (process-group leaders or plain pids) and Popens; all are killed and reaped.

    The test process is a child subreaper meanwhile, so orphaned grandchildren become its children
    and are reaped here instead of lingering as zombies under a PID 1 that does not reap.
    """
    pids: list[int] = []
    popens: list[subprocess.Popen] = []
    subreaper = set_subreaper(True)
    try:
        yield pids, popens
    finally:
        for pid in pids + [p.pid for p in popens]:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for p in popens:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        reap(pids)  # adopted orphans and other children no Popen owns
        if subreaper:
            set_subreaper(False)


def test_spawn_appends_stdout_and_stderr_to_files(tmp_path, cleanup):
    _, popens = cleanup
    out, err = tmp_path / "logs" / "w.out", tmp_path / "logs" / "w.err"
    code = "import os, sys; print('hello', os.environ['NODE_ID']); print('oops', file=sys.stderr)"
    for _ in range(2):
        p = spawn([sys.executable, "-c", code], env={**os.environ, "NODE_ID": "w1"}, cwd=tmp_path,
                  stdout_path=out, stderr_path=err)
        popens.append(p)
        assert p.wait(timeout=10) == 0
    assert out.read_text() == "hello w1\nhello w1\n"
    assert err.read_text() == "oops\noops\n"


def test_spawn_same_file_for_both_streams_and_own_session(tmp_path, cleanup):
    _, popens = cleanup
    log = tmp_path / "node.log"
    code = "import os, sys; print(os.getpgid(0), os.getsid(0), flush=True); print('E', file=sys.stderr)"
    p = spawn([sys.executable, "-c", code], env=None, cwd=None, stdout_path=log, stderr_path=log)
    popens.append(p)
    assert p.wait(timeout=10) == 0
    first, second = log.read_text().splitlines()
    assert first.split() == [str(p.pid), str(p.pid)]  # its own process group and session
    assert second == "E"


def test_spawn_missing_executable_is_config_error(tmp_path):
    argv = [str(tmp_path / "no-such-binary"), "--x"]
    with pytest.raises(FileNotFoundError) as exc:
        spawn(argv, env=None, cwd=None, stdout_path=tmp_path / "o", stderr_path=tmp_path / "e")
    info = procs.spawn_failure(exc.value, argv)
    assert info.reason == "config_error" and "no-such-binary" in info.detail and info.is_failure


def test_process_group_kill_kills_grandchildren(tmp_path, cleanup):
    pids, popens = cleanup
    gc_file = tmp_path / "grandchild.pid"
    code = textwrap.dedent(f"""
        import subprocess, sys, time
        gc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(gc_file)!r}, "w").write(str(gc.pid))
        time.sleep(60)
    """)
    p = spawn([sys.executable, "-c", code], env=None, cwd=tmp_path,
              stdout_path=tmp_path / "o", stderr_path=tmp_path / "e")
    popens.append(p)
    gc = wait_for(lambda: read_pid(gc_file), 5, "the grandchild's pid file")
    assert gc, "the child never started its grandchild"
    pids.append(gc)
    assert is_alive(p.pid) and is_alive(gc)
    assert signal_group(p.pid, signal.SIGKILL) is True
    assert p.wait(timeout=5) == -signal.SIGKILL
    wait_for(lambda: not is_alive(gc), 5, "the grandchild to die with its group")
    # Everyone is dead (the grandchild may linger as an unreaped zombie): signalling again is quiet.
    signal_group(p.pid, signal.SIGTERM)


def test_pdeathsig_kills_child_when_parent_is_killed(tmp_path, cleanup):
    pids, popens = cleanup
    child_file = tmp_path / "child.pid"
    parent_code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from supervisor.procs import spawn
        child = spawn([sys.executable, "-c", "import time; time.sleep(60)"], env=None, cwd=None,
                      stdout_path={str(tmp_path / 'c.out')!r}, stderr_path={str(tmp_path / 'c.err')!r})
        open({str(child_file)!r}, "w").write(str(child.pid))
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    popens.append(parent)
    child = wait_for(lambda: read_pid(child_file), 10, "the child's pid file")
    assert child, f"parent did not spawn its child: {parent.stderr.read1().decode() if parent.poll() else ''}"
    pids.append(child)
    assert is_alive(child)
    parent.kill()  # SIGKILL the parent only; the child is in its own session
    assert parent.wait(timeout=5) == -signal.SIGKILL
    wait_for(lambda: not is_alive(child), 5, "the child to die with its parent")


def test_child_exits_when_parent_already_gone_before_prctl(tmp_path, cleanup):
    """The race: the parent dies between fork and prctl, so getppid() is no longer the parent."""
    _, popens = cleanup
    marker = tmp_path / "ran"
    setup = procs._child_setup(parent_pid=os.getpid() + 1_000_000)  # not our real parent
    p = subprocess.Popen([sys.executable, "-c", f"open({str(marker)!r}, 'w')"], preexec_fn=setup)
    popens.append(p)
    assert p.wait(timeout=5) == 1
    assert not marker.exists()


def test_zombie_counts_as_dead_and_reap_is_non_blocking(tmp_path, cleanup):
    _, popens = cleanup
    p = spawn(SLEEPER, env=None, cwd=None, stdout_path=tmp_path / "o", stderr_path=tmp_path / "e")
    popens.append(p)
    os_ = RealOS()
    assert os_.is_alive(p.pid)
    t0 = time.monotonic()
    assert os_.reap(p) is None and time.monotonic() - t0 < 0.5
    os.kill(p.pid, signal.SIGKILL)
    wait_for(lambda: psutil.Process(p.pid).status() == psutil.STATUS_ZOMBIE, 5, "the killed child to be a zombie")
    assert not os_.is_alive(p.pid)  # a zombie, not yet reaped
    wait_for(lambda: os_.reap(p) is not None, 5, "the zombie reaped")
    assert p.returncode == -signal.SIGKILL
    assert not is_alive(p.pid)
    assert os_.signal_group(p.pid, signal.SIGKILL) is False


def test_tail_file_reads_only_the_end(tmp_path):
    path = tmp_path / "big.log"
    with open(path, "w") as f:
        for i in range(100_000):
            f.write(f"line {i}\n")
    tail = tail_file(path, max_bytes=200, lines=3)
    assert tail == "line 99997\nline 99998\nline 99999"
    few = tail_file(path, max_bytes=30, lines=20)
    assert few.splitlines()[-1] == "line 99999" and all(ln.startswith("line ") for ln in few.splitlines())
    assert tail_file(tmp_path / "missing.log") == ""
    # Only what the current process wrote: start at the size recorded at spawn.
    size = procs.file_size(path)
    with open(path, "a") as f:
        f.write("fresh 1\nfresh 2\n")
    assert tail_file(path, start=size) == "fresh 1\nfresh 2"
    assert tail_file(path, start=procs.file_size(path)) == ""


@pytest.mark.parametrize("rc,kw,reason,signame,needle", [
    (-9, {}, "oom_killed_host", "SIGKILL", "SIGKILL not sent by the supervisor: likely the host OOM killer"),
    (-9, {"requested_stop": True}, "stopped", "SIGKILL", "after the stop timeout"),
    (-15, {"requested_stop": True}, "stopped", "SIGTERM", "stopped by the supervisor"),
    (0, {"requested_stop": True}, "stopped", None, "stopped by the supervisor"),
    (-9, {"hung": True}, "hung", "SIGKILL", "no heartbeat"),
    (-11, {}, "signal", "SIGSEGV", "killed by SIGSEGV"),
    (0, {}, "exited", None, "finished normally"),
    (3, {"log_tail": "starting\nValueError: bad\n"}, "exited", None, "exit code 3; last log line: ValueError: bad"),
    (1, {"log_tail": "step 4\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"},
     "cuda_oom", None, "Tried to allocate 2.00 GiB"),
    (1, {"log_tail": "OSError: [Errno 107] Transport endpoint is not connected: '/content/drive'"},
     "transport_disconnected", None, "Errno 107"),
    (-6, {"log_tail": "RuntimeError: CUDA out of memory\nAborted"}, "cuda_oom", "SIGABRT", "CUDA out of memory"),
    (0, {"log_tail": "caught CUDA out of memory, retried with a smaller batch"}, "exited", None, "finished"),
])
def test_classify_exit(rc, kw, reason, signame, needle):
    kw = {"requested_stop": False, **kw}
    info = classify_exit(rc, pid=77, **kw)
    assert (info.reason, info.signal, info.returncode, info.pid) == (reason, signame, rc, 77)
    assert needle in info.detail
    assert info.one_line().startswith("pid 77 ")


def test_classify_real_oom_message_from_a_log_tail(tmp_path, cleanup):
    """A real child prints a CUDA OOM traceback and dies; its log tail classifies the exit."""
    _, popens = cleanup
    err = tmp_path / "w.err"
    err.write_text("torch.OutOfMemoryError: CUDA out of memory (from the previous run)\n")
    start = procs.file_size(err)
    code = ("import sys; print('Traceback (most recent call last):', file=sys.stderr); "
            "print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB', file=sys.stderr);"
            " sys.exit(1)")
    p = spawn([sys.executable, "-c", code], env=None, cwd=None, stdout_path=tmp_path / "w.out", stderr_path=err)
    popens.append(p)
    rc = p.wait(timeout=10)
    info = classify_exit(rc, requested_stop=False, log_tail=tail_file(err, start=start), hung=False, pid=p.pid)
    assert info.reason == "cuda_oom" and "Tried to allocate 20.00 MiB" in info.detail
    # A clean exit afterwards is not blamed on the earlier OOM message.
    start = procs.file_size(err)
    p2 = spawn([sys.executable, "-c", "import sys; sys.exit(2)"], env=None, cwd=None,
               stdout_path=tmp_path / "w.out", stderr_path=err)
    popens.append(p2)
    info2 = classify_exit(p2.wait(timeout=10), requested_stop=False, log_tail=tail_file(err, start=start))
    assert info2.reason == "exited" and info2.returncode == 2


def test_fake_os_scripts_processes():
    fos = FakeOS(start=50.0)
    p = fos.spawn(["node"], env={"A": "1"}, cwd="/x", stdout_path="o", stderr_path="e")
    assert fos.is_alive(p.pid) and fos.reap(p) is None
    fos.sleep(2.5)
    assert fos.monotonic() == 52.5
    fos.exit(p.pid, 1)
    assert not fos.is_alive(p.pid) and fos.reap(p) == 1
    q = fos.spawn(["node"], env=None, cwd=None, stdout_path="o", stderr_path="e")
    assert fos.signal_group(q.pid, signal.SIGTERM) and q.returncode == -signal.SIGTERM
    assert fos.signal_group(q.pid, signal.SIGKILL) is False
    fos.spawn_error = FileNotFoundError(2, "No such file or directory")
    with pytest.raises(FileNotFoundError):
        fos.spawn(["node"], env=None, cwd=None, stdout_path="o", stderr_path="e")
