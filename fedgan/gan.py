"""What one client computes in a local step of a conditional GAN: (1) update D, (2) update G, written once.

The losses are the non-saturating GAN of Goodfellow et al. (2014) on logits, conditioned on the label as in
Mirza & Osindero (2014), with one-sided label smoothing (Salimans et al. 2016) as an option, or the hinge loss
(Lim & Ye 2017; Miyato et al. 2018). `gan_step` is called by the reference loop (engine/reference.py) with
nn.Modules and torch.optim.Adam, and by the batched engine (engine/trainer.py) with the same losses mapped over K
clients' stacked parameters (functional_call, then vmap, a loop or CUDA streams; replayed from CUDA graphs on a
GPU): the fast path runs this math, it does not restate it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedgan.checks import finite, is_number, positive_number, require
from fedgan.config import GAN_LOSSES, FedConfig

Tensor = torch.Tensor
Discriminate = Callable[[Tensor, Tensor], Tensor]  # (images [B, C, H, W], labels [B]) -> logits [B]


@dataclass(frozen=True)
class LocalTraining:
    """What a client's local training is, as it travels from the config to the local step."""

    lr_g: float  # the generator's Adam learning rate
    lr_d: float  # the discriminator's
    betas: tuple[float, float]  # Adam's betas, both networks
    prox_mu: float = 0.0  # FedProx's mu: proximal_term added to both networks' losses (0: plain local training)
    train_generator: bool = True  # False: only D trains, G only draws the fakes (DP-FedAvg-GAN's clients)
    gan_loss: str = "bce"  # "bce" or "hinge": discriminator_loss and generator_loss
    label_smoothing: float = 0.0  # bce: D's target for real images is 1 - label_smoothing
    control_variates: bool = False  # SCAFFOLD: each client's c - c_i added to its gradients (scaffold.py)
    noisy_inputs: bool = False  # instance noise: D's inputs get the step's noise (rounds.step_input_noise)

    def __post_init__(self) -> None:
        for name in ("lr_g", "lr_d"):
            require(positive_number(getattr(self, name)), name, getattr(self, name), "a number > 0")
        require(is_number(self.prox_mu) and finite(self.prox_mu) and self.prox_mu >= 0, "prox_mu", self.prox_mu,
                "a number >= 0")
        require(self.gan_loss in GAN_LOSSES, "gan_loss", self.gan_loss, f"one of {list(GAN_LOSSES)}")
        require(is_number(self.label_smoothing) and 0 <= self.label_smoothing < 0.5
                and (self.label_smoothing == 0 or self.gan_loss == "bce"), "label_smoothing", self.label_smoothing,
                "a number in [0, 0.5), and 0 with the hinge loss")

    @classmethod
    def of(cls, config: FedConfig) -> LocalTraining:
        """The local training a federation of `config` gives its clients."""
        return cls(lr_g=config.lr_g, lr_d=config.lr_d, betas=config.betas, prox_mu=config.client_prox_mu,
                   train_generator=config.gan_layout != "server_g", gan_loss=config.gan_loss,
                   label_smoothing=config.label_smoothing, control_variates=config.strategy == "scaffold",
                   noisy_inputs=config.instance_noise > 0)

    def d_loss(self, discriminator: Discriminate, real: Tensor, fake: Tensor, labels: Tensor) -> Tensor:
        """discriminator_loss with this training's loss and smoothing."""
        return discriminator_loss(discriminator, real, fake, labels, loss=self.gan_loss,
                                  label_smoothing=self.label_smoothing)

    def g_loss(self, discriminator: Discriminate, fake: Tensor, labels: Tensor) -> Tensor:
        """generator_loss with this training's loss."""
        return generator_loss(discriminator, fake, labels, loss=self.gan_loss)


