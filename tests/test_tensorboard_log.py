"""TensorBoard: each round's scalars equal the history's, the fixed-noise grid is an image a round, folders per run."""
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fedgan_utils as fu
from fedgan.tensorboard_log import board_folder


def events(folder):
    accumulator = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_each_round_is_written_as_the_history_has_it(mnist_small, tiny_config):
    config = tiny_config(rounds=2, tensorboard=True, eval_every=0, eval_samples=100, classifier_epochs=1,
                         classifier_subset=1000, dp_clip=1.0, dp_noise_multiplier=0.5)
    federation = fu.Federation(config, data=mnist_small, log=False)
    federation.run(rounds=1, progress=False)
    folder = board_folder(config, federation.run_dir.name)
    assert folder.parent.name == "tensorboard" and folder.name == config.run_name
    written = events(folder)  # readable while the run goes on
    assert [e.step for e in written.Scalars("loss/discriminator")] == [1]
    federation.run(progress=False)
    written = events(folder)
    history = federation.history
    for tag, key in [("loss/discriminator", "d_loss"), ("loss/generator", "g_loss"), ("comm/bytes_up", "bytes_up"),
                     ("privacy/epsilon", "epsilon")]:
        assert [(e.step, e.value) for e in written.Scalars(tag)] == [
            (r["round"], pytest.approx(r[key], rel=1e-6)) for r in history], tag
    assert [(e.step, e.value) for e in written.Scalars("metrics/fid")] == [
        (2, pytest.approx(history[-1]["metrics"]["fid"], rel=1e-6))]  # scored after the last round only
    images = written.Images("samples/fixed_noise")
    assert [image.step for image in images] == [1, 2]
    assert (images[-1].width, images[-1].height) == (10 * 30 + 2, 10 * 30 + 2)  # 10 x 10 digits, 2-pixel padding
    assert images[0].encoded_image_string != images[1].encoded_image_string  # the generator moved


def test_a_folder_given_holds_one_folder_a_run_and_an_empty_one_is_refused(tmp_path, mnist_small, tiny_config):
    board = tmp_path / "board"
    base = tiny_config(rounds=1, tensorboard=str(board), eval_samples=50, classifier_epochs=1, classifier_subset=500)
    _, runs = fu.run_ablation(base, {"a": {}, "b": {"lr_g": 1e-3}}, data=mnist_small, log=False)
    assert sorted(p.name for p in board.iterdir()) == sorted(run.run_dir.name for run in runs.values())
    assert all(events(board / run.run_dir.name).Scalars("loss/generator") for run in runs.values())
    with pytest.raises(ValueError, match=r"tensorboard=' ' is not allowed: False, True \(out_dir/tensorboard\) or a"):
        tiny_config(tensorboard=" ")
