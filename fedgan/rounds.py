"""Planning a round: which clients train, how many steps, on which batches, with which noise.

Everything random about a round is drawn from generators seeded by (seed, round, client, stream), so a
run is reproducible and resumes exactly."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from fedgan.checks import is_int, require
from fedgan.config import SELECTIONS, FedConfig, clients_per_round
from fedgan.partition import partition_report

Tensor = torch.Tensor


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of ints, so every (seed, round, client, stream) has its own stream."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


RNG_SELECTION, RNG_BATCHES, RNG_NOISE, RNG_SPEED, RNG_DROPOUT, RNG_ATTACK, RNG_DP, RNG_SWAP = range(1, 9)


@dataclass
class RoundPlan:
    """Everything random about one round, derived from (seed, round) alone, so runs resume exactly."""

    round: int  # 1-based round index
    client_ids: np.ndarray  # [K] clients that train and report this round, sorted
    sizes: np.ndarray  # [K] images each holds
    steps: np.ndarray  # [K] local steps each takes
    batch_indices: Tensor  # [K, max(steps), B] dataset indices of each client's batches
    noise_seed: int  # seed of the generator that draws each step's z
    noise_rows: np.ndarray | None = None  # [K] the rows of the round's noise these clients take; None: 0..K-1
    noise_width: int | None = None  # the clients the round's noise is drawn for (a plan of some of them); None: K
    instance_noise: float = 0.0  # std of the Gaussian noise on D's inputs this round (instance_noise_std)
    dropped_out: list[int] = dataclasses.field(default_factory=list)  # selected, but did not report (dropout)
    late: list[int] = dataclasses.field(default_factory=list)  # past the deadline: cut short or dropped
    sim_time: float = 0.0  # simulated round time, in local steps of a speed-1 client


def _rows_of_round(plan: RoundPlan, draws: torch.Generator, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Gaussian noise [K, *shape] of the plan's clients: drawn for all the round's clients at once, each client
    taking its row, so a client trained apart from the others (on a Flower SuperNode, say) draws what it draws
    beside them."""
    width = plan.noise_width or len(plan.client_ids)
    noise = torch.randn((width, *shape), generator=draws, device=device)  # (width, *shape)
    return noise if plan.noise_rows is None else noise[torch.as_tensor(plan.noise_rows, device=device)]


def step_noise(plan: RoundPlan, draws: torch.Generator, batch: int, z_dim: int, device: torch.device) -> Tensor:
    """One step's noise z of the plan's clients [K, B, z_dim], a row a client (_rows_of_round)."""
    return _rows_of_round(plan, draws, (batch, z_dim), device)


def instance_noise_std(config: FedConfig, round_index: int) -> float:
    """Instance noise (Sønderby et al., ICLR 2017; Arjovsky & Bottou, ICLR 2017): the std of the Gaussian noise on
    D's inputs in a round, config.instance_noise at the run's start, on a line to 0 at its end. Noise makes the real
    and generated distributions overlap, so D cannot separate them perfectly early on and G's gradients stay
    informative; annealed away, it leaves the GAN's own optimum."""
    return config.instance_noise * (1 - (round_index - 1) / config.rounds)


