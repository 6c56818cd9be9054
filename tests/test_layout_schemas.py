"""node.layout (every path of the shared dir) and node.schemas (every file format), incl. hostile inputs."""

from __future__ import annotations

import copy
import math

import pytest

from node.layout import ExperimentLayout, check_node_id, parse_round_dir
from node.schemas import (
    ConfigSnapshot,
    PeerRecord,
    Rollout,
    RolloutFile,
    RolloutLimits,
    RoundResult,
    RoundState,
    SchemaError,
    TaskRef,
    validate_metrics_line,
)

BAD_IDS = ["../x", "/abs", "..", "a/b", "wor\x00ker", "worker\n1", "", "-x", ".hidden", "a" * 65, "wörker"]


@pytest.fixture
def layout(tmp_path) -> ExperimentLayout:
    return ExperimentLayout.for_experiment(tmp_path, "exp1")


# -- layout -------------------------------------------------------------------------------------------

def test_layout_paths_follow_the_seeds(layout, tmp_path):
    root = tmp_path / "experiments" / "exp1"
    assert layout.root == root
    assert layout.archive_root == tmp_path / "archives" / "exp1"
    assert layout.state_file() == root / "state" / "current_state.json"
    assert layout.config_file() == root / "state" / "config.json"
    assert layout.supervisor_dir() == root / "state" / "supervisor"
    assert layout.peer_file("worker_1") == root / "peers" / "worker_1.json"
    assert layout.rollout_file(5, 0, "worker_1") == root / "rollouts" / "round_5" / "stage_0" / "worker_1.json"
    assert layout.reward_file(5, 1, "w2") == root / "rewards" / "round_5" / "stage_1" / "w2.json"
    assert layout.checkpoint_file(3, "worker_1") == root / "checkpoints" / "round_3" / "worker_1.pt"
    assert layout.metrics_file("worker_1") == root / "logs" / "worker_1" / "metrics.jsonl"
    assert layout.events_file("worker_1") == root / "logs" / "worker_1" / "training_events.jsonl"
    assert layout.archive_rollouts_dir(2) == tmp_path / "archives" / "exp1" / "rollouts" / "round_2"
    assert layout.relative(layout.rollout_file(1, 0, "a")) == "rollouts/round_1/stage_0/a.json"
    assert ExperimentLayout(root).archive_root == layout.archive_root


@pytest.mark.parametrize("bad", BAD_IDS)
def test_layout_rejects_unsafe_node_ids(layout, bad):
    for method in (layout.peer_file, layout.log_dir, layout.metrics_file, layout.events_file):
        with pytest.raises(ValueError):
            method(bad)
    with pytest.raises(ValueError):
        layout.rollout_file(1, 0, bad)
    with pytest.raises(ValueError):
        layout.checkpoint_file(1, bad)


@pytest.mark.parametrize("bad", [-1, True, 1.0, "1", 10**10])
def test_layout_rejects_bad_round_numbers(layout, bad):
    with pytest.raises(ValueError):
        layout.rollouts_dir(bad, 0)
    with pytest.raises(ValueError):
        layout.rewards_dir(0, bad)


def test_layout_rejects_bad_experiment_name(tmp_path):
    with pytest.raises(ValueError):
        ExperimentLayout.for_experiment(tmp_path, "../other")
    with pytest.raises(ValueError):
        check_node_id(5)


def test_ensure_dirs_and_rounds_present(layout):
    layout.ensure_dirs()
    layout.ensure_dirs()  # idempotent
    for d in layout.fixed_dirs():
        assert d.is_dir()
    for name in ["round_0", "round_3", "round_12", "round_05", "round_-1", "round_1.tmp", "round_", "x", "round_٣"]:
        (layout.root / "rollouts" / name).mkdir()
    assert layout.rounds_present("rollouts") == [0, 3, 12]
    assert layout.rounds_present("rewards") == []
    with pytest.raises(ValueError):
        layout.rounds_present("peers")
    assert parse_round_dir("round_7") == 7 and parse_round_dir("round_007") is None


def test_rounds_present_missing_dir(tmp_path):
    assert ExperimentLayout(tmp_path / "nowhere").rounds_present("checkpoints") == []


# -- schemas: round trips -------------------------------------------------------------------------------

