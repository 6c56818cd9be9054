"""Node states, transitions and the restart policy, on scripted times (no processes, no clocks)."""

from __future__ import annotations

import pytest

from supervisor.states import (
    ALLOWED, EXIT_REASONS, RUNNING_STATES, STAGGER_POLICIES, STOPPED_STATES, ExitInfo, IllegalTransition, NodeState,
    NodeStatus, RestartPolicy, change_state, resolve_stagger, set_condition, spawn_held_by,
)

S = NodeState


class RecordingLog:
    def __init__(self):
        self.events: list[tuple[str, str, dict]] = []

    def info(self, event, **kw):
        self.events.append(("info", event, kw))

    def warning(self, event, **kw):
        self.events.append(("warning", event, kw))


def crash(pid=1, code=1, detail="boom") -> ExitInfo:
    return ExitInfo(pid, code, None, "exited", detail)


def fail(policy: RestartPolicy, st: NodeStatus, now: float, log=None, info: ExitInfo | None = None) -> str | None:
    """What the monitor loop does when a node's process exits with a failure."""
    policy.record_failure(st, info or crash(st.pid), now)
    why = policy.should_give_up(st, now)
    if why:
        st.fatal_reason = why
        change_state(st, S.FATAL, reason=why, now=now, log=log)
    else:
        st.backoff_until = policy.next_start(st, now)
        change_state(st, S.BACKOFF, reason="failed", now=now, log=log)
    return why


def start(st: NodeStatus, now: float, pid: int = 100, log=None) -> None:
    if st.state is S.BACKOFF:
        st.restarts += 1
    st.mark_spawned(pid, now)
    change_state(st, S.STARTING, reason="spawned", now=now, log=log)


def heartbeat(st: NodeStatus, now: float, log=None) -> None:
    st.mark_heartbeat()
    change_state(st, S.RUNNING, reason="first heartbeat", now=now, log=log)


def test_groupings_partition_the_states():
    assert RUNNING_STATES | STOPPED_STATES == set(NodeState)
    assert not RUNNING_STATES & STOPPED_STATES
    assert set(ALLOWED) == set(NodeState)
    assert all(new not in preds for new, preds in ALLOWED.items())  # no self-transitions


def test_happy_path_transitions_are_logged():
    log = RecordingLog()
    st = NodeStatus("worker-0", "worker")
    start(st, 10.0, log=log)
    heartbeat(st, 12.0, log=log)
    st.last_exit = ExitInfo(100, 0, None, "exited", "finished normally")
    change_state(st, S.EXITED, reason="finished", now=50.0, log=log)
    assert st.state is S.EXITED and st.state_since == 50.0
    assert [(t.old, t.new) for t in st.transitions] == [
        (S.STOPPED, S.STARTING), (S.STARTING, S.RUNNING), (S.RUNNING, S.EXITED)]
    assert [e[1] for e in log.events] == ["node_state_changed"] * 3
    assert log.events[-1][2] == {"node": "worker-0", "role": "worker", "old": "RUNNING", "new": "EXITED",
                                 "reason": "finished", "pid": 100, "restarts": 0}


@pytest.mark.parametrize("old,new", [
    (S.STOPPED, S.RUNNING), (S.RUNNING, S.STARTING), (S.EXITED, S.RUNNING),
    (S.FATAL, S.BACKOFF), (S.RUNNING, S.RUNNING), (S.STOPPED, S.STOPPING), (S.BACKOFF, S.RUNNING),
])
def test_illegal_transition_raises(old, new):
    st = NodeStatus("worker-1", "worker", state=old)
    with pytest.raises(IllegalTransition, match=f"{old.value} -> {new.value}"):
        change_state(st, new, reason="test", now=1.0, log=None)
    assert st.state is old and not st.transitions


def test_backoff_and_fatal_log_at_warning():
    log = RecordingLog()
    st = NodeStatus("w", "worker", state=S.RUNNING)
    change_state(st, S.BACKOFF, reason="crash", now=1.0, log=log)
    change_state(st, S.FATAL, reason="gave up", now=2.0, log=log)
    assert [e[0] for e in log.events] == ["warning", "warning"]


