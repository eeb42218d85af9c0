"""One generator at the server, one discriminator a client, nothing averaged: MD-GAN, UA-GAN, F2U and F2A.

In these layouts (FedConfig.gan_layout) no parameters are averaged. Every local step the server's G makes images,
each client trains its own D on its real images against the ones it received, and G learns from what the clients'
Ds make of its images:

- "md_gan" (Hardy, Le Merrer & Sericola, IPDPS 2019, "MD-GAN: Multi-Discriminator Generative Adversarial Networks for
  Distributed Datasets"): each client returns the gradient of G's loss with respect to the images it received, its
  error feedback; G steps on their average (feedback_surrogate). Every `swap_every` rounds the discriminators move
  between the clients by a seeded permutation (swap_permutation), so that each D sees more than one client's data.
- "ua_gan" (Zhang et al., 2021, "Training Federated GANs with Theoretical Guarantees: A Universal Aggregation
  Approach"): G trains against the universal D whose odds are the clients' odds weighted by their shares of the
  label, D_u/(1 - D_u) = sum_k pi_k(y) D_k/(1 - D_k) (universal_logits).
- "f2u" (Yonetani et al., 2019, "Decentralized Learning of Generative Adversarial Networks from Non-iid Data"): G
  fools, sample by sample, the most forgiving D, the one that finds the sample most real (forgiving_logits).
- "f2a" (the same paper): a mixture of the Ds' probabilities leaning to the forgiving ones,
  D_f2a = sum_k softmax_k(lambda D_k) D_k, lambda >= 0 learned (forgiving_mixture). lambda = exp(t) is learned on
  the discriminators' side of the game: t descends their loss -log(1 - D_f2a) on G's images, with Adam at lr_d.

A round: plan_round's clients take their local steps in lockstep, a client whose steps are done sitting out. Each
step the server generates one batch of B fakes a client, with the labels of that client's real batch (the client
sends its batch's labels). For UA-GAN, F2U and F2A it also generates one batch for G's step, its labels drawn from
the pooled label counts of the step's clients, which every client scores. What travels is images, labels, scores
and gradients every step, not models (step_bytes); MD-GAN's swaps also move each D once.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from fedgan.config import DATASETS, FedConfig
from fedgan.data import to_float_images
from fedgan.engine.discriminators import ModuleDiscriminators, StackedDiscriminators
from fedgan.engine.precision import bfloat16_compute, cudnn_algorithms
from fedgan.engine.stacked import broadcast, fresh_adam_state, map_tensors
from fedgan.engine.trainer import resolved_client_map
from fedgan.gan import LocalTraining, generator_objective
from fedgan.models import Discriminator, Generator
from fedgan.rounds import RNG_NOISE, RNG_SWAP, RoundPlan, derive_seed, step_noise

Tensor = torch.Tensor


def universal_logits(logits: Tensor, shares: Tensor) -> Tensor:
    """UA-GAN's universal discriminator: the clients' logits [K, B] (log odds) and their shares pi_k(y_b) [K, B] of
    each sample's label (each column sums to 1) -> its logits [B], log sum_k pi_k exp(logit_k)."""
    return torch.logsumexp(logits + shares.log(), 0)


def forgiving_logits(logits: Tensor) -> Tensor:
    """F2U: per sample the most forgiving discriminator's logit, [K, B] -> [B] (the largest; G's gradient goes
    through that client's D only)."""
    return logits.amax(0)


def forgiving_mixture(logits: Tensor, temperature: Tensor | float) -> Tensor:
    """F2A: the probabilities sum_k softmax_k(lambda D_k) D_k, D_k = sigmoid(logit_k): [K, B] -> [B]. lambda = 0 is
    the mean of the Ds; lambda -> infinity, F2U."""
    probs = torch.sigmoid(logits)
    return (torch.softmax(temperature * probs, 0) * probs).sum(0)


