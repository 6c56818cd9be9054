"""One view of the whole swarm (issue 15 item 3): `swarm status`, `swarm validate` and `swarm report` cover
every host's nodes, read from a real experiment dir whose files were written through SharedStore with a
Signer, as the nodes write them: host A runs the coordinator and worker_1..2, host B (its clock two minutes
ahead) ran hostb-worker_1 (joined at round 1, logged round 0 as skipped) and hostb-worker_2 (joined at round 2,
logged nothing). Junk names in peers/ and logs/ are bounded, and hostile values are escaped."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from rich.console import Console

from fake_node import config_yaml, fake_config
from node.config import resolve_config
from node.layout import ExperimentLayout
from node.records import RunRecords
from node.schemas import (ConfigSnapshot, PeerRecord, Rollout, RolloutFile, RoundResult, RoundState, TaskRef)
from node.signing import Signer
from node.storage import SharedStore
from supervisor import cli, live, statusview
from supervisor.report import build_report
from supervisor.runfiles import RuntimePaths
from supervisor.status import SwarmScan, swarm_store, with_ages
from supervisor.terminal import escape_controls
from supervisor.validate import validate_experiment
from supervisor.watch import SharedPoller
import test_cli
from test_cli import fabricated_status
from test_daemon import RecordingLog

rt = test_cli.rt  # a fixture: this test's $SWARM_RUNTIME_DIR
KEY = bytes(range(32))
SKEW_S = 120.0  # host B's clock is two minutes ahead
ROUNDS = 3
HOSTILE = "evil\x1b[2J\x1b]0;pwned\x07\x9b31m"
INJECTED = ("\x1b[2J", "\x1b]0;", "\x07", "\x9b")
HOST_A = [("coordinator", "coordinator", []), ("worker_1", "worker", [0, 1, 2]), ("worker_2", "worker", [0, 1, 2])]
HOST_B = [("hostb-worker_1", "worker", [1, 2]), ("hostb-worker_2", "worker", [2])]


class Experiment:
    """A small finished experiment of two hosts in ``tmp_path/shared``, every file signed with :data:`KEY`."""

    def __init__(self, tmp_path: Path, runtime_dir: Path | None = None):
        self.tmp = tmp_path
        self.config = fake_config(tmp_path / "shared", workers=2)
        self.layout = ExperimentLayout.from_config(self.config)
        self.now = time.time()
        self.progress: dict[str, int] = {}
        if runtime_dir is not None:  # host A's key where its supervisor keeps it
            runtime_dir.mkdir(parents=True, exist_ok=True)
            (runtime_dir / "swarm.key").write_text(KEY.hex() + "\n")
            (runtime_dir / "swarm.key").chmod(0o600)
        coordinator = self.store("coordinator")
        coordinator.ensure_layout()
        coordinator.write_json_atomic(self.layout.state_file(), RoundState(
            experiment="fake", round=ROUNDS, stage=0, started_at=self.now, updated_at=self.now, finished=True,
            max_rounds=ROUNDS).to_json())
        coordinator.write_json_atomic(self.layout.config_file(), ConfigSnapshot(
            experiment="fake", written_by="coordinator", written_at=self.now,
            config={"experiment": {"name": "fake", "max_rounds": ROUNDS}}).to_json())
        for host, skew, nodes in (("hosta", 0.0, HOST_A), ("hostb", SKEW_S, HOST_B)):
            for node, role, rounds in nodes:
                self.beat(node, host, role, skew=skew)
                if role == "worker":
                    self.train(node, rounds)

    def store(self, node: str) -> SharedStore:
        return SharedStore(self.layout, node_id=node, lock_dir=self.tmp / "locks", spool_dir=self.tmp / "spool" / node,
                           signer=Signer(KEY))

    def beat(self, node: str, host: str, role: str, *, skew: float = 0.0, rnd: int = ROUNDS - 1) -> None:
        """The node's peer record, as its PeerRegistration writes it (a new version each time)."""
        self.progress[node] = self.progress.get(node, 0) + 1
        self.store(node).write_json_atomic(self.layout.peer_file(node), PeerRecord(
            node_id=node, role=role, pid=4242, host=host, started_at=self.now + skew,
            heartbeat_at=time.time() + skew, round=rnd, progress=self.progress[node], status="running").to_json())

    def train(self, node: str, rounds: list[int]) -> None:
        """What a worker writes for each round it trains; one that joined a running experiment at round 1
        logged round 0 as skipped, as node.worker does."""
        store = self.store(node)
        records = RunRecords(store, self.layout, node)
        records.event("started")
        if rounds[0] == 1:
            records.event("rounds_skipped", rounds=[0], joined=1)
        task = TaskRef("basic_arithmetic", 1, 0)
        group = [Rollout("2+2=", "<answer>4</answer>", 1.0, True, task), Rollout("2+2=", "5", 0.0, True, task)]
        for r in rounds:
            store.publish(self.layout.rollout_file(r, 0, node), RolloutFile(node, r, 0, self.now, {"0": group}).to_json())
            store.publish(self.layout.reward_file(r, 0, node), RoundResult(node, r, 0, 0.5, 1, 1, self.now).to_json())
            records.metrics(r, {"reward_local": 0.25 * (r + 1)})
        records.event("finished", round=rounds[-1])
        store.sync(10.0)


