"""Experiment tracking (``tracking.report_to``): every worker's metrics and eval lines, streamed to TensorBoard
and/or W&B by the supervisor, so the nodes stay unchanged and never wait for a tracker.

:class:`Tracking` runs one daemon thread, started on the supervisor's first tick and stopped when it
finishes (after a last pass, so every line the nodes wrote is streamed). Each pass (:meth:`Streamer.poll`,
every ``interval_s``) reads what was appended to each worker's ``logs/<node>/metrics.jsonl`` and
``logs/<node>/evals.jsonl`` since the last pass (:class:`supervisor.tracking_lines.JsonlTail`: checked
reads, offsets kept, a replaced or cut file read again), checks every line (its HMAC with the experiment key
when ``exchange.require_signatures``: unsigned or forged lines are never streamed; then its schema) and
hands each tracker the line's numeric leaves, flattened with ``/`` (``timings/generate_s``), at step =
round; eval lines' tags start with ``eval/``. A line whose round is not after the last one a tracker got
from that node's file is skipped, so re-reading a file never duplicates a step.

Resuming: after every pass the state file ``<runtime dir>/tracking.json`` records, atomically, each file's
(inode, offset, last round read) and each tracker's last step per file plus what it needs to resume
(:meth:`resume_state`: TensorBoard's committed event file sizes). The next supervisor reads on from the
offsets unless some tracker is behind them (a tracker added to ``report_to``, or one that failed): then
the files are read from their start and each tracker gets only the steps it lacks. A state written for
another experiment directory (the same name, deleted and made again) is discarded.

Failures stay inside the thread: a tracker whose package is missing is one ``tracking_unavailable``
warning at launch; an exception inside a tracker is one ``tracking_failed`` error, and that tracker is
disabled for the rest of the run; training goes on either way.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

from node import fsio
from node.confine import Confinement
from node.layout import ExperimentLayout
from node.signing import KeyProblem, Signer, resolve_key
from node.strict_json import encode_json, parse_json_bytes
from node.warn_once import reason_kind
from supervisor.tracking_backends import BACKENDS, missing_package
from supervisor.tracking_lines import KINDS, Entry, JsonlTail, parse_line, stream_key

STATE_FILE = "tracking.json"
STATE_VERSION = 1
STATE_MAX_BYTES = 4 * 1024 * 1024
EVALS_FILE = "evals.jsonl"  # logs/<node>/evals.jsonl: held-out evaluation lines
MAX_WARNED = 1000  # (path, event, reason kind) warned about, remembered


def _count(value: Any, default: int) -> int:
    return value if type(value) is int and value >= -1 else default


class Streamer:
    """The passes of the tracking thread: :meth:`open` the trackers, :meth:`poll`, :meth:`close` (see the
    module docstring). Used by one thread only; tests drive it directly."""

    def __init__(self, config, workers: Iterable[str], runtime_dir: Path | str, *, environ: Mapping[str, str],
                 log: Any, backends: Mapping[str, type] = BACKENDS):
        layout = ExperimentLayout.from_config(config)
        self.layout = layout
        self.exp_dir = Path(os.path.abspath(layout.root))
        self.section = config.tracking
        self.experiment = config.experiment.name
        self.required = bool(config.exchange.require_signatures)
        self.runtime_dir = Path(runtime_dir)
        self.state_path = self.runtime_dir / STATE_FILE
        self.workers = list(workers)
        self.environ = dict(environ)
        self.log = log
        self.backends = backends
        self.trackers: list[Any] = []  # the live ones
        self.steps: dict[str, dict[str, int]] = {}  # tracker -> stream -> last step it was given
        self.saved: dict[str, dict] = {}  # tracker -> its state after its last good flush
        self.tails: dict[str, tuple[str, str, JsonlTail, str]] = {}  # stream -> (node, kind, tail, context)
        self.read_round: dict[str, int] = {}  # stream -> the last round read from it
        self._signer: Signer | None = None
        self._opened = False
        self._warned: set[tuple] = set()
        self._confine = Confinement([self.exp_dir], fsio.REAL_FS)

    # ---------------------------------------------------------------- open, poll, close

    def open(self, names: Iterable[str]) -> None:
        """Load the state file, start each named tracker (one failing is disabled), place the tails."""
        state = self._load_state()
        saved_trackers = state.get("trackers") if isinstance(state.get("trackers"), dict) else {}
        for name in names:
            saved = saved_trackers.get(name) if isinstance(saved_trackers.get(name), dict) else {}
            steps = saved.get("steps") if isinstance(saved.get("steps"), dict) else {}
            self.steps[name] = {k: v for k, v in steps.items() if isinstance(k, str) and type(v) is int}
            resume = saved.get("resume") if isinstance(saved.get("resume"), dict) else {}
            self.saved[name] = {"steps": dict(self.steps[name]), "resume": resume}
            try:
                tracker = self.backends[name](
                    experiment_dir=self.exp_dir, nodes=self.workers, resume=resume, confine=self._confine.check_inside,
                    experiment=self.experiment, project=self.section.wandb_project, mode=self.section.wandb_mode,
                    log=self.log)
                resume = tracker.resume_state()
            except Exception as err:  # noqa: BLE001 - a tracker never takes the supervisor down
                self._report_failure(name, err)
                continue
            self.trackers.append(tracker)
            for node in getattr(tracker, "lost_nodes", ()):  # its earlier output is gone: every step again
                for kind in KINDS:
                    self.steps[name].pop(stream_key(node, kind), None)
            self.saved[name] = {"steps": dict(self.steps[name]), "resume": resume}
        streams = state.get("streams") if isinstance(state.get("streams"), dict) else {}
        for node in self.workers:
            for kind in KINDS:
                self._place_tail(node, kind, streams.get(stream_key(node, kind)))
        self._opened = True
        self._save_state()

    def poll(self) -> int:
        """One pass: the new lines of every file to every live tracker; returns how many lines were read."""
        if not self.trackers:
            return 0
        signer = self._signer_or_none()
        if signer is None:
            return 0
        entries = [e for key in self.tails for e in self._read(key, signer)]
        if entries:
            for tracker in list(self.trackers):
                self._feed(tracker, entries)
            self._save_state()
        return len(entries)

    def close(self) -> None:
        """Close every live tracker (a failure is logged) and record the state."""
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as err:  # noqa: BLE001
                self._report_failure(tracker.name, err)
        self.trackers = []
        if self._opened:
            self._save_state()

    # ---------------------------------------------------------------- reading

    def _place_tail(self, node: str, kind: str, saved: Any) -> None:
        """The tail of one file, reading on from the saved offset only when no live tracker is behind it."""
        key = stream_key(node, kind)
        path = self.layout.metrics_file(node) if kind == "metrics" else self.layout.log_dir(node) / EVALS_FILE
        context = Path(os.path.relpath(os.path.abspath(path), self.exp_dir)).as_posix()  # what its lines are signed for
        tail = JsonlTail(path)
        self.read_round[key] = -1
        if isinstance(saved, dict) and type(saved.get("ino")) is int and type(saved.get("offset")) is int:
            last = _count(saved.get("round"), -1)
            if saved["offset"] >= 0 and all(self.steps[t.name].get(key, -1) >= last for t in self.trackers):
                tail = JsonlTail(path, ino=saved["ino"], offset=saved["offset"])
                self.read_round[key] = last
        self.tails[key] = (node, kind, tail, context)

    def _read(self, key: str, signer: Signer) -> list[Entry]:
        node, kind, tail, context = self.tails[key]
        try:
            lines = tail.read()
        except (fsio.BadFile, OSError) as err:
            reason = err.reason if isinstance(err, fsio.BadFile) else (err.strerror or type(err).__name__)
            self._warn(tail.path, "tracking_file_refused", reason)
            return []
        entries, bad, first = [], 0, ""
        for raw in lines:
            if not raw.strip():
                continue
            try:
                entries.append(parse_line(raw, node=node, kind=kind, verify=lambda b: signer.verify(b, context)))
            except ValueError as err:
                bad, first = bad + 1, first or str(err)
        if bad:
            self._warn(tail.path, "tracking_lines_skipped", first, lines=bad)
        if entries:
            self.read_round[key] = max(self.read_round[key], max(e.step for e in entries))
        return entries

    def _signer_or_none(self) -> Signer | None:
        """The experiment key's signer (looked up as a node does, never created); None while signatures are
        required and there is no key yet (the lines wait, unread)."""
        if self._signer is None:
            try:
                key, _ = resolve_key(key_file=None, runtime_dir=self.runtime_dir, environ=self.environ, create=False)
            except KeyProblem as err:
                key = None
                self._warn(self.runtime_dir, "tracking_key_unusable", str(err))
            if key is None and self.required:
                self._warn(self.runtime_dir, "tracking_waiting_for_key",
                           "no experiment key yet: signed lines cannot be checked, nothing is streamed")
                return None
            self._signer = Signer(key, required=self.required)
        return self._signer

    # ---------------------------------------------------------------- the trackers

    def _feed(self, tracker: Any, entries: list[Entry]) -> None:
        """Every entry after the tracker's last step of its file, then a flush; its steps advance only then."""
        steps = self.steps[tracker.name]
        done: dict[str, int] = {}
        try:
            for e in entries:
                if e.step > done.get(e.stream, steps.get(e.stream, -1)):
                    if e.scalars:
                        tracker.write(e)
                    done[e.stream] = e.step
            tracker.flush()
            resume = tracker.resume_state()
        except Exception as err:  # noqa: BLE001 - a tracker never takes the supervisor down
            self._disable(tracker, err)
            return
        steps.update(done)
        self.saved[tracker.name] = {"steps": dict(steps), "resume": resume}

    def _disable(self, tracker: Any, err: Exception) -> None:
        self.trackers.remove(tracker)
        self._report_failure(tracker.name, err)
        try:
            tracker.close()
        except Exception:  # noqa: BLE001 - already failed and reported
            pass

    def _report_failure(self, name: str, err: Exception) -> None:
        if ("failed", name) not in self._warned:
            self._warned.add(("failed", name))
            self.log.error("tracking_failed", tracker=name, error=f"{type(err).__name__}: {err}"[:500],
                           detail=f"{name} is disabled for this run; training goes on")

    def _warn(self, path: Path, event: str, reason: str, **fields) -> None:
        """Log ``event`` once per (path, reason kind): the thread reads every few seconds."""
        key = (str(path), event, reason_kind(reason))
        if key in self._warned or len(self._warned) >= MAX_WARNED:
            return
        self._warned.add(key)
        self.log.warning(event, path=str(path), reason=reason, **fields)

    # ---------------------------------------------------------------- the state file

    def _experiment_id(self) -> list[int] | None:
        try:
            st = os.stat(self.exp_dir)
        except OSError:
            return None
        return [st.st_dev, st.st_ino]

    def _load_state(self) -> dict:
        """The state file as a dict; {} when missing, unreadable, or written for another experiment dir."""
        try:
            data, _ = fsio.read_capped(self.state_path, STATE_MAX_BYTES)
            state = parse_json_bytes(data)
        except FileNotFoundError:
            return {}
        except (fsio.BadFile, OSError, ValueError) as err:
            self._warn(self.state_path, "tracking_state_ignored", str(err))
            return {}
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            self._warn(self.state_path, "tracking_state_ignored", "not a tracking state of this version")
            return {}
        if state.get("experiment_id") != self._experiment_id():
            self.log.info("tracking_state_reset", path=str(self.state_path),
                          detail="written for another experiment directory of this name; streaming from the start")
            return {}
        return state

    def _save_state(self) -> None:
        state = {"version": STATE_VERSION, "experiment_dir": str(self.exp_dir), "experiment_id": self._experiment_id(),
                 "streams": {key: {"ino": tail.ino, "offset": tail.offset, "round": self.read_round[key]}
                             for key, (_, _, tail, _) in self.tails.items() if tail.ino is not None},
                 "trackers": self.saved}
        try:
            fsio.write_atomic(self.state_path, encode_json(state))
        except OSError as err:
            self._warn(self.state_path, "tracking_state_not_saved", err.strerror or str(err))


