"""The trust boundary under attack on live swarms (issue 12): someone who can write to the shared directory
but does not hold the experiment key tries to stop, fool or wipe a `swarm launch` of configs/smoke-cpu.yaml.

Short versions of the scenarios in tests/chaos/trust_scenarios.py (scripts/chaos.py runs them too). Each
asserts, besides the usual audit (exit 0, every round trained once, checkpoints that load): no round
skipped, no restart but the deliberate ones, nothing outside the experiment touched, and a log bounded by
the run's rounds and the warnings' rate limit. pytest's timeout is only a backstop, from the config.
"""

from __future__ import annotations

import pytest

import trust_scenarios
from scenarios import run_passing

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


def backstop(scenario):
    return pytest.mark.timeout(scenario.timeout_s(quick=True))


@backstop(trust_scenarios.forged_state)
def test_forged_state_and_config_change_nothing_also_across_coordinator_kills(tmp_path):
    """Seven kinds of forged state, each rewritten by the coordinator within a poll and never acted on by a
    worker; a coordinator SIGKILLed while the state is forged (and again with state/config.json forged)
    resumes from its local copy, never round 0, and the swarm never stops."""
    fig = run_passing(trust_scenarios.forged_state, tmp_path)
    assert len(fig.details["state repaired after (s)"]) == 7


@backstop(trust_scenarios.own_paths)
def test_own_paths_taken_are_quarantined_and_planted_checkpoints_ignored(tmp_path):
    """A FIFO, a hard link out of the experiment and directories at a node's own write paths are moved to
    quarantine/; an empty round_999999999 checkpoint and a DEFLATE bomb are neither loaded nor pruned, and
    a SIGKILLed worker resumes from its real newest checkpoint."""
    fig = run_passing(trust_scenarios.own_paths, tmp_path)
    assert len(fig.details["quarantined"]) == 5


@backstop(trust_scenarios.planted_files)
def test_planted_results_and_thousands_of_fake_peers_neither_race_nor_stall_the_run(tmp_path):
    """Results planted for every round, 5 000 peer records dated a year ahead, 64 junk files per round:
    every round waits for both workers, ends on completion, and the real peers still exchange groups."""
    run_passing(trust_scenarios.planted_files, tmp_path)


@backstop(trust_scenarios.startup_under_load)
def test_no_worker_misses_round_0_when_every_core_is_busy_at_launch(tmp_path):
    """stress-ng on every core during the launch, and worker_2's model load held longer than
    heartbeat_timeout_s after its "starting" peer record: round 0 waits until both workers run."""
    run_passing(trust_scenarios.startup_under_load, tmp_path)
