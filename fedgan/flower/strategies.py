"""fedgan's server rules as Flower strategies (Message API), for a Flower deployment of one's own.

FedGanStrategy is Flower's FedAvg with the aggregation replaced: the replies' ArrayRecords go through one of
fedgan.strategies' rules (FedAvgM, FedAdam, FedYogi, the damped average, median, trimmed mean, Krum, an update
threshold), after DP-FedAvg's clip and noise if asked. DPFedAvgGAN adds DP-FedAvg-GAN's server step: the clients
federate D only, and the server trains G against the aggregated D. Sampling, configuration and metrics are Flower's.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedgan.gan import generator_steps
from fedgan.privacy import noisy_state, privatize_updates
from fedgan.strategies import Strategy, bound_copy

Tensor = torch.Tensor


class FedGanStrategy(FedAvg):
    """Flower's FedAvg, aggregating with `rule` (a fedgan.strategies.Strategy: make_strategy(config), or
    ServerOptimizer("fedadam", server_lr=1e-2), RobustRule(median), ...), its state kept from round to round.

    With `dp_clip`, DP-FedAvg (McMahan et al., ICLR 2018) first: each client's update (its arrays minus the round's
    global ones) clipped to that L2 norm, the clipped updates summed, Gaussian noise of std dp_noise_multiplier x
    dp_clip added, divided by `expected_clients`; the rule then gets that one noisy mean as a single client.
    `buffer_keys`: the arrays that are the model's buffers ({name for name, _ in model.named_buffers()}: BatchNorm's
    running statistics, spectral norm's vectors), plain-averaged as in the simulation, not stepped by a server
    optimizer nor counted in a threshold's norms (the rule is then a copy told them, as the simulation's is).
    The keyword arguments left over are FedAvg's (fraction_train, min_train_nodes, weighted_by_key, ...).
    """

    def __init__(self, rule: Strategy, *, buffer_keys: Iterable[str] = (), dp_clip: float | None = None,
                 dp_noise_multiplier: float = 0.0, expected_clients: int | None = None, seed: int = 0,
                 **fedavg: Any):
        super().__init__(**fedavg)
        if not isinstance(rule, Strategy):
            raise TypeError(f"rule must be a fedgan.strategies.Strategy, got {type(rule).__name__}")
        rule = bound_copy(rule, set(buffer_keys)) if buffer_keys else rule
        if dp_clip is not None and expected_clients is None:
            raise ValueError("dp_clip needs expected_clients: DP-FedAvg divides the noisy sum by the clients "
                             "expected a round, not by those that replied (which would reveal the count)")
        self.rule, self.dp_clip, self.dp_noise_multiplier = rule, dp_clip, dp_noise_multiplier
        self.expected_clients, self.noise = expected_clients, torch.Generator().manual_seed(seed)
        self.global_state: dict[str, Tensor] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_state = dict(arrays.to_torch_state_dict())  # what the round's updates are measured from
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        contents = [reply.content for reply in valid]
        states = [dict(content[self.arrayrecord_key].to_torch_state_dict()) for content in contents]
        weights = np.array([float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents])
        new_state = self.aggregate_states(states, weights, [reply.metadata.src_node_id for reply in valid])
        return ArrayRecord(new_state), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def aggregate_states(self, states: list[dict[str, Tensor]], weights: np.ndarray,
                         node_ids: list[int]) -> dict[str, Tensor]:
        """The new global state from the clients' states (with DP first, if asked)."""
        global_state = {k: v for k, v in self.global_state.items() if k in states[0]} or dict(states[0])
        stacked = {k: torch.stack([s[k] for s in states]) for k in states[0]}  # (K, ...) each
        info = {"client_ids": np.array(node_ids), "steps": np.ones(len(states)), "staleness": np.zeros(len(states))}
        if self.dp_clip is not None:
            floats = [k for k, v in stacked.items() if v.dtype.is_floating_point]
            (noisy,), _ = privatize_updates([{k: stacked[k] - global_state[k] for k in floats}], self.dp_clip,
                                            self.dp_noise_multiplier, self.expected_clients, self.noise)
            stacked, weights = noisy_state(global_state, noisy, stacked), np.ones(1)
        return self.rule.aggregate(global_state, stacked, weights, info)


class DPFedAvgGAN(FedGanStrategy):
    """DP-FedAvg-GAN (Augenstein et al., ICLR 2020): the clients train and send D only (their arrays: D's state);
    the server aggregates it (with DP, as FedGanStrategy; D's buffers are its buffer_keys), then trains `generator`
    against the aggregated D for `generator_steps` steps. The global ArrayRecord holds both, G's keys prefixed
    "generator." and D's "discriminator.", so that the clients can draw their fakes from the current G.
    """

    def __init__(self, rule: Strategy, generator: nn.Module, discriminator: nn.Module, *, num_classes: int,
                 lr: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999), generator_steps: int = 1,
                 batch_size: int = 64, gan_loss: str = "bce", seed: int = 0, **options: Any):
        options.setdefault("buffer_keys", {name for name, _ in discriminator.named_buffers()})
        super().__init__(rule, seed=seed, **options)
        self.generator, self.discriminator = generator, copy.deepcopy(discriminator)
        self.optimizer = torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)
        self.steps, self.batch_size = generator_steps, batch_size
        self.num_classes, self.gan_loss = num_classes, gan_loss
        self.draws = torch.Generator(device=next(generator.parameters()).device).manual_seed(seed)
        self.last_generator_loss: float | None = None

    def global_arrays(self) -> ArrayRecord:
        """G and D as one ArrayRecord, prefixed: what strategy.start(initial_arrays=...) starts from."""
        return ArrayRecord({**{f"generator.{k}": v for k, v in self.generator.state_dict().items()},
                            **{f"discriminator.{k}": v for k, v in self.discriminator.state_dict().items()}})

    def configure_train(self, server_round, arrays, config, grid):
        messages = super().configure_train(server_round, arrays, config, grid)
        self.global_state = {k[len("discriminator."):]: v for k, v in self.global_state.items()
                             if k.startswith("discriminator.")}  # the clients send D back, unprefixed
        return messages

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return None, metrics
        self.discriminator.load_state_dict(arrays.to_torch_state_dict())  # the global D; G trains against a copy of it
        critic = copy.deepcopy(self.discriminator).train().requires_grad_(False)
        self.last_generator_loss = generator_steps(self.generator, critic, self.optimizer, steps=self.steps,
                                                   batch_size=self.batch_size, num_classes=self.num_classes,
                                                   draws=self.draws, loss=self.gan_loss)
        return self.global_arrays(), metrics
