"""The trust boundary under attack (issue 12): live ``swarm launch`` scenarios where someone who can write
to the shared directory but does not hold the experiment key tries to stop, fool or wipe the run.

Each scenario is a :class:`scenarios.Scenario` (same runner, same figures, same data audit) and checks,
besides what the runner checks (exit 0, every round trained once, checkpoints that load):

- no round skipped, no node restarted but those the scenario kills;
- nothing outside the experiment touched (:class:`scenarios.Outside`: no stray file, the files links point
  at unchanged);
- a bounded log (:func:`scenarios.check_logs`: every log byte of the run against a bound derived from its
  rounds and the warnings' rate limit, far below one line per poll per planted file).

The states sampled for the audit are the signed ones only (the scenarios forge the state file).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import zipfile
from pathlib import Path

from harness import PY, still_alive
from scenarios import (WORKERS, Chaos, Outside, Swarm, check_logs, fake_signed, plant, read_ours, scenario,
                       unsigned, _fmt_s)

STATE = Path("state") / "current_state.json"
CONFIG_SNAPSHOT = Path("state") / "config.json"


def _attacked_swarm(c: Chaos) -> tuple[Swarm, Outside]:
    run = c.swarm()
    run.sample_signed_states_only = True
    return run, Outside(c.workdir)


def _no_early_finish(run: Swarm, what: str) -> None:
    assert not (run.signed_state() or {}).get("finished"), f"the run finished before {what}: raise max_rounds"


def _common_checks(c: Chaos, run: Swarm, facts: dict, outside: Outside, *, planted: int,
                   restarts: dict[str, int] | None = None, may_skip: tuple[str, ...] = (),
                   also: tuple[Path, ...] = ()) -> str:
    """What every attack scenario ends with (see the module doc); the log figure for ``measured``."""
    fig = c.fig
    expected = {n: (restarts or {}).get(n, 0) for n in run.names}
    seen = {n: run.node(n).get("restarts") for n in run.names}
    fig.check(seen == expected, f"node restarts {seen} (expected {expected})")
    for w in WORKERS:
        if w not in may_skip:
            fig.check(not facts.get(w, {}).get("skipped"), f"{w} skipped rounds {facts.get(w, {}).get('skipped')}")
    crashed = [(n, e.get("exception", "")[-300:]) for n in run.names for e in run.node_log(n)
               if e.get("event") == "node_crashed"]
    fig.check(not crashed, f"nodes crashed: {crashed[:2]}")
    outside.check(fig, run, c.workdir / "stress", *also)
    return check_logs(c, run, planted=planted, restarts=sum(expected.values()))


def _events(run: Swarm, node: str, event: str) -> list[dict]:
    return [e for e in run.node_log(node) if e.get("event") == event]


# --------------------------------------------------------------------------- a. forged state and config

def _state_repaired(run: Swarm, forged: bytes, floor: int) -> bool:
    """The coordinator wrote a signed, plausible state again (not ``forged``, round >= ``floor``)."""
    try:
        if (run.exp / STATE).read_bytes() == forged:
            return False
    except OSError:
        return False
    st = run.signed_state()
    return st is not None and st.get("round", -1) >= floor and (
        not st.get("finished") or st.get("round") == run.config.experiment.max_rounds)


def _state_forgeries(old_signed: bytes) -> list[tuple[str, object]]:
    """(what, forge(our state as plain JSON) -> bytes): every kind of state an outsider can write."""
    return [
        ("finished early", lambda s: unsigned(s, finished=True)),
        ("far-future round", lambda s: unsigned(s, round=10**6)),
        ("round 2**62", lambda s: unsigned(s, round=2**62, max_rounds=2**62)),
        ("schema_version 99", lambda s: unsigned(s, schema_version=99)),
        ("junk bytes", lambda s: b"\x00\xff junk {{{"),
        ("finished early, made-up signature", lambda s: fake_signed(s, finished=True)),
        ("an old signed state (replayed at its own path)", lambda s: old_signed),
    ]


def _kill_coordinator_while(run: Swarm, forge) -> float:
    """SIGKILL the coordinator right after ``forge()`` planted its files, and plant them again once it is
    dead (it may have repaired them in between), so its successor starts on the forgery; wait until that
    one repaired the state and advanced a round. Returns the seconds from the kill to that round."""
    pid = run.wait_for(lambda: run.running_pid("coordinator"), run.t.budget(launches=0, restarts=1),
                       "the coordinator RUNNING")
    before = run.signed_round()
    forge()
    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    assert not still_alive([pid], 10), f"the coordinator {pid} survived SIGKILL"
    forged = forge()
    run.wait_for(lambda: run.node("coordinator").get("pid") not in (None, pid) and _state_repaired(run, forged, before)
                 and (run.signed_round() > before or (run.signed_state() or {}).get("finished")),
                 run.t.budget(launches=0, restarts=1, rounds=1), "a new coordinator to repair the state and advance")
    return time.monotonic() - t_kill


@scenario("Forged state and config (no key), coordinator SIGKILLed while forged", rounds=(30, 60), restarts=(2, 2))
def forged_state(c: Chaos):
    """An outsider rewrites ``state/current_state.json``: finished early, a far-future round, round 2**62, a
    newer schema, junk, a made-up signature, an old signed copy replayed. The coordinator rewrites each
    within a poll; workers never act on one (unsigned: dropped before parsing; the replay: a round going
    back). Then the coordinator is SIGKILLed while the state says "finished", and again while the state
    has a newer schema and ``state/config.json`` is forged with other I/J/G: it resumes from its local copy
    (never round 0), repairs both files, and the swarm never stops."""
    fig = c.fig
    run, outside = _attacked_swarm(c)
    outside.seal()
    run.launch()
    run.wait_for(lambda: run.signed_round() >= 1, run.t.budget(rounds=2), "round 1")
    old_signed = (run.exp / STATE).read_bytes()  # signed, for a round that will be over: a replay
    run.replayed_states.add(old_signed)
    run.wait_for(lambda: run.signed_round() >= 3, run.t.budget(launches=0, rounds=3), "round 3")
    repair = {}
    for what, forge in _state_forgeries(old_signed):
        _no_early_finish(run, f"the forgery {what!r}")
        floor = run.signed_round()
        forged = plant(run.exp / STATE, forge(read_ours(run.exp / STATE))).read_bytes()
        t = time.monotonic()
        run.wait_for(lambda: _state_repaired(run, forged, floor), run.t.budget(launches=0, rounds=1),
                     f"the coordinator to rewrite the forged state ({what})")
        repair[what] = round(time.monotonic() - t, 2)
    _no_early_finish(run, "the first coordinator kill")
    kill_finished = _kill_coordinator_while(
        run, lambda: plant(run.exp / STATE, unsigned(read_ours(run.exp / STATE), finished=True)).read_bytes())
    _no_early_finish(run, "the second coordinator kill")
    snapshot = read_ours(run.exp / CONFIG_SNAPSHOT)
    sapo = dict(snapshot["config"]["sapo"], num_train_samples=7, num_transplant_trees=5, num_generations=3)
    forged_config = unsigned(snapshot, config={**snapshot["config"], "sapo": sapo})

    def forge_config_and_schema() -> bytes:
        plant(run.exp / CONFIG_SNAPSHOT, forged_config)
        return plant(run.exp / STATE, unsigned(read_ours(run.exp / STATE), schema_version=99)).read_bytes()

    kill_config = _kill_coordinator_while(run, forge_config_and_schema)
    run.wait_for(lambda: (run.exp / CONFIG_SNAPSHOT).read_bytes() != forged_config, run.t.budget(launches=0),
                 "the coordinator to rewrite state/config.json")
    fig.faults = (f"{len(repair)} forged states one after another ({', '.join(repair)}); SIGKILL of the "
                  f"coordinator while the state says finished; SIGKILL again while the state has schema 99 and "
                  f"state/config.json says I=7 J=5 G=3 (unsigned)")
    facts = yield run
    logs = _common_checks(c, run, facts, outside, planted=len(repair) + 3, restarts={"coordinator": 2})
    restored = _events(run, "coordinator", "state_restored")
    fig.check(len(restored) >= 2, f"the coordinator restored its local copy {len(restored)} times (2 restarts)")
    fig.check(_events(run, "coordinator", "config_snapshot_repaired"), "state/config.json never repaired")
    fig.check(not any(e.get("round") == 0 for e in _events(run, "coordinator", "coordinator_resumed")),
              "the coordinator resumed at round 0")
    refused = {w: len(_events(run, w, "state_refused")) for w in WORKERS}
    fig.details["state repaired after (s)"] = repair
    fig.details["coordinator SIGKILL → signed state, next round (s)"] = [round(kill_finished, 1), round(kill_config, 1)]
    fig.details["worker state_refused warnings"] = refused
    fig.recover = (f"forged state rewritten in {_fmt_s(list(repair.values()))}; coordinator SIGKILL while forged → "
                   f"next round {kill_finished:.1f} s / {kill_config:.1f} s (with config forged)")
    fig.measured = (f"0 rounds lost, 0 worker restarts, never round 0; workers refused the replayed state "
                    f"({refused}) and never saw the others (unsigned); {logs}")


# --------------------------------------------------------------------------- b. own paths

def deflate_bomb(path: Path, inflated: int = 128 << 20) -> Path:
    """A small zip whose one DEFLATE member inflates to ``inflated`` bytes (a ~1000x checkpoint bomb)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    zero = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("archive/data.pkl", "w", force_zip64=True) as f:
            for _ in range(inflated // len(zero)):
                f.write(zero)
    return path


def _newest_listed(run: Swarm, worker: str) -> int:
    """The newest round ``worker``'s checkpoint index lists (-1 while it lists none)."""
    try:
        rounds = [e["round"] for e in read_ours(run.exp / "checkpoints" / f"{worker}.index.json")["checkpoints"]]
    except (OSError, ValueError, KeyError, TypeError):
        return -1
    return max(rounds, default=-1)


@scenario("Own paths taken (no key): FIFO, directory, hard link, planted checkpoints + SIGKILL", rounds=(30, 60),
          restarts=(1, 1))
def own_paths(c: Chaos):
    """Before the launch an outsider plants, at paths the nodes will write: a FIFO at worker_1's
    metrics.jsonl, a hard link from its training_events.jsonl to a file outside the experiment, directories
    at its round-1 result and worker_2's round-2 rollout, a FIFO at worker_2's peer record. Each is moved
    into ``quarantine/`` with one warning at the first write, and the write goes on. Later: an empty
    ``checkpoints/round_999999999/worker_1.pt`` and a DEFLATE bomb at ``round_999999998``, a save with them
    present (nothing real pruned), then SIGKILL worker_1: it resumes from its real newest checkpoint and
    neither planted file is loaded or deleted."""
    fig = c.fig
    run, outside = _attacked_swarm(c)
    exp = run.exp
    victim = outside.file("victim.log", b"an operator's file: appends must never land here\n")
    taken = {
        "logs/worker_1/metrics.jsonl": "FIFO",
        "logs/worker_1/training_events.jsonl": f"hard link to {victim.relative_to(c.workdir)}",
        "rewards/round_1/stage_0/worker_1.json": "directory",
        "rollouts/round_2/stage_0/worker_2.json": "directory",
        "peers/worker_2.json": "FIFO",
    }
    for rel, what in taken.items():
        p = exp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if what == "FIFO":
            os.mkfifo(p)
        elif what == "directory":
            p.mkdir()
            (p / "inside").write_text("planted\n")
        else:
            os.link(victim, p)
    outside.seal()
    run.launch()
    run.wait_for(lambda: all(_listed(run, w) >= 2 for w in WORKERS), run.t.budget(rounds=4),
                 "both workers to checkpoint round 2")
    empty = exp / "checkpoints" / "round_999999999" / "worker_1.pt"
    empty.parent.mkdir(parents=True, exist_ok=True)
    empty.write_bytes(b"")
    bomb = deflate_bomb(exp / "checkpoints" / "round_999999998" / "worker_1.pt")
    bomb_bytes = bomb.read_bytes()
    at_plant = _newest_listed(run, "worker_1")
    run.wait_for(lambda: _newest_listed(run, "worker_1") > at_plant, run.t.budget(launches=0, rounds=2),
                 "worker_1 to save (and prune) with the planted checkpoints present")
    _no_early_finish(run, "worker_1 could be killed")
    pid = run.wait_for(lambda: run.running_pid("worker_1"), run.t.budget(launches=0, restarts=1), "worker_1 RUNNING")
    os.kill(pid, signal.SIGKILL)
    t_kill = time.monotonic()
    newest = _newest_listed(run, "worker_1")  # the process is dead: its index is final
    resumed = run.wait_for(lambda: [e for e in run.events("worker_1") if e.get("event") == "resumed"],
                           run.t.budget(launches=0, restarts=1), "worker_1 to resume")[-1]
    recover = time.monotonic() - t_kill
    fig.faults = (f"{len(taken)} own paths taken before the launch ({', '.join(f'{k}: {v}' for k, v in taken.items())}); "
                  f"an empty checkpoints/round_999999999/worker_1.pt and a {len(bomb_bytes) // 1024} KiB DEFLATE bomb "
                  f"(128 MiB inflated) at round_999999998; SIGKILL worker_1")
    facts = yield run
    logs = _common_checks(c, run, facts, outside, planted=len(taken) + 2, restarts={"worker_1": 1},
                          may_skip=("worker_1",))
    fig.check(resumed.get("round") == newest, f"worker_1 resumed from round {resumed.get('round')}, its newest listed "
                                              f"checkpoint is round {newest}")
    fig.check(empty.is_file() and empty.stat().st_size == 0 and bomb.read_bytes() == bomb_bytes,
              "a planted checkpoint was deleted or changed (only the node's own listed files may be pruned)")
    quarantined = sorted(p.name for p in (exp / "quarantine").iterdir()) if (exp / "quarantine").is_dir() else []
    warned = [e.get("path") for n in run.names for e in run.node_log(n) if e.get("event") == "own_path_quarantined"]
    fig.check(len(quarantined) == len(taken) and len(warned) == len(taken),
              f"{len(quarantined)} things in quarantine/ and {len(warned)} own_path_quarantined warnings for "
              f"{len(taken)} taken paths: {quarantined} / {warned}")
    for rel in taken:
        p = exp / rel
        fig.check(p.is_file() and not p.is_symlink() and p.stat().st_nlink == 1,
                  f"{rel} is not a regular file of the node's own at the end")
    unlisted = _events(run, "worker_1", "checkpoint_unlisted")
    fig.check(bool(unlisted), "worker_1 never reported the planted checkpoints as not its own")
    fig.details["quarantined"] = quarantined
    fig.details["resumed from"] = f"round {resumed.get('round')} (newest listed {newest})"
    fig.recover = f"own paths: none needed (moved aside at the first write); worker_1 SIGKILL → resumed {recover:.1f} s"
    fig.measured = (f"{len(quarantined)} planted things in quarantine/, one warning each; appends never reached the "
                    f"outside file; worker_1 resumed from its newest real checkpoint (round {newest}), the planted "
                    f"ones neither loaded nor pruned; {logs}")


def _listed(run: Swarm, worker: str) -> int:
    """How many checkpoints ``worker``'s index lists (0 while it has none)."""
    try:
        return len(read_ours(run.exp / "checkpoints" / f"{worker}.index.json")["checkpoints"])
    except (OSError, ValueError, KeyError):
        return 0


# --------------------------------------------------------------------------- c. planted files and volume

FAKE_PEERS = 5000
JUNK_PER_ROUND = 64


def plant_volume(exp: Path, max_rounds: int, now: float) -> int:
    """Before the launch: FAKE_PEERS unsigned peer records dated a year ahead (and worker_3's with a made-up
    signature), JUNK_PER_ROUND junk ``a*.json`` in every round's rollout dir, unsigned results for every
    round from worker_1, worker_2 and worker_3. Returns how many files."""
    record = {"schema_version": 1, "role": "worker", "pid": 1, "host": "mallory", "started_at": now,
              "heartbeat_at": now + 365 * 86400, "round": 0, "progress": 1, "status": "running"}
    n = 0
    peers = exp / "peers"
    peers.mkdir(parents=True, exist_ok=True)
    for i in range(FAKE_PEERS):
        name = f"worker_{100 + i}"
        (peers / f"{name}.json").write_bytes(unsigned(record, node_id=name))
        n += 1
    plant(peers / "worker_3.json", fake_signed(record, node_id="worker_3"))
    for r in range(max_rounds):
        rollouts = exp / "rollouts" / f"round_{r}" / "stage_0"
        rollouts.mkdir(parents=True, exist_ok=True)
        for k in range(JUNK_PER_ROUND):
            name = f"a{k:02d}"
            (rollouts / f"{name}.json").write_bytes(unsigned(
                {"schema_version": 1, "peer_id": name, "round": r, "stage": 0, "timestamp": now, "rollouts": {}}))
        rewards = exp / "rewards" / f"round_{r}" / "stage_0"
        rewards.mkdir(parents=True, exist_ok=True)
        for w in (*WORKERS, "worker_3"):
            (rewards / f"{w}.json").write_bytes(unsigned(
                {"schema_version": 1, "node_id": w, "round": r, "stage": 0, "mean_reward": 1.0,
                 "num_local_groups": 2, "num_external_groups": 2, "submitted_at": now}))
        n += JUNK_PER_ROUND + 3
    return n + 1


@scenario("Planted results, future-dated and 5 000 fake peer records, junk names (no key)", rounds=(20, 40))
def planted_files(c: Chaos):
    """Before the launch an outsider plants results for every round (so a coordinator that trusted them
    would race to max_rounds untrained), 5 000 fake peer records dated a year ahead (liveness by the
    writer's clock would wait round_timeout_s every round; listing them all would thrash the warning
    cache), a record with a made-up signature, and 64 junk ``a*.json`` in every round's rollout dir (which
    used to crowd real peers out of fetch_max_peers). During the run: a worker's signed result copied to a
    later round, and a worker's old signed peer record replayed. Every round still waits for both workers,
    ends on completion and exchanges groups between the real peers."""
    fig = c.fig
    run, outside = _attacked_swarm(c)
    planted = plant_volume(run.exp, c.max_rounds, time.time())
    outside.seal()
    run.launch()
    run.wait_for(lambda: run.signed_round() >= 2, run.t.budget(rounds=3), "round 2")
    old_record = (run.exp / "peers" / "worker_2.json").read_bytes()
    r = run.signed_round()
    replayed = run.exp / "rewards" / f"round_{r + 2}" / "stage_0" / "worker_1.json"
    result = run.wait_for(lambda: (run.exp / "rewards" / f"round_{r - 1}" / "stage_0" / "worker_1.json").read_bytes(),
                          run.t.budget(launches=0), "worker_1's result")
    plant(replayed, result)  # signed, but for another round: its signature binds it to its path
    run.wait_for(lambda: run.signed_round() >= r + 1, run.t.budget(launches=0, rounds=1), "the next round")
    plant(run.exp / "peers" / "worker_2.json", old_record)  # signed, its own path, an older version
    fig.faults = (f"{planted} files before the launch: {FAKE_PEERS} unsigned peer records dated a year ahead, "
                  f"worker_3's with a made-up signature, {JUNK_PER_ROUND} junk a*.json per round, unsigned results "
                  f"of worker_1/2/3 for every round; then worker_1's signed result of round {r - 1} copied to round "
                  f"{r + 2} and worker_2's peer record replayed from round 2")
    facts = yield run
    logs = _common_checks(c, run, facts, outside, planted=planted)
    advanced = _events(run, "coordinator", "round_advanced")
    timeouts = [e.get("round") for e in advanced if e.get("reason") == "round_timeout"]
    fig.check(len(timeouts) * 2 < len(advanced), f"rounds ended by round_timeout_s: {timeouts} of {len(advanced)}")
    # the real peer's groups reached every round (judged there: a group without reward spread is dropped)
    short = {w: [m.get("round") for m in run.metrics(w) if not m.get("external_candidates")] for w in WORKERS}
    fig.check(not any(short.values()), f"rounds without the real peer's groups (crowded out?): {short}")
    times = _advance_times(advanced)
    durations = [b - a for a, b in zip(times, times[1:])]
    fig.details["rounds ended by timeout"] = timeouts
    fig.details["round time"] = _fmt_s(durations)
    fig.recover = "none needed: every round ended on both workers' results"
    with_peer = {w: f"{len(run.metrics(w)) - len(short[w])}/{len(run.metrics(w))}" for w in WORKERS}
    fig.details["rounds with the real peer's groups"] = with_peer
    fig.measured = (f"{len(timeouts)} of {len(advanced)} rounds ended by timeout (none raced, none skipped); rounds "
                    f"with the real peer's groups {with_peer}; round time {_fmt_s(durations)}; {logs}")


def _advance_times(events: list[dict]) -> list[float]:
    from harness import iso_ts

    return [iso_ts(e["timestamp"]) for e in events if "timestamp" in e]


# --------------------------------------------------------------------------- d. start-up under load

def _start_load(c: Chaos) -> subprocess.Popen | list[subprocess.Popen]:
    """Keep every core busy: ``stress-ng --cpu N`` when installed, else one Python busy loop per core."""
    cwd = c.workdir / "stress"
    cwd.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 2
    if shutil.which("stress-ng"):
        cmds = [["stress-ng", "--cpu", str(cores), "--quiet"]]
    else:
        cmds = [[PY, "-c", "while True: pass"]] * cores
    procs = [subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True) for cmd in cmds]
    c.fig.details["load"] = f"{' '.join(cmds[0][:3])} × {len(cmds)} ({cores} cores)"
    return procs


