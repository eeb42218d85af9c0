"""Server rules as classes: each holds its state between rounds and calls aggregation.py's functions."""
from __future__ import annotations

import copy
import math
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from fedgan.aggregation import fedavg_stacked, krum, median, scale_updates, trimmed_mean, unstack_states, update_norms
from fedgan.checks import is_number, positive_number, require
from fedgan.config import THRESHOLD_ACTIONS, THRESHOLD_RULES, FedConfig

Tensor = torch.Tensor
StateDict = dict[str, Tensor]


class Strategy:
    """A server rule: the new global state from the global state and the selected clients' stacked states.

    `aggregate(global_state, client_states, weights, info)` gets {key: [...]}, {key: [K, ...]}, [K] data
    sizes, and `info` (client_ids, steps, staleness where the run is asynchronous) and returns
    {key: [...]}. The math lives in pure functions; a strategy holds server state between rounds
    (`state_dict`/`load_state_dict`, saved in checkpoints) and can put numbers for the round's log in
    `last_log`. Keys in `buffer_keys` (BatchNorm running statistics, counters) are plain-averaged by the
    built-in optimizers: an optimizer step on running statistics means nothing. A strategy is the server's
    part only: what clients do (FedProx's term, their optimizers) is FedConfig's and goes to local training.
    """

    def __init__(self, *, buffer_keys: Iterable[str] = ()):
        self.buffer_keys = set(buffer_keys)
        self.last_log: dict[str, Any] = {}

    def aggregate(self, global_state: Mapping[str, Tensor], client_states: Mapping[str, Tensor],
                  weights: Any, info: Mapping[str, Any] | None = None) -> StateDict:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class FedAvg(Strategy):
    """FedAvg (McMahan et al., 2017): the sample-weighted average becomes the global state. Also FedProx's server
    (Li et al., MLSys 2020), whose clients add FedConfig.prox_mu's proximal term to their losses, and SCAFFOLD's
    (scaffold.py), whose clients correct their gradients with control variates the Federation keeps."""

    def aggregate(self, global_state, client_states, weights, info=None):
        return fedavg_stacked(client_states, weights)


class RobustRule(Strategy):
    """One of the pure robust rules (median, trimmed_mean, krum) with its parameters, as a strategy."""

    def __init__(self, rule, *, buffer_keys: Iterable[str] = (), **params: Any):
        super().__init__(buffer_keys=buffer_keys)
        self.rule, self.params = rule, params

    def aggregate(self, global_state, client_states, weights, info=None):
        states = unstack_states(client_states)
        return self.rule(states, torch.as_tensor(weights, dtype=torch.float64).tolist(), **self.params)


SERVER_OPTIMIZERS = ("fedavgm", "fedadagrad", "fedadam", "fedyogi")


class ServerOptimizer(Strategy):
    """The averaged client update as a pseudo-gradient for a server optimizer.

    fedavgm: server momentum (Hsu et al., 2019), v = momentum v + delta, x += server_lr v; with
    momentum 0 it is the damped update x = (1 - server_lr) x + server_lr average.
    fedadagrad / fedadam / fedyogi: Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2:
    m = b1 m + (1 - b1) delta, v per rule, x += server_lr m / (sqrt(v) + tau), without bias correction.
    delta = weighted average of the clients' states - global state.
    """

    def __init__(self, kind: str, *, server_lr: float, momentum: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3, buffer_keys: Iterable[str] = ()):
        super().__init__(buffer_keys=buffer_keys)
        require(kind in SERVER_OPTIMIZERS, "kind", kind, f"one of {list(SERVER_OPTIMIZERS)}")
        require(positive_number(server_lr), "server_lr", server_lr, "a number > 0")
        require(is_number(momentum) and 0 <= momentum < 1, "momentum", momentum, "a number in [0, 1)")
        require(is_number(beta2) and 0 <= beta2 < 1, "beta2", beta2, "a number in [0, 1)")
        require(positive_number(tau), "tau", tau, "a number > 0")
        self.kind, self.server_lr, self.momentum, self.beta2, self.tau = kind, server_lr, momentum, beta2, tau
        self.first: dict[str, Tensor] = {}  # momentum / first moment per key
        self.second: dict[str, Tensor] = {}  # second moment per key (adaptive rules)

    def aggregate(self, global_state, client_states, weights, info=None):
        average = fedavg_stacked(client_states, weights)
        result = dict(average)
        for key, mean in average.items():
            if key in self.buffer_keys or not mean.dtype.is_floating_point:
                continue
            x = global_state[key].to(mean.device, mean.dtype)
            delta = mean - x
            m = self.first.get(key, torch.zeros_like(delta))
            if self.kind == "fedavgm":
                m = self.momentum * m + delta
                step = m
            else:
                m = self.momentum * m + (1 - self.momentum) * delta
                v = self.second.get(key, torch.zeros_like(delta))
                square = delta.square()
                if self.kind == "fedadagrad":
                    v = v + square
                elif self.kind == "fedadam":
                    v = self.beta2 * v + (1 - self.beta2) * square
                else:  # fedyogi
                    v = v - (1 - self.beta2) * square * torch.sign(v - square)
                self.second[key] = v
                step = m / (v.sqrt() + self.tau)
            self.first[key] = m
            result[key] = x + self.server_lr * step
        return result

    def state_dict(self):
        return {"first": dict(self.first), "second": dict(self.second)}

    def load_state_dict(self, state):
        self.first, self.second = dict(state["first"]), dict(state["second"])


