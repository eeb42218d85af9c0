"""Property-based tests (hypothesis): random valid and invalid configs and partition arguments give either a
result that keeps its invariants or a ValueError that names what is wrong, never another exception; so do idx files
(valid and damaged), checkpoints (valid, truncated, corrupted, crafted), generate() and the DP helpers, each example
bounded in time."""
import dataclasses
import gzip
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
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


# -- files, checkpoints, generate and the DP helpers under random input ----------------------------------------

BOUNDED = settings(max_examples=60, deadline=timedelta(seconds=20), database=None,
                   suppress_health_check=[HealthCheck.too_slow])
DAMAGES = st.one_of(st.just(("none", 0)), st.tuples(st.sampled_from(["truncate", "flip", "magic", "dims", "label"]),
                                                    st.integers(0, 10 ** 6)))


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()


@BOUNDED
@given(count=st.integers(1, 40), gz=st.booleans(), which=st.sampled_from(["images", "labels"]), damage=DAMAGES,
       seed=st.integers(0, 2 ** 16))
def test_idx_files_load_exactly_or_are_refused_with_a_value_error_naming_the_folder(count, gz, which, damage, seed):
    rng = np.random.default_rng(seed)
    arrays = {"images": rng.integers(0, 256, (count, 28, 28), dtype=np.uint8),
              "labels": rng.integers(0, 10, count, dtype=np.uint8)}
    kind, at = damage
    files = {name: bytearray(idx_bytes(array)) for name, array in arrays.items()}
    data = files[which]
    if kind == "truncate":
        del data[at % len(data):]
    elif kind == "flip":
        data[at % len(data)] ^= 1 + at % 255
    elif kind == "magic":
        data[at % 4] = (data[at % 4] + 1 + at % 254) % 256
    elif kind == "dims":
        data[4 + at % (4 * data[3])] ^= 0x01
    elif kind == "label":
        files["labels"][8 + at % count] = 10 + at % 246
    with tempfile.TemporaryDirectory() as folder:
        for split in ("train", "t10k"):
            for name, stem in (("images", f"{split}-images-idx3-ubyte"), ("labels", f"{split}-labels-idx1-ubyte")):
                raw = bytes(files[name])
                Path(folder, stem + (".gz" if gz else "")).write_bytes(gzip.compress(raw) if gz else raw)
        try:
            images, labels = fu.load_dataset("mnist", root=folder, train=False, download=False)
        except ValueError as error:
            assert folder in str(error), str(error)
            return
    assert kind in ("none", "flip", "dims") or (kind == "truncate" and at % len(data) >= len(data))
    assert images.shape == (len(labels), 1, 28, 28) and int(labels.max()) < 10
    if kind == "none":
        assert torch.equal(images[:, 0], torch.from_numpy(arrays["images"]))
        assert labels.tolist() == arrays["labels"].tolist()


@BOUNDED
@given(cut=st.integers(0, 10 ** 6), flip=st.integers(0, 10 ** 6), checksum=st.booleans(),
       kind=st.sampled_from(["valid", "truncated", "corrupted"]))
def test_checkpoints_load_what_was_saved_or_raise_a_checkpoint_error(cut, flip, checksum, kind):
    payload = {"round": 3, "generator": {"w": torch.arange(50.0)}, "history": [{"d_loss": 0.5}], "config": "{}"}
    with tempfile.TemporaryDirectory() as folder:
        path = fu.save_checkpoint(Path(folder) / "round_0003.pt", payload)
        original = path.read_bytes()
        data = bytearray(original)
        if kind == "truncated":
            del data[cut % len(data):]
        elif kind == "corrupted":
            data[flip % len(data)] ^= 0xFF
        path.write_bytes(bytes(data))
        if not checksum:
            fu.checksum_path(path).unlink()
        damaged = bytes(data) != original
        try:
            loaded = fu.load_checkpoint(path)
        except fu.CheckpointError:
            assert damaged
            return
    assert not (damaged and checksum), "a damaged file passed its checksum"
    if not damaged:
        assert loaded["round"] == 3 and torch.equal(loaded["generator"]["w"], payload["generator"]["w"])
    # without its checksum file a flipped byte inside a tensor can load, with other values: the checksum is the guard


GENERATOR_CONFIGS = st.fixed_dictionaries({}, optional={
    "image_shape": st.one_of(st.tuples(st.sampled_from([1, 3]), st.sampled_from([28, 32, 30]),
                                       st.sampled_from([28, 32])), st.just("big")),
    "num_classes": st.integers(-2, 50), "z_dim": st.integers(-2, 10 ** 7), "embed_dim": st.integers(-2, 64),
    "ngf": st.one_of(st.integers(-2, 16), st.integers(10 ** 5, 10 ** 8)), "weights": st.just("x")})


@BOUNDED
@given(config=GENERATOR_CONFIGS)
def test_a_crafted_generator_config_builds_a_small_generator_or_is_refused(config):
    with tempfile.TemporaryDirectory() as folder:
        path = fu.save_checkpoint(Path(folder) / "round_0001.pt", {"generator_config": config, "generator": {}})
        try:
            fu.load_generator(path)
        except fu.CheckpointError as error:
            assert "generator_config" in str(error) or "does not load" in str(error)


@BOUNDED
@given(labels=st.one_of(st.lists(st.integers(-3, 12), max_size=30), st.lists(st.floats(allow_nan=True), max_size=5),
                        st.lists(st.lists(st.integers(0, 9), max_size=3), max_size=3), st.text(max_size=3)),
       seed=st.one_of(st.integers(-5, 2 ** 70), st.floats(allow_nan=True), st.none()))
def test_generate_draws_one_image_a_label_or_raises_a_value_error(labels, seed):
    generator = GENERATOR
    try:
        images = fu.generate(generator, labels, seed=seed)
    except ValueError:
        return
    assert images.shape == (len(labels), 1, 28, 28) and bool(torch.isfinite(images).all())
    assert float(images.abs().max()) <= 1


GENERATOR = fu.Generator(z_dim=8, embed_dim=4, ngf=8)


@settings(max_examples=25, deadline=timedelta(seconds=30), database=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.one_of(st.floats(-1, 50), st.just(1e-9), st.just(float("inf"))), sample_rate=st.floats(-0.5, 1.5),
       rounds=st.integers(-1, 200), delta=st.floats(-0.1, 1.1))
def test_the_dp_helpers_give_a_multiplier_that_reaches_the_target_or_a_value_error(target, sample_rate, rounds, delta):
    try:
        z = fu.dp_noise_multiplier(target, sample_rate, rounds, delta)
    except ValueError:
        return
    epsilon = fu.dp_epsilon(z, sample_rate, rounds, delta)
    assert z > 0 and 0 < epsilon <= target
