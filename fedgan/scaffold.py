"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates that correct each client's local gradients for drift.

The server keeps a control variate c, each client its own c_i (a [P] vector a network, in FlatParams' order: the
module's named_parameters). A client's local step uses the gradient g + (c - c_i): its own direction replaced, in
expectation, by the federation's. After its K local steps from the global x to its y_i, the paper's option II sets
c_i+ = c_i - c + (x - y_i) / (K lr), which with SGD is the mean of the client's K uncorrected gradients (each step
moved y by lr (g_k + c - c_i), so the corrections cancel). That mean is what a client computes here: the local
optimizer is Adam, whose steps are of order lr a coordinate whatever the gradient, so option II's formula would
measure Adam's steps (order 1 a coordinate, divided by lr) and its correction would swamp the gradients (measured:
the generator stayed noise on every split of notebook 3's section 8); the mean gradient keeps c_i on the gradients'
scale. The correction then enters Adam with the gradient (its moments see it, its step sizes rescale it): the
paper's guarantees are for SGD.

Each client sends its update and dc_i = c_i+ - c_i. The server averages the updates as FedAvg does (weighted by
data, the global learning rate 1) and sets c += (1/N) sum_{i in S} dc_i over the round's clients S, N all the
clients. From c = c_i = 0 that keeps c the mean of all clients' c_i, and it is computed as that mean
(server_control), so that with one client c - c_i is exactly 0: a client's new c_i counts once the server has used
its update (a client left out of a round keeps its old one).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

Tensor = torch.Tensor


def server_control(controls: Tensor, num_clients: int) -> Tensor:
    """The server's control variate, the mean of all N clients' c_i: [S, P], the clients that have one (the others'
    are still 0) -> [P]; what c += (1/N) sum dc_i keeps it at, round by round."""
    return controls.sum(0) / num_clients


class ControlVariates:
    """The server's c for G and D, on the device; each client's c_i lives in its store ("g_control", "d_control"),
    zero until it first trains, as the paper initialises them."""

    def __init__(self, models: Mapping[str, nn.Module], num_clients: int):
        """`models`: {"g": G, "d": D}, the global networks."""
        self.num_clients = num_clients
        self.server = {which: torch.zeros(sum(p.numel() for p in model.parameters()),
                                          device=next(model.parameters()).device) for which, model in models.items()}

    def client_controls(self, which: str, client_ids: Sequence[int], store: Mapping[int, Mapping[str, Any]]) -> Tensor:
        """The clients' c_i for one network [K, P]."""
        zero = torch.zeros_like(self.server[which])
        return torch.stack([store.get(int(c), {}).get(f"{which}_control", zero).to(zero.device) for c in client_ids])

    def corrections(self, client_ids: Sequence[int], store: Mapping[int, Mapping[str, Any]]) -> dict[str, Tensor]:
        """What each client adds to its gradients this round: c - c_i, {network: [K, P]}."""
        return {which: server - self.client_controls(which, client_ids, store) for which, server in self.server.items()}

    def aggregate(self, client_ids: Sequence[int], controls: Mapping[str, Tensor],
                  store: dict[int, dict[str, Any]]) -> None:
        """The server's step with the clients whose updates it used: their new c_i [S, P] (the mean of their local
        gradients, LocalResult.mean_gradients) take effect, and c is the mean of all clients' c_i."""
        for which, rows in controls.items():
            for client, row in zip(client_ids, rows):
                store.setdefault(int(client), {})[f"{which}_control"] = row.detach().cpu().clone()
            seen = [c for c in range(self.num_clients) if f"{which}_control" in store.get(c, {})]
            self.server[which] = server_control(self.client_controls(which, seen, store), self.num_clients)

    def bytes_per_client(self) -> int:
        """A control variate of each network, float32: what travels each way beside the models."""
        return sum(c.numel() * c.element_size() for c in self.server.values())

    def state_dict(self) -> dict[str, Tensor]:
        return {which: c.detach().cpu().clone() for which, c in self.server.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.server = {which: state[which].to(c.device, c.dtype) for which, c in self.server.items()}
