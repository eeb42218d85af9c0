"""train_clients: the local training of a round's clients, all at once as one batched model."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from fedgan.checks import is_number, require
from fedgan.config import CLIENT_MAPS, FedConfig
from fedgan.data import to_float_images
from fedgan.engine.convolutions import client_convolutions
from fedgan.engine.graphs import CudaGraphStep
from fedgan.engine.precision import bfloat16_compute, cudnn_algorithms
from fedgan.engine.stacked import FlatParams, StackedAdam, map_clients, map_tensors
from fedgan.models import Discriminator, Generator
from fedgan.rounds import RoundPlan

Tensor = torch.Tensor


@dataclass
class LocalResult:
    g_state: dict[str, Tensor]  # {key: [K, ...]} the clients' generators after local training
    d_state: dict[str, Tensor]  # {key: [K, ...]} the clients' discriminators
    g_opt: dict[str, Any]  # stacked Adam state of the generators
    d_opt: dict[str, Any]  # stacked Adam state of the discriminators
    d_loss: Tensor  # [K] mean discriminator loss over each client's steps
    g_loss: Tensor  # [K] mean generator loss


CLIENT_STREAMS = 8  # client_map="streams": CUDA streams the clients share (CUDA_DEVICE_MAX_CONNECTIONS' default)


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
    how cuDNN picks its algorithms (cudnn_algorithms).
    """
    client_map = config.client_map if client_map is None else client_map
    require(client_map in CLIENT_MAPS, "client_map", client_map, f"one of {list(CLIENT_MAPS)}")
    require(is_number(prox_mu) and prox_mu >= 0, "prox_mu", prox_mu, "a number >= 0")
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
                with client_convolutions(config, looped, num_clients, device), bfloat16_compute(config.amp):
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
        with cudnn_algorithms(self.config.deterministic):  # the backward passes too: autograd.grad runs in the steps
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
            return map_tensors(tree, lambda t: t.detach().clone(memory_format=torch.contiguous_format))

        def final_state(net: FlatParams, buffers: Mapping[str, Tensor], state: Mapping[str, Tensor]):
            values = {**net.split(net.flat), **buffers}
            return {k: copied(values[k]) for k in state}  # the caller's key order
        return LocalResult(final_state(self.g_flat, self.g_buffers, g_state),
                           final_state(self.d_flat, self.d_buffers, d_state),
                           copied(self.g_flat.unflatten_adam_state(self.g_opt)),
                           copied(self.d_flat.unflatten_adam_state(self.d_opt)),
                           self.d_loss_sum / steps, self.g_loss_sum / steps)
