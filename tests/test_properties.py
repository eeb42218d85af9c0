"""Property-based tests (hypothesis): random valid and invalid configs and partition arguments give either a
result that keeps its invariants or a ValueError that names what is wrong, never another exception."""
import dataclasses

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedgan_utils as fu

NAMES = sorted({name for names in fu.CHOICES.values() for name in names})
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-10 ** 30, 10 ** 30), st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.text(max_size=6), st.sampled_from(NAMES),
    st.lists(st.floats(0, 1), max_size=3), st.tuples(st.floats(0, 1), st.floats(0, 1)))
FIELDS = [f.name for f in dataclasses.fields(fu.FedConfig)]
SETTINGS = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.dictionaries(st.sampled_from(FIELDS), ANY_VALUE, max_size=5))
def test_random_configs_are_valid_or_refused_with_a_value_error(values):
    try:
        config = fu.FedConfig(**values)
    except ValueError as error:
        field = str(error).split("=")[0]
        assert field in FIELDS or field in ("beta", "scheme"), str(error)  # the message starts with the field
        return
    assert fu.FedConfig.from_json(config.to_json()) == config
    for name, allowed in fu.CHOICES.items():
        assert getattr(config, name) in allowed
    assert config.num_clients >= 1 and config.rounds >= 1 and 0 < config.client_fraction <= 1
    fu.make_strategy(config)  # every valid config makes its server rule


ENGINE_FIELDS = [f.name for f in dataclasses.fields(fu.EngineOptions)]
ENGINE_NAMES = sorted(set(fu.CLIENT_MAPS) | set(fu.CONV_FORMS))


@SETTINGS
@given(st.dictionaries(st.sampled_from(ENGINE_FIELDS), st.one_of(ANY_VALUE, st.sampled_from(ENGINE_NAMES)), max_size=4))
def test_random_engine_options_are_valid_or_refused_with_a_value_error(values):
    try:
        engine = fu.EngineOptions(**values)
    except ValueError as error:
        assert str(error).split("=")[0] in ENGINE_FIELDS, str(error)
        return
    config = fu.FedConfig(engine=engine)
    assert fu.FedConfig.from_json(config.to_json()) == config  # a valid engine survives a checkpoint's JSON
    assert engine.client_map in fu.CLIENT_MAPS and engine.conv_form in fu.CONV_FORMS


PARTITION_KW = st.dictionaries(
    st.sampled_from(["alpha", "min_size", "shards_per_client", "classes_per_client", "sigma", "beta"]),
    st.one_of(st.integers(-2, 12), st.floats(-1, 5), st.just(float("nan")), st.none(), st.text(max_size=2)), max_size=3)


@SETTINGS
@given(labels=st.lists(st.integers(0, 9), max_size=150),
       num_clients=st.one_of(st.integers(-2, 30), st.floats(0, 30), st.text(max_size=2)),
       scheme=st.sampled_from(fu.PARTITIONS + ("random",)), seed=st.integers(-1, 3), kw=PARTITION_KW)
def test_random_partition_arguments_give_a_partition_or_a_value_error(labels, num_clients, scheme, seed, kw):
    try:
        parts = fu.partition(labels, num_clients, scheme, seed=seed, **kw)
    except ValueError:
        return
    assert len(parts) == num_clients
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(labels)))  # every index exactly once
    assert all(p.dtype == np.int64 for p in parts)
