"""The forms K clients' thin convolutions can take under vmap (EngineOptions.conv_form)."""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fedgan.config import EngineOptions
from fedgan.engine.precision import bfloat16_compute
from fedgan.engine.triton_conv import TritonClientConvolution, pair, triton, triton_can_convolve

Tensor = torch.Tensor


def _convolution(transposed: bool, x: Tensor, weight: Tensor, stride, padding, groups: int = 1) -> Tensor:
    op = F.conv_transpose2d if transposed else F.conv2d
    return op(x, weight, stride=stride, padding=padding, groups=groups)


def _clients_first(t: Tensor, dim: int | None, clients: int) -> Tensor:
    """A physical tensor under vmap with its client dim moved to the front (expanded if it has none)."""
    return t.expand(clients, *t.shape) if dim is None else t.movedim(dim, 0)


def block_diagonal_convolution(transposed: bool, x: Tensor, weight: Tensor, stride: int | Sequence[int],
                               padding: int | Sequence[int], block: int) -> Tensor:
    """K clients' convolutions as one grouped convolution whose groups each hold `block` clients' weights on the
    diagonal of a dense kernel (zeros elsewhere): `block` times the arithmetic of K separate convolutions in
    ceil(K / block) groups instead of K. block=1 is vmap's own grouped convolution.

    x (K, B, Cin, H, W), weight (K, *one client's weight) -> (B, K, Cout, H', W'), the client dim second as
    vmap's grouped convolution leaves it. Clients beyond a multiple of `block` are padded with zeros.
    """
    clients, batch = x.shape[:2]
    block = min(block, clients)
    groups = -(-clients // block)
    padded = groups * block - clients
    if padded:
        x = F.pad(x, (0, 0) * (x.dim() - 1) + (0, padded))
        weight = F.pad(weight, (0, 0) * (weight.dim() - 1) + (0, padded))
    x = x.transpose(0, 1).reshape(batch, -1, *x.shape[3:])  # (B, K*Cin, H, W): client k's channels in group k
    first, second = weight.shape[1:3]  # (Cout, Cin) of a convolution, (Cin, Cout) of a transposed one
    diagonal = torch.eye(block, dtype=weight.dtype, device=weight.device).view(1, block, 1, block, 1, 1, 1)
    kernel = weight.view(groups, block, first, 1, second, *weight.shape[3:]) * diagonal  # (G, b, A, b, A', kh, kw)
    kernel = kernel.reshape(groups * block * first, block * second, *weight.shape[3:])
    out = _convolution(transposed, x, kernel, stride, padding, groups)  # (B, G*b*Cout, H', W')
    out = out.view(batch, groups * block, -1, *out.shape[2:])  # (B, G*b, Cout, H', W')
    return out[:, :clients] if padded else out  # (B, K, Cout, H', W')


class _ClientConvolution(torch.autograd.Function):
    """One client's convolution whose vmap rule computes all K clients' in a chosen form (ClientConvolutions).

    Only applied under vmap. The rule works on the physical tensors with differentiable torch ops (or
    TritonClientConvolution), which autograd records, so the Function needs no backward of its own.
    """

    @staticmethod
    def forward(x, weight, transposed, stride, padding, form, block):
        return _convolution(transposed, x, weight, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, x, weight, transposed, stride, padding, form, block):
        clients = info.batch_size
        x, weight = _clients_first(x, in_dims[0], clients), _clients_first(weight, in_dims[1], clients)
        if form == "loop":  # K plain convolutions
            return torch.stack([_convolution(transposed, x[k], weight[k], stride, padding)
                                for k in range(clients)]), 0
        if form == "triton":
            return TritonClientConvolution.apply(x.contiguous(), weight.contiguous(), transposed, pair(stride)[0],
                                                 pair(padding)[0]), 0
        return block_diagonal_convolution(transposed, x, weight, stride, padding, block), 1


def _plain_convolution_args(func, *args, **kwargs) -> tuple[Tensor, Tensor, Any, Any] | None:
    """(x, weight, stride, padding) of an F.conv2d / F.conv_transpose2d call as nn.Conv2d and nn.ConvTranspose2d
    make it, if it has no bias, groups, dilation or output padding; else None."""
    def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        return input, weight, bias, stride, padding, dilation, groups, 0

    def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
        return input, weight, bias, stride, padding, dilation, groups, output_padding
    x, weight, bias, stride, padding, dilation, groups, output_padding = (
        conv_transpose2d if func is F.conv_transpose2d else conv2d)(*args, **kwargs)
    plain = bias is None and groups == 1 and set(pair(dilation)) == {1} and set(pair(output_padding)) == {0}
    return (x, weight, stride, padding) if plain else None


class ClientConvolutions(TorchFunctionMode):
    """EngineOptions.conv_form: the form K clients' thin convolutions take under vmap.

    vmap runs K clients' convolution as one grouped convolution (groups=K), for which cuDNN picks slow algorithms
    when a group has 1 or 2 channels on a side, as D's first and G's last layer have (benchmarks/RESULTS.md).
    Those layers (at most THIN channels on a side) are computed here as "triton": TritonClientConvolution (where
    triton_can_convolve, else as "grouped"), "block": block-diagonal convolutions over `block` clients at a time
    (block_diagonal_convolution), or "loop": K plain convolutions; "grouped" leaves them to vmap. The same result
    up to rounding. The wider layers stay vmap's, where cuDNN's grouped convolutions are the fastest form.
    Enter it inside the function vmap maps, with nothing but vmap's batched tensors reaching the convolutions.
    """

    THIN = 4

    def __init__(self, form: str, block: int):
        super().__init__()
        self.form, self.block = form, block

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.conv2d, F.conv_transpose2d):
            plain = _plain_convolution_args(func, *args, **kwargs)
            if plain is not None and min(plain[1].shape[:2]) <= self.THIN:
                x, weight, stride, padding = plain
                transposed = func is F.conv_transpose2d
                if self.form != "triton" or triton_can_convolve(transposed, x.shape, weight.shape, stride, padding,
                                                                x.device):
                    return _ClientConvolution.apply(x, weight, transposed, stride, padding, self.form, self.block)
        return func(*args, **kwargs)


