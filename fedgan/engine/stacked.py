"""K clients' states stacked on a leading client dim: flat parameters, the stacked Adam, the loop over clients.

A stacked state is {name: [K, ...]}, one row a client. A network's Adam state, here and wherever it is kept
(LocalResult, a client's store between rounds, checkpoints), has one format: {"step": [K], "exp_avg": [K, P],
"exp_avg_sq": [K, P]}, the moments' columns in FlatParams' order (the module's named_parameters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from fedgan.aggregation import unstack_states

Tensor = torch.Tensor
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def fresh_adam_state(clients: int, size: int, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Adam's state before its first step, for `clients` clients of `size` parameters each."""
    return {"step": torch.zeros(clients, device=device),
            **{m: torch.zeros(clients, size, device=device) for m in ADAM_MOMENTS}}


@dataclass
class LocalResult:
    """What a round of local training gives back, every tensor stacked on the client dim."""

    g_state: dict[str, Tensor]  # {key: [K, ...]} the clients' generators after local training
    d_state: dict[str, Tensor]  # {key: [K, ...]} the clients' discriminators
    g_opt: dict[str, Tensor]  # the generators' Adam state: {"step": [K], "exp_avg": [K, P], "exp_avg_sq": [K, P]}
    d_opt: dict[str, Tensor]  # the discriminators'
    d_loss: Tensor  # [K] mean discriminator loss over each client's steps
    g_loss: Tensor  # [K] mean generator loss (0 where the clients do not train G)
    mean_gradients: dict[str, Tensor] | None = None  # SCAFFOLD: {"g", "d": [K, P]} each client's mean local gradient


class StackedAdam:
    """Adam over K clients' flat parameters [K, P], each client with its own step count.

    torch's fused Adam over the K rows: one call reads each tensor once and updates every client still
    training (one multi-tensor kernel; a few for large K on a GPU), where the same update written with tensor
    ops takes a dozen full passes over [K, P]. Same algorithm as torch.optim.Adam, which the reference loop
    uses. (Fused Adam runs on a CPU from torch 2.4.)
    """

    def __init__(self, flat: Tensor, state: Mapping[str, Tensor], *, lr: float, betas: tuple[float, float]):
        """`state`: {"step": [K], "exp_avg": [K, P], "exp_avg_sq": [K, P]}, updated in place by step()."""
        self.rows = list(flat.unbind(0))  # (P,) views: the optimizer writes the clients' parameters in place
        self.optimizer = torch.optim.Adam(self.rows, lr=lr, betas=betas, fused=True)
        self.on_cuda = flat.device.type == "cuda"
        for row, step, *moments in zip(self.rows, *(state[k].unbind(0) for k in ("step", *ADAM_MOMENTS))):
            self.optimizer.state[row] = {"step": step, **dict(zip(ADAM_MOMENTS, moments))}  # views

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


def unbind_clients(tree: Any) -> list[Any]:
    """A tensor or {name: tensor} stacked on dim 0 -> a list of per-client views (in-place writes go through)."""
    return list(tree.unbind(0)) if isinstance(tree, Tensor) else unstack_states(tree)


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
        per_client = [unbind_clients(a) for a in args]
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


def map_tensors(tree: Any, fn) -> Any:
    """`fn` applied to every tensor in nested dicts, lists and tuples; anything else is kept."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_tensors(t, fn) for t in tree)
    if isinstance(tree, dict):
        return {k: map_tensors(v, fn) for k, v in tree.items()}
    return tree


def broadcast(state: Mapping[str, Tensor], count: int) -> dict[str, Tensor]:
    """The global state copied for `count` clients: {key: [count, ...]}."""
    return {k: v.detach().unsqueeze(0).expand(count, *v.shape).clone() for k, v in state.items()}


def slice_client(tree: Any, row: int) -> Any:
    """Client `row`'s part of a stacked state or optimizer state, copied to the CPU."""
    if isinstance(tree, Tensor):
        return tree[row].detach().cpu().clone()
    return {k: slice_client(v, row) for k, v in tree.items()}


def stack_clients(trees: Sequence[Any], device: torch.device) -> Any:
    """Per-client states or optimizer states (as slice_client gives them) stacked on `device`: the inverse."""
    if isinstance(trees[0], Tensor):
        return torch.stack([t.to(device) for t in trees])
    return {k: stack_clients([t[k] for t in trees], device) for k in trees[0]}