def make_rollout_file(peer="worker_1", rnd=5, stage=0, groups=2, g=4) -> RolloutFile:
    rollouts = {}
    for b in range(groups):
        task = TaskRef(dataset="basic_arithmetic", seed=42, index=b)
        rollouts[str(b)] = tuple(
            Rollout(prompt=f"Question {b}:\nwhat is 2+{b}?", response=f"answer {i}", reward=float(i % 2),
                    finished=i % 3 != 0, task=task)
            for i in range(g)
        )
    return RolloutFile(peer_id=peer, round=rnd, stage=stage, timestamp=1.7e9, rollouts=rollouts)


def test_rollout_file_round_trip_and_shape():
    rf = make_rollout_file()
    obj = rf.to_json()
    assert set(obj) == {"schema_version", "peer_id", "round", "stage", "timestamp", "rollouts"}
    assert obj["schema_version"] == 1 and set(obj["rollouts"]) == {"0", "1"}
    assert set(obj["rollouts"]["0"][0]) == {"prompt", "response", "reward", "finished", "task"}
    back = RolloutFile.from_json(copy.deepcopy(obj), expect_round=5, expect_stage=0, expect_node="worker_1")
    assert back == rf and back.to_json() == obj
    assert back.num_groups == 2 and len(back.rollouts["1"]) == 4
    with pytest.raises(TypeError):
        back.rollouts["2"] = ()  # read-only


def test_other_formats_round_trip():
    state = RoundState(experiment="exp1", round=3, stage=0, started_at=10.0, updated_at=11.5, finished=False,
                       max_rounds=10)
    assert RoundState.from_json(state.to_json(), expect_experiment="exp1") == state
    peer = PeerRecord(node_id="worker_1", role="worker", pid=123, host="box", started_at=1.0, heartbeat_at=2.0,
                      round=3, progress=17, status="running")
    assert PeerRecord.from_json(peer.to_json(), expect_node="worker_1") == peer
    res = RoundResult(node_id="worker_1", round=3, stage=0, mean_reward=0.25, num_local_groups=4,
                      num_external_groups=2, submitted_at=5.0)
    assert RoundResult.from_json(res.to_json(), expect_round=3, expect_stage=0, expect_node="worker_1") == res
    snap = ConfigSnapshot(experiment="exp1", written_by="coordinator", written_at=1.0, config={"sapo": {"x": 1}})
    assert ConfigSnapshot.from_json(snap.to_json()).config == {"sapo": {"x": 1}}
    assert validate_metrics_line({"node_id": "worker_1", "round": 2, "loss": None, "r": [1.0, {"a": 2}]})


def test_json_ints_accepted_as_floats_and_unknown_keys_ignored():
    obj = make_rollout_file().to_json()
    obj["timestamp"] = 1700000000
    obj["rollouts"]["0"][0]["reward"] = 1
    obj["extra"] = {"whatever": True}
    assert RolloutFile.from_json(obj).rollouts["0"][0].reward == 1.0


def test_writer_refuses_non_finite():
    with pytest.raises(ValueError):
        RoundResult(node_id="a", round=0, stage=0, mean_reward=math.nan, num_local_groups=0,
                    num_external_groups=0, submitted_at=0.0).to_json()


# -- schemas: hostile inputs ------------------------------------------------------------------------------

def _mut(fn):
    obj = make_rollout_file().to_json()
    fn(obj)
    return obj


