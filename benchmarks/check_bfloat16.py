"""Does bfloat16 compute (EngineOptions.bfloat16) keep the quality? The same federation trained twice, float32 and
bf16.

Same seed, data, clients and metric classifier; prints FID, KID, IS, conditional accuracy and training seconds
of both, and the ratios. bfloat16 changes what is computed (its rounding in the forward passes), so the two runs
are not equal: the question is whether the generator is as good.

    python benchmarks/check_bfloat16.py                      # the full preset on a GPU, the cpu preset on a CPU
    python benchmarks/check_bfloat16.py --preset cpu --rounds 4 --json bfloat16.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fedgan_utils as fu  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="smoke, cpu or full (default: full on a GPU, cpu on a CPU)")
    parser.add_argument("--rounds", type=int, default=None, help="override the preset's rounds")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--json", type=Path, default=None, help="write the two rows to this JSON file")
    args = parser.parse_args()
    device = fu.pick_device(args.device)
    name = args.preset or ("full" if device.type == "cuda" else "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        overrides = dict(device=str(device), checkpoint_every=0, checkpoint_dir=scratch, out_dir=scratch)
        if args.rounds is not None:
            overrides.update(rounds=args.rounds, eval_every=args.rounds)
        base = fu.preset(name, **overrides)
        print(f"preset {name} | {base.rounds} rounds | device {device} | torch {fu.env_report()['torch']}")
        rows, _ = fu.run_ablation(base, {"float32": {}, "bfloat16": {"engine": fu.EngineOptions(bfloat16=True)}})
    exact, low = rows
    for key, label in (("fid", "FID"), ("kid", "KID"), ("is", "IS"), ("cond_acc", "cond_acc"), ("seconds", "seconds")):
        print(f"{label:>9}: float32 {exact[key]:10.4g} | bf16 {low[key]:10.4g} | bf16/float32 {low[key] / exact[key]:.2f}")
    if args.json:
        args.json.write_text(json.dumps([{**row, "device": str(device), "preset": name} for row in rows], indent=1))
        print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
