"""Plots: each draws and saves a PNG; the browser's drawing function is a plain function."""
import matplotlib
import numpy as np
import pytest

import fedgan_utils as fu

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def finished(mnist_small, tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    config = fu.FedConfig(num_clients=3, rounds=2, local_steps=2, batch_size=8, ngf=8, ndf=8, z_dim=8, device="cpu",
                          out_dir=str(root / "o"), checkpoint_dir=str(root / "c"))
    return fu.run_federation(config, data=mnist_small, progress=False)


def test_loss_curves_plot_one_point_per_round(finished, tmp_path):
    fig = fu.plot_losses(finished.history, save_to=tmp_path / "loss.png")
    lines = fig.axes[0].get_lines()
    assert [list(line.get_xdata()) for line in lines] == [[1, 2], [1, 2]]
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_label_grid_names_a_row_per_class(finished, tmp_path):
    fig = fu.plot_label_grid(finished.sample_grid(), save_to=tmp_path / "grid.png")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list("0123456789")
    assert (tmp_path / "grid.png").is_file()


def test_grid_evolution_shows_the_requested_rounds(finished):
    fig = fu.plot_grid_evolution(finished.grid_snapshots, rounds=[0, 2])
    assert [ax.get_title() for ax in fig.axes] == ["round 0", "round 2"]
    with pytest.raises(ValueError, match=r"rounds \[7\] have no snapshot; available: \[0, 1, 2\]"):
        fu.plot_grid_evolution(finished.grid_snapshots, rounds=[7])


def test_partition_heatmap_shows_the_counts(mnist_small, tmp_path):
    _, labels = mnist_small
    parts = fu.partition(labels, 4, "shards")
    fig = fu.plot_partition(labels, parts, save_to=tmp_path / "part.png")
    counts = fu.partition_report(labels, parts)
    shown = np.array(fig.axes[0].get_images()[0].get_array())
    assert np.array_equal(shown, counts)
    assert (tmp_path / "part.png").is_file()


def test_checkpoint_browser_draws_samples_of_a_label_at_a_round(finished):
    fig = fu.draw_checkpoint_samples(finished.run_dir, 2, label=7, n=5)
    assert fig.axes[0].get_title() == "round 2: 5 samples of label 7"
    with pytest.raises(ValueError, match=r"round 9 has no checkpoint .*saved rounds: \[1, 2\]"):
        fu.draw_checkpoint_samples(finished.run_dir, 9, label=7)
    widget = fu.browse_checkpoints(finished.run_dir)
    assert widget is not None


def test_plot_losses_refuses_an_empty_history():
    with pytest.raises(ValueError, match="history is empty"):
        fu.plot_losses([])
