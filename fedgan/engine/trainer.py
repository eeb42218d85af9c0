"""train_clients: the local training of a round's clients, all at once, each step gan.py's gan_step.

The clients' copies of G and D are stacked on a leading client dim and stay on the device: each network's
parameters one [K, P] tensor (FlatParams) that a fused Adam updates for every client at once (StackedAdam), the
losses summed on the device until the round ends. A step maps gan.py's losses over the clients with
functional_call, under vmap (one batched call) or as plain one-model calls a client (map_clients, on CUDA streams
or not); on a CUDA GPU it is replayed from a CUDA graph. client_map="reference" runs engine/reference.py instead.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.func import functional_call, vmap

from fedgan.config import EngineOptions
from fedgan.data import to_float_images
from fedgan.engine.convolutions import in_client_compute
from fedgan.engine.graphs import CudaGraphStep
from fedgan.engine.precision import cudnn_algorithms
from fedgan.engine.reference import train_clients_one_by_one
from fedgan.engine.stacked import FlatParams, LocalResult, StackedAdam, fresh_adam_state, map_clients, map_tensors
from fedgan.gan import LocalTraining, gan_step
from fedgan.models import Discriminator, Generator
from fedgan.rounds import RoundPlan, derive_seed, step_input_noise, step_noise

Tensor = torch.Tensor


def resolved_client_map(client_map: str, device: torch.device, steps: Sequence[int]) -> str:
    """What "auto" runs for clients taking `steps` local steps each (measured: benchmarks/RESULTS.md). On a CPU the
    loop: vmap's grouped convolutions are slower there than K plain ones. On a CUDA GPU, when every client takes the
    same number of steps, the clients as plain models side by side on streams, replayed from CUDA graphs kept from
    round to round; with unequal clients (a label-skewed split) vmap, whose steps after the shortest client is done
    replay from a graph (on streams they run eagerly)."""
    if client_map != "auto":
        return client_map
    if device.type == "cpu":
        return "loop"
    return "streams" if device.type == "cuda" and len(set(steps)) == 1 else "vmap"


def train_clients(generator: Generator, discriminator: Discriminator, g_state: Mapping[str, Tensor],
                  d_state: Mapping[str, Tensor], images: Tensor, labels: Tensor, plan: RoundPlan,
                  local: LocalTraining, engine: EngineOptions = EngineOptions(), *,
                  g_opt: Mapping[str, Tensor] | None = None, d_opt: Mapping[str, Tensor] | None = None,
                  corrections: Mapping[str, Tensor] | None = None) -> LocalResult:
    """Local training of the plan's K clients from their stacked states (and Adam states; None: fresh ones).

    `generator`/`discriminator` only lend their structure, put in training mode as the reference's copies are (BatchNorm
    normalises by the batch and updates its running statistics); `g_state`/`d_state` hold each client's copy stacked on
    dim 0; `images` (uint8) and `labels` are the whole training set, indexed by the plan's batches. `local` is what
    the clients do (learning rates, FedProx's mu, whether G trains), `engine` how it is computed: every client map
    computes the same thing. With `local.control_variates`, `corrections` {"g": [K, P], "d": [K, P]} are added to
    every gradient (SCAFFOLD's c - c_i, scaffold.py). The engine kept for a round of this shape is reused by the next
    (LocalTrainer).
    """
    client_map = resolved_client_map(engine.client_map, images.device, plan.steps.tolist())
    if client_map == "reference":
        return train_clients_one_by_one(generator, discriminator, g_state, d_state, images, labels, plan, local,
                                        engine, g_opt=g_opt, d_opt=d_opt, corrections=corrections)
    generator.train()
    discriminator.train()
    num_clients, _, batch = plan.batch_indices.shape
    key = (id(generator), id(discriminator), id(images), id(labels), num_clients, batch, client_map, local, engine)
    trainer = _LOCAL_TRAINERS.pop(key, None)
    if trainer is None:
        trainer = LocalTrainer(generator, discriminator, g_state, d_state, images, labels, local, engine, client_map)
    _LOCAL_TRAINERS[key] = trainer  # the most recent last
    while len(_LOCAL_TRAINERS) > LOCAL_TRAINERS_KEPT:
        del _LOCAL_TRAINERS[next(iter(_LOCAL_TRAINERS))]
    return trainer(g_state, d_state, plan, g_opt, d_opt, corrections)


LOCAL_TRAINERS_KEPT = 1  # LocalTrainers kept for later rounds: each holds its clients' state and its graphs' memory
_LOCAL_TRAINERS: dict[tuple, "LocalTrainer"] = {}  # train_clients' cache, keyed by what a trainer's steps bake in


def clear_local_trainers() -> None:
    """Lets go of the trainers train_clients kept (their state, CUDA graphs, and the models and data they hold):
    the memory they took is free for other work; the next round builds a new trainer."""
    _LOCAL_TRAINERS.clear()


class LocalTrainer:
    """train_clients' engine for one shape of round (models, data, clients' count, batch, options): the stacked
    state lives in tensors kept from round to round, each round's states copied in and the results copied out, so
    that the CUDA graphs captured in one round replay in the next (a capture costs two eager steps and a recording).
    A trainer holds references to the models and data it was built for; train_clients keeps LOCAL_TRAINERS_KEPT.
    """

    def __init__(self, generator: Generator, discriminator: Discriminator, g_state: Mapping[str, Tensor],
                 d_state: Mapping[str, Tensor], images: Tensor, labels: Tensor, local: LocalTraining,
                 engine: EngineOptions, client_map: str):
        """`g_state`/`d_state`: a round's stacked states, for the shapes (their values are copied in by __call__)."""
        device = self.device = images.device
        self.z_dim, self.engine, self.local = generator.z_dim, engine, local
        self.image_shape = tuple(images.shape[1:])  # (C, H, W)
        batched = self.batched = client_map == "vmap"  # else each client a plain model: map_clients
        self.g_flat, self.d_flat = g_flat, d_flat = FlatParams(generator, g_state), FlatParams(discriminator, d_state)
        num_clients = g_flat.count
        self.streams = streams = ([torch.cuda.Stream(device) for _ in range(min(num_clients, engine.cuda_streams))]
                                  if client_map == "streams" and device.type == "cuda" else None)
        g_params, d_params = g_flat.params, d_flat.params
        self.g_buffers = g_buffers = {k: v.detach().clone() for k, v in g_state.items() if k not in g_params}
        self.d_buffers = d_buffers = {k: v.detach().clone() for k, v in d_state.items() if k not in d_params}
        self.g_opt = g_opt = fresh_adam_state(num_clients, g_flat.flat.shape[1], device)
        self.d_opt = d_opt = fresh_adam_state(num_clients, d_flat.flat.shape[1], device)
        prox_mu = local.prox_mu
        self.anchors = (g_flat.flat.clone(), d_flat.flat.clone()) if prox_mu else None
        g_anchor, d_anchor = self.anchors or (None, None)
        # SCAFFOLD: each client's c - c_i [K, P] a network, copied in each round; the sums of its local gradients
        self.corrections = ((torch.zeros_like(g_flat.flat), torch.zeros_like(d_flat.flat)) if local.control_variates
                            else None)
        self.gradient_sums = tuple(torch.zeros_like(c) for c in self.corrections or ())
        g_correction, d_correction = self.corrections or (None, None)
        g_sum, d_sum = self.gradient_sums or (None, None)
        g_adam = StackedAdam(g_flat.flat, g_opt, lr=local.lr_g, betas=local.betas)
        d_adam = StackedAdam(d_flat.flat, d_opt, lr=local.lr_d, betas=local.betas)
        self.d_loss_sum = d_loss_sum = torch.zeros(num_clients, device=device)
        self.g_loss_sum = g_loss_sum = torch.zeros(num_clients, device=device)

        def flat_gradient(loss: Tensor, net: FlatParams, anchor: Tensor | None, correction: Tensor | None,
                          gradient_sum: Tensor | None) -> Tensor:
            grads = torch.autograd.grad(loss, list(net.params.values()))
            flat = torch.cat([g.reshape(net.count, -1) for g in grads], 1)  # (K, P)
            if anchor is not None:  # FedProx: the gradient of gan.proximal_term, mu (w - w_start)
                flat = flat + prox_mu * (net.flat - anchor)
            if correction is None:
                return flat
            gradient_sum.add_(flat)  # SCAFFOLD's c_i: the mean of the uncorrected gradients
            return flat + correction

        def in_compute_modes(fn):  # a client's function under bfloat16 compute and the thin convolutions' form
            return in_client_compute(fn, engine, batched, num_clients, device)

        def client_discriminator(params, buffers):  # one client's D, as gan.py's losses call it
            return lambda x, y: functional_call(discriminator, (params, buffers), (x, y))

        @in_compute_modes
        def client_generate(params, buffers, z, y):  # noise [B, z_dim], labels [B] -> images [B, C, H, W]
            return functional_call(generator, (params, buffers), (z, y))

        @in_compute_modes
        def client_d_loss(params, buffers, real, fake, y):
            return local.d_loss(client_discriminator(params, buffers), real, fake, y)

        @in_compute_modes
        def client_g_loss(params, buffers, fake, y):
            return local.g_loss(client_discriminator(params, buffers), fake, y)

        def local_step(idx: Tensor, z: Tensor, inputs_noise: Tensor, on_steps: list[bool] | None
                       ) -> tuple[Tensor, Tensor]:
            """gan_step for the clients `on_steps` (None: all) on images `idx` [K, B] and noise z [K, B, z_dim], with
            instance noise [3, K, B, C, H, W] on D's inputs when local.noisy_inputs (else an empty tensor)."""
            def over_clients(fn):  # fn of one client's slices -> the same of all K, stacked on dim 0
                return vmap(fn) if batched else map_clients(fn, on_steps, streams)
            d_loss, g_loss = gan_step(
                generator=lambda noise, y: over_clients(client_generate)(g_params, g_buffers, noise, y),
                d_loss=lambda real, fake, y: over_clients(client_d_loss)(d_params, d_buffers, real, fake, y),
                g_loss=lambda fake, y: over_clients(client_g_loss)(d_params, d_buffers, fake, y),
                update_d=lambda loss: d_adam.step(flat_gradient(loss.sum(), d_flat, d_anchor, d_correction, d_sum),
                                                  on_steps),
                update_g=lambda loss: g_adam.step(flat_gradient(loss.sum(), g_flat, g_anchor, g_correction, g_sum),
                                                  on_steps),
                real=to_float_images(images[idx]), labels=labels[idx], noise=z,  # (K, B, C, H, W), (K, B), (K, B, z)
                train_generator=local.train_generator, input_noise=inputs_noise if local.noisy_inputs else None)
            return d_loss, torch.zeros_like(d_loss_sum) if g_loss is None else g_loss  # (K,) each

        def step_of_all(idx: Tensor, z: Tensor, inputs_noise: Tensor) -> None:  # every client trains
            d_loss, g_loss = local_step(idx, z, inputs_noise, None)  # losses added on the device
            d_loss_sum.add_(d_loss)
            g_loss_sum.add_(g_loss)

        # After the shortest client is done, the finished ones sit out. As plain models they are skipped
        # (`on_steps`, known on the host), so only their running statistics and SCAFFOLD's gradient sums need
        # putting back (a skipped client's gradient is zero, but FedProx's term in it is not); vmap computes every
        # client, so there they also get back their parameters and Adam state.
        kept = [*g_buffers.values(), *d_buffers.values(), *self.gradient_sums]
        if batched:
            kept += [g_flat.flat, d_flat.flat, *g_opt.values(), *d_opt.values()]

        def step_of_some(idx: Tensor, z: Tensor, inputs_noise: Tensor, active: Tensor,
                         on_steps: list[bool] | None = None) -> None:
            """A step after the shortest client is done: clients not `active` [K] get back what `kept` held before
            it and count no loss. Under vmap (`on_steps` None) the mask is only a tensor, so the step has no host
            sync and replays from a CUDA graph like step_of_all: with unequal clients (label skew) most of a round
            is these."""
            saved = [t.clone() for t in kept]
            d_loss, g_loss = local_step(idx, z, inputs_noise, on_steps)
            with torch.no_grad():
                for before, after in zip(saved, kept):
                    after.copy_(torch.where(active.view(-1, *([1] * (after.dim() - 1))), after, before))
            d_loss_sum.add_(torch.where(active, d_loss, 0.0))
            g_loss_sum.add_(torch.where(active, g_loss, 0.0))

        self.step_of_all, self.step_of_some = step_of_all, step_of_some
        self.graphs = engine.cuda_graphs and device.type == "cuda"
        # one memory pool: the graphs run one after another, each round in the same order
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        if self.graphs:
            self.step_of_all = CudaGraphStep(step_of_all, self.pool)
            if batched:
                self.step_of_some = CudaGraphStep(step_of_some, self.pool)
        self.tail_graphs: dict[tuple[bool, ...], Callable] = {}  # on a GPU, a CUDA graph a set of clients training
        self.tails_for: tuple[int, ...] = ()  # the clients' step counts the tail graphs are for

    def tail_step(self, plan: RoundPlan, step: int) -> Callable:
        """The plain models' step after the shortest client is done: it skips the finished clients, known on the
        host, so on a GPU each set of clients still training gets a CUDA graph of its own; a round of the same
        clients' step counts (all clients every round, as in a label-skewed split) replays the same graphs. Not with
        the clients on streams: there such a graph failed to capture or computed other numbers than the loop
        (benchmarks/RESULTS.md), so these steps run eagerly."""
        if not self.graphs or self.streams:
            return functools.partial(self.step_of_some, on_steps=(step < plan.steps).tolist())
        if tuple(plan.steps) != self.tails_for:  # other clients or step counts: other sets, the old graphs let go
            self.tail_graphs, self.tails_for = {}, tuple(plan.steps)
        on_steps = tuple((step < plan.steps).tolist())
        if on_steps not in self.tail_graphs:
            self.tail_graphs[on_steps] = CudaGraphStep(functools.partial(self.step_of_some, on_steps=list(on_steps)),
                                                       self.pool)
        return self.tail_graphs[on_steps]

    def __call__(self, g_state: Mapping[str, Tensor], d_state: Mapping[str, Tensor], plan: RoundPlan,
                 g_opt: Mapping[str, Tensor] | None = None, d_opt: Mapping[str, Tensor] | None = None,
                 corrections: Mapping[str, Tensor] | None = None) -> LocalResult:
        """One round of the plan's clients from the stacked states (and Adam states, or fresh ones)."""
        if (self.corrections is None) != (corrections is None):
            raise ValueError("corrections (SCAFFOLD's c - c_i) are given exactly when local.control_variates is set")
        device = self.device
        with torch.no_grad():  # this round's values into the kept tensors, in place: the graphs read them there
            for net, state, buffers, opt, given in ((self.g_flat, g_state, self.g_buffers, self.g_opt, g_opt),
                                                    (self.d_flat, d_state, self.d_buffers, self.d_opt, d_opt)):
                net.flat.copy_(net.flatten(state))
                for key, value in buffers.items():
                    value.copy_(state[key])
                for key, value in opt.items():  # the given Adam state, or a fresh one
                    if given is None:
                        value.zero_()
                    else:
                        value.copy_(given[key])
            for anchor, net in zip(self.anchors or (), (self.g_flat, self.d_flat)):
                anchor.copy_(net.flat)
            for kept, which in zip(self.corrections or (), ("g", "d")):
                kept.copy_(corrections[which])
            for kept in self.gradient_sums:
                kept.zero_()
            self.d_loss_sum.zero_()
            self.g_loss_sum.zero_()
        _, max_steps, batch = plan.batch_indices.shape
        steps = torch.as_tensor(plan.steps, device=device)
        batch_indices = plan.batch_indices.to(device)
        noise_gen = torch.Generator(device=device).manual_seed(plan.noise_seed)
        inputs_gen = torch.Generator(device=device).manual_seed(derive_seed(plan.noise_seed, 1))  # instance noise
        no_noise = torch.zeros(0, device=device)
        steps_of_all = int(plan.steps.min())  # the steps every client takes; after them, the finished ones sit out
        with cudnn_algorithms(self.engine.deterministic):  # the backward passes too: autograd.grad runs in the steps
            for step in range(max_steps):
                idx = batch_indices[:, step]  # (K, B)
                z = step_noise(plan, noise_gen, batch, self.z_dim, device)  # (K, B, z_dim)
                inputs = (step_input_noise(plan, inputs_gen, (batch, *self.image_shape), device)
                          if self.local.noisy_inputs else no_noise)  # (3, K, B, C, H, W) or (0,)
                if step < steps_of_all:
                    self.step_of_all(idx, z, inputs)
                elif self.batched:
                    self.step_of_some(idx, z, inputs, step < steps)
                else:
                    self.tail_step(plan, step)(idx, z, inputs, step < steps)  # (K,) still training

        def copied(tree: Any) -> Any:  # out of the kept tensors, which the next round overwrites
            return map_tensors(tree, lambda t: t.detach().clone(memory_format=torch.contiguous_format))

        def final_state(net: FlatParams, buffers: Mapping[str, Tensor], state: Mapping[str, Tensor]):
            values = {**net.split(net.flat), **buffers}
            return {k: copied(values[k]) for k in state}  # the caller's key order
        return LocalResult(final_state(self.g_flat, self.g_buffers, g_state),
                           final_state(self.d_flat, self.d_buffers, d_state), copied(self.g_opt), copied(self.d_opt),
                           self.d_loss_sum / steps, self.g_loss_sum / steps,
                           None if self.corrections is None else {  # the clients' mean uncorrected gradients
                               which: copied(total) / steps.view(-1, 1)
                               for which, total in zip(("g", "d"), self.gradient_sums)})
