"""FedConfig, every knob of a run, validated on construction; the datasets it knows; the presets.

The knobs of federated learning are FedConfig's own fields; how local training is computed (batched how, in
which precision, replayed from CUDA graphs) is EngineOptions, FedConfig.engine: speed, not results.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from fedgan.checks import finite, is_int, is_number, non_negative_int, positive_int, positive_number, require
from fedgan.environment import pick_device, warn


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
CLIENT_MAPS = ("auto", "vmap", "loop", "streams", "reference")
CONV_FORMS = ("auto", "grouped", "block", "loop", "triton")
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "damped", "fedadagrad", "fedadam", "fedyogi", "median",
              "trimmed_mean", "krum", "scaffold")
SELECTIONS = ("uniform", "proportional", "power_of_choice", "stratified")
SYNC_NETWORKS = ("both", "g", "d")
SYNC_MODES = ("sync", "async")
STALENESS_RULES = ("constant", "polynomial", "hinge")
THRESHOLD_RULES = ("median", "absolute")
THRESHOLD_ACTIONS = ("clip", "drop")
STRAGGLER_POLICIES = ("partial", "drop")
STEP_NORMALISATIONS = ("none", "fednova")
COMPRESSIONS = ("none", "topk", "int8")
ATTACKS = ("none", "sign_flip", "noise", "nan", "label_flip")  # nan: a broken client sending NaN
GAN_LOSSES = ("bce", "hinge")  # gan.py: the non-saturating GAN's cross-entropy, or the hinge loss
D_CONDITIONINGS = ("channel", "projection")  # models.py: how D sees the label
D_NORMS = ("batch", "spectral")  # models.py: batch norm in D's hidden blocks, or spectral norm of every layer
# where G and D live and what travels (federation.py; the last four: multi_discriminator.py)
GAN_LAYOUTS = ("fedavg", "server_g", "md_gan", "ua_gan", "f2u", "f2a")
MULTI_D_LAYOUTS = ("md_gan", "ua_gan", "f2u", "f2a")  # one G at the server, one D a client, nothing averaged
SERVER_LR_STRATEGIES = ("fedavgm", "damped", "fedadagrad", "fedadam", "fedyogi")  # the rules server_lr sets
DP_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "damped", "fedadagrad", "fedadam", "fedyogi")
CHOICES: dict[str, tuple[str, ...]] = {}  # filled below FedConfig: field -> allowed names
PRESETS = ("smoke", "cpu", "full")


FIELD_RULES: dict[str, tuple[Any, str]] = {  # the numeric fields: a test and what is allowed
    **{name: (positive_int, "an integer >= 1") for name in (
        "num_clients", "rounds", "batch_size", "z_dim", "embed_dim", "ngf", "ndf", "shards_per_client",
        "classes_per_client")},
    **{name: (non_negative_int, "an integer >= 0") for name in ("min_size", "checkpoint_every")},
    "seed": (lambda v: is_int(v) and 0 <= v < 2 ** 32, "an integer from 0 to 2**32 - 1 (numpy's seeds)"),
    **{name: (lambda v: v is None or positive_int(v), "None or an integer >= 1")
       for name in ("local_steps", "train_subset", "classifier_subset", "keep_checkpoints")},
    "tensorboard": (lambda v: isinstance(v, bool) or (isinstance(v, str) and v.strip() != ""),
                    "False, True (out_dir/tensorboard) or a folder name"),
    "eval_every": (lambda v: v is None or non_negative_int(v), "None (never), 0 (after the last round) or N >= 1"),
    "server_lr": (lambda v: v is None or positive_number(v), "None (the rule's default) or a number > 0"),
    **{name: (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)")
       for name in ("server_momentum", "server_beta2")},
    "server_tau": (positive_number, "a number > 0"),
    **{name: (lambda v: v is None or positive_number(v), "None or a number > 0")
       for name in ("update_threshold", "round_deadline")},
    "prox_mu": (lambda v: v is None or (is_number(v) and finite(v) and v >= 0), "None or a number >= 0"),
    **{name: (lambda v: v is None or positive_int(v), "None or an integer >= 1")
       for name in ("poc_candidates", "async_buffer")},
    "dropout": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "topk_fraction": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "staleness_a": (lambda v: is_number(v) and finite(v) and v >= 0, "a number >= 0"),
    "staleness_b": (non_negative_int, "an integer >= 0"),
    "error_feedback": (lambda v: isinstance(v, bool), "True or False"),
    "swap_every": (lambda v: v is None or positive_int(v), "None (never) or an integer >= 1"),
    "attack_fraction": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "attack_scale": (positive_number, "a number > 0"),
    "min_clients": (positive_int, "an integer >= 1"),
    "watchdog_rounds": (non_negative_int, "an integer >= 0 (0: off)"),
    "collapse_loss": (lambda v: is_number(v) and finite(v) and v >= 0, "a number >= 0"),
    "dp_clip": (lambda v: v is None or positive_number(v), "None (no DP) or a number > 0"),
    "dp_noise_multiplier": (lambda v: is_number(v) and finite(v) and v >= 0, "a number >= 0"),
    "dp_delta": (lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "server_g_steps": (lambda v: v is None or positive_int(v), "None or an integer >= 1"),
    "trim_beta": (lambda v: is_number(v) and 0 <= v < 0.5, "a number in [0, 0.5)"),
    "krum_f": (non_negative_int, "an integer >= 0"),
    "krum_m": (positive_int, "an integer >= 1"),
    "eval_samples": (lambda v: is_int(v) and v >= 10, "an integer >= 10"),
    "classifier_epochs": (positive_int, "an integer >= 1"),
    **{name: (positive_number, "a number > 0") for name in ("lr_g", "lr_d", "local_epochs", "alpha")},
    **{name: (lambda v: is_number(v) and finite(v) and v >= 0, "a number >= 0")
       for name in ("sigma", "client_speed_sigma")},
    "client_fraction": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "label_smoothing": (lambda v: is_number(v) and 0 <= v < 0.5, "a number in [0, 0.5)"),
    "instance_noise": (lambda v: is_number(v) and finite(v) and v >= 0, "a number >= 0"),
}


ENGINE_FIELD_RULES: dict[str, tuple[Any, str]] = {  # EngineOptions' fields: a test and what is allowed
    "client_map": (lambda v: v in CLIENT_MAPS, f"one of {list(CLIENT_MAPS)}"),
    "conv_form": (lambda v: v in CONV_FORMS, f"one of {list(CONV_FORMS)}"),
    **{name: (lambda v: isinstance(v, bool), "True or False") for name in ("bfloat16", "cuda_graphs", "deterministic")},
    **{name: (positive_int, "an integer >= 1") for name in ("cuda_streams", "conv_block_clients")},
}
LEGACY_ENGINE_FIELDS = {"client_map": "client_map", "amp": "bfloat16", "cuda_graphs": "cuda_graphs",
                        "conv_form": "conv_form", "conv_block_clients": "conv_block_clients",
                        "deterministic": "deterministic"}  # FedConfig fields before EngineOptions -> its names


def as_python(value: Any) -> Any:
    """numpy's scalars as the Python numbers they are (a config holds Python values: JSON and seeding take them)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, list)):
        return tuple(as_python(v) for v in value)
    return value


