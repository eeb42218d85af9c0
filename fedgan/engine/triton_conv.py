"""Triton kernels for K clients' convolutions, with their backward."""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

try:  # Triton comes with torch's CUDA builds; without it (CPU-only torch) the Triton convolutions are not used
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

Tensor = torch.Tensor


# vmap makes K clients' convolution one grouped convolution (groups=K), which cuDNN runs slowly where a client has
# 1 or 2 channels on a side (D's first layer, G's last). These kernels compute it as K implicit matrix products, one
# client per slice of the grid, with each client's weights: no im2col buffer, no block-diagonal zeros. Three
# kernels serve a convolution and a transposed one (the input gradient of a convolution): the forward, the input
# gradient and the weight gradient. Tensors are each client's contiguous NCHW: x (K, B, Cin, H, W), weight
# (K, Cout, Cin, kh, kw), output (K, B, Cout, H', W'). They are used for the thin layers only: for the wide ones
# cuDNN's grouped convolutions are faster (benchmarks/RESULTS.md).


def _triton_jit(fn):
    return triton.jit(fn) if triton is not None else fn


TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests): any device
# kernel -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); benchmarks/probe_conv_forms.py times others
TRITON_TILES: dict[str, tuple[int, int, int, int, int]] = {
    "forward": (128, 64, 32, 4, 3), "input_grad": (128, 64, 32, 4, 3), "weight_grad": (64, 64, 32, 4, 3)}


@_triton_jit
def _conv_forward_kernel(x_ptr, w_ptr, y_ptr, batch, cin, height, width, cout, out_h, out_w,
                         STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         PRECISION: tl.constexpr):
    """y[b, co, oh, ow] = sum over (ci, kh, kw) of x[b, ci, oh*S - P + kh, ow*S - P + kw] w[co, ci, kh, kw]:
    rows (b, oh, ow), columns co, reduction (ci, kh, kw); the image patches are gathered, never stored."""
    pid_m, pid_n, client = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows, reduction = batch * out_h * out_w, cin * KH * KW
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b, oh, ow = m // (out_h * out_w), (m // out_w) % out_h, m % out_w
    x_ptr += client * batch * cin * height * width
    w_ptr += client * cout * reduction
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, reduction, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)
        ci, kh, kw = r // (KH * KW), (r // KW) % KH, r % KW
        ih = oh[:, None] * STRIDE - PAD + kh[None, :]  # (BLOCK_M, BLOCK_K)
        iw = ow[:, None] * STRIDE - PAD + kw[None, :]
        inside = ((m[:, None] < rows) & (r[None, :] < reduction)
                  & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width))
        patches = tl.load(x_ptr + ((b[:, None] * cin + ci[None, :]) * height + ih) * width + iw, mask=inside,
                          other=0.0)
        weights = tl.load(w_ptr + n[None, :] * reduction + r[:, None],
                          mask=(n[None, :] < cout) & (r[:, None] < reduction), other=0.0)  # (BLOCK_K, BLOCK_N)
        acc = tl.dot(patches, weights, acc, input_precision=PRECISION)
    y_ptr += client * batch * cout * out_h * out_w
    out = y_ptr + ((b[:, None] * cout + n[None, :]) * out_h + oh[:, None]) * out_w + ow[:, None]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(m[:, None] < rows) & (n[None, :] < cout))


