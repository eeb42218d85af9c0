"""Client-level differential privacy: DP-FedAvg's clip and noise, and epsilon from an RDP accountant."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from fedgan.checks import is_int, is_number, positive_int, positive_number, require
from fedgan.config import FedConfig, clients_per_round
from fedgan.rounds import RNG_DP, derive_seed

Tensor = torch.Tensor


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError as error:
        raise ImportError("client-level DP reports epsilon with the RDP accountant of Google's dp-accounting "
                          "package; install it: pip install dp-accounting") from error
    return dp_accounting


def _check_accounting(sample_rate: Any, rounds: Any, delta: Any) -> None:
    require(is_number(sample_rate) and 0 < sample_rate <= 1, "sample_rate", sample_rate, "a number in (0, 1]")
    require(positive_int(rounds), "rounds", rounds, "an integer >= 1")
    require(is_number(delta) and 0 < delta < 1, "delta", delta, "a number in (0, 1)")


def dp_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Epsilon after `rounds` releases of a Poisson-subsampled Gaussian mechanism (dp-accounting's RDP accountant).

    Client-level DP-FedAvg: sample_rate = expected clients a round / all clients; noise_multiplier = noise std /
    clip norm. Selection here draws a fixed number of clients a round, which the Poisson analysis approximates.
    """
    require(positive_number(noise_multiplier), "noise_multiplier", noise_multiplier, "a number > 0")
    _check_accounting(sample_rate, rounds, delta)
    accounting = _dp_accounting()
    event = accounting.SelfComposedDpEvent(
        accounting.PoissonSampledDpEvent(float(sample_rate), accounting.GaussianDpEvent(float(noise_multiplier))),
        int(rounds))
    accountant = accounting.rdp.RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(float(delta)))


def dp_noise_multiplier(target_epsilon: float, sample_rate: float, rounds: int, delta: float,
                        tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier (to `tolerance`, relative) whose dp_epsilon is at most target_epsilon."""
    require(positive_number(target_epsilon), "target_epsilon", target_epsilon, "a finite number > 0")
    _check_accounting(sample_rate, rounds, delta)
    require(is_number(tolerance) and 0 < tolerance < 1, "tolerance", tolerance, "a number in (0, 1)")
    low, high = 0.0, 1.0
    while (epsilon := dp_epsilon(high, sample_rate, rounds, delta)) > target_epsilon:
        low, high = high, 2 * high
        require(high < 1e6, "target_epsilon", target_epsilon, "an epsilon some noise multiplier below 1e6 reaches")
    require(epsilon > 0, "target_epsilon", target_epsilon,
            f"an epsilon the accountant resolves: at noise multiplier {high:g} it reports 0 (underflow), so no "
            "multiplier can be said to reach this one")
    while high - low > tolerance * high:
        middle = (low + high) / 2
        low, high = (middle, high) if dp_epsilon(middle, sample_rate, rounds, delta) > target_epsilon else (low, middle)
    return high


def privatize_updates(updates: Sequence[Mapping[str, Tensor]], clip: float, noise_multiplier: float,
                      expected_clients: int, generator: torch.Generator | None = None
                      ) -> tuple[list[dict[str, Tensor]], Tensor]:
    """DP-FedAvg's server step (McMahan et al., ICLR 2018) on stacked client updates.

    Each client's whole update (over all the given state dicts, e.g. G and D together) is clipped to L2 norm
    `clip`; the clipped updates are summed, Gaussian noise of std noise_multiplier x clip is added to every
    coordinate, and the sum is divided by the expected number of clients. Returns the noisy mean updates
    (one dict per input, {key: [...]}) and each client's norm before clipping [K].
    """
    require(positive_number(clip), "clip", clip, "a number > 0")
    require(is_int(expected_clients) and expected_clients >= 1, "expected_clients", expected_clients,
             "an integer >= 1")
    floats = [[k for k, v in update.items() if v.dtype.is_floating_point] for update in updates]
    norms = torch.stack([update[k].double().flatten(1).square().sum(1) for update, keys in zip(updates, floats)
                         for k in keys]).sum(0).sqrt()  # (K,)
    scale = (clip / norms.clamp(min=1e-12)).clamp(max=1.0)
    noisy = []
    for update, keys in zip(updates, floats):
        noisy.append({})
        for k in keys:
            v = update[k]
            total = (scale.to(v.device, v.dtype).view(-1, *([1] * (v.dim() - 1))) * v).sum(0)  # (K, ...) -> (...)
            noise = torch.randn(total.shape, generator=generator, device=v.device, dtype=v.dtype)
            noisy[-1][k] = (total + noise_multiplier * clip * noise) / expected_clients
    return noisy, norms


def noisy_state(global_state: Mapping[str, Tensor], noisy: Mapping[str, Tensor],
                client_states: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """DP-FedAvg's new state as one client's, {key: [1, ...]}: the global state plus the noisy mean update where there
    is one, else (counters) the clients' largest value; a noisy running variance clamped at 0 (post-processing
    keeps DP)."""
    state = {k: (global_state[k] + noisy[k] if k in noisy else client_states[k].amax(0)).unsqueeze(0)
             for k in client_states}
    for k in state:
        if k.endswith("running_var"):
            state[k].clamp_(min=0)
    return state


def private_round(received: Mapping[str, Mapping[str, Tensor]], config: FedConfig, round_index: int,
                  log: dict[str, Any], device: torch.device) -> dict[str, dict[str, Tensor]]:
    """A federation's DP-FedAvg step on what its clients sent (G and D together, one clip over both): clipped,
    summed and noised from the round's own random stream; the clipped count, median norm and epsilon into `log`."""
    expected = clients_per_round(config.num_clients, config.client_fraction)
    noise = torch.Generator(device=device).manual_seed(derive_seed(config.seed, round_index, RNG_DP))
    which = list(received)
    noisy, norms = privatize_updates([received[w] for w in which], config.dp_clip, config.dp_noise_multiplier,
                                     expected, noise)
    log["dp_clipped"] = int((norms > config.dp_clip).sum())
    log["dp_norm_median"] = float(norms.median())
    log["epsilon"] = (dp_epsilon(config.dp_noise_multiplier, expected / config.num_clients, round_index,
                                 config.dp_delta) if config.dp_noise_multiplier > 0 else math.inf)
    return dict(zip(which, noisy))
