"""Federated conditional DCGAN: the one helper module behind the three FedGAN notebooks.

Sections, top to bottom: environment, config, data, partitioning, models, aggregation (server
rules, update thresholds, FedNova, staleness, compression), privacy (DP-FedAvg and its accountant),
local training engine (selection, stragglers, attackers, the batched clients), metrics, federation
(the round loop, asynchrony, faults, ablation grids), checkpoints, plots. The notebooks import this
module and stay thin; tests import it too (see tests/).

FedAvg is McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS 2017); the conditional DCGAN follows Radford et al. (2016)
and Mirza & Osindero (2014).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gzip
import hashlib
import io
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode

try:  # Triton comes with torch's CUDA builds; without it (CPU-only torch) the Triton convolutions are not used
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

# ----------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------


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


def _warn(message: str) -> None:
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
            _warn(f"device={preferred!r} asked for, but CUDA is not available: using CPU")
        return torch.device("cpu")
    device = torch.device("cuda" if preferred == "auto" else preferred)
    index = device.index or 0
    capability = torch.cuda.get_device_capability(index)
    if not cuda_arch_supported(capability, torch.cuda.get_arch_list()):
        name = torch.cuda.get_device_name(index)
        _warn(f"{name} (sm_{capability[0]}{capability[1]}) has no kernels in this torch build "
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


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    torchvision_class: str  # class name in torchvision.datasets, also its folder name
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    class_names: tuple[str, ...]


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("MNIST", (1, 28, 28), 10, tuple(str(d) for d in range(10))),
    "fashion_mnist": DatasetInfo("FashionMNIST", (1, 28, 28), 10, (
        "T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")),
    "cifar10": DatasetInfo("CIFAR10", (3, 32, 32), 10, (
        "plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")),
}
PARTITIONS = ("iid", "dirichlet", "shards", "classes", "quantity")
BN_POLICIES = ("average", "local")
OPTIMIZER_STATES = ("reset", "keep")
CLIENT_MAPS = ("auto", "vmap", "loop", "streams")
CONV_FORMS = ("auto", "grouped", "block", "loop", "triton")
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "damped", "fedadagrad", "fedadam", "fedyogi", "median",
              "trimmed_mean", "krum")
SELECTIONS = ("uniform", "proportional", "power_of_choice")
SYNC_NETWORKS = ("both", "g", "d")
SYNC_MODES = ("sync", "async")
STALENESS_RULES = ("constant", "polynomial", "hinge")
THRESHOLD_RULES = ("median", "absolute")
THRESHOLD_ACTIONS = ("clip", "drop")
STRAGGLER_POLICIES = ("partial", "drop")
STEP_NORMALISATIONS = ("none", "fednova")
COMPRESSIONS = ("none", "topk", "int8")
ATTACKS = ("none", "sign_flip", "noise", "nan", "label_flip")  # nan: a broken client sending NaN
DP_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "damped", "fedadagrad", "fedadam", "fedyogi")
CHOICES: dict[str, tuple[str, ...]] = {}  # filled below FedConfig: field -> allowed names
PRESETS = ("smoke", "cpu", "full")


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _positive_int(v: Any) -> bool:
    return _is_int(v) and v >= 1


def _non_negative_int(v: Any) -> bool:
    return _is_int(v) and v >= 0


def _finite(v: Any) -> bool:
    return _is_int(v) or math.isfinite(v)  # math.isfinite overflows on ints beyond float range


def _positive_number(v: Any) -> bool:
    return _is_number(v) and _finite(v) and v > 0


_FIELD_RULES: dict[str, tuple[Any, str]] = {  # the numeric fields: a test and what is allowed
    **{name: (_positive_int, "an integer >= 1") for name in (
        "num_clients", "rounds", "batch_size", "z_dim", "embed_dim", "ngf", "ndf", "shards_per_client",
        "classes_per_client")},
    **{name: (_non_negative_int, "an integer >= 0") for name in ("min_size", "checkpoint_every", "seed")},
    **{name: (lambda v: v is None or _positive_int(v), "None or an integer >= 1")
       for name in ("local_steps", "train_subset", "classifier_subset")},
    "eval_every": (lambda v: v is None or _non_negative_int(v), "None (never), 0 (after the last round) or N >= 1"),
    "server_lr": (lambda v: v is None or _positive_number(v), "None (the rule's default) or a number > 0"),
    **{name: (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")
       for name in ("server_momentum", "server_beta2")},
    "server_tau": (_positive_number, "a number > 0"),
    **{name: (lambda v: v is None or _positive_number(v), "None or a number > 0")
       for name in ("update_threshold", "round_deadline")},
    "prox_mu": (lambda v: v is None or (_is_number(v) and _finite(v) and v >= 0), "None or a number >= 0"),
    **{name: (lambda v: v is None or _positive_int(v), "None or an integer >= 1")
       for name in ("poc_candidates", "async_buffer")},
    "dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "topk_fraction": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "staleness_a": (lambda v: _is_number(v) and _finite(v) and v >= 0, "a number >= 0"),
    "staleness_b": (_non_negative_int, "an integer >= 0"),
    **{name: (lambda v: isinstance(v, bool), "True or False")
       for name in ("error_feedback", "server_generator", "amp", "cuda_graphs", "deterministic")},
    "conv_block_clients": (_positive_int, "an integer >= 1"),
    "attack_fraction": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "attack_scale": (_positive_number, "a number > 0"),
    "min_clients": (_positive_int, "an integer >= 1"),
    "watchdog_rounds": (_non_negative_int, "an integer >= 0 (0: off)"),
    "collapse_loss": (lambda v: _is_number(v) and _finite(v) and v >= 0, "a number >= 0"),
    "dp_clip": (lambda v: v is None or _positive_number(v), "None (no DP) or a number > 0"),
    "dp_noise_multiplier": (lambda v: _is_number(v) and _finite(v) and v >= 0, "a number >= 0"),
    "dp_delta": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "server_g_steps": (lambda v: v is None or _positive_int(v), "None or an integer >= 1"),
    "trim_beta": (lambda v: _is_number(v) and 0 <= v < 0.5, "a number in [0, 0.5)"),
    "krum_f": (_non_negative_int, "an integer >= 0"),
    "krum_m": (_positive_int, "an integer >= 1"),
    "eval_samples": (lambda v: _is_int(v) and v >= 10, "an integer >= 10"),
    "classifier_epochs": (_positive_int, "an integer >= 1"),
    **{name: (_positive_number, "a number > 0") for name in ("lr_g", "lr_d", "local_epochs", "alpha")},
    **{name: (lambda v: _is_number(v) and _finite(v) and v >= 0, "a number >= 0")
       for name in ("sigma", "client_speed_sigma")},
    "client_fraction": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
}


def _check_field(name: str, value: Any) -> None:
    ok, allowed = _FIELD_RULES[name]
    _require(ok(value), name, value, allowed)


@dataclass
class FedConfig:
    """Every knob of a federated cDCGAN run; validated on construction."""

    # data
    dataset: str = "mnist"  # one of DATASETS
    data_root: str | None = None  # folder holding the dataset; None: FEDGAN_DATA, ./data, /kaggle/input
    train_subset: int | None = None  # use only this many training images (seeded choice); None: all
    # federation
    num_clients: int = 10  # K simulated clients
    rounds: int = 20  # communication rounds
    client_fraction: float = 1.0  # fraction of clients selected each round, in (0, 1]
    local_epochs: float = 1.0  # passes over its own data a client makes per round
    local_steps: int | None = None  # if set, a fixed number of local steps instead of local_epochs
    bn_policy: str = "average"  # BatchNorm under aggregation: "average" (FedAvg) or "local" (FedBN)
    optimizer_state: str = "reset"  # client Adam state each round: "reset" or "keep" (per client)
    client_map: str = "auto"  # clients as one batch: "vmap", "loop" (map_clients), "streams" (the loop, clients
    # side by side on CUDA streams), "auto" (loop on a CPU; on a CUDA GPU streams, vmap for clients of unequal
    # step counts: resolved_client_map)
    amp: bool = False  # local training's convolutions in bfloat16, the rest float32 (speed; changes results slightly)
    cuda_graphs: bool = True  # on a CUDA GPU, replay each local step from a CUDA graph (same result, fewer launches)
    conv_form: str = "auto"  # under vmap, the thin convolutions (<= 4 channels a side): CONV_FORMS, ClientConvolutions
    conv_block_clients: int = 10  # conv_form="block": clients per block-diagonal convolution ("auto" picks its own)
    deterministic: bool = True  # GPU: cuDNN's deterministic algorithms (same seed, same result); False: autotuned
    # server rule (see the Aggregation section)
    strategy: str = "fedavg"  # one of STRATEGIES (or pass a Strategy object to Federation)
    server_lr: float | None = None  # server learning rate; None: 1.0 fedavgm, 0.5 damped (its alpha), 1e-2 adaptive
    server_momentum: float = 0.9  # fedavgm's momentum; beta1 of fedadagrad, fedadam, fedyogi
    server_beta2: float = 0.99  # beta2 of fedadam and fedyogi
    server_tau: float = 1e-3  # adaptivity floor tau of the adaptive rules
    trim_beta: float = 0.1  # trimmed_mean: fraction of clients cut at each end
    krum_f: int = 1  # krum: clients assumed faulty
    krum_m: int = 1  # krum: clients kept (m > 1: Multi-Krum)
    prox_mu: float | None = None  # proximal term (mu/2)|w - w_global|^2 in local losses; None: 0.01 fedprox, else 0
    update_threshold: float | None = None  # clip or drop client updates with a larger L2 norm; None: off
    threshold_rule: str = "median"  # update_threshold is "absolute" or a multiple of the round's "median" norm
    threshold_action: str = "clip"  # "clip" scales an update down to the threshold, "drop" leaves it out
    # what is synchronised (FedGAN: both networks, every local_steps steps; the rest stays on the clients)
    sync_networks: str = "both"  # "both", "g" or "d": networks not synchronised stay local to each client
    sync_mode: str = "sync"  # "sync" rounds, or "async": buffered staleness-weighted updates (FedBuff)
    async_buffer: int | None = None  # async: arrivals per server update; None: half the clients in flight
    staleness: str = "polynomial"  # async weight of an update s rounds old: constant, polynomial, hinge
    staleness_a: float = 0.5  # polynomial: (1 + s)^-a; hinge: 1 / (a (s - b) + 1) past b
    staleness_b: int = 4  # hinge: updates up to b rounds stale count fully
    # clients: selection, stragglers, communication
    selection: str = "uniform"  # "uniform", "proportional" (to data size), "power_of_choice" (highest loss)
    poc_candidates: int | None = None  # power_of_choice: candidates drawn (proportional to size); None: 2x selected
    client_speed_sigma: float = 0.0  # lognormal sigma of client speeds (0: all equally fast)
    round_deadline: float | None = None  # time limit of a round, in local steps of a speed-1 client; None: wait
    straggler_policy: str = "partial"  # past the deadline: "partial" (the steps that fit) or "drop"
    step_normalisation: str = "none"  # "fednova": normalise updates by local steps before aggregation
    dropout: float = 0.0  # probability that a selected client does not report back
    compression: str = "none"  # client updates sent as "none" (float32), "topk" sparse, or "int8"
    topk_fraction: float = 0.01  # topk: fraction of coordinates sent
    error_feedback: bool = True  # clients keep what compression dropped and add it to their next update
    # faults and attackers
    attack: str = "none"  # what attackers do: sign_flip, noise (updates), nan (a broken client), label_flip (data)
    attack_fraction: float = 0.0  # fraction of clients that attack (a fixed, seeded set)
    attack_scale: float = 4.0  # sign_flip sends -scale x its update; noise sends N(0, (scale x update RMS)^2)
    min_clients: int = 1  # fewer usable updates than this: the round keeps the previous global model
    watchdog_rounds: int = 3  # stop when D's loss stays under collapse_loss this many rounds (0: off)
    collapse_loss: float = 1e-3  # a discriminator loss below this counts as collapsed
    # client-level differential privacy (DP-FedAvg) and the DP-FedAvg-GAN layout
    dp_clip: float | None = None  # clip each client's whole update to this L2 norm; None: no DP
    dp_noise_multiplier: float = 0.0  # Gaussian noise std on the sum, in units of dp_clip
    dp_delta: float = 1e-5  # the delta that epsilon is reported for
    server_generator: bool = False  # DP-FedAvg-GAN: clients train only D; G trains on the server against it
    server_g_steps: int | None = None  # server generator steps a round; None: the clients' mean local steps
    # partition of the training set over clients
    partition: str = "iid"  # one of PARTITIONS
    alpha: float = 0.5  # dirichlet: concentration; smaller is more label-skewed
    min_size: int = 10  # dirichlet, quantity: fewest images a client may get
    shards_per_client: int = 2  # shards: label-sorted shards a client gets (FedAvg paper: 2)
    classes_per_client: int = 2  # classes: labels each client holds
    sigma: float = 1.0  # quantity: lognormal sigma of client sizes (0: equal sizes)
    # optimisation
    batch_size: int = 64  # images per client per local step
    lr_g: float = 2e-4  # generator Adam learning rate
    lr_d: float = 2e-4  # discriminator Adam learning rate
    betas: tuple[float, float] = (0.5, 0.999)  # Adam betas (DCGAN: 0.5, 0.999)
    # model
    z_dim: int = 100  # latent noise size
    embed_dim: int = 10  # size of the generator's label embedding
    ngf: int = 64  # generator width
    ndf: int = 64  # discriminator width
    # evaluation in a metric classifier's features (see the Metrics section)
    eval_every: int | None = 0  # evaluate every this many rounds and after the last (0: only the last; None: never)
    eval_samples: int = 10000  # generated (and real reference) images per evaluation
    classifier_epochs: int = 3  # epochs of the metric classifier (cached once trained)
    classifier_subset: int | None = None  # train the classifier on this many images only; None: all
    # run
    seed: int = 0  # one seed for init, partition, selection, batches and noise
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    out_dir: str = "outputs"  # plots and tables go to out_dir/<run_name>/
    checkpoint_dir: str = "checkpoints"  # checkpoints go to checkpoint_dir/<run_name>/
    checkpoint_every: int = 1  # save every this many rounds (0: never; the last round is always saved)
    run_name: str = ""  # "" derives one from dataset, partition, K and seed

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        self.validate()
        if not self.run_name:
            self.run_name = f"{self.dataset}_{self.partition}_k{self.num_clients}_seed{self.seed}"

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is not allowed."""
        for name, allowed in CHOICES.items():
            _require(getattr(self, name) in allowed, name, getattr(self, name), f"one of {list(allowed)}")
        for name in _FIELD_RULES:
            _check_field(name, getattr(self, name))
        _require(isinstance(self.betas, tuple) and len(self.betas) == 2
                 and all(_is_number(b) and 0 <= b < 1 for b in self.betas), "betas", self.betas,
                 "two numbers in [0, 1), e.g. (0.5, 0.999)")
        num_classes = DATASETS[self.dataset].num_classes
        _require(self.classes_per_client <= num_classes, "classes_per_client", self.classes_per_client,
                 f"an integer from 1 to {num_classes} (the classes of {self.dataset})")
        _require(isinstance(self.device, str) and (self.device in ("auto", "cpu") or self.device == "cuda"
                 or (self.device.startswith("cuda:") and self.device[5:].isdigit())), "device", self.device,
                 "'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.train_subset is not None:
            _require(self.train_subset >= self.num_clients, "train_subset", self.train_subset,
                     f"None or at least num_clients={self.num_clients} images")
        for name in ("out_dir", "checkpoint_dir", "run_name"):
            value = getattr(self, name)
            _require(isinstance(value, str), name, value, "a string")
        _require(self.data_root is None or isinstance(self.data_root, str), "data_root", self.data_root,
                 "None or a folder path")
        _require(all(c.isalnum() or c in "-_." for c in self.run_name), "run_name", self.run_name,
                 "letters, digits, '-', '_' and '.' only (it names folders)")
        _require(not (self.strategy == "fedprox" and self.prox_mu == 0), "prox_mu", self.prox_mu,
                 "a number > 0 (or None: 0.01) with strategy='fedprox'")
        per_round = clients_per_round(self.num_clients, self.client_fraction)
        _require(self.min_clients <= per_round, "min_clients", self.min_clients,
                 f"an integer from 1 to the {per_round} clients selected a round")
        if self.dp_clip is not None:
            _require(self.strategy in DP_STRATEGIES, "strategy", self.strategy,
                     f"one of {list(DP_STRATEGIES)} with dp_clip (the DP sum is an average of clipped updates)")
            _require(self.sync_mode == "sync", "sync_mode", self.sync_mode, "'sync' with dp_clip")
        _require(not self.server_generator or self.sync_networks == "both", "sync_networks", self.sync_networks,
                 "'both' with server_generator=True (G is sent to the clients, D both ways)")
        if self.sync_mode == "async":
            _require(self.round_deadline is None, "round_deadline", self.round_deadline,
                     "None with sync_mode='async' (asynchronous clients have no round to be late for)")
            _require(self.async_buffer is None or self.async_buffer <= per_round, "async_buffer", self.async_buffer,
                     f"None or at most the {per_round} clients in flight (client_fraction x num_clients)")

    def partition_kwargs(self) -> dict[str, Any]:
        """The partition parameters that the chosen scheme takes."""
        return {name: getattr(self, name) for name in PARTITION_PARAMS[self.partition]}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "FedConfig":
        values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown FedConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**values)


CHOICES.update(dataset=tuple(sorted(DATASETS)), partition=PARTITIONS, bn_policy=BN_POLICIES,
               optimizer_state=OPTIMIZER_STATES, client_map=CLIENT_MAPS, conv_form=CONV_FORMS, strategy=STRATEGIES,
               selection=SELECTIONS, sync_networks=SYNC_NETWORKS, sync_mode=SYNC_MODES, staleness=STALENESS_RULES,
               threshold_rule=THRESHOLD_RULES, threshold_action=THRESHOLD_ACTIONS,
               straggler_policy=STRAGGLER_POLICIES, step_normalisation=STEP_NORMALISATIONS, compression=COMPRESSIONS,
               attack=ATTACKS)

PARTITION_PARAMS: dict[str, tuple[str, ...]] = {
    "iid": (),
    "dirichlet": ("alpha", "min_size"),
    "shards": ("shards_per_client",),
    "classes": ("classes_per_client",),
    "quantity": ("sigma", "min_size"),
}


