"""Grids of federations (fedgan/experiments.py): ablations, seeds, the centralized baseline."""
import dataclasses
import math

import numpy as np
import pytest

import fedgan_utils as fu
from helpers import BestHalf


def test_run_ablation_gives_a_row_a_cell_and_keeps_going_past_a_diverged_cell(mnist_small, tiny_config):
    base = tiny_config(rounds=3, eval_samples=50, classifier_epochs=1, classifier_subset=500, run_name="grid")
    cells = {"plain": {}, "custom rule": {"strategy": BestHalf(), "partition": "dirichlet", "alpha": 0.5},
             "collapsing": {"collapse_loss": 100.0, "watchdog_rounds": 2}}
    rows, runs = fu.run_ablation(base, cells, data=mnist_small, log=False)
    assert [r["cell"] for r in rows] == list(cells) and list(runs) == list(cells)
    assert rows[1]["strategy"] == "BestHalf" and rows[1]["partition"] == "dirichlet(0.5)"
    assert rows[0]["images"] == 3 * 3 * 3 * 8 and rows[0]["MB"] > 0 and np.isfinite(rows[0]["fid"])
    assert "stopped" not in rows[0] and rows[2]["stopped"].startswith("round 2: the discriminator loss")
    assert runs["plain"].evaluator is runs["custom rule"].evaluator  # one metric classifier for the grid
    assert runs["plain"].run_dir.name == "grid-plain" and runs["custom rule"].run_dir.name == "grid-custom-rule"


def test_run_seeds_reuses_the_grids_rows_reruns_the_rest_on_its_classifier_and_summarises(mnist_small, tiny_config):
    base = tiny_config(rounds=2, eval_samples=50, classifier_epochs=1, classifier_subset=500, run_name="seeds")
    cells = {"plain": {}, "skewed": {"partition": "dirichlet", "alpha": 0.5}}
    grid_rows, grid_runs = fu.run_ablation(base, cells, data=mnist_small, log=False)
    evaluator = grid_runs["plain"].evaluator
    rows, summary = fu.run_seeds(base, cells, (0, 1), data=mnist_small, evaluator=evaluator,
                                 known={"plain": grid_rows[0]}, log=False)
    assert [(r["cell"], r["seed"]) for r in rows] == [("plain | seed 0", 0), ("plain | seed 1", 1),
                                                      ("skewed | seed 0", 0), ("skewed | seed 1", 1)]
    assert rows[0]["fid"] == grid_rows[0]["fid"]  # reused
    assert rows[2]["fid"] == grid_rows[1]["fid"] and rows[2]["cond_acc"] == grid_rows[1]["cond_acc"]  # rerun, same
    assert rows[1]["fid"] != rows[0]["fid"]  # another seed, another run
    assert [s["cell"] for s in summary] == list(cells) and summary[0]["seeds"] == 2
    for line, pair in zip(summary, (rows[:2], rows[2:])):
        fids = np.array([r["fid"] for r in pair])
        assert line["fid@0"] == fids[0] and line["fid@1"] == fids[1]
        assert math.isclose(line["fid_mean"], fids.mean())
        assert math.isclose(line["fid_sd"], abs(fids[1] - fids[0]) / 2 ** 0.5)  # sample sd of two values
        assert math.isclose(line["cond_acc_mean"], (pair[0]["cond_acc"] + pair[1]["cond_acc"]) / 2)
    assert all(0 <= r["coverage"] <= 1 and len(r["per_class_coverage"]) == 10 for r in rows)  # mode coverage too
    _, covered = fu.run_seeds(base, cells, (0, 1), data=mnist_small, evaluator=evaluator, log=False,
                              known={row["cell"]: row for row in grid_rows}, metrics=("coverage",))
    assert covered[0]["coverage@0"] == grid_rows[0]["coverage"] and "fid_mean" not in covered[0]
    assert math.isclose(covered[1]["coverage_mean"], (rows[2]["coverage"] + rows[3]["coverage"]) / 2)
    with pytest.raises(ValueError, match="seeds"):
        fu.run_seeds(base, cells, (0,), data=mnist_small, evaluator=evaluator)
    with pytest.raises(ValueError, match="evaluator"):
        fu.run_seeds(base, cells, (0, 1), data=mnist_small, known={"plain": grid_rows[0]})


def test_centralized_baseline_scores_equal_images_and_equal_time(mnist_small, tiny_config):
    federation = fu.run_federation(tiny_config(eval_every=None, eval_samples=100, classifier_epochs=1,
                                               classifier_subset=1000), data=mnist_small, progress=False)
    rows = fu.centralized_baseline(federation, chunks_per_epoch=50, log=False)
    assert [r["model"] for r in rows][0] == "federated (K=3)"
    assert {r["model"] for r in rows[1:]} == {"centralized, equal images", "centralized, equal wall time"}
    fed_images, fed_seconds = rows[0]["images"], rows[0]["seconds"]
    by_name = {r["model"]: r for r in rows}
    assert by_name["centralized, equal images"]["images"] >= fed_images
    assert by_name["centralized, equal images"]["images"] - fed_images < 3 * 8  # within one chunk of 3 steps
    assert by_name["centralized, equal wall time"]["seconds"] >= fed_seconds
    assert all({"fid", "kid", "is", "cond_acc"} <= r.keys() for r in rows)
    table = fu.format_table(rows)
    assert table.splitlines()[0].split() == ["model", "images", "seconds", "fid", "kid", "is", "cond_acc"]
    assert len(table.splitlines()) == 2 + len(rows)


def test_centralized_run_is_plain_training_of_the_same_model(mnist_small, tiny_config):
    federated = tiny_config(strategy="fedavgm", server_momentum=0.5, prox_mu=0.1, compression="int8",
                            partition="dirichlet", alpha=0.1, attack="sign_flip", attack_fraction=0.34,
                            client_fraction=0.5, lr_g=1e-3, ngf=16, seed=7)
    central = fu.centralized_config(federated, steps=4)
    defaults = fu.FedConfig()
    assert (central.num_clients, central.local_steps, central.optimizer_state) == (1, 4, "keep")
    assert all(getattr(central, name) == getattr(federated, name) for name in fu.CENTRALIZED_FIELDS)
    for name in ("strategy", "prox_mu", "compression", "partition", "attack", "attack_fraction", "client_fraction"):
        assert getattr(central, name) == getattr(defaults, name), name
    # the same model and loss: the stronger baselines' options are the model's, not the federation's
    stronger = fu.centralized_config(tiny_config(d_norm="spectral", d_conditioning="projection", gan_loss="hinge"), 4)
    assert (stronger.d_norm, stronger.d_conditioning, stronger.gan_loss) == ("spectral", "projection", "hinge")
    assert fu.centralized_config(tiny_config(label_smoothing=0.1), 4).label_smoothing == 0.1
    # Adam runs on across the chunks: after 3 rounds of 4 steps the client's optimizer has taken 12 steps
    run = fu.Federation(dataclasses.replace(central, rounds=3), data=mnist_small, log=False).run(progress=False)
    assert float(run.client_store[0]["g_opt"]["step"]) == 12 and float(run.client_store[0]["d_opt"]["step"]) == 12
