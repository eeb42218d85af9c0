"""How local training computes: bfloat16 convolutions, and cuDNN's choice of algorithms."""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fedgan.engine.stacked import map_tensors
from fedgan.environment import warn

Tensor = torch.Tensor


@contextlib.contextmanager
def cudnn_algorithms(deterministic: bool):
    """EngineOptions.deterministic: cuDNN restricted to deterministic algorithms chosen by its heuristics, so that
    the same seed gives the same result on a GPU; or autotuned (cudnn.benchmark): the fastest it times,
    deterministic or not."""
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = deterministic, not deterministic
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


class BFloat16Compute(TorchFunctionMode):
    """EngineOptions.bfloat16: convolutions and linear layers in bfloat16, batch norm and the rest in float32.

    What torch.autocast does, but at the Python level, where vmap cannot bypass it: under vmap on a CPU,
    autocast leaves convolutions in float32 (the batching rule calls an op autocast does not list).
    bfloat16 has float32's exponent range, so no loss scaling is needed; parameters and gradients stay
    float32 (the casts are differentiable).
    """

    LOW_PRECISION = (F.conv2d, F.conv_transpose2d, F.linear)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.LOW_PRECISION:
            args, kwargs = _cast_floats((args, kwargs), torch.bfloat16)
        elif func is F.batch_norm:
            args = (args[0].float(), *args[1:])
        return func(*args, **kwargs)


def _cast_floats(tree: Any, dtype: torch.dtype) -> Any:
    return map_tensors(tree, lambda t: t.to(dtype) if t.is_floating_point() else t)


def bfloat16_compute(enabled: bool) -> contextlib.AbstractContextManager:
    return BFloat16Compute() if enabled else contextlib.nullcontext()


def warn_if_slow_bfloat16(enabled: bool, device: torch.device) -> None:
    """bfloat16 on a GPU before Ampere: a one-line warning that it is likely slower there than float32."""
    if enabled and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        warn(f"engine.bfloat16 on a {torch.cuda.get_device_name(device)}: GPUs before Ampere (e.g. Kaggle's T4 and "
             "P100) have no bfloat16 tensor cores, so it is likely slower than float32 there")
