"""Checkpoints: names with the round, config as JSON, weights_only loading, no overwrite, clear errors."""
import numpy as np
import pytest
import torch

import fedgan_utils as fu


@pytest.fixture
def finished(mnist_small, tiny_config):
    return fu.run_federation(tiny_config(rounds=2), data=mnist_small, progress=False)


def test_each_round_is_saved_with_its_index_and_the_config(finished):
    paths = fu.list_checkpoints(finished.run_dir)
    assert [p.name for p in paths] == ["round_0001.pt", "round_0002.pt"]
    checkpoint = torch.load(paths[-1], weights_only=True)
    assert checkpoint["round"] == 2
    assert fu.FedConfig.from_json(checkpoint["config"]) == finished.config
    assert checkpoint["history"] == finished.history


def test_load_generator_rebuilds_the_same_generator(finished):
    generator = fu.load_generator(fu.latest_checkpoint(finished.run_dir))
    assert not generator.training
    torch.testing.assert_close(fu.generate(generator, list(range(10)), seed=3),  # loaded on the CPU
                               fu.generate(finished.generator, list(range(10)), seed=3).cpu(), atol=1e-5, rtol=1e-4)


def test_checkpoint_every_sets_which_rounds_are_saved(mnist_small, tiny_config):
    federation = fu.run_federation(tiny_config(rounds=3, checkpoint_every=2), data=mnist_small, progress=False)
    assert [p.name for p in fu.list_checkpoints(federation.run_dir)] == ["round_0002.pt", "round_0003.pt"]


def test_save_checkpoint_never_replaces_a_file(tmp_path):
    path = fu.save_checkpoint(tmp_path / "x.pt", {"a": torch.ones(1)})
    with pytest.raises(FileExistsError, match="never overwritten"):
        fu.save_checkpoint(path, {"a": torch.zeros(1)})
    assert torch.load(path, weights_only=True)["a"].item() == 1.0
    assert not list(tmp_path.glob("*.partial"))


def test_a_corrupted_checkpoint_gives_an_error_naming_the_file(finished):
    path = fu.latest_checkpoint(finished.run_dir)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(fu.CheckpointError, match=f"{path} is corrupted or truncated"):
        fu.load_generator(path)
    fu.checksum_path(path).unlink()  # without its checksum file, loading itself fails, with the same kind of error
    with pytest.raises(ValueError, match=f"{path} is not a readable checkpoint"):
        fu.load_generator(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        fu.load_checkpoint(path.with_name("round_0099.pt"))


def test_a_numpy_value_in_a_checkpoint_is_saved_as_the_python_number_it_is(tmp_path):
    path = fu.save_checkpoint(tmp_path / "x.pt", {"log": {"kept": np.int64(3), "norm": np.float32(0.5)},
                                                  "state": {"m": np.zeros(2)}})
    loaded = fu.load_checkpoint(path)  # weights_only=True: numpy objects would not load
    assert loaded["log"] == {"kept": 3, "norm": 0.5} and type(loaded["log"]["kept"]) is int
    assert torch.equal(loaded["state"]["m"], torch.zeros(2, dtype=torch.float64))


def test_a_payload_that_would_not_load_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(fu.CheckpointError, match=r"x.pt would not load with weights_only=True"):
        fu.save_checkpoint(tmp_path / "x.pt", {"strategy": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("config", [
    {"image_shape": (1, 28, 28), "num_classes": 10, "z_dim": 100, "embed_dim": 10, "ngf": 2 ** 20},  # terabytes
    {"image_shape": (1, 28, 28), "num_classes": 10, "z_dim": 100, "embed_dim": 10, "ngf": -4},
    {"image_shape": (1, 28, 28), "weights": "elsewhere"},
    "not a dict",
])
def test_load_generator_refuses_a_crafted_generator_config_without_building_it(tmp_path, config):
    path = fu.save_checkpoint(tmp_path / "round_0001.pt", {"generator_config": config, "generator": {}})
    with pytest.raises(fu.CheckpointError, match=r"round_0001.pt: its generator_config"):
        fu.load_generator(path)