class Thresholded(Strategy):
    """Another strategy behind a norm threshold on client updates: too-large updates are clipped or dropped.

    The threshold is `threshold` itself ("absolute") or `threshold` x the round's median update norm
    ("median"); norms are over the parameters (not the buffers). `last_log` says how many were over.
    If every update is dropped, the global state is kept.
    """

    def __init__(self, inner: Strategy, threshold: float, *, rule: str = "median", action: str = "clip"):
        super().__init__(buffer_keys=inner.buffer_keys)
        require(positive_number(threshold), "threshold", threshold, "a number > 0")
        require(rule in THRESHOLD_RULES, "rule", rule, f"one of {list(THRESHOLD_RULES)}")
        require(action in THRESHOLD_ACTIONS, "action", action, f"one of {list(THRESHOLD_ACTIONS)}")
        self.inner, self.threshold, self.rule, self.action = inner, threshold, rule, action

    def aggregate(self, global_state, client_states, weights, info=None):
        keys = [k for k, v in client_states.items() if v.dtype.is_floating_point and k not in self.buffer_keys]
        norms = update_norms(global_state, client_states, keys)  # (K,)
        finite = norms.isfinite()
        median = float(norms[finite].quantile(0.5)) if finite.any() else math.nan  # of the finite updates
        limit = self.threshold * (median if self.rule == "median" else 1.0)
        over = ~(norms <= limit)  # a NaN/Inf update is over any limit
        self.last_log = {"threshold": limit, self.action + "ped": int(over.sum()), "norm_max": float(norms.max())}
        keep = finite if self.action == "clip" else ~over  # a NaN/Inf update cannot be clipped: it is dropped
        if not keep.any():
            result = {k: v.clone() for k, v in global_state.items()}
        else:
            if not keep.all():
                rows = keep.cpu().numpy()
                info = {name: np.asarray(value)[rows] if isinstance(value, (list, tuple, np.ndarray))
                        and len(value) == len(rows) else value for name, value in (info or {}).items()}
                client_states = {k: v[keep.to(v.device)] for k, v in client_states.items()}
                weights = np.asarray(weights, dtype=np.float64)[rows]
            if self.action == "clip":
                scale = (limit / norms[keep].clamp(min=1e-30)).clamp(max=1.0)
                client_states = scale_updates(global_state, client_states, scale, keys)
            result = self.inner.aggregate(global_state, client_states, weights, info)
        self.last_log.update(self.inner.last_log)
        return result

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def bound_copy(strategy: Strategy, buffer_keys: set[str]) -> Strategy:
    """A copy of a user's strategy for one network, told that network's buffer keys (and its inner one's)."""
    copied = copy.deepcopy(strategy)
    for rule in (copied, getattr(copied, "inner", None)):
        if rule is not None and not rule.buffer_keys:
            rule.buffer_keys = set(buffer_keys)
    return copied


def make_strategy(config: FedConfig, buffer_keys: Iterable[str] = ()) -> Strategy:
    """The server rule that config.strategy names, with the config's parameters (and threshold, if set)."""
    name = config.strategy
    if name in ("fedavg", "fedprox", "scaffold"):  # FedProx's and SCAFFOLD's clients differ, not their server
        strategy: Strategy = FedAvg(buffer_keys=buffer_keys)
    elif name == "damped":
        strategy = ServerOptimizer("fedavgm", server_lr=0.5 if config.server_lr is None else config.server_lr,
                                   momentum=0.0, buffer_keys=buffer_keys)
    elif name in SERVER_OPTIMIZERS:
        server_lr = config.server_lr if config.server_lr is not None else (1.0 if name == "fedavgm" else 1e-2)
        strategy = ServerOptimizer(name, server_lr=server_lr, momentum=config.server_momentum,
                                   beta2=config.server_beta2, tau=config.server_tau, buffer_keys=buffer_keys)
    elif name == "median":
        strategy = RobustRule(median, buffer_keys=buffer_keys)
    elif name == "trimmed_mean":
        strategy = RobustRule(trimmed_mean, buffer_keys=buffer_keys, beta=config.trim_beta)
    else:
        strategy = RobustRule(krum, buffer_keys=buffer_keys, f=config.krum_f, m=config.krum_m)
    if config.update_threshold is not None:
        strategy = Thresholded(strategy, config.update_threshold, rule=config.threshold_rule,
                               action=config.threshold_action)
    return strategy


def checked_state(result: Any, global_state: Mapping[str, Tensor], strategy: Strategy, which: str) -> dict:
    """A strategy's new global state, refused with the strategy's name unless it has the global state's keys and
    shapes (a user's rule can return anything)."""
    network = "generator" if which == "g" else "discriminator"
    name = f"strategy {type(strategy).__name__} for the {network}"
    if not isinstance(result, Mapping):
        raise ValueError(f"{name} returned {type(result).__name__}, not a state dict {{name: tensor}}")
    missing, extra = sorted(set(global_state) - set(result)), sorted(set(result) - set(global_state))
    if missing:
        raise ValueError(f"{name} returned a state that lacks {missing[:5]}")
    if extra:
        raise ValueError(f"{name} returned a state that has keys {extra[:5]} the {network} does not")
    for key, value in global_state.items():
        got = result[key]
        if not isinstance(got, Tensor) or got.shape != value.shape:
            shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
            raise ValueError(f"{name} returned {key} of shape {shape}; the {network}'s is {tuple(value.shape)}")
    return dict(result)
