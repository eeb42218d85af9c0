"""SHA-256 of the final global weights and losses of a few seeded federations on this device.

    python benchmarks/weights_checksums.py --json after.json [--compare before.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fedgan_utils as fu  # noqa: E402

BASE = dict(num_clients=4, rounds=3, local_steps=4, batch_size=16, ngf=8, ndf=8, z_dim=8, embed_dim=4, device="cpu",
            eval_every=None, checkpoint_every=0)
CASES = {
    "fedavg iid": {},
    "fedavg iid vmap": {"engine": fu.EngineOptions(client_map="vmap")},
    "quantity skew": {"partition": "quantity", "sigma": 1.0, "min_size": 20, "local_steps": None,
                      "local_epochs": 0.2},
    "quantity skew vmap": {"partition": "quantity", "sigma": 1.0, "min_size": 20, "local_steps": None,
                           "local_epochs": 0.2, "engine": fu.EngineOptions(client_map="vmap")},
    "fedprox, adam kept": {"strategy": "fedprox", "optimizer_state": "keep"},
    "fedadam dirichlet half": {"strategy": "fedadam", "partition": "dirichlet", "alpha": 0.5, "client_fraction": 0.5},
    "topk, sign flip, median": {"compression": "topk", "topk_fraction": 0.1, "attack": "sign_flip",
                                "attack_fraction": 0.25, "strategy": "median"},
    "dp, server generator": {"dp_clip": 1.0, "dp_noise_multiplier": 0.1, "gan_layout": "server_g"},
    "async": {"sync_mode": "async", "client_fraction": 0.75, "client_speed_sigma": 0.5},
    "fedbn, sync d": {"bn_policy": "local", "sync_networks": "d"},
    "bfloat16": {"engine": fu.EngineOptions(bfloat16=True)},
    "vmap block conv": {"engine": fu.EngineOptions(client_map="vmap", conv_form="block", conv_block_clients=2)},
    "fednova, deadline, dropout, int8": {"step_normalisation": "fednova", "client_speed_sigma": 1.0, "round_deadline": 3,
                                   "dropout": 0.2, "compression": "int8"},
}


def digest(tensors) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--compare", type=Path)
    args = parser.parse_args()
    images, labels = fu.load_dataset("mnist")
    data = images[:1200], labels[:1200]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in CASES.items():
            config = fu.FedConfig(**{**BASE, **overrides}, out_dir=f"{tmp}/o", checkpoint_dir=f"{tmp}/c")
            federation = fu.Federation(config, data=data, log=False).run(progress=False)
            losses = np.array([[r["d_loss"], r["g_loss"]] for r in federation.history], dtype=np.float64)
            rows[name] = {"generator": digest(federation.generator.state_dict().items()),
                          "discriminator": digest(federation.discriminator.state_dict().items()),
                          "losses": hashlib.sha256(losses.tobytes()).hexdigest()}
            print(f"{name:28s} G {rows[name]['generator'][:16]}  D {rows[name]['discriminator'][:16]}  "
                  f"losses {rows[name]['losses'][:16]}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    if args.compare:
        before = json.loads(args.compare.read_text())["rows"]
        same = [n for n in rows if before.get(n) == rows[n]]
        print(f"{len(same)} of {len(rows)} cases bit for bit as in {args.compare}")
        for n in rows:
            if before.get(n) != rows[n]:
                print(f"  differs: {n}")


if __name__ == "__main__":
    main()