def step_input_noise(plan: RoundPlan, draws: torch.Generator, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """One step's instance noise of the plan's clients [3, K, B, C, H, W] (`shape`: (B, C, H, W)): for D's real and
    generated inputs in its step, and for the generated ones in G's step; a row a client (_rows_of_round), scaled
    by the round's std, plan.instance_noise."""
    noise = _rows_of_round(plan, draws, (3, *shape), device)  # (K, 3, B, C, H, W)
    return plan.instance_noise * noise.transpose(0, 1)  # (3, K, B, C, H, W)


def choose_clients(pool: Sequence[int], count: int, rng: np.random.Generator, *, policy: str = "uniform",
                   sizes: Sequence[int] | None = None, losses: Mapping[int, float] | None = None,
                   candidates: int | None = None, groups: Sequence[int] | None = None) -> np.ndarray:
    """`count` clients of `pool`, sorted: uniform, proportional to data size, power-of-choice or stratified.

    power_of_choice (Cho et al., 2022): draw `candidates` (default 2 x count) proportional to size, keep the
    `count` with the highest last local loss (`losses`; a client never seen counts as highest).
    stratified: `groups` gives each client's group (e.g. its dominant label, dominant_labels); the groups of the pool
    are taken in a seeded order and one client drawn from each in turn, until `count`: as many groups as can be
    are present each round, however unequal their sizes (a skewed split's rare labels are not left out by chance).
    """
    pool = np.asarray(pool, dtype=np.int64)
    require(is_int(count) and 1 <= count <= len(pool), "count", count, f"an integer from 1 to {len(pool)}")
    require(policy in SELECTIONS, "policy", policy, f"one of {list(SELECTIONS)}")
    if count == len(pool):
        return np.sort(pool)
    if policy == "uniform":
        return np.sort(rng.choice(pool, size=count, replace=False))
    if policy == "stratified":
        require(groups is not None, "groups", groups, "one group per client for policy='stratified'")
        of_pool = np.asarray(groups)[pool]
        members = {g: list(rng.permutation(pool[of_pool == g])) for g in rng.permutation(np.unique(of_pool))}
        chosen: list[int] = []
        while len(chosen) < count:  # one from each group in turn; a group with no clients left is passed over
            for group in members:
                if len(chosen) < count and members[group]:
                    chosen.append(int(members[group].pop()))
        return np.sort(np.array(chosen, dtype=np.int64))
    require(sizes is not None, "sizes", sizes, f"one data size per client for policy={policy!r}")
    p = np.asarray(sizes, dtype=np.float64)[pool]
    p = p / p.sum()
    if policy == "proportional":
        return np.sort(rng.choice(pool, size=count, replace=False, p=p))
    drawn = min(len(pool), 2 * count if candidates is None else max(candidates, count))
    shortlist = rng.choice(pool, size=drawn, replace=False, p=p)
    loss = np.array([(losses or {}).get(int(c), np.inf) for c in shortlist])
    return np.sort(shortlist[np.argsort(-loss, kind="stable")[:count]])


def dominant_labels(labels: Tensor, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Each client's most frequent label (the lowest on a tie): [K], the groups of stratified selection."""
    return partition_report(labels, parts, num_classes).argmax(1)  # (K, num_classes) -> (K,)


def flipped_labels(labels: Tensor, parts: Sequence[np.ndarray], attackers: Sequence[int], num_classes: int) -> Tensor:
    """The labels the clients train on: a label-flipping attacker's own images labelled num_classes - 1 - y."""
    if not attackers:
        return labels
    poisoned = torch.as_tensor(np.concatenate([parts[c] for c in attackers]), device=labels.device)
    flipped = labels.clone()
    flipped[poisoned] = num_classes - 1 - labels[poisoned]
    return flipped


def select_clients(num_clients: int, fraction: float, seed: int, round_index: int, *, policy: str = "uniform",
                   sizes: Sequence[int] | None = None, losses: Mapping[int, float] | None = None,
                   candidates: int | None = None, groups: Sequence[int] | None = None) -> np.ndarray:
    """max(1, round(fraction * K)) clients by `policy` (see choose_clients), from a generator of its own per round."""
    count = clients_per_round(num_clients, fraction)
    rng = np.random.default_rng(derive_seed(seed, round_index, RNG_SELECTION))
    return choose_clients(np.arange(num_clients), count, rng, policy=policy, sizes=sizes, losses=losses,
                          candidates=candidates, groups=groups)


def client_speeds(num_clients: int, sigma: float, seed: int) -> np.ndarray:
    """Each client's speed in local steps per time unit: lognormal(0, sigma), fixed for the run (1 if sigma=0)."""
    rng = np.random.default_rng(derive_seed(seed, RNG_SPEED))
    return np.exp(sigma * rng.standard_normal(num_clients))


def attacker_ids(num_clients: int, fraction: float, seed: int) -> list[int]:
    """The round(fraction * K) clients that attack, a fixed seeded choice for the whole run."""
    count = round(fraction * num_clients)
    rng = np.random.default_rng(derive_seed(seed, RNG_ATTACK))
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
        rng = np.random.default_rng(derive_seed(config.seed, round_index, int(client), RNG_BATCHES))
        own = parts[client]
        epochs = math.ceil(s * batch / n)
        walk = np.concatenate([own[rng.permutation(n)] for _ in range(epochs)])[: s * batch]
        indices[row, :s] = walk.reshape(s, batch)  # rows past a client's steps stay 0 and are masked
    return RoundPlan(round_index, client_ids, sizes, steps, torch.from_numpy(indices),
                     derive_seed(config.seed, round_index, RNG_NOISE),
                     instance_noise=instance_noise_std(config, round_index))


def plan_round(config: FedConfig, parts: Sequence[np.ndarray], round_index: int,
               client_losses: Mapping[int, float] | None = None, groups: Sequence[int] | None = None) -> RoundPlan:
    """Select clients, apply dropout and the deadline, and draw the batches of those that train.

    Time is counted in local steps of a speed-1 client: a client of speed v needs steps / v. Past
    `round_deadline` a client does the steps that fit ("partial") or is left out ("drop"); without a
    deadline the round lasts as long as its slowest client.
    """
    sizes = [len(p) for p in parts]
    selected = select_clients(len(parts), config.client_fraction, config.seed, round_index,
                              policy=config.selection, sizes=sizes, losses=client_losses,
                              candidates=config.poc_candidates, groups=groups)
    reports = np.random.default_rng(derive_seed(config.seed, round_index, RNG_DROPOUT)).random(len(selected))
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
