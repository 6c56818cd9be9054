"""A real swarm on a real FUSE mount that drops out (ENOTCONN) mid-run: training goes on, nothing is lost."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from harness import CONFIG, Timeouts, wait_for
from scenarios import record

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

ROUNDS = 12
# The mount drops between worker_1's publish and its submit; the submit must then happen within the outage
# (and be spooled): a short peer wait (a worker caught waiting for its peer's file otherwise waits out the whole
# outage) and several optimizer steps (a longer window to catch it in; rounds are otherwise sub-second).
SETS = (f"experiment.max_rounds={ROUNDS}", "sapo.max_new_tokens=24", "sapo.optimizer_steps_per_round=8",
        "exchange.fetch_timeout_s=1")
DOWN_S = 6.0


def spooled(tmp_path) -> list:
    return [p for p in (tmp_path / "spool").rglob("*") if p.is_file()]


@pytest.mark.timeout(Timeouts.of(CONFIG, *SETS).budget(rounds=ROUNDS) + DOWN_S)
def test_drive_disconnect_spools_and_recovers_with_zero_loss(flaky_mount, make_swarm, tmp_path):
    swarm = make_swarm(*SETS, shared=flaky_mount.mountpoint)
    for node in swarm.names:
        swarm.start_node(node)
    # Drop the mount while worker_1 is mid-round (published, not yet submitted), so it has to spool.
    backing = flaky_mount.backing / "experiments" / "smoke-cpu"
    deadline = time.monotonic() + swarm.t.budget(rounds=ROUNDS - 2)
    dropped_in = None
    for r in range(1, ROUNDS - 2):
        published = backing / "rollouts" / f"round_{r}" / "stage_0" / "worker_1.json"
        submitted = backing / "rewards" / f"round_{r}" / "stage_0" / "worker_1.json"
        swarm.wait_for(published.exists, deadline - time.monotonic(), f"worker_1 to publish round {r}", poll=0.002)
        if not submitted.exists():
            flaky_mount.down()  # "Transport endpoint is not connected" for every call
            dropped_in = r
            break
    assert dropped_in is not None, "never caught worker_1 mid-round"
    time.sleep(DOWN_S)
    spooled_files = spooled(tmp_path)
    flaky_mount.up()
    up_at = time.monotonic()
    wait_for(lambda: not spooled(tmp_path), swarm.t.budget(launches=0, rounds=1), "the spool to drain")
    drained_s = time.monotonic() - up_at
    for node in swarm.names:
        assert swarm.wait_node(node, swarm.t.budget(launches=0, rounds=ROUNDS)) == 0, \
            swarm.output(f"{node}.out")[-3000:]
    assert spooled_files, "nothing was spooled while the mount was down"
    assert not spooled(tmp_path), "spool not flushed"
    exp = swarm.exp
    assert swarm.state()["finished"] is True
    for worker in swarm.workers:
        trained = [m["round"] for m in swarm.metrics(worker)]
        assert max(Counter(trained).values()) == 1
        for r in trained:  # every round it trained was published and submitted: zero lost
            assert (exp / "rollouts" / f"round_{r}" / "stage_0" / f"{worker}.json").is_file()
            assert (exp / "rewards" / f"round_{r}" / "stage_0" / f"{worker}.json").is_file()
        assert trained[-1] == ROUNDS - 1
    record("drive_disconnect", faults=f"FUSE mount returns ENOTCONN for {DOWN_S:g} s while worker_1 is mid-round "
                                      f"{dropped_in}",
           recover=f"spool drained {drained_s:.1f} s after the mount came back",
           spooled_files=len(spooled_files), spooled_files_landed=len(spooled_files), rounds=ROUNDS)
