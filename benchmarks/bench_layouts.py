"""Throughput of each GAN layout and of SCAFFOLD, the batched engine against the per-client reference loop.

For each layout (FedConfig.gan_layout: fedavg, server_g, md_gan, ua_gan, f2u, f2a) and strategy="scaffold", one
process runs a round of K clients taking `--steps` local steps of `--batch` images on MNIST, once with the engine as
the notebooks run it (client_map "auto") and once with client_map="reference" (the clients one after another as
nn.Modules), and times a second round (the first builds the engine's kept state). It prints real images a second
(K x steps x batch over the round's seconds, aggregation included, evaluation off), the ratio engine/reference, and
the bytes a round sends up and down.

    python benchmarks/bench_layouts.py                      # K = 10, 5 steps, ngf = ndf = 32 (the cpu preset)
    python benchmarks/bench_layouts.py --clients 10 --steps 20 --ngf 64 --json results.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fedgan_utils as fu  # noqa: E402

CELLS = {"fedavg": {}, "scaffold": dict(strategy="scaffold"), "server_g": dict(gan_layout="server_g"),
         **{layout: dict(gan_layout=layout) for layout in ("md_gan", "ua_gan", "f2u", "f2a")}}


def time_round(config: fu.FedConfig, data, repeats: int) -> tuple[float, dict]:
    """The fastest of `repeats` rounds after the first, and that round's record."""
    federation = fu.Federation(config, data=data, log=False)
    federation.run_round()
    best, record = float("inf"), {}
    for _ in range(repeats):
        if federation.device.type == "cuda":
            torch.cuda.synchronize(federation.device)
        start = time.perf_counter()
        record = federation.run_round()
        if federation.device.type == "cuda":
            torch.cuda.synchronize(federation.device)
        best = min(best, time.perf_counter() - start)
    return best, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5, help="local steps a client takes a round")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ngf", type=int, default=32, help="generator and discriminator width")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds; the fastest counts")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, of {list(CELLS)}")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    images, labels = fu.load_dataset("mnist", os.environ.get("FEDGAN_DATA"))
    data = (images[:20000], labels[:20000])
    device = fu.pick_device(args.device)
    print(f"{args.clients} clients x {args.steps} steps x {args.batch} images a round, ngf = ndf = {args.ngf}, "
          f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.cells.split(","):
            base = fu.FedConfig(num_clients=args.clients, rounds=1 + args.repeats + 1, local_steps=args.steps,
                                batch_size=args.batch, ngf=args.ngf, ndf=args.ngf, eval_every=None,
                                checkpoint_every=0, device=args.device, out_dir=folder, checkpoint_dir=folder,
                                run_name=name, **CELLS[name])
            seconds = {}
            for client_map in ("auto", "reference"):
                config = dataclasses.replace(base, run_name=f"{name}-{client_map}",
                                             engine=fu.EngineOptions(client_map=client_map))
                seconds[client_map], record = time_round(config, data, args.repeats)
            real = args.clients * args.steps * args.batch
            row = {"cell": name, "engine img/s": real / seconds["auto"], "reference img/s": real / seconds["reference"],
                   "engine/reference": seconds["reference"] / seconds["auto"],
                   "MB up": record["bytes_up"] / 1e6, "MB down": record["bytes_down"] / 1e6}
            rows.append(row)
            print(f"{name:9s} engine {row['engine img/s']:8,.0f} img/s | reference {row['reference img/s']:8,.0f} "
                  f"img/s | x{row['engine/reference']:.2f} | {row['MB up']:7.2f} MB up, {row['MB down']:7.2f} MB "
                  "down a round", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": str(device), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
