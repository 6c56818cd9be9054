"""Heterogeneous swarms: the ``workers:`` list (one clear error naming the worker and the field, ``for_node``),
the experiment's identity, a worker's own tasks and model (peers' text re-tokenised by another tokenizer), the
GPU plan from each worker's model size, and a real two-model swarm on the CPU (`swarm launch` + `validate`)."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import pytest
import torch
import yaml

from harness import Timeouts
from node.__main__ import MixedTaskBank, task_bank
from node.config import ExperimentConfig, resolve_config
from node.layout import ExperimentLayout
from node.runtime import ensure_config_snapshot
from node.schemas import ConfigSnapshot
from node.storage import SharedStore
from sapo.config import ConfigError
from sapo.learner import SapoLearner
from sapo.swarm import share_group
from sapo.tasks import TaskError, TaskRef, dataset_seed
from sapo.tiny_model import build_builtin, build_tokenizer
from sapo.validation import from_mapping
from supervisor import cli
from supervisor.gpu import GIB
from supervisor.gpu_plan import BUILTIN_PARAMS, PlanError, model_params, plan_memory, training_bytes

HETERO = Path(__file__).resolve().parents[1] / "configs" / "hetero-cpu.yaml"
BASE = {"experiment": {"name": "het"}, "supervisor": {"workers": 3},
        "sapo": {"tasks": [{"name": "toy_copy"}, {"name": "toy_digits"}]}}


def write(tmp_path, workers, **sections) -> Path:
    path = tmp_path / "het.yaml"
    path.write_text(yaml.safe_dump({**BASE, **sections, "workers": workers}))
    return path


def resolve(tmp_path, workers, *sets, environ=None, **sections) -> ExperimentConfig:
    return resolve_config(write(tmp_path, workers, **sections), environ=environ or {}, overrides=sets)


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("workers, sets, field, words", [
    ([{"name": "worker_1"}, {"name": "worker_3", "sapo": {"num_transplant_trees": -1}}], [],
     "workers[1] (worker_3).sapo.num_transplant_trees", "must be >= 0; got -1"),
    ([{"name": "worker_2", "sapo": {"num_generations": 2}}], [], "workers[0] (worker_2).sapo.num_generations",
     "cannot be set per worker (a peer's group is used only if it holds G completions)"),
    ([{"name": "worker_2", "sapo": {"max_new_tokens": 8}}], [], "workers[0] (worker_2).sapo.max_new_tokens",
     "cannot be set per worker (peers' completions are re-tokenised"),
    ([{"name": "worker_2", "model": {"dtype": "float16"}}], [], "workers[0] (worker_2).model.dtype",
     "a worker may set: model.name, model.init_seed, sapo.tasks"),
    ([{"name": "worker_2", "experiment": {"seed": 1}}], [], "workers[0] (worker_2).experiment",
     "cannot be set per worker"),
    ([{"name": "worker_2", "sapo": {"nmae": 1}}], [], "workers[0] (worker_2).sapo.nmae",
     "unknown key; allowed keys: tasks, learning_rate, num_train_samples, num_transplant_trees"),
    ([{"name": "worker_4"}], [], "workers[0] (worker_4).name",
     "no such worker: supervisor.workers is 3 (worker_1 ... worker_3)"),
    ([{"name": "worker_2"}], ["supervisor.workers=1"], "workers[0] (worker_2).name",
     "no such worker: supervisor.workers is 1 (worker_1)"),
    ([{"name": "alice"}], [], "workers[0] (alice).name", "must name a worker of this swarm"),
    ([{"name": "worker_0"}], [], "workers[0] (worker_0).name", "must name a worker of this swarm"),
    ([{"name": "../x"}], [], "workers[0].name", "letters, digits"),
    ([{"model": {"name": "builtin:tiny-gpt2"}}], [], "workers[0]", "missing field 'name'"),
    ([{"name": "worker_1"}, {"name": "worker_1"}], [], "workers[1] (worker_1)", "listed twice (also workers[0])"),
    ([{"name": "worker_1", "model": {"name": "builtin:huge"}}], [], "workers[0] (worker_1).model.name",
     "unknown built-in model"),
    ([{"name": "worker_1", "model": {"init_seed": -1}}], [], "workers[0] (worker_1).model.init_seed", ">= 0"),
    ([{"name": "worker_1", "sapo": {"learning_rate": 0}}], [], "workers[0] (worker_1).sapo.learning_rate", "> 0"),
    ([{"name": "worker_1", "sapo": {"num_train_samples": 1.5}}], [],
     "workers[0] (worker_1).sapo.num_train_samples", "an integer"),
    ([{"name": "worker_1", "sapo": {"tasks": []}}], [], "workers[0] (worker_1).sapo.tasks",
     "must list at least one task"),
    ([{"name": "worker_3", "sapo": {"tasks": [{"name": "not_a_task"}]}}], [],
     "workers[0] (worker_3).sapo.tasks[0].name", "unknown task 'not_a_task'"),
    ("worker_1", [], "workers", "must be a list"),
])
def test_a_bad_entry_is_one_error_naming_the_worker_and_the_field(tmp_path, workers, sets, field, words):
    with pytest.raises(ConfigError) as info:
        resolve(tmp_path, workers, *sets)
    assert info.value.field == field
    assert words in str(info.value)


def test_launch_fails_fast_on_a_bad_entry(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SWARM_RUNTIME_DIR", str(tmp_path / "rt"))
    path = write(tmp_path, [{"name": "worker_1"}, {"name": "worker_3", "sapo": {"num_transplant_trees": -1}}],
                 experiment={"name": "het", "root": str(tmp_path / "shared")})
    assert cli.main(["launch", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("swarm: configuration error: workers[1] (worker_3).sapo.num_transplant_trees: must be >= 0; "
                   "got -1")
    assert not (tmp_path / "rt" / "supervisor.pid").exists() and not (tmp_path / "shared").exists()


# --------------------------------------------------------------------------- resolution

def test_each_worker_resolves_its_own_entry_and_the_rest_the_base():
    base = resolve_config(HETERO, environ={}, overrides=["supervisor.workers=3"])
    one, two, three = (base.for_node(f"worker_{i}") for i in (1, 2, 3))
    assert base.for_node("coordinator") is base and three is base  # not listed: the base config
    assert (one.model.name, one.model_seed(), [t.name for t in one.sapo.tasks]) == ("builtin:tiny-gpt2", 42,
                                                                                     ["toy_copy"])
    assert (one.sapo.learning_rate, one.sapo.num_train_samples, one.sapo.num_transplant_trees) == (1e-4, 2, 2)
    assert (two.model.name, two.model_seed(), [t.name for t in two.sapo.tasks]) == ("builtin:tiny-gpt2-wide", 7,
                                                                                     ["toy_digits"])
    assert (two.sapo.learning_rate, two.sapo.num_train_samples, two.sapo.num_transplant_trees) == (5e-5, 3, 1)
    # What no worker may change stays the base's; the workers list travels with every resolved config.
    assert two.sapo.num_generations == base.sapo.num_generations and two.experiment == base.experiment
    assert two.workers == base.workers and two.model.dtype == base.model.dtype
    assert [t.name for t in base.experiment_tasks()] == ["toy_copy", "toy_digits"]


def test_the_environment_and_set_change_the_base_and_an_entry_still_wins(tmp_path):
    workers = [{"name": "worker_2", "sapo": {"num_transplant_trees": 3, "tasks": [{"name": "basic_arithmetic"}]}}]
    c = resolve(tmp_path, workers, "sapo.learning_rate=0.5", environ={"NUM_TRANSPLANT_TREES": "0", "SEED": "5"})
    assert (c.sapo.num_transplant_trees, c.sapo.learning_rate, c.model_seed()) == (0, 0.5, 5)
    two = c.for_node("worker_2")
    assert (two.sapo.num_transplant_trees, two.sapo.learning_rate, two.model_seed()) == (3, 0.5, 5)
    assert [t.name for t in c.experiment_tasks()] == ["toy_copy", "toy_digits", "basic_arithmetic"]


def test_the_config_round_trips_through_its_snapshot_form():
    c = resolve_config(HETERO, environ={})
    again = from_mapping(ExperimentConfig, json.loads(json.dumps(c.to_dict())))
    assert again == c and again.for_node("worker_2") == c.for_node("worker_2")


def _store(tmp_path, config, node_id):
    layout = ExperimentLayout.from_config(config)
    store = SharedStore(layout, node_id=node_id, lock_dir=tmp_path / "locks", spool_dir=tmp_path / f"spool-{node_id}",
                        sleep=lambda s: None)
    store.ensure_layout()
    return store, layout


def test_the_identity_check_covers_the_workers_list_and_accepts_older_snapshots(tmp_path):
    sets = [f"experiment.root={tmp_path / 'shared'}"]
    hetero = resolve_config(HETERO, environ={}, overrides=sets)
    store, layout = _store(tmp_path, hetero, "coordinator")
    ensure_config_snapshot(store, layout, hetero, "coordinator")
    ensure_config_snapshot(store, layout, hetero, "worker_2")  # the same base config: welcome
    other = resolve_config(HETERO, environ={}, overrides=[*sets, "supervisor.workers=3"])
    ensure_config_snapshot(store, layout, other, "worker_3")  # supervisor settings are no part of the identity
    changed = dataclasses.replace(hetero, workers=hetero.workers[:1])
    with pytest.raises(ConfigError) as info:
        ensure_config_snapshot(store, layout, changed, "worker_1")
    assert info.value.field == "workers" and "Use a new experiment name" in str(info.value)

    # A snapshot written before workers: and model.init_seed existed holds neither: a plain config still joins.
    plain = resolve_config(HETERO, environ={}, overrides=[*sets, "experiment.name=older"])
    plain = dataclasses.replace(plain, workers=())
    store, layout = _store(tmp_path, plain, "coordinator")
    old = plain.to_dict()
    del old["workers"], old["model"]["init_seed"]
    snapshot = ConfigSnapshot(experiment="older", written_by="coordinator", written_at=time.time(), config=old)
    store.write_json_atomic(layout.config_file(), snapshot.to_json())
    ensure_config_snapshot(store, layout, plain, "worker_1")
    with pytest.raises(ConfigError, match="model.init_seed"):
        ensure_config_snapshot(store, layout, dataclasses.replace(plain, model=dataclasses.replace(
            plain.model, init_seed=3)), "worker_1")


# --------------------------------------------------------------------------- a worker's tasks and model

def test_a_worker_samples_its_own_tasks_and_takes_peers_groups_of_every_task():
    c = resolve_config(HETERO, environ={})
    everything = c.experiment_tasks()
    assert task_bank(c.sapo.tasks, everything) is None  # its mix is every task: the learner's own bank, as before
    bank = task_bank(c.for_node("worker_1").sapo.tasks, everything)
    assert isinstance(bank, MixedTaskBank) and bank.names == ("toy_copy", "toy_digits")
    asked = {q.ref.dataset for r in range(20) for q in bank.sample(c.experiment.seed, "worker_1", r, 4)}
    assert asked == {"toy_copy"}
    peer = bank.rebuild(TaskRef("toy_digits", dataset_seed(42, "toy_digits"), 5), experiment_seed=42)
    assert bank.score(peer, "482913") == 1.0
    with pytest.raises(TaskError, match="not in this node's task mix"):  # not a task of this experiment
        bank.rebuild(TaskRef("basic_arithmetic", dataset_seed(42, "basic_arithmetic"), 0), experiment_seed=42)


def test_the_wide_builtin_model_has_its_own_size_and_tokenizer():
    wide, wide_tok = build_builtin("builtin:tiny-gpt2-wide", 7)
    tiny, tiny_tok = build_builtin("builtin:tiny-gpt2", 7)
    assert sum(p.numel() for p in wide.parameters()) == BUILTIN_PARAMS["builtin:tiny-gpt2-wide"]
    assert sum(p.numel() for p in tiny.parameters()) == BUILTIN_PARAMS["builtin:tiny-gpt2"]
    assert (len(wide_tok), len(tiny_tok)) == (768, 512)
    text = "Copy this word: apple <answer>apple</answer> 482913"
    assert wide_tok(text)["input_ids"] != tiny_tok(text)["input_ids"]
    assert wide_tok.decode(wide_tok(text)["input_ids"]) == text
    again, _ = build_builtin("builtin:tiny-gpt2-wide", 7)
    assert all(torch.equal(a, b) for a, b in zip(wide.state_dict().values(), again.state_dict().values()))
    # GPT-2 small's count, from its shape alone (no 124M random init here)
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        big = GPT2LMHeadModel(GPT2Config(vocab_size=len(build_tokenizer(50257))))
    assert sum(p.numel() for p in big.parameters()) == BUILTIN_PARAMS["builtin:gpt2-124m"]


def test_a_worker_with_another_tokenizer_re_scores_peers_text():
    """Rollouts travel as text: worker_2 (wide model, 768-token BPE, toy_digits only) trains on worker_1's
    toy_copy groups (tiny model, 512-token BPE), re-tokenised with its own tokenizer."""
    c = resolve_config(HETERO, environ={}, overrides=["sapo.max_new_tokens=12"])
    one, two = c.for_node("worker_1"), c.for_node("worker_2")
    learners = {}
    for name, own in (("worker_1", one), ("worker_2", two)):
        model, tok = build_builtin(own.model.name, own.model_seed())
        learners[name] = SapoLearner(model, tok, own.sapo, experiment_seed=42,
                                     bank=task_bank(own.sapo.tasks, c.experiment_tasks()))
    groups = []
    for r in range(6):  # a few rounds of questions: some group has a reward spread
        local, _ = learners["worker_1"].generate(learners["worker_1"].sample_questions("worker_1", r), seed=r,
                                                 source="worker_1")
        groups += [dataclasses.replace(g, batch_id=f"{r}-{g.batch_id}") for g in local]
    shared = [share_group(g, "worker_1") for g in groups]
    chosen = learners["worker_2"].select_external(shared, "worker_2", random.Random(0))
    assert chosen.groups and not set(chosen.dropped) - {"no_signal"}, chosen.dropped
    wide_tok = learners["worker_2"].tokenizer
    for g in chosen.groups:
        assert g.question.ref.dataset == "toy_copy" and g.source == "worker_1"
        assert g.prompt_ids == wide_tok(g.prompt, add_special_tokens=False)["input_ids"]
        for comp in g.completions:
            assert comp.token_ids[: len(comp.token_ids) - comp.finished] == \
                wide_tok(comp.text, add_special_tokens=False)["input_ids"][:12 - comp.finished]
    stats = learners["worker_2"].train(chosen.groups)
    assert stats.sequences > 0 and not stats.skipped


# --------------------------------------------------------------------------- the GPU plan

def test_training_state_bytes_per_parameter():
    assert training_bytes(1000, "float32") == 16_000  # weights, grads, two float32 moments
    assert training_bytes(1000, "auto") == training_bytes(1000, "bfloat16", "adamw_sr") == 12_000
    assert training_bytes(1000, "bfloat16", "adam") == 8_000  # torch's Adam keeps bf16 moments
    assert training_bytes(1000, "bfloat16", kl_beta=0.1) == 14_000  # plus the frozen reference


def test_two_model_sizes_share_the_gpu_by_need():
    needs = [2 * GIB, 12 * GIB]
    plan = plan_memory(80 * GIB, 2, "auto", 1.0, needs, ["small", "big"])
    left = 80 * GIB - 2 * GIB - 0.05 * 80 * GIB  # context margins and the 5 % reserve
    assert plan.share(2) - plan.share(1) in (10 * GIB - 1, 10 * GIB, 10 * GIB + 1)  # the difference of the needs
    assert abs(plan.share(1) + plan.share(2) - left) <= 2 and plan.bytes_per_worker == plan.share(2)
    assert plan.planned_bytes + plan.headroom_bytes == 80 * GIB
    assert plan.budget_bytes(1) == plan.share(1) + GIB and plan.budget_bytes() == plan.share(2) + GIB
    assert "worker_1 " in plan.describe() and "from each one's model" in plan.describe()
    # One model (or an unknown size): equal shares, exactly as before
    same = plan_memory(80 * GIB, 2, "auto", 1.0)
    assert plan_memory(80 * GIB, 2, "auto", 1.0, [GIB, GIB]) == same
    assert plan_memory(80 * GIB, 2, "auto", 1.0, [GIB, None]) == same and same.share(2) == same.bytes_per_worker


def test_a_plan_that_cannot_hold_a_workers_model_is_refused_naming_it():
    with pytest.raises(PlanError, match=r"worker_2 \(big\) needs about 12.0 GiB .* its share of 8.0 GiB; raise "
                                        r"memory_fraction, or set it to auto"):
        plan_memory(80 * GIB, 2, 0.1, 1.0, [GIB, 12 * GIB], ["small", "big"])
    with pytest.raises(PlanError, match=r"do not fit: .* 30.0 \(worker_1 \(a\)\) \+ 50.0 \(worker_2 \(b\)\) = "
                                        r"80.0 GiB > 74.0 GiB left after the context margins and the 5% reserve"):
        plan_memory(80 * GIB, 2, "auto", 1.0, [30 * GIB, 50 * GIB], ["a", "b"])


def test_model_sizes_come_from_the_table_a_directory_or_the_hub_cache(tmp_path):
    assert model_params("builtin:tiny-gpt2-wide") == 1_022_720
    model, _ = build_builtin("builtin:tiny-gpt2", 0)
    numel = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert model_params(str(tmp_path / "one")) == model_params(str(tmp_path / "sharded")) == numel
    # The Hugging Face cache's layout: models--org--name/refs/main -> snapshots/<revision>/
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots").mkdir()
    (tmp_path / "one").rename(repo / "snapshots" / "abc123")
    assert model_params("org/tiny", {"HF_HUB_CACHE": str(tmp_path / "hub")}) == numel
    assert model_params("org/tiny", {"HF_HOME": str(tmp_path)}) == numel
    assert model_params("org/other", {"HF_HUB_CACHE": str(tmp_path / "hub")}) is None
    (repo / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"\xff" * 16)  # not a safetensors file
    assert model_params("org/tiny", {"HF_HUB_CACHE": str(tmp_path / "hub")}) is None


# --------------------------------------------------------------------------- a real swarm

@pytest.mark.slow
@pytest.mark.timeout(Timeouts.of(HETERO).budget(rounds=3))
def test_hetero_cpu_config_runs_and_validates(make_swarm):
    run = make_swarm(config=HETERO)
    assert run.run_to_end() == 0, run.output()[-3000:]
    check = run.cli("validate")
    assert check.returncode == 0 and "checks passed: OK" in check.stdout, check.stdout
    own = {n: [e for e in run.node_log(n) if e.get("event") == "worker_overrides"][-1] for n in run.workers}
    assert (own["worker_1"]["model"], own["worker_1"]["tasks"]) == ("builtin:tiny-gpt2", ["toy_copy"])
    assert (own["worker_2"]["model"], own["worker_2"]["init_seed"], own["worker_2"]["tasks"]) == \
        ("builtin:tiny-gpt2-wide", 7, ["toy_digits"])
    one, two = run.metrics("worker_1"), run.metrics("worker_2")
    assert {m["num_local_groups"] for m in one} == {2} and {m["num_local_groups"] for m in two} == {3}  # own I
    assert max(m["num_external_groups"] for m in two) <= 1  # its own J
    # worker_1 samples only toy_copy: its external groups are worker_2's toy_digits, from another tokenizer
    assert sum(m["num_external_groups"] for m in one) > 0
    assert not any(set(m["external_dropped"]) - {"no_signal"} for m in one + two)