def normalise_fields(instance: Any) -> None:
    """Replace a frozen dataclass's numpy scalars (and lists) by Python numbers (and tuples), before validation."""
    for field in dataclasses.fields(instance):
        object.__setattr__(instance, field.name, as_python(getattr(instance, field.name)))


def check_field(name: str, value: Any) -> None:
    ok, allowed = FIELD_RULES[name]
    require(ok(value), name, value, allowed)


@dataclass(frozen=True)
class EngineOptions:
    """How the engine computes local training, not what: every choice trains the same clients to the same result up
    to float rounding (bfloat16: its rounding). The defaults are what measured fastest (benchmarks/RESULTS.md)."""

    client_map: str = "auto"  # how the clients are batched: "vmap" (one batched call), "loop" (a plain model call a
    # client, over views of the stacked state), "streams" (the loop, the clients side by side on CUDA streams),
    # "reference" (each client in turn as nn.Modules with torch.optim.Adam: the plain loop, to read and debug),
    # "auto" (the loop on a CPU; on a CUDA GPU streams, vmap for clients of unequal step counts)
    bfloat16: bool = False  # convolutions and linear layers in bfloat16, batch norm, losses and Adam in float32
    cuda_graphs: bool = True  # on a CUDA GPU, replay each local step from a CUDA graph (same result, one launch)
    cuda_streams: int = 8  # client_map="streams": CUDA streams the clients share (CUDA_DEVICE_MAX_CONNECTIONS)
    conv_form: str = "auto"  # under vmap, the thin convolutions (<= 4 channels a side): CONV_FORMS, ClientConvolutions
    conv_block_clients: int = 10  # conv_form="block": clients per block-diagonal convolution ("auto" picks its own)
    deterministic: bool = True  # GPU: cuDNN's deterministic algorithms (same seed, same result); False: autotuned

    def __post_init__(self) -> None:
        normalise_fields(self)
        for name, (ok, allowed) in ENGINE_FIELD_RULES.items():
            require(ok(getattr(self, name)), name, getattr(self, name), allowed)


