"""Same seed, same device, same result? One round of local training run twice per setting, compared bit for bit.

For FedConfig.deterministic True (cuDNN's deterministic algorithms, the default) and False (cuDNN autotuned), and
for the thin convolutions' forms "grouped", "block" and, on a GPU with Triton, "triton" (TritonClientConvolution):
trains K clients from the same seed twice and prints
whether every parameter and buffer came out equal, and the largest difference. On a CPU everything is equal;
on a GPU, autotuned cuDNN may pick algorithms that add in a different order each run.

    python benchmarks/check_determinism.py                  # K=10, ngf=64, 8 local steps
    python benchmarks/check_determinism.py --ngf 8 --steps 2 --json determinism.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fedgan_utils as fu  # noqa: E402
from fedgan.engine import triton_conv  # noqa: E402


def train_once(config: fu.FedConfig, images: torch.Tensor, labels: torch.Tensor, plan: fu.RoundPlan) -> torch.Tensor:
    """Every client's parameters and buffers after local training from seed 0, as one flat vector."""
    torch.manual_seed(0)
    generator, discriminator = (m.to(images.device) for m in fu.build_models(config))
    count = config.num_clients
    local = fu.LocalTraining(lr_g=config.lr_g, lr_d=config.lr_d, betas=config.betas)
    result = fu.train_clients(generator, discriminator, fu.broadcast(generator.state_dict(), count),
                              fu.broadcast(discriminator.state_dict(), count), images, labels, plan, local,
                              config.engine)
    return torch.cat([v.flatten().double() for v in {**result.g_state, **result.d_state}.values()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10, help="clients K")
    parser.add_argument("--steps", type=int, default=8, help="local steps")
    parser.add_argument("--ngf", type=int, default=64, help="generator and discriminator width")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")
    args = parser.parse_args()
    device = fu.pick_device(args.device)
    images, labels = (t.to(device) for t in fu.load_dataset("mnist"))
    config = fu.FedConfig(num_clients=args.clients, local_steps=args.steps, ngf=args.ngf, ndf=args.ngf,
                          device=str(device), eval_every=None)
    plan = fu.plan_round(config, fu.partition(labels.cpu().numpy(), args.clients, seed=0), 1)
    print(f"device {device} | torch {fu.env_report()['torch']} | K={args.clients} | ngf=ndf={args.ngf} | "
          f"{args.steps} local steps, trained twice from seed 0")
    rows = []
    forms = ("grouped", "block") + (("triton",) if device.type == "cuda" and triton_conv.triton is not None else ())
    for deterministic in (True, False):
        for form in forms:
            engine = fu.EngineOptions(client_map="vmap", deterministic=deterministic, conv_form=form,
                                      conv_block_clients=args.clients)
            setting = dataclasses.replace(config, engine=engine)
            first, second = (train_once(setting, images, labels, plan) for _ in range(2))
            rows.append({"device": str(device), "deterministic": deterministic, "conv_form": form,
                         "equal": torch.equal(first, second), "max_diff": (first - second).abs().max().item()})
            print(f"deterministic={deterministic!s:<5} conv_form={form:<7} equal: {rows[-1]['equal']!s:<5} "
                  f"largest difference {rows[-1]['max_diff']:.3g}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