def plain_status(section: dict, now: float | None = None) -> str:
    return statusview.render_status(None, running_pid=None, runtime_dir=Path("/rt"), experiment="fake", swarm=section,
                                    now=now)


def rows(text: str) -> dict[str, list[str]]:
    """node -> the cells of its row in the swarm table (plain text)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("NODE ") and "SIGNATURE" in line)
    out = {}
    for line in lines[start + 1:]:
        cells = line.split()
        if len(cells) != 8:
            break
        out[cells[0]] = cells
    return out


# --------------------------------------------------------------------------- swarm status

def test_status_lists_every_hosts_nodes_with_rewards_and_checked_signatures(tmp_path, capsys):
    rt_dir = tmp_path / "rt"
    ex = Experiment(tmp_path, rt_dir)
    code = live.show_status(RuntimePaths(rt_dir), "fake", as_json=False, watch=False, console=None, config=ex.config)
    out = capsys.readouterr().out
    assert code == live.EXIT_NOT_RUNNING  # no supervisor on this host: the swarm is listed all the same
    assert "Swarm (shared dir " in out and "5 node(s) on 2 host(s); signatures checked with the experiment key" in out
    table = rows(out)
    assert list(table) == ["coordinator", "worker_1", "worker_2", "hostb-worker_1", "hostb-worker_2"]  # by host
    assert [table[n][1] for n in table] == ["hosta"] * 3 + ["hostb"] * 2
    assert table["hostb-worker_2"][2:5] == ["worker", "2", "running"]
    assert table["worker_1"][6] == "0.750" and table["hostb-worker_1"][6] == "0.750" and table["coordinator"][6] == "-"
    assert all(cells[7] == "checked" for cells in table.values())
    # First sight: ages by the writer's clock, marked; host B's two minutes ahead show as a negative age.
    assert table["hostb-worker_1"][5].startswith("-1") and table["hostb-worker_1"][5].endswith("*")
    assert "* age by the writer's clock" in out

    assert live.show_status(RuntimePaths(rt_dir), "fake", as_json=True, watch=False, console=None,
                            config=ex.config) == live.EXIT_NOT_RUNNING
    shown = json.loads(capsys.readouterr().out)["swarm"]
    by_node = {n["node"]: n for n in shown["nodes"]}
    assert shown["verified"] is True and shown["hosts"] == 2 and shown["refused"] == {}
    assert by_node["hostb-worker_1"]["age_clock"] == "writer" and by_node["hostb-worker_1"]["age_s"] < -100
    assert by_node["hostb-worker_2"]["reward"] == 0.75 and by_node["worker_2"]["verified"] is True


def test_a_record_seen_changing_is_dated_by_our_clock_not_the_writers(tmp_path):
    ex = Experiment(tmp_path)
    store, note = swarm_store(ex.layout, tmp_path / "rt-b", environ={"SWARM_KEY": KEY.hex()})
    clock = [1000.0]
    scan = SwarmScan(store, key_note=note, clock=lambda: clock[0])
    first = {n["node"]: n for n in with_ages(scan.scan(), clock[0])["nodes"]}
    assert first["hostb-worker_1"]["age_clock"] == "writer" and "$SWARM_KEY" in note
    clock[0] = 1010.0
    ex.beat("hostb-worker_1", "hostb", "worker", skew=SKEW_S)  # a new version, dated two minutes ahead
    section = scan.scan()
    later = {n["node"]: n for n in with_ages(section, 1013.0)["nodes"]}
    assert later["hostb-worker_1"]["age_clock"] == "local" and later["hostb-worker_1"]["age_s"] == pytest.approx(3.0)
    assert later["hostb-worker_2"]["age_clock"] == "writer"  # not seen changing yet
    replayed = ex.layout.peer_file("hostb-worker_1")
    old = replayed.read_bytes()
    ex.beat("hostb-worker_1", "hostb", "worker", skew=SKEW_S)
    clock[0] = 1020.0
    scan.scan()
    replayed.write_bytes(old)  # an older copy put back (a replay): not a sign of life
    clock[0] = 1030.0
    again = {n["node"]: n for n in with_ages(scan.scan(), 1031.0)["nodes"]}
    assert again["hostb-worker_1"]["age_s"] == pytest.approx(11.0)  # dated at 1020, its last real change
    text = plain_status(section, now=1013.0)
    assert rows(text)["hostb-worker_1"][5] == "3.0s"


def test_without_the_key_records_are_listed_unverified_and_with_it_forgeries_are_refused(tmp_path):
    ex = Experiment(tmp_path)
    forged = ex.layout.peer_file("hostc-worker_1")
    forged.write_text(json.dumps(PeerRecord(node_id="hostc-worker_1", role="worker", pid=1, host="hostc",
                                            started_at=1.0, heartbeat_at=1.0, round=0, progress=1,
                                            status="running").to_json()))
    store, note = swarm_store(ex.layout, tmp_path / "no-key", environ={})
    section = SwarmScan(store, key_note=note).scan()
    text = plain_status(section)
    assert "UNVERIFIED: no experiment key on this host" in text and section["verified"] is False
    table = rows(text)
    assert len(table) == 6 and {cells[7] for cells in table.values()} == {"unverified"}

    store, note = swarm_store(ex.layout, tmp_path / "no-key", environ={"SWARM_KEY": KEY.hex()})
    section = SwarmScan(store, key_note=note).scan()
    assert "hostc-worker_1" not in rows(plain_status(section)) and section["refused"] == {"unsigned": 1}
    assert "peer files refused: unsigned 1" in plain_status(section)
    store, note = swarm_store(ex.layout, tmp_path / "no-key", environ={"SWARM_KEY": "not hex"})
    assert "UNVERIFIED: the experiment key is unusable" in note and not store.signer.enabled


class CountingFS:
    """The store's OS calls, counted by name (a real filesystem underneath)."""

    def __init__(self):
        from node.fsio import RealFS

        self.real, self.calls = RealFS(), {}

    def __getattr__(self, name):
        call = getattr(self.real, name)

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return call(*args, **kwargs)
        return counted


