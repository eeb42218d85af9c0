"""How local training computes (fedgan/engine/precision.py): bfloat16, cuDNN's algorithms."""
import pytest
import torch

import fedgan_utils as fu
from conftest import with_engine
from helpers import train_tiny


class CudnnFlagsAtConvolutions(torch.utils._python_dispatch.TorchDispatchMode):
    """cuDNN's (deterministic, benchmark) flags as each convolution and its backward run."""

    def __init__(self):
        super().__init__()
        self.flags = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default):
            self.flags.add((torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("deterministic", [True, False])
def test_local_training_sets_cudnns_algorithm_choice_for_its_convolutions_and_restores_it(mnist_small, tiny_config,
                                                                                          deterministic):
    images, labels = mnist_small
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = not deterministic, deterministic  # the other way round, to be undone
    try:
        with CudnnFlagsAtConvolutions() as seen:
            train_tiny(with_engine(tiny_config(), deterministic=deterministic), images, labels)
        assert seen.flags == {(deterministic, not deterministic)}  # forward and backward alike
        assert (cudnn.deterministic, cudnn.benchmark) == (not deterministic, deterministic)
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


def test_bfloat16_compute_runs_convolutions_in_bf16_and_batch_norm_in_float32_also_under_vmap():
    conv, norm = torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False)
    x = torch.randn(3, 5, 2, 8, 8)  # (K, B, C, H, W)

    def layers(x):
        convolved = conv(x)
        return convolved, norm(convolved)
    with fu.BFloat16Compute():
        for convolved, normed in (layers(x[0]), torch.func.vmap(layers)(x)):
            assert convolved.dtype == torch.bfloat16 and normed.dtype == torch.float32
    assert conv(x[0]).dtype == torch.float32  # only inside the mode
    assert conv.weight.dtype == torch.float32