def feedback_surrogate(fakes: Tensor, feedback: Tensor) -> Tensor:
    """MD-GAN's generator step as a scalar: sum_k <x_k, F_k> / K for the K clients' fakes x_k [K, B, C, H, W] (from G)
    and their feedback F_k (the gradient of client k's G loss at x_k, the same shape). Its gradient in G's parameters
    is the average of the clients' feedback pulled back through G, the average of their G-loss gradients."""
    return (fakes * feedback.detach()).sum() / fakes.shape[0]


def label_shares(counts: np.ndarray, labels: Tensor) -> Tensor:
    """pi_k(y): client k's share of the images of label y, among the given clients' label counts [K, C], for each
    label of `labels` [B] -> [K, B] (a label no client holds would be 0/0: the labels are drawn from held ones)."""
    shares = torch.as_tensor(counts / counts.sum(0, keepdims=True).clip(min=1), dtype=torch.float32)  # (K, C)
    return shares.to(labels.device)[:, labels]


def swap_permutation(num_clients: int, seed: int, round_index: int) -> np.ndarray:
    """MD-GAN's swap after a round: client k takes the discriminator client perm[k] held, a seeded permutation."""
    return np.random.default_rng(derive_seed(seed, round_index, RNG_SWAP)).permutation(num_clients)


def step_bytes(layout: str, batch: int, image_shape: tuple[int, ...]) -> tuple[int, int]:
    """(up, down): the bytes a client sends and receives in one local step, float32 images, int64 labels.

    md_gan: down its B fakes; up its batch's labels and its feedback (one gradient per image). ua_gan, f2u, f2a: down
    its fakes, G's batch with its labels, and G's loss gradient in its logits; up its batch's labels, its logits
    on G's batch and the gradient in G's images of those logits weighted by the gradient it received.
    """
    image, labels, scores = batch * math.prod(image_shape) * 4, batch * 8, batch * 4
    if layout == "md_gan":
        return labels + image, image
    return labels + scores + image, 2 * image + labels + scores


def combined_generator_loss(layout: str, logits: Tensor, *, shares: Tensor | None = None,
                            temperature: Tensor | None = None, loss: str = "bce") -> Tensor:
    """G's loss against the layout's combination of the step's clients' logits [A, B] on G's batch."""
    if layout == "ua_gan":
        return generator_objective(universal_logits(logits, shares), "bce")
    if layout == "f2u":
        return generator_objective(forgiving_logits(logits), loss)
    probs = forgiving_mixture(logits, temperature)  # f2a
    return F.binary_cross_entropy(probs, torch.ones_like(probs))