SLOW_LOAD_SITE = """# Test-only (tests/chaos/trust_scenarios.py): hold {node}'s model load for {seconds} s, as a large model
# on a busy machine takes, between its "starting" peer record and its first heartbeat.
import time


def _argv():
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return f.read().split(b"\\0")
    except OSError:
        return []


if b"node" in _argv() and b"{node}" in _argv():
    import node.models as _models

    _load = _models.load_model

    def _slow_load(*args, **kwargs):
        time.sleep({seconds})
        return _load(*args, **kwargs)

    _models.load_model = _slow_load
"""


def slow_model_load(c: Chaos, node: str, seconds: float) -> dict:
    """The environment that makes ``node``'s model load take ``seconds`` longer (a ``sitecustomize`` first on
    PYTHONPATH; the other processes are untouched)."""
    site = c.workdir / "slow_load"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(SLOW_LOAD_SITE.format(node=node, seconds=seconds))
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def _stop_load(procs) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # stress-ng forks one worker per core into its group
        except OSError:
            pass
        p.wait(timeout=30)


@scenario("Start-up under load: every core busy during the launch, a slow model load", rounds=(4, 10))
def startup_under_load(c: Chaos):
    """Every core kept busy (stress-ng) from before `swarm launch` until both workers trained round 0:
    imports and model loads take several times longer, the staggered start with it; worker_2's model load
    also takes heartbeat_timeout_s + 5 s longer (what a large model does), after its "starting" peer record.
    Round 0 waits for every expected worker to be running (bounded by startup_timeout_s, not
    round_timeout_s), so none misses it."""
    fig = c.fig
    slow_s = c.scenario.timeouts(c.quick).config.supervisor.heartbeat_timeout_s + 5
    run = c.swarm(env=slow_model_load(c, "worker_2", slow_s))
    run.sample_signed_states_only = True
    outside = Outside(c.workdir)
    outside.seal()
    load = _start_load(c)
    try:
        t0 = time.monotonic()
        run.launch()
        run.wait_for(lambda: all(0 in [m.get("round") for m in run.metrics(w)] for w in WORKERS)
                     or run.signed_round() >= 1, run.t.budget(rounds=1), "round 0 to end")
        loaded_s = time.monotonic() - t0
    finally:
        _stop_load(load)
    fig.faults = (f"{fig.details['load']} from before the launch until round 0 ended ({loaded_s:.0f} s); "
                  f"worker_2's model load {slow_s:g} s longer")
    facts = yield run
    logs = _common_checks(c, run, facts, outside, planted=0, also=(c.workdir / "slow_load",))
    missed = [w for w in WORKERS if 0 not in facts.get(w, {}).get("trained", [])]
    fig.check(not missed, f"{missed} did not train round 0")
    starting = _events(run, "coordinator", "swarm_starting")
    fig.check(bool(starting) and set(starting[0].get("workers") or []) >= set(WORKERS),
              f"round 0 did not start with every worker: {starting[:1]}")
    waited = starting[0].get("waited_s") if starting else None
    fig.details["coordinator waited for the workers"] = f"{waited} s"
    fig.recover = f"none needed: round 0 held {waited} s for both workers"
    fig.measured = (f"launch → round 0 over {loaded_s:.0f} s under load; round 0 missed by "
                    f"{', '.join(missed) or 'no worker'}; {logs}")


TRUST_SCENARIOS = {
    "forged_state": forged_state,
    "own_paths": own_paths,
    "planted_files": planted_files,
    "startup_under_load": startup_under_load,
}
