"""The round written the obvious way: each client in turn, nn.Modules and torch.optim.Adam (client_map="reference").

The batched engine must compute what this computes (tests/test_engine.py checks it does); it is also the place to
step through a client's local training in a debugger. Each client draws the same batches and noise as in the
engine: the noise of a step is drawn for all K clients at once, as the engine draws it.
"""
from __future__ import annotations

import copy
import functools
from typing import Mapping

import torch
import torch.nn as nn

from fedgan.config import EngineOptions
from fedgan.data import to_float_images
from fedgan.engine.precision import bfloat16_compute, cudnn_algorithms
from fedgan.engine.stacked import ADAM_MOMENTS, FlatParams, LocalResult, fresh_adam_state
from fedgan.gan import LocalTraining, gan_step, proximal_term
from fedgan.models import Discriminator, Generator
from fedgan.rounds import RoundPlan, derive_seed, step_input_noise, step_noise

Tensor = torch.Tensor


def client_model(model: nn.Module, stacked: Mapping[str, Tensor], row: int) -> nn.Module:
    """A copy of `model` holding client `row`'s state, in training mode."""
    client = copy.deepcopy(model).train()
    client.load_state_dict({k: v[row] for k, v in stacked.items()})
    return client


def client_adam(model: nn.Module, lr: float, betas: tuple[float, float], state: Mapping[str, Tensor] | None,
                row: int, layout: FlatParams) -> torch.optim.Adam:
    """torch.optim.Adam over a client's model, starting from row `row` of a stacked Adam state (None: fresh)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=betas)
    if state is not None:
        moments = {m: layout.split(state[m]) for m in ADAM_MOMENTS}  # {name: [K, ...]} each
        for name, param in model.named_parameters():
            optimizer.state[param] = {"step": state["step"][row].clone(),
                                      **{m: moments[m][name][row].clone() for m in ADAM_MOMENTS}}
    return optimizer


def adam_row(optimizer: torch.optim.Adam, model: nn.Module) -> dict[str, Tensor]:
    """A client's Adam state as one row of the stacked format: {"step": [], "exp_avg": [P], "exp_avg_sq": [P]}."""
    params = list(model.parameters())
    if not optimizer.state:  # it never stepped (G when only D trains)
        return {k: v[0] for k, v in fresh_adam_state(1, sum(p.numel() for p in params), params[0].device).items()}
    first = optimizer.state[params[0]]
    return {"step": first["step"].to(params[0].device, torch.float32).reshape(()),
            **{m: torch.cat([optimizer.state[p][m].flatten() for p in params]) for m in ADAM_MOMENTS}}


def optimizer_step(optimizer: torch.optim.Adam, model: nn.Module, anchors: list[Tensor], mu: float,
                   correction: dict[str, Tensor] | None, gradient_sum: dict[str, Tensor] | None, loss: Tensor) -> None:
    """Backpropagate a loss (with FedProx's proximal term when mu > 0), add SCAFFOLD's correction c - c_i to the
    gradients when given ({name: tensor}; the uncorrected gradients added to `gradient_sum`), take one Adam step."""
    optimizer.zero_grad()
    if mu:
        loss = loss + proximal_term(model.parameters(), anchors, mu)
    loss.backward()
    for name, param in model.named_parameters() if correction is not None else ():
        gradient_sum[name] += param.grad
        param.grad += correction[name]
    optimizer.step()


