"""The server's side of a federation whose clients train elsewhere (on Flower SuperNodes): the simulation's round
with the local training replaced by tasks sent out and uploads received.

Selection, dropout and deadlines (plan_round), the exclusion of clients whose update is not finite, DP-FedAvg's clip
and noise, the strategy, DP-FedAvg-GAN's server step, evaluation, history and checkpoints are Federation's own code;
only _train (send the tasks, rebuild the round's stacked results from the uploads) and the uploads' bytes differ.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import numpy as np
import torch

from fedgan.config import FedConfig
from fedgan.engine.stacked import broadcast, stack_clients
from fedgan.federation import Federation
from fedgan.flower.node import NETWORKS, State, Task, Upload, sends_updates
from fedgan.rounds import RoundPlan
from fedgan.uploads import uses_error_feedback

Tensor = torch.Tensor
# sends a round's tasks with the global states; returns each client's Upload, or why none came back (a string)
Send = Callable[[list[Task], dict[str, State]], Mapping[int, "Upload | str"]]


def check_remote_config(config: FedConfig) -> None:
    """What a federation of remote clients does not do (yet): a clear error before anything starts."""
    if config.sync_mode != "sync":
        raise ValueError(f"sync_mode={config.sync_mode!r}: a Flower run has synchronous rounds only ('sync')")
    if config.sync_networks != "both":
        raise ValueError(f"sync_networks={config.sync_networks!r}: a Flower run synchronises both networks ('both')")
    if config.gan_layout not in ("fedavg", "server_g"):
        raise ValueError(f"gan_layout={config.gan_layout!r}: a Flower run averages parameters ('fedavg', 'server_g'); "
                         "the layouts that exchange images and gradients every step run in the simulation")
    if config.strategy == "scaffold":
        raise ValueError("strategy='scaffold': its control variates are not sent in Flower messages yet; "
                         "it runs in the simulation")


class RemoteFederation(Federation):
    """A Federation whose clients' local training happens where `send` takes it. Client state kept between rounds
    (Adam, FedBN's layers, error feedback's residuals) lives with the clients, not in this object.

    Each record also has what travelled: "wire_bytes_up"/"wire_bytes_down" (as `send` measured them: the tensors'
    bytes in their messages) beside the simulation's count ("bytes_up"/"bytes_down").
    """

    def __init__(self, config: FedConfig, send: Send, **kwargs: Any):
        check_remote_config(config)
        if kwargs.get("resume"):
            self.check_resumable(config)
        self.send = send
        self.wire: dict[str, int] = {}
        super().__init__(config, **kwargs)

    @staticmethod
    def check_resumable(config: FedConfig) -> None:
        """A clear error for resuming a run whose clients keep state between rounds: that state is on the nodes."""
        if config.optimizer_state == "keep" or config.bn_policy == "local" or uses_error_feedback(config):
            raise ValueError("resuming a run whose clients keep state between rounds (optimizer_state='keep', "
                             "bn_policy='local' or error feedback): that state is on the nodes, not in the server's "
                             "checkpoints, so the run would not continue as it began; start it again instead")

    def _train(self, plan: RoundPlan) -> dict[str, Any]:
        """Send the round's tasks; the round's stacked results rebuilt from the uploads (those lost: "failed")."""
        width = len(plan.client_ids)
        tasks = [Task(int(client), plan.round, int(steps), row, width)
                 for row, (client, steps) in enumerate(zip(plan.client_ids, plan.steps))]
        global_states = {"g": self.generator.state_dict(), "d": self.discriminator.state_dict()}
        started = time.perf_counter()
        replies = self.send(tasks, {w: {k: v.cpu() for k, v in s.items()} for w, s in global_states.items()})
        failed = {t.client: reply for t in tasks if isinstance(reply := replies.get(t.client, "no reply"), str)}
        if self.log and failed:
            print(f"round {plan.round}: left out clients {sorted(failed)} ({next(iter(failed.values()))}); "
                  f"{width - len(failed)} of {width} replied in {time.perf_counter() - started:.1f} s")
        done = [(row, t) for row, t in enumerate(tasks) if t.client not in failed]
        ids = np.array([t.client for _, t in done], dtype=np.int64)
        rows = [row for row, _ in done]
        results: dict[str, Any] = {"client_ids": ids, "staleness": np.zeros(len(done)), "sizes": plan.sizes[rows],
                                   "steps": plan.steps[rows], **({"failed": failed} if failed else {})}
        if not done:
            return results
        received: list[Upload] = [replies[t.client] for _, t in done]
        start = {w: broadcast(global_states[w], len(done)) for w in NETWORKS}
        final = {w: {k: v.clone() for k, v in start[w].items()} for w in NETWORKS}
        for w in NETWORKS:
            for row, upload in enumerate(received):
                for k, value in upload.values[w].items():
                    final[w][k][row] = value.to(self.device)
                for k, value in upload.updates.get(w, {}).items():  # only the server's copy: what counts is sent
                    final[w][k][row] = start[w][k][row] + value.to(self.device)
        for client, upload in zip(ids, received):
            self.client_store.setdefault(int(client), {})["last_loss"] = upload.d_loss
        self.wire = dict(getattr(self.send, "wire", None) or  # as `send` measured it, else the tensors' bytes
                         {"up": sum(tensor_bytes(u.values) + tensor_bytes(u.updates) for u in received),
                          "down": tensor_bytes(global_states) * width})
        results.update(start=start, final=final, uploads=received, d_loss=[u.d_loss for u in received],
                       g_loss=[u.g_loss for u in received])
        return results

    def _client_updates(self, which: str, updates: Mapping[str, Any], round_index: int) -> tuple[dict, int]:
        """What the clients sent for a network, as they computed it (compressed, poisoned, with their residuals)."""
        if not sends_updates(self.config):  # they sent their trained values: the update computes as in simulation
            return super()._client_updates(which, updates, round_index)
        received: list[Upload] = updates["uploads"]
        start, final, params = updates["start"][which], updates["final"][which], self._param_names[which]
        # parameters, then buffers, as the simulation sends them: DP-FedAvg draws its noise key by key in this order
        sent_keys = sorted((k for k in final if k not in self._local_keys[which]), key=lambda k: k not in params)

        def sent(row: int, upload: Upload) -> dict[str, Tensor]:
            """The update the client sent; from a client that sent its values (an honest one of an uncompressed
            run), the update the simulation computes from them, and its buffers' values."""
            return {k: upload.updates[which][k] if k in upload.updates[which] else
                    final[k][row] - start[k][row] if k in params else final[k][row] for k in sent_keys}
        trees = [sent(row, upload) for row, upload in enumerate(received)]
        return stack_clients(trees, self.device), received[0].bytes_up[which]  # the same for every client

    def _aggregate(self, updates: Mapping[str, Any], round_index: int) -> dict[str, Any]:
        log = super()._aggregate(updates, round_index)
        log.update(wire_bytes_up=self.wire.get("up", 0), wire_bytes_down=self.wire.get("down", 0))
        return log


def tensor_bytes(trees: Mapping[str, State]) -> int:
    """The bytes of the tensors in {network: {key: tensor}}."""
    return sum(v.numel() * v.element_size() for tree in trees.values() for v in tree.values())

