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
                          eval_every=None,
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


def test_history_is_saved_as_json_and_csv(finished, tmp_path):
    import csv
    import json

    history = [dict(r) for r in finished.history]
    history[-1]["metrics"] = {"fid": 12.5, "cond_acc": 0.9, "per_class_acc": [0.9] * 10}
    json_path, csv_path = fu.save_history(history, tmp_path)
    assert json.loads(json_path.read_text()) == history
    rows = list(csv.DictReader(open(csv_path)))
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert float(rows[1]["fid"]) == 12.5 and rows[0]["fid"] == "" and "per_class_acc" not in rows[0]


def test_metric_curves_show_each_evaluated_round_and_the_reference():
    history = [{"round": 1}, {"round": 2, "metrics": {"fid": 50.0, "cond_acc": 0.5, "is": 5.0}},
               {"round": 4, "metrics": {"fid": 30.0, "cond_acc": 0.7, "is": 7.0}}]
    fig = fu.plot_metrics(history, {"fid": 2.0, "cond_acc": 0.99, "is": 9.8})
    fid_line, reference_line = fig.axes[0].get_lines()
    assert list(fid_line.get_xdata()) == [2, 4] and list(fid_line.get_ydata()) == [50.0, 30.0]
    assert list(reference_line.get_ydata()) == [2.0, 2.0]
    with pytest.raises(ValueError, match="no round in the history was evaluated"):
        fu.plot_metrics(history[:1])


def test_mode_coverage_is_drawn_beside_fid_when_the_records_have_it():
    modes = {"precision": 0.8, "recall": 0.4, "density": 0.9, "coverage": 0.5}
    history = [{"round": 2, "metrics": {"fid": 50.0, "cond_acc": 0.5, "is": 5.0, **modes}},
               {"round": 4, "metrics": {"fid": 30.0, "cond_acc": 0.7, "is": 7.0, **modes, "coverage": 0.7}}]
    fig = fu.plot_metrics(history, {"fid": 2.0, "precision": 0.75, "recall": 0.76, "coverage": 0.95})
    assert len(fig.axes) == 4
    lines = fig.axes[3].get_lines()  # each metric, then its reference
    assert [list(line.get_ydata()) for line in lines[::2]] == [[0.8, 0.8], [0.4, 0.4], [0.5, 0.7]]
    assert [line.get_ydata()[0] for line in lines[1::2]] == [0.75, 0.76, 0.95]
    assert len(fu.plot_metrics([{"round": 1, "metrics": {"fid": 1.0, "cond_acc": 1.0, "is": 1.0}}]).axes) == 3


def test_round_grids_are_saved_as_pngs_and_a_gif(finished, tmp_path):
    from PIL import Image

    paths = fu.save_round_grids(finished.grid_snapshots, tmp_path)
    assert [p.name for p in paths] == ["grid_round_0000.png", "grid_round_0001.png", "grid_round_0002.png"]
    gif = Image.open(fu.save_grid_gif(finished.grid_snapshots, tmp_path / "rounds.gif"))
    assert gif.n_frames == 3 and gif.size == Image.open(paths[0]).size


def test_round_axes_are_ticked_at_whole_rounds():
    history = [{"round": r, "d_loss": 1.0, "g_loss": 1.0, "d_loss_clients": [1.0], "g_loss_clients": [1.0],
                "images_total": 100 * r, "metrics": {"fid": 10.0, "cond_acc": 0.9, "is": 9.0}} for r in range(1, 21)]
    axes = [fu.plot_losses(history).axes[0], *fu.plot_metrics(history).axes,
            fu.plot_metric_curves({"run": history}, x="round").axes[0]]
    for ax in axes:
        ticks = ax.get_xticks()
        assert ax.get_xlabel() == "round" and len(ticks) >= 3
        assert all(float(t).is_integer() for t in ticks), ticks


def test_per_class_accuracy_draws_a_bar_per_label_and_the_real_images_marks(tmp_path):
    generated, real = [0.5 + 0.05 * i for i in range(10)], [0.99] * 10
    fig = fu.plot_per_class_accuracy(generated, real, save_to=tmp_path / "per_class.png")
    ax = fig.axes[0]
    assert [bar.get_height() for bar in ax.patches] == generated
    assert list(ax.get_lines()[0].get_ydata()) == real
    assert [t.get_text() for t in ax.get_xticklabels()] == list("0123456789")
    assert (tmp_path / "per_class.png").stat().st_size > 1000
    with pytest.raises(ValueError, match=r"one value per class \(10\); got 9 and None"):
        fu.plot_per_class_accuracy(generated[:9])


def test_seed_spread_puts_a_dot_a_seed_and_the_mean_on_each_cells_row(tmp_path):
    summary = [{"cell": "a", "fid@0": 10.0, "fid@1": 14.0, "fid_mean": 12.0},
               {"cell": "b", "fid@0": 30.0, "fid@1": 20.0, "fid_mean": 25.0}]
    fig = fu.plot_seed_spread(summary, "fid", save_to=tmp_path / "seeds.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    dots = [collection.get_offsets().tolist() for collection in ax.collections]
    assert dots == [[[10.0, 0.0], [14.0, 0.0]], [[30.0, 1.0], [20.0, 1.0]]]
    assert [list(line.get_xdata()) for line in ax.get_lines()] == [[12.0, 12.0], [25.0, 25.0]]
    assert (tmp_path / "seeds.png").stat().st_size > 1000


def test_class_heatmap_colours_a_row_a_cell_and_writes_each_value(tmp_path):
    rows = [{"cell": "FedAvg", "per_class_coverage": [0.9, 0.0, 0.5]},
            {"cell": "UA-GAN", "per_class_coverage": [0.8, 0.7, float("nan")]}]
    fig = fu.plot_class_heatmap(rows, class_names=("0", "1", "2"), save_to=tmp_path / "coverage.png")
    ax = fig.axes[0]
    assert ax.images[0].get_array().tolist()[0] == [0.9, 0.0, 0.5]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["FedAvg", "UA-GAN"]
    assert [t.get_text() for t in ax.texts] == ["0.90", "0.00", "0.50", "0.80", "0.70", "-"]
    assert (tmp_path / "coverage.png").stat().st_size > 1000