def train_clients_one_by_one(generator: Generator, discriminator: Discriminator, g_state: Mapping[str, Tensor],
                             d_state: Mapping[str, Tensor], images: Tensor, labels: Tensor, plan: RoundPlan,
                             local: LocalTraining, engine: EngineOptions = EngineOptions(), *,
                             g_opt: Mapping[str, Tensor] | None = None,
                             d_opt: Mapping[str, Tensor] | None = None,
                             corrections: Mapping[str, Tensor] | None = None) -> LocalResult:
    """train_clients' contract, one client after another (see train_clients for the arguments)."""
    num_clients, max_steps, batch = plan.batch_indices.shape
    device = images.device
    noise_gen = torch.Generator(device=device).manual_seed(plan.noise_seed)
    noise = [step_noise(plan, noise_gen, batch, generator.z_dim, device)
             for _ in range(max_steps)]  # (K, B, z_dim) a step, as the engine draws it
    inputs_gen = torch.Generator(device=device).manual_seed(derive_seed(plan.noise_seed, 1))
    inputs_noise = [step_input_noise(plan, inputs_gen, (batch, *images.shape[1:]), device) if local.noisy_inputs
                    else None for _ in range(max_steps)]  # (3, K, B, C, H, W) a step: instance noise
    g_layout, d_layout = FlatParams(generator, g_state), FlatParams(discriminator, d_state)
    results = []
    with cudnn_algorithms(engine.deterministic), bfloat16_compute(engine.bfloat16):
        for row in range(num_clients):
            client_g, client_d = client_model(generator, g_state, row), client_model(discriminator, d_state, row)
            g_anchors = [p.detach().clone() for p in client_g.parameters()]
            d_anchors = [p.detach().clone() for p in client_d.parameters()]
            g_adam = client_adam(client_g, local.lr_g, local.betas, g_opt, row, g_layout)
            d_adam = client_adam(client_d, local.lr_d, local.betas, d_opt, row, d_layout)
            g_correction = d_correction = g_sum = d_sum = None
            if corrections is not None:  # SCAFFOLD's c - c_i: this client's row, {name: tensor}
                g_correction = {k: v[row] for k, v in g_layout.split(corrections["g"]).items()}
                d_correction = {k: v[row] for k, v in d_layout.split(corrections["d"]).items()}
                g_sum = {k: torch.zeros_like(v) for k, v in g_correction.items()}
                d_sum = {k: torch.zeros_like(v) for k, v in d_correction.items()}
            d_total = g_total = torch.zeros((), device=device)
            for step in range(int(plan.steps[row])):
                idx = plan.batch_indices[row, step].to(device)  # (B,)
                d_loss, g_loss = gan_step(
                    generator=client_g, d_loss=functools.partial(local.d_loss, client_d),
                    g_loss=functools.partial(local.g_loss, client_d),
                    update_d=functools.partial(optimizer_step, d_adam, client_d, d_anchors, local.prox_mu,
                                               d_correction, d_sum),
                    update_g=functools.partial(optimizer_step, g_adam, client_g, g_anchors, local.prox_mu,
                                               g_correction, g_sum),
                    real=to_float_images(images[idx]), labels=labels[idx], noise=noise[step][row],
                    train_generator=local.train_generator,
                    input_noise=None if inputs_noise[step] is None else inputs_noise[step][:, row])
                d_total = d_total + d_loss
                g_total = g_total + (0.0 if g_loss is None else g_loss)
            steps = int(plan.steps[row])
            means = None if corrections is None else {  # SCAFFOLD: the mean uncorrected gradient, [P] a network
                which: torch.cat([total[n].flatten() for n in layout.names]) / steps
                for which, total, layout in (("g", g_sum, g_layout), ("d", d_sum, d_layout))}
            results.append((client_g.state_dict(), client_d.state_dict(), adam_row(g_adam, client_g),
                            adam_row(d_adam, client_d), d_total / steps, g_total / steps, means))

    def stacked(column: int, keys) -> dict[str, Tensor]:
        return {k: torch.stack([r[column][k] for r in results]) for k in keys}
    return LocalResult(stacked(0, g_state), stacked(1, d_state), stacked(2, ("step", *ADAM_MOMENTS)),
                       stacked(3, ("step", *ADAM_MOMENTS)), torch.stack([r[4] for r in results]),
                       torch.stack([r[5] for r in results]),
                       None if corrections is None else stacked(6, ("g", "d")))
