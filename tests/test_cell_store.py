"""A grid's finished cells on disk (fedgan/cell_store.py): a grid run again trains only what it had not finished."""
import dataclasses
import json

import pytest
import torch

import fedgan_utils as fu
from fedgan.checkpoints import pack_grid, unpack_grid
from helpers import BestHalf


def same(a, b) -> bool:
    """Equal, NaN (a class the samples missed) included."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.fixture
def grid(mnist_small, tiny_config, tmp_path):
    base = tiny_config(rounds=2, eval_every=1, eval_samples=50, classifier_epochs=1, classifier_subset=500,
                       train_subset=900, run_name="grid")
    evaluator = fu.make_evaluator(base, mnist_small[0], base.device, log=False)
    cells = {"plain": {}, "custom rule": {"strategy": BestHalf(), "partition": "dirichlet", "alpha": 0.5}}
    return base, cells, evaluator, tmp_path / "cells"


def test_a_grid_run_again_reads_its_finished_cells_back_as_they_were(grid, mnist_small, capsys):
    base, cells, evaluator, folder = grid
    rows, runs = fu.run_ablation(base, cells, data=mnist_small, evaluator=evaluator, store=folder)
    assert len(list(folder.glob("*.pt"))) == 2 and capsys.readouterr().out.count("read from") == 0
    again, stored = fu.run_ablation(base, cells, data=mnist_small, evaluator=evaluator, store=fu.CellStore(folder))
    assert capsys.readouterr().out.count(f"read from {folder}") == 2
    assert all(isinstance(run, fu.FinishedRun) for run in stored.values())
    for name, row in zip(cells, again):
        trained = runs[name]
        assert same(row, rows[list(cells).index(name)])
        assert same(stored[name].history, trained.history) and stored[name].strategy_name == trained.strategy_name
        assert same(stored[name].evaluate(), trained.evaluate())  # the final metrics, as scored then
        assert stored[name].config == trained.config
        assert torch.equal(stored[name].sample_grid(), unpack_grid(pack_grid(trained.sample_grid())))
        assert (stored[name].sample_grid() - trained.sample_grid()).abs().max() <= 1 / 127.5  # 8 bits
    with pytest.raises(AttributeError, match="keeps no weights"):
        stored["plain"].generator


def test_a_cell_of_another_config_rule_data_or_classifier_is_trained_not_read(grid, mnist_small, tiny_config):
    base, cells, evaluator, folder = grid
    fu.run_ablation(base, {"plain": {}}, data=mnist_small, evaluator=evaluator, store=folder)
    store = fu.CellStore(folder)
    key = store.key(base, None, mnist_small, evaluator)
    names_moved = dataclasses.replace(base, run_name="elsewhere", out_dir="/tmp/x", checkpoint_every=5)
    assert store.key(names_moved, None, mnist_small, evaluator) == key  # names and folders do not count
    other_data = (mnist_small[0].flip(0), mnist_small[1].flip(0))
    other_classifier = fu.make_evaluator(dataclasses.replace(base, seed=1), mnist_small[0], base.device, log=False)
    assert len({key, store.key(dataclasses.replace(base, lr_g=1e-3), None, mnist_small, evaluator),
                store.key(base, BestHalf(), mnist_small, evaluator), store.key(base, None, other_data, evaluator),
                store.key(base, None, mnist_small, other_classifier)}) == 5
    rows, runs = fu.run_ablation(dataclasses.replace(base, lr_g=1e-3), {"plain": {}}, data=mnist_small,
                                 evaluator=evaluator, store=folder, log=False)
    assert isinstance(runs["plain"], fu.Federation) and len(list(folder.glob("*.pt"))) == 2


def test_a_stored_cell_serves_seeds_and_the_centralized_baseline(grid, mnist_small):
    base, cells, evaluator, folder = grid
    rows, runs = fu.run_seeds(base, {"plain": {}}, (0, 1), data=mnist_small, evaluator=evaluator, store=folder,
                              log=False)
    again, _ = fu.run_seeds(base, {"plain": {}}, (0, 1), data=mnist_small, evaluator=evaluator, store=folder,
                            log=False)
    assert same(again, rows)
    renamed, stored = fu.run_ablation(base, {"the same config": {"seed": 0}}, data=mnist_small, evaluator=evaluator,
                                      store=folder, log=False)
    assert isinstance(stored["the same config"], fu.FinishedRun)  # seed 0's cell, found under another name
    assert renamed[0]["cell"] == "the same config" and renamed[0]["seed"] == 0 and renamed[0]["fid"] == rows[0]["fid"]
    assert len(list(folder.glob("*.pt"))) == 2
    baseline = fu.centralized_baseline(stored["the same config"], chunks_per_epoch=50, log=False)
    assert baseline[0]["fid"] == rows[0]["fid"] and baseline[0]["images"] == rows[0]["images"]
    assert {r["model"] for r in baseline[1:]} == {"centralized, equal images", "centralized, equal wall time"}
    _, trained = fu.run_ablation(base, {"plain": {}}, data=mnist_small, evaluator=evaluator, log=False)
    live = fu.centralized_baseline(trained["plain"], chunks_per_epoch=50, log=False)
    equal_images = [{k: v for k, v in next(r for r in rows if r["model"] == "centralized, equal images").items()
                     if k != "seconds"} for rows in (baseline, live)]
    assert same(*equal_images)  # the same centralized run: on the images the federation had


def test_a_store_needs_the_grids_classifier(grid, mnist_small):
    base, cells, _, folder = grid
    with pytest.raises(ValueError, match="evaluator"):
        fu.run_ablation(base, cells, data=mnist_small, store=folder)


def test_the_centralized_baseline_is_kept_and_read_back_for_the_same_federation(grid, mnist_small, capsys):
    base, cells, evaluator, folder = grid
    _, runs = fu.run_ablation(base, {"plain": {}}, data=mnist_small, evaluator=evaluator, store=folder, log=False)
    trained = fu.centralized_baseline(runs["plain"], chunks_per_epoch=50, store=folder)
    assert capsys.readouterr().out.count("read from") == 0 and len(list(folder.glob("*.pt"))) == 2
    _, stored = fu.run_ablation(base, {"plain": {}}, data=mnist_small, evaluator=evaluator, store=folder, log=False)
    again = fu.centralized_baseline(stored["plain"], chunks_per_epoch=50, store=fu.CellStore(folder))
    assert capsys.readouterr().out.count(f"centralized baseline: read from {folder}") == 1
    assert same(again, trained)  # the wall-time row too, as measured when it was trained
    other_chunks = fu.centralized_baseline(stored["plain"], chunks_per_epoch=25, store=folder, log=False)
    assert len(list(folder.glob("*.pt"))) == 3  # another centralized run: trained, kept beside the first
    assert other_chunks[1]["images"] != trained[1]["images"] or other_chunks[1]["fid"] != trained[1]["fid"]
    lines = fu.CellStore(folder).cells()  # what the store holds, oldest first
    baseline = [f"{row['model']} | baseline of grid-plain" for row in [*trained[1:], *other_chunks[1:]]]
    assert [line["cell"] for line in lines] == ["plain", *baseline]  # each baseline's rows as they were reached
    assert lines[0]["fid"] == trained[0]["fid"] and [line["fid"] for line in lines[1:3]] == [
        row["fid"] for row in trained[1:]]
    assert {line["seed"] for line in lines} == {base.seed}