def test_backoff_sequence_is_capped_exponential():
    p = RestartPolicy(backoff_initial_s=2.0, backoff_max_s=30.0)
    assert [p.backoff_delay(a) for a in range(1, 8)] == [2, 4, 8, 16, 30, 30, 30]
    assert p.backoff_delay(0) == 2.0  # treated as the first attempt
    assert p.backoff_delay(10_000) == 30.0  # no overflow


def test_exit_info_one_line_and_flags():
    oom = ExitInfo(42, -9, "SIGKILL", "oom_killed_host", "SIGKILL not sent by the supervisor")
    assert oom.one_line() == "pid 42 killed by SIGKILL [oom_killed_host]: SIGKILL not sent by the supervisor"
    assert oom.is_failure and not oom.finished
    assert ExitInfo(1, 0, None, "exited").finished
    assert not ExitInfo(1, -15, "SIGTERM", "stopped").is_failure
    assert ExitInfo(None, None, None, "config_error", "x").one_line() == "did not start [config_error]: x"
    with pytest.raises(ValueError, match="unknown exit reason"):
        ExitInfo(1, 1, None, "weird")
    assert len(EXIT_REASONS) == 8


def test_backoff_to_fatal():
    """Crash after each heartbeat: the delay doubles, then too many failures in the window → FATAL."""
    p = RestartPolicy(backoff_initial_s=1.0, backoff_max_s=4.0, stable_after_s=100.0,
                      max_restarts=3, restart_window_s=60.0, startup_failures_fatal=3)
    st = NodeStatus("worker-2", "worker")
    now, delays = 0.0, []
    start(st, now)
    for _ in range(3):
        heartbeat(st, now + 0.5)
        now += 1.0
        assert fail(p, st, now) is None
        delays.append(st.backoff_until - now)
        now = st.backoff_until
        start(st, now)
    assert delays == [1.0, 2.0, 4.0]
    assert st.restarts == 3
    heartbeat(st, now + 0.5)
    why = fail(p, st, now + 1.0, info=ExitInfo(100, 1, None, "cuda_oom", "CUDA out of memory"))
    assert st.state is S.FATAL
    assert why == st.fatal_reason
    assert "failed 4 times in the last 60 s (max_restarts=3)" in why
    assert "[cuda_oom]: CUDA out of memory" in why


def test_stable_run_resets_backoff():
    p = RestartPolicy(backoff_initial_s=1.0, backoff_max_s=64.0, stable_after_s=10.0,
                      max_restarts=100, restart_window_s=1000.0)
    st = NodeStatus("w", "worker")
    start(st, 0.0)
    heartbeat(st, 0.1)
    fail(p, st, 1.0)
    start(st, st.backoff_until)
    heartbeat(st, 2.5)
    fail(p, st, 3.0)
    assert st.backoff_attempt == 2 and st.backoff_until == 3.0 + 2.0
    # A long run: the loop's tick resets the backoff while it runs ...
    start(st, 5.0)
    heartbeat(st, 5.5)
    assert not p.reset_if_stable(st, 14.0)
    assert p.reset_if_stable(st, 15.0)
    assert st.backoff_attempt == 0
    fail(p, st, 20.0)
    assert st.backoff_until == 21.0  # initial delay again
    # ... and a failure after a long run resets it even if no tick saw it.
    start(st, 21.0)
    heartbeat(st, 21.5)
    fail(p, st, 22.0)
    assert st.backoff_attempt == 2
    start(st, st.backoff_until)
    heartbeat(st, 25.0)
    fail(p, st, 24.0 + 10.0)
    assert st.backoff_attempt == 1


def test_give_up_counts_only_failures_in_the_window():
    p = RestartPolicy(backoff_initial_s=0.0, max_restarts=2, restart_window_s=10.0, stable_after_s=1000.0)
    st = NodeStatus("w", "worker")
    start(st, 0.0)
    for now in (1.0, 2.0, 20.0, 21.0):  # only two failures ever fall within 10 s of each other
        heartbeat(st, now - 0.5)
        assert fail(p, st, now) is None, now
        start(st, now)
    assert p.failures_in_window(st, 21.0) == 2
    heartbeat(st, 21.5)
    assert "failed 3 times in the last 10 s" in fail(p, st, 22.0)
    assert list(st.failure_times) == [20.0, 21.0, 22.0]  # older ones pruned


