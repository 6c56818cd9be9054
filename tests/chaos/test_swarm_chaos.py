"""Chaos on real processes under `swarm launch` (short versions of scripts/chaos.py, same code and figures).

Each test runs one scenario of tests/chaos/scenarios.py in its own tmp dir and asserts on the figures it
returns: PASS with 0 rollouts, rounds and checkpoints lost, plus the scenario's own limits. Every scenario
SIGKILLs whatever it started that is still alive before it returns, and checks that nothing was left.
pytest's timeout is only a backstop: each scenario's longest correct run, from its config.
"""

from __future__ import annotations

import pytest

import scenarios
from scenarios import run_passing as _run

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


def backstop(scenario):
    return pytest.mark.timeout(scenario.timeout_s(quick=True))


@backstop(scenarios.kill_storm)
def test_kill_storm_workers_coordinator_supervisor(tmp_path):
    """6 random worker SIGKILLs, the coordinator, then the supervisor and a relaunch: the run finishes,
    one metrics line per trained round, rounds never go back, nothing left running, checkpoints load."""
    fig = _run(scenarios.kill_storm, tmp_path)
    assert sum(fig.details["worker kills"].values()) == 6


@backstop(scenarios.host_disconnect)
def test_host_disconnect_matches_an_uninterrupted_run(tmp_path):
    """The whole tree SIGKILLed at a random moment and relaunched trains exactly the rounds an
    uninterrupted run of the same config trains."""
    fig = _run(scenarios.host_disconnect, tmp_path)
    assert fig.details["rounds skipped (logged)"] == {"worker_1": 0, "worker_2": 0}


@backstop(scenarios.hung_worker)
def test_sigstopped_worker_is_restarted_within_twice_the_heartbeat_timeout(tmp_path):
    _run(scenarios.hung_worker, tmp_path)


@backstop(scenarios.hung_main_loop)
def test_hung_main_loop_is_restarted_within_twice_the_heartbeat_timeout(tmp_path):
    _run(scenarios.hung_main_loop, tmp_path)


@backstop(scenarios.crash_loop_bad_model)
def test_bad_model_name_is_fatal_as_a_configuration_error(tmp_path):
    fig = _run(scenarios.crash_loop_bad_model, tmp_path)
    assert "/nonexistent/model" in fig.details["reason"]


@backstop(scenarios.crash_loop_import_error)
def test_import_error_is_fatal_as_a_configuration_error(tmp_path):
    fig = _run(scenarios.crash_loop_import_error, tmp_path)
    assert "ImportError" in fig.details["reason"]


@backstop(scenarios.malicious_peer_files)
def test_malicious_peer_files_in_a_live_swarm(tmp_path):
    """An outsider's files are never read by name, or refused unsigned at a real worker's path; a key
    holder's bad files are refused by the format checks, each once per worker and round; forged rewards
    are detected and never used."""
    fig = _run(scenarios.malicious_peer_files, tmp_path)
    assert fig.details["forged rewards detected (peer_reward_disagreements)"] >= 1
    assert fig.details["format refusals per worker and round"] == [10]


@backstop(scenarios.second_supervisor)
def test_second_supervisor_refused_and_stale_lock_ignored(tmp_path):
    _run(scenarios.second_supervisor, tmp_path)
