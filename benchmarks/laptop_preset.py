"""Candidates for the `cpu` (laptop) preset: minutes of training against the conditional accuracy they reach.

Each candidate is plain FedAvg over 10 IID clients at ngf=ndf=32, changed only in how its work is laid out (clients a
round, rounds, batch, local work). It is scored every few rounds by the notebooks' metric classifier (cached), so a
candidate gives a curve of training minutes against cond_acc and its worst class; the preset is the knee.

    python benchmarks/laptop_preset.py --candidates "cpu (before)" "half x16" --json laptop.json
    python benchmarks/laptop_preset.py --list
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fedgan_utils as fu  # noqa: E402

# overrides of the cpu preset's federation (10 IID clients, ngf=ndf=32); each names its images seen in MNIST epochs
CANDIDATES: dict[str, dict] = {
    "cpu (before)": dict(client_fraction=1.0, rounds=8, local_epochs=1.0, batch_size=64),  # 8 epochs
    "half x16": dict(client_fraction=0.5, rounds=16, local_epochs=1.0, batch_size=64),  # 8 epochs
    "half x24": dict(client_fraction=0.5, rounds=24, local_epochs=1.0, batch_size=64),  # 12 epochs
    "fifth x40": dict(client_fraction=0.2, rounds=40, local_epochs=1.0, batch_size=64),  # 8 epochs
    "fifth x60": dict(client_fraction=0.2, rounds=60, local_epochs=1.0, batch_size=64),  # 12 epochs
    "fifth x30": dict(client_fraction=0.2, rounds=30, local_epochs=1.0, batch_size=64),  # 6 epochs
    "half x16 b32": dict(client_fraction=0.5, rounds=16, local_epochs=1.0, batch_size=32),  # 8 epochs
    "half epoch x16": dict(client_fraction=1.0, rounds=16, local_epochs=0.5, batch_size=64),  # 8 epochs
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), help="names, each quoted (see --list)")
    parser.add_argument("--scores", type=int, default=4, help="times each candidate is scored (default 4)")
    parser.add_argument("--json", type=Path, default=None, help="write the curves to this file")
    parser.add_argument("--list", action="store_true", help="print the candidates, then stop")
    args = parser.parse_args()
    if args.list:
        for name, overrides in CANDIDATES.items():
            print(f"{name:16s} {overrides}")
        return
    unknown = [name for name in args.candidates if name not in CANDIDATES]
    if unknown:
        parser.error(f"--candidates {unknown} not known; candidates: {list(CANDIDATES)}")
    with tempfile.TemporaryDirectory() as scratch:
        base = fu.preset("cpu", device="cpu", checkpoint_every=0, checkpoint_dir=scratch, out_dir=scratch,
                         eval_samples=5000)
        print(f"device cpu | torch {fu.env_report()['torch']} | threads {fu.env_report()['cpu_threads']}",
              flush=True)
        data = fu.load_dataset(base.dataset, base.data_root)
        evaluator = fu.make_evaluator(base, fu.training_images(base, *data)[0], "cpu")
        results = {}
        for name in args.candidates:
            overrides = CANDIDATES[name]
            config = dataclasses.replace(base, **overrides, eval_every=max(1, overrides["rounds"] // args.scores),
                                         run_name=name.replace(" ", "_").replace("(", "").replace(")", ""))
            federation = fu.Federation(config, data=data, log=False)
            federation.evaluator = evaluator
            start = time.perf_counter()
            federation.run(progress=False)
            wall = time.perf_counter() - start
            curve, training = [], 0.0
            for record in federation.history:
                training += record["seconds"]
                if record.get("metrics"):
                    per_class = record["metrics"]["per_class_acc"]
                    curve.append({"round": record["round"], "train_min": training / 60,
                                  "cond_acc": record["metrics"]["cond_acc"], "worst": min(per_class),
                                  "worst_label": per_class.index(min(per_class)), "fid": record["metrics"]["fid"]})
            results[name] = {"overrides": overrides, "wall_s": wall, "curve": curve}
            points = ", ".join(f"{p['train_min']:.1f} min: {p['cond_acc']:.3f} (worst {p['worst']:.2f})"
                               for p in curve)
            print(f"{name:16s} wall {wall:6.0f} s | {points}", flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
