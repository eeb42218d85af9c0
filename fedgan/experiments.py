"""Grids of federations: ablations, seeds, and the centralized baseline, each a table row."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fedgan.cell_store import CellStore, FinishedRun, cell_slug
from fedgan.checks import non_negative_int, require
from fedgan.config import PARTITION_PARAMS, FedConfig, clients_per_round
from fedgan.data import load_dataset
from fedgan.federation import Federation
from fedgan.metrics import Evaluator
from fedgan.strategies import Strategy
from fedgan.watchdog import DivergenceError

Tensor = torch.Tensor


# what a centralized run shares with the federation it is compared with: data, model and its loss, optimisation,
# compute, scoring (instance noise is not: its schedule runs over the federation's rounds)
CENTRALIZED_FIELDS = ("dataset", "data_root", "batch_size", "lr_g", "lr_d", "betas", "z_dim", "embed_dim", "ngf",
                      "ndf", "d_norm", "d_conditioning", "gan_loss", "label_smoothing", "seed", "device", "engine",
                      "eval_samples", "classifier_epochs", "classifier_subset", "out_dir", "checkpoint_dir")


def centralized_config(config: FedConfig, steps: int) -> FedConfig:
    """The centralized counterpart of a federated config: one client, rounds of `steps` steps, nothing federated.

    Only CENTRALIZED_FIELDS are taken over; every federated knob (server rule, FedProx, compression, attacks,
    DP, stragglers, asynchrony) is at its default, so one client's "aggregation" is its own model. The client
    keeps its Adam state from round to round, so the rounds are one continuous training run.
    """
    return FedConfig(**{name: getattr(config, name) for name in CENTRALIZED_FIELDS}, num_clients=1,
                     local_steps=steps, optimizer_state="keep", eval_every=None, rounds=10 ** 6, checkpoint_every=0,
                     run_name=f"{config.run_name}-central")


def centralized_baseline(federation: Federation | FinishedRun, *, chunks_per_epoch: int = 10,
                         store: CellStore | str | Path | None = None, log: bool = True) -> list[dict[str, Any]]:
    """The federated model against one client holding all its data, trained by the same code.

    The centralized run (centralized_config: plain training, Adam never reset) is scored after chunks of
    1/`chunks_per_epoch` epoch: when it has seen as many images as the federation, and when it has trained as long
    (wall time, evaluation excluded). Returns table rows: federated, centralized at equal images, at equal wall time.
    With a `store` (run_ablation's), the centralized rows are kept there and read back for the same federation
    (its config, data, classifier, images and seconds), as a grid's cells are.
    """
    if not federation.history:
        raise ValueError("run the federation first: its history is empty")
    config = federation.config
    fed_images = federation.history[-1]["images_total"]
    fed_seconds = sum(r["seconds"] for r in federation.history)
    steps = max(1, math.ceil(len(federation.labels) / config.batch_size / chunks_per_epoch))
    central_config = centralized_config(config, steps)
    data = (federation.images, federation.labels)
    # evaluate() builds the classifier and the real reference that both runs are scored with, if there are none yet
    rows = [{"model": f"federated (K={config.num_clients})", "images": fed_images, "seconds": fed_seconds,
             **federation.evaluate()}]
    store = CellStore(store) if isinstance(store, (str, Path)) else store
    if store is not None:
        key = store.key(central_config, None, data, federation.evaluator,
                        extra=f"images {fed_images}, seconds {fed_seconds!r}")
        kept = store.load_rows(key)
        if kept is not None:
            if log:
                print(f"centralized baseline: read from {store.folder}")
            return rows + kept
    central = Federation(central_config, data=data, log=False)
    pending = {"equal images": lambda: central.history[-1]["images_total"] >= fed_images,
               "equal wall time": lambda: sum(r["seconds"] for r in central.history) >= fed_seconds}
    while pending:
        central.run_round()
        for name, reached in list(pending.items()):
            if reached():
                rows.append({"model": f"centralized, {name}", "images": central.history[-1]["images_total"],
                             "seconds": sum(r["seconds"] for r in central.history),
                             **federation.evaluator(central.generator)})
                del pending[name]
                if log:
                    print(f"centralized baseline: {name} reached after {central.round} rounds of {steps} steps")
    if store is not None:
        store.save_rows(f"baseline of {config.run_name}", key, rows[1:], central_config)
    return rows


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = (
        "model", "images", "seconds", "fid", "kid", "is", "cond_acc")) -> str:
    """Rows of metrics as a fixed-width text table."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}" if abs(value) < 100 else f"{value:,.1f}"
        return f"{value:,}" if isinstance(value, int) else str(value)
    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(lines)


def describe_partition(config: FedConfig) -> str:
    """The partition of a config in a few characters: "iid", "dirichlet(0.1)", "shards(2)"."""
    params = [str(getattr(config, n)) for n in PARTITION_PARAMS[config.partition] if n != "min_size"]
    return f"{config.partition}({', '.join(params)})" if params else config.partition


MODE_COVERAGE = ("precision", "recall", "density", "coverage", "per_class_coverage")  # in a row when evaluated


def run_ablation(base: FedConfig, cells: Mapping[str, Mapping[str, Any]], *,
                 data: tuple[Tensor, Tensor] | None = None, evaluator: Evaluator | None = None,
                 store: CellStore | str | Path | None = None, log: bool = True
                 ) -> tuple[list[dict[str, Any]], dict[str, Federation | FinishedRun]]:
    """One federation per cell, each `base` with the cell's overrides, on the same data, seed and metric classifier.

    A cell's "strategy" may be a Strategy object instead of a name. A cell keeps only its newest checkpoint (what
    resume needs) unless the cell or `base` sets keep_checkpoints. The metric classifier is `evaluator`'s when
    given (to score on the scale of an earlier grid), else the first cell's. With a `store` (a CellStore or its
    folder; `evaluator` then required), a cell it holds is read back instead of trained, as a FinishedRun, and a
    cell trained is kept in it. Returns a table row a cell (the cell's overrides; final metrics; images seen;
    training seconds, evaluation excluded; simulated time; megabytes sent; epsilon of a DP run; MODE_COVERAGE's
    metrics) and the federations, for curves and sample grids.
    """
    data = data if data is not None else load_dataset(base.dataset, base.data_root)
    require(store is None or evaluator is not None, "evaluator", evaluator,
            "the grid's Evaluator with a store (a stored cell is reused only when scored by the same classifier)")
    store = CellStore(store) if isinstance(store, (str, Path)) else store
    rows: list[dict[str, Any]] = []
    runs: dict[str, Federation | FinishedRun] = {}
    for name, overrides in cells.items():
        overrides = dict(overrides)
        rule = overrides.pop("strategy") if isinstance(overrides.get("strategy"), Strategy) else None
        keep = {} if "keep_checkpoints" in overrides or base.keep_checkpoints is not None else {"keep_checkpoints": 1}
        config = dataclasses.replace(base, **overrides, **keep, run_name=f"{base.run_name}-{cell_slug(name)}")
        key = store.key(config, rule, data, evaluator) if store is not None else ""
        found = store.load(key, config=config, evaluator=evaluator, data=data) if store is not None else None
        if found is not None:  # a cell of the same config under any name: its results under this one
            result, runs[name] = found
            row = {**overrides, **result, "cell": name}
            rows.append(row)
            if log:
                print(f"{name:34s} FID {row['fid']:7.1f} | cond_acc {row['cond_acc']:.3f} | {row['seconds']:5.0f} s | "
                      f"{row['MB']:8,.0f} MB | read from {store.folder}", flush=True)
            continue
        federation = Federation(config, data=data, log=False, strategy=rule)
        federation.evaluator = evaluator  # one metric classifier and real reference for every cell
        stopped = ""
        try:
            federation.run(progress=False)
        except DivergenceError as error:  # a diverged cell is a result of the grid, not the end of it
            stopped = str(error)
            if log:
                print(f"{name}: stopped: {error}")
        last = federation.history[-1] if federation.history else {"images_total": 0, "bytes_total": 0}
        metrics = (None if stopped else last.get("metrics")) or federation.evaluate()
        evaluator = federation.evaluator
        selected = clients_per_round(config.num_clients, config.client_fraction)
        result = {**({"stopped": stopped} if stopped else {}), "cell": name, "strategy": federation.strategy_name,
                  "partition": describe_partition(config), "clients": f"{selected}/{config.num_clients}",
                  "images": last["images_total"], "seconds": sum(r["seconds"] for r in federation.history),
                  "sim_time": federation.clock, "MB": last["bytes_total"] / 1e6,
                  **({"epsilon": last["epsilon"]} if "epsilon" in last else {}),
                  **{k: metrics[k] for k in ("fid", "kid", "is", "cond_acc", *MODE_COVERAGE) if k in metrics}}
        row = {**overrides, **result}
        rows.append(row)
        runs[name] = federation
        if store is not None:
            store.save(name, key, result, federation, metrics)
        if log:
            print(f"{name:34s} FID {row['fid']:7.1f} | cond_acc {row['cond_acc']:.3f} | {row['seconds']:5.0f} s | "
                  f"{row['MB']:8,.0f} MB", flush=True)
    return rows, runs


def run_seeds(base: FedConfig, cells: Mapping[str, Mapping[str, Any]], seeds: Sequence[int], *,
              data: tuple[Tensor, Tensor] | None = None, evaluator: Evaluator | None = None,
              known: Mapping[str, Mapping[str, Any]] | None = None, store: CellStore | str | Path | None = None,
              log: bool = True,
              metrics: Sequence[str] = ("fid", "cond_acc")) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each cell of a grid again at every seed, so that a difference between cells can be held against the spread
    of one cell over seeds (the seed draws the partition, the initial models, the batches and the noise).

    `known` maps cell names to rows already run at `base.seed` (the grid's), reused rather than run again; pass the
    grid's `evaluator` with them so every seed is scored by the same classifier. `store` is run_ablation's. Returns
    a row a cell and seed (with "seed") and a summary a cell: for each of `metrics` ("fid", "cond_acc"; any number a
    row has) its value at each seed s ("fid@s"), then its mean and standard deviation over seeds ("fid_mean",
    "fid_sd", ...).
    """
    seeds = list(seeds)
    require(len(seeds) >= 2 and len(set(seeds)) == len(seeds) and all(map(non_negative_int, seeds)), "seeds",
             seeds, "two or more distinct integers >= 0")
    known = dict(known or {})
    require(not known or evaluator is not None, "evaluator", evaluator,
             "the grid's Evaluator when known rows are reused (else the seeds are scored by another classifier)")

    def reused(name: str, seed: int) -> bool:
        return seed == base.seed and name in known

    def label(name: str, seed: int) -> str:
        return f"{name} | seed {seed}"

    todo = {label(name, seed): {**overrides, "seed": seed}
            for name, overrides in cells.items() for seed in seeds if not reused(name, seed)}
    new_rows, _ = run_ablation(base, todo, data=data, evaluator=evaluator, store=store, log=log)
    found = iter(new_rows)
    rows, summary = [], []
    for name in cells:
        by_seed = {seed: ({**known[name], "cell": label(name, seed), "seed": seed}
                          if reused(name, seed) else next(found)) for seed in seeds}
        rows += by_seed.values()
        line: dict[str, Any] = {"cell": name, "seeds": len(seeds)}
        for metric in metrics:
            values = np.array([by_seed[seed][metric] for seed in seeds], dtype=float)
            line.update({f"{metric}@{seed}": float(v) for seed, v in zip(seeds, values)})
            line.update({f"{metric}_mean": float(values.mean()), f"{metric}_sd": float(values.std(ddof=1))})
        summary.append(line)
    return rows, summary
