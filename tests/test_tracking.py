"""Experiment tracking (supervisor/tracking*.py): metrics and eval lines streamed to TensorBoard (read back with
TensorBoard's own reader) and W&B, incrementally, once per step across restarts, and never at training's cost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import threading

import pytest

from fake_node import FAKE_NODE, drive, fake_config
from harness import CONFIG, Timeouts
from node import fsio
from node.config import with_overrides
from node.layout import ExperimentLayout
from node.signing import KEY_ENV, Signer
from node.storage import SharedStore
from supervisor.daemon import Supervisor
from supervisor.sdnotify import SdNotifier
from supervisor.tracking import STATE_FILE, Streamer, Tracking
from supervisor.tracking_backends import BACKENDS, missing_package
from supervisor.tracking_lines import JsonlTail, flatten_scalars
from test_daemon import RecordingLog

KEY = bytes(range(32))
needs_tensorboard = pytest.mark.skipif(missing_package("tensorboard"),
                                       reason="the tensorboard extra is not installed (pip install -e '.[tensorboard]')")


def f32(x: float) -> float:
    """``x`` as TensorBoard stores a scalar (float32)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def metrics(node: str, r: int, reward: float) -> dict:
    return {"node_id": node, "round": r, "timestamp": 1_700_000_000.0 + r, "reward_local": reward, "published": True,
            "skipped_step": "", "external_dropped": {"no_signal": r}, "timings": {"generate_s": 0.5 + r, "round_s": 2.0}}


class Exp:
    """A tmp experiment whose workers' lines are written as a node writes them: signed, through SharedStore."""

    def __init__(self, tmp_path, *, report_to=("tensorboard",), workers: int = 2, require_signatures: bool = True):
        cfg = fake_config(tmp_path / "shared", workers=workers)
        self.config = with_overrides(cfg, tracking={"report_to": tuple(report_to)},
                                     exchange={"require_signatures": require_signatures})
        self.layout = ExperimentLayout.from_config(self.config)
        self.dir = self.layout.root
        self.runtime = tmp_path / "rt"
        self.workers = [f"worker_{i}" for i in range(1, workers + 1)]
        self.store = SharedStore(self.layout, signer=Signer(KEY), lock_dir=tmp_path / "locks",
                                 spool_dir=tmp_path / "spool")
        self.log = RecordingLog()
        self.dir.mkdir(parents=True)

    def write(self, node: str, *rounds: int, kind: str = "metrics") -> None:
        for r in rounds:
            if kind == "metrics":
                self.store.append_jsonl(self.layout.metrics_file(node), metrics(node, r, r / 10))
            else:
                self.store.append_jsonl(self.layout.log_dir(node) / "evals.jsonl",
                                        {"node_id": node, "round": r, "toy_copy": {"accuracy": r / 4, "n": 16},
                                         "basic_arithmetic": 0.25, "note": "greedy"})

    def streamer(self, backends=BACKENDS) -> Streamer:
        s = Streamer(self.config, self.workers, self.runtime, environ={KEY_ENV: KEY.hex()}, log=self.log,
                     backends=backends)
        s.open(self.config.tracking.report_to)
        return s

    def stream(self, backends=BACKENDS) -> int:
        """One supervisor's life: open, one pass, close; how many lines it read."""
        s = self.streamer(backends)
        try:
            return s.poll()
        finally:
            s.close()


def read_back(run_dir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of a TensorBoard run directory, read with TensorBoard's own reader, by step (it reads
    files in name order: the files of supervisors started within one second, as here, may sort either way)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: sorted((s.step, s.value) for s in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}


