"""Cells of the custom sync study at a preset of your choice, outside the notebook: on a CPU the `full` preset takes
about 25 minutes a cell, too long for the notebook's whole grid, so this runs the few cells a question needs.

Every cell is the preset's federation (10 IID clients, 20 rounds of one local epoch, FedAvg at `full`) with the
cell's overrides, from one seed, on the same data, scored by one metric classifier (the notebooks' own, cached),
and prints the real-data reference, then a line a cell. `--seeds` runs each cell from every seed in turn; `--json`
writes the rows and each cell's metric curve, rewritten after every cell (a stopped run keeps the cells it finished).

    python benchmarks/study_cells.py --cells "Adam kept / iid" "FedAvg / dir0.1" --json cells.json
    python benchmarks/study_cells.py --cells "FedAvg / iid" --seeds 1 2 --json seeds.json
    python benchmarks/study_cells.py --list
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fedgan_utils as fu  # noqa: E402


def study_cells(base: fu.FedConfig) -> dict[str, dict]:
    """The cells by the custom sync notebook's names, as overrides of `base`.

    "half epoch / iid" (every client, half an epoch a round, twice the rounds) sees the same images as "half, uniform
    / iid" (half the clients a round, twice the rounds): it tells "more synchronisations" from "fewer clients". It
    exists only at presets whose local work is given in epochs (cpu, full), where half a round is exact.
    """
    dirichlet = dict(partition="dirichlet", alpha=0.1)
    one_class = dict(partition="classes", classes_per_client=1, num_clients=10)  # ten: cpu and full have them
    momentum = dict(strategy="fedavgm", server_momentum=0.5)
    cells = {
        "FedAvg / iid": {},
        "FedAvg / dir0.1": dirichlet,
        "FedAvgM / iid": momentum,
        "FedAvgM / dir0.1": {**momentum, **dirichlet},
        "Adam kept / iid": dict(optimizer_state="keep"),  # each client's Adam moments carried from round to round
        "half, uniform / iid": dict(client_fraction=0.5, rounds=2 * base.rounds),  # the same images in all
        # the stronger-baseline options (issue 24), each on the split where FedAvg lost most
        "spectral norm / dir0.1": dict(d_norm="spectral", **dirichlet),
        "projection + hinge / dir0.1": dict(d_conditioning="projection", gan_loss="hinge", **dirichlet),
        "label smoothing 0.1 / dir0.1": dict(label_smoothing=0.1, **dirichlet),
        "instance noise 0.1 / dir0.1": dict(instance_noise=0.1, **dirichlet),
        # beyond parameter averaging (issue 23), on Dirichlet 0.1 and one class a client
        **{f"{name} / {split}": {**method, **data} for split, data in (("dir0.1", dirichlet), ("one class", one_class))
           for name, method in (("FedAvg", {}), ("SCAFFOLD", dict(strategy="scaffold")),
                                ("MD-GAN", dict(gan_layout="md_gan")), ("UA-GAN", dict(gan_layout="ua_gan")),
                                ("F2U", dict(gan_layout="f2u")), ("F2A", dict(gan_layout="f2a")))},
    }
    if base.local_steps is None:
        cells["half epoch / iid"] = dict(local_epochs=base.local_epochs / 2, rounds=2 * base.rounds)
    return cells


def metric_curve(run: fu.Federation) -> list[dict]:
    """FID, conditional accuracy and IS at each scored round of a run."""
    return [{"round": record["round"], **{k: record["metrics"][k] for k in ("fid", "cond_acc", "is")}}
            for record in run.history if record.get("metrics")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full", help="smoke, cpu or full (default full)")
    parser.add_argument("--cells", nargs="+", default=["FedAvg / iid"], help="cell names, each quoted (see --list)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="run every cell from each (default 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--json", type=Path, default=None, help="write the rows and metric curves to this file")
    parser.add_argument("--list", action="store_true", help="print the cells and their overrides, then stop")
    args = parser.parse_args()
    device = fu.pick_device(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        # every client a round, as in the notebook's grid (the cpu preset itself selects 2 of 10)
        base = fu.preset(args.preset, client_fraction=1.0, seed=0, device=str(device), checkpoint_every=0,
                         checkpoint_dir=scratch, out_dir=scratch, run_name="study")
        cells = study_cells(base)
        if args.list:
            for name, overrides in cells.items():
                print(f"{name:22s} {overrides}")
            return
        unknown = [name for name in args.cells if name not in cells]
        if unknown:
            parser.error(f"--cells {unknown} not known; cells: {list(cells)}")
        if len(set(args.seeds)) < len(args.seeds) or min(args.seeds) < 0:
            parser.error(f"--seeds {args.seeds}: distinct integers >= 0 allowed")
        print(f"preset {args.preset} | seeds {args.seeds} | device {device} | torch {fu.env_report()['torch']}",
              flush=True)
        data = fu.load_dataset(base.dataset, base.data_root)
        # every cell and seed scored by the notebooks' metric classifier and real reference (their seed, 0)
        evaluator = fu.make_evaluator(base, fu.training_images(base, *data)[0], device)
        reference = {k: v for k, v in evaluator.reference.items() if k != "per_class_acc"}
        print("real data: " + " | ".join(f"{key} {reference[key]:.4g}" for key in
                                         ("fid", "kid", "is", "cond_acc", "classifier_test_accuracy")), flush=True)
        rows, curves = [], {}
        for name in args.cells:  # a cell from all its seeds before the next cell
            for seed in args.seeds:
                cell_rows, runs = fu.run_ablation(dataclasses.replace(base, seed=seed), {name: cells[name]},
                                                  data=data, evaluator=evaluator)
                run = runs[name]
                rows.append({**cell_rows[0], "seed": seed})
                curves.setdefault(name, {})[str(seed)] = metric_curve(run)
                print(f"{name} | seed {seed}: FID by round "
                      + ", ".join(f"{point['round']}: {point['fid']:.1f}" for point in curves[name][str(seed)]),
                      flush=True)
                if args.json:
                    args.json.write_text(json.dumps({"preset": args.preset, "seeds": args.seeds, "device": str(device),
                                                     "reference": reference, "rows": rows, "curves": curves}, indent=1))
    if args.json:
        print(f"rows and curves written to {args.json}")


if __name__ == "__main__":
    main()
