"""Where batched clients lose to one model: each cDCGAN layer, forward and backward, in the forms K clients can take.

vmap runs K clients' convolution as one grouped convolution (groups=K); the one-model ceiling runs a plain
convolution over K x batch images. This times every layer of G and D (ngf=ndf=64, MNIST) both ways, and the
alternatives the speed issue asks about: the grouped convolution in channels_last; bfloat16; a batched matrix
multiply (bmm) with each client's weights for the layers that are matrix products in disguise (G's first layer
on a 1x1 input, D's last layer over the whole 7x7 map); for every layer the convolution as a bmm of each
client's weights with the unfolded image patches ("im2col bmm": unfold, bmm; for a transposed convolution bmm,
fold); K plain convolutions one after another ("loop"); the engine's block-diagonal convolutions over b
clients a group ("block b", fedgan_utils.block_diagonal_convolution, b times the arithmetic in K/b groups); and
the module's Triton kernels ("triton", fedgan_utils.TritonClientConvolution). Each form's forward and backward
(input and weight gradients) is captured in a CUDA graph and replayed, so launches do not hide the kernels' own
time. --sweep-tiles times the Triton form with other tile shapes, one kernel at a time (the other two as in
fedgan_utils.TRITON_TILES), and writes the fastest of each kernel (summed over the layers, K and dtypes timed) to
a JSON file that bench_throughput.py --triton-tiles reads.

    python benchmarks/probe_conv_forms.py --ks 10,100 --json forms.json      # needs a CUDA GPU
    python benchmarks/probe_conv_forms.py --layers G3,D1 --forms "one model,block" --blocks 5,10
    python benchmarks/probe_conv_forms.py --ks 10,100 --layers G3,D1 --forms "one model" --sweep-tiles tiles.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fedgan_utils as fu  # noqa: E402
from fedgan.engine import convolutions, triton_conv  # noqa: E402

# (name, transposed, in channels, out channels, kernel, stride, padding, input size): ngf=ndf=64 on 28x28
LAYERS = [("G1 convT 110->128 1->7", True, 110, 128, 7, 1, 0, 1),
          ("G2 convT 128->64 7->14", True, 128, 64, 4, 2, 1, 7),
          ("G3 convT 64->1 14->28", True, 64, 1, 4, 2, 1, 14),
          ("D1 conv 2->64 28->14", False, 2, 64, 4, 2, 1, 28),
          ("D2 conv 64->128 14->7", False, 64, 128, 4, 2, 1, 14),
          ("D3 conv 128->1 7->1", False, 128, 1, 7, 1, 0, 7)]


def im2col_conv(x, w, size: int, stride: int, padding: int):
    """K clients' convolutions as bmm: x (K, B, cin, H, W), w (K, cout, cin, k, k) -> (K, B, cout, H', W')."""
    k, b, cin, height, _ = x.shape
    cols = F.unfold(x.flatten(0, 1), size, padding=padding, stride=stride)  # (K*B, cin*k*k, L)
    patches, positions = cols.shape[1:]
    cols = cols.view(k, b, patches, positions).transpose(1, 2).reshape(k, patches, b * positions)
    out = torch.bmm(w.flatten(2), cols)  # (K, cout, B*L)
    side, = triton_conv._conv_output_size((height,), (size,), stride, padding)
    return out.view(k, -1, b, side, side).transpose(1, 2)  # (K, B, cout, H', W')


def im2col_conv_transpose(x, w, size: int, stride: int, padding: int):
    """K clients' transposed convolutions as bmm then fold: x (K, B, cin, H, W), w (K, cin, cout, k, k)."""
    k, b, cin, height, _ = x.shape
    inputs = x.transpose(1, 2).reshape(k, cin, b * height * height)  # (K, cin, B*H*W)
    cols = torch.bmm(w.flatten(2).transpose(1, 2), inputs)  # (K, cout*k*k, B*H*W)
    cols = cols.view(k, -1, b, height * height).transpose(1, 2).flatten(0, 1)  # (K*B, cout*k*k, H*W)
    side, = triton_conv._transposed_output_size((height,), (size,), stride, padding)
    out = F.fold(cols, side, size, padding=padding, stride=stride)  # (K*B, cout, H', W')
    return out.view(k, b, *out.shape[1:])