def test_max_restarts_zero_means_first_failure_is_fatal():
    p = RestartPolicy(max_restarts=0)
    st = NodeStatus("coordinator", "coordinator")
    start(st, 0.0)
    heartbeat(st, 1.0)
    assert fail(p, st, 2.0) is not None and st.state is S.FATAL


def test_config_error_after_startup_failures():
    p = RestartPolicy(backoff_initial_s=1.0, max_restarts=100, startup_failures_fatal=3)
    log = RecordingLog()
    st = NodeStatus("worker-3", "worker")
    now = 0.0
    start(st, now, log=log)
    for i in range(2):
        now += 0.2
        assert fail(p, st, now, log=log, info=crash(detail="ImportError: no module named foo")) is None
        assert st.consecutive_startup_failures == i + 1
        now = st.backoff_until
        start(st, now, log=log)
    why = fail(p, st, now + 0.2, log=log, info=crash(detail="ImportError: no module named foo"))
    assert st.state is S.FATAL
    assert why.startswith("configuration error: worker-3 failed 3 times before its first heartbeat")
    assert "ImportError: no module named foo" in why
    assert log.events[-1][0] == "warning" and log.events[-1][2]["new"] == "FATAL"


def test_heartbeat_clears_startup_failures():
    p = RestartPolicy(backoff_initial_s=1.0, startup_failures_fatal=2, max_restarts=100)
    st = NodeStatus("w", "worker")
    start(st, 0.0)
    fail(p, st, 1.0)
    assert st.consecutive_startup_failures == 1
    start(st, st.backoff_until)
    heartbeat(st, 3.0)
    assert st.consecutive_startup_failures == 0
    assert fail(p, st, 4.0) is None  # failed after a heartbeat: not a start-up failure
    assert st.consecutive_startup_failures == 0


def test_finish_and_requested_stop_are_not_failures():
    p = RestartPolicy(max_restarts=0)
    st = NodeStatus("w", "worker")
    start(st, 0.0)
    heartbeat(st, 1.0)
    change_state(st, S.STOPPING, reason="stop requested", now=2.0, log=None)
    p.record_failure(st, ExitInfo(100, -15, "SIGTERM", "stopped", "stopped by the supervisor"), 3.0)
    assert p.should_give_up(st, 3.0) is None and not st.failure_times and st.backoff_attempt == 0
    change_state(st, S.STOPPED, reason="reaped", now=3.0, log=None)
    assert st.last_exit.reason == "stopped"


def test_hung_node_killed_through_stopping_goes_to_backoff():
    p = RestartPolicy()
    st = NodeStatus("w", "worker")
    start(st, 0.0)
    heartbeat(st, 1.0)
    change_state(st, S.STOPPING, reason="hung: SIGKILL", now=400.0, log=None)
    assert fail(p, st, 401.0, info=ExitInfo(100, -9, "SIGKILL", "hung")) is None
    assert st.state is S.BACKOFF


def test_a_condition_qualifies_running_and_ends_with_it():
    log = RecordingLog()
    st = NodeStatus("w", "worker")
    with pytest.raises(ValueError, match="STARTING and RUNNING only"):
        set_condition(st, "runtime_disk_full", reason="full", now=0.0, log=log)  # STOPPED: nothing to wait out
    start(st, 0.0)
    heartbeat(st, 1.0)
    with pytest.raises(ValueError, match="unknown condition 'tired'; allowed: runtime_disk_full"):
        set_condition(st, "tired", reason="?", now=2.0, log=log)
    for t in (10.0, 11.0, 12.0):
        set_condition(st, "runtime_disk_full", reason="runtime dir /rt is full", now=t, log=log)
    assert st.state is S.RUNNING and st.condition == "runtime_disk_full" and st.condition_seen_at == 12.0
    assert st.to_dict(now=13.0)["condition"] == "runtime_disk_full"
    set_condition(st, None, reason="space returned", now=20.0, log=log)
    assert st.condition is None and st.condition_seen_at == 12.0  # the grace after it runs from there
    conditions = [(level, kw["condition"], kw["previous"]) for level, e, kw in log.events if e == "node_condition"]
    assert conditions == [("warning", "runtime_disk_full", None), ("info", None, "runtime_disk_full")]  # changes only
    set_condition(st, "runtime_disk_full", reason="full again", now=30.0, log=None)
    change_state(st, S.STOPPING, reason="stop", now=31.0, log=None)
    assert st.condition is None
    change_state(st, S.STOPPED, reason="reaped", now=32.0, log=None)
    start(st, 40.0, pid=101)
    assert st.condition is None and st.condition_seen_at is None  # a new run starts clean


