"""Held-out evaluation: the question set (same for every node, never a training question), greedy pass@1,
the time budget, and a worker's evals.jsonl over a real run (in-process coordinator and worker, tiny model)."""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path

import pytest
import torch

from node.config import resolve_config
from node.coordinator import Coordinator
from node.heartbeat import Heartbeat
from node.layout import ExperimentLayout
from node.records import evals_file
from node.runtime import EXIT_FINISHED, PeerRegistration, StopFlag, ensure_config_snapshot
from node.storage import SharedStore
from node.worker import Worker
from sapo.config import DEFAULT_TASKS, TaskSpec
from sapo.evaluate import (EVAL_SEED_LOW, eval_dataset_seed, evaluate, generator_seed,
                           heldout_questions, heldout_refs)
from sapo.learner import SapoLearner
from sapo.rollouts import encode_prompt
from sapo.tasks import DATASET_SIZE, TaskBank, TaskError, build_prompt, dataset_seed
from sapo.tiny_model import build_tiny_gpt2
from supervisor.report import build_report
from supervisor.validate import validate_experiment

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smoke-cpu.yaml"
MIX = [TaskSpec("toy_copy"), TaskSpec("basic_arithmetic")]


# --- the held-out set ---------------------------------------------------------------------------------

def test_heldout_refs_interleave_tasks_and_depend_on_the_eval_seed_only():
    refs = heldout_refs(["toy_copy", "acre"], 7, 3)
    assert [(r.dataset, r.index) for r in refs] == [("acre", 0), ("toy_copy", 0), ("acre", 1), ("toy_copy", 1),
                                                    ("acre", 2), ("toy_copy", 2)]
    assert heldout_refs(["acre", "toy_copy"], 7, 3) == refs  # a worker listing its mix in another order
    assert heldout_refs(["toy_copy"], 8, 3) != heldout_refs(["toy_copy"], 7, 3)
    assert len(heldout_refs(["acre"], 7, 5000)) == 1000  # capped at the dataset's size


def test_the_heldout_set_is_never_a_training_question():
    """reasoning-gym generates item i of a dataset seeded s from Random(s + i) (the toy tasks from
    "name:s:i"): training's generator seeds are below 2**31 + DATASET_SIZE for any experiment seed, the held-out
    ones above. Checked here over many experiment seeds, nodes and rounds, and for every task by its text where
    the question space is large."""
    assert all(dataset_seed(s, n) + DATASET_SIZE <= EVAL_SEED_LOW for s in range(500) for n in ("arc_1d", "bf"))
    names = [t.name for t in DEFAULT_TASKS] + ["toy_copy", "toy_digits"]
    bank = TaskBank([TaskSpec(n) for n in names])
    held = heldout_questions(bank, 1_000_003, 16)
    held_seeds = {(q.ref.dataset, generator_seed(q.ref)) for q in held}
    assert min(s for _, s in held_seeds) >= EVAL_SEED_LOW and len(held_seeds) == len(held)
    trained, texts = set(), {}
    for exp_seed, node, round_ in itertools.product((0, 42, 2**40), ("worker_1", "worker_2", "w9"), range(60)):
        for q in bank.sample(exp_seed, node, round_, 8):
            trained.add((q.ref.dataset, generator_seed(q.ref)))
            texts.setdefault(q.ref.dataset, set()).add(q.text)
    assert len(trained) > 4000 and not trained & held_seeds
    # Text too, where the question space is large (binary_matrix, propositional_logic and the toy tasks have
    # small ones: their texts can repeat although their generator streams never meet).
    for name in ("arc_1d", "basic_arithmetic", "base_conversion", "bf", "calendar_arithmetic",
                 "decimal_arithmetic", "fraction_simplification"):
        assert not {q.text for q in held if q.ref.dataset == name} & texts[name], name
    # A peer cannot make a node train on a held-out question: references with another seed are refused.
    with pytest.raises(TaskError, match="not this experiment's seed"):
        bank.rebuild(held[0].ref, experiment_seed=42)


def test_a_worker_with_a_subset_of_the_tasks_is_evaluated_on_all_of_them():
    from node.__main__ import MixedTaskBank

    full = TaskBank([TaskSpec("toy_copy"), TaskSpec("toy_digits")])
    subset = MixedTaskBank([TaskSpec("toy_digits")], [TaskSpec("toy_copy"), TaskSpec("toy_digits")])
    mine = heldout_questions(subset, 3, 4)
    assert [q.ref for q in mine] == [q.ref for q in heldout_questions(full, 3, 4)]
    assert [q.text for q in mine] == [q.text for q in heldout_questions(full, 3, 4)]


def test_eval_dataset_seeds_stay_where_numpy_can_seed():
    seeds = [eval_dataset_seed(s, n) for s in range(200) for n in ("pool_matrix", "toy_copy")]
    assert all(EVAL_SEED_LOW <= s and s + DATASET_SIZE <= 2**32 for s in seeds)
    bank = TaskBank([TaskSpec("pool_matrix")])  # seeds numpy with seed + index: it must build
    assert len(heldout_questions(bank, 1_000_003, 3)) == 3