def test_junk_peer_names_are_bounded_and_real_peers_still_found(tmp_path):
    ex = Experiment(tmp_path)
    for i in range(3000):  # junk, some of it named like the ids supervisors give
        (ex.layout.peers_dir() / (f"junk{i}.json" if i % 3 else f"x{i}-worker_{i + 1}.json")).write_text("{}")
    (ex.layout.peers_dir() / f"{HOSTILE}.json").write_text("{}")  # not a node id: never looked at
    fs = CountingFS()
    store = SharedStore(ex.layout, signer=Signer(KEY), fs=fs)
    scan = SwarmScan(store, max_reads=64, max_rows=3, first=["coordinator", "worker_1", "worker_2"])
    section = scan.scan()
    assert fs.calls["open"] <= 64 + 5  # at most max_reads records, plus the metrics tails of the rows
    assert fs.calls["lstat"] <= 2 * (64 + 5) and fs.calls["listdir"] <= 2  # peers/, then logs/ to rank names
    assert section["listed"] == 3005 and section["looked_at"] == 64 and section["not_looked_at"] == 3005 - 64
    assert [n["node"] for n in section["nodes"]] == ["coordinator", "worker_1", "worker_2"] and section["more"] == 2
    assert section["hosts"] == 2  # every real node found in the first scan: those with logs/ come first
    text = plain_status(section)
    assert "+2 more node(s) not listed" in text and "2941 not looked at in this scan" in text
    calls = dict(fs.calls)
    scan.scan()  # known peers are not read again while unchanged (one lstat each)
    assert fs.calls["open"] - calls.get("open", 0) <= 64 - 5