DEVICE = "cuda"
FORMS = ("one model", "grouped (vmap)", "grouped channels_last", "im2col bmm", "loop", "bmm", "block", "triton")
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tried for each kernel by --sweep-tiles
CANDIDATE_TILES = [(128, 64, 32, 4, 3), (64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 128, 32, 4, 3),
                   (128, 64, 64, 4, 2), (64, 64, 64, 4, 3), (128, 128, 64, 8, 2), (256, 64, 32, 8, 3)]


def forms(layer, k: int, batch: int, dtype: torch.dtype, blocks: list[int]):
    """{form: (fn of (x, w), x, w)} for one layer, K clients of `batch` images each."""
    _, transposed, cin, cout, size, stride, padding, hin = layer
    weight_shape = (cin, cout, size, size) if transposed else (cout, cin, size, size)

    def make(*shape, channels_last=False):
        t = torch.randn(*shape, device=DEVICE, dtype=dtype)
        t = t.to(memory_format=torch.channels_last) if channels_last else t
        return t.requires_grad_(True)
    grouped_w = (k * cin, cout, size, size) if transposed else (k * cout, cin, size, size)
    out = {
        "one model": (lambda x, w: convolutions._convolution(transposed, x, w, stride, padding),
                      make(k * batch, cin, hin, hin), make(*weight_shape)),
        "grouped (vmap)": (lambda x, w: convolutions._convolution(transposed, x, w, stride, padding, k),
                           make(batch, k * cin, hin, hin), make(*grouped_w)),
        "grouped channels_last": (lambda x, w: convolutions._convolution(transposed, x, w, stride, padding, k),
                                  make(batch, k * cin, hin, hin, channels_last=True),
                                  make(*grouped_w, channels_last=True)),
    }
    per_client_w = (k, *weight_shape)
    im2col = im2col_conv_transpose if transposed else im2col_conv
    out["im2col bmm"] = (lambda x, w: im2col(x, w, size, stride, padding), make(k, batch, cin, hin, hin),
                         make(*per_client_w))
    out["loop"] = (lambda x, w: torch.stack([convolutions._convolution(transposed, x[c], w[c], stride, padding)
                                             for c in range(k)]),
                   make(k, batch, cin, hin, hin), make(*per_client_w))
    for block in (b for b in blocks if 1 < b <= k):
        out[f"block {block}"] = (lambda x, w, block=block: fu.block_diagonal_convolution(
            transposed, x, w, stride, padding, block), make(k, batch, cin, hin, hin), make(*per_client_w))
    if fu.triton_can_convolve(transposed, (batch, cin, hin, hin), weight_shape, stride, padding, torch.device(DEVICE)):
        out["triton"] = (lambda x, w: fu.TritonClientConvolution.apply(x, w, transposed, stride, padding),
                         make(k, batch, cin, hin, hin), make(*per_client_w))
    if transposed and hin == 1:  # (K, B, cin) @ (K, cin, cout*size*size): a 1x1 input spread over the kernel
        out["bmm"] = (lambda x, w: torch.bmm(x, w), make(k, batch, cin), make(k, cin, cout * size * size))
    if not transposed and size == hin and padding == 0:  # the kernel covers the whole map: (K, B, cin*H*W) @ w
        out["bmm"] = (lambda x, w: torch.bmm(x, w), make(k, batch, cin * hin * hin), make(k, cin * hin * hin, cout))
    return out


def replay_ms(fn, x, w, iterations: int = 10, repeats: int = 5) -> float:
    """Median milliseconds of one forward + backward, from a CUDA graph of `iterations` of them."""
    grad_out = torch.randn_like(fn(x, w))

    def body():
        for _ in range(iterations):
            torch.autograd.grad(fn(x, w), (x, w), grad_out)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iterations)
    return statistics.median(times)