def discriminator_loss(discriminator: Discriminate, real: Tensor, fake: Tensor, labels: Tensor, *,
                       loss: str = "bce", label_smoothing: float = 0.0) -> Tensor:
    """D's loss: real images should be called real, generated ones fake.

    "bce": binary cross-entropy on logits with targets 1 - label_smoothing for the real images (one-sided: the
    fakes' target stays 0, so D is kept from overconfidence without rewarding G's samples) and 0 for the fakes.
    "hinge": mean(relu(1 - D(real))) + mean(relu(1 + D(fake))): D is paid nothing for logits past the margins.
    """
    real_logits = discriminator(real, labels).float()  # float32 also where D computes in bfloat16
    fake_logits = discriminator(fake, labels).float()
    if loss == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return (F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, 1 - label_smoothing))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def generator_loss(discriminator: Discriminate, fake: Tensor, labels: Tensor, *, loss: str = "bce") -> Tensor:
    """G's loss: "bce", the non-saturating one (D should call the generated images real, 1); "hinge": -mean(D(fake)),
    the generator's side of the hinge loss."""
    return generator_objective(discriminator(fake, labels).float(), loss)


def generator_objective(logits: Tensor, loss: str = "bce") -> Tensor:
    """generator_loss on a discriminator's logits [B] of the generated images (also a combination of several
    discriminators' logits, multi_discriminator.py)."""
    if loss == "hinge":
        return -logits.mean()
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


def proximal_term(params: Iterable[Tensor], anchors: Iterable[Tensor], mu: float) -> Tensor:
    """FedProx (Li et al., MLSys 2020): (mu/2) |w - w_start|^2, w_start the weights the client started the round
    from; it keeps a client's model near the global one. Its gradient is mu (w - w_start)."""
    return mu / 2 * sum((p - a).square().sum() for p, a in zip(params, anchors))


def gan_step(*, generator: Callable[[Tensor, Tensor], Tensor], d_loss: Callable[[Tensor, Tensor, Tensor], Tensor],
             g_loss: Callable[[Tensor, Tensor], Tensor], update_d: Callable[[Tensor], None],
             update_g: Callable[[Tensor], None], real: Tensor, labels: Tensor, noise: Tensor,
             train_generator: bool = True, input_noise: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """One local step on a batch of real images and their labels, with the step's noise.

    `generator(noise, labels)` draws the fakes; `d_loss(real, fake, labels)` and `g_loss(fake, labels)` are
    discriminator_loss and generator_loss bound to the client's D; `update_d` / `update_g` take a loss and step
    that network's optimizer (FedProx's term included). `input_noise` [3, *real.shape], instance noise: added to
    D's real and generated inputs in its step and to the generated ones in G's. Returns the two losses, detached
    (G's None when `train_generator` is False).
    """
    with torch.set_grad_enabled(train_generator):
        fake = generator(noise, labels)

    # (1) Update D: real images -> 1, generated images -> 0 (the fakes detached: this step does not move G)
    seen_real, seen_fake = real, fake.detach()
    if input_noise is not None:  # instance noise on everything D sees
        seen_real, seen_fake = seen_real + input_noise[0], seen_fake + input_noise[1]
    loss_d = d_loss(seen_real, seen_fake, labels)
    update_d(loss_d)

    # (2) Update G: make the updated D call the generated images real
    if not train_generator:
        return loss_d.detach(), None
    loss_g = g_loss(fake if input_noise is None else fake + input_noise[2], labels)
    update_g(loss_g)
    return loss_d.detach(), loss_g.detach()


def generator_steps(generator: nn.Module, discriminator: Discriminate, optimizer: torch.optim.Optimizer, *,
                    steps: int, batch_size: int, num_classes: int, draws: torch.Generator, loss: str = "bce",
                    compute: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> float:
    """G trained alone against a fixed D, as DP-FedAvg-GAN's server does (Augenstein et al., ICLR 2020): `steps`
    steps of generator_loss on fresh noise and labels drawn uniformly from `draws`; returns G's mean loss."""
    device = next(generator.parameters()).device
    total = torch.zeros((), device=device)
    generator.train()
    for _ in range(steps):
        z = torch.randn((batch_size, generator.z_dim), generator=draws, device=device)
        y = torch.randint(num_classes, (batch_size,), generator=draws, device=device)
        with compute():
            value = generator_loss(discriminator, generator(z, y), y, loss=loss)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        total += value.detach()
    return float(total) / steps