@dataclass(frozen=True)
class FedConfig:
    """Every knob of a federated cDCGAN run; validated on construction, and immutable after it (another config is
    dataclasses.replace(config, field=value), validated again)."""

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
    # server rule (strategies.py)
    strategy: str = "fedavg"  # one of STRATEGIES (or pass a Strategy object to Federation)
    server_lr: float | None = None  # server learning rate; None: 1.0 fedavgm, 0.5 damped (its alpha), 1e-2 adaptive
    server_momentum: float = 0.9  # fedavgm's momentum; beta1 of fedadagrad, fedadam, fedyogi
    server_beta2: float = 0.99  # beta2 of fedadam and fedyogi
    server_tau: float = 1e-3  # adaptivity floor tau of the adaptive rules
    trim_beta: float = 0.1  # trimmed_mean: fraction of clients cut at each end
    krum_f: int = 1  # krum: clients assumed faulty
    krum_m: int = 1  # krum: clients kept (m > 1: Multi-Krum)
    prox_mu: float | None = None  # FedProx's (mu/2)|w - w_start|^2 in the clients' losses; None: 0.01 fedprox, else 0
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
    selection: str = "uniform"  # "uniform", "proportional" (size), "power_of_choice" (loss), "stratified" (label)
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
    # client-level differential privacy (DP-FedAvg)
    dp_clip: float | None = None  # clip each client's whole update to this L2 norm; None: no DP
    dp_noise_multiplier: float = 0.0  # Gaussian noise std on the sum, in units of dp_clip
    dp_delta: float = 1e-5  # the delta that epsilon is reported for
    # where G and D live (GAN_LAYOUTS): "fedavg" both on every client, averaged; "server_g" DP-FedAvg-GAN (D
    # federated, G trained on the server); md_gan, ua_gan, f2u, f2a: one G on the server, one D a client
    gan_layout: str = "fedavg"
    server_g_steps: int | None = None  # server_g: server generator steps a round; None: the clients' mean steps
    swap_every: int | None = 1  # md_gan: the clients' discriminators swap among them every this many rounds
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
    gan_loss: str = "bce"  # "bce" (the non-saturating GAN) or "hinge" (gan.py)
    label_smoothing: float = 0.0  # bce: D's targets for real images are 1 - this (one-sided smoothing)
    instance_noise: float = 0.0  # std of Gaussian noise on D's inputs in round 1, annealed linearly towards 0
    # model
    z_dim: int = 100  # latent noise size
    embed_dim: int = 10  # size of the generator's label embedding
    ngf: int = 64  # generator width
    ndf: int = 64  # discriminator width
    d_conditioning: str = "channel"  # D sees the label as an extra input "channel" or by "projection" (models.py)
    d_norm: str = "batch"  # D's hidden blocks batch-normalised, or every layer "spectral"-normalised (models.py)
    # evaluation in a metric classifier's features (metrics.py)
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
    keep_checkpoints: int | None = None  # keep only the newest N checkpoints of the run (None: all; grid cells: 1)
    tensorboard: bool | str = False  # True or a folder: losses, metrics, bytes, epsilon and the grid, a round each
    run_name: str = ""  # "" derives one from dataset, partition, K and seed
    # how local training is computed: speed, not results
    engine: EngineOptions = dataclasses.field(default_factory=EngineOptions)
    server_generator: dataclasses.InitVar[Any] = None  # replaced by gan_layout: refused with a message saying so

    def __post_init__(self, server_generator: Any = None) -> None:
        if server_generator is not None:
            raise ValueError(f"server_generator={server_generator!r}: the field was replaced by gan_layout; pass "
                             "gan_layout='server_g' (for True) or leave gan_layout='fedavg' (for False)")
        normalise_fields(self)
        self.validate()
        if not self.run_name:
            object.__setattr__(self, "run_name", f"{self.dataset}_{self.partition}_k{self.num_clients}_seed{self.seed}")

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is not allowed."""
        for name, allowed in CHOICES.items():
            require(getattr(self, name) in allowed, name, getattr(self, name), f"one of {list(allowed)}")
        for name in FIELD_RULES:
            check_field(name, getattr(self, name))
        require(isinstance(self.engine, EngineOptions), "engine", self.engine, "an EngineOptions")
        require(isinstance(self.betas, tuple) and len(self.betas) == 2
                 and all(is_number(b) and 0 <= b < 1 for b in self.betas), "betas", self.betas,
                 "two numbers in [0, 1), e.g. (0.5, 0.999)")
        num_classes = DATASETS[self.dataset].num_classes
        require(self.classes_per_client <= num_classes, "classes_per_client", self.classes_per_client,
                 f"an integer from 1 to {num_classes} (the classes of {self.dataset})")
        require(isinstance(self.device, str) and (self.device in ("auto", "cpu") or self.device == "cuda"
                 or (self.device.startswith("cuda:") and self.device[5:].isdigit())), "device", self.device,
                 "'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.train_subset is not None:
            require(self.train_subset >= self.num_clients, "train_subset", self.train_subset,
                     f"None or at least num_clients={self.num_clients} images")
        for name in ("out_dir", "checkpoint_dir", "run_name"):
            value = getattr(self, name)
            require(isinstance(value, str), name, value, "a string")
        require(self.data_root is None or isinstance(self.data_root, str), "data_root", self.data_root,
                 "None or a folder path")
        require(all(c.isalnum() or c in "-_." for c in self.run_name), "run_name", self.run_name,
                 "letters, digits, '-', '_' and '.' only (it names folders)")
        require(self.label_smoothing == 0 or self.gan_loss == "bce", "label_smoothing", self.label_smoothing,
                "0 with gan_loss='hinge' (smoothing moves the cross-entropy's targets; the hinge loss has none)")
        require(self.instance_noise == 0 or self.gan_layout == "fedavg", "instance_noise", self.instance_noise,
                f"0 with gan_layout={self.gan_layout!r} (the noise is on the clients' D inputs of their local steps)")
        require(not (self.strategy == "fedprox" and self.prox_mu == 0), "prox_mu", self.prox_mu,
                 "a number > 0 (or None: 0.01) with strategy='fedprox'")
        per_round = clients_per_round(self.num_clients, self.client_fraction)
        require(self.min_clients <= per_round, "min_clients", self.min_clients,
                 f"an integer from 1 to the {per_round} clients selected a round")
        if self.dp_clip is not None:
            require(self.strategy in DP_STRATEGIES, "strategy", self.strategy,
                     f"one of {list(DP_STRATEGIES)} with dp_clip (the DP sum is an average of clipped updates)")
            require(self.sync_mode == "sync", "sync_mode", self.sync_mode, "'sync' with dp_clip")
            require(self.selection == "uniform", "selection", self.selection,
                    "'uniform' with dp_clip (the accountant's epsilon assumes every client is picked with the same "
                    "small chance a round; the other rules pick some clients far more often, or by their data)")
        require(self.gan_layout == "fedavg" or self.sync_networks == "both", "sync_networks", self.sync_networks,
                 f"'both' with gan_layout={self.gan_layout!r} (only 'fedavg' keeps a network local)")
        if self.gan_layout in MULTI_D_LAYOUTS:
            check_multi_discriminator(self)
        if self.strategy == "scaffold":
            for name, allowed in (("gan_layout", "fedavg"), ("compression", "none"), ("dp_clip", None),
                                  ("step_normalisation", "none"), ("sync_mode", "sync")):
                require(getattr(self, name) == allowed, name, getattr(self, name),
                        f"{allowed!r} with strategy='scaffold' (its control variates correct the clients' own "
                        "training and are averaged as they are)")
        attackers = round(self.attack_fraction * self.num_clients)  # rounds.attacker_ids draws as many
        if self.attack == "none":
            require(self.attack_fraction == 0, "attack_fraction", self.attack_fraction,
                    "0 with attack='none' (set attack to what the attackers do)")
        else:
            require(attackers >= 1, "attack_fraction", self.attack_fraction,
                    f"a fraction giving at least one attacker with attack={self.attack!r}: it gives {attackers} of the "
                    f"{self.num_clients} clients (round(attack_fraction x num_clients))")
        require(self.server_lr is None or self.strategy in SERVER_LR_STRATEGIES, "server_lr", self.server_lr,
                f"None with strategy={self.strategy!r}: only {list(SERVER_LR_STRATEGIES)} have a server learning rate")
        if self.strategy == "krum":
            require(self.krum_f < per_round, "krum_f", self.krum_f,
                    f"an integer from 0 to {per_round - 1}: Krum assumes fewer faulty clients than the {per_round} "
                    "clients selected a round")
            require(self.krum_m <= per_round, "krum_m", self.krum_m,
                    f"an integer from 1 to {per_round}, the clients selected a round")
        if self.local_steps is not None and self.local_epochs != FedConfig.local_epochs:
            warn(f"local_steps={self.local_steps} is set, so local_epochs={self.local_epochs} is not used "
                 "(local_steps overrides it)")
        if self.sync_mode == "async":
            require(self.round_deadline is None, "round_deadline", self.round_deadline,
                     "None with sync_mode='async' (asynchronous clients have no round to be late for)")
            require(self.async_buffer is None or self.async_buffer <= per_round, "async_buffer", self.async_buffer,
                     f"None or at most the {per_round} clients in flight (client_fraction x num_clients)")
            require(self.min_clients <= self.arrivals_per_update, "min_clients", self.min_clients,
                    f"an integer from 1 to the {self.arrivals_per_update} arrivals a server update applies with "
                    "sync_mode='async' (async_buffer): more would keep every update from the global model")

    @property
    def updates_needed(self) -> int:
        """The usable updates a round needs to move the global models (fewer keep them): min_clients, and for Krum
        more than the krum_f clients it assumes faulty and at least the krum_m it keeps (dropout, stragglers dropped,
        asynchrony and NaN updates can leave a round fewer than were selected)."""
        return max(self.min_clients, self.krum_f + 1, self.krum_m) if self.strategy == "krum" else self.min_clients

    @property
    def arrivals_per_update(self) -> int:
        """Asynchrony's buffer: the arrivals a server update applies (async_buffer; None: half those in flight)."""
        return self.async_buffer or max(1, clients_per_round(self.num_clients, self.client_fraction) // 2)

    @property
    def resume_may_change(self) -> tuple[str, ...]:
        """The fields a resumed run may change: rounds and device; only device with instance noise, whose std anneals
        over the run's rounds (more rounds would move every later round's noise)."""
        return ("device",) if self.instance_noise else ("rounds", "device")

    @property
    def client_prox_mu(self) -> float:
        """FedProx's mu as the clients apply it: prox_mu, else 0.01 under strategy="fedprox", else 0."""
        if self.prox_mu is not None:
            return float(self.prox_mu)
        return 0.01 if self.strategy == "fedprox" else 0.0

    def partition_kwargs(self) -> dict[str, Any]:
        """The partition parameters that the chosen scheme takes."""
        return {name: getattr(self, name) for name in PARTITION_PARAMS[self.partition]}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "FedConfig":
        """The config to_json wrote; also a checkpoint's from before EngineOptions (its engine fields moved in) or
        before gan_layout (server_generator=True is gan_layout="server_g")."""
        values = json.loads(text)
        if "server_generator" in values:
            values["gan_layout"] = "server_g" if values.pop("server_generator") else "fedavg"
        engine = dict(values.pop("engine", {}))
        engine.update({LEGACY_ENGINE_FIELDS[name]: values.pop(name) for name in list(values)
                       if name in LEGACY_ENGINE_FIELDS})
        check_known(values)
        unknown = sorted(set(engine) - {f.name for f in dataclasses.fields(EngineOptions)})
        if unknown:
            raise ValueError(f"unknown EngineOptions fields {unknown}; known fields: "
                             f"{[f.name for f in dataclasses.fields(EngineOptions)]}")
        return cls(**values, engine=EngineOptions(**engine))


def check_multi_discriminator(config: FedConfig) -> None:
    """The knobs that have a meaning when one G at the server learns from the clients' own discriminators."""
    layout = config.gan_layout
    for name, allowed, why in (
            ("strategy", "fedavg", "no parameters are averaged"),
            ("dp_clip", None, "DP-FedAvg clips and noises parameter updates; these layouts send activations"),
            ("compression", "none", "update compression acts on parameter updates"),
            ("sync_mode", "sync", "every step exchanges images and gradients with the server"),
            ("step_normalisation", "none", "FedNova rescales parameter updates"),
            ("update_threshold", None, "the threshold acts on parameter updates")):
        require(getattr(config, name) == allowed, name, getattr(config, name),
                f"{allowed!r} with gan_layout={layout!r} ({why})")
    require(config.attack in ("none", "label_flip"), "attack", config.attack,
            f"'none' or 'label_flip' with gan_layout={layout!r} (the other attacks poison parameter updates, "
            "which these layouts do not send)")
    require(not config.prox_mu, "prox_mu", config.prox_mu,
            f"None or 0 with gan_layout={layout!r} (FedProx pulls averaged parameters towards the round's start; "
            "these layouts' discriminators never leave their clients)")
    require(layout not in ("ua_gan", "f2a") or config.gan_loss == "bce", "gan_loss", config.gan_loss,
            f"'bce' with gan_layout={layout!r} (it combines the discriminators' probabilities)")


def check_known(values: Mapping[str, Any]) -> None:
    """Refuse names that are not FedConfig fields, saying where an engine option now goes."""
    if "server_generator" in values:
        FedConfig(server_generator=values["server_generator"])  # raises, saying what replaced it
    known = {f.name for f in dataclasses.fields(FedConfig)}
    moved = sorted(set(values) & set(LEGACY_ENGINE_FIELDS))
    if moved:
        raise ValueError(f"{moved}: options of the engine, not FedConfig fields; pass engine=EngineOptions("
                         + ", ".join(f"{LEGACY_ENGINE_FIELDS[m]}=..." for m in moved) + ")")
    unknown = sorted(set(values) - known)
    if unknown:
        near = {name: difflib.get_close_matches(name, known, n=1) for name in unknown}
        hints = "".join(f" ({name!r}: did you mean {match[0]!r}?)" for name, match in near.items() if match)
        raise ValueError(f"unknown FedConfig fields {unknown}{hints}; known fields: {sorted(known)}")


CHOICES.update(dataset=tuple(sorted(DATASETS)), partition=PARTITIONS, bn_policy=BN_POLICIES,
               optimizer_state=OPTIMIZER_STATES, strategy=STRATEGIES,
               selection=SELECTIONS, sync_networks=SYNC_NETWORKS, sync_mode=SYNC_MODES, staleness=STALENESS_RULES,
               threshold_rule=THRESHOLD_RULES, threshold_action=THRESHOLD_ACTIONS,
               straggler_policy=STRAGGLER_POLICIES, step_normalisation=STEP_NORMALISATIONS, compression=COMPRESSIONS,
               attack=ATTACKS, gan_loss=GAN_LOSSES, d_conditioning=D_CONDITIONINGS, d_norm=D_NORMS,
               gan_layout=GAN_LAYOUTS)

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
        # a laptop: digits of the asked class in minutes on 2 CPU cores. FedAvg over 10 clients, 2 a round (the FedAvg
        # paper's C=0.2) for 30 rounds: 6 MNIST epochs, with 3x the sequential steps of all 10 for 8 rounds
        "cpu": dict(num_clients=10, client_fraction=0.2, rounds=30, local_epochs=1.0, batch_size=64, ngf=32, ndf=32,
                    eval_every=5, eval_samples=5000),
        # the real experiment: 10 IID clients, 20 rounds of one local epoch (20 MNIST epochs)
        "full": dict(num_clients=10, rounds=20, local_epochs=1.0, batch_size=64, ngf=64, ndf=64,
                     eval_every=2, eval_samples=10000),
    }
    if name not in base:
        raise ValueError(f"preset={name!r} is not known; presets: {list(PRESETS)}")
    check_known(overrides)
    return FedConfig(**{**base[name], **overrides})


def default_preset() -> str:
    """The preset a notebook runs: $FEDGAN_PRESET, else "full" on a usable GPU and "cpu" otherwise."""
    name = os.environ.get("FEDGAN_PRESET", "").strip()
    if name:
        if name not in PRESETS:
            raise ValueError(f"FEDGAN_PRESET={name!r} is not known; presets: {list(PRESETS)}")
        return name
    return "full" if pick_device().type == "cuda" else "cpu"


def clients_per_round(num_clients: int, fraction: float) -> int:
    """The clients selected a round (in flight, when asynchronous): max(1, round(fraction * K))."""
    return max(1, round(fraction * num_clients))