def test_status_escapes_hostile_values_in_plain_text_and_on_a_terminal(tmp_path):
    ex = Experiment(tmp_path)
    record = PeerRecord(node_id="hostb-worker_1", role="worker", pid=1, host="hostb", started_at=ex.now,
                        heartbeat_at=ex.now, round=0, progress=9, status="running").to_json()
    path = ex.layout.peer_file("hostb-worker_1")
    ex.store("hostb-worker_1").write_json_atomic(path, record | {"host": HOSTILE})  # signed, but not a record
    store, note = swarm_store(ex.layout, tmp_path / "rt", environ={"SWARM_KEY": KEY.hex()})
    section = SwarmScan(store, key_note=note).scan()
    assert "hostb-worker_1" not in {n["node"] for n in section["nodes"]} and section["refused"] == {"schema": 1}
    # status.json (the supervisor's scan) is read back like any untrusted file: every value is escaped.
    section["nodes"][1]["host"] = section["nodes"][1]["status"] = HOSTILE
    section["experiment_dir"], section["refused"], section["hosts"] = HOSTILE, {HOSTILE: HOSTILE}, HOSTILE
    text = plain_status(section)
    assert not [seq for seq in INJECTED if seq in text]
    assert rows(text)["worker_1"][1] == escape_controls(HOSTILE) and f"peer files refused: {escape_controls(HOSTILE)} ?" in text
    out = io.StringIO()
    Console(file=out, force_terminal=True, width=200, color_system="standard").print(
        statusview.status_renderable(None, running_pid=None, runtime_dir=tmp_path, experiment="fake", swarm=section))
    shown = out.getvalue()
    assert not [seq for seq in INJECTED if seq in shown] and "SIGNATURE" in shown and "evil\\x1b[2J" in shown


# --------------------------------------------------------------------------- the supervisor's own scan

def test_the_supervisors_poller_scans_the_swarm_and_status_shows_it_with_our_clock(tmp_path, rt, capsys):
    ex = Experiment(tmp_path, rt)
    poller = SharedPoller(ex.layout, ["worker_1", "worker_2"], interval_s=1.0, log=RecordingLog(), runtime_dir=rt,
                          environ={})
    poller.poll(wait_s=10.0)
    ex.beat("hostb-worker_2", "hostb", "worker", skew=SKEW_S)
    poller.poll(wait_s=10.0)
    swarm = poller.swarm
    assert swarm["verified"] is True and len(swarm["nodes"]) == 5
    st = fabricated_status(rt)  # a running supervisor (this process) whose status.json carries its scan
    st["swarm"] = swarm
    (rt / "status.json").write_text(json.dumps(st))
    assert live.show_status(RuntimePaths(rt), "fake", as_json=False, watch=False, console=None) == 0
    out = capsys.readouterr().out
    table = rows(out)
    assert out.index("Supervisor pid") < out.index("NODE ") < out.index("Swarm (shared dir ")  # under our table
    assert not table["hostb-worker_2"][5].endswith("*") and table["hostb-worker_1"][5].endswith("*")


# --------------------------------------------------------------------------- swarm validate

def _failed(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("FAIL")]