def preset(name: str, **overrides: Any) -> FedConfig:
    """A ready config: "smoke" (CI, seconds on 2 cores), "cpu" (a laptop, ~10 min), "full" (a GPU)."""
    base = {
        # a few seconds a notebook: tiny models, a slice of MNIST, two short rounds
        "smoke": dict(num_clients=4, rounds=2, local_steps=3, batch_size=32, train_subset=2000,
                      ngf=16, ndf=16, z_dim=32, checkpoint_every=1,
                      eval_samples=500, classifier_epochs=1, classifier_subset=5000),
        # recognisable digits of the requested class in under 10 minutes on 2 CPU cores (8 MNIST epochs)
        "cpu": dict(num_clients=10, rounds=8, local_epochs=1.0, batch_size=64, ngf=32, ndf=32,
                    eval_every=2, eval_samples=5000),
        # the real experiment: 10 IID clients, 20 rounds of one local epoch (20 MNIST epochs)
        "full": dict(num_clients=10, rounds=20, local_epochs=1.0, batch_size=64, ngf=64, ndf=64,
                     eval_every=2, eval_samples=10000),
    }
    if name not in base:
        raise ValueError(f"preset={name!r} is not known; presets: {list(PRESETS)}")
    known = {f.name for f in dataclasses.fields(FedConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown FedConfig fields {unknown}; known fields: {sorted(known)}")
    return FedConfig(**{**base[name], **overrides})


def default_preset() -> str:
    """The preset a notebook runs: $FEDGAN_PRESET, else "full" on a usable GPU and "cpu" otherwise."""
    name = os.environ.get("FEDGAN_PRESET", "").strip()
    if name:
        if name not in PRESETS:
            raise ValueError(f"FEDGAN_PRESET={name!r} is not known; presets: {list(PRESETS)}")
        return name
    return "full" if pick_device().type == "cuda" else "cpu"


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_FOLDER = "cifar-10-batches-py"


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is in none of the places looked at and could not be downloaded."""


def cache_dir() -> Path:
    """A writable folder for decompressed datasets and cached weights ($FEDGAN_CACHE or ~/.cache/fedgan)."""
    return Path(os.environ.get("FEDGAN_CACHE") or Path.home() / ".cache" / "fedgan")


def _data_search_roots(root: str | os.PathLike | None) -> list[Path]:
    roots = []
    if root is not None:
        roots.append(Path(root))
    if os.environ.get("FEDGAN_DATA"):
        roots.append(Path(os.environ["FEDGAN_DATA"]))
    roots.append(Path("data"))
    roots.append(Path("/kaggle/input"))
    return roots


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_folder_matches(folder: Path, name: str) -> bool:
    """MNIST and Fashion-MNIST share file names: the folder path tells which one it holds."""
    says_fashion = "fashion" in str(folder.resolve()).lower()
    return says_fashion == (name == "fashion_mnist")


def _find_idx_folder(roots: Iterable[Path], name: str) -> Path | None:
    info = DATASETS[name]
    stems = MNIST_FILES[True] + MNIST_FILES[False]
    for root in roots:
        if not root.is_dir():
            continue
        candidates = [root, root / info.torchvision_class / "raw", root / info.torchvision_class, root / "raw"]
        if str(root).startswith("/kaggle/input"):  # attached Kaggle datasets nest freely
            candidates += [p.parent for p in root.glob("**/train-images-idx3-ubyte*")]
        for folder in candidates:
            if all(_idx_file(folder, s) for s in stems) and _idx_folder_matches(folder, name):
                return folder
    return None


def _find_cifar_folder(roots: Iterable[Path]) -> Path | None:
    for root in roots:
        if not root.is_dir():
            continue
        candidates = [root, root / CIFAR_FOLDER]
        if str(root).startswith("/kaggle/input"):
            candidates += list(root.glob(f"**/{CIFAR_FOLDER}"))
        for folder in candidates:
            if folder.name == CIFAR_FOLDER and (folder / "data_batch_1").is_file():
                return folder.parent
    return None


def _stage_idx_files(folder: Path, name: str) -> Path:
    """Copy (decompressing .gz) the idx files into a writable cache laid out as torchvision expects."""
    info = DATASETS[name]
    root = cache_dir() / name
    raw = root / info.torchvision_class / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stem in MNIST_FILES[True] + MNIST_FILES[False]:
        source, target = _idx_file(folder, stem), raw / stem
        if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
            continue
        partial = target.with_suffix(".partial")
        opener = gzip.open if source.suffix == ".gz" else open
        with opener(source, "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(partial, target)
    return root


def _torchvision_dataset(name: str, root: Path, train: bool, download: bool):
    import torchvision

    cls = getattr(torchvision.datasets, DATASETS[name].torchvision_class)
    return cls(root=str(root), train=train, download=download)


def _as_tensors(dataset, name: str) -> tuple[Tensor, Tensor]:
    images = torch.as_tensor(np.asarray(dataset.data), dtype=torch.uint8)
    if images.dim() == 3:  # MNIST-like: (N, H, W) -> (N, 1, H, W)
        images = images.unsqueeze(1)
    else:  # CIFAR: (N, H, W, C) -> (N, C, H, W)
        images = images.permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64)
    expected = DATASETS[name].image_shape
    if tuple(images.shape[1:]) != expected:
        raise ValueError(f"{name} images have shape {tuple(images.shape[1:])}, expected {expected}")
    return images, labels


def load_dataset(name: str = "mnist", root: str | os.PathLike | None = None, train: bool = True,
                 download: bool = True) -> tuple[Tensor, Tensor]:
    """Images as uint8 [N, C, H, W] and labels as int64 [N].

    Looks in `root`, $FEDGAN_DATA, ./data and /kaggle/input (recursively), then tries torchvision's
    download into ./data (skipped when `download` is False or $FEDGAN_OFFLINE is set). MNIST-like
    idx files, raw or .gz, work from a read-only folder: they are staged into cache_dir().
    """
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not known; datasets: {sorted(DATASETS)}")
    roots = _data_search_roots(root)
    if name == "cifar10":
        found = _find_cifar_folder(roots)
        if found is not None:
            return _as_tensors(_torchvision_dataset(name, found, train, download=False), name)
    else:
        folder = _find_idx_folder(roots, name)
        if folder is not None:
            staged = _stage_idx_files(folder, name)
            try:
                dataset = _torchvision_dataset(name, staged, train, download=False)
            except Exception as error:  # torchvision reads the files: any failure means bad files
                raise ValueError(f"the {name} idx files in {folder} could not be read ({error}); "
                                 "replace them with the four standard files") from error
            return _as_tensors(dataset, name)
    failure = "download skipped (download=False or FEDGAN_OFFLINE set)"
    if download and not os.environ.get("FEDGAN_OFFLINE"):
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                dataset = _torchvision_dataset(name, Path("data"), train, download=True)
            return _as_tensors(dataset, name)
        except Exception as error:  # urllib, HTTP, checksum: all mean "not downloadable here"
            failure = f"download into ./data failed: {type(error).__name__}: {error}"
    looked = "\n".join(f"  - {r.resolve() if r.exists() else r} ({'exists' if r.exists() else 'missing'})"
                       for r in roots)
    wanted = (f"the folder {CIFAR_FOLDER}/ of the CIFAR-10 python version" if name == "cifar10" else
              "the four idx files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
              "t10k-labels-idx1-ubyte, raw or .gz)")
    where = "a folder whose path contains 'fashion'" if name == "fashion_mnist" else "a folder"
    raise DatasetNotFoundError(
        f"{name} not found. Looked in:\n{looked}\nand the {failure}.\n"
        f"Fix: put {wanted} in {where} and set FEDGAN_DATA=/that/folder (or pass root=...); "
        "on Kaggle, attach a dataset holding them, or turn the notebook's internet on.")


def to_float_images(images: Tensor) -> Tensor:
    """uint8 in [0, 255] -> float in [-1, 1], the range the generator's tanh produces."""
    return images.float().mul_(2.0 / 255.0).sub_(1.0)


def examples_per_label(images: Tensor, labels: Tensor, per_label: int = 10,
                       num_classes: int = 10) -> Tensor:
    """The first `per_label` images of each label, label-major, as float in [-1, 1]: [num_classes*per_label, C, H, W]."""
    picks = [torch.nonzero(labels == c).flatten()[:per_label] for c in range(num_classes)]
    return to_float_images(images[torch.cat(picks)])


# ----------------------------------------------------------------------------
# Partitioning
# ----------------------------------------------------------------------------


def _labels_array(labels: Any) -> np.ndarray:
    array = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {array.shape} and dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError(f"labels must be >= 0, got {array.min()}")
    return array


def _split_by_counts(indices: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return np.split(indices, np.cumsum(counts)[:-1])


def _check_min_size(min_size: int, num_clients: int, num_labels: int) -> None:
    if min_size * num_clients > num_labels:
        raise ValueError(f"min_size={min_size} is not allowed: {num_clients} clients x {min_size} > "
                         f"{num_labels} images; use min_size <= {num_labels // num_clients}")


def _partition_iid(labels, num_clients, rng) -> list[np.ndarray]:
    return np.array_split(rng.permutation(len(labels)), num_clients)


def _partition_dirichlet(labels, num_clients, rng, alpha, min_size) -> list[np.ndarray]:
    """Label skew of Hsu et al. (2019): each class is split over clients by Dirichlet(alpha) shares."""
    _check_min_size(min_size, num_clients, len(labels))
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            counts = np.floor(shares * len(members)).astype(int)
            counts[np.argsort(-(shares * len(members) - counts))[: len(members) - counts.sum()]] += 1
            for client, chunk in enumerate(_split_by_counts(members, counts)):
                parts[client].append(chunk)
        result = [np.concatenate(p) for p in parts]
        if min(len(p) for p in result) >= min_size:
            return result
    raise ValueError(f"alpha={alpha} with min_size={min_size}: no split in 1000 draws gave every client "
                     f"{min_size} images; raise alpha or lower min_size")


def _partition_shards(labels, num_clients, rng, shards_per_client) -> list[np.ndarray]:
    """The FedAvg paper's pathological split: sort by label, cut into shards, deal shards_per_client each."""
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise ValueError(f"shards_per_client={shards_per_client} is not allowed: {num_shards} shards > "
                         f"{len(labels)} images")
    order = rng.permutation(len(labels))
    by_label = order[np.argsort(labels[order], kind="stable")]
    shards = np.array_split(by_label, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.concatenate([shards[s] for s in row]) for row in dealt]


def _partition_classes(labels, num_clients, rng, classes_per_client) -> list[np.ndarray]:
    """Each client holds `classes_per_client` labels; each label is split evenly among its holders."""
    classes = np.unique(labels)
    if classes_per_client > len(classes):
        raise ValueError(f"classes_per_client={classes_per_client} is not allowed: the labels hold only "
                         f"{len(classes)} classes")
    if num_clients * classes_per_client < len(classes):
        raise ValueError(f"classes_per_client={classes_per_client} is not allowed with {num_clients} clients: "
                         f"{len(classes)} classes need num_clients x classes_per_client >= {len(classes)}")
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        for j in range(classes_per_client):
            holders[int(order[(client * classes_per_client + j) % len(classes)])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, owners in holders.items():
        members = rng.permutation(np.flatnonzero(labels == c))
        for client, chunk in zip(owners, np.array_split(members, len(owners))):
            parts[client].append(chunk)
    return [np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in parts]


def _partition_quantity(labels, num_clients, rng, sigma, min_size) -> list[np.ndarray]:
    """Quantity skew: client sizes proportional to lognormal(0, sigma) draws, each at least min_size."""
    _check_min_size(min_size, num_clients, len(labels))
    shares = rng.lognormal(0.0, sigma, num_clients)
    free = len(labels) - min_size * num_clients
    counts = np.floor(shares / shares.sum() * free).astype(int)
    counts[np.argsort(-(shares / shares.sum() * free - counts))[: free - counts.sum()]] += 1
    return _split_by_counts(rng.permutation(len(labels)), counts + min_size)


_PARTITIONERS = {
    "iid": _partition_iid,
    "dirichlet": _partition_dirichlet,
    "shards": _partition_shards,
    "classes": _partition_classes,
    "quantity": _partition_quantity,
}
_PARTITION_DEFAULTS = {"alpha": 0.5, "min_size": 10, "shards_per_client": 2, "classes_per_client": 2,
                       "sigma": 1.0}


def partition(labels: Any, num_clients: int, scheme: str = "iid", seed: int = 0, **kw: Any) -> list[np.ndarray]:
    """Split dataset indices over clients: a list of `num_clients` sorted int64 arrays holding every index once.

    Schemes: "iid"; "dirichlet" (alpha, min_size); "shards" (shards_per_client); "classes"
    (classes_per_client); "quantity" (sigma, min_size). Deterministic for a seed.
    """
    array = _labels_array(labels)
    _require(scheme in PARTITIONS, "scheme", scheme, f"one of {list(PARTITIONS)}")
    _require(_is_int(num_clients) and 1 <= num_clients <= max(1, len(array)), "num_clients", num_clients,
             f"an integer from 1 to the number of labels ({len(array)})")
    _require(_is_int(seed) and seed >= 0, "seed", seed, "an integer >= 0")
    allowed = PARTITION_PARAMS[scheme]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ValueError(f"scheme={scheme!r} takes {list(allowed) or 'no parameters'}, not {unknown}")
    params = {name: kw.get(name, _PARTITION_DEFAULTS[name]) for name in allowed}
    for name, value in params.items():  # the same rules as FedConfig's fields of the same names
        _check_field(name, value)
    rng = np.random.default_rng(seed)
    parts = _PARTITIONERS[scheme](array, num_clients, rng, **params)
    return [np.sort(p).astype(np.int64) for p in parts]


def partition_report(labels: Any, parts: Sequence[np.ndarray], num_classes: int | None = None) -> np.ndarray:
    """Per-client label counts: an int array [num_clients, num_classes]."""
    array = _labels_array(labels)
    num_classes = num_classes or int(array.max()) + 1
    return np.stack([np.bincount(array[p], minlength=num_classes) for p in parts])


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


def _resolution_plan(size: int) -> tuple[int, int]:
    """(base, doublings) with base * 2**doublings == size and base in 4..7: 28 -> (7, 2), 32 -> (4, 3)."""
    for doublings in range(1, 8):
        base, rest = divmod(size, 2 ** doublings)
        if rest == 0 and 4 <= base <= 7:
            return base, doublings
    raise ValueError(f"image size {size} is not supported: it must be 4..7 times a power of two (28, 32, 64, ...)")


def dcgan_init_(module: nn.Module) -> None:
    """DCGAN init: conv weights ~ N(0, 0.02), BatchNorm weights ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """Conditional DCGAN generator: [z, embed(label)] -> image in [-1, 1]."""

    def __init__(self, *, image_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, z_dim: int = 100,
                 embed_dim: int = 10, ngf: int = 64):
        super().__init__()
        channels, height, width = image_shape
        if height != width:
            raise ValueError(f"image_shape={tuple(image_shape)}: only square images are supported")
        base, doublings = _resolution_plan(height)
        self.config = dict(image_shape=tuple(image_shape), num_classes=num_classes, z_dim=z_dim,
                           embed_dim=embed_dim, ngf=ngf)
        self.num_classes, self.z_dim = num_classes, z_dim
        self.label_embedding = nn.Embedding(num_classes, embed_dim)
        width_mult = 2 ** (doublings - 1)
        layers: list[nn.Module] = [  # (B, z+e, 1, 1) -> (B, ngf*2^(n-1), base, base)
            nn.ConvTranspose2d(z_dim + embed_dim, ngf * width_mult, base, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * width_mult), nn.ReLU(True)]
        for _ in range(doublings - 1):  # each block doubles the resolution and halves the width
            layers += [nn.ConvTranspose2d(ngf * width_mult, ngf * width_mult // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(ngf * width_mult // 2), nn.ReLU(True)]
            width_mult //= 2
        layers += [nn.ConvTranspose2d(ngf, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        dcgan_init_(self)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        x = torch.cat([z, self.label_embedding(labels)], dim=1)  # (B, z_dim + embed_dim)
        # The first layer, a transposed convolution of a 1x1 input, is a matrix product: computed as one, since
        # convolution kernels are slow at it, grouped ones (K clients under vmap) most (benchmarks/RESULTS.md)
        first = self.main[0].weight  # (z_dim + embed_dim, C', base, base)
        x = F.linear(x, first.flatten(1).t()).view(-1, *first.shape[1:])  # (B, C', base, base)
        return self.main[1:](x)  # (B, C, H, W)


class Discriminator(nn.Module):
    """Conditional DCGAN discriminator: the label enters as an extra learned image channel."""

    def __init__(self, *, image_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, ndf: int = 64):
        super().__init__()
        channels, height, width = image_shape
        if height != width:
            raise ValueError(f"image_shape={tuple(image_shape)}: only square images are supported")
        base, doublings = _resolution_plan(height)
        self.config = dict(image_shape=tuple(image_shape), num_classes=num_classes, ndf=ndf)
        self.num_classes, self.image_size = num_classes, height
        self.label_channel = nn.Embedding(num_classes, height * width)
        layers: list[nn.Module] = [nn.Conv2d(channels + 1, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        width_mult = 1
        for _ in range(doublings - 1):  # each block halves the resolution and doubles the width
            layers += [nn.Conv2d(ndf * width_mult, ndf * width_mult * 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(ndf * width_mult * 2), nn.LeakyReLU(0.2, True)]
            width_mult *= 2
        layers += [nn.Conv2d(ndf * width_mult, 1, base, 1, 0, bias=False)]  # (B, 1, 1, 1)
        self.main = nn.Sequential(*layers)
        dcgan_init_(self)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        size = self.image_size
        label_map = self.label_channel(labels).view(-1, 1, size, size)  # (B, 1, H, W)
        features = self.main[:-1](torch.cat([images, label_map], dim=1))  # (B, C', base, base)
        # the last layer's kernel covers the whole map: a matrix product, computed as one (as in the Generator)
        return F.linear(features.flatten(1), self.main[-1].weight.flatten(1)).flatten()  # (B,) logits


def build_models(config: FedConfig) -> tuple[Generator, Discriminator]:
    """G and D for the config's dataset, freshly initialised from the current torch RNG."""
    info = DATASETS[config.dataset]
    generator = Generator(image_shape=info.image_shape, num_classes=info.num_classes, z_dim=config.z_dim,
                          embed_dim=config.embed_dim, ngf=config.ngf)
    discriminator = Discriminator(image_shape=info.image_shape, num_classes=info.num_classes, ndf=config.ndf)
    return generator, discriminator


def norm_state_keys(module: nn.Module) -> set[str]:
    """State-dict keys of the BatchNorm layers (weights, biases and running statistics)."""
    keys = set()
    for prefix, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            keys.update(f"{prefix}.{name}" for name in m.state_dict())
    return keys


@torch.no_grad()
def generate(generator: Generator, labels: Sequence[int] | Tensor, seed: int = 0,
             noise: Tensor | None = None) -> Tensor:
    """Images in [-1, 1] for the requested labels: [len(labels), C, H, W], on the generator's device.

    Uses the generator in eval mode (BatchNorm running statistics); `noise` [N, z_dim] overrides `seed`.
    """
    device = next(generator.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
    if labels.numel() == 0 or labels.min() < 0 or labels.max() >= generator.num_classes:
        raise ValueError(f"labels must be a non-empty list of integers in [0, {generator.num_classes - 1}], "
                         f"got {labels.tolist()[:20]}")
    if noise is None:
        noise = torch.randn(len(labels), generator.z_dim, generator=torch.Generator().manual_seed(seed))
    if tuple(noise.shape) != (len(labels), generator.z_dim):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected ({len(labels)}, {generator.z_dim})")
    was_training = generator.training
    generator.eval()
    try:
        return generator(noise.to(device), labels.to(device))
    finally:
        generator.train(was_training)


# ----------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------


def _normalised_weights(weights: Any, count: int) -> Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != count:
        raise ValueError(f"got {w.numel()} weights for {count} client states; give one weight per state")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return w / w.sum()


def _counters_or(stacked: Mapping[str, Tensor], rule) -> StateDict:
    """Apply `rule` ([K, ...] -> [...]) to floating tensors in float32 at least; integer counters keep the largest."""
    return {k: rule(v.to(torch.promote_types(v.dtype, torch.float32))).to(v.dtype) if v.dtype.is_floating_point
            else v.amax(0) for k, v in stacked.items()}


def fedavg_stacked(stacked: Mapping[str, Tensor], weights: Any) -> StateDict:
    """FedAvg over states stacked on a leading client dim: {key: [K, ...]} -> {key: [...]}.

    Floating tensors: the weighted mean, computed in float32 at least and cast back to their dtype.
    Integer tensors (BatchNorm's num_batches_tracked) are counters, not estimates: the global keeps
    the largest client count, so it stays an integer of its own dtype.
    """
    if not stacked:
        return {}
    normalised = _normalised_weights(weights, next(iter(stacked.values())).shape[0])  # (K,) float64, sums to 1

    def weighted_mean(values: Tensor) -> Tensor:
        w = normalised.to(values.device, values.dtype)
        return (w.view(-1, *([1] * (values.dim() - 1))) * values).sum(0)  # (K, ...) -> (...)
    return _counters_or(stacked, weighted_mean)


def stack_states(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """A list of K state dicts with the same keys and shapes -> {key: [K, ...]}."""
    if len(states) == 0:
        raise ValueError("no client states to aggregate")
    keys = list(states[0])
    for i, state in enumerate(states[1:], 1):
        if list(state) != keys:
            raise ValueError(f"state {i} has keys {sorted(set(state) ^ set(keys))} that state 0 does not share")
        for key in keys:
            if state[key].shape != states[0][key].shape:
                raise ValueError(f"state {i}[{key!r}] has shape {tuple(state[key].shape)}, "
                                 f"state 0 has {tuple(states[0][key].shape)}")
    return {key: torch.stack([s[key] for s in states]) for key in keys}


def fedavg(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> StateDict:
    """FedAvg (McMahan et al., 2017): the client states averaged, weighted by their sample counts."""
    return fedavg_stacked(stack_states(states), weights)


def median(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> StateDict:
    """Coordinate-wise median (Yin et al., ICML 2018), unweighted like Flower's aggregate_median.

    With an even number of clients it is the mean of the two middle values, as numpy's median.
    `weights` are validated but, as in the standard definition, not used.
    """
    stacked = stack_states(states)
    _normalised_weights(weights, len(states))

    def middle(values: Tensor) -> Tensor:
        ordered, n = values.sort(0).values, values.shape[0]
        return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return _counters_or(stacked, middle)


def trimmed_mean(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float], beta: float) -> StateDict:
    """Coordinate-wise trimmed mean (Yin et al., 2018): drop the int(beta * K) largest and smallest values.

    Unweighted, like Flower's aggregate_trimmed_avg with proportiontocut=beta.
    """
    stacked = stack_states(states)
    _normalised_weights(weights, len(states))
    count = len(states)
    cut = int(beta * count) if _FIELD_RULES["trim_beta"][0](beta) else -1  # FedConfig.trim_beta's rule
    _require(cut >= 0 and count - 2 * cut >= 1, "beta", beta,
             f"a number in [0, 0.5) that leaves at least one of the {count} clients after trimming")
    return _counters_or(stacked, lambda values: values.sort(0).values[cut:count - cut].mean(0))


def krum(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float], f: int, m: int = 1) -> StateDict:
    """Krum / Multi-Krum (Blanchard et al., NeurIPS 2017), as Flower's aggregate_krum.

    Each client scores the sum of squared distances to its K - f - 2 nearest others (at least 1);
    m=1 returns the state of the lowest score, m>1 the FedAvg (by `weights`) of the m lowest.
    """
    stacked = stack_states(states)
    _normalised_weights(weights, len(states))
    count = len(states)
    _require(_is_int(f) and 0 <= f < count, "f", f, f"an integer from 0 to {count - 1} (assumed faulty clients)")
    _require(_is_int(m) and 1 <= m <= count, "m", m, f"an integer from 1 to {count} (clients kept)")
    flat = torch.cat([v.reshape(count, -1).double() for v in stacked.values() if v.dtype.is_floating_point], 1)
    distances = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist").square()  # (K, K) squared L2
    nearest = max(1, count - f - 2)
    others = distances.masked_fill(torch.eye(count, dtype=torch.bool), float("inf"))  # a client is not its neighbour
    scores = others.sort(1).values[:, :nearest].sum(1)  # (K,)
    kept = scores.argsort()[:m]
    if m == 1:
        return {k: v[kept[0]].clone() for k, v in stacked.items()}
    return fedavg_stacked({k: v[kept] for k, v in stacked.items()}, torch.as_tensor(weights, dtype=torch.float64)[kept])


def update_norms(global_state: Mapping[str, Tensor], client_states: Mapping[str, Tensor],
                 keys: Iterable[str]) -> Tensor:
    """L2 norm of each client's update (its state - the global state) over `keys`: [K] float64."""
    squares = [(client_states[k].double() - global_state[k].to(client_states[k].device).double())
               .flatten(1).square().sum(1) for k in keys]  # each (K,)
    return torch.stack(squares).sum(0).sqrt()


def scale_updates(global_state: Mapping[str, Tensor], client_states: Mapping[str, Tensor], scale: Tensor,
                  keys: Iterable[str]) -> dict[str, Tensor]:
    """Client states with their updates on `keys` multiplied by scale [K]: global + scale * (state - global)."""
    result = dict(client_states)
    for k in keys:
        x = global_state[k].to(client_states[k].device, client_states[k].dtype)
        s = scale.to(client_states[k].device, client_states[k].dtype).view(-1, *([1] * x.dim()))
        result[k] = x + s * (client_states[k] - x)
    return result


def fednova_rescale(global_state: Mapping[str, Tensor], client_states: Mapping[str, Tensor], steps: Any,
                    weights: Any, keys: Iterable[str]) -> dict[str, Tensor]:
    """FedNova (Wang et al., NeurIPS 2020): updates normalised by local steps tau_i, rescaled by tau_eff.

    Each client's update becomes (tau_eff / tau_i) (x_i - x) with tau_eff = sum_i p_i tau_i, so a
    weighted average of the result is x + tau_eff sum_i p_i (x_i - x) / tau_i: clients that ran more
    steps no longer pull the global model further. Equal steps leave the states unchanged.
    """
    tau = torch.as_tensor(np.asarray(steps, dtype=np.float64))
    p = _normalised_weights(weights, len(tau))
    _require(bool((tau > 0).all()), "steps", tau.tolist(), "local step counts >= 1")
    return scale_updates(global_state, client_states, (p * tau).sum() / tau, keys)


def staleness_weight(staleness: Any, rule: str = "polynomial", a: float = 0.5, b: int = 4) -> np.ndarray:
    """Weight of an update computed `staleness` server versions ago (Xie et al., "Asynchronous Federated
    Optimization", 2019): constant 1, polynomial (1 + s)^-a, hinge 1 if s <= b else 1 / (a (s - b) + 1)."""
    s = np.asarray(staleness, dtype=np.float64)
    _require(bool((s >= 0).all()), "staleness", s.tolist(), "numbers >= 0 (server versions behind)")
    _require(rule in STALENESS_RULES, "rule", rule, f"one of {list(STALENESS_RULES)}")
    if rule == "constant":
        return np.ones_like(s)
    if rule == "polynomial":
        return (1 + s) ** -a
    return np.where(s <= b, 1.0, 1 / (a * (s - b) + 1))


def compress_updates(updates: Mapping[str, Tensor], method: str, fraction: float = 0.01
                     ) -> tuple[dict[str, Tensor], int]:
    """What a client sends for its update, and how many bytes that takes: {key: [K, ...]} -> (same, bytes each).

    "none": float32 values. "topk": the `fraction` largest-magnitude coordinates of the whole update
    (value + int32 index each). "int8": each tensor quantised to 8 bits with one float32 scale
    (round to nearest of 255 levels). Only floating tensors are compressed; others are sent as they are.
    """
    _require(method in COMPRESSIONS, "method", method, f"one of {list(COMPRESSIONS)}")
    floats = [k for k, v in updates.items() if v.dtype.is_floating_point]
    other_bytes = sum(v[0].numel() * v.element_size() for k, v in updates.items() if k not in floats)
    if method == "none" or not floats:
        return dict(updates), other_bytes + sum(updates[k][0].numel() * 4 for k in floats)
    count = updates[floats[0]].shape[0]
    sent = dict(updates)
    if method == "int8":
        for k in floats:
            flat = updates[k].reshape(count, -1)  # (K, n)
            scale = (flat.abs().amax(1, keepdim=True) / 127).clamp(min=torch.finfo(flat.dtype).tiny)  # (K, 1)
            sent[k] = ((flat / scale).round().clamp(-127, 127) * scale).view_as(updates[k])
        return sent, other_bytes + sum(updates[k][0].numel() + 4 for k in floats)
    _require(_is_number(fraction) and 0 < fraction <= 1, "fraction", fraction, "a number in (0, 1]")
    flat = torch.cat([updates[k].reshape(count, -1) for k in floats], 1)  # (K, N): each client's whole update
    kept = max(1, math.ceil(fraction * flat.shape[1]))
    top = flat.abs().topk(kept, dim=1).indices  # (K, kept)
    sparse = torch.zeros_like(flat).scatter_(1, top, flat.gather(1, top))
    for k, piece in zip(floats, sparse.split([updates[k][0].numel() for k in floats], 1)):
        sent[k] = piece.reshape(updates[k].shape)
    return sent, other_bytes + kept * 8


class Strategy:
    """A server rule: the new global state from the global state and the selected clients' stacked states.

    `aggregate(global_state, client_states, weights, info)` gets {key: [...]}, {key: [K, ...]}, [K] data
    sizes, and `info` (client_ids, steps, staleness where the run is asynchronous) and returns
    {key: [...]}. The math lives in pure functions; a strategy holds server state between rounds
    (`state_dict`/`load_state_dict`, saved in checkpoints) and can put numbers for the round's log in
    `last_log`. Keys in `buffer_keys` (BatchNorm running statistics, counters) are plain-averaged by the
    built-in optimizers: an optimizer step on running statistics means nothing. `prox_mu` > 0 asks the
    clients for FedProx's proximal term.
    """

    prox_mu: float = 0.0

    def __init__(self, *, buffer_keys: Iterable[str] = ()):
        self.buffer_keys = set(buffer_keys)
        self.last_log: dict[str, Any] = {}

    def aggregate(self, global_state: Mapping[str, Tensor], client_states: Mapping[str, Tensor],
                  weights: Any, info: Mapping[str, Any] | None = None) -> StateDict:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class FedAvg(Strategy):
    """FedAvg (McMahan et al., 2017): the sample-weighted average becomes the global state."""

    def aggregate(self, global_state, client_states, weights, info=None):
        return fedavg_stacked(client_states, weights)


class FedProx(FedAvg):
    """FedProx (Li et al., MLSys 2020): FedAvg on the server; clients add (mu/2)|w - w_global|^2 to their losses."""

    def __init__(self, mu: float = 0.01, *, buffer_keys: Iterable[str] = ()):
        super().__init__(buffer_keys=buffer_keys)
        _require(_positive_number(mu), "mu", mu, "a number > 0")
        self.prox_mu = mu


class RobustRule(Strategy):
    """One of the pure robust rules (median, trimmed_mean, krum) with its parameters, as a strategy."""

    def __init__(self, rule, *, buffer_keys: Iterable[str] = (), **params: Any):
        super().__init__(buffer_keys=buffer_keys)
        self.rule, self.params = rule, params

    def aggregate(self, global_state, client_states, weights, info=None):
        states = _unbind_clients(dict(client_states))
        return self.rule(states, torch.as_tensor(weights, dtype=torch.float64).tolist(), **self.params)


SERVER_OPTIMIZERS = ("fedavgm", "fedadagrad", "fedadam", "fedyogi")


class ServerOptimizer(Strategy):
    """The averaged client update as a pseudo-gradient for a server optimizer.

    fedavgm: server momentum (Hsu et al., 2019), v = momentum v + delta, x += server_lr v; with
    momentum 0 it is the damped update x = (1 - server_lr) x + server_lr average.
    fedadagrad / fedadam / fedyogi: Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2:
    m = b1 m + (1 - b1) delta, v per rule, x += server_lr m / (sqrt(v) + tau), without bias correction.
    delta = weighted average of the clients' states - global state.
    """

    def __init__(self, kind: str, *, server_lr: float, momentum: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3, buffer_keys: Iterable[str] = ()):
        super().__init__(buffer_keys=buffer_keys)
        _require(kind in SERVER_OPTIMIZERS, "kind", kind, f"one of {list(SERVER_OPTIMIZERS)}")
        _require(_positive_number(server_lr), "server_lr", server_lr, "a number > 0")
        _require(_is_number(momentum) and 0 <= momentum < 1, "momentum", momentum, "a number in [0, 1)")
        _require(_is_number(beta2) and 0 <= beta2 < 1, "beta2", beta2, "a number in [0, 1)")
        _require(_positive_number(tau), "tau", tau, "a number > 0")
        self.kind, self.server_lr, self.momentum, self.beta2, self.tau = kind, server_lr, momentum, beta2, tau
        self.first: dict[str, Tensor] = {}  # momentum / first moment per key
        self.second: dict[str, Tensor] = {}  # second moment per key (adaptive rules)

    def aggregate(self, global_state, client_states, weights, info=None):
        average = fedavg_stacked(client_states, weights)
        result = dict(average)
        for key, mean in average.items():
            if key in self.buffer_keys or not mean.dtype.is_floating_point:
                continue
            x = global_state[key].to(mean.device, mean.dtype)
            delta = mean - x
            m = self.first.get(key, torch.zeros_like(delta))
            if self.kind == "fedavgm":
                m = self.momentum * m + delta
                step = m
            else:
                m = self.momentum * m + (1 - self.momentum) * delta
                v = self.second.get(key, torch.zeros_like(delta))
                square = delta.square()
                if self.kind == "fedadagrad":
                    v = v + square
                elif self.kind == "fedadam":
                    v = self.beta2 * v + (1 - self.beta2) * square
                else:  # fedyogi
                    v = v - (1 - self.beta2) * square * torch.sign(v - square)
                self.second[key] = v
                step = m / (v.sqrt() + self.tau)
            self.first[key] = m
            result[key] = x + self.server_lr * step
        return result

    def state_dict(self):
        return {"first": dict(self.first), "second": dict(self.second)}

    def load_state_dict(self, state):
        self.first, self.second = dict(state["first"]), dict(state["second"])


class Thresholded(Strategy):
    """Another strategy behind a norm threshold on client updates: too-large updates are clipped or dropped.

    The threshold is `threshold` itself ("absolute") or `threshold` x the round's median update norm
    ("median"); norms are over the parameters (not the buffers). `last_log` says how many were over.
    If every update is dropped, the global state is kept.
    """

    def __init__(self, inner: Strategy, threshold: float, *, rule: str = "median", action: str = "clip"):
        super().__init__(buffer_keys=inner.buffer_keys)
        _require(_positive_number(threshold), "threshold", threshold, "a number > 0")
        _require(rule in THRESHOLD_RULES, "rule", rule, f"one of {list(THRESHOLD_RULES)}")
        _require(action in THRESHOLD_ACTIONS, "action", action, f"one of {list(THRESHOLD_ACTIONS)}")
        self.inner, self.threshold, self.rule, self.action = inner, threshold, rule, action
        self.prox_mu = inner.prox_mu

    def aggregate(self, global_state, client_states, weights, info=None):
        keys = [k for k, v in client_states.items() if v.dtype.is_floating_point and k not in self.buffer_keys]
        norms = update_norms(global_state, client_states, keys)  # (K,)
        limit = self.threshold * (float(norms.quantile(0.5)) if self.rule == "median" else 1.0)
        over = norms > limit
        self.last_log = {"threshold": limit, self.action + "ped": int(over.sum()), "norm_max": float(norms.max())}
        if self.action == "clip":
            scale = (limit / norms.clamp(min=1e-30)).clamp(max=1.0)
            result = self.inner.aggregate(global_state, scale_updates(global_state, client_states, scale, keys),
                                          weights, info)
        elif over.all():
            result = {k: v.clone() for k, v in global_state.items()}
        else:
            keep = ~over
            kept_info = dict(info or {})
            for name, value in kept_info.items():
                if isinstance(value, (list, tuple, np.ndarray)) and len(value) == len(keep):
                    kept_info[name] = np.asarray(value)[keep.cpu().numpy()]
            result = self.inner.aggregate(global_state, {k: v[keep.to(v.device)] for k, v in client_states.items()},
                                          np.asarray(weights, dtype=np.float64)[keep.cpu().numpy()], kept_info)
        self.last_log.update(self.inner.last_log)
        return result

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def _bound_copy(strategy: Strategy, buffer_keys: set[str]) -> Strategy:
    """A copy of a user's strategy for one network, told that network's buffer keys (and its inner one's)."""
    copied = copy.deepcopy(strategy)
    for rule in (copied, getattr(copied, "inner", None)):
        if rule is not None and not rule.buffer_keys:
            rule.buffer_keys = set(buffer_keys)
    return copied


def make_strategy(config: FedConfig, buffer_keys: Iterable[str] = ()) -> Strategy:
    """The server rule that config.strategy names, with the config's parameters (and threshold, if set)."""
    name = config.strategy
    if name == "fedavg":
        strategy: Strategy = FedAvg(buffer_keys=buffer_keys)
    elif name == "fedprox":
        strategy = FedProx(0.01 if config.prox_mu is None else config.prox_mu, buffer_keys=buffer_keys)
    elif name == "damped":
        strategy = ServerOptimizer("fedavgm", server_lr=0.5 if config.server_lr is None else config.server_lr,
                                   momentum=0.0, buffer_keys=buffer_keys)
    elif name in SERVER_OPTIMIZERS:
        server_lr = config.server_lr if config.server_lr is not None else (1.0 if name == "fedavgm" else 1e-2)
        strategy = ServerOptimizer(name, server_lr=server_lr, momentum=config.server_momentum,
                                   beta2=config.server_beta2, tau=config.server_tau, buffer_keys=buffer_keys)
    elif name == "median":
        strategy = RobustRule(median, buffer_keys=buffer_keys)
    elif name == "trimmed_mean":
        strategy = RobustRule(trimmed_mean, buffer_keys=buffer_keys, beta=config.trim_beta)
    else:
        strategy = RobustRule(krum, buffer_keys=buffer_keys, f=config.krum_f, m=config.krum_m)
    if config.prox_mu is not None and name != "fedprox":
        strategy.prox_mu = config.prox_mu
    if config.update_threshold is not None:
        strategy = Thresholded(strategy, config.update_threshold, rule=config.threshold_rule,
                               action=config.threshold_action)
    return strategy


# ----------------------------------------------------------------------------
# Privacy: client-level DP-FedAvg with an RDP accountant
# ----------------------------------------------------------------------------


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError as error:
        raise ImportError("client-level DP reports epsilon with the RDP accountant of Google's dp-accounting "
                          "package; install it: pip install dp-accounting") from error
    return dp_accounting


def dp_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Epsilon after `rounds` releases of a Poisson-subsampled Gaussian mechanism (dp-accounting's RDP accountant).

    Client-level DP-FedAvg: sample_rate = expected clients a round / all clients; noise_multiplier = noise std /
    clip norm. Selection here draws a fixed number of clients a round, which the Poisson analysis approximates.
    """
    _require(_positive_number(noise_multiplier), "noise_multiplier", noise_multiplier, "a number > 0")
    _require(_is_number(sample_rate) and 0 < sample_rate <= 1, "sample_rate", sample_rate, "a number in (0, 1]")
    _require(_positive_int(rounds), "rounds", rounds, "an integer >= 1")
    _require(_is_number(delta) and 0 < delta < 1, "delta", delta, "a number in (0, 1)")
    accounting = _dp_accounting()
    event = accounting.SelfComposedDpEvent(
        accounting.PoissonSampledDpEvent(float(sample_rate), accounting.GaussianDpEvent(float(noise_multiplier))),
        int(rounds))
    accountant = accounting.rdp.RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(float(delta)))


def dp_noise_multiplier(target_epsilon: float, sample_rate: float, rounds: int, delta: float,
                        tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier (to `tolerance`) whose dp_epsilon is at most target_epsilon."""
    _require(_positive_number(target_epsilon), "target_epsilon", target_epsilon, "a number > 0")
    low, high = 0.0, 1.0
    while dp_epsilon(high, sample_rate, rounds, delta) > target_epsilon:
        low, high = high, 2 * high
        _require(high < 1e6, "target_epsilon", target_epsilon, "an epsilon some noise multiplier below 1e6 reaches")
    while high - low > tolerance * high:
        middle = (low + high) / 2
        low, high = (middle, high) if dp_epsilon(middle, sample_rate, rounds, delta) > target_epsilon else (low, middle)
    return high


def privatize_updates(updates: Sequence[Mapping[str, Tensor]], clip: float, noise_multiplier: float,
                      expected_clients: int, generator: torch.Generator | None = None
                      ) -> tuple[list[dict[str, Tensor]], Tensor]:
    """DP-FedAvg's server step (McMahan et al., ICLR 2018) on stacked client updates.

    Each client's whole update (over all the given state dicts, e.g. G and D together) is clipped to L2 norm
    `clip`; the clipped updates are summed, Gaussian noise of std noise_multiplier x clip is added to every
    coordinate, and the sum is divided by the expected number of clients. Returns the noisy mean updates
    (one dict per input, {key: [...]}) and each client's norm before clipping [K].
    """
    _require(_positive_number(clip), "clip", clip, "a number > 0")
    _require(_is_int(expected_clients) and expected_clients >= 1, "expected_clients", expected_clients,
             "an integer >= 1")
    floats = [[k for k, v in update.items() if v.dtype.is_floating_point] for update in updates]
    norms = torch.stack([update[k].double().flatten(1).square().sum(1) for update, keys in zip(updates, floats)
                         for k in keys]).sum(0).sqrt()  # (K,)
    scale = (clip / norms.clamp(min=1e-12)).clamp(max=1.0)
    noisy = []
    for update, keys in zip(updates, floats):
        noisy.append({})
        for k in keys:
            v = update[k]
            total = (scale.to(v.device, v.dtype).view(-1, *([1] * (v.dim() - 1))) * v).sum(0)  # (K, ...) -> (...)
            noise = torch.randn(total.shape, generator=generator, device=v.device, dtype=v.dtype)
            noisy[-1][k] = (total + noise_multiplier * clip * noise) / expected_clients
    return noisy, norms


# ----------------------------------------------------------------------------
# Local training engine: all selected clients train at once as one batched model
# ----------------------------------------------------------------------------


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of ints, so every (seed, round, client, stream) has its own stream."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


STREAM_SELECTION, STREAM_BATCHES, STREAM_NOISE, STREAM_SPEED, STREAM_DROPOUT, STREAM_ATTACK, STREAM_DP = range(1, 8)


@dataclass
class RoundPlan:
    """Everything random about one round, derived from (seed, round) alone, so runs resume exactly."""

    round: int  # 1-based round index
    client_ids: np.ndarray  # [K] clients that train and report this round, sorted
    sizes: np.ndarray  # [K] images each holds
    steps: np.ndarray  # [K] local steps each takes
    batch_indices: Tensor  # [K, max(steps), B] dataset indices of each client's batches
    noise_seed: int  # seed of the generator that draws each step's z
    dropped_out: list[int] = dataclasses.field(default_factory=list)  # selected, but did not report (dropout)
    late: list[int] = dataclasses.field(default_factory=list)  # past the deadline: cut short or dropped
    sim_time: float = 0.0  # simulated round time, in local steps of a speed-1 client


def choose_clients(pool: Sequence[int], count: int, rng: np.random.Generator, *, policy: str = "uniform",
                   sizes: Sequence[int] | None = None, losses: Mapping[int, float] | None = None,
                   candidates: int | None = None) -> np.ndarray:
    """`count` clients of `pool`, sorted: uniform, proportional to data size, or power-of-choice.

    power_of_choice (Cho et al., 2022): draw `candidates` (default 2 x count) proportional to size, keep the
    `count` with the highest last local loss (`losses`; a client never seen counts as highest).
    """
    pool = np.asarray(pool, dtype=np.int64)
    _require(_is_int(count) and 1 <= count <= len(pool), "count", count, f"an integer from 1 to {len(pool)}")
    _require(policy in SELECTIONS, "policy", policy, f"one of {list(SELECTIONS)}")
    if count == len(pool):
        return np.sort(pool)
    if policy == "uniform":
        return np.sort(rng.choice(pool, size=count, replace=False))
    _require(sizes is not None, "sizes", sizes, f"one data size per client for policy={policy!r}")
    p = np.asarray(sizes, dtype=np.float64)[pool]
    p = p / p.sum()
    if policy == "proportional":
        return np.sort(rng.choice(pool, size=count, replace=False, p=p))
    drawn = min(len(pool), 2 * count if candidates is None else max(candidates, count))
    shortlist = rng.choice(pool, size=drawn, replace=False, p=p)
    loss = np.array([(losses or {}).get(int(c), np.inf) for c in shortlist])
    return np.sort(shortlist[np.argsort(-loss, kind="stable")[:count]])


def clients_per_round(num_clients: int, fraction: float) -> int:
    """The clients selected a round (in flight, when asynchronous): max(1, round(fraction * K))."""
    return max(1, round(fraction * num_clients))


def select_clients(num_clients: int, fraction: float, seed: int, round_index: int, *, policy: str = "uniform",
                   sizes: Sequence[int] | None = None, losses: Mapping[int, float] | None = None,
                   candidates: int | None = None) -> np.ndarray:
    """max(1, round(fraction * K)) clients by `policy` (see choose_clients), from a generator of its own per round."""
    count = clients_per_round(num_clients, fraction)
    rng = np.random.default_rng(derive_seed(seed, round_index, STREAM_SELECTION))
    return choose_clients(np.arange(num_clients), count, rng, policy=policy, sizes=sizes, losses=losses,
                          candidates=candidates)


def client_speeds(num_clients: int, sigma: float, seed: int) -> np.ndarray:
    """Each client's speed in local steps per time unit: lognormal(0, sigma), fixed for the run (1 if sigma=0)."""
    rng = np.random.default_rng(derive_seed(seed, STREAM_SPEED))
    return np.exp(sigma * rng.standard_normal(num_clients))


def attacker_ids(num_clients: int, fraction: float, seed: int) -> list[int]:
    """The round(fraction * K) clients that attack, a fixed seeded choice for the whole run."""
    count = round(fraction * num_clients)
    rng = np.random.default_rng(derive_seed(seed, STREAM_ATTACK))
    return sorted(rng.permutation(num_clients)[:count].tolist())


def poison_update(update: Tensor, attack: str, scale: float, generator: torch.Generator | None = None) -> Tensor:
    """What an attacking client sends instead of its update: sign_flip, noise (of the update's RMS) or nan."""
    if attack == "sign_flip":
        return -scale * update
    if attack == "noise":
        rms = update.double().square().mean().sqrt().to(update.dtype)
        return scale * rms * torch.randn(update.shape, generator=generator, device=update.device, dtype=update.dtype)
    if attack == "nan":
        return torch.full_like(update, math.nan)
    raise ValueError(f"attack={attack!r} does not change updates; update attacks: sign_flip, noise, nan")


def local_steps_for(size: int, config: FedConfig) -> int:
    """Local steps of a client holding `size` images: local_steps, else ceil(local_epochs * size / B)."""
    if config.local_steps is not None:
        return config.local_steps
    return max(1, math.ceil(config.local_epochs * size / config.batch_size))


def plan_clients(config: FedConfig, parts: Sequence[np.ndarray], client_ids: Sequence[int], round_index: int,
                 steps: Sequence[int] | None = None) -> RoundPlan:
    """Draw the batches of the given clients for a round: each walks fresh permutations of its own data."""
    client_ids = np.asarray(client_ids, dtype=np.int64)
    sizes = np.array([len(parts[c]) for c in client_ids], dtype=np.int64)
    if (sizes == 0).any():
        empty = client_ids[sizes == 0].tolist()
        raise ValueError(f"clients {empty} hold no data; choose a partition that gives every client images")
    steps = np.array([local_steps_for(n, config) for n in sizes] if steps is None else steps, dtype=np.int64)
    batch = config.batch_size
    indices = np.zeros((len(client_ids), int(steps.max(initial=0)), batch), dtype=np.int64)
    for row, (client, n, s) in enumerate(zip(client_ids, sizes, steps)):
        rng = np.random.default_rng(derive_seed(config.seed, round_index, int(client), STREAM_BATCHES))
        own = parts[client]
        epochs = math.ceil(s * batch / n)
        walk = np.concatenate([own[rng.permutation(n)] for _ in range(epochs)])[: s * batch]
        indices[row, :s] = walk.reshape(s, batch)  # rows past a client's steps stay 0 and are masked
    return RoundPlan(round_index, client_ids, sizes, steps, torch.from_numpy(indices),
                     derive_seed(config.seed, round_index, STREAM_NOISE))


def plan_round(config: FedConfig, parts: Sequence[np.ndarray], round_index: int,
               client_losses: Mapping[int, float] | None = None) -> RoundPlan:
    """Select clients, apply dropout and the deadline, and draw the batches of those that train.

    Time is counted in local steps of a speed-1 client: a client of speed v needs steps / v. Past
    `round_deadline` a client does the steps that fit ("partial") or is left out ("drop"); without a
    deadline the round lasts as long as its slowest client.
    """
    sizes = [len(p) for p in parts]
    selected = select_clients(len(parts), config.client_fraction, config.seed, round_index,
                              policy=config.selection, sizes=sizes, losses=client_losses,
                              candidates=config.poc_candidates)
    reports = np.random.default_rng(derive_seed(config.seed, round_index, STREAM_DROPOUT)).random(len(selected))
    dropped_out = selected[reports < config.dropout].tolist()
    ids = selected[reports >= config.dropout]
    speed = client_speeds(len(parts), config.client_speed_sigma, config.seed)[ids]
    steps = np.array([local_steps_for(sizes[c], config) for c in ids], dtype=np.int64)
    late: list[int] = []
    if config.round_deadline is not None:
        over = steps / speed > config.round_deadline
        late = ids[over].tolist()
        if config.straggler_policy == "drop":
            ids, steps, speed = ids[~over], steps[~over], speed[~over]
        else:
            steps = np.minimum(steps, np.maximum(1, np.floor(config.round_deadline * speed))).astype(np.int64)
    plan = plan_clients(config, parts, ids, round_index, steps)
    plan.dropped_out, plan.late = dropped_out, late
    plan.sim_time = float((steps / speed).max(initial=0.0))
    return plan


def adam_init(params: Mapping[str, Tensor]) -> dict[str, Any]:
    """Fresh Adam state for stacked params: per-client step counts [K] and zero moments."""
    first = next(iter(params.values()))
    return {"step": torch.zeros(first.shape[0], device=first.device),
            "exp_avg": {n: torch.zeros_like(p) for n, p in params.items()},
            "exp_avg_sq": {n: torch.zeros_like(p) for n, p in params.items()}}


class StackedAdam:
    """Adam over K clients' flat parameters [K, P], each client with its own step count.

    torch's fused Adam over the K rows: one call reads each tensor once and updates every client still
    training (one multi-tensor kernel; a few for large K on a GPU), where the same update written with tensor
    ops takes a dozen full passes over [K, P] (and was a tenth of a CPU step at K=10, ngf=64). Same algorithm as
    torch.optim.Adam, which the reference loop uses. (Fused Adam runs on a CPU from torch 2.4.)
    """

    MOMENTS = ("exp_avg", "exp_avg_sq")

    def __init__(self, flat: Tensor, state: Mapping[str, Tensor], *, lr: float, betas: tuple[float, float]):
        """`state`: {"step": [K], "exp_avg": [K, P], "exp_avg_sq": [K, P]}, updated in place by step()."""
        self.rows = list(flat.unbind(0))  # (P,) views: the optimizer writes the clients' parameters in place
        self.optimizer = torch.optim.Adam(self.rows, lr=lr, betas=betas, fused=True)
        self.on_cuda = flat.device.type == "cuda"
        for row, step, *moments in zip(self.rows, *(state[k].unbind(0) for k in ("step", *self.MOMENTS))):
            self.optimizer.state[row] = {"step": step, **dict(zip(self.MOMENTS, moments))}  # views

    @staticmethod
    def initial_state(flat: Tensor) -> dict[str, Tensor]:
        """Step counts 0 and zero moments for the clients of `flat` [K, P]."""
        return {"step": torch.zeros(flat.shape[0], device=flat.device),
                **{m: torch.zeros_like(flat) for m in StackedAdam.MOMENTS}}

    def step(self, grad: Tensor, active: Sequence[bool] | None = None) -> None:
        """One step with gradients [K, P]; clients not `active` (their local steps done) are left untouched."""
        for k, (row, client_grad) in enumerate(zip(self.rows, grad.unbind(0))):
            row.grad = client_grad if active is None or active[k] else None  # Adam skips a parameter without grad
        # torch lets a CUDA graph record step() only if "capturable" (and warns if it is set outside a capture);
        # the fused kernel computes the same either way
        self.optimizer.param_groups[0]["capturable"] = self.on_cuda and torch.cuda.is_current_stream_capturing()
        self.optimizer.step()


class FlatParams:
    """A network's stacked parameters as one [K, P] tensor, each parameter a view of its columns.

    The optimizer then updates a network with a dozen kernels instead of a dozen per parameter tensor, which
    is what bounds a small GAN's step on a GPU (kernel launches, not arithmetic). The views are leaves of
    autograd, so gradients come per parameter and are concatenated once a step.
    """

    def __init__(self, module: nn.Module, stacked: Mapping[str, Tensor]):
        self.names = [n for n, _ in module.named_parameters()]
        self.count = stacked[self.names[0]].shape[0]
        self.shapes = [stacked[n].shape[1:] for n in self.names]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.flat = self.flatten(stacked).detach()  # (K, P), a copy: the caller's state is left alone
        self.params = {n: v.requires_grad_(True) for n, v in self.split(self.flat).items()}

    def flatten(self, tree: Mapping[str, Tensor]) -> Tensor:
        """{name: [K, ...]} -> [K, P] (a copy)."""
        return torch.cat([tree[n].reshape(self.count, -1) for n in self.names], 1)

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """[K, P] -> {name: [K, ...]} as views of `flat`."""
        pieces = flat.split(self.sizes, 1)  # each (K, size)
        return {n: piece.view(self.count, *shape) for n, piece, shape in zip(self.names, pieces, self.shapes)}

    def adam_state(self, state: dict[str, Any] | None) -> dict[str, Tensor]:
        """A stacked Adam state ({name: [K, ...]} moments) as StackedAdam's flat one, or a fresh one."""
        if state is None:
            return StackedAdam.initial_state(self.flat)
        return {"step": state["step"], **{m: self.flatten(state[m]) for m in StackedAdam.MOMENTS}}

    def unflatten_adam_state(self, state: Mapping[str, Tensor]) -> dict[str, Any]:
        return {"step": state["step"], **{m: {n: v.contiguous() for n, v in self.split(state[m]).items()}
                                          for m in StackedAdam.MOMENTS}}


@dataclass
class LocalResult:
    g_state: dict[str, Tensor]  # {key: [K, ...]} the clients' generators after local training
    d_state: dict[str, Tensor]  # {key: [K, ...]} the clients' discriminators
    g_opt: dict[str, Any]  # stacked Adam state of the generators
    d_opt: dict[str, Any]  # stacked Adam state of the discriminators
    d_loss: Tensor  # [K] mean discriminator loss over each client's steps
    g_loss: Tensor  # [K] mean generator loss


def _unbind_clients(tree: Any) -> list[Any]:
    """A tensor or {name: tensor} stacked on dim 0 -> a list of per-client views (in-place writes go through)."""
    if isinstance(tree, Tensor):
        return list(tree.unbind(0))
    keys = list(tree)
    return [dict(zip(keys, values)) for values in zip(*(tree[k].unbind(0) for k in keys))]


CLIENT_STREAMS = 8  # client_map="streams": CUDA streams the clients share (CUDA_DEVICE_MAX_CONNECTIONS' default)


def map_clients(fn, active: Sequence[bool] | None = None, streams: Sequence[torch.cuda.Stream] | None = None):
    """vmap's contract (fn of one client's slices; results stacked on dim 0) as a loop over the clients.

    On a CPU, vmap's grouped convolutions are slower than K plain ones (benchmarks/RESULTS.md), so there the
    engine maps with this; unbind keeps autograd to one stack per parameter. Clients not `active` (done
    with their local steps) are not computed: their rows are zeros, which the engine masks anyway.
    With `streams` (client_map="streams"), client k runs on streams[k % len(streams)], forked from and joined back
    to the current stream: each client is one model's plain kernels, and the GPU (or a CUDA graph of the step) may
    run different clients' kernels at once. Autograd runs each backward on its forward's stream; the kernels and
    so the results are the loop's.
    """
    def mapped(*args):
        per_client = [_unbind_clients(a) for a in args]
        origin = torch.cuda.current_stream() if streams else None
        outputs = []
        for row, client_args in enumerate(zip(*per_client)):
            if active is not None and not active[row]:
                outputs.append(None)
            elif streams:
                stream = streams[row % len(streams)]
                stream.wait_stream(origin)  # the client's inputs are ready
                with torch.cuda.stream(stream):
                    outputs.append(fn(*client_args))
            else:
                outputs.append(fn(*client_args))
        for stream in streams or ():
            origin.wait_stream(stream)
        template = next(o for o in outputs if o is not None)
        return torch.stack([torch.zeros_like(template) if o is None else o for o in outputs])
    return mapped


def resolved_client_map(client_map: str, device: torch.device, steps: Sequence[int]) -> str:
    """What "auto" runs for clients taking `steps` local steps each, as benchmarks/RESULTS.md measured it: on a CPU
    the loop (vmap's grouped convolutions are slower there than K plain ones). On a CUDA GPU, when every client
    takes the same number of steps (one client included), the clients as plain models side by side on streams,
    replayed from CUDA graphs kept from round to round: on an H200 1.3x vmap's batched form at 10 and 100 clients,
    0.9x one model given all their images. With unequal clients (a label-skewed split) vmap, whose steps after the
    shortest client is done replay from a graph (on streams they run eagerly)."""
    if client_map != "auto":
        return client_map
    if device.type == "cpu":
        return "loop"
    return "streams" if device.type == "cuda" and len(set(steps)) == 1 else "vmap"


def train_clients(generator: Generator, discriminator: Discriminator, g_state: Mapping[str, Tensor],
                  d_state: Mapping[str, Tensor], images: Tensor, labels: Tensor, plan: RoundPlan,
                  config: FedConfig, g_opt: dict[str, Any] | None = None,
                  d_opt: dict[str, Any] | None = None, client_map: str | None = None,
                  prox_mu: float = 0.0, train_generator: bool = True) -> LocalResult:
    """Local training of the plan's K clients as one batched model over stacked states.

    `generator`/`discriminator` only lend their structure; `g_state`/`d_state` hold each client's
    copy stacked on dim 0. Losses stay on the device until the round ends (no per-step sync).
    `client_map` (default: config.client_map): "vmap" (all clients in one batched call), "loop"
    (map_clients), "streams" (the loop with the clients on CUDA streams; the loop off a GPU), "auto"
    (resolved_client_map). All compute the same thing.
    `prox_mu` > 0 adds FedProx's (mu/2)|w - w_start|^2 to both networks' losses (as mu (w - w_start) to the
    gradients), w_start being the state each client started the round from. `train_generator=False` trains
    only the discriminators (the generators only make the fakes), as DP-FedAvg-GAN's clients do.
    `config.amp` runs the convolutions in bfloat16 (BFloat16Compute); parameters, gradients and Adam stay float32.
    On a CUDA GPU (`config.cuda_graphs`), the steps every client takes are replayed from a CUDA graph
    (CudaGraphStep), and under vmap the steps after the shortest client is done from a second one; the graphs are
    kept for the next round of the same clients' count (LocalTrainer).
    `config.conv_form` picks how vmap computes the thin convolutions (ClientConvolutions); `config.deterministic`
    how cuDNN picks its algorithms (_cudnn_algorithms).
    """
    client_map = config.client_map if client_map is None else client_map
    _require(client_map in CLIENT_MAPS, "client_map", client_map, f"one of {list(CLIENT_MAPS)}")
    _require(_is_number(prox_mu) and prox_mu >= 0, "prox_mu", prox_mu, "a number >= 0")
    client_map = resolved_client_map(client_map, images.device, plan.steps.tolist())
    num_clients, _, batch = plan.batch_indices.shape
    key = (id(generator), id(discriminator), generator.training, discriminator.training, id(images), id(labels),
           num_clients, batch, client_map, CLIENT_STREAMS, float(prox_mu), train_generator,
           *(getattr(config, name) for name in LocalTrainer.CONFIG_FIELDS))
    trainer = _LOCAL_TRAINERS.pop(key, None)
    if trainer is None:
        trainer = LocalTrainer(generator, discriminator, g_state, d_state, images, labels, config, client_map,
                               prox_mu, train_generator)
    _LOCAL_TRAINERS[key] = trainer  # the most recent last
    while len(_LOCAL_TRAINERS) > LOCAL_TRAINERS_KEPT:
        del _LOCAL_TRAINERS[next(iter(_LOCAL_TRAINERS))]
    return trainer(g_state, d_state, plan, g_opt, d_opt)


LOCAL_TRAINERS_KEPT = 1  # LocalTrainers kept for later rounds: each holds its clients' state and its graphs' memory
_LOCAL_TRAINERS: dict[tuple, "LocalTrainer"] = {}  # train_clients' cache, keyed by what a trainer's steps bake in


def clear_local_trainers() -> None:
    """Lets go of the trainers train_clients kept (their state, CUDA graphs, and the models and data they hold):
    the memory they took is free for other work; the next round builds a new trainer."""
    _LOCAL_TRAINERS.clear()


class LocalTrainer:
    """train_clients' engine for one shape of round (models, data, clients' count, batch, options): the stacked
    state lives in tensors kept from round to round, each round's states copied in and the results copied out, so
    that the CUDA graphs captured in one round replay in the next. Capturing costs two eager steps and a recording
    (on an H200 a full-preset round of 10 clients took 0.55-0.62 s with them, 0.37-0.42 s replaying kept graphs;
    benchmarks/RESULTS.md). A trainer holds references to the models and data it was built for; train_clients
    keeps LOCAL_TRAINERS_KEPT of them.
    """

    CONFIG_FIELDS = ("amp", "conv_form", "conv_block_clients", "deterministic", "cuda_graphs", "lr_g", "lr_d",
                     "betas")  # what the steps read from the config

    def __init__(self, generator: Generator, discriminator: Discriminator, g_state: Mapping[str, Tensor],
                 d_state: Mapping[str, Tensor], images: Tensor, labels: Tensor, config: FedConfig,
                 client_map: str, prox_mu: float, train_generator: bool):
        """`g_state`/`d_state`: a round's stacked states, for the shapes (their values are copied in by __call__)."""
        device = self.device = images.device
        self.z_dim, self.config = generator.z_dim, config
        looped = self.looped = client_map != "vmap"
        self.g_flat, self.d_flat = g_flat, d_flat = FlatParams(generator, g_state), FlatParams(discriminator, d_state)
        num_clients = g_flat.count
        self.streams = streams = ([torch.cuda.Stream(device) for _ in range(min(num_clients, CLIENT_STREAMS))]
                                  if client_map == "streams" and device.type == "cuda" else None)
        g_params, d_params = g_flat.params, d_flat.params
        self.g_buffers = g_buffers = {k: v.detach().clone() for k, v in g_state.items() if k not in g_params}
        self.d_buffers = d_buffers = {k: v.detach().clone() for k, v in d_state.items() if k not in d_params}
        self.g_opt, self.d_opt = g_opt, d_opt = g_flat.adam_state(None), d_flat.adam_state(None)
        self.anchors = (g_flat.flat.clone(), d_flat.flat.clone()) if prox_mu else None
        g_anchor, d_anchor = self.anchors or (None, None)
        g_adam = StackedAdam(g_flat.flat, g_opt, lr=config.lr_g, betas=config.betas)
        d_adam = StackedAdam(d_flat.flat, d_opt, lr=config.lr_d, betas=config.betas)
        self.d_loss_sum = d_loss_sum = torch.zeros(num_clients, device=device)
        self.g_loss_sum = g_loss_sum = torch.zeros(num_clients, device=device)

        def flat_gradient(loss: Tensor, net: FlatParams, anchor: Tensor | None) -> Tensor:
            grads = torch.autograd.grad(loss, list(net.params.values()))
            flat = torch.cat([g.reshape(net.count, -1) for g in grads], 1)  # (K, P)
            return flat if anchor is None else flat + prox_mu * (net.flat - anchor)

        def in_compute_modes(fn):  # the per-client function under amp's BFloat16Compute and the thin convolutions' form
            def run(*args):
                # amp's casts first (the mode entered last sees a call first), so the forms get bfloat16 tensors
                with _client_convolutions(config, looped, num_clients, device), _bfloat16_compute(config.amp):
                    return fn(*args)
            return run

        @in_compute_modes
        def g_forward(params, buffers, z, y):
            return functional_call(generator, (params, buffers), (z, y))

        @in_compute_modes
        def d_real_fake_loss(params, buffers, real, fake, y):
            real_logits = functional_call(discriminator, (params, buffers), (real, y)).float()  # amp: bf16 -> float32
            fake_logits = functional_call(discriminator, (params, buffers), (fake, y)).float()
            return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                    + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))

        @in_compute_modes
        def d_fooled_loss(params, buffers, fake, y):
            logits = functional_call(discriminator, (params, buffers), (fake, y)).float()
            return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))

        def local_step(idx: Tensor, z: Tensor, on_steps: list[bool] | None) -> tuple[Tensor, Tensor]:
            """A D and a G step of the clients `on_steps` (None: all) on images `idx` [K, B], noise z [K, B, z_dim]."""
            real = to_float_images(images[idx])  # (K, B, C, H, W)
            y = labels[idx]  # (K, B)

            def batched(fn):
                return map_clients(fn, on_steps, streams) if looped else vmap(fn)
            with torch.set_grad_enabled(train_generator):
                fake = batched(g_forward)(g_params, g_buffers, z, y)  # (K, B, C, H, W)

            # (1) Update D: real images -> 1, generated images -> 0
            d_loss = batched(d_real_fake_loss)(d_params, d_buffers, real, fake.detach(), y)  # (K,)
            d_adam.step(flat_gradient(d_loss.sum(), d_flat, d_anchor), on_steps)

            # (2) Update G: make the updated D call generated images real (DP-FedAvg-GAN: G trains on the server)
            if not train_generator:
                return d_loss.detach(), torch.zeros_like(d_loss_sum)
            g_loss = batched(d_fooled_loss)(d_params, d_buffers, fake, y)  # (K,)
            g_adam.step(flat_gradient(g_loss.sum(), g_flat, g_anchor), on_steps)
            return d_loss.detach(), g_loss.detach()

        def step_of_all(idx: Tensor, z: Tensor) -> None:  # every client trains: losses added on the device
            d_loss, g_loss = local_step(idx, z, None)
            d_loss_sum.add_(d_loss)
            g_loss_sum.add_(g_loss)

        # After the shortest client is done, the finished ones sit out. The loop skips them (`on_steps`, known on
        # the host), so only their running statistics need putting back; vmap computes every client, so they also
        # get back their parameters and Adam state.
        kept = [*g_buffers.values(), *d_buffers.values()]
        if not looped:
            kept += [g_flat.flat, d_flat.flat, *g_opt.values(), *d_opt.values()]

        def step_of_some(idx: Tensor, z: Tensor, active: Tensor, on_steps: list[bool] | None = None) -> None:
            """A step after the shortest client is done: clients not `active` [K] get back what `kept` held before
            it and count no loss. Under vmap (`on_steps` None) the mask is only a tensor, so the step has no host
            sync and replays from a CUDA graph like step_of_all: with unequal clients (label skew) most of a round
            is these."""
            saved = [t.clone() for t in kept]
            d_loss, g_loss = local_step(idx, z, on_steps)
            with torch.no_grad():
                for before, after in zip(saved, kept):
                    after.copy_(torch.where(active.view(-1, *([1] * (after.dim() - 1))), after, before))
            d_loss_sum.add_(torch.where(active, d_loss, 0.0))
            g_loss_sum.add_(torch.where(active, g_loss, 0.0))

        self.step_of_all, self.step_of_some = step_of_all, step_of_some
        self.graphs = config.cuda_graphs and device.type == "cuda"
        # one memory pool: the graphs run one after another, each round in the same order
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        if self.graphs:
            self.step_of_all = CudaGraphStep(step_of_all, self.pool)
            if not looped:
                self.step_of_some = CudaGraphStep(step_of_some, self.pool)
        self.looped_tails: dict[tuple[bool, ...], Callable] = {}  # on a GPU, a CUDA graph a set of clients training
        self.tails_for: tuple[int, ...] = ()  # the clients' step counts the looped tails are for

    def looped_tail(self, plan: RoundPlan, step: int) -> Callable:
        """A looped map's step after the shortest client is done: it skips the finished clients, known on the host,
        so on a GPU each set of clients still training gets a CUDA graph of its own; a round of the same clients'
        step counts (all clients every round, as in a label-skewed split) replays the same graphs. Not with the
        clients on streams: on an H200 such a graph failed to capture or computed other numbers than the loop
        (benchmarks/RESULTS.md), so there these steps run eagerly."""
        if not self.graphs or self.streams:
            return functools.partial(self.step_of_some, on_steps=(step < plan.steps).tolist())
        if tuple(plan.steps) != self.tails_for:  # other clients or step counts: other sets, the old graphs let go
            self.looped_tails, self.tails_for = {}, tuple(plan.steps)
        on_steps = tuple((step < plan.steps).tolist())
        if on_steps not in self.looped_tails:
            self.looped_tails[on_steps] = CudaGraphStep(functools.partial(self.step_of_some, on_steps=list(on_steps)),
                                                        self.pool)
        return self.looped_tails[on_steps]

    def __call__(self, g_state: Mapping[str, Tensor], d_state: Mapping[str, Tensor], plan: RoundPlan,
                 g_opt: dict[str, Any] | None = None, d_opt: dict[str, Any] | None = None) -> LocalResult:
        """One round of the plan's clients from the stacked states (and Adam states, or fresh ones)."""
        device, num_clients = self.device, self.g_flat.count
        with torch.no_grad():  # this round's values into the kept tensors, in place: the graphs read them there
            for net, state, buffers, opt, given in ((self.g_flat, g_state, self.g_buffers, self.g_opt, g_opt),
                                                    (self.d_flat, d_state, self.d_buffers, self.d_opt, d_opt)):
                net.flat.copy_(net.flatten(state))
                for key, value in buffers.items():
                    value.copy_(state[key])
                for key, value in net.adam_state(given).items():  # the given Adam state, flat, or a fresh one
                    opt[key].copy_(value)
            for anchor, net in zip(self.anchors or (), (self.g_flat, self.d_flat)):
                anchor.copy_(net.flat)
            self.d_loss_sum.zero_()
            self.g_loss_sum.zero_()
        _, max_steps, batch = plan.batch_indices.shape
        steps = torch.as_tensor(plan.steps, device=device)
        batch_indices = plan.batch_indices.to(device)
        noise_gen = torch.Generator(device=device).manual_seed(plan.noise_seed)
        steps_of_all = int(plan.steps.min())  # the steps every client takes; after them, the finished ones sit out
        with _cudnn_algorithms(self.config.deterministic):  # the backward passes too: autograd.grad runs in the steps
            for step in range(max_steps):
                idx = batch_indices[:, step]  # (K, B)
                z = torch.randn((num_clients, batch, self.z_dim), generator=noise_gen, device=device)
                if step < steps_of_all:
                    self.step_of_all(idx, z)
                elif self.looped:
                    self.looped_tail(plan, step)(idx, z, step < steps)  # (K,) still training
                else:
                    self.step_of_some(idx, z, step < steps)

        def copied(tree: Any) -> Any:  # out of the kept tensors, which the next round overwrites
            return _map_tensors(tree, lambda t: t.detach().clone(memory_format=torch.contiguous_format))

        def final_state(net: FlatParams, buffers: Mapping[str, Tensor], state: Mapping[str, Tensor]):
            values = {**net.split(net.flat), **buffers}
            return {k: copied(values[k]) for k in state}  # the caller's key order
        return LocalResult(final_state(self.g_flat, self.g_buffers, g_state),
                           final_state(self.d_flat, self.d_buffers, d_state),
                           copied(self.g_flat.unflatten_adam_state(self.g_opt)),
                           copied(self.d_flat.unflatten_adam_state(self.d_opt)),
                           self.d_loss_sum / steps, self.g_loss_sum / steps)


class CudaGraphStep:
    """A local step replayed from a CUDA graph: one launch where the eager step makes hundreds.

    A small GAN's step on a GPU is bound by kernel launches, not arithmetic: on an H200 the replays ran 3.7x the
    eager steps at K=1 and 1.8x at K=10; at K=100 the kernels fill the GPU and graphs gain nothing
    (benchmarks/RESULTS.md). The first WARMUP calls run eagerly on a side stream (lazy initialisation must
    happen outside a capture, as torch's CUDA-graph notes say); the next call records `body` once and every
    call replays it, in this round and the next ones (LocalTrainer). A replay runs the recorded kernels on the same
    memory, so the result is the eager one: `body` must not sync with the host, must keep its state in tensors
    that outlive the calls (parameters, Adam state, buffers, loss sums, updated in place), and takes its inputs from
    static buffers each call fills.
    """

    WARMUP = 2

    def __init__(self, body, pool: tuple[int, int] | None = None):
        """`pool`: a memory pool shared with graphs replayed before or after this one, never in between."""
        self.body, self.pool = body, pool
        self.calls = 0
        self.inputs: list[Tensor] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, *inputs: Tensor) -> None:
        if self.inputs is None:
            self.inputs = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in inputs]
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x)
        if self.calls < self.WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.body(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, pool=self.pool):
                    self.body(*self.inputs)
            self.graph.replay()
        self.calls += 1


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
            return TritonClientConvolution.apply(x.contiguous(), weight.contiguous(), transposed, _pair(stride)[0],
                                                 _pair(padding)[0]), 0
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
    plain = bias is None and groups == 1 and set(_pair(dilation)) == {1} and set(_pair(output_padding)) == {0}
    return (x, weight, stride, padding) if plain else None