# --- greedy pass@1 -----------------------------------------------------------------------------------

def _eval(model, tok, bank, questions, **kw):
    args = dict(max_new_tokens=12, max_prompt_tokens=256, batch_size=4, time_budget_s=600.0) | kw
    return evaluate(model, tok, bank, questions, **args)


def test_greedy_eval_is_deterministic_argmax_and_leaves_the_rng_alone():
    model, tok = build_tiny_gpt2(seed=1)
    bank = TaskBank(MIX)
    questions = heldout_questions(bank, 1_000_003, 4)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = _eval(model, tok, bank, questions)
    assert torch.equal(torch.get_rng_state(), state)  # training's sampling is not shifted by an eval
    torch.manual_seed(123)
    again = _eval(model, tok, bank, questions, decode="generate")
    assert again.completions == first.completions  # another RNG state, the other decoding loop: the same
    assert [t.to_json() | {"seconds": 0} for t in again.tasks.values()] == \
        [t.to_json() | {"seconds": 0} for t in first.tasks.values()]
    assert first.complete and {n: t.n for n, t in first.tasks.items()} == {"toy_copy": 4, "basic_arithmetic": 4}
    # The argmax at every step: what generate(do_sample=False) produces for each prompt alone.
    pad = tok.pad_token_id
    for q, text in zip(questions, first.completions):
        ids = torch.tensor([encode_prompt(tok, build_prompt(q.text, tok), 256)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             pad_token_id=pad, eos_token_id=tok.eos_token_id,
                             suppress_tokens=[pad] if pad != tok.eos_token_id else None)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).startswith(text)


def test_scores_use_the_tasks_own_reward():
    model, tok = build_tiny_gpt2(seed=1)
    bank = TaskBank([TaskSpec("toy_copy")])
    questions = heldout_questions(bank, 5, 6)
    result = _eval(model, tok, bank, questions)
    scores = [bank.score(q, text) for q, text in zip(questions, result.completions)]
    task = result.to_json()["tasks"]["toy_copy"]
    assert task["accuracy"] == sum(s >= 1.0 for s in scores) / 6
    assert task["score"] == pytest.approx(sum(scores) / 6)
    assert (task["n"], task["planned"], task["complete"]) == (6, 6, True)


def test_the_time_budget_cuts_a_long_eval():
    model, tok = build_tiny_gpt2(seed=1)
    bank = TaskBank(MIX)
    questions = heldout_questions(bank, 1_000_003, 10)  # 20 questions, batches of 4
    ticks = itertools.count()
    clock = lambda: float(next(ticks))  # noqa: E731 - every reading one second later
    result = _eval(model, tok, bank, questions, time_budget_s=7.5, clock=clock)
    # Readings: start 0; batch 1 from 2 to 3 (1 s); before batch 2 at 4 (+1 s expected: 5 <= 7.5), it runs
    # 5-6; before batch 3 at 7: 7 + 1 > 7.5, so the eval stops with 8 of 20 questions.
    assert result.batches == 2 and sum(t.n for t in result.tasks.values()) == 8 and not result.complete
    fields = result.to_json()
    assert fields["complete"] is False and all(t["n"] >= 1 for t in fields["tasks"].values())  # interleaved
    # A real clock: a budget far below one batch's time still evaluates the first batch, and stops there.
    cut = _eval(model, tok, bank, questions, time_budget_s=1e-6)
    assert cut.batches == 1 and sum(t.n for t in cut.tasks.values()) == 4 and not cut.complete


# --- the worker: evals.jsonl over a real run ----------------------------------------------------------

def _config(root: Path, *overrides):
    return resolve_config(CONFIG, environ={}, overrides=[
        f"experiment.root={root}", "experiment.max_rounds=3", "supervisor.workers=1", "exchange.fetch_timeout_s=0",
        "coordinator.poll_interval_s=0.05", "eval.questions_per_task=3", *overrides])


def _worker(tmp_path, config, node_id="worker_1") -> Worker:
    layout = ExperimentLayout.from_config(config)
    store = SharedStore(layout, node_id=node_id, lock_dir=tmp_path / "locks", spool_dir=tmp_path / f"spool-{node_id}")
    store.ensure_layout()
    learner = SapoLearner(*build_tiny_gpt2(seed=1), config.sapo, experiment_seed=config.experiment.seed)
    return Worker(config, node_id, store=store, layout=layout, learner=learner,
                  heartbeat=Heartbeat(tmp_path / "run", node_id, "worker", 1.0), stop=StopFlag(),
                  peer=PeerRegistration(store, layout, node_id, "worker", 1.0))


