"""pick_device, seed_everything, env_report."""
import random

import numpy as np
import pytest
import torch

import fedgan_utils as fu


@pytest.mark.parametrize("capability,arch_list,supported", [
    ((6, 0), ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], False),  # Kaggle P100 on a current build
    ((7, 5), ["sm_70", "sm_75", "sm_80"], True),  # T4
    ((8, 9), ["sm_80", "sm_86"], True),  # same major, newer minor: the sm_86 cubin runs
    ((9, 0), ["sm_80", "sm_86"], False),  # a newer major needs PTX
    ((9, 0), ["sm_80", "compute_80"], True),  # PTX is JIT-compiled for newer GPUs
    ((6, 1), ["sm_50", "sm_60", "sm_70"], True),
])
def test_cuda_arch_supported_follows_cubin_and_ptx_compatibility(capability, arch_list, supported):
    assert fu.cuda_arch_supported(capability, arch_list) is supported


def test_pick_device_gives_a_device_that_runs_a_kernel():
    device = fu.pick_device()
    assert (torch.ones(2, device=device) * 2).sum().item() == 4.0
    assert fu.pick_device("cpu") == torch.device("cpu")


def test_pick_device_rejects_unknown_names():
    with pytest.raises(ValueError, match="device='tpu' is not known"):
        fu.pick_device("tpu")


def test_seed_everything_makes_python_numpy_and_torch_repeat():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()
    fu.seed_everything(3)
    first = draw()
    fu.seed_everything(3)
    assert draw() == first


def test_env_report_has_every_field():
    report = fu.env_report()
    assert {"python", "torch", "torchvision", "cuda", "cudnn", "gpu", "driver"} <= report.keys()
    assert report["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert report["cuda"] is None and report["gpu"] is None and report["driver"] is None


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    fu.seed_everything(5)
    path = fu.save_checkpoint(tmp_path / "rng.pt", {"rng": fu.rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    fu.seed_everything(99)
    fu.set_rng_state(fu.load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_asking_for_cuda_without_it_falls_back_to_cpu_with_one_line(capsys):
    if torch.cuda.is_available():
        assert fu.pick_device("cuda").type == "cuda"
        return
    assert fu.pick_device("cuda") == torch.device("cpu")
    assert capsys.readouterr().err == "warning: device='cuda' asked for, but CUDA is not available: using CPU\n"