HOSTILE_ROLLOUTS = {
    "not an object": lambda o: None,
    "nan reward": lambda o: o["rollouts"]["0"][0].__setitem__("reward", math.nan),
    "inf reward": lambda o: o["rollouts"]["0"][0].__setitem__("reward", math.inf),
    "str reward": lambda o: o["rollouts"]["0"][0].__setitem__("reward", "1.0"),
    "bool reward": lambda o: o["rollouts"]["0"][0].__setitem__("reward", True),
    "bool round": lambda o: o.__setitem__("round", True),
    "float round": lambda o: o.__setitem__("round", 5.0),
    "negative round": lambda o: o.__setitem__("round", -1),
    "int finished": lambda o: o["rollouts"]["0"][0].__setitem__("finished", 1),
    "bool seed": lambda o: o["rollouts"]["0"][0]["task"].__setitem__("seed", False),
    "missing task": lambda o: o["rollouts"]["0"][0].pop("task"),
    "missing peer": lambda o: o.pop("peer_id"),
    "dotdot peer": lambda o: o.__setitem__("peer_id", "../x"),
    "abs peer": lambda o: o.__setitem__("peer_id", "/abs"),
    "control peer": lambda o: o.__setitem__("peer_id", "w\x1b[2Jorker"),
    "list rollouts": lambda o: o.__setitem__("rollouts", []),
    "bad batch id": lambda o: o["rollouts"].__setitem__("-1", o["rollouts"]["0"]),
    "padded batch id": lambda o: o["rollouts"].__setitem__("01", o["rollouts"]["0"]),
    "empty group": lambda o: o["rollouts"].__setitem__("0", []),
    "group not list": lambda o: o["rollouts"].__setitem__("0", {"a": 1}),
    "mixed prompts": lambda o: o["rollouts"]["0"][1].__setitem__("prompt", "another"),
    "mixed tasks": lambda o: o["rollouts"]["0"][1]["task"].__setitem__("index", 99),
    "huge prompt": lambda o: [r.__setitem__("prompt", "x" * 40_000) for r in o["rollouts"]["0"]],
    "too many groups": lambda o: o["rollouts"].update({str(i): o["rollouts"]["0"] for i in range(2, 300)}),
    "too many completions": lambda o: o["rollouts"]["0"].extend(o["rollouts"]["0"] * 20),
    "surrogate": lambda o: [r.__setitem__("response", "\ud800") for r in o["rollouts"]["0"]],
    "future version": lambda o: o.__setitem__("schema_version", 2),
    "zero version": lambda o: o.__setitem__("schema_version", 0),
    "str version": lambda o: o.__setitem__("schema_version", "1"),
    "unsafe dataset": lambda o: [r["task"].__setitem__("dataset", "../etc") for r in o["rollouts"]["0"]],
    "extra task key": lambda o: [r["task"].__setitem__("extra", 1) for r in o["rollouts"]["0"]],
    "index out of range": lambda o: [r["task"].__setitem__("index", 10**6) for r in o["rollouts"]["0"]],
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ROLLOUTS))
def test_rollout_file_rejects(case):
    obj = _mut(HOSTILE_ROLLOUTS[case])
    if case == "not an object":
        obj = [1, 2]
    with pytest.raises(SchemaError) as info:
        RolloutFile.from_json(obj)
    assert str(info.value)


def test_future_version_message():
    obj = make_rollout_file().to_json()
    obj["schema_version"] = 7
    with pytest.raises(SchemaError, match="schema version 7 is newer than supported 1"):
        RolloutFile.from_json(obj)


def test_path_consistency():
    obj = make_rollout_file(rnd=5, stage=0, peer="worker_1").to_json()
    with pytest.raises(SchemaError, match="round 5 does not match its path"):
        RolloutFile.from_json(obj, expect_round=6)
    with pytest.raises(SchemaError, match="stage"):
        RolloutFile.from_json(obj, expect_stage=1)
    with pytest.raises(SchemaError, match="peer_id"):
        RolloutFile.from_json(obj, expect_node="worker_2")
    res = RoundResult(node_id="w", round=1, stage=0, mean_reward=0.0, num_local_groups=1, num_external_groups=0,
                      submitted_at=1.0).to_json()
    with pytest.raises(SchemaError):
        RoundResult.from_json(res, expect_round=2)
    peer = PeerRecord(node_id="w", role="worker", pid=1, host="h", started_at=0.0, heartbeat_at=0.0, round=0,
                      progress=0, status="starting").to_json()
    with pytest.raises(SchemaError):
        PeerRecord.from_json(peer, expect_node="v")


def test_limits_are_arguments():
    obj = make_rollout_file(groups=3).to_json()
    with pytest.raises(SchemaError, match="3 groups"):
        RolloutFile.from_json(obj, limits=RolloutLimits(max_groups=2))


