"""The clients' own discriminators, for the layouts with one generator at the server (multi_discriminator.py).

What a client's D does in those layouts: a step on its real images against the fakes it received (`d_step`), the
gradient of G's loss with respect to those fakes (`feedback`, MD-GAN's error feedback), and its logits on images the
server sends every client (`logits`). StackedDiscriminators does it for K clients at once (one [K, P] parameter
tensor, the fused StackedAdam, gan.py's losses mapped over the clients with vmap or map_clients);
ModuleDiscriminators is the same written the obvious way, a client after another as nn.Modules with
torch.optim.Adam: the reference the stacked one is tested against.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.func import functional_call, vmap

from fedgan.config import EngineOptions
from fedgan.engine.convolutions import in_client_compute
from fedgan.engine.precision import bfloat16_compute
from fedgan.engine.reference import adam_row, client_adam, client_model
from fedgan.engine.stacked import ADAM_MOMENTS, FlatParams, StackedAdam, fresh_adam_state, map_clients
from fedgan.gan import LocalTraining
from fedgan.models import Discriminator

Tensor = torch.Tensor


class StackedDiscriminators:
    """K clients' discriminators stacked on a leading dim, each with its own Adam state.

    Clients not `active` in a step (their local steps done) are not computed as plain models (map_clients) and are
    skipped by Adam; under vmap they are computed, and get back the running statistics they held (`step`).
    """

    def __init__(self, discriminator: Discriminator, state: Mapping[str, Tensor], opt: Mapping[str, Tensor] | None,
                 local: LocalTraining, engine: EngineOptions, client_map: str):
        """`state`: {key: [K, ...]} the clients' Ds; `opt`: their Adam states (None: fresh ones)."""
        self.keys, self.local = list(state), local
        self.batched = client_map == "vmap"
        self.net = net = FlatParams(discriminator, state)
        count, device = net.count, net.flat.device
        self.buffers = {k: v.detach().clone() for k, v in state.items() if k not in net.params}
        self.opt = (fresh_adam_state(count, net.flat.shape[1], device) if opt is None
                    else {k: v.to(device).clone() for k, v in opt.items()})
        self.adam = StackedAdam(net.flat, self.opt, lr=local.lr_d, betas=local.betas)

        def in_compute_modes(fn):  # a client's function under bfloat16 compute and the thin convolutions' form
            return in_client_compute(fn, engine, self.batched, count, device)

        def client(params, buffers):  # one client's D as gan.py's losses call it
            return lambda x, y: functional_call(discriminator, (params, buffers), (x, y))
        self._d_loss = in_compute_modes(lambda p, b, real, fake, y: local.d_loss(client(p, b), real, fake, y))
        self._g_loss = in_compute_modes(lambda p, b, fake, y: local.g_loss(client(p, b), fake, y))
        self._logits = in_compute_modes(lambda p, b, x, y: client(p, b)(x, y).float())

    def _map(self, fn, active: np.ndarray):
        """fn of one client's slices over the clients: vmap, or a plain loop that skips the inactive ones."""
        return vmap(fn) if self.batched else map_clients(fn, active.tolist())

    @contextlib.contextmanager
    def step(self, active: np.ndarray) -> Iterator[None]:
        """A local step (its backward passes included, G's too): under vmap the inactive clients compute, so they get
        back the running statistics they held (after the step: autograd may still read them until then)."""
        saved = None if not self.batched or active.all() else [t.clone() for t in self.buffers.values()]
        yield
        if saved is not None:
            mask = torch.as_tensor(active, device=self.net.flat.device)
            with torch.no_grad():
                for before, after in zip(saved, self.buffers.values()):
                    after.copy_(torch.where(mask.view(-1, *([1] * (after.dim() - 1))), after, before))

    def d_step(self, real: Tensor, fakes: Tensor, labels: Tensor, active: np.ndarray) -> Tensor:
        """One Adam step of each active client's D: real [K, B, C, H, W] against fakes (same shape), labels [K, B];
        returns the losses [K] (0 where inactive)."""
        loss = self._map(self._d_loss, active)(self.net.params, self.buffers, real, fakes, labels)  # (K,)
        grads = torch.autograd.grad(loss.sum(), list(self.net.params.values()))
        self.adam.step(torch.cat([g.reshape(self.net.count, -1) for g in grads], 1), active.tolist())  # (K, P)
        return torch.where(torch.as_tensor(active, device=loss.device), loss.detach(), 0.0)

    def feedback(self, fakes: Tensor, labels: Tensor, active: np.ndarray) -> tuple[Tensor, Tensor]:
        """Each active client's G loss on the fakes it holds [K, B, C, H, W] and its gradient with respect to them:
        ([K], [K, B, C, H, W]); rows of inactive clients are 0."""
        fakes = fakes.detach().requires_grad_(True)
        loss = self._map(self._g_loss, active)(self.net.params, self.buffers, fakes, labels)  # (K,)
        (grad,) = torch.autograd.grad(loss.sum(), fakes)  # the clients' losses are apart: row k is client k's
        mask = torch.as_tensor(active, device=loss.device)
        return torch.where(mask, loss.detach(), 0.0), grad * mask.view(-1, *([1] * (grad.dim() - 1)))

    def logits(self, images: Tensor, labels: Tensor, active: np.ndarray) -> Tensor:
        """Every client's logits [K, B] on the same images [B, C, H, W] and labels [B], differentiable in the
        images (not in the Ds)."""
        count = self.net.count
        params = {k: v.detach() for k, v in self.net.params.items()}
        return self._map(self._logits, active)(params, self.buffers, images.expand(count, *images.shape),
                                               labels.expand(count, *labels.shape))

    def result(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The clients' Ds {key: [K, ...]} and Adam states, copied out."""
        values = {**self.net.split(self.net.flat), **self.buffers}
        return ({k: values[k].detach().clone() for k in self.keys},
                {k: v.detach().clone() for k, v in self.opt.items()})


class ModuleDiscriminators:
    """StackedDiscriminators' contract, each client a copy of the nn.Module with its own torch.optim.Adam, in turn."""

    def __init__(self, discriminator: Discriminator, state: Mapping[str, Tensor], opt: Mapping[str, Tensor] | None,
                 local: LocalTraining, engine: EngineOptions):
        layout = FlatParams(discriminator, state)
        self.local, self.bfloat16 = local, engine.bfloat16
        self.models = [client_model(discriminator, state, row) for row in range(layout.count)]
        self.optimizers = [client_adam(model, local.lr_d, local.betas, opt, row, layout)
                           for row, model in enumerate(self.models)]

    def step(self, active: np.ndarray) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the inactive clients are not computed

    def d_step(self, real: Tensor, fakes: Tensor, labels: Tensor, active: np.ndarray) -> Tensor:
        losses = torch.zeros(len(self.models), device=real.device)
        for k in np.flatnonzero(active):
            with bfloat16_compute(self.bfloat16):
                loss = self.local.d_loss(self.models[k], real[k], fakes[k].detach(), labels[k])
            self.optimizers[k].zero_grad()
            loss.backward()
            self.optimizers[k].step()
            losses[k] = loss.detach()
        return losses

    def feedback(self, fakes: Tensor, labels: Tensor, active: np.ndarray) -> tuple[Tensor, Tensor]:
        losses, grads = torch.zeros(len(self.models), device=fakes.device), torch.zeros_like(fakes)
        for k in np.flatnonzero(active):
            held = fakes[k].detach().requires_grad_(True)  # the images client k received
            with bfloat16_compute(self.bfloat16):
                loss = self.local.g_loss(self.models[k], held, labels[k])
            (grads[k],) = torch.autograd.grad(loss, held)
            losses[k] = loss.detach()
        return losses, grads

    def logits(self, images: Tensor, labels: Tensor, active: np.ndarray) -> Tensor:
        rows = []
        for k, model in enumerate(self.models):
            if not active[k]:
                rows.append(torch.zeros(len(labels), device=images.device))
                continue
            model.requires_grad_(False)  # the gradient goes to the images, not to client k's D
            with bfloat16_compute(self.bfloat16):
                rows.append(model(images, labels).float())
            model.requires_grad_(True)
        return torch.stack(rows)

    def result(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        states = [model.state_dict() for model in self.models]
        rows = [adam_row(optimizer, model) for optimizer, model in zip(self.optimizers, self.models)]
        return ({k: torch.stack([s[k] for s in states]) for k in states[0]},
                {k: torch.stack([r[k] for r in rows]) for k in ("step", *ADAM_MOMENTS)})
