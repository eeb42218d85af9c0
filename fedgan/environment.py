"""The machine a run is on: the usable device, seeds and RNG states, and a report of versions."""
from __future__ import annotations

import contextlib
import platform
import random
import shutil
import subprocess
import sys
from typing import Any, Mapping, Sequence

import numpy as np
import torch

Tensor = torch.Tensor


def cuda_arch_supported(capability: tuple[int, int], arch_list: Sequence[str]) -> bool:
    """True when a torch build compiled for `arch_list` has kernels for a GPU of `capability`.

    A cubin for sm_XY runs on any GPU of the same major version and minor >= Y; PTX
    (compute_XY) is JIT-compiled for any GPU of capability >= XY.
    """
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit():
            continue
        arch_major, arch_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and arch_major == major and arch_minor <= minor:
            return True
        if kind == "compute" and (arch_major, arch_minor) <= (major, minor):
            return True
    return False


def warn(message: str) -> None:
    """A one-line warning on stderr (warnings.warn would add the source line under it)."""
    print(f"warning: {message}", file=sys.stderr)


def pick_device(preferred: str = "auto") -> torch.device:
    """The best usable device: CUDA when present *and* supported by this torch build, else CPU.

    Kaggle's P100 (sm_60) reports cuda.is_available() with current torch builds and then fails
    on the first kernel, so the GPU's architecture is checked against torch.cuda.get_arch_list().
    """
    if preferred not in ("auto", "cpu") and not preferred.startswith("cuda"):
        raise ValueError(f"device={preferred!r} is not known; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if preferred == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if preferred != "auto":
            warn(f"device={preferred!r} asked for, but CUDA is not available: using CPU")
        return torch.device("cpu")
    device = torch.device("cuda" if preferred == "auto" else preferred)
    index = device.index or 0
    capability = torch.cuda.get_device_capability(index)
    if not cuda_arch_supported(capability, torch.cuda.get_arch_list()):
        name = torch.cuda.get_device_name(index)
        warn(f"{name} (sm_{capability[0]}{capability[1]}) has no kernels in this torch build "
              f"({' '.join(torch.cuda.get_arch_list())}): using CPU")
        return torch.device("cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all CUDA devices included)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device as well


def rng_state() -> dict[str, Any]:
    """The global RNG states (python, numpy, torch, CUDA) as tensors and lists, loadable with weights_only."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what rng_state() saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def env_report() -> dict[str, Any]:
    """Versions and hardware, for the log of a run (None where a component is absent)."""
    import torchvision

    cuda = torch.cuda.is_available()
    driver = None
    if cuda and shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "driver": driver,
        "cpu_threads": torch.get_num_threads(),
    }