@pytest.mark.parametrize("mutate", [
    lambda o: o.__setitem__("role", "admin"),
    lambda o: o.__setitem__("status", "dead"),
    lambda o: o.__setitem__("pid", "123"),
    lambda o: o.__setitem__("progress", 1.5),
    lambda o: o.__setitem__("heartbeat_at", "now"),
    lambda o: o.__setitem__("host", "h\x00"),
    lambda o: o.__setitem__("node_id", "../coordinator"),
])
def test_peer_record_rejects(mutate):
    obj = PeerRecord(node_id="w", role="worker", pid=1, host="h", started_at=0.0, heartbeat_at=0.0, round=0,
                     progress=0, status="starting").to_json()
    mutate(obj)
    with pytest.raises(SchemaError):
        PeerRecord.from_json(obj)


@pytest.mark.parametrize("mutate", [
    lambda o: o.__setitem__("finished", "false"),
    lambda o: o.__setitem__("max_rounds", 0),
    lambda o: o.__setitem__("round", None),
    lambda o: o.__setitem__("experiment", "a/b"),
])
def test_round_state_rejects(mutate):
    obj = RoundState(experiment="e", round=0, stage=0, started_at=0.0, updated_at=0.0, finished=False,
                     max_rounds=3).to_json()
    mutate(obj)
    with pytest.raises(SchemaError):
        RoundState.from_json(obj)


@pytest.mark.parametrize("line", [
    [], {"round": 1}, {"node_id": "w"}, {"node_id": "../w", "round": 1}, {"node_id": "w", "round": True},
    {"node_id": "w", "round": 1, "loss": math.nan}, {"node_id": "w", "round": 1, "x": {"y": [math.inf]}},
    {"node_id": "w", "round": 1, "x": object()},
])
def test_metrics_line_rejects(line):
    with pytest.raises(SchemaError):
        validate_metrics_line(line)


def test_one_task_reference_class():
    import sapo.tasks

    assert TaskRef is sapo.tasks.TaskRef
    back = RolloutFile.from_json(make_rollout_file().to_json())
    assert type(back.rollouts["0"][0].task) is sapo.tasks.TaskRef


def test_messages_name_the_field_and_the_rule():
    obj = make_rollout_file().to_json()
    obj["rollouts"]["0"][0]["task"]["seed"] = True
    with pytest.raises(SchemaError, match=r"rollout_file.rollouts\['0'\]\[0\].task.seed: must be an integer, got True"):
        RolloutFile.from_json(obj)
    with pytest.raises(TypeError):
        RolloutFile.from_json(obj, expect_experiment="x")  # not a path field of a rollout file
    with pytest.raises(SchemaError, match="state.max_rounds: must be >= 1; got 0"):
        RoundState(experiment="e", round=0, stage=0, started_at=0.0, updated_at=0.0, finished=False, max_rounds=0)
    state = RoundState(experiment="e", round=0, stage=0, started_at=0.0, updated_at=0.0, finished=False,
                       max_rounds=3).to_json()
    with pytest.raises(SchemaError, match="experiment 'e' does not match its path"):
        RoundState.from_json(state, expect_experiment="f")
    del state["schema_version"]
    with pytest.raises(SchemaError, match="state: missing field 'schema_version'"):
        RoundState.from_json(state)


@pytest.mark.parametrize("change", [
    {"pid": "12"}, {"pid": True}, {"heartbeat_at": float("nan")}, {"progress": -1}, {"node_id": "../x"},
    {"phase": "a\nb"}, {"status": "x" * 100}, {"round": -2},
])
def test_a_hostile_heartbeat_reads_as_none(tmp_path, change):
    import json

    from node.heartbeat import HeartbeatRecord, heartbeat_path, read_heartbeat

    good = HeartbeatRecord(node_id="worker_1", role="worker", pid=12, heartbeat_at=1.0, progress=3, progress_at=1.0,
                           phase="train", round=2, status="running")
    path = heartbeat_path(tmp_path, "worker_1")
    path.write_text(json.dumps(good.to_json()))
    assert read_heartbeat(path) == good
    from node.heartbeat import Heartbeat

    fresh = Heartbeat(tmp_path, "worker_2", "worker", 1.0)  # before its first round: round -1
    fresh.write()
    assert read_heartbeat(fresh.path).round == -1
    path.write_text(json.dumps({**good.to_json(), **change}, allow_nan=True))
    assert read_heartbeat(path) is None