def _pair(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class ClientConvolutions(TorchFunctionMode):
    """FedConfig.conv_form: the form K clients' thin convolutions take under vmap.

    vmap runs K clients' convolution as one grouped convolution (groups=K), for which cuDNN picks slow algorithms
    when a group has 1 or 2 channels on a side, as D's first and G's last layer have: 4-6x one model's time for
    the same images on an H200 (benchmarks/RESULTS.md). Those layers (at most THIN channels on a side) are
    computed here as "triton": TritonClientConvolution (where triton_can_convolve, else as "grouped"), "block":
    block-diagonal convolutions over `block` clients at a time (block_diagonal_convolution), or "loop": K plain
    convolutions; "grouped" leaves them to vmap. The same result up to rounding. The wider layers stay vmap's:
    cuDNN's grouped convolutions were faster there than every other form measured, the Triton kernels included.
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


# ----------------------------------------------------------------------------
# Local training engine: Triton kernels for K clients' convolutions
# ----------------------------------------------------------------------------
# vmap makes K clients' convolution one grouped convolution (groups=K), which cuDNN runs at 4-6x one model's time
# over the same images where a client has 1 or 2 channels on a side (D's first layer, G's last). These kernels
# compute it as K implicit matrix products, one client per slice of the grid, with each client's weights: no im2col
# buffer, no block-diagonal zeros. Three kernels serve a convolution and a transposed one (the input gradient of a
# convolution): the forward, the input gradient and the weight gradient. Tensors are each client's contiguous
# NCHW: x (K, B, Cin, H, W), weight (K, Cout, Cin, kh, kw), output (K, B, Cout, H', W'). On an H200 they took those
# thin layers to 1.5-2x one model in float32 and 0.6-0.8x in bfloat16; for the 64 <-> 128-channel layers they were
# slower than cuDNN's grouped convolutions (2.8-3.4x one model against 1.7-2.2x), so those stay cuDNN's.


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
    (s, s2), (p, p2), (kh, kw) = _pair(stride), _pair(padding), weight_size[2:]
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


AUTO_BLOCK_CLIENTS = 10  # conv_form="auto": up to this many clients (float32) in one block-diagonal convolution


def _client_convolutions(config: FedConfig, looped: bool, clients: int,
                         device: torch.device) -> contextlib.AbstractContextManager:
    """The form of the thin convolutions under vmap. "auto" is what the benchmark measured fastest on an H200
    (benchmarks/RESULTS.md). With cuDNN's deterministic heuristics (the default): on a CUDA GPU with Triton, the
    Triton kernels from 2 clients on (the engine +22% over vmap's grouped convolutions at 100 clients, float32 and
    bfloat16; at 10 clients +19% over grouped, +2% over one block-diagonal convolution, and even with grouped in
    bfloat16); without Triton, all clients in one block-diagonal convolution at up to 10 clients in float32.
    vmap's grouped convolutions otherwise: for one client (a plain convolution then), and with cuDNN autotuned
    (deterministic=False), where they beat the Triton kernels by 9% at 10 clients. "triton" off a GPU computes as
    "grouped"."""
    form, block = config.conv_form, config.conv_block_clients
    if form == "auto":
        blocked = config.deterministic and not config.amp and 2 <= clients <= AUTO_BLOCK_CLIENTS
        if config.deterministic and clients >= 2 and device.type == "cuda" and triton is not None:
            form = "triton"
        else:
            form, block = ("block", clients) if blocked else ("grouped", 1)
    if form == "triton" and triton is None and device.type == "cuda":
        raise RuntimeError("conv_form='triton' needs the triton package, which this torch lacks: pip install triton, "
                           "or choose another conv_form")
    if looped or form == "grouped":
        return contextlib.nullcontext()
    return ClientConvolutions(form, block)


@contextlib.contextmanager
def _cudnn_algorithms(deterministic: bool):
    """FedConfig.deterministic: cuDNN restricted to deterministic algorithms chosen by its heuristics, so that the
    same seed gives the same result on a GPU (on an H200 the tests' same-seed runs differed without it, with the
    block-diagonal convolutions); or autotuned (cudnn.benchmark): the fastest it times, deterministic or not."""
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = deterministic, not deterministic
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


class BFloat16Compute(TorchFunctionMode):
    """FedConfig.amp: convolutions and linear layers in bfloat16, batch norm and the rest in float32.

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


def _map_tensors(tree: Any, fn) -> Any:
    """`fn` applied to every tensor in nested dicts, lists and tuples; anything else is kept."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map_tensors(t, fn) for t in tree)
    if isinstance(tree, dict):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    return tree


def _cast_floats(tree: Any, dtype: torch.dtype) -> Any:
    return _map_tensors(tree, lambda t: t.to(dtype) if t.is_floating_point() else t)


def _bfloat16_compute(enabled: bool) -> contextlib.AbstractContextManager:
    return BFloat16Compute() if enabled else contextlib.nullcontext()


def broadcast(state: Mapping[str, Tensor], count: int) -> dict[str, Tensor]:
    """The global state copied for `count` clients: {key: [count, ...]}."""
    return {k: v.detach().unsqueeze(0).expand(count, *v.shape).clone() for k, v in state.items()}


def _slice_client(tree: Any, row: int) -> Any:
    """Client `row`'s part of a stacked state or optimizer state, copied to the CPU."""
    if isinstance(tree, Tensor):
        return tree[row].detach().cpu().clone()
    return {k: _slice_client(v, row) for k, v in tree.items()}


def _stack_clients(trees: Sequence[Any], device: torch.device) -> Any:
    if isinstance(trees[0], Tensor):
        return torch.stack([t.to(device) for t in trees])
    return {k: _stack_clients([t[k] for t in trees], device) for k in trees[0]}


# ----------------------------------------------------------------------------
# Metrics: FID, KID, IS and conditional accuracy in the features of a small classifier
# ----------------------------------------------------------------------------
# The standard FID needs Inception weights downloaded at run time; for MNIST-like data the field computes the
# same statistics in the feature space of a classifier trained on the real data ("Frechet LeNet distance").


class Classifier(nn.Module):
    """A small CNN on images in [-1, 1]; its penultimate layer (`features`) is the metric space."""

    def __init__(self, *, image_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, width: int = 32,
                 num_features: int = 128):
        super().__init__()
        channels, height, width_px = image_shape
        self.config = dict(image_shape=tuple(image_shape), num_classes=num_classes, width=width,
                           num_features=num_features)
        self.num_features = num_features
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 5, padding=2), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=2), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),  # (B, 2w, H/4, W/4) -> (B, 2w * H/4 * W/4)
            nn.Linear(2 * width * (height // 4) * (width_px // 4), num_features), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Linear(num_features, num_classes)

    def features(self, images: Tensor) -> Tensor:
        return self.body(images)  # (B, num_features)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.body(images))  # (B, num_classes) logits


@torch.no_grad()
def classifier_outputs(classifier: Classifier, images: Tensor, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """Penultimate features [N, F] and logits [N, classes] (float64, CPU) of float images in [-1, 1] or uint8."""
    expected = tuple(classifier.config["image_shape"])
    if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images of shape {shape} given; the classifier takes a tensor "
                         f"[N, {', '.join(map(str, expected))}]")
    device = next(classifier.parameters()).device
    classifier.eval()
    features, logits = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size].to(device)
        chunk = to_float_images(chunk) if chunk.dtype == torch.uint8 else chunk.float()
        f = classifier.features(chunk)
        features.append(f.double().cpu())
        logits.append(classifier.head(f).double().cpu())
    return torch.cat(features), torch.cat(logits)


def train_classifier(dataset: str = "mnist", device: str | torch.device | None = None, *, epochs: int = 3,
                     batch_size: int = 128, lr: float = 1e-3, seed: int = 0, train_subset: int | None = None,
                     data_root: str | None = None, cache: bool = True, log: bool = True) -> tuple[Classifier, float]:
    """Train (or load from the cache) the metric classifier; returns it in eval mode and its test accuracy.

    Cached in cache_dir()/classifiers/, keyed by dataset, epochs, subset and seed.
    """
    _require(dataset in DATASETS, "dataset", dataset, f"one of {sorted(DATASETS)}")
    _require(_positive_int(epochs), "epochs", epochs, "an integer >= 1")
    device = pick_device() if device is None else torch.device(device)
    info = DATASETS[dataset]
    path = cache_dir() / "classifiers" / f"{dataset}_e{epochs}_n{train_subset or 'all'}_s{seed}.pt"
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # leave the caller's RNG be
        torch.manual_seed(seed)
        classifier = Classifier(image_shape=info.image_shape, num_classes=info.num_classes).to(device)
        if cache and path.is_file():
            saved = load_checkpoint(path, device)
            classifier.load_state_dict(saved["classifier"])
            return classifier.eval(), saved["test_accuracy"]
        images, labels = load_dataset(dataset, data_root, train=True)
        test_images, test_labels = load_dataset(dataset, data_root, train=False)
        rng = np.random.default_rng(seed)
        if train_subset is not None:
            keep = torch.from_numpy(rng.choice(len(labels), min(train_subset, len(labels)), replace=False))
            images, labels = images[keep], labels[keep]
        optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
        decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.3)  # lr / 3.3 each epoch
        images, labels = images.to(device), labels.to(device)
        for _ in range(epochs):
            classifier.train()
            order = torch.from_numpy(rng.permutation(len(labels))).to(device)
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                loss = F.cross_entropy(classifier(to_float_images(images[idx])), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            decay.step()
    _, logits = classifier_outputs(classifier, test_images)
    accuracy = (logits.argmax(1) == test_labels).double().mean().item()
    if log:
        print(f"metric classifier for {dataset}: {epochs} epochs on {len(labels):,} images, "
              f"test accuracy {accuracy:.4f}")
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + f".{os.getpid()}.partial")
        torch.save({"classifier": classifier.state_dict(), "test_accuracy": accuracy}, partial)
        os.replace(partial, path)
    return classifier.eval(), accuracy


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets [N, F], in float64."""
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # Tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a S_b (real, >= 0)
    eigenvalues = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0)
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * eigenvalues.sqrt().sum())


def kernel_distance(features_a: Tensor, features_b: Tensor, *, subsets: int = 50, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al., 2018): unbiased MMD^2 with the kernel (x.y / F + 1)^3; mean and std over subsets."""
    a, b = features_a.double(), features_b.double()
    size = min(subset_size, len(a), len(b))
    generator = torch.Generator().manual_seed(seed)
    estimates = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=generator)[:size]]
        y = b[torch.randperm(len(b), generator=generator)[:size]]
        k_xx, k_yy = (x @ x.T / a.shape[1] + 1) ** 3, (y @ y.T / a.shape[1] + 1) ** 3
        k_xy = (x @ y.T / a.shape[1] + 1) ** 3
        off_diagonal = size * (size - 1)
        estimates.append((k_xx.sum() - k_xx.trace()) / off_diagonal + (k_yy.sum() - k_yy.trace()) / off_diagonal
                         - 2 * k_xy.mean())
    values = torch.stack(estimates)
    return float(values.mean()), float(values.std(unbiased=False)) if subsets > 1 else 0.0


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` consecutive chunks; at most num_classes."""
    probabilities = logits.double().softmax(1)
    scores = []
    for chunk in probabilities.chunk(splits):
        marginal = chunk.mean(0, keepdim=True)
        kl = (chunk * (chunk.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(1)
        scores.append(kl.mean().exp())
    values = torch.stack(scores)
    return float(values.mean()), float(values.std(unbiased=False)) if splits > 1 else 0.0


def _label_metrics(logits: Tensor, labels: Tensor, num_classes: int) -> tuple[float, list[float]]:
    hits = (logits.argmax(1) == labels.cpu()).double()
    per_class = [float(hits[labels.cpu() == c].mean()) if (labels == c).any() else float("nan")
                 for c in range(num_classes)]
    return float(hits.mean()), per_class


class Evaluator:
    """Scores generators against one real reference set, whose features are computed once.

    `reference` holds the real-vs-real values: FID and KID of `train_images` against the reference
    (the floor), IS and accuracy of the reference images themselves (the ceiling).
    """

    def __init__(self, classifier: Classifier, real_images: Tensor, real_labels: Tensor, *, n: int = 10000,
                 seed: int = 0, train_images: Tensor | None = None, kid_subsets: int = 50):
        _require(_positive_int(n), "n", n, "an integer >= 1")
        self.classifier, self.n, self.seed, self.kid_subsets = classifier, n, seed, kid_subsets
        self.num_classes = classifier.config["num_classes"]
        pick = torch.randperm(len(real_labels), generator=torch.Generator().manual_seed(seed))[:n]
        self.real_labels = real_labels[pick].cpu()
        self.real_features, real_logits = classifier_outputs(classifier, real_images[pick])
        accuracy, per_class = _label_metrics(real_logits, self.real_labels, self.num_classes)
        self.reference: dict[str, Any] = {"is": inception_score(real_logits)[0], "cond_acc": accuracy,
                                          "per_class_acc": per_class}
        if train_images is not None:
            other = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed + 1))[:n]
            train_features, _ = classifier_outputs(classifier, train_images[other])
            self.reference["fid"] = frechet_distance(train_features, self.real_features)
            self.reference["kid"], self.reference["kid_std"] = self._kid(train_features)

    def _kid(self, features: Tensor) -> tuple[float, float]:
        return kernel_distance(features, self.real_features, subsets=self.kid_subsets, seed=self.seed)

    def __call__(self, generator: Generator) -> dict[str, Any]:
        """fid, kid, kid_std, is, is_std, cond_acc, per_class_acc of `n` class-balanced samples of `generator`."""
        labels = torch.arange(self.n) % self.num_classes  # balanced requests
        samples = torch.cat([generate(generator, labels[i:i + 1000], seed=self.seed + i)
                             for i in range(0, self.n, 1000)])
        if not torch.isfinite(samples).all():  # a diverged generator: nothing to measure
            return {**dict.fromkeys(("fid", "kid", "kid_std", "is", "is_std", "cond_acc"), math.nan),
                    "per_class_acc": [math.nan] * self.num_classes, "non_finite_samples": True}
        features, logits = classifier_outputs(self.classifier, samples)
        accuracy, per_class = _label_metrics(logits, labels, self.num_classes)
        kid, kid_std = self._kid(features)
        score, score_std = inception_score(logits)
        return {"fid": frechet_distance(features, self.real_features), "kid": kid, "kid_std": kid_std,
                "is": score, "is_std": score_std, "cond_acc": accuracy, "per_class_acc": per_class}


def evaluate(generator: Generator, classifier: Classifier, real_images: Tensor, real_labels: Tensor,
             n: int = 10000, seed: int = 0) -> dict[str, Any]:
    """One-off evaluation of `generator` (see Evaluator, which caches the real features across calls)."""
    return Evaluator(classifier, real_images, real_labels, n=n, seed=seed)(generator)


def training_images(config: FedConfig, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The images a federation of `config` trains on: all, or `train_subset` of them drawn by the seed."""
    if config.train_subset is not None and config.train_subset < len(labels):
        keep = np.sort(np.random.default_rng(config.seed).choice(len(labels), config.train_subset, replace=False))
        images, labels = images[keep], labels[keep]
    return images, labels


def make_evaluator(config: FedConfig, train_images: Tensor, device: str | torch.device | None = None, *,
                   log: bool = True) -> Evaluator:
    """The Evaluator a Federation of `config` scores with: its metric classifier (trained once, then cached), the
    real reference, and the classifier's test accuracy in `reference`."""
    classifier, accuracy = train_classifier(
        config.dataset, device, epochs=config.classifier_epochs, seed=config.seed,
        train_subset=config.classifier_subset, data_root=config.data_root, log=log)
    test_images, test_labels = load_dataset(config.dataset, config.data_root, train=False)
    evaluator = Evaluator(classifier, test_images, test_labels, n=config.eval_samples, seed=config.seed,
                          train_images=train_images)
    evaluator.reference["classifier_test_accuracy"] = accuracy
    return evaluator


def inception_fid(real_images: Tensor, fake_images: Tensor, device: str | torch.device = "cpu",
                  batch_size: int = 200) -> float | None:
    """The standard FID in Inception-v3 features, when torch-fidelity and its weights can be had.

    Offline or without torch-fidelity it prints one line saying it was skipped and why, and returns None.
    Images: float in [-1, 1] or uint8, [N, C, H, W]; grey images are repeated to 3 channels.
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=2048, normalize=True).to(device)
    except Exception as error:  # torch-fidelity missing, weights not downloadable: both mean "not here"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"Inception FID skipped: {reason}")
        return None
    for images, real in ((real_images, True), (fake_images, False)):
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size].to(device)
            chunk = to_float_images(chunk) if chunk.dtype == torch.uint8 else chunk.float()
            chunk = ((chunk + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)  # (B, 1|3, H, W) -> (B, 3, H, W) in [0, 1]
            metric.update(chunk, real=real)
    return float(metric.compute())


# what a centralized run shares with the federation it is compared with: data, model, optimisation, compute, scoring
CENTRALIZED_FIELDS = ("dataset", "data_root", "batch_size", "lr_g", "lr_d", "betas", "z_dim", "embed_dim", "ngf",
                      "ndf", "seed", "device", "amp", "cuda_graphs", "client_map", "conv_form", "conv_block_clients",
                      "deterministic", "eval_samples", "classifier_epochs", "classifier_subset", "out_dir",
                      "checkpoint_dir")


def centralized_config(config: FedConfig, steps: int) -> FedConfig:
    """The centralized counterpart of a federated config: one client, rounds of `steps` steps, nothing federated.

    Only CENTRALIZED_FIELDS are taken over; every federated knob (server rule, FedProx, compression, attacks,
    DP, stragglers, asynchrony) is at its default, so one client's "aggregation" is its own model. The client
    keeps its Adam state from round to round, so the rounds are one continuous training run.
    """
    return FedConfig(**{name: getattr(config, name) for name in CENTRALIZED_FIELDS}, num_clients=1,
                     local_steps=steps, optimizer_state="keep", eval_every=None, rounds=10 ** 6, checkpoint_every=0,
                     run_name=f"{config.run_name}-central")


def centralized_baseline(federation: "Federation", *, chunks_per_epoch: int = 10,
                         log: bool = True) -> list[dict[str, Any]]:
    """The federated model against one client holding all its data, trained by the same code.

    The centralized run (centralized_config: plain training, Adam never reset) is scored after chunks of
    1/`chunks_per_epoch` epoch: when it has seen as many images as the federation, and when it has trained as long
    (wall time, evaluation excluded). Returns table rows: federated, centralized at equal images, at equal wall time.
    """
    if not federation.history:
        raise ValueError("run the federation first: its history is empty")
    config = federation.config
    fed_images = federation.history[-1]["images_total"]
    fed_seconds = sum(r["seconds"] for r in federation.history)
    steps = max(1, math.ceil(len(federation.labels) / config.batch_size / chunks_per_epoch))
    central = Federation(centralized_config(config, steps), data=(federation.images, federation.labels), log=False)
    if federation.evaluator is None:
        federation.evaluate()  # builds the classifier and the real reference that both runs are scored with
    rows = [{"model": f"federated (K={config.num_clients})", "images": fed_images, "seconds": fed_seconds,
             **federation.evaluator(federation.generator)}]
    pending = {"equal images": lambda: central.history[-1]["images_total"] >= fed_images,
               "equal wall time": lambda: sum(r["seconds"] for r in central.history) >= fed_seconds}
    while pending:
        central.run_round()
        for name, reached in list(pending.items()):
            if reached():
                rows.append({"model": f"centralized, {name}", "images": central.history[-1]["images_total"],
                             "seconds": sum(r["seconds"] for r in central.history),
                             **federation.evaluator(central.generator)})
                del pending[name]
                if log:
                    print(f"centralized baseline: {name} reached after {central.round} rounds of {steps} steps")
    return rows


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = (
        "model", "images", "seconds", "fid", "kid", "is", "cond_acc")) -> str:
    """Rows of metrics as a fixed-width text table."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}" if abs(value) < 100 else f"{value:,.1f}"
        return f"{value:,}" if isinstance(value, int) else str(value)
    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Federation
# ----------------------------------------------------------------------------


class DivergenceError(RuntimeError):
    """A run that stopped learning: the global model went NaN/Inf or the discriminator loss collapsed."""


class Federation:
    """A federated cDCGAN run: global G and D, the clients' data, and the round loop.

    `run()` runs the remaining rounds; `run_round()` runs one, for notebooks that want to look
    between rounds. The global models are `.generator` and `.discriminator`; `.history` holds one
    record per round. A `strategy` object replaces the rule that config.strategy names; it is copied
    once for G and once for D, so each keeps its own server state.
    """

    def __init__(self, config: FedConfig, *, data: tuple[Tensor, Tensor] | None = None, resume: bool = False,
                 log: bool = True, strategy: Strategy | None = None):
        if not isinstance(config, FedConfig):
            raise TypeError(f"config must be a FedConfig, got {type(config).__name__}")
        if strategy is not None and not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a Strategy (see the Aggregation section) or None for "
                            f"config.strategy, got {type(strategy).__name__}")
        self.config, self.log = config, log
        self.device = pick_device(config.device)
        if config.amp and self.device.type == "cuda" and torch.cuda.get_device_capability(self.device)[0] < 8:
            _warn(f"amp=True on a {torch.cuda.get_device_name(self.device)}: GPUs before Ampere (e.g. Kaggle's T4 "
                  "and P100) have no bfloat16 tensor cores, so amp is likely slower than float32 there")
        images, labels = training_images(config, *(data if data is not None else
                                                    load_dataset(config.dataset, config.data_root)))
        self.images, self.labels = images.to(self.device), labels.to(self.device)  # uint8 and int64, resident
        self.parts = partition(labels, config.num_clients, config.partition, seed=config.seed,
                               **config.partition_kwargs())
        self.attackers = attacker_ids(config.num_clients, config.attack_fraction, config.seed)
        self.client_labels = self.labels  # what the clients train on: label-flipping attackers poison their own
        if config.attack == "label_flip" and self.attackers:
            poisoned = torch.as_tensor(np.concatenate([self.parts[c] for c in self.attackers]), device=self.device)
            self.client_labels = self.labels.clone()
            self.client_labels[poisoned] = DATASETS[config.dataset].num_classes - 1 - self.labels[poisoned]
        seed_everything(config.seed)
        generator, discriminator = build_models(config)
        self.generator, self.discriminator = generator.to(self.device), discriminator.to(self.device)
        networks = (("g", generator), ("d", discriminator))
        # keys each client keeps for itself: a whole network that is not synchronised, else its BN layers (FedBN)
        self._local_keys = {which: set(model.state_dict()) if not self.synced(which)
                            else norm_state_keys(model) if config.bn_policy == "local" else set()
                            for which, model in networks}
        self.strategies = {which: make_strategy(config, {n for n, _ in model.named_buffers()}) if strategy is None
                           else _bound_copy(strategy, {n for n, _ in model.named_buffers()})
                           for which, model in networks}
        self.strategy_name = config.strategy if strategy is None else type(strategy).__name__
        self._param_names = {which: {n for n, _ in model.named_parameters()} for which, model in networks}
        self.speeds = client_speeds(config.num_clients, config.client_speed_sigma, config.seed)
        self.clock = 0.0  # simulated time, in local steps of a speed-1 client
        self.in_flight: list[dict[str, Any]] = []  # async: clients training, with their results and finish time
        self.server_g_opt: torch.optim.Adam | None = None  # server_generator: the server's optimizer of G
        info = DATASETS[config.dataset]
        # one fixed noise a column, one label a row: grids over rounds stay comparable
        fixed = torch.randn(10, config.z_dim, generator=torch.Generator().manual_seed(config.seed))
        self.fixed_labels = torch.arange(info.num_classes).repeat_interleave(10)  # (100,)
        self.fixed_noise = fixed.repeat(info.num_classes, 1)  # (100, z_dim)
        self.client_store: dict[int, dict[str, Any]] = {}  # per-client state that persists across rounds
        self.history: list[dict[str, Any]] = []
        self.evaluator: Evaluator | None = None  # built on the first evaluation (trains the metric classifier)
        self.grid_snapshots: dict[int, Tensor] = {}  # round -> fixed-noise grid images, CPU
        self.round = 0
        self.run_dir = self._pick_run_dir(resume)
        self.out_dir = Path(config.out_dir) / self.run_dir.name
        good, checkpoint = _newest_loadable(self.run_dir, log) if resume else (None, None)
        if good is not None:
            self._set_aside_after(good)
            self._restore(good, checkpoint)
        else:
            self.grid_snapshots[0] = self.sample_grid()

    # -- set-up ---------------------------------------------------------------------------------
    def _pick_run_dir(self, resume: bool) -> Path:
        """checkpoint_dir/run_name, or run_name-2, -3, ... so that no earlier run's files are overwritten.

        A name is free when neither checkpoint_dir/name nor out_dir/name holds anything; `resume`
        takes the most recent run of this name that has a checkpoint.
        """
        checkpoints, outputs = Path(self.config.checkpoint_dir), Path(self.config.out_dir)
        name = self.config.run_name
        existing = [checkpoints / name] + sorted(checkpoints.glob(name + "-*"), key=lambda p: p.stat().st_mtime)
        existing = [p for p in existing if latest_checkpoint(p) is not None]
        if resume and existing:
            return existing[-1]
        candidate, n = name, 1
        while any(d.is_dir() and any(d.iterdir()) for d in (checkpoints / candidate, outputs / candidate)):
            n += 1
            candidate = f"{name}-{n}"
        return checkpoints / candidate

    def _set_aside_after(self, good: Path) -> None:
        """Rename checkpoints newer than `good` (they failed to load) to *.bad, so the run can write them again."""
        for path in list_checkpoints(self.run_dir):
            if path.name > good.name:
                aside = path.with_name(path.name + ".bad")
                path.rename(aside)
                if checksum_path(path).exists():
                    checksum_path(path).rename(checksum_path(aside))
                if self.log:
                    print(f"set aside {path} as {aside.name}: it did not pass its checksum or did not load")

    def _restore(self, path: Path, checkpoint: Mapping[str, Any]) -> None:
        saved = FedConfig.from_json(checkpoint["config"])
        differs = [f.name for f in dataclasses.fields(FedConfig)
                   if f.name not in ("rounds", "device") and getattr(saved, f.name) != getattr(self.config, f.name)]
        if differs:
            raise ValueError(f"cannot resume from {path}: the config differs in {differs}; "
                             "resume with the saved config (only rounds and device may change)")
        self.generator.load_state_dict(checkpoint["generator"])
        self.discriminator.load_state_dict(checkpoint["discriminator"])
        self.client_store = {int(k): v for k, v in checkpoint["client_store"].items()}
        self.history = checkpoint["history"]
        self.grid_snapshots = {int(k): v for k, v in checkpoint["grid_snapshots"].items()}
        self.round = checkpoint["round"]
        for which, strategy in self.strategies.items():  # the server state computes on this run's device
            strategy.load_state_dict(_map_tensors(checkpoint["strategies"][which], lambda t: t.to(self.device)))
        # format 1 checkpoints (before asynchrony and the server generator) lack these; simulated time restarts at 0
        self.clock, self.in_flight = checkpoint.get("clock", 0.0), checkpoint.get("in_flight", [])
        if checkpoint.get("server_g_opt") is not None:
            self.server_g_opt = torch.optim.Adam(self.generator.parameters(), lr=self.config.lr_g,
                                                 betas=self.config.betas)
            self.server_g_opt.load_state_dict(checkpoint["server_g_opt"])
        set_rng_state(checkpoint["rng"])
        if self.log:
            print(f"resumed from {path} (round {self.round})")

    # -- one round ------------------------------------------------------------------------------
    def synced(self, which: str) -> bool:
        """Whether network "g" or "d" is synchronised with the server (config.sync_networks)."""
        return self.config.sync_networks in ("both", which)

    def client_losses(self) -> dict[int, float]:
        """Each client's discriminator loss from the last round it trained (power-of-choice ranks by it)."""
        return {c: store["last_loss"] for c, store in self.client_store.items() if "last_loss" in store}

    def _client_start(self, which: str, model: nn.Module, plan: RoundPlan) -> dict[str, Tensor]:
        """The stacked state each selected client starts from: the global one, with its own local keys kept."""
        stacked = broadcast(model.state_dict(), len(plan.client_ids))
        local = self._local_keys[which]
        for row, client in enumerate(plan.client_ids):
            own = self.client_store.get(int(client), {}).get(f"{which}_local")
            for key in local if own is not None else ():
                stacked[key][row] = own[key].to(self.device)
        return stacked

    def _client_optimizers(self, which: str, plan: RoundPlan, params: Mapping[str, Tensor]) -> dict | None:
        if self.config.optimizer_state == "reset":
            return None
        fresh = _slice_client(adam_init({k: v[:1] for k, v in params.items()}), 0)
        trees = [self.client_store.get(int(c), {}).get(f"{which}_opt", fresh) for c in plan.client_ids]
        return _stack_clients(trees, self.device)

    def _bytes_down(self) -> int:
        """Bytes the server sends one client: the synchronised keys of the synchronised networks."""
        return sum(v.numel() * v.element_size() for which, model in (("g", self.generator), ("d", self.discriminator))
                   for k, v in model.state_dict().items() if k not in self._local_keys[which])

    def _train(self, plan: RoundPlan) -> dict[str, Any]:
        """Local training of the plan's clients; if it raises, each client alone, leaving out those that fail.

        Trained alone, a client draws the noise of the first row of the plan, so a round with a failing
        client is reproducible but not the batched round without it.
        """
        try:
            return self._train_together(plan)
        except Exception as error:  # noqa: BLE001 - a client's failure must not end the run
            if len(plan.client_ids) == 1:
                raise
            first_error = error
        results, failed = [], {}
        for row, client in enumerate(plan.client_ids):
            alone = dataclasses.replace(plan, client_ids=plan.client_ids[row:row + 1],
                                        sizes=plan.sizes[row:row + 1], steps=plan.steps[row:row + 1],
                                        batch_indices=plan.batch_indices[row:row + 1, :plan.steps[row]])
            try:
                results.append(self._train_together(alone))
            except Exception as error:  # noqa: BLE001
                failed[int(client)] = f"{type(error).__name__}: {error}"
        if not results:
            raise RuntimeError(f"round {plan.round}: the local training of every client failed") from first_error
        if self.log and failed:
            print(f"round {plan.round}: left out clients {sorted(failed)}: their local training raised "
                  f"({next(iter(failed.values()))})")
        merged: dict[str, Any] = {key: np.concatenate([r[key] for r in results])
                                  for key in ("client_ids", "sizes", "steps", "staleness")}
        for part in ("start", "final"):
            merged[part] = {which: {k: torch.cat([r[part][which][k] for r in results])
                                    for k in results[0][part][which]} for which in ("g", "d")}
        merged.update(d_loss=[x for r in results for x in r["d_loss"]],
                      g_loss=[x for r in results for x in r["g_loss"]], failed=failed)
        return merged

    def _train_together(self, plan: RoundPlan) -> dict[str, Any]:
        """Local training of the plan's clients from the current global models: their start and final states."""
        starts = {"g": self._client_start("g", self.generator, plan),
                  "d": self._client_start("d", self.discriminator, plan)}
        optimizers = {which: self._client_optimizers(which, plan, {k: v for k, v in starts[which].items()
                                                                    if k in self._param_names[which]})
                      for which in ("g", "d")}
        local = train_clients(self.generator, self.discriminator, starts["g"], starts["d"], self.images,
                              self.client_labels, plan, self.config, g_opt=optimizers["g"], d_opt=optimizers["d"],
                              prox_mu=self.strategies["g"].prox_mu, train_generator=not self.config.server_generator)
        d_losses, g_losses = local.d_loss.tolist(), local.g_loss.tolist()  # the round's one sync
        for row, client in enumerate(plan.client_ids):
            store = self.client_store.setdefault(int(client), {})
            store["last_loss"] = d_losses[row]
            if self.config.optimizer_state == "keep":
                store["g_opt"] = _slice_client(local.g_opt, row)
                store["d_opt"] = _slice_client(local.d_opt, row)
        return {"client_ids": plan.client_ids, "sizes": plan.sizes, "steps": plan.steps,
                "staleness": np.zeros(len(plan.client_ids)), "start": starts,
                "final": {"g": local.g_state, "d": local.d_state}, "d_loss": d_losses, "g_loss": g_losses}

    def _client_updates(self, which: str, updates: Mapping[str, Any], round_index: int) -> tuple[dict, int]:
        """What each client sends for one network: its update, attacked if it attacks, compressed with error
        feedback if asked for; and the bytes that takes a client.

        Parameters travel as updates (state - start); attacks and compression act on those. Buffers (BN
        running statistics, counters) travel as the client's values, dense: a running variance rebuilt from a
        stale or compressed difference can turn negative.
        """
        config, ids = self.config, updates["client_ids"]
        start, final = updates["start"][which], updates["final"][which]
        sent_keys = [k for k in final if k not in self._local_keys[which]]
        floats = [k for k in sent_keys if k in self._param_names[which]]
        update = {k: final[k] - start[k] for k in floats}  # (K, ...) each
        if config.attack in ("sign_flip", "noise", "nan"):
            for row, client in enumerate(ids):
                if client in self.attackers:
                    noise = torch.Generator(device=self.device).manual_seed(
                        derive_seed(config.seed, round_index, int(client), STREAM_ATTACK))
                    for k in floats:
                        update[k][row] = poison_update(update[k][row], config.attack, config.attack_scale, noise)
        residual_key = f"{which}_residual"
        feedback = config.compression != "none" and config.error_feedback
        for row, client in enumerate(ids if feedback else ()):
            carried = self.client_store[int(client)].get(residual_key)
            for k in floats if carried is not None else ():
                update[k][row] += carried[k].to(update[k].device)
        sent, nbytes = compress_updates(update, config.compression, config.topk_fraction)
        for row, client in enumerate(ids if feedback else ()):
            self.client_store[int(client)][residual_key] = {k: (update[k][row] - sent[k][row]).cpu() for k in floats}
        buffers, buffer_bytes = compress_updates({k: final[k] for k in sent_keys if k not in floats}, "none")
        return {**sent, **buffers}, nbytes + buffer_bytes

    def uploads(self, which: str) -> bool:
        """Whether clients send network "g" or "d" back (not a network kept local, nor G under server_generator)."""
        return self.synced(which) and not (which == "g" and self.config.server_generator)

    def _aggregate(self, updates: Mapping[str, Any], round_index: int) -> dict[str, Any]:
        """Clients: local keys kept, updates sent (see _client_updates). Server: clients whose update or loss
        is not finite are left out, then staleness weights, DP-FedAvg's clip and noise, FedNova and the strategy."""
        config, ids = self.config, updates["client_ids"]
        log: dict[str, Any] = {"bytes_up": 0, "server": {}, **({"failed": updates["failed"]} if "failed" in updates
                                                                else {})}
        sent: dict[str, dict[str, Tensor]] = {}
        usable = np.isfinite(updates["d_loss"]) & np.isfinite(updates["g_loss"])  # (K,)
        for which in ("g", "d"):
            final = updates["final"][which]
            for row, client in enumerate(ids if self._local_keys[which] else ()):
                self.client_store[int(client)][f"{which}_local"] = _slice_client(
                    {k: final[k] for k in self._local_keys[which]}, row)
            if self.uploads(which):
                sent[which], nbytes = self._client_updates(which, updates, round_index)
                log["bytes_up"] += nbytes * len(ids)
            for tensor in (sent[which] if self.uploads(which) else final).values():
                if tensor.dtype.is_floating_point:
                    usable &= torch.isfinite(tensor.flatten(1)).all(1).cpu().numpy()
        if not usable.all():
            log["excluded"] = ids[~usable].tolist()
            if self.log:
                print(f"round {round_index}: left out clients {log['excluded']}: their update or loss is NaN/Inf")
        if usable.sum() < config.min_clients:
            log["kept_global"] = True
            if self.log:
                print(f"round {round_index}: {int(usable.sum())} usable updates < min_clients={config.min_clients}; "
                      "the global models stay as they were")
            return log
        rows = torch.as_tensor(np.flatnonzero(usable))

        def usable_rows(tree: Mapping[str, Tensor]) -> dict[str, Tensor]:
            return dict(tree) if usable.all() else {k: v[rows.to(v.device)] for k, v in tree.items()}
        weights, steps = updates["sizes"][usable].astype(np.float64), updates["steps"][usable]
        info = {"client_ids": ids[usable], "steps": steps, "staleness": updates["staleness"][usable]}
        scale = staleness_weight(info["staleness"], config.staleness, config.staleness_a, config.staleness_b)
        attacked = config.attack in ("sign_flip", "noise") and any(c in self.attackers for c in info["client_ids"])
        received = {which: usable_rows(tree) for which, tree in sent.items()}
        if config.dp_clip is not None:  # DP covers everything sent: parameter updates and buffer changes
            buffer_changes = {}
            for which, tree in received.items():
                buffers = [k for k, v in tree.items() if k not in self._param_names[which] and v.is_floating_point()]
                final, start = (usable_rows({k: updates[part][which][k] for k in buffers})
                                for part in ("final", "start"))
                buffer_changes[which] = {k: final[k] - start[k] for k in buffers}
            noisy = self._privatize({which: {**received[which], **buffer_changes[which]} for which in received},
                                    round_index, log)
        for which, model in (("g", self.generator), ("d", self.discriminator)):
            final = usable_rows(updates["final"][which])
            if not self.synced(which):  # nothing is sent; the average only serves to sample from
                model.load_state_dict(fedavg_stacked(final, weights))
                continue
            if not self.uploads(which):  # G under server_generator: trained below, on the server
                continue
            global_state = model.state_dict()
            floats = [k for k in received[which] if k in self._param_names[which]]
            effective, client_weights = dict(final), weights  # as the clients left them: exact when unchanged
            if config.dp_clip is not None:  # one noisy mean update, applied as a single client
                effective = {k: (global_state[k] + noisy[which][k] if k in noisy[which]
                                 else final[k].amax(0)).unsqueeze(0) for k in final}
                for k in effective:  # post-processing keeps DP: a noisy running variance must stay >= 0
                    if k.endswith("running_var"):
                        effective[k].clamp_(min=0)
                client_weights = np.ones(1)
            elif config.compression != "none" or attacked or (scale != 1).any():  # global + weight x what was sent
                effective.update(scale_updates(global_state, {k: global_state[k] + received[which][k] for k in floats},
                                               torch.as_tensor(scale), floats))
            if config.step_normalisation == "fednova" and config.dp_clip is None:
                effective = fednova_rescale(global_state, effective, steps, weights, floats)
            strategy = self.strategies[which]
            model.load_state_dict(strategy.aggregate(global_state, effective, client_weights, info))
            if strategy.last_log:
                log["server"][which] = dict(strategy.last_log)
        if config.server_generator:
            log["server_g_loss"] = self._train_server_generator(round_index, int(round(float(np.mean(steps)))))
        return log

    def _privatize(self, received: Mapping[str, Mapping[str, Tensor]], round_index: int,
                   log: dict[str, Any]) -> dict[str, dict[str, Tensor]]:
        """DP-FedAvg on what the clients sent (G and D together): clipped, summed, noised; epsilon into the log."""
        config = self.config
        expected = clients_per_round(config.num_clients, config.client_fraction)
        noise = torch.Generator(device=self.device).manual_seed(derive_seed(config.seed, round_index, STREAM_DP))
        which = list(received)
        noisy, norms = privatize_updates([received[w] for w in which], config.dp_clip, config.dp_noise_multiplier,
                                         expected, noise)
        log["dp_clipped"] = int((norms > config.dp_clip).sum())
        log["dp_norm_median"] = float(norms.median())
        log["epsilon"] = (dp_epsilon(config.dp_noise_multiplier, expected / config.num_clients, round_index,
                                     config.dp_delta) if config.dp_noise_multiplier > 0 else math.inf)
        return dict(zip(which, noisy))

    def _train_server_generator(self, round_index: int, steps: int) -> float:
        """DP-FedAvg-GAN's server step: G trained against a copy of the aggregated D; returns G's mean loss."""
        config = self.config
        steps = config.server_g_steps or max(1, steps)
        if self.server_g_opt is None:
            self.server_g_opt = torch.optim.Adam(self.generator.parameters(), lr=config.lr_g, betas=config.betas)
        critic = copy.deepcopy(self.discriminator).train().requires_grad_(False)
        draws = torch.Generator(device=self.device).manual_seed(derive_seed(config.seed, round_index, STREAM_NOISE, 1))
        num_classes = DATASETS[config.dataset].num_classes
        total = torch.zeros((), device=self.device)
        self.generator.train()
        for _ in range(steps):
            z = torch.randn((config.batch_size, config.z_dim), generator=draws, device=self.device)
            y = torch.randint(num_classes, (config.batch_size,), generator=draws, device=self.device)
            with _bfloat16_compute(config.amp):
                logits = critic(self.generator(z, y), y).float()
            loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
            self.server_g_opt.zero_grad()
            loss.backward()
            self.server_g_opt.step()
            total += loss.detach()
        return float(total) / steps

    def _watchdog(self, record: Mapping[str, Any]) -> None:
        """Stop with a clear message when the global model went NaN/Inf or D's loss collapsed for several rounds."""
        config = self.config

        def advice() -> str:
            last_good = latest_checkpoint(self.run_dir)
            return (f"The last checkpoint is {last_good} (resume=True continues from it); try lower learning rates, "
                    "a robust strategy or update_threshold." if last_good else "No checkpoint was saved yet.")
        for name, model in (("generator", self.generator), ("discriminator", self.discriminator)):
            broken = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not v.isfinite().all()]
            if broken:
                raise DivergenceError(f"round {record['round']}: the global {name} has NaN/Inf in {broken[:3]}. "
                                      + advice())
        rounds = config.watchdog_rounds
        recent = [r["d_loss"] for r in [*self.history, record][-rounds:]] if rounds else []
        if rounds and len(recent) == rounds and all(loss < config.collapse_loss for loss in recent):
            raise DivergenceError(f"round {record['round']}: the discriminator loss stayed below "
                                  f"collapse_loss={config.collapse_loss} for {rounds} rounds ({recent}); "
                                  "the generator no longer learns. " + advice())

    def _async_updates(self, round_index: int) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """FedBuff-style asynchrony: keep `concurrency` clients training, apply the next `async_buffer` arrivals.

        A client trains from the global model of the moment it is dispatched and arrives steps / speed
        time units later; its update is weighted by staleness (server versions since its dispatch).
        """
        config, K = self.config, self.config.num_clients
        concurrency = clients_per_round(K, config.client_fraction)
        buffer = config.async_buffer or max(1, concurrency // 2)
        busy = {entry["client"] for entry in self.in_flight}
        idle = [c for c in range(K) if c not in busy]
        log: dict[str, Any] = {"dropped_out": [], "late": [], "trained": [], "images": 0}
        if concurrency > len(self.in_flight):
            rng = np.random.default_rng(derive_seed(config.seed, round_index, STREAM_SELECTION))
            ids = choose_clients(idle, concurrency - len(self.in_flight), rng, policy=config.selection,
                                 sizes=[len(p) for p in self.parts], losses=self.client_losses(),
                                 candidates=config.poc_candidates)
            trained = self._train(plan_clients(config, self.parts, ids, round_index))
            for row, client in enumerate(ids):
                self.in_flight.append({
                    "client": int(client), "version": self.round, "size": int(trained["sizes"][row]),
                    "steps": int(trained["steps"][row]),
                    "finish": float(self.clock + trained["steps"][row] / self.speeds[client]),
                    "d_loss": trained["d_loss"][row], "g_loss": trained["g_loss"][row],
                    **{f"{which}_{part}": _slice_client(trained[part][which], row)
                       for which in ("g", "d") for part in ("start", "final")}})
            log.update(trained=ids.tolist(), images=int(trained["steps"].sum()) * config.batch_size,
                       bytes_down=self._bytes_down() * len(ids))
        self.in_flight.sort(key=lambda entry: (entry["finish"], entry["client"]))
        arrived, self.in_flight = self.in_flight[:buffer], self.in_flight[buffer:]
        log["sim_time"] = max(e["finish"] for e in arrived) - self.clock
        lost = np.random.default_rng(derive_seed(config.seed, round_index, STREAM_DROPOUT)).random(
            len(arrived)) < config.dropout
        log["dropped_out"] = [e["client"] for e, gone in zip(arrived, lost) if gone]
        arrived = [e for e, gone in zip(arrived, lost) if not gone]
        if not arrived:
            return None, log
        updates = {"client_ids": np.array([e["client"] for e in arrived]),
                   "sizes": np.array([e["size"] for e in arrived]), "steps": np.array([e["steps"] for e in arrived]),
                   "staleness": np.array([self.round - e["version"] for e in arrived], dtype=np.float64),
                   "d_loss": [e["d_loss"] for e in arrived], "g_loss": [e["g_loss"] for e in arrived],
                   **{part: {which: _stack_clients([e[f"{which}_{part}"] for e in arrived], self.device)
                             for which in ("g", "d")} for part in ("start", "final")}}
        log["staleness"] = updates["staleness"].tolist()
        return updates, log

    def run_round(self) -> dict[str, Any]:
        """Select, broadcast, train locally, aggregate, log: one communication round (async: one server update)."""
        config = self.config
        start = time.perf_counter()
        if config.sync_mode == "async":
            updates, log = self._async_updates(self.round + 1)
        else:
            plan = plan_round(config, self.parts, self.round + 1, self.client_losses())
            updates = self._train(plan) if len(plan.client_ids) else None
            log = {"dropped_out": plan.dropped_out, "late": plan.late, "sim_time": plan.sim_time,
                   "images": int(plan.steps.sum()) * config.batch_size,
                   "bytes_down": self._bytes_down() * len(plan.client_ids)}
        if updates is not None:
            log.update(self._aggregate(updates, self.round + 1))
        elif self.log:
            print(f"round {self.round + 1}: no client reported back; the global models stay as they were")

        self.round += 1
        self.clock += log["sim_time"]
        seconds = time.perf_counter() - start
        weights = updates["sizes"].astype(np.float64) if updates is not None else None
        previous = self.history[-1] if self.history else {}
        record = {
            "round": self.round,
            "clients": updates["client_ids"].tolist() if updates is not None else [],
            "d_loss": float(np.average(updates["d_loss"], weights=weights)) if updates is not None else math.nan,
            "g_loss": float(np.average(updates["g_loss"], weights=weights)) if updates is not None else math.nan,
            "d_loss_clients": updates["d_loss"] if updates is not None else [],
            "g_loss_clients": updates["g_loss"] if updates is not None else [],
            "seconds": seconds,
            "images_total": log["images"] + previous.get("images_total", 0),
            "images_per_s": log["images"] / seconds,
            "sim_time_total": self.clock,
            "bytes_total": log.get("bytes_up", 0) + log.get("bytes_down", 0) + previous.get("bytes_total", 0),
            **log,
        }
        self._watchdog(record)
        every = config.eval_every
        if every is not None and ((every and self.round % every == 0) or self.round == config.rounds):
            eval_start = time.perf_counter()
            record["metrics"] = self.evaluate()
            record["eval_seconds"] = time.perf_counter() - eval_start
        self.history.append(record)
        self.grid_snapshots[self.round] = self.sample_grid()
        every = config.checkpoint_every
        if (every and self.round % every == 0) or self.round == config.rounds:
            self.save_checkpoint()
        return record

    def evaluate(self) -> dict[str, Any]:
        """Metrics of the global generator against the real test set (see Evaluator; its `reference` too)."""
        if self.evaluator is None:
            self.evaluator = make_evaluator(self.config, self.images, self.device, log=self.log)
        return self.evaluator(self.generator)

    def run(self, rounds: int | None = None, progress: bool = True) -> "Federation":
        """Run until `rounds` (default: config.rounds) rounds are done; one log line a round."""
        from tqdm.auto import tqdm

        target = self.config.rounds if rounds is None else rounds
        bar = tqdm(range(self.round, target), desc="rounds", disable=not progress)
        for _ in bar:
            record = self.run_round()
            bar.set_postfix(d_loss=f"{record['d_loss']:.3f}", g_loss=f"{record['g_loss']:.3f}")
            if self.log:
                bar.write(format_round(record))
        return self

    # -- outputs --------------------------------------------------------------------------------
    def sample_grid(self) -> Tensor:
        """The global generator on the fixed noise and labels: [100, C, H, W] in [-1, 1], CPU."""
        return generate(self.generator, self.fixed_labels, noise=self.fixed_noise).cpu()

    def save_run_info(self) -> dict[str, Any]:
        """Write env.json (env_report) and config.json into the run's output folder; returns the report."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        report = env_report()
        (self.out_dir / "env.json").write_text(json.dumps(report, indent=1))
        (self.out_dir / "config.json").write_text(self.config.to_json())
        return report

    def save_checkpoint(self) -> Path:
        """checkpoint_dir/<run>/round_XXXX.pt: global models, client state, history, config."""
        path = self.run_dir / f"round_{self.round:04d}.pt"
        save_checkpoint(path, {
            "format": 2,
            "round": self.round,
            "config": self.config.to_json(),
            "generator_config": self.generator.config,
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "client_store": {str(k): v for k, v in self.client_store.items()},
            "history": self.history,
            "grid_snapshots": {str(k): v for k, v in self.grid_snapshots.items()},
            "strategies": {which: strategy.state_dict() for which, strategy in self.strategies.items()},
            "clock": self.clock,
            "in_flight": self.in_flight,
            "server_g_opt": self.server_g_opt.state_dict() if self.server_g_opt is not None else None,
            "rng": rng_state(),  # the rounds draw from (seed, round)-derived generators; this is the caller's
        })
        return path


def format_round(record: Mapping[str, Any]) -> str:
    """One log line for a round."""
    line = (f"round {record['round']:3d} | D {record['d_loss']:.3f} | G {record['g_loss']:.3f} | "
            f"{record['seconds']:.1f} s | {record['images_per_s']:,.0f} img/s")
    if "metrics" in record:
        m = record["metrics"]
        line += f" | FID {m['fid']:.1f} | IS {m['is']:.2f} | cond_acc {m['cond_acc']:.3f}"
    return line


def run_federation(config: FedConfig, *, resume: bool = False, data: tuple[Tensor, Tensor] | None = None,
                   progress: bool = True) -> Federation:
    """Run a federated cDCGAN to config.rounds; `resume` continues from the run's latest checkpoint."""
    return Federation(config, data=data, resume=resume).run(progress=progress)


def describe_partition(config: FedConfig) -> str:
    """The partition of a config in a few characters: "iid", "dirichlet(0.1)", "shards(2)"."""
    params = [str(getattr(config, n)) for n in PARTITION_PARAMS[config.partition] if n != "min_size"]
    return f"{config.partition}({', '.join(params)})" if params else config.partition


def run_ablation(base: FedConfig, cells: Mapping[str, Mapping[str, Any]], *,
                 data: tuple[Tensor, Tensor] | None = None, evaluator: Evaluator | None = None, log: bool = True
                 ) -> tuple[list[dict[str, Any]], dict[str, Federation]]:
    """One federation per cell, each `base` with the cell's overrides, on the same data, seed and metric classifier.

    A cell's "strategy" may be a Strategy object instead of a name. The metric classifier is `evaluator`'s when
    given (to score on the scale of an earlier grid), else the first cell's. Returns a table row a cell (the cell's
    overrides; final metrics; images seen; training seconds, evaluation excluded; simulated time;
    megabytes sent; epsilon of a DP run) and the federations, for curves and sample grids.
    """
    data = data if data is not None else load_dataset(base.dataset, base.data_root)
    rows: list[dict[str, Any]] = []
    runs: dict[str, Federation] = {}
    for name, overrides in cells.items():
        overrides = dict(overrides)
        rule = overrides.pop("strategy") if isinstance(overrides.get("strategy"), Strategy) else None
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        config = dataclasses.replace(base, **overrides, run_name=f"{base.run_name}-{slug}")
        federation = Federation(config, data=data, log=False, strategy=rule)
        federation.evaluator = evaluator  # one metric classifier and real reference for every cell
        stopped = ""
        try:
            federation.run(progress=False)
        except DivergenceError as error:  # a diverged cell is a result of the grid, not the end of it
            stopped = str(error)
            if log:
                print(f"{name}: stopped: {error}")
        last = federation.history[-1] if federation.history else {"images_total": 0, "bytes_total": 0}
        metrics = (None if stopped else last.get("metrics")) or federation.evaluate()
        evaluator = federation.evaluator
        selected = clients_per_round(config.num_clients, config.client_fraction)
        row = {**overrides, **({"stopped": stopped} if stopped else {}), "cell": name,
               "strategy": federation.strategy_name,
               "partition": describe_partition(config), "clients": f"{selected}/{config.num_clients}",
               "images": last["images_total"], "seconds": sum(r["seconds"] for r in federation.history),
               "sim_time": federation.clock, "MB": last["bytes_total"] / 1e6,
               **({"epsilon": last["epsilon"]} if "epsilon" in last else {}),
               **{k: metrics[k] for k in ("fid", "kid", "is", "cond_acc")}}
        rows.append(row)
        runs[name] = federation
        if log:
            print(f"{name:34s} FID {row['fid']:7.1f} | cond_acc {row['cond_acc']:.3f} | {row['seconds']:5.0f} s | "
                  f"{row['MB']:8,.0f} MB", flush=True)
    return rows, runs


def run_seeds(base: FedConfig, cells: Mapping[str, Mapping[str, Any]], seeds: Sequence[int], *,
              data: tuple[Tensor, Tensor] | None = None, evaluator: Evaluator | None = None,
              known: Mapping[str, Mapping[str, Any]] | None = None, log: bool = True
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each cell of a grid again at every seed, so that a difference between cells can be held against the spread
    of one cell over seeds (the seed draws the partition, the initial models, the batches and the noise).

    `known` maps cell names to rows already run at `base.seed` (the grid's), reused rather than run again; pass the
    grid's `evaluator` with them so every seed is scored by the same classifier. Returns a row a cell and seed
    (with "seed") and a summary a cell: "fid@s" and "cond_acc@s" for each seed s, then the mean and the standard
    deviation over seeds of each ("fid_mean", "fid_sd", ...).
    """
    seeds = list(seeds)
    _require(len(seeds) >= 2 and len(set(seeds)) == len(seeds) and all(map(_non_negative_int, seeds)), "seeds",
             seeds, "two or more distinct integers >= 0")
    known = dict(known or {})
    _require(not known or evaluator is not None, "evaluator", evaluator,
             "the grid's Evaluator when known rows are reused (else the seeds are scored by another classifier)")

    def reused(name: str, seed: int) -> bool:
        return seed == base.seed and name in known

    def label(name: str, seed: int) -> str:
        return f"{name} | seed {seed}"

    todo = {label(name, seed): {**overrides, "seed": seed}
            for name, overrides in cells.items() for seed in seeds if not reused(name, seed)}
    new_rows, _ = run_ablation(base, todo, data=data, evaluator=evaluator, log=log)
    found = iter(new_rows)
    rows, summary = [], []
    for name in cells:
        by_seed = {seed: ({**known[name], "cell": label(name, seed), "seed": seed}
                          if reused(name, seed) else next(found)) for seed in seeds}
        rows += by_seed.values()
        line: dict[str, Any] = {"cell": name, "seeds": len(seeds)}
        for metric in ("fid", "cond_acc"):
            values = np.array([by_seed[seed][metric] for seed in seeds], dtype=float)
            line.update({f"{metric}@{seed}": float(v) for seed, v in zip(seeds, values)})
            line.update({f"{metric}_mean": float(values.mean()), f"{metric}_sd": float(values.std(ddof=1))})
        summary.append(line)
    return rows, summary


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupted or not a checkpoint."""


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def checksum_path(path: str | os.PathLike) -> Path:
    """The SHA-256 file beside a checkpoint (`sha256sum -c` reads it)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write atomically (temporary file, fsync, rename) with a SHA-256 file; never replaces an existing checkpoint.

    The checksum is written first, so a run killed at any moment leaves either a complete checkpoint with its
    checksum or no checkpoint of that round (a stray checksum or .partial file is ignored and replaced).
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; checkpoints are never overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    data = buffer.getvalue()
    _write_atomically(checksum_path(path), f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode())
    _write_atomically(path, data)
    return path


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's contents, checked against its SHA-256 file and loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = path.read_bytes()
    expected = checksum_path(path)
    if expected.is_file():
        digest = hashlib.sha256(data).hexdigest()
        recorded = (expected.read_text().split() or [""])[0]
        if digest != recorded:
            raise CheckpointError(f"{path} is corrupted or truncated: its SHA-256 {digest[:12]}... does not match "
                                  f"{expected.name} ({recorded[:12]}...); load an earlier checkpoint of the run "
                                  "(latest_good_checkpoint finds it)")
    try:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__}: {error})") from error


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """A run's checkpoints, oldest round first."""
    return sorted(Path(run_dir).glob("round_*.pt"))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _newest_loadable(run_dir: str | os.PathLike, log: bool) -> tuple[Path | None, dict[str, Any] | None]:
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as error:
            if log:
                print(f"skipping a bad checkpoint: {error}")
    return None, None


def latest_good_checkpoint(run_dir: str | os.PathLike, *, log: bool = True) -> Path | None:
    """The newest checkpoint of a run that passes its checksum and loads; the bad ones after it are reported."""
    return _newest_loadable(run_dir, log)[0]


def save_history(history: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """history.json (everything) and history.csv (one row a round, scalar columns, metrics flattened)."""
    import csv

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / "history.json", out_dir / "history.csv"
    json_path.write_text(json.dumps(list(history), indent=1))
    rows = []
    for record in history:
        row = {k: v for k, v in record.items() if not isinstance(v, (list, dict))}
        row.update({k: v for k, v in record.get("metrics", {}).items() if not isinstance(v, list)})
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> Generator:
    """Rebuild the global generator saved in a checkpoint, in eval mode."""
    checkpoint = load_checkpoint(path, device)
    generator = Generator(**checkpoint["generator_config"]).to(device)
    generator.load_state_dict(checkpoint["generator"])
    return generator.eval()


# ----------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------


def _integer_rounds(ax) -> None:
    """Label an x axis of rounds with whole numbers (matplotlib's default ticks fall at 2.5, 7.5, ...)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _finish(fig, save_to: str | os.PathLike | None):
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_to, dpi=120, bbox_inches="tight")
    return fig


def image_grid(images: Tensor, nrow: int = 10) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> an [H', W', C] float array in [0, 1] for imshow."""
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().cpu(), nrow=nrow, normalize=True, value_range=(-1, 1), pad_value=1)
    return grid.permute(1, 2, 0).numpy()  # (C, H', W') -> (H', W', C)


def plot_images(images: Tensor, *, nrow: int = 10, title: str = "", row_labels: Sequence[str] | None = None,
                ax=None, save_to: str | os.PathLike | None = None):
    """A grid of images; with `row_labels`, each row is named on the left (e.g. the digit it shows)."""
    import matplotlib.pyplot as plt

    if ax is None:
        rows = math.ceil(len(images) / nrow)
        fig, ax = plt.subplots(figsize=(0.5 * nrow + 0.6, 0.5 * rows + 0.5))
    fig = ax.figure
    ax.imshow(image_grid(images, nrow))
    ax.set_title(title)
    ax.set_xticks([])
    if row_labels is None:
        ax.set_yticks([])
    else:
        cell = images.shape[-2] + 2  # make_grid pads 2 pixels
        ax.set_yticks([2 + cell * i + images.shape[-2] / 2 for i in range(len(row_labels))])
        ax.set_yticklabels(row_labels)
        ax.tick_params(length=0)
    return _finish(fig, save_to)


def plot_label_grid(images: Tensor, class_names: Sequence[str] = tuple("0123456789"), *, title: str = "",
                    ax=None, save_to: str | os.PathLike | None = None):
    """A label-major grid (one row per class, e.g. Federation.sample_grid()) with the class on each row."""
    return plot_images(images, nrow=len(images) // len(class_names), title=title, row_labels=class_names, ax=ax,
                       save_to=save_to)


def plot_grid_evolution(snapshots: Mapping[int, Tensor], rounds: Sequence[int] | None = None, *,
                        class_names: Sequence[str] = tuple("0123456789"), save_to: str | os.PathLike | None = None):
    """Fixed-noise label grids side by side at a few rounds (default: up to 5, first to last)."""
    import matplotlib.pyplot as plt

    available = sorted(snapshots)
    if rounds is None:
        picks = np.unique(np.linspace(0, len(available) - 1, min(5, len(available))).round().astype(int))
        rounds = [available[i] for i in picks]
    missing = [r for r in rounds if r not in snapshots]
    if missing:
        raise ValueError(f"rounds {missing} have no snapshot; available: {available}")
    fig, axes = plt.subplots(1, len(rounds), figsize=(3.2 * len(rounds), 3.4), squeeze=False)
    for ax, r in zip(axes[0], rounds):
        plot_label_grid(snapshots[r], class_names, title=f"round {r}", ax=ax)
    fig.tight_layout()
    return _finish(fig, save_to)


def plot_losses(history: Sequence[Mapping[str, Any]], *, ax=None, save_to: str | os.PathLike | None = None):
    """Mean D and G loss per round (thick), each client's (thin)."""
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("history is empty: run at least one round first")
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3.5))
    rounds = [r["round"] for r in history]
    for key, color in (("d_loss", "tab:blue"), ("g_loss", "tab:orange")):
        for r in history:
            ax.scatter([r["round"]] * len(r[f"{key}_clients"]), r[f"{key}_clients"], s=6, color=color, alpha=0.3)
        ax.plot(rounds, [r[key] for r in history], color=color, lw=2, marker="o",
                label=f"{'discriminator' if key == 'd_loss' else 'generator'} (mean of clients)")
    _integer_rounds(ax)
    ax.set_ylabel("loss (BCE)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _finish(ax.figure, save_to)


def plot_partition(labels: Any, parts: Sequence[np.ndarray], *, class_names: Sequence[str] | None = None,
                   ax=None, save_to: str | os.PathLike | None = None):
    """Heatmap of images per (client, label), annotated with the counts."""
    import matplotlib.pyplot as plt

    counts = partition_report(labels, parts, len(class_names) if class_names else None)
    if ax is None:
        fig, ax = plt.subplots(figsize=(0.6 * counts.shape[1] + 2, 0.35 * counts.shape[0] + 1.2))
    image = ax.imshow(counts, cmap="viridis", aspect="auto")
    ax.figure.colorbar(image, ax=ax, label="images")
    ax.set_xticks(range(counts.shape[1]))
    ax.set_xticklabels(class_names or range(counts.shape[1]))
    ax.set_yticks(range(counts.shape[0]))
    ax.set_xlabel("label")
    ax.set_ylabel("client")
    if counts.size <= 400:
        threshold = counts.max() / 2
        for (row, col), value in np.ndenumerate(counts):
            ax.text(col, row, str(value), ha="center", va="center", fontsize=7,
                    color="black" if value > threshold else "white")
    ax.set_title(f"{counts.shape[0]} clients, {counts.sum():,} images")
    return _finish(ax.figure, save_to)


def draw_checkpoint_samples(run_dir: str | os.PathLike, round_index: int, label: int, n: int = 10, seed: int = 0):
    """The figure an interactive browser shows: `n` samples of `label` from the generator saved at a round."""
    path = Path(run_dir) / f"round_{round_index:04d}.pt"
    if not path.is_file():
        saved = [int(p.stem.split("_")[1]) for p in list_checkpoints(run_dir)]
        raise ValueError(f"round {round_index} has no checkpoint in {run_dir}; saved rounds: {saved}")
    generator = load_generator(path)
    images = generate(generator, [label] * n, seed=seed)
    return plot_images(images, nrow=n, title=f"round {round_index}: {n} samples of label {label}")


def browse_checkpoints(run_dir: str | os.PathLike, class_names: Sequence[str] = tuple("0123456789")):
    """ipywidgets browser: a slider over the saved rounds and a dropdown of labels."""
    import ipywidgets
    import matplotlib.pyplot as plt

    rounds = [int(p.stem.split("_")[1]) for p in list_checkpoints(run_dir)]
    if not rounds:
        raise ValueError(f"no checkpoints in {run_dir}")

    def show(round_index: int, label: int) -> None:
        draw_checkpoint_samples(run_dir, round_index, label)
        plt.show()

    return ipywidgets.interact(
        show,
        round_index=ipywidgets.SelectionSlider(options=rounds, value=rounds[-1], description="round"),
        label=ipywidgets.Dropdown(options=[(name, i) for i, name in enumerate(class_names)], value=0,
                                  description="label"))


def plot_metrics(history: Sequence[Mapping[str, Any]], reference: Mapping[str, Any] | None = None, *,
                 save_to: str | os.PathLike | None = None):
    """FID, conditional accuracy and IS over the evaluated rounds; dashed: the real-data reference."""
    import matplotlib.pyplot as plt

    evaluated = [r for r in history if "metrics" in r]
    if not evaluated:
        raise ValueError("no round in the history was evaluated (set eval_every)")
    rounds = [r["round"] for r in evaluated]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.3))
    for ax, (key, title) in zip(axes, (("fid", "FID (classifier features), lower is better"),
                                       ("cond_acc", "conditional accuracy"), ("is", "IS (classifier)"))):
        ax.plot(rounds, [r["metrics"][key] for r in evaluated], marker="o", label="generated")
        if reference is not None and key in reference:
            ax.axhline(reference[key], ls="--", color="gray",
                       label="real train vs test" if key == "fid" else "real test images")
        ax.set_title(title)
        _integer_rounds(ax)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _finish(fig, save_to)


def plot_per_class_accuracy(per_class_acc: Sequence[float], reference: Sequence[float] | None = None, *,
                            class_names: Sequence[str] = tuple("0123456789"), title: str = "",
                            save_to: str | os.PathLike | None = None):
    """Bars: how often a generated image of each requested label is classified as that label; ticks: real images."""
    import matplotlib.pyplot as plt

    if len(per_class_acc) != len(class_names) or (reference is not None and len(reference) != len(class_names)):
        raise ValueError(f"per_class_acc and reference need one value per class ({len(class_names)}); got "
                         f"{len(per_class_acc)} and {None if reference is None else len(reference)}")
    fig, ax = plt.subplots(figsize=(7, 3))
    bars = ax.bar(range(len(class_names)), per_class_acc, label="generated")
    ax.bar_label(bars, fmt="%.2f", label_type="center", color="white", fontsize=8)
    if reference is not None:
        ax.plot(range(len(class_names)), reference, "k_", markersize=20, label="real test images")
    ax.set_xticks(range(len(class_names)))
    ax.set_xticklabels(class_names)
    ax.set_xlabel("requested label")
    ax.set_ylabel("classified as requested")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)  # beside the bars, never over them
    return _finish(fig, save_to)


def plot_metric_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], metric: str = "fid", *,
                       x: str = "images_total", reference: float | None = None, title: str = "", ax=None,
                       save_to: str | os.PathLike | None = None):
    """One curve a run: `metric` of its evaluated rounds against `x` ("images_total", "round" or "bytes_total")."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.6))
    for label, history in histories.items():
        evaluated = [r for r in history if "metrics" in r]
        ax.plot([r[x] for r in evaluated], [r["metrics"][metric] for r in evaluated], marker="o", ms=3, label=label)
    if reference is not None:
        ax.axhline(reference, ls="--", color="gray", label="reference")
    if x == "round":
        _integer_rounds(ax)
    else:
        ax.set_xlabel({"images_total": "images seen", "bytes_total": "bytes sent"}.get(x, x))
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(ax.figure, save_to)


def plot_lines(rows: Sequence[Mapping[str, Any]], x: str, y: str, group: str, *, title: str = "", ax=None,
               save_to: str | os.PathLike | None = None):
    """Rows of an ablation as one line per value of `group` (e.g. FID against attacker fraction per strategy)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.8))
    for value in dict.fromkeys(row[group] for row in rows):
        points = sorted((row[x], row[y]) for row in rows if row[group] == value)
        ax.plot(*zip(*points), marker="o", label=str(value))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(ax.figure, save_to)


def plot_seed_spread(summary: Sequence[Mapping[str, Any]], metric: str = "fid", *, title: str = "", ax=None,
                     save_to: str | os.PathLike | None = None):
    """One row a cell of `run_seeds`' summary: a dot a seed, a bar at the mean (is a gap between cells more than
    the spread of one cell?)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 0.45 * len(summary) + 1.2))
    prefix = f"{metric}@"
    for row_index, line in enumerate(summary):
        values = [v for k, v in line.items() if k.startswith(prefix)]
        ax.scatter(values, [row_index] * len(values), color="tab:blue", alpha=0.7, zorder=3,
                   label="one seed" if row_index == 0 else None)
        ax.plot([line[f"{metric}_mean"]] * 2, [row_index - 0.3, row_index + 0.3], color="black",
                label="mean" if row_index == 0 else None)
    ax.set_yticks(range(len(summary)))
    ax.set_yticklabels([line["cell"] for line in summary])
    ax.invert_yaxis()  # the first cell on top, as in the table
    ax.set_xlabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    return _finish(ax.figure, save_to)


def plot_sample_grids(grids: Mapping[str, Tensor], *, ncols: int = 4, save_to: str | os.PathLike | None = None):
    """Runs' fixed-noise sample grids ([100, C, H, W]: one label a row) side by side, titled by run."""
    import matplotlib.pyplot as plt

    nrows = math.ceil(len(grids) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, images) in zip(axes.flat, grids.items()):
        ax.imshow(image_grid(images, 10))
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    return _finish(fig, save_to)


def plot_tradeoff(rows: Sequence[Mapping[str, Any]], x: str = "MB", y: str = "fid", *, label: str = "cell",
                  title: str = "", ax=None, save_to: str | os.PathLike | None = None):
    """Rows of an ablation as labelled points, e.g. FID against megabytes sent."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.8))
    for row in rows:
        ax.scatter(row[x], row[y])
        ax.annotate(row[label], (row[x], row[y]), fontsize=8, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _finish(ax.figure, save_to)


def save_round_grids(snapshots: Mapping[int, Tensor], out_dir: str | os.PathLike) -> list[Path]:
    """One PNG of the fixed-noise label grid per round: out_dir/grid_round_XXXX.png."""
    from torchvision.utils import save_image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for r, images in sorted(snapshots.items()):
        paths.append(out_dir / f"grid_round_{r:04d}.png")
        save_image(images.float(), paths[-1], nrow=10, normalize=True, value_range=(-1, 1), pad_value=1)
    return paths


def save_grid_gif(snapshots: Mapping[int, Tensor], path: str | os.PathLike, seconds_per_frame: float = 0.6) -> Path:
    """An animated GIF of the fixed-noise label grid across rounds."""
    from PIL import Image

    if not snapshots:
        raise ValueError("no snapshots to animate")
    frames = [Image.fromarray((image_grid(snapshots[r]) * 255).round().astype(np.uint8))
              for r in sorted(snapshots)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(seconds_per_frame * 1000), loop=0)
    return path