def test_status_to_dict_is_json_ready():
    import json

    st = NodeStatus("w", "worker")
    start(st, 0.0)
    st.last_exit = crash()
    d = st.to_dict(now=5.0)
    assert json.loads(json.dumps(d))["state"] == "STARTING"
    assert d["uptime_s"] == 5.0 and d["last_exit_line"] == "pid 1 exit code 1 [exited]: boom"


def test_policy_from_section():
    from node.config import SupervisorSection

    sec = SupervisorSection(backoff_initial_s=3.0, max_restarts=7)
    p = RestartPolicy.from_section(sec)
    assert p.backoff_initial_s == 3.0 and p.max_restarts == 7
    assert p.startup_failures_fatal == sec.startup_failures_fatal


# --------------------------------------------------------------------------- the stagger policy

def swarm_in(**states: NodeState) -> list[NodeStatus]:
    """Statuses in start order: ``coordinator`` first, then ``worker_N`` (name=state)."""
    return [NodeStatus(name, "coordinator" if name == "coordinator" else "worker", state=st)
            for name, st in states.items()]


def test_stagger_auto_is_none_on_the_cpu_and_loaded_on_a_gpu():
    assert resolve_stagger("auto", "cpu") == "none"
    assert resolve_stagger("auto", "cuda") == "loaded"
    for policy in STAGGER_POLICIES:  # an explicit choice wins on either device
        assert resolve_stagger(policy, "cpu") == resolve_stagger(policy, "cuda") == policy
    with pytest.raises(ValueError, match="allowed: auto, none, heartbeat, loaded"):
        resolve_stagger("sometimes", "cpu")
    with pytest.raises(ValueError, match="unknown stagger policy"):
        spawn_held_by("auto", [])  # the tick asks with a resolved policy only


def test_stagger_none_never_holds_a_spawn():
    nodes = swarm_in(coordinator=S.STARTING, worker_1=S.STARTING, worker_2=S.BACKOFF)
    assert spawn_held_by("none", nodes) is None


def test_stagger_heartbeat_holds_while_any_node_is_starting():
    assert spawn_held_by("heartbeat", swarm_in(coordinator=S.STARTING, worker_1=S.STOPPED)) == "coordinator"
    assert spawn_held_by("heartbeat", swarm_in(coordinator=S.RUNNING, worker_1=S.STARTING,
                                               worker_2=S.STOPPED)) == "worker_1"
    settled = swarm_in(coordinator=S.RUNNING, worker_1=S.BACKOFF, worker_2=S.FATAL, worker_3=S.STOPPED)
    assert spawn_held_by("heartbeat", settled) is None  # gave up or waiting: nobody is starting


def test_stagger_loaded_holds_only_while_a_worker_is_loading():
    # The coordinator loads no model: it holds no one back.
    assert spawn_held_by("loaded", swarm_in(coordinator=S.STARTING, worker_1=S.STOPPED)) is None
    # A worker STARTING has not sent its first heartbeat, which comes right after its model load.
    assert spawn_held_by("loaded", swarm_in(coordinator=S.STARTING, worker_1=S.STARTING,
                                            worker_2=S.STOPPED)) == "worker_1"
    loaded = swarm_in(coordinator=S.RUNNING, worker_1=S.RUNNING, worker_2=S.BACKOFF)
    assert spawn_held_by("loaded", loaded) is None
    restarting = swarm_in(coordinator=S.RUNNING, worker_1=S.RUNNING, worker_2=S.STARTING, worker_3=S.BACKOFF)
    assert spawn_held_by("loaded", restarting) == "worker_2"  # a restart loads a model too


def test_stagger_field_in_the_config():
    from node.config import SupervisorSection, resolve_config
    from sapo.config import ConfigError

    assert SupervisorSection().stagger == "auto"
    assert resolve_config(None, overrides=["supervisor.stagger=none"]).supervisor.stagger == "none"
    with pytest.raises(ConfigError, match="supervisor.stagger: must be one of auto, none, heartbeat, loaded"):
        resolve_config(None, overrides=["supervisor.stagger=later"])
