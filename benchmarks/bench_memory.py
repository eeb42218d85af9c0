"""Peak memory of federated rounds as the number of clients K grows: it should follow the clients selected a
round, not K (only they are stacked and trained; the others are a list of image indices).

Each case runs in a fresh process: the federation is built, then two rounds run and the peak memory they add
is read: on a GPU torch's peak allocation (reset before the rounds), on a CPU the peak resident set size
(VmHWM, reset through /proc/self/clear_refs, Linux) above what the process held before the rounds.

    python benchmarks/bench_memory.py                   # 100 and 200 clients a round, out of K = 100/200 and 1000
    python benchmarks/bench_memory.py --cases 100:1.0,1000:0.1 --json memory.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fedgan_utils as fu  # noqa: E402


def resident_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MB
    raise RuntimeError(f"/proc/self/status has no {field}: the CPU measurement needs Linux")


def measure_case(num_clients: int, fraction: float, args) -> dict:
    """Peak memory two rounds add, for K clients of which `fraction` train each round."""
    device = fu.pick_device(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        config = fu.FedConfig(num_clients=num_clients, client_fraction=fraction, local_steps=args.local_steps,
                              batch_size=args.batch, ngf=args.ngf, ndf=args.ngf, optimizer_state=args.optimizer_state,
                              device=str(device), rounds=10 ** 6, eval_every=None, checkpoint_every=0,
                              checkpoint_dir=scratch, out_dir=scratch)
        federation = fu.Federation(config, log=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device) / 2 ** 20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            before = resident_mb("VmRSS")
        start = time.perf_counter()
        for _ in range(args.rounds):
            federation.run_round()
        seconds = (time.perf_counter() - start) / args.rounds
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
        else:
            peak = resident_mb("VmHWM")
    selected = fu.clients_per_round(num_clients, fraction)
    return {"K": num_clients, "fraction": fraction, "selected": selected, "device": str(device),
            "batch": args.batch, "ngf": args.ngf, "optimizer_state": args.optimizer_state,
            "before_mb": before, "peak_mb": peak, "added_mb": peak - before, "round_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="100:1.0,1000:0.1,200:1.0,1000:0.2", help="comma-separated K:fraction")
    parser.add_argument("--batch", type=int, default=64, help="images per client per step")
    parser.add_argument("--ngf", type=int, default=64, help="generator and discriminator width")
    parser.add_argument("--local-steps", type=int, default=1, help="local steps a round (memory does not grow with it)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds measured")
    parser.add_argument("--optimizer-state", default="reset", choices=fu.OPTIMIZER_STATES,
                        help="'keep' stores each client's Adam state between its rounds (grows with the clients seen)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")
    parser.add_argument("--one-case", default=None, help=argparse.SUPPRESS)  # K:fraction, in the child process
    args = parser.parse_args()
    if args.one_case:
        k, fraction = args.one_case.split(":")
        print(json.dumps(measure_case(int(k), float(fraction), args)))
        return
    options = [f"--batch={args.batch}", f"--ngf={args.ngf}", f"--local-steps={args.local_steps}",
               f"--rounds={args.rounds}", f"--optimizer-state={args.optimizer_state}", f"--device={args.device}"]
    rows = []
    for case in args.cases.split(","):
        child = subprocess.run([sys.executable, __file__, "--one-case", case, *options], capture_output=True, text=True)
        if child.returncode != 0:  # e.g. out of memory: say so and go on with the other cases
            print(f"case {case} failed:\n{child.stderr.strip().splitlines()[-1] if child.stderr.strip() else ''}")
            continue
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    if not rows:
        raise SystemExit("no case ran")
    where = "GPU peak allocated" if rows[0]["device"].startswith("cuda") else "CPU peak resident set"
    print(f"device {rows[0]['device']} | torch {torch.__version__} | ngf=ndf={args.ngf} | batch {args.batch} | "
          f"{args.local_steps} local step(s) | {args.rounds} rounds | optimizer_state={args.optimizer_state} | {where}")
    header = f"{'K':>6} {'fraction':>9} {'selected':>9} {'before MB':>10} {'peak MB':>9} {'added MB':>9} {'s/round':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['K']:>6} {row['fraction']:>9.2f} {row['selected']:>9} {row['before_mb']:>10,.0f} "
              f"{row['peak_mb']:>9,.0f} {row['added_mb']:>9,.0f} {row['round_s']:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