def test_validate_checks_every_hosts_workers_and_a_late_joiner_is_not_missing_rounds(tmp_path, rt, capsys):
    ex = Experiment(tmp_path)
    cfg = config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared", workers=2)
    assert cli.main(["validate", str(cfg)]) == 0
    out = capsys.readouterr().out
    for node in ("worker_1", "worker_2", "hostb-worker_1", "hostb-worker_2"):
        assert f"PASS  {node} metrics" in out and f"PASS  {node} rollouts" in out
    assert "2 lines, rounds 1-2, skipped 0\n" in out  # hostb-worker_1 logged round 0 as skipped when it joined
    assert "1 lines, rounds 2, joined at round 2\n" in out  # hostb-worker_2 did not: rounds 0-1 are not missing
    assert "17/17 checks passed: OK" in out

    # A round missing after the joiner's first is a failure like any other.
    metrics = ex.layout.metrics_file("hostb-worker_1")
    metrics.write_text(metrics.read_text().splitlines(keepends=True)[0])  # round 1 only
    assert cli.main(["validate", str(cfg)]) == 1
    fails = _failed(capsys.readouterr().out)
    assert any("hostb-worker_1 metrics" in f and "no line for rounds 2" in f for f in fails)


def test_validate_bounds_junk_names_and_ignores_what_is_no_worker(tmp_path, rt, capsys):
    ex = Experiment(tmp_path)
    cfg = resolve_config(config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared", workers=2))
    (ex.layout.logs_dir() / HOSTILE).mkdir()
    (ex.layout.logs_dir() / "empty").mkdir()  # no metrics: not a worker
    (ex.layout.peers_dir() / "junk.json").write_text("{}")  # not a record: not a worker (the peers check fails)
    checks = {c.name: c for c in validate_experiment(cfg)}
    assert [name for name, c in checks.items() if not c.ok] == ["peers"] and len(checks) == 17
    for i in range(300):
        (ex.layout.peers_dir() / f"a{i:03d}.json").write_text("{}")
    checks = {c.name: c for c in validate_experiment(cfg)}
    # 304 candidates (hostb-worker_1..2, empty, junk and these 300) beyond the config's: 48 over the cap
    assert not checks["workers"].ok and "48 more node names under logs/ and peers/ not looked at" in checks["workers"].detail
    assert checks["hostb-worker_1 metrics"].ok  # ids like the ones supervisors give are looked at first
    assert cli.main(["validate", str(config_yaml(tmp_path / "cfg.yaml", tmp_path / "shared", workers=2))]) == 1
    assert not [seq for seq in INJECTED if seq in capsys.readouterr().out]


# --------------------------------------------------------------------------- swarm report

def test_report_covers_every_hosts_workers_with_their_hosts(tmp_path):
    ex = Experiment(tmp_path)
    ex.beat("hostc-worker_1", "hostc", "worker")  # registered, no metrics yet
    for i in range(300):  # junk directories sorted before the real ones
        (ex.layout.logs_dir() / f"a{i:03d}").mkdir()
    report = build_report([ex.layout.root], tmp_path / "report")
    (row,) = report.experiments
    assert row.workers == 4 and row.rounds == 3
    workers = {w["node"]: w for w in row.per_worker}
    assert workers["hostb-worker_1"] == {"node": "hostb-worker_1", "host": "hostb", "rounds": 2, "first_round": 1,
                                         "last_round": 2, "mean_reward": pytest.approx(0.625), "restarts": 0}
    assert workers["worker_2"]["host"] == "hosta" and workers["hostc-worker_1"]["rounds"] == 0
    assert [w["node"] for w in row.per_worker][-1] == "hostc-worker_1"
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Workers" in md and "| fake | hostb-worker_2 | hostb | 1 | 2–2 | 0.750 | 0 |" in md
    assert any("more node directories under logs/ not read (at most 256)" in w for w in report.warnings)
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert {w["node"] for w in saved["experiments"][0]["per_worker"]} == set(workers)


def test_report_escapes_a_hostile_host(tmp_path):
    ex = Experiment(tmp_path)
    ex.beat("hostb-worker_1", "evil | host", "worker")  # the schema refuses control characters in a host
    report = build_report([ex.layout.root], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    (line,) = [x for x in md.splitlines() if "| hostb-worker_1 |" in x]
    assert "evil \\| host" in line and line.count(" | ") == 6  # the table keeps its columns
    assert report.experiments[0].workers == 4
