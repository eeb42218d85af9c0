"""Pure functions of client states: FedAvg, the robust rules, update norms, FedNova, staleness.

Each takes plain {name: tensor} states (a list, or stacked on a leading client dim) and returns new
ones; the rules that keep server state between rounds are in strategies.py."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from fedgan.checks import is_int, require
from fedgan.config import FIELD_RULES, STALENESS_RULES

Tensor = torch.Tensor
StateDict = dict[str, Tensor]


def _normalised_weights(weights: Any, count: int) -> Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != count:
        raise ValueError(f"got {w.numel()} weights for {count} client states; give one weight per state")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return w / w.sum()


def _counters_or(stacked: Mapping[str, Tensor], rule) -> StateDict:
    """Apply `rule` ([K, ...] -> [...]) to floating tensors in float32 at least; integer counters keep the largest."""
    return {k: rule(v.to(torch.promote_types(v.dtype, torch.float32))).to(v.dtype) if v.dtype.is_floating_point
            else v.amax(0) for k, v in stacked.items()}


def fedavg_stacked(stacked: Mapping[str, Tensor], weights: Any) -> StateDict:
    """FedAvg over states stacked on a leading client dim: {key: [K, ...]} -> {key: [...]}.

    Floating tensors: the weighted mean, computed in float32 at least and cast back to their dtype.
    Integer tensors (BatchNorm's num_batches_tracked) are counters, not estimates: the global keeps
    the largest client count, so it stays an integer of its own dtype.
    """
    if not stacked:
        return {}
    normalised = _normalised_weights(weights, next(iter(stacked.values())).shape[0])  # (K,) float64, sums to 1

    def weighted_mean(values: Tensor) -> Tensor:
        w = normalised.to(values.device, values.dtype)
        return (w.view(-1, *([1] * (values.dim() - 1))) * values).sum(0)  # (K, ...) -> (...)
    return _counters_or(stacked, weighted_mean)


def stack_states(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """A list of K state dicts with the same keys and shapes -> {key: [K, ...]}."""
    if len(states) == 0:
        raise ValueError("no client states to aggregate")
    keys = list(states[0])
    for i, state in enumerate(states[1:], 1):
        if list(state) != keys:
            raise ValueError(f"state {i} has keys {sorted(set(state) ^ set(keys))} that state 0 does not share")
        for key in keys:
            if state[key].shape != states[0][key].shape:
                raise ValueError(f"state {i}[{key!r}] has shape {tuple(state[key].shape)}, "
                                 f"state 0 has {tuple(states[0][key].shape)}")
    return {key: torch.stack([s[key] for s in states]) for key in keys}


def unstack_states(stacked: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
    """{key: [K, ...]} -> a list of K state dicts of views (the inverse of stack_states)."""
    keys = list(stacked)
    return [dict(zip(keys, values)) for values in zip(*(stacked[k].unbind(0) for k in keys))]


def fedavg(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> StateDict:
    """FedAvg (McMahan et al., 2017): the client states averaged, weighted by their sample counts."""
    return fedavg_stacked(stack_states(states), weights)


def median(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> StateDict:
    """Coordinate-wise median (Yin et al., ICML 2018), unweighted like Flower's aggregate_median.

    With an even number of clients it is the mean of the two middle values, as numpy's median.
    `weights` are validated but, as in the standard definition, not used.
    """
    stacked = stack_states(states)
    _normalised_weights(weights, len(states))

    def middle(values: Tensor) -> Tensor:
        ordered, n = values.sort(0).values, values.shape[0]
        return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return _counters_or(stacked, middle)


def trimmed_mean(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float], beta: float) -> StateDict:
    """Coordinate-wise trimmed mean (Yin et al., 2018): drop the int(beta * K) largest and smallest values.

    Unweighted, like Flower's aggregate_trimmed_avg with proportiontocut=beta.
    """
    stacked = stack_states(states)
    _normalised_weights(weights, len(states))
    count = len(states)
    cut = int(beta * count) if FIELD_RULES["trim_beta"][0](beta) else -1  # FedConfig.trim_beta's rule
    require(cut >= 0 and count - 2 * cut >= 1, "beta", beta,
             f"a number in [0, 0.5) that leaves at least one of the {count} clients after trimming")
    return _counters_or(stacked, lambda values: values.sort(0).values[cut:count - cut].mean(0))


def krum(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float], f: int, m: int = 1) -> StateDict:
    """Krum / Multi-Krum (Blanchard et al., NeurIPS 2017), as Flower's aggregate_krum.

    Each client scores the sum of squared distances to its K - f - 2 nearest others (at least 1);
    m=1 returns the state of the lowest score, m>1 the FedAvg (by `weights`) of the m lowest.
    """
    stacked = stack_states(states)
    _normalised_weights(weights, len(states))
    count = len(states)
    require(is_int(f) and 0 <= f < count, "f", f, f"an integer from 0 to {count - 1} (assumed faulty clients)")
    require(is_int(m) and 1 <= m <= count, "m", m, f"an integer from 1 to {count} (clients kept)")
    flat = torch.cat([v.reshape(count, -1).double() for v in stacked.values() if v.dtype.is_floating_point], 1)
    distances = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist").square()  # (K, K) squared L2
    nearest = max(1, count - f - 2)
    others = distances.masked_fill(torch.eye(count, dtype=torch.bool), float("inf"))  # a client is not its neighbour
    scores = others.sort(1).values[:, :nearest].sum(1)  # (K,)
    kept = scores.argsort()[:m]
    if m == 1:
        return {k: v[kept[0]].clone() for k, v in stacked.items()}
    return fedavg_stacked({k: v[kept] for k, v in stacked.items()}, torch.as_tensor(weights, dtype=torch.float64)[kept])


def update_norms(global_state: Mapping[str, Tensor], client_states: Mapping[str, Tensor],
                 keys: Iterable[str]) -> Tensor:
    """L2 norm of each client's update (its state - the global state) over `keys`: [K] float64."""
    squares = [(client_states[k].double() - global_state[k].to(client_states[k].device).double())
               .flatten(1).square().sum(1) for k in keys]  # each (K,)
    return torch.stack(squares).sum(0).sqrt()


def scale_updates(global_state: Mapping[str, Tensor], client_states: Mapping[str, Tensor], scale: Tensor,
                  keys: Iterable[str]) -> dict[str, Tensor]:
    """Client states with their updates on `keys` multiplied by scale [K]: global + scale * (state - global)."""
    result = dict(client_states)
    for k in keys:
        x = global_state[k].to(client_states[k].device, client_states[k].dtype)
        s = scale.to(client_states[k].device, client_states[k].dtype).view(-1, *([1] * x.dim()))
        result[k] = x + s * (client_states[k] - x)
    return result


def fednova_rescale(global_state: Mapping[str, Tensor], client_states: Mapping[str, Tensor], steps: Any,
                    weights: Any, keys: Iterable[str]) -> dict[str, Tensor]:
    """FedNova (Wang et al., NeurIPS 2020): updates normalised by local steps tau_i, rescaled by tau_eff.

    Each client's update becomes (tau_eff / tau_i) (x_i - x) with tau_eff = sum_i p_i tau_i, so a
    weighted average of the result is x + tau_eff sum_i p_i (x_i - x) / tau_i: clients that ran more
    steps no longer pull the global model further. Equal steps leave the states unchanged.
    """
    tau = torch.as_tensor(np.asarray(steps, dtype=np.float64))
    p = _normalised_weights(weights, len(tau))
    require(bool((tau > 0).all()), "steps", tau.tolist(), "local step counts >= 1")
    return scale_updates(global_state, client_states, (p * tau).sum() / tau, keys)


def staleness_weight(staleness: Any, rule: str = "polynomial", a: float = 0.5, b: int = 4) -> np.ndarray:
    """Weight of an update computed `staleness` server versions ago (Xie et al., "Asynchronous Federated
    Optimization", 2019): constant 1, polynomial (1 + s)^-a, hinge 1 if s <= b else 1 / (a (s - b) + 1)."""
    s = np.asarray(staleness, dtype=np.float64)
    require(bool((s >= 0).all()), "staleness", s.tolist(), "numbers >= 0 (server versions behind)")
    require(rule in STALENESS_RULES, "rule", rule, f"one of {list(STALENESS_RULES)}")
    if rule == "constant":
        return np.ones_like(s)
    if rule == "polynomial":
        return (1 + s) ** -a
    return np.where(s <= b, 1.0, 1 / (a * (s - b) + 1))
