"""Configuration: precedence, the seeds' environment variables, and one clear error per mistake."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from node.config import ExperimentConfig, config_json_schema, resolve_config
from sapo.config import ConfigError, SapoConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_follow_the_paper():
    c = ExperimentConfig()
    assert (c.sapo.kl_beta, c.sapo.clip_eps_low, c.sapo.clip_eps_high) == (0.0, 0.2, 0.28)
    assert (c.sapo.learning_rate, c.sapo.temperature, c.sapo.top_p, c.sapo.max_new_tokens) == (1e-5, 1.0, 1.0, 256)
    assert c.coordinator.strategy == "hybrid"
    assert [t.name for t in c.sapo.tasks][:2] == ["arc_1d", "basic_arithmetic"]


def test_precedence_yaml_env_set(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"experiment": {"max_rounds": 10, "seed": 1}, "sapo": {"num_generations": 6}}))
    c = resolve_config(path, environ={"MAX_ROUNDS": "20"}, overrides=["experiment.max_rounds=30"])
    assert c.experiment.max_rounds == 30 and c.experiment.seed == 1 and c.sapo.num_generations == 6
    c = resolve_config(path, environ={"MAX_ROUNDS": "20"})
    assert c.experiment.max_rounds == 20


def test_seed_env_names_are_honoured():
    env = {
        "GDRIVE_PATH": "/mnt/drive", "EXPERIMENT_NAME": "exp1", "SEED": "5", "MODEL_NAME": "builtin:tiny-gpt2",
        "NUM_TRAIN_SAMPLES": "3", "NUM_TRANSPLANT_TREES": "1", "NUM_GENERATIONS": "4",
        "COORDINATOR_ROUND_INTERVAL": "12.5", "ROLLOUT_PUBLISH_FREQUENCY": "round",
        "ROLLOUT_CLEANUP_ENABLED": "True", "ROLLOUT_KEEP_LAST_N_ROUNDS": "4", "ROLLOUT_ARCHIVE_OLD": "false",
    }
    c = resolve_config(environ=env)
    assert c.experiment_dir == Path("/mnt/drive/experiments/exp1")
    assert (c.experiment.seed, c.model.name) == (5, "builtin:tiny-gpt2")
    assert (c.sapo.num_train_samples, c.sapo.num_transplant_trees, c.sapo.num_generations) == (3, 1, 4)
    assert c.coordinator.round_interval_s == 12.5
    assert (c.exchange.publish_frequency, c.exchange.cleanup_enabled, c.exchange.keep_last_n_rounds,
            c.exchange.archive_old) == ("round", True, 4, False)


def test_test_mode_then_explicit_env_wins():
    c = resolve_config(environ={"TEST_MODE": "True"})
    assert (c.experiment.max_rounds, c.sapo.num_train_samples, c.sapo.num_generations) == (3, 4, 4)
    c = resolve_config(environ={"TEST_MODE": "1", "NUM_GENERATIONS": "2"})
    assert c.sapo.num_generations == 2
    assert resolve_config(environ={"TEST_MODE": "False"}).experiment.max_rounds == 2000


@pytest.mark.parametrize(
    "overrides, environ, field, words",
    [
        (["sapo.num_generations=1"], {}, "sapo.num_generations", ">= 2"),
        (["coordinator.strategy=fast"], {}, "coordinator.strategy", "time, completion, hybrid"),
        (["sapo.nmae=3"], {}, "sapo.nmae", "allowed keys"),
        (["sapo.tasks=[{name: bf, weight: -1}]"], {}, "sapo.tasks[0].weight", "> 0"),
        (["supervisor.memory_fraction=2"], {}, "supervisor.memory_fraction", "'auto' or a number"),
        (["experiment.name=../evil"], {}, "experiment.name", "letters, digits"),
        (["sapo.temperature=true"], {}, "sapo.temperature", "a number"),
        (["model.dtype=int8"], {}, "model.dtype", "float32"),
        (["model.name=builtin:huge"], {}, "model.name", "builtin:tiny-gpt2"),
        (["sapo.tasks=[{name: not_a_task}]"], {}, "sapo.tasks[0].name", "unknown task"),
        (["nosection"], {}, "nosection", "section.field=value"),
        ([], {"MAX_ROUNDS": "many"}, "experiment.max_rounds (from $MAX_ROUNDS)", "an integer"),
        ([], {"ROLLOUT_CLEANUP_ENABLED": "maybe"}, "exchange.cleanup_enabled (from $ROLLOUT_CLEANUP_ENABLED)",
         "boolean"),
        ([], {"TEST_MODE": "sure"}, "TEST_MODE", "boolean"),
    ],
)
def test_bad_input_gets_one_clear_error(overrides, environ, field, words):
    with pytest.raises(ConfigError) as info:
        resolve_config(environ=environ, overrides=overrides)
    assert info.value.field == field
    assert words in str(info.value)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        resolve_config(tmp_path / "missing.yaml", environ={})
    broken = tmp_path / "broken.yaml"
    broken.write_text("sapo: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(broken, environ={})
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        resolve_config(listy, environ={})
    typo = tmp_path / "typo.yaml"
    typo.write_text("sapoo: {}\n")
    with pytest.raises(ConfigError) as info:
        resolve_config(typo, environ={})
    assert info.value.field == "sapoo"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_resolve(path):
    c = resolve_config(path, environ={})
    assert c.to_dict()["experiment"]["name"]


def test_paper_split_configs():
    splits = {}
    for path in CONFIGS.glob("gpt2-5node-a100-*.yaml"):
        c = resolve_config(path, environ={})
        splits[path.stem] = (c.sapo.num_train_samples, c.sapo.num_transplant_trees)
        assert c.sapo.num_generations == 4 and c.experiment.max_rounds == 2000 and c.supervisor.workers == 4
        assert c.model.name == "openai-community/gpt2"
    assert sorted(splits.values()) == [(1, 3), (2, 2), (3, 1), (4, 0)]
    smoke = resolve_config(CONFIGS / "smoke-cpu.yaml", environ={})
    assert smoke.model.name == "builtin:tiny-gpt2" and smoke.supervisor.device == "cpu"
    assert (smoke.supervisor.workers, smoke.experiment.max_rounds) == (2, 3)
    assert (smoke.sapo.num_train_samples, smoke.sapo.num_transplant_trees, smoke.sapo.num_generations) == (2, 2, 4)
    hetero = resolve_config(CONFIGS / "hetero-cpu.yaml", environ={})
    models = {hetero.for_node(f"worker_{i}").model.name for i in (1, 2)}
    assert models == {"builtin:tiny-gpt2", "builtin:tiny-gpt2-wide"} and hetero.supervisor.device == "cpu"


def test_sections_built_in_code_are_checked_too():
    with pytest.raises(ConfigError, match="optimizer: must be one of auto, adam, adamw_sr; got 'sgd'"):
        SapoConfig(optimizer="sgd")
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(ExperimentConfig().sapo, num_generations=1)
    assert (info.value.field, info.value.reason) == ("num_generations", "must be >= 2; got 1")
    assert dataclasses.replace(SapoConfig(), warmup=True).warmup is True


def test_json_schema_describes_the_config_file():
    schema = config_json_schema()
    json.dumps(schema)  # plain JSON
    sections = schema["properties"]
    assert set(sections) == {f.name for f in dataclasses.fields(ExperimentConfig)}
    assert schema["additionalProperties"] is False
    defs = schema["$defs"]
    assert all(d["additionalProperties"] is False for d in defs.values())
    g = defs["SapoConfig"]["properties"]["num_generations"]
    assert (g["type"], g["minimum"], g["default"]) == ("integer", 2, 8) and "G: completions" in g["description"]
    assert defs["CoordinatorSection"]["properties"]["strategy"]["enum"] == ["time", "completion", "hybrid"]
    assert {"type": "boolean"} in defs["SapoConfig"]["properties"]["warmup"]["anyOf"]
    assert "pattern" in defs["ExperimentSection"]["properties"]["name"]
    # workers: each entry names a worker and may set a few fields, each with the base field's own bounds
    assert schema["properties"]["workers"]["items"] == {"$ref": "#/$defs/WorkerEntry"}
    assert defs["WorkerEntry"]["required"] == ["name"] and "pattern" in defs["WorkerEntry"]["properties"]["name"]
    j = defs["WorkerSapo"]["properties"]["num_transplant_trees"]
    assert j["anyOf"] == [{"minimum": 0, "type": "integer"}, {"type": "null"}] and j["default"] is None
    assert "J: external question groups" in j["description"] and "env" not in j["description"]
    assert set(defs["WorkerModel"]["properties"]) == {"name", "init_seed"}