AUTO_BLOCK_CLIENTS = 10  # conv_form="auto": up to this many clients (float32) in one block-diagonal convolution


def in_client_compute(fn, engine: EngineOptions, batched: bool, clients: int, device: torch.device):
    """`fn`, a function of one client's slices, run under bfloat16 compute and the thin convolutions' form. bfloat16's
    casts come first (the mode entered last sees a call first), so the forms get bfloat16 tensors."""
    def run(*args):
        with client_convolutions(engine, batched, clients, device), bfloat16_compute(engine.bfloat16):
            return fn(*args)
    return run


def client_convolutions(engine: EngineOptions, batched: bool, clients: int,
                        device: torch.device) -> contextlib.AbstractContextManager:
    """The form of the thin convolutions under vmap (`batched`); the clients as plain models need none.

    "auto" is what measured fastest on an H200 (benchmarks/RESULTS.md): with cuDNN's deterministic algorithms, the
    Triton kernels from 2 clients on a CUDA GPU with Triton, else one block-diagonal convolution of all clients at
    2 to AUTO_BLOCK_CLIENTS clients in float32; vmap's grouped convolutions otherwise (one client, whose convolution
    is a plain one; bfloat16; cuDNN autotuned). "triton" off a GPU computes as "grouped".
    """
    form, block = engine.conv_form, engine.conv_block_clients
    if form == "auto":
        blocked = engine.deterministic and not engine.bfloat16 and 2 <= clients <= AUTO_BLOCK_CLIENTS
        if engine.deterministic and clients >= 2 and device.type == "cuda" and triton is not None:
            form = "triton"
        else:
            form, block = ("block", clients) if blocked else ("grouped", 1)
    if form == "triton" and triton is None and device.type == "cuda":
        raise RuntimeError("conv_form='triton' needs the triton package, which this torch lacks: pip install triton, "
                           "or choose another conv_form")
    if not batched or form == "grouped":
        return contextlib.nullcontext()
    return ClientConvolutions(form, block)
