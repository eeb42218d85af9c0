"""Checkpoints: names with the round, config as JSON, weights_only loading, no overwrite, clear errors, how many are
kept, and a write that fails for want of space."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fedgan_utils as fu
from fedgan.checkpoints import pack_grid
from helpers import states_equal


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


def test_keep_checkpoints_keeps_the_newest_and_a_resumed_run_goes_on_from_them(mnist_small, tiny_config):
    config = tiny_config(rounds=4, keep_checkpoints=2)
    federation = fu.Federation(config, data=mnist_small, log=False).run(rounds=3, progress=False)
    assert [p.name for p in fu.list_checkpoints(federation.run_dir)] == ["round_0002.pt", "round_0003.pt"]
    assert not list(federation.run_dir.glob("round_0001*"))  # its SHA-256 file went with it
    resumed = fu.Federation(config, data=mnist_small, resume=True, log=False)
    assert resumed.round == 3
    resumed.run(progress=False)
    assert [p.name for p in fu.list_checkpoints(resumed.run_dir)] == ["round_0003.pt", "round_0004.pt"]


def test_grid_cells_keep_only_their_newest_checkpoint_unless_told(mnist_small, tiny_config):
    base = tiny_config(rounds=3, eval_every=None, eval_samples=50, classifier_epochs=1, classifier_subset=500)
    _, runs = fu.run_ablation(base, {"a": {}, "b": {"keep_checkpoints": 2}}, data=mnist_small, log=False)
    assert [p.name for p in fu.list_checkpoints(runs["a"].run_dir)] == ["round_0003.pt"]
    assert [p.name for p in fu.list_checkpoints(runs["b"].run_dir)] == ["round_0002.pt", "round_0003.pt"]
    single = fu.run_federation(base, data=mnist_small, progress=False)  # a federation on its own keeps all
    assert len(fu.list_checkpoints(single.run_dir)) == 3


@pytest.mark.parametrize("value", [0, -1, 1.5, "2"])
def test_keep_checkpoints_refuses_what_is_not_none_or_a_count(tiny_config, value):
    with pytest.raises(ValueError, match=rf"keep_checkpoints={value!r} is not allowed: None or an integer >= 1"):
        tiny_config(keep_checkpoints=value)


LIMITED_RUNNER = """
import resource, sys
import fedgan_utils as fu
images, labels = fu.load_dataset("mnist")
config = fu.FedConfig.from_json(sys.argv[1])
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # no file may grow past this: as a disk that is full
fu.run_federation(config, data=(images[:1200], labels[:1200]), resume=True, progress=False)
"""


def test_a_checkpoint_that_cannot_be_written_is_a_clear_error_and_the_run_resumes_from_the_one_before(
        mnist_small, tiny_config, tmp_path):
    config = tiny_config(rounds=4, checkpoint_dir=str(tmp_path / "limited"))
    first = fu.Federation(config, data=mnist_small, log=False).run(rounds=2, progress=False)
    before = first.run_dir / "round_0002.pt"
    # a checkpoint holds the sample grid of every round so far: round 3's is larger than round 2's, so a file-size
    # limit just over round 2's lets the resumed run restore and train, then fails writing round 3's checkpoint
    env = {**os.environ, "PYTHONPATH": str(Path(fu.__file__).parent), "PYTHONDONTWRITEBYTECODE": "1"}
    process = subprocess.run([sys.executable, "-c", LIMITED_RUNNER, config.to_json(),
                              str(before.stat().st_size + 4096)], env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode != 0
    error = process.stderr.strip().splitlines()[-1]
    assert error.startswith("fedgan.checkpoints.CheckpointWriteError: round_0003.pt (")
    assert f"could not be written into {first.run_dir}: File too large" in error
    assert "the newest checkpoint there, round_0002.pt, is untouched" in error and "resume" in error
    assert sorted(p.name for p in first.run_dir.iterdir()) == [
        "claim.json", "round_0001.pt", "round_0001.pt.sha256", "round_0002.pt", "round_0002.pt.sha256"]
    assert fu.load_checkpoint(before)["round"] == 2  # its checksum still matches
    resumed = fu.run_federation(config, data=mnist_small, resume=True, progress=False)
    straight = fu.run_federation(tiny_config(rounds=4, checkpoint_dir=str(tmp_path / "straight")), data=mnist_small,
                                 progress=False)
    assert [r["g_loss"] for r in resumed.history] == [r["g_loss"] for r in straight.history]
    assert states_equal(resumed.generator.state_dict(), straight.generator.state_dict())


def test_sample_grids_are_kept_as_uint8_in_checkpoints_and_come_back_to_a_256th(mnist_small, tiny_config):
    federation = fu.run_federation(tiny_config(rounds=2), data=mnist_small, progress=False)
    saved = fu.load_checkpoint(fu.latest_checkpoint(federation.run_dir))["grid_snapshots"]
    assert sorted(saved) == ["0", "1", "2"] and all(grid.dtype == torch.uint8 for grid in saved.values())
    resumed = fu.Federation(federation.config, data=mnist_small, resume=True, log=False)
    for index, grid in federation.grid_snapshots.items():
        back = resumed.grid_snapshots[index]
        assert back.dtype == torch.float32 and (back - grid).abs().max() <= 1 / 255 + 1e-6
    # pack_grid is what a saved picture keeps: the levels of (x + 1) * 127.5, rounded
    grid = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.2])
    assert pack_grid(grid).tolist() == [0, 64, 128, 255, 255]


def test_checkpoints_are_ordered_by_their_round_number_past_round_9999(tmp_path):
    """Round numbers are written with at least four digits: round_10000.pt is newer than round_9999.pt, which a
    sort of the names would put last (and resume from, and prune the newest)."""
    for round_index in (9998, 10000, 9999, 10001):
        (tmp_path / f"round_{round_index:04d}.pt").write_bytes(b"")
    (tmp_path / "round_0002.pt.bad").write_bytes(b"")  # set aside: not a checkpoint
    assert [p.name for p in fu.list_checkpoints(tmp_path)] == [
        "round_9998.pt", "round_9999.pt", "round_10000.pt", "round_10001.pt"]
    assert fu.latest_checkpoint(tmp_path).name == "round_10001.pt"
