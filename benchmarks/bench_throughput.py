"""Training throughput of the federated engine, side by side with a per-client loop and a one-model ceiling.

In one process, on the same data and model, for each K it times local training (a D and a G step per client
per step, K clients x batch images):
  loop     - the reference per-client loop, client_map="reference" (fedgan/engine/reference.py: nn.Module and
             torch.optim.Adam, one client after another)
  engine   - fedgan.engine's train_clients, as the notebooks use it (all K clients stacked; on a GPU each step
             replayed from a CUDA graph), in a round after the first: its LocalTrainer kept
  first round - the same in a federation's first round (a new LocalTrainer, the graphs captured in the round)
  ceiling  - the same engine with one model given all K x batch images per step (plain cuDNN convolutions)
  eager    - on a GPU, also the engine without CUDA graphs (--no-cuda-graphs makes it the engine)
and, when asked, the engine with other forms of the thin convolutions (--compare-forms) or other client maps
(--compare-maps, e.g. "streams": the clients as one model each, side by side on CUDA streams). It prints
images/s with the ratios engine/loop and engine/ceiling, and the kernels each launches per step
(aten operations that compute, views and bare allocations left out: on a GPU each is at least one kernel
launch, and launches are what bound a small GAN's step there; on a CPU the count still shows it; the engine's
Triton kernels are not aten operations and go uncounted).

    python benchmarks/bench_throughput.py                 # K = 1, 10, 100 on a GPU; 1, 4, 10 on a CPU
    python benchmarks/bench_throughput.py --ks 10 --steps 5 --json results.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fedgan_utils as fu  # noqa: E402
from fedgan.engine import trainer as engine_trainer  # noqa: E402
from fedgan.engine import triton_conv  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_plan(config: fu.FedConfig, num_clients: int, batch: int, steps: int, num_images: int) -> fu.RoundPlan:
    """K clients taking `steps` steps of `batch` random images each."""
    rng = np.random.default_rng(0)
    indices = torch.from_numpy(rng.integers(0, num_images, (num_clients, steps, batch)))
    return fu.RoundPlan(1, np.arange(num_clients), np.full(num_clients, steps * batch), np.full(num_clients, steps),
                        indices, noise_seed=1)


def local_training(config: fu.FedConfig) -> fu.LocalTraining:
    return fu.LocalTraining(lr_g=config.lr_g, lr_d=config.lr_d, betas=config.betas)


def with_engine(config: fu.FedConfig, **options) -> fu.FedConfig:
    return dataclasses.replace(config, engine=dataclasses.replace(config.engine, **options))


def time_engine(config, generator, discriminator, images, labels, plan) -> float:
    g_state = fu.broadcast(generator.state_dict(), len(plan.client_ids))
    d_state = fu.broadcast(discriminator.state_dict(), len(plan.client_ids))
    synchronize(images.device)
    start = time.perf_counter()
    result = fu.train_clients(generator, discriminator, g_state, d_state, images, labels, plan,
                              local_training(config), config.engine)
    result.d_loss.tolist()  # the one host sync of a round
    synchronize(images.device)
    return time.perf_counter() - start


def time_first_round(config, generator, discriminator, images, labels, plan) -> float:
    """The engine as in a federation's first round: a new LocalTrainer each call, its CUDA graphs captured in the
    round (time_engine's trainer is kept by train_clients from the warm-up call on, so its timed rounds replay)."""
    count = len(plan.client_ids)
    g_state, d_state = fu.broadcast(generator.state_dict(), count), fu.broadcast(discriminator.state_dict(), count)
    synchronize(images.device)
    start = time.perf_counter()
    client_map = fu.resolved_client_map(config.engine.client_map, images.device, plan.steps.tolist())
    trainer = fu.LocalTrainer(generator, discriminator, g_state, d_state, images, labels, local_training(config),
                              config.engine, client_map)
    trainer(g_state, d_state, plan).d_loss.tolist()
    synchronize(images.device)
    return time.perf_counter() - start


def time_loop(config, generator, discriminator, images, labels, plan) -> float:
    return time_engine(with_engine(config, client_map="reference"), generator, discriminator, images, labels, plan)


class KernelCounter(TorchDispatchMode):
    """Counts the aten operations that run a kernel: views and bare allocations left out."""

    NO_KERNEL = {"aten::_unsafe_view", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
                 "aten::new_empty_strided"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view and func._schema.name not in self.NO_KERNEL
        return func(*args, **(kwargs or {}))


def kernels_per_step(timer, config, generator, discriminator, images, labels, plan) -> float:
    """Kernels a contender runs per local step, its round set-up spread over the steps.

    Counted without CUDA graphs: a graph replays the same kernels, but from one launch that the count cannot see.
    """
    with KernelCounter() as counter:
        timer(with_engine(config, cuda_graphs=False), generator, discriminator, images, labels, plan)
    return counter.count / int(plan.steps.max())


def first_steps(plan: fu.RoundPlan, count: int) -> fu.RoundPlan:
    return fu.RoundPlan(plan.round, plan.client_ids, plan.sizes, np.minimum(plan.steps, count),
                        plan.batch_indices[:, :count], plan.noise_seed)


def variant_label(option: str, value: str) -> str:
    """A variant of the engine as timed and printed: ("conv_form", "block:2") -> "conv_form block:2"."""
    return f"{option} {value}"


def measure(k: int, args, device: torch.device, images, labels) -> dict:
    config = fu.FedConfig(num_clients=max(k, 1), batch_size=args.batch, ngf=args.ngf, ndf=args.ngf, device=str(device),
                          eval_every=None, engine=args.engine)
    torch.manual_seed(0)
    models = tuple(m.to(device) for m in fu.build_models(config))
    plan = make_plan(config, k, args.batch, args.steps, len(labels))
    ceiling_config = with_engine(dataclasses.replace(config, num_clients=1, batch_size=k * args.batch),
                                 conv_form="grouped")  # one model: groups=1, cuDNN's plain convolutions
    one_model = make_plan(ceiling_config, 1, k * args.batch, args.steps, len(labels))
    contenders = {"engine": (time_engine, config, plan), "loop": (time_loop, config, plan),
                  "ceiling": (time_engine, ceiling_config, one_model), "first round": (time_first_round, config, plan)}
    if not args.loop:  # a variant of the engine measured after the loop was: the loop's figures are the same
        del contenders["loop"]
    timed_eager = device.type == "cuda" and config.engine.cuda_graphs and args.eager
    if timed_eager:  # what the graphs bring: the engine as it steps without them
        contenders["eager"] = (time_engine, with_engine(config, cuda_graphs=False), plan)
    for variant, overrides in args.variants.items():  # the engine with other conv forms or client maps
        contenders[variant] = (time_engine, with_engine(config, **overrides), plan)
    fu.clear_local_trainers()  # the last K's
    engine_trainer.LOCAL_TRAINERS_KEPT = 2 * len(contenders)  # each contender's trainer, and the kernel counts' ones
    for timer, cfg, p in contenders.values():  # warm-up: allocator, cuDNN autotuning, caches
        timer(cfg, *models, images, labels, first_steps(p, 2))
    best = {name: float("inf") for name in contenders}
    for _ in range(args.repeats):  # interleaved, so that drift in the machine's speed hits all alike
        for name, (timer, cfg, p) in contenders.items():
            best[name] = min(best[name], timer(cfg, *models, images, labels, p))
    kernels = {name: kernels_per_step(timer, cfg, *models, images, labels, first_steps(p, 10))
               for name, (timer, cfg, p) in contenders.items() if name in ("loop", "engine", "ceiling")}
    peak = None
    if device.type == "cuda":  # the engine's own peak, in a run of its own, the other contenders' trainers let go
        fu.clear_local_trainers()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        time_engine(config, *models, images, labels, plan)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    work = k * args.batch * args.steps
    return {"K": k, "batch": args.batch, "device": str(device),
            **{name: getattr(args.engine, name) for name in ("conv_form", "conv_block_clients", "deterministic")},
            "loop_img_s": work / best["loop"] if args.loop else None,
            "engine_img_s": work / best["engine"], "ceiling_img_s": work / best["ceiling"], "peak_mem_mb": peak,
            "eager_img_s": work / best["eager"] if timed_eager else None,
            "first_round_img_s": work / best["first round"],
            "forms_img_s": {f: work / best[variant_label("conv_form", f)] for f in args.compare_forms} or None,
            "maps_img_s": {m: work / best[variant_label("client_map", m)] for m in args.compare_maps} or None,
            **{f"{name}_kernels_step": kernels.get(name) for name in ("loop", "engine", "ceiling")}}


def conv_options(form: str) -> dict:
    """"block:5" -> conv_form "block" with 5 clients a block; "loop" -> conv_form "loop"."""
    name, _, block = form.partition(":")
    return {"conv_form": name, **({"conv_block_clients": int(block)} if block else {})}


def cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def full_round(device: torch.device, images, labels, args, **split) -> str:
    """Seconds for a full-preset round, 10 clients, one local epoch over all their images (IID, or `split`): the
    second round (the first's trainer and CUDA graphs kept) and the first; and the clients' fewest and most local
    steps: unequal clients keep the stacked step going for the largest."""
    with tempfile.TemporaryDirectory() as scratch:
        config = fu.preset("full", device=str(device), eval_every=None, checkpoint_every=0, rounds=10 ** 6,
                           checkpoint_dir=scratch, out_dir=scratch, engine=args.engine, **split)
        federation = fu.Federation(config, data=(images, labels), log=False)
        steps = [fu.local_steps_for(len(part), config) for part in federation.parts]
        fu.clear_local_trainers()
        first = federation.run_round()["seconds"]
        return (f"{federation.run_round()['seconds']:.2f} s (the first round {first:.2f} s; local steps {min(steps)} "
                f"to {max(steps)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default=None, help="comma-separated client counts (default: 1,10,100 GPU; 1,4,10 CPU)")
    parser.add_argument("--batch", type=int, default=64, help="images per client per step")
    parser.add_argument("--steps", type=int, default=None, help="timed local steps (default: 20 GPU, 5 CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the fastest counts")
    parser.add_argument("--ngf", type=int, default=64, help="generator and discriminator width")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--client-map", default="auto", choices=fu.CLIENT_MAPS, help="the engine's client_map")
    parser.add_argument("--bfloat16", action="store_true",
                        help="engine and ceiling with EngineOptions(bfloat16=True) (the loop stays float32)")
    parser.add_argument("--conv-form", default="auto", choices=fu.CONV_FORMS,
                        help="engine and ceiling: the form of the thin convolutions under vmap (EngineOptions)")
    parser.add_argument("--block-clients", type=int, default=fu.EngineOptions.conv_block_clients,
                        help="clients per block-diagonal convolution with --conv-form block")
    parser.add_argument("--compare-forms", default="",
                        help="comma-separated other conv forms for the engine, timed alongside: grouped, loop, "
                             "block:N (N clients a block), triton; printed below the table")
    parser.add_argument("--compare-maps", default="",
                        help="comma-separated other client maps for the engine (EngineOptions.client_map), timed "
                             "alongside: vmap, loop, streams; printed below the table")
    parser.add_argument("--cuda-streams", type=int, default=fu.EngineOptions.cuda_streams,
                        help="CUDA streams the clients share with client_map streams (EngineOptions.cuda_streams)")
    parser.add_argument("--triton-tiles", type=Path, default=None,
                        help="a JSON file of tile shapes for the Triton kernels (probe_conv_forms.py --sweep-tiles)")
    parser.add_argument("--nondeterministic", dest="deterministic", action="store_false",
                        help="engine and ceiling with deterministic=False: cuDNN autotuned, not reproducible")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="engine and ceiling step eagerly on a GPU (default: replayed from CUDA graphs)")
    parser.add_argument("--no-loop", dest="loop", action="store_false",
                        help="leave the reference loop out (to time a variant of the engine; its figures are '-')")
    parser.add_argument("--no-eager", dest="eager", action="store_false",
                        help="leave out the engine without CUDA graphs (with client_map streams at K=100 it runs "
                             "at the loop's pace); its figures are '-'")
    parser.add_argument("--full-round", action="store_true", help="also time one full-preset round (default on GPU)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")
    args = parser.parse_args()
    args.engine = fu.EngineOptions(client_map=args.client_map, bfloat16=args.bfloat16, cuda_graphs=args.cuda_graphs,
                                   cuda_streams=args.cuda_streams, conv_form=args.conv_form,
                                   conv_block_clients=args.block_clients, deterministic=args.deterministic)
    if args.triton_tiles:
        triton_conv.TRITON_TILES.update({kernel: tuple(tiles) for kernel, tiles in json.loads(args.triton_tiles.read_text())
                                .items()})
    args.compare_forms = [form for form in args.compare_forms.split(",") if form]
    args.compare_maps = [client_map for client_map in args.compare_maps.split(",") if client_map]
    args.variants = {**{variant_label("conv_form", form): conv_options(form) for form in args.compare_forms},
                     **{variant_label("client_map", m): {"client_map": m} for m in args.compare_maps}}
    for overrides in args.variants.values():  # a wrong one fails here, not after the first timings
        dataclasses.replace(args.engine, **overrides)
    device = fu.pick_device(args.device)
    gpu = device.type == "cuda"
    ks = [int(k) for k in (args.ks or ("1,10,100" if gpu else "1,4,10")).split(",")]
    args.steps = args.steps or (20 if gpu else 5)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    images, labels = fu.load_dataset("mnist")
    images, labels = images.to(device), labels.to(device)
    report = fu.env_report()
    print(f"device {device} ({report['gpu'] or 'CPU, ' + str(report['cpu_threads']) + ' threads'}) | torch "
          f"{report['torch']} | batch {args.batch} a client | ngf=ndf={args.ngf} | "
          f"engine client_map={args.client_map}, "
          f"{f'{args.cuda_streams} streams, ' if 'streams' in (args.client_map, *args.compare_maps) else ''}"
          f"conv_form={args.conv_form}{f' ({args.block_clients} clients a block)' if args.conv_form == 'block' else ''}"
          f"{f', Triton tiles {triton_conv.TRITON_TILES}' if args.triton_tiles else ''}"
          f"{', bfloat16' if args.bfloat16 else ''}{', CUDA graphs' if gpu and args.cuda_graphs else ''}"
          f"{'' if args.deterministic else ', cuDNN autotuned (deterministic=False)'} | "
          f"{args.steps} steps, best of {args.repeats}")
    rows = [measure(k, args, device, images, labels) for k in ks]
    header = f"{'K':>5} {'loop img/s':>12} {'engine img/s':>13} {'ceiling img/s':>14} {'engine/loop':>12} " \
             f"{'engine/ceiling':>15} {'peak MB':>9} {'kernels/step loop':>18} {'engine':>7} {'ceiling':>8} " \
             f"{'engine w/o graphs img/s':>24}"
    print(header)
    print("-" * len(header))
    for row in rows:
        vs_loop = row["engine_img_s"] / row["loop_img_s"] if row["loop_img_s"] else None
        print(f"{row['K']:>5} {cell(row['loop_img_s'], ',.0f'):>12} {row['engine_img_s']:>13,.0f} "
              f"{row['ceiling_img_s']:>14,.0f} {cell(vs_loop, '.2f'):>12} "
              f"{row['engine_img_s'] / row['ceiling_img_s']:>15.2f} {cell(row['peak_mem_mb'], ',.0f'):>9} "
              f"{cell(row['loop_kernels_step'], ',.0f'):>18} {row['engine_kernels_step']:>7,.0f} "
              f"{row['ceiling_kernels_step']:>8,.0f} {cell(row['eager_img_s'], ',.0f'):>24}")
    for row in rows:
        print(f"K={row['K']}: the engine's first round (a new trainer: state set up, CUDA graphs captured in the "
              f"round): {row['first_round_img_s']:,.0f} img/s, {row['first_round_img_s'] / row['engine_img_s']:.2f}x "
              f"the engine in a later round")
        measured = {**{variant_label("conv_form", form): v for form, v in (row["forms_img_s"] or {}).items()},
                    **{variant_label("client_map", m): v for m, v in (row["maps_img_s"] or {}).items()}}
        for variant, img_s in measured.items():
            print(f"K={row['K']}: the engine with {variant}: {img_s:,.0f} img/s, "
                  f"{img_s / row['engine_img_s']:.2f}x the engine, {img_s / row['ceiling_img_s']:.2f}x the ceiling"
                  + (f", {img_s / row['loop_img_s']:.2f}x the loop" if row["loop_img_s"] else ""))
    if args.full_round or gpu:
        print(f"one full-preset round (10 clients, one local epoch over 60,000 images): "
              f"{full_round(device, images, labels, args)}; on a Dirichlet 0.1 split: "
              f"{full_round(device, images, labels, args, partition='dirichlet', alpha=0.1)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