def _run_swarm(tmp_path, config) -> Worker:
    """A real coordinator (in a thread) and one worker run the experiment to its end."""
    layout = ExperimentLayout.from_config(config)
    store = SharedStore(layout, node_id="coordinator", lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool-c")
    store.ensure_layout()
    ensure_config_snapshot(store, layout, config, "coordinator", repair=True)  # as python -m node does
    coordinator = Coordinator(config, "coordinator", store=store, layout=layout, stop=StopFlag(),
                              heartbeat=Heartbeat(tmp_path / "run", "coordinator", "coordinator", 1.0))
    codes = []
    thread = threading.Thread(target=lambda: codes.append(coordinator.run()))
    thread.start()
    worker = _worker(tmp_path, config)
    try:
        assert worker.run() == EXIT_FINISHED
    finally:
        coordinator.stop.signum = 15  # matters only when the worker failed; otherwise the coordinator is done
        thread.join(60)
    return worker


def _lines(worker: Worker) -> list[dict]:
    return [json.loads(x) for x in evals_file(worker.layout, worker.node_id).read_text().splitlines()]


@pytest.mark.timeout(300)
def test_a_worker_writes_one_eval_line_per_round_none_repeated_after_a_restart(tmp_path):
    config = _config(tmp_path / "shared", "eval.every_rounds=1")
    worker = _run_swarm(tmp_path, config)
    lines = _lines(worker)
    assert [(x["round"], x["final"]) for x in lines] == [(0, False), (1, False), (2, True)]  # round 2 is the end
    for x in lines:
        assert x["node_id"] == "worker_1" and x["complete"] is True and isinstance(x["timestamp"], float)
        assert set(x["tasks"]) == {"toy_copy", "basic_arithmetic"}
        assert all(t["n"] == t["planned"] == 3 and 0.0 <= t["accuracy"] <= 1.0 for t in x["tasks"].values())
    # A restart after the end (resumes round 2's checkpoint, sees the final state) evaluates nothing again,
    # nor does one that lost its checkpoint and trains round 0 again.
    again = _worker(tmp_path, config)
    assert again.run() == EXIT_FINISHED
    assert _lines(worker) == lines
    # Killed during round 2's eval (its line never written): the restart makes it up, once.
    path = evals_file(worker.layout, "worker_1")
    path.write_text("".join(x + "\n" for x in path.read_text().splitlines()[:2]))
    assert _worker(tmp_path, config).run() == EXIT_FINISHED
    made_up = _lines(worker)
    assert made_up[:2] == lines[:2] and (made_up[2]["round"], made_up[2]["final"]) == (2, True)
    untimed = [{t: {k: v for k, v in score.items() if k != "seconds"} for t, score in x["tasks"].items()}
               for x in (made_up[2], lines[2])]
    assert untimed[0] == untimed[1]  # greedy: the same answers from the same weights
    lines = made_up
    lost = _worker(tmp_path, config)
    lost.run_round(0)
    assert lost.evaluate(0) is None and lost.evaluate(2, final=True) is None
    assert _lines(worker) == lines
    # A second node evaluates the very same questions.
    other = _worker(tmp_path, config, node_id="worker_7")
    other.evaluate(0)
    assert [q.ref for q in other._heldout] == [q.ref for q in worker._heldout]
    assert [q.text for q in other._heldout] == [q.text for q in worker._heldout]

    # swarm validate checks the eval lines: all there, none repeated.
    checks = {c.name: c for c in validate_experiment(config)}
    assert all(c.ok for c in checks.values()), [c for c in checks.values() if not c.ok]
    assert checks["worker_1 evals"].detail == "3 lines, rounds 0-2"
    path = evals_file(worker.layout, "worker_1")
    lines_text = path.read_text().splitlines()
    path.write_text("\n".join(lines_text[1:] + lines_text[-1:]) + "\n")  # round 0 lost, round 2 twice
    bad = {c.name: c for c in validate_experiment(config)}["worker_1 evals"]
    assert not bad.ok and "rounds with more than one line: 2" in bad.detail and "no eval for rounds 0" in bad.detail
    path.write_text("\n".join(lines_text) + "\n")

    # The report of this experiment shows the eval.
    report = build_report([worker.layout.root], tmp_path / "report")
    (row,) = report.experiments
    final = sum(t["accuracy"] for t in lines[-1]["tasks"].values()) / 2
    assert row.final_eval_accuracy == pytest.approx(final) and row.eval_rounds == 3
    assert "eval_accuracy.png" in {p.name for p in report.plots}
    assert "final eval accuracy" in report.markdown.read_text()


@pytest.mark.timeout(300)
def test_every_k_rounds_and_at_the_end_within_the_time_budget(tmp_path):
    config = _config(tmp_path / "shared", "eval.every_rounds=2", "eval.questions_per_task=20",
                     "eval.time_budget_s=0.000001")
    worker = _run_swarm(tmp_path, config)
    lines = _lines(worker)
    assert [(x["round"], x["final"]) for x in lines] == [(1, False), (2, True)]  # after round 1, and the end
    for x in lines:  # one batch (I*G = 8 prompts) of 40, then the budget stopped it
        assert x["complete"] is False and sum(t["n"] for t in x["tasks"].values()) == 8
        assert all(t["planned"] == 20 and not t["complete"] for t in x["tasks"].values())


def test_evals_off_by_default(tmp_path):
    worker = _worker(tmp_path, _config(tmp_path / "shared"))
    worker.run_round(0)
    assert worker.evaluate(0) is None and not evals_file(worker.layout, "worker_1").exists()