def expected(lines: list[dict], prefix: str = "") -> dict[str, list[tuple[int, float]]]:
    """What the event files must hold for these lines: every numeric leaf at step = round, as float32."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in lines:
        for tag, value in flatten_scalars(line, prefix=prefix).items():
            out.setdefault(tag, []).append((line["round"], f32(value)))
    return out


# --------------------------------------------------------------------------- lines and files

def test_flatten_scalars_takes_numeric_leaves_joined_with_slashes():
    line = {"node_id": "worker_1", "round": 3, "timestamp": 1.5, "hmac": "ab", "loss": -0.25, "steps": 2,
            "published": True, "skipped_step": "", "sizes": [1, 2], "timings": {"generate_s": 0.1, "deep": {"x": 1}},
            "huge": 10 ** 30, "far": 1e300, "bad key": 1.0, "external_dropped": {}}
    assert flatten_scalars(line) == {"loss": -0.25, "steps": 2.0, "timings/generate_s": 0.1, "timings/deep/x": 1.0}
    assert flatten_scalars({"round": 1, "toy_copy": {"accuracy": 0.5}}, prefix="eval/") == {"eval/toy_copy/accuracy": 0.5}


def test_jsonl_tail_reads_only_complete_new_lines_and_rereads_a_replaced_or_cut_file(tmp_path):
    path = tmp_path / "m.jsonl"
    tail = JsonlTail(path)
    assert tail.read() == []  # missing
    path.write_bytes(b'{"a":1}\n{"b":')
    assert tail.read() == [b'{"a":1}']
    assert tail.read() == []  # the partial line waits for its newline
    with open(path, "ab") as f:
        f.write(b'2}\n')
    assert tail.read() == [b'{"b":2}']
    path.write_bytes(b'{"c":3}\n')  # cut (shorter than the offset): from its start
    assert tail.read() == [b'{"c":3}']
    new = tmp_path / "new"
    new.write_bytes(b'{"c":3}\n{"d":4}\n')
    os.replace(new, path)  # replaced by another file (another inode): from its start
    assert tail.read() == [b'{"c":3}', b'{"d":4}']
    path.unlink()
    os.mkfifo(path)  # never opened, never blocks
    with pytest.raises(fsio.BadFile):
        tail.read()


# --------------------------------------------------------------------------- the streamer, TensorBoard

@needs_tensorboard
def test_signed_metrics_and_eval_lines_stream_once_and_forged_ones_never(tmp_path):
    exp = Exp(tmp_path)
    exp.write("worker_1", 0, 1, 2)
    exp.write("worker_2", 0, 1)
    exp.write("worker_1", 1, kind="evals")
    fsio.append_bytes(exp.layout.metrics_file("worker_1"), b'{"node_id":"worker_1","round":3,"reward_local":9.0}\n')
    fsio.append_bytes(exp.layout.metrics_file("worker_1"),
                      Signer(b"x" * 32).sign(b'{"node_id":"worker_1","round":4,"reward_local":9.0}', "logs/worker_1/"
                                             "metrics.jsonl") + b"\n")
    assert exp.stream() == 3 + 2 + 1
    w1 = read_back(exp.dir / "tensorboard" / "worker_1")
    lines = [metrics("worker_1", r, r / 10) for r in range(3)]
    evals = [{"node_id": "worker_1", "round": 1, "toy_copy": {"accuracy": 0.25, "n": 16}, "basic_arithmetic": 0.25}]
    assert w1 == {**expected(lines), **expected(evals, "eval/")}
    assert w1["reward_local"] == [(0, 0.0), (1, f32(0.1)), (2, f32(0.2))]  # the forged rounds 3 and 4: never
    assert w1["timings/generate_s"] == [(0, 0.5), (1, 1.5), (2, 2.5)] and w1["eval/toy_copy/accuracy"] == [(1, 0.25)]
    assert read_back(exp.dir / "tensorboard" / "worker_2") == expected([metrics("worker_2", r, r / 10) for r in (0, 1)])
    skipped = exp.log.named("tracking_lines_skipped")
    assert len(skipped) == 1 and skipped[0]["lines"] == 2 and skipped[0]["reason"] == "unsigned"


@needs_tensorboard
def test_restarts_resume_without_duplicated_steps_even_after_a_crash_before_the_state_was_saved(tmp_path):
    exp = Exp(tmp_path)
    exp.write("worker_1", 0, 1)
    assert exp.stream() == 2
    exp.write("worker_1", 2, 3)
    assert exp.stream() == 2  # the next supervisor reads on from the saved offset
    state = exp.runtime / STATE_FILE
    exp.write("worker_1", 4)
    s = exp.streamer()
    before_crash = state.read_bytes()  # as saved when it opened its event file
    assert s.poll() == 1  # round 4 is in the event file...
    state.write_bytes(before_crash)  # ...and the supervisor dies before its state file says so
    exp.write("worker_1", 5)
    assert exp.stream() == 2
    path = exp.layout.metrics_file("worker_1")  # the metrics file replaced by a copy: read again, nothing twice
    shutil.copy(path, tmp_path / "copy")
    os.replace(tmp_path / "copy", path)
    exp.write("worker_1", 6)
    assert exp.stream() == 7
    want = expected([metrics("worker_1", r, r / 10) for r in range(7)])
    assert read_back(exp.dir / "tensorboard" / "worker_1") == want
    assert [kw for kw in exp.log.named("tracking_uncommitted_events_cut")]  # round 4's event cut, then streamed again


@needs_tensorboard
def test_a_tracker_behind_the_saved_offsets_gets_the_steps_it_lacks(tmp_path):
    exp = Exp(tmp_path)
    exp.write("worker_1", 0, 1, 2)
    exp.write("worker_2", 0)
    assert exp.stream() == 4
    want = expected([metrics("worker_1", r, r / 10) for r in range(3)])
    shutil.rmtree(exp.dir / "tensorboard" / "worker_1")  # deleted to be written again: worker_1's steps again
    assert exp.stream() == 3
    assert read_back(exp.dir / "tensorboard" / "worker_1") == want
    assert read_back(exp.dir / "tensorboard" / "worker_2") == expected([metrics("worker_2", 0, 0.0)])
    shutil.rmtree(exp.dir / "tensorboard")  # as if TensorBoard were added to report_to now
    state = exp.runtime / STATE_FILE
    state.write_bytes(state.read_bytes().replace(b'"tensorboard":', b'"old":'))
    assert exp.stream() == 4
    assert read_back(exp.dir / "tensorboard" / "worker_1") == want


# --------------------------------------------------------------------------- failures never reach training

class Raising:
    """A tracker that raises inside (at ``where``): stands for any tracker bug or I/O failure."""

    name = "wandb"
    module = None
    where = "write"

    def __init__(self, **_):
        if self.where == "init":
            raise RuntimeError("tracker broke at init")

    def write(self, entry):
        if self.where == "write":
            raise RuntimeError("tracker broke at write")

    def flush(self):
        if self.where == "flush":
            raise OSError(5, "tracker broke at flush")

    def resume_state(self):
        return {}

    def close(self):
        raise RuntimeError("and at close")


@needs_tensorboard
@pytest.mark.parametrize("where", ["init", "write", "flush"])
def test_a_tracker_raising_inside_is_disabled_and_the_supervisor_finishes(tmp_path, reaper, monkeypatch, where):
    monkeypatch.setattr(Raising, "where", where)
    monkeypatch.setenv(KEY_ENV, KEY.hex())
    monkeypatch.setenv("FAKE_NODE_MODE", "exit_after=1.0")
    monkeypatch.setenv("FAKE_NODE_RECORD", str(tmp_path / "record"))
    exp = Exp(tmp_path, report_to=("tensorboard", "wandb"))
    exp.write("worker_1", 0, 1)
    exp.write("worker_2", 0)
    sup = Supervisor(exp.config, node_command=FAKE_NODE, runtime_dir=exp.runtime, gpu=None, shared_poll_s=0.2,
                     notifier=SdNotifier(environ={}), log=exp.log)
    reaper.append(sup)
    sup.tracking.backends = {**BACKENDS, "wandb": Raising}
    assert drive(sup, lambda: sup.exit_code is not None, timeout=60)
    assert sup.exit_code == 0
    assert [kw["tracker"] for kw in exp.log.named("tracking_failed")] == ["wandb"]  # once, though close raised too
    assert all(n.status.restarts == 0 for n in sup.nodes.values())
    assert read_back(exp.dir / "tensorboard" / "worker_1") == expected([metrics("worker_1", r, r / 10) for r in (0, 1)])
    assert not [t for t in threading.enumerate() if t.name == "tracking"]


def test_a_missing_tracker_package_is_one_warning_at_launch_and_no_thread(tmp_path):
    class Absent:
        module = "no_such_tracker_package_here"

    exp = Exp(tmp_path)
    tracking = Tracking(exp.config, exp.workers, exp.runtime, environ={}, log=exp.log,
                        backends={"tensorboard": Absent})
    tracking.start()
    tracking.start()
    tracking.close(1.0)
    warned = exp.log.named("tracking_unavailable")
    assert len(warned) == 1 and "pip install -e '.[tensorboard]'" in warned[0]["detail"]
    assert tracking._thread is None and not (exp.runtime / STATE_FILE).exists()


@needs_tensorboard
def test_without_the_key_signed_lines_wait_and_are_streamed_once_it_is_there(tmp_path):
    exp = Exp(tmp_path)
    exp.write("worker_1", 0)
    s = Streamer(exp.config, exp.workers, exp.runtime, environ={}, log=exp.log)
    s.open(["tensorboard"])
    assert s.poll() == 0 and exp.log.named("tracking_waiting_for_key")
    exp.runtime.mkdir(exist_ok=True)
    fd = os.open(exp.runtime / "swarm.key", os.O_WRONLY | os.O_CREAT, 0o600)  # as the first node creates it
    os.write(fd, KEY.hex().encode())
    os.close(fd)
    assert s.poll() == 1
    s.close()


# --------------------------------------------------------------------------- W&B, offline

@pytest.mark.skipif(missing_package("wandb"), reason="the wandb extra is not installed")
def test_wandb_offline_one_run_per_node_under_the_experiment(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    exp = Exp(tmp_path, report_to=("wandb",))
    exp.write("worker_1", 0, 1)
    exp.write("worker_2", 0)
    assert exp.stream() == 3
    assert not exp.log.named("tracking_failed")
    runs = sorted((exp.dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all("-worker_" in r.name for r in runs)
    for run in runs:
        data = b"".join(p.read_bytes() for p in run.glob("*.wandb"))
        assert b"reward_local" in data and b"generate_s" in data


# --------------------------------------------------------------------------- the acceptance run

@needs_tensorboard
@pytest.mark.slow
@pytest.mark.timeout(Timeouts.of(CONFIG).budget(rounds=3))
def test_smoke_swarm_with_tensorboard_writes_event_files_whose_scalars_equal_the_metrics_lines(make_swarm):
    run = make_swarm("tracking.report_to=[tensorboard]", "experiment.max_rounds=3")
    assert run.run_to_end() == 0, run.output()[-3000:]
    logged = {e.get("event") for e in run.supervisor_log()}
    assert "tracking_started" in logged and "tracking_failed" not in logged
    for worker in run.workers:
        lines = run.metrics(worker)
        assert [m["round"] for m in lines] == [0, 1, 2]
        scalars = read_back(run.exp / "tensorboard" / worker)
        assert scalars == expected(lines), worker
        assert scalars["reward_local"] == [(m["round"], f32(m["reward_local"])) for m in lines]
        assert scalars["timings/generate_s"] == [(m["round"], f32(m["timings"]["generate_s"])) for m in lines]


RESTART = ("tracking.report_to=[tensorboard]", "experiment.max_rounds=60", "sapo.max_new_tokens=24")  # ~20 s of rounds


def tracked_rounds(run, worker: str) -> int:
    """The last round the TensorBoard tracker of ``run`` recorded for ``worker`` (-1 before any)."""
    try:
        state = json.loads((run.runtime / STATE_FILE).read_text())
        return state["trackers"]["tensorboard"]["steps"].get(f"{worker}/metrics", -1)
    except (OSError, ValueError, KeyError):
        return -1


@needs_tensorboard
@pytest.mark.slow
@pytest.mark.timeout(Timeouts.of(CONFIG, *RESTART).budget(launches=2, rounds=60))
def test_a_supervisor_killed_mid_run_then_relaunched_streams_every_round_once(make_swarm):
    run = make_swarm(*RESTART)
    run.launch()
    run.wait_for(lambda: tracked_rounds(run, "worker_1") >= 1, run.t.budget(rounds=60), "a first tracked pass")
    run.proc.send_signal(signal.SIGKILL)  # no last pass, no close: the state file is as of its last pass
    run.proc.wait(timeout=10)
    assert run.run_to_end() == 0, run.output()[-3000:]
    for worker in run.workers:
        lines = run.metrics(worker)
        assert [m["round"] for m in lines] == list(range(60))
        assert read_back(run.exp / "tensorboard" / worker) == expected(lines), worker
