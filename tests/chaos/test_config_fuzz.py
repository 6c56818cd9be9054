"""Config fuzzing: any YAML, env or --set values give a valid config or one clear ConfigError, never a traceback."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.config import ENV_OVERRIDES, ExperimentConfig, resolve_config
from sapo.config import ConfigError
from scenarios import record

pytestmark = pytest.mark.chaos
COUNTS = {"valid": 0, "config_error": 0}


@pytest.fixture(scope="module", autouse=True)
def _figures():
    yield
    record("config_fuzz", faults="random --set values, environment overrides and YAML documents (hypothesis)",
           recover="n/a", examples=sum(COUNTS.values()), **COUNTS)


def _field_paths(cls=ExperimentConfig, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _field_paths(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


PATHS = sorted(_field_paths()) + ["sapo.nope", "nosection.x", "experiment"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=40), st.lists(st.integers(), max_size=3),
                    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _check(call):
    try:
        config = call()
    except ConfigError as err:
        assert err.field and str(err)
        COUNTS["config_error"] += 1
        return
    COUNTS["valid"] += 1
    assert isinstance(config, ExperimentConfig)
    assert config == resolve_config(environ={}, overrides=[f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                                                           for k, v in _flat(config.to_dict()).items()])


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(PATHS), scalars, max_size=4))
def test_random_set_overrides(values):
    items = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in values.items()]
    _check(lambda: resolve_config(environ={}, overrides=items))


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(ENV_OVERRIDES) + ["TEST_MODE"]), st.text(max_size=12), max_size=4))
def test_random_environment(environ):
    _check(lambda: resolve_config(environ=environ))


@settings(max_examples=100, deadline=None)
@given(st.recursive(scalars, lambda kids: st.dictionaries(st.sampled_from(
    ["experiment", "sapo", "model", "tasks", "name", "weight", "x", "supervisor"]), kids, max_size=3), max_leaves=8))
def test_random_yaml_documents(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(yaml.safe_dump(document))
    _check(lambda: resolve_config(path, environ={}))