class MultiDiscriminators:
    """A layout's state: every client's D and its Adam state ({key: [N, ...]} on the device; the Adam states only
    with optimizer_state="keep"), the server's Adam of G and F2A's temperature; `train_round` runs a round."""

    def __init__(self, config: FedConfig, generator: Generator, discriminator: Discriminator, counts: np.ndarray):
        """`counts`: each client's label counts [N, C] of the labels it trains on (UA-GAN's shares, G's labels)."""
        self.config, self.layout, self.counts = config, config.gan_layout, counts
        self.local = LocalTraining.of(config)
        device = next(discriminator.parameters()).device
        self.d_state = broadcast(discriminator.state_dict(), config.num_clients)  # every client starts from one D
        size = sum(p.numel() for p in discriminator.parameters())
        self.d_opt = fresh_adam_state(config.num_clients, size, device) if config.optimizer_state == "keep" else None
        self.d_bytes = sum(v.numel() * v.element_size() for v in discriminator.state_dict().values())
        self.g_opt = torch.optim.Adam(generator.parameters(), lr=config.lr_g, betas=config.betas)
        self.log_temperature = torch.zeros((), device=device, requires_grad=True)  # f2a: lambda = exp(0) = 1 at first
        self.temperature_opt = torch.optim.Adam([self.log_temperature], lr=config.lr_d, betas=config.betas)

    def train_round(self, generator: Generator, discriminator: Discriminator, images: Tensor, labels: Tensor,
                    plan: RoundPlan, store: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """The plan's clients' local steps with the server's G (trained in place), then MD-GAN's swap: their D and G
        losses (each one's D loss also as "last_loss" in its `store`, as power-of-choice ranks clients) and the
        round's log (bytes both ways, the server's G loss; MD-GAN's swap, F2A's temperature)."""
        config, layout, device = self.config, self.layout, images.device
        ids = torch.as_tensor(plan.client_ids, device=device)
        client_map = resolved_client_map(config.engine.client_map, device, plan.steps.tolist())
        stacked = client_map != "reference"
        state = {k: v[ids] for k, v in self.d_state.items()}
        opt = None if self.d_opt is None else {k: v[ids] for k, v in self.d_opt.items()}
        clients = (ModuleDiscriminators(discriminator, state, opt, self.local, config.engine) if not stacked else
                   StackedDiscriminators(discriminator, state, opt, self.local, config.engine,
                                         "vmap" if client_map == "vmap" else "loop"))  # streams: the trainer's
        num, max_steps, batch = plan.batch_indices.shape
        batch_indices = plan.batch_indices.to(device)
        noise = torch.Generator(device=device).manual_seed(plan.noise_seed)
        draws = torch.Generator(device=device).manual_seed(derive_seed(config.seed, plan.round, RNG_NOISE, 2))
        d_sum, g_sum = torch.zeros(num, device=device), torch.zeros(num, device=device)
        server_sum = torch.zeros((), device=device)
        generator.train()
        parameters = list(generator.parameters())
        with cudnn_algorithms(config.engine.deterministic):
            for step in range(max_steps):
                active = step < plan.steps  # (K,) still training
                rows = torch.as_tensor(np.flatnonzero(active), device=device)
                idx = batch_indices[:, step]
                real, y = to_float_images(images[idx]), labels[idx]  # (K, B, C, H, W), (K, B)
                z = step_noise(plan, noise, batch, generator.z_dim, device)  # (K, B, z_dim)
                with bfloat16_compute(config.engine.bfloat16):  # one batch of the server's G for all the clients
                    made = generator(z[rows].flatten(0, 1), y[rows].flatten(0, 1)).float()  # (A * B, C, H, W)
                made = made.view(len(rows), batch, *made.shape[1:])  # (A, B, C, H, W)
                fakes = made.new_zeros(num, *made.shape[1:]).index_copy(0, rows, made.detach())  # (K, B, C, H, W)
                with clients.step(active):
                    d_sum += clients.d_step(real, fakes, y, active)
                    if layout == "md_gan":
                        losses, feedback = clients.feedback(fakes, y, active)  # (K,), (K, B, C, H, W)
                        objective, server_loss = feedback_surrogate(made, feedback[rows]), losses[rows].mean()
                    else:
                        losses, objective = self._scored_objective(clients, generator, plan, active, draws)
                        server_loss = objective
                    for param, grad in zip(parameters, torch.autograd.grad(objective, parameters)):
                        param.grad = grad
                    self.g_opt.step()
                    g_sum += losses
                    server_sum += server_loss.detach()
        final, opt = clients.result()
        with torch.no_grad():
            for key, value in self.d_state.items():
                value[ids] = final[key]
            for key, value in (self.d_opt or {}).items():
                value[ids] = opt[key].to(value.dtype)
        d_losses = (d_sum / torch.as_tensor(plan.steps, device=device)).tolist()
        for client, loss in zip(plan.client_ids.tolist(), d_losses):
            store.setdefault(client, {})["last_loss"] = loss
        swapped = self._swap(plan.round)
        return {"client_ids": plan.client_ids, "sizes": plan.sizes, "steps": plan.steps, "d_loss": d_losses,
                "g_loss": (g_sum / torch.as_tensor(plan.steps, device=device)).tolist(),
                "log": self._round_log(plan, float(server_sum) / max(1, max_steps), swapped)}

    def _scored_objective(self, clients: StackedDiscriminators | ModuleDiscriminators, generator: Generator,
                          plan: RoundPlan, active: np.ndarray, draws: torch.Generator) -> tuple[Tensor, Tensor]:
        """UA-GAN, F2U, F2A: a batch of G's, scored by every active client; each client's own G loss [K] (for the
        record) and G's loss against the layout's combination of them. F2A's temperature takes its step here."""
        config, device = self.config, self.log_temperature.device
        batch = config.batch_size
        held = self.counts[plan.client_ids[active]]  # (A, C) label counts of the step's clients
        z = torch.randn((batch, generator.z_dim), generator=draws, device=device)
        y = torch.multinomial(torch.as_tensor(held.sum(0), dtype=torch.float, device=device), batch,
                              replacement=True, generator=draws)  # (B,) labels as the step's clients hold them
        with bfloat16_compute(config.engine.bfloat16):
            images = generator(z, y).float()  # (B, C, H, W)
        logits = clients.logits(images, y, active)  # (K, B)
        mask = torch.as_tensor(active, device=device)
        own = torch.stack([generator_objective(row.detach(), config.gan_loss) for row in logits])  # (K,)
        own = torch.where(mask, own, 0.0)
        scored = logits[torch.as_tensor(np.flatnonzero(active), device=device)]  # (A, B)
        temperature = self.log_temperature.exp()
        objective = combined_generator_loss(self.layout, scored, shares=label_shares(held, y), temperature=temperature,
                                            loss=config.gan_loss)
        if self.layout == "f2a":  # the discriminators' side of the game: lambda descends -log(1 - D_f2a)
            mixture = forgiving_mixture(scored.detach(), temperature)
            (self.log_temperature.grad,) = torch.autograd.grad(
                F.binary_cross_entropy(mixture, torch.zeros_like(mixture)), self.log_temperature)
            self.temperature_opt.step()
        return own, objective

    def _swap(self, round_index: int) -> bool:
        """MD-GAN's swap after the round, when it is due: every client's D (and Adam state) moves to another."""
        config = self.config
        if not (self.layout == "md_gan" and config.swap_every and round_index % config.swap_every == 0):
            return False
        order = torch.as_tensor(swap_permutation(config.num_clients, config.seed, round_index))
        self.d_state = {k: v[order.to(v.device)] for k, v in self.d_state.items()}
        if self.d_opt is not None:
            self.d_opt = {k: v[order.to(v.device)] for k, v in self.d_opt.items()}
        return True

    def _round_log(self, plan: RoundPlan, server_g_loss: float, swapped: bool) -> dict[str, Any]:
        """The round's bytes (a swap's included) and server loss; F2A's temperature."""
        config = self.config
        up, down = step_bytes(self.layout, config.batch_size, DATASETS[config.dataset].image_shape)
        client_steps = int(plan.steps.sum())
        log: dict[str, Any] = {"bytes_up": up * client_steps, "bytes_down": down * client_steps,
                               "server_g_loss": server_g_loss}
        if swapped:
            log["swapped"] = True
            log["bytes_up"] += self.d_bytes * config.num_clients  # each D to the server and on to its next client
            log["bytes_down"] += self.d_bytes * config.num_clients
        if self.layout == "f2a":
            log["temperature"] = float(self.log_temperature.detach().exp())
        return log

    def state_dict(self) -> dict[str, Any]:
        """Everything the layout keeps between rounds, on the CPU (checkpoints load it with weights_only=True)."""
        return map_tensors({"d_state": self.d_state, "d_opt": self.d_opt, "g_opt": self.g_opt.state_dict(),
                            "log_temperature": self.log_temperature.detach(),
                            "temperature_opt": self.temperature_opt.state_dict()},
                           lambda t: t.detach().cpu().clone())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = self.log_temperature.device
        self.d_state = {k: v.to(device) for k, v in state["d_state"].items()}
        self.d_opt = None if state["d_opt"] is None else {k: v.to(device) for k, v in state["d_opt"].items()}
        self.g_opt.load_state_dict(state["g_opt"])
        with torch.no_grad():
            self.log_temperature.copy_(state["log_temperature"])
        self.temperature_opt.load_state_dict(state["temperature_opt"])