class Tracking:
    """The tracking thread of one supervisor (see the module docstring); does nothing when ``report_to`` is
    empty. :meth:`start` and :meth:`close` are called from the supervisor's loop; they never block on a
    tracker, except :meth:`close` for up to ``wait_s``."""

    def __init__(self, config, workers: Iterable[str], runtime_dir: Path | str, *, environ: Mapping[str, str],
                 log: Any, interval_s: float = 5.0, backends: Mapping[str, type] = BACKENDS):
        self.config = config
        self.names = tuple(config.tracking.report_to)
        self.workers = list(workers)
        self.runtime_dir = Path(runtime_dir)
        self.environ = environ
        self.log = log
        self.interval_s = interval_s
        self.backends = backends
        self.exp_dir = Path(config.experiment_dir)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._started = False

    def start(self) -> None:
        """Once (later calls do nothing): one warning per tracker whose package is missing, then the thread
        for the others."""
        if self._started:
            return
        self._started = True
        usable = []
        for name in self.names:
            module = getattr(self.backends[name], "module", None)
            if missing_package(module):
                self.log.warning("tracking_unavailable", tracker=name,
                                 detail=f"the {module} package is not installed (pip install -e '.[{name}]'); "
                                 f"training goes on without {name}")
            else:
                usable.append(name)
        if usable:
            self._thread = threading.Thread(target=self._run, args=(usable,), name="tracking", daemon=True)
            self._thread.start()

    def close(self, wait_s: float) -> None:
        """Stop the thread after a last pass (the lines the nodes wrote before exiting), waiting up to
        ``wait_s``; a thread still busy then is left to end with the process (its state file is current as
        of its last pass)."""
        self._stop.set()
        thread = self._thread
        if thread is None:
            return
        thread.join(wait_s)
        if thread.is_alive():
            self.log.warning("tracking_close_slow", waited_s=wait_s,
                             detail="a tracker did not finish in time; its last lines may be missing until the "
                             "next launch streams them")

    def _run(self, names: list[str]) -> None:
        streamer = Streamer(self.config, self.workers, self.runtime_dir, environ=self.environ, log=self.log,
                            backends=self.backends)
        try:
            while not self.exp_dir.is_dir():  # the nodes create it; the thread never does
                if self._stop.wait(self.interval_s) and not self.exp_dir.is_dir():
                    return
            streamer.open(names)
            if not streamer.trackers:
                return
            self.log.info("tracking_started", trackers=[t.name for t in streamer.trackers],
                          experiment_dir=str(streamer.exp_dir), state=str(streamer.state_path))
            streamer.poll()
            while not self._stop.wait(self.interval_s):
                streamer.poll()
            streamer.poll()  # the last lines
        except Exception as err:  # noqa: BLE001 - the thread's own failure: tracking ends, training goes on
            self.log.error("tracking_failed", tracker="all", error=f"{type(err).__name__}: {err}"[:500],
                           detail="tracking stopped for this run; training goes on")
        finally:
            streamer.close()

