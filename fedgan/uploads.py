"""What a client sends back after local training: its update, poisoned if it attacks, with error feedback, compressed.

Written once for the simulation (Federation, all of a round's clients stacked) and for a Flower SuperNode (one
client, its residual kept on the node), so both send the same thing.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from fedgan.compression import compress_updates
from fedgan.config import FedConfig
from fedgan.rounds import RNG_ATTACK, derive_seed, poison_update

Tensor = torch.Tensor
Residual = Mapping[str, Tensor]  # {key: [...]} what compression left out of a client's updates so far
UPDATE_ATTACKS = ("sign_flip", "noise", "nan")  # attacks on the update a client sends (label_flip poisons data)


def uses_error_feedback(config: FedConfig) -> bool:
    """Whether the clients carry what compression leaves out into their next update (Seide et al. 2014)."""
    return config.compression != "none" and config.error_feedback


def client_uploads(update: Mapping[str, Tensor], client_ids: Sequence[int], config: FedConfig, round_index: int,
                   attackers: Sequence[int] = (), residuals: Sequence[Residual | None] | None = None
                   ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]] | None, int]:
    """What the clients send for their parameter updates {key: [K, ...]} (state - start): (the same, sent; each
    client's new residual, on the CPU, or None without error feedback; the bytes that takes a client).

    An attacking client (config.attack sign_flip, noise or nan) sends its poisoned update; with error feedback
    each adds its residual (`residuals`, one per client, None for one it has not got yet) before compressing.
    """
    update = {k: v.clone() for k, v in update.items()}
    if config.attack in UPDATE_ATTACKS:
        for row, client in enumerate(client_ids):
            if client in attackers:
                noise = torch.Generator(device=next(iter(update.values())).device).manual_seed(
                    derive_seed(config.seed, round_index, int(client), RNG_ATTACK))
                for k in update:
                    update[k][row] = poison_update(update[k][row], config.attack, config.attack_scale, noise)
    feedback = uses_error_feedback(config)
    for row, carried in enumerate(residuals if feedback and residuals is not None else ()):
        for k in update if carried is not None else ():
            update[k][row] += carried[k].to(update[k].device)
    sent, nbytes = compress_updates(update, config.compression, config.topk_fraction)
    if not feedback:
        return sent, None, nbytes
    return sent, [{k: (update[k][row] - sent[k][row]).cpu() for k in update} for row in range(len(client_ids))], nbytes