@_triton_jit
def _conv_input_grad_kernel(gy_ptr, w_ptr, gx_ptr, batch, cin, height, width, cout, out_h, out_w,
                            STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            PRECISION: tl.constexpr):
    """gx[b, ci, ih, iw] = sum of gy[b, co, oh, ow] w[co, ci, kh, kw] over ih = oh*S - P + kh (and so for w).

    With stride S, an input pixel meets only every S-th kernel row and column: the pixels of one phase
    (ih % S, iw % S) meet the same (KH/S) x (KW/S) taps, so each phase (grid dim 2: client * S*S + phase) is a
    stride-1 product with rows (b, ih // S, iw // S) and reduction (co, tap row, tap column). Needs H, W, KH and
    KW divisible by S."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    client, phase = (tl.program_id(2) // (STRIDE * STRIDE)).to(tl.int64), tl.program_id(2) % (STRIDE * STRIDE)
    TH: tl.constexpr = KH // STRIDE
    TW: tl.constexpr = KW // STRIDE
    phase_h, phase_w = phase // STRIDE, phase % STRIDE
    first_kh, first_kw = (phase_h + PAD) % STRIDE, (phase_w + PAD) % STRIDE  # the phase's first tap
    shift_h, shift_w = (phase_h + PAD - first_kh) // STRIDE, (phase_w + PAD - first_kw) // STRIDE
    part_h, part_w = height // STRIDE, width // STRIDE
    rows, reduction = batch * part_h * part_w, cout * TH * TW
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b, i, j = m // (part_h * part_w), (m // part_w) % part_h, m % part_w
    gy_ptr += client * batch * cout * out_h * out_w
    w_ptr += client * cout * cin * KH * KW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, reduction, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)
        co, t, u = r // (TH * TW), (r // TW) % TH, r % TW
        oh = i[:, None] + shift_h - t[None, :]  # (BLOCK_M, BLOCK_K)
        ow = j[:, None] + shift_w - u[None, :]
        inside = ((m[:, None] < rows) & (r[None, :] < reduction)
                  & (oh >= 0) & (oh < out_h) & (ow >= 0) & (ow < out_w))
        grads = tl.load(gy_ptr + ((b[:, None] * cout + co[None, :]) * out_h + oh) * out_w + ow, mask=inside,
                        other=0.0)
        kh, kw = first_kh + STRIDE * t, first_kw + STRIDE * u
        weights = tl.load(w_ptr + ((co[:, None] * cin + n[None, :]) * KH + kh[:, None]) * KW + kw[:, None],
                          mask=(r[:, None] < reduction) & (n[None, :] < cin), other=0.0)  # (BLOCK_K, BLOCK_N)
        acc = tl.dot(grads, weights, acc, input_precision=PRECISION)
    gx_ptr += client * batch * cin * height * width
    ih, iw = i * STRIDE + phase_h, j * STRIDE + phase_w
    out = gx_ptr + ((b[:, None] * cin + n[None, :]) * height + ih[:, None]) * width + iw[:, None]
    tl.store(out, acc.to(gx_ptr.dtype.element_ty), mask=(m[:, None] < rows) & (n[None, :] < cin))


@_triton_jit
def _conv_weight_grad_kernel(x_ptr, gy_ptr, partial_ptr, batch, cin, height, width, cout, out_h, out_w, chunk,
                             STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             PRECISION: tl.constexpr):
    """partial[split, co, (ci, kh, kw)] = sum over the split's chunk of (b, oh, ow) of gy[b, co, oh, ow]
    x[b, ci, oh*S - P + kh, ow*S - P + kw]. Splitting the long reduction gives a small layer enough programs;
    the caller sums the splits (no atomics: the same sum in the same order every run)."""
    tile, split, client = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    columns, positions = cin * KH * KW, out_h * out_w
    length = batch * positions
    pid_m, pid_n = tile // tl.cdiv(columns, BLOCK_N), tile % tl.cdiv(columns, BLOCK_N)
    co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci, kh, kw = r // (KH * KW), (r // KW) % KH, r % KW
    x_ptr += client * batch * cin * height * width
    gy_ptr += client * batch * cout * positions
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    for l0 in range(start, end, BLOCK_K):
        l = l0 + tl.arange(0, BLOCK_K)
        b, pos = l // positions, l % positions
        grads = tl.load(gy_ptr + (b[None, :] * cout + co[:, None]) * positions + pos[None, :],
                        mask=(co[:, None] < cout) & (l[None, :] < end), other=0.0)  # (BLOCK_M, BLOCK_K)
        ih = (pos // out_w)[:, None] * STRIDE - PAD + kh[None, :]  # (BLOCK_K, BLOCK_N)
        iw = (pos % out_w)[:, None] * STRIDE - PAD + kw[None, :]
        inside = ((l[:, None] < end) & (r[None, :] < columns)
                  & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width))
        patches = tl.load(x_ptr + ((b[:, None] * cin + ci[None, :]) * height + ih) * width + iw, mask=inside,
                          other=0.0)
        acc = tl.dot(grads, patches, acc, input_precision=PRECISION)
    partial_ptr += (client * tl.num_programs(1) + split) * cout * columns
    tl.store(partial_ptr + co[:, None] * columns + r[None, :], acc, mask=(co[:, None] < cout) & (r[None, :] < columns))


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 products in TF32 where cuDNN's convolutions may use it (torch.backends.cudnn.allow_tf32), as the
    grouped convolutions these kernels replace would; else exact."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


def _tiles(name: str, rows: int, columns: int, depth: int) -> tuple[int, int, int, int, int]:
    """TRITON_TILES[name], each block cut to its dimension of the product (a power of two, at least tl.dot's 16):
    a thin layer's 1 or 2 channels fill no 64-wide tile."""
    block_m, block_n, block_k, warps, stages = TRITON_TILES[name]

    def fit(block: int, size: int) -> int:
        return min(block, max(16, triton.next_power_of_2(size)))
    return fit(block_m, rows), fit(block_n, columns), fit(block_k, depth), warps, stages


def _launch(kernel, tiles: tuple[int, int, int, int, int], grid: tuple[int, int, int], *args, stride: int,
            padding: int, size: tuple[int, int], dtype: torch.dtype) -> None:
    block_m, block_n, block_k, warps, stages = tiles
    kernel[grid](*args, stride, padding, *size, block_m, block_n, block_k, _dot_precision(dtype), num_warps=warps,
                 num_stages=stages)


def _conv_output_size(size: Sequence[int], kernel: Sequence[int], stride: int, padding: int) -> tuple[int, ...]:
    """(H', W') of a convolution of an (H, W) input (any number of sides)."""
    return tuple((side + 2 * padding - k) // stride + 1 for side, k in zip(size, kernel))


def _transposed_output_size(size: Sequence[int], kernel: Sequence[int], stride: int, padding: int) -> tuple[int, ...]:
    """(H', W') of a transposed convolution of an (H, W) input (any number of sides): the input size of the
    convolution it inverts."""
    return tuple((side - 1) * stride - 2 * padding + k for side, k in zip(size, kernel))


def pair(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def triton_conv_forward(x: Tensor, weight: Tensor, stride: int, padding: int) -> Tensor:
    """K clients' convolutions: x (K, B, Cin, H, W), weight (K, Cout, Cin, kh, kw) -> (K, B, Cout, H', W')."""
    clients, batch, cin, height, width = x.shape
    cout, _, kh, kw = weight.shape[1:]
    out_h, out_w = _conv_output_size((height, width), (kh, kw), stride, padding)
    y = x.new_empty(clients, batch, cout, out_h, out_w)
    rows = batch * out_h * out_w
    tiles = _tiles("forward", rows, cout, cin * kh * kw)
    _launch(_conv_forward_kernel, tiles, (triton.cdiv(rows, tiles[0]), triton.cdiv(cout, tiles[1]), clients),
            x, weight, y, batch, cin, height, width, cout, out_h, out_w,
            stride=stride, padding=padding, size=(kh, kw), dtype=x.dtype)
    return y


def triton_conv_input_grad(grad: Tensor, weight: Tensor, stride: int, padding: int,
                           input_size: tuple[int, int]) -> Tensor:
    """The input gradient of K clients' convolutions (= their transposed convolutions of `grad`):
    grad (K, B, Cout, H', W'), weight (K, Cout, Cin, kh, kw) -> (K, B, Cin, *input_size)."""
    clients, batch, cout, out_h, out_w = grad.shape
    cin, kh, kw = weight.shape[2:]
    height, width = input_size
    gx = grad.new_empty(clients, batch, cin, height, width)
    rows = batch * (height // stride) * (width // stride)  # of one phase
    tiles = _tiles("input_grad", rows, cin, cout * (kh // stride) * (kw // stride))
    _launch(_conv_input_grad_kernel, tiles,
            (triton.cdiv(rows, tiles[0]), triton.cdiv(cin, tiles[1]), clients * stride * stride),
            grad, weight, gx, batch, cin, height, width, cout, out_h, out_w,
            stride=stride, padding=padding, size=(kh, kw), dtype=grad.dtype)
    return gx


def _processors(device: torch.device) -> int:  # off a GPU (Triton's interpreter) any small number does
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def triton_conv_weight_grad(x: Tensor, grad: Tensor, stride: int, padding: int,
                            kernel_size: tuple[int, int]) -> Tensor:
    """The weight gradient of K clients' convolutions: x (K, B, Cin, H, W), grad (K, B, Cout, H', W') ->
    (K, Cout, Cin, kh, kw), in x's dtype. The reduction over B x H' x W' is split until the grid has about two
    programs a multiprocessor (the split depends only on the shapes and the GPU, so the result is the same every
    run)."""
    clients, batch, cin, height, width = x.shape
    cout, out_h, out_w = grad.shape[2:]
    kh, kw = kernel_size
    length = batch * out_h * out_w
    tiles = _tiles("weight_grad", cout, cin * kh * kw, length)
    block_m, block_n, block_k = tiles[:3]
    programs = triton.cdiv(cout, block_m) * triton.cdiv(cin * kh * kw, block_n)  # a client's
    splits = max(1, min(triton.cdiv(2 * _processors(x.device), clients * programs), length // (8 * block_k)))
    chunk = triton.cdiv(triton.cdiv(length, splits), block_k) * block_k
    splits = triton.cdiv(length, chunk)
    partial = x.new_empty(clients, splits, cout, cin * kh * kw, dtype=torch.float32)
    _launch(_conv_weight_grad_kernel, tiles, (programs, splits, clients),
            x, grad, partial, batch, cin, height, width, cout, out_h, out_w, chunk,
            stride=stride, padding=padding, size=(kh, kw), dtype=x.dtype)
    return partial.sum(1).to(x.dtype).view(clients, cout, cin, kh, kw)


def triton_can_convolve(transposed: bool, x_size: Sequence[int], weight_size: Sequence[int], stride: Any,
                        padding: Any, device: torch.device) -> bool:
    """Whether the kernels take this convolution (one client's sizes: x (B, C, H, W), weight): Triton present, a
    CUDA device (or Triton's interpreter), square stride and padding, kernel and the convolution's input size (the
    output of a transposed one) divisible by the stride."""
    if triton is None or not (device.type == "cuda" or TRITON_INTERPRETED):
        return False
    (s, s2), (p, p2), (kh, kw) = pair(stride), pair(padding), weight_size[2:]
    if s != s2 or p != p2:
        return False
    height, width = _transposed_output_size(x_size[-2:], (kh, kw), s, p) if transposed else x_size[-2:]
    return all(v % s == 0 for v in (kh, kw, height, width))


class TritonClientConvolution(torch.autograd.Function):
    """K clients' convolutions (or transposed ones) in the Triton kernels above, with their backward:
    x (K, B, Cin, H, W) contiguous, weight (K, *one client's weight) contiguous -> (K, B, Cout, H', W')."""

    @staticmethod
    def forward(x, weight, transposed, stride, padding):
        if transposed:  # the input gradient of the convolution from the output's size to x's: weight (Cin, Cout)
            size = _transposed_output_size(x.shape[-2:], weight.shape[-2:], stride, padding)
            return triton_conv_input_grad(x, weight, stride, padding, size)
        return triton_conv_forward(x, weight, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, ctx.transposed, ctx.stride, ctx.padding = inputs
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad, stride, padding, size = grad.contiguous(), ctx.stride, ctx.padding, tuple(weight.shape[-2:])
        grad_x = grad_weight = None
        if ctx.transposed:  # x plays the convolution's output, grad its input
            if ctx.needs_input_grad[0]:
                grad_x = triton_conv_forward(grad, weight, stride, padding)
            if ctx.needs_input_grad[1]:
                grad_weight = triton_conv_weight_grad(grad, x, stride, padding, size)
        else:
            if ctx.needs_input_grad[0]:
                grad_x = triton_conv_input_grad(grad, weight, stride, padding, tuple(x.shape[-2:]))
            if ctx.needs_input_grad[1]:
                grad_weight = triton_conv_weight_grad(x, grad, stride, padding, size)
        return grad_x, grad_weight, None, None, None
