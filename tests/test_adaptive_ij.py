"""Adaptive I/J (sapo.adaptive): the budget moves with the reward trend, I + J constant, bounds held."""

from __future__ import annotations

import math

import pytest

from sapo.adaptive import AdaptiveIJ


def test_rising_reward_takes_more_from_the_swarm_falling_reward_generates_more():
    c = AdaptiveIJ(total=4, j=2, alpha=4.0)
    assert c.update(0.2) == (2, 2)  # the first round only starts the average
    for r in (0.3, 0.4, 0.5, 0.6):
        i, j = c.update(r)
        assert i + j == 4
    assert c.split[1] == 3  # reward kept beating its average: J went up, bounded at I + J - 1
    for r in (0.1, 0.0, 0.0, 0.0, 0.0, 0.0):
        c.update(r)
    assert c.split == (4, 0)  # and down again, bounded at 0


def test_small_steps_accumulate_instead_of_being_rounded_away():
    c = AdaptiveIJ(total=6, j=2, alpha=0.5)
    c.update(0.0)
    for _ in range(40):
        c.update(c.ema + 0.2)  # a steady small improvement: +0.1 per round on J
    assert c.split[1] > 2


@pytest.mark.parametrize("total,j", [(1, 0), (1, 5), (5, -3), (5, 99)])
def test_bounds_hold_whatever_the_start(total, j):
    c = AdaptiveIJ(total=total, j=j)
    for r in (0.0, 1.0, 0.0, 1.0, 1.0, 1.0):
        i, jj = c.update(r)
        assert i >= 1 and 0 <= jj <= total - 1 and i + jj == total


def test_state_round_trips_and_untrusted_state_is_clamped():
    a = AdaptiveIJ(total=4, j=1, alpha=3.0)
    for r in (0.1, 0.5, 0.7):
        a.update(r)
    b = AdaptiveIJ(total=4, j=1, alpha=3.0)
    b.load_state_dict(a.state_dict())
    assert b.update(0.9) == a.update(0.9) and math.isclose(a.ema, b.ema)
    b.load_state_dict({"j": 1e9, "ema": 0.5})
    assert b.split == (1, 3)
    with pytest.raises(ValueError):
        AdaptiveIJ(total=0, j=0)


def test_a_worker_logs_its_split_and_a_restart_continues_the_trajectory(tmp_path):
    """In-process worker on the tiny model: each metrics line carries the split used and the next one; the
    controller's state rides in the checkpoint, so a restarted worker goes on from where it was."""
    from test_node_worker import _config, _worker

    config = _config(tmp_path, "sapo.adaptive_ij=true", "sapo.adaptive_ij_alpha=8", "sapo.num_transplant_trees=1")
    worker = _worker(tmp_path, config=config)
    for r in range(3):
        line = worker.run_round(r)
        worker.last_done = r
        used, nxt = line["adaptive_ij"]["used"], line["adaptive_ij"]["next"]
        assert sum(used) == sum(nxt) == 3 and nxt[0] >= 1
    worker.checkpoint()
    state = worker.learner.adaptive.state_dict()
    again = _worker(tmp_path, config=config)
    again.resume()
    assert again.last_done == 2 and again.learner.adaptive.state_dict() == state
