"""A SuperNode's part of a round: one client's local training and upload, computed as the simulation computes them.

The server tells a node which client trains, in which round, for how many steps and which row of the round's noise
it draws (its place among the round's clients); the node derives the client's data and batches itself, with the
project's partition and plan from the run's seed, and keeps the client's state between rounds (its Adam state,
FedBN's layers, error feedback's residual). Nothing here imports flwr: client_app.py carries it in messages.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import MutableMapping

import numpy as np
import torch

from fedgan.compression import compress_updates
from fedgan.config import FedConfig
from fedgan.engine.stacked import broadcast, slice_client, stack_clients
from fedgan.engine.trainer import train_clients
from fedgan.environment import pick_device
from fedgan.federation import client_data
from fedgan.gan import LocalTraining
from fedgan.models import build_models, norm_state_keys
from fedgan.rounds import plan_clients
from fedgan.uploads import UPDATE_ATTACKS, client_uploads

Tensor = torch.Tensor
State = dict[str, Tensor]
NETWORKS = ("g", "d")


def sends_updates(config: FedConfig) -> bool:
    """Whether a run's clients may send their parameters' update (compressed or poisoned, only the update means
    anything) rather than their trained values, which the server then uses exactly as the simulation does."""
    return config.compression != "none" or config.attack in UPDATE_ATTACKS


def client_sends_update(config: FedConfig, client: int, attackers: list[int]) -> bool:
    """Whether this client sends its update: every client with compression, an attacker with its poison. An honest
    client of an uncompressed run sends its trained values: start + update would differ from them in the last bits."""
    return config.compression != "none" or (config.attack in UPDATE_ATTACKS and client in attackers)


def uploads(config: FedConfig, which: str) -> bool:
    """Whether clients send network "g" or "d" back: not G under gan_layout="server_g" (trained at the server)."""
    return not (which == "g" and config.gan_layout == "server_g")


@dataclass(frozen=True)
class Task:
    """What the server asks of a node for one client in one round."""

    client: int  # the client (its partition of the data)
    round: int  # 1-based
    steps: int  # local steps (the plan's, after a deadline's cut)
    noise_row: int  # its row of the round's noise: its place among the round's clients
    noise_width: int  # the clients the round's noise is drawn for


@dataclass
class Upload:
    """What a node sends back for a client: per network, values and (sends_updates) the update; and the losses."""

    values: dict[str, State]  # {"g"/"d": {key: [...]}} trained values of the keys sent as values
    updates: dict[str, State]  # {"g"/"d": {key: [...]}} the parameters' update as sent (client_sends_update only)
    d_loss: float
    g_loss: float
    size: int  # images the client holds
    bytes_up: dict[str, int]  # {"g"/"d": bytes} what the simulation counts for this upload


class NodeClients:
    """A node's clients of one run: the data (loaded and partitioned once), and a round's training of one of them.

    `store` (the ClientApp's Context.state in a deployment) keeps each client's state between rounds under
    "<client>.<name>" keys: g_opt/d_opt (optimizer_state="keep"), g_local/d_local (FedBN), g_residual/d_residual.
    """

    def __init__(self, config: FedConfig, data: tuple[Tensor, Tensor] | None = None):
        if config.sync_mode != "sync" or config.sync_networks != "both":
            raise ValueError("a Flower run needs sync_mode='sync' and sync_networks='both' (got "
                             f"sync_mode={config.sync_mode!r}, sync_networks={config.sync_networks!r})")
        self.config, self.device = config, pick_device(config.device)
        self.images, _, self.parts, self.attackers, self.client_labels = client_data(config, data, self.device)
        generator, discriminator = build_models(config)  # structure only: the server sends the states
        self.models = {"g": generator.to(self.device), "d": discriminator.to(self.device)}
        self.local_keys = {which: norm_state_keys(model) if config.bn_policy == "local" else set()
                           for which, model in self.models.items()}
        self.param_names = {which: {n for n, _ in model.named_parameters()} for which, model in self.models.items()}
        self.local_training = LocalTraining.of(config)

    def train(self, task: Task, global_states: dict[str, State], store: MutableMapping[str, State]) -> Upload:
        """Client task.client's local training from the global states, and what it sends."""
        config, client, device = self.config, task.client, self.device
        if not 0 <= client < config.num_clients:
            raise ValueError(f"client {client} is not one of the run's {config.num_clients} clients")
        starts = {}
        for which in NETWORKS:  # the global state, with the client's own local layers where it has them
            own = store.get(f"{client}.{which}_local", {})
            starts[which] = {k: (own[k] if k in own else v).to(device) for k, v in global_states[which].items()}
        plan = plan_clients(config, self.parts, [client], task.round, [task.steps])
        plan = dataclasses.replace(plan, noise_rows=np.array([task.noise_row]), noise_width=task.noise_width)
        keep = config.optimizer_state == "keep"
        optimizers = {which: stack_clients([store[f"{client}.{which}_opt"]], device)
                      if keep and f"{client}.{which}_opt" in store else None for which in NETWORKS}
        local = train_clients(self.models["g"], self.models["d"], broadcast(starts["g"], 1),
                              broadcast(starts["d"], 1), self.images, self.client_labels, plan, self.local_training,
                              config.engine, g_opt=optimizers["g"], d_opt=optimizers["d"])
        finals = {"g": local.g_state, "d": local.d_state}  # {key: [1, ...]} each
        if keep:
            store[f"{client}.g_opt"] = slice_client(local.g_opt, 0)
            store[f"{client}.d_opt"] = slice_client(local.d_opt, 0)
        values, updates, nbytes = {}, {}, {}
        for which in NETWORKS:
            final, local_keys = finals[which], self.local_keys[which]
            if local_keys:
                store[f"{client}.{which}_local"] = slice_client({k: final[k] for k in local_keys}, 0)
            if not uploads(config, which):  # only its local layers, which the server's sampling copy averages
                values[which] = slice_client({k: final[k] for k in local_keys}, 0)
                continue
            floats = [k for k in final if k not in local_keys and k in self.param_names[which]]
            start, residual = broadcast(starts[which], 1), store.get(f"{client}.{which}_residual")
            sent, kept, param_bytes = client_uploads({k: final[k] - start[k] for k in floats}, [client], config,
                                                     task.round, self.attackers, [residual])
            if kept is not None:
                store[f"{client}.{which}_residual"] = kept[0]
            _, buffer_bytes = compress_updates({k: final[k] for k in final if k not in floats and k not in local_keys},
                                               "none")
            nbytes[which] = param_bytes + buffer_bytes
            sends = client_sends_update(config, client, self.attackers)
            values[which] = slice_client({k: final[k] for k in final if not (sends and k in floats)}, 0)
            updates[which] = slice_client(sent, 0) if sends else {}
        return Upload(values, updates, float(local.d_loss[0]), float(local.g_loss[0]), int(plan.sizes[0]), nbytes)