def sweep_tiles(layers, ks: list[int], batch: int, path: Path) -> None:
    """Time the Triton form of the layers with each candidate tile shape for each kernel; write the fastest to
    `path`."""
    default = dict(triton_conv.TRITON_TILES)
    totals = {}
    for kernel in default:
        for tiles in CANDIDATE_TILES:
            triton_conv.TRITON_TILES.update(default, **{kernel: tiles})
            for k in ks:
                for dtype in (torch.float32, torch.bfloat16):
                    for layer in layers:
                        form = forms(layer, k, batch, dtype, []).get("triton")
                        if form is None:
                            continue
                        try:
                            ms = replay_ms(*form)
                        except Exception as error:  # e.g. more shared memory than the GPU has: not a candidate
                            print(f"tiles {kernel} {tiles}: failed ({type(error).__name__}: {error})"[:300])
                            ms = float("inf")
                        totals[kernel, tiles] = totals.get((kernel, tiles), 0.0) + ms
                        print(f"tiles {kernel:<12} {str(tiles):<22} K={k:<4} {str(dtype).removeprefix('torch.'):<9} "
                              f"{layer[0]:<24} {ms:.3f} ms")
    triton_conv.TRITON_TILES.update(default)
    best = {kernel: min((tiles for (name, tiles) in totals if name == kernel), key=lambda t: totals[kernel, t])
            for kernel in default}
    for kernel, tiles in best.items():
        print(f"fastest {kernel}: {tiles} ({totals[kernel, tiles]:.3f} ms over the cases, "
              f"{totals.get((kernel, default[kernel]), float('nan')):.3f} with the default {default[kernel]})")
    path.write_text(json.dumps(best, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default="10,100", help="comma-separated client counts")
    parser.add_argument("--batch", type=int, default=64, help="images per client")
    parser.add_argument("--layers", default=",".join(layer[0].split()[0] for layer in LAYERS),
                        help="comma-separated layers to time, by their first word (G1..G3, D1..D3)")
    parser.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated forms to time, of {FORMS} "
                        "('one model' always: the ratios are to it)")
    parser.add_argument("--blocks", default="2,5,10,25,50,100", help="clients a group for the block forms")
    parser.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")
    parser.add_argument("--sweep-tiles", type=Path, default=None,
                        help="also time the Triton form's candidate tiles; write the fastest to this JSON file")
    args = parser.parse_args()
    layers = [layer for layer in LAYERS if layer[0].split()[0] in args.layers.split(",")]
    wanted = set(args.forms.split(",")) | {"one model"}
    blocks = [int(b) for b in args.blocks.split(",")]
    if not torch.cuda.is_available():
        raise SystemExit("probe_conv_forms.py times CUDA kernels: it needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | batch {args.batch} a client | TF32 on | "
          "ms per forward + backward (median of graph replays); ratio: form / one model")
    rows = []
    for k in (int(k) for k in args.ks.split(",")):
        for dtype in (torch.float32, torch.bfloat16):
            for layer in layers:
                timed = {name: replay_ms(*form) for name, form in forms(layer, k, args.batch, dtype, blocks).items()
                         if name in wanted or name.startswith("block ") and "block" in wanted}
                base = timed["one model"]
                print(f"K={k:<4} {str(dtype).removeprefix('torch.'):<9} {layer[0]:<24} "
                      + "  ".join(f"{name} {ms:.3f} ({ms / base:.2f})" for name, ms in timed.items()))
                rows += [{"K": k, "dtype": str(dtype), "layer": layer[0], "form": name, "ms": ms} for name, ms in
                         timed.items()]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.sweep_tiles:
        sweep_tiles(layers, [int(k) for k in args.ks.split(",")], args.batch, args.sweep_tiles)


if __name__ == "__main__":
    main()
