"""Server rules with state (fedgan/strategies.py): server optimizers, thresholds, make_strategy."""
import numpy as np
import pytest
import torch

import fedgan_utils as fu
from helpers import random_states, stacked_rows


def test_damped_update_is_one_minus_alpha_global_plus_alpha_average():
    strategy = fu.make_strategy(fu.FedConfig(strategy="damped", server_lr=0.25), buffer_keys={"running_mean"})
    global_state = {"w": torch.tensor([4.0, 0.0]), "running_mean": torch.tensor([0.0])}
    clients = {"w": torch.tensor([[0.0, 2.0], [2.0, 6.0]]), "running_mean": torch.tensor([[1.0], [3.0]])}
    result = strategy.aggregate(global_state, clients, [1, 1])
    average = torch.tensor([1.0, 4.0])
    torch.testing.assert_close(result["w"], 0.75 * global_state["w"] + 0.25 * average)
    torch.testing.assert_close(result["running_mean"], torch.tensor([2.0]))  # buffers: plain average
    again = strategy.aggregate(result, clients, [1, 1])  # no momentum: the same rule every round
    torch.testing.assert_close(again["w"], 0.75 * result["w"] + 0.25 * average)


def test_threshold_clips_updates_above_an_absolute_norm_and_logs_how_many():
    strategy = fu.Thresholded(fu.FedAvg(), 3.0, rule="absolute", action="clip")
    global_state = {"w": torch.zeros(2, dtype=torch.float64)}
    clients = stacked_rows([1.0, 0.0], [0.0, 2.0], [6.0, 8.0])  # update norms 1, 2, 10
    result = strategy.aggregate(global_state, clients, [1, 1, 1])
    clipped = torch.tensor([1.8, 2.4], dtype=torch.float64)  # (6, 8) scaled to norm 3
    expected = (torch.tensor([1.0, 0.0]) + torch.tensor([0.0, 2.0]) + clipped) / 3
    torch.testing.assert_close(result["w"], expected.double())
    assert strategy.last_log["clipped"] == 1 and strategy.last_log["threshold"] == 3.0


def test_threshold_relative_to_the_median_drops_outliers_with_their_weights():
    strategy = fu.Thresholded(fu.FedAvg(), 2.0, rule="median", action="drop")
    global_state = {"w": torch.ones(1, dtype=torch.float64)}
    clients = stacked_rows([2.0], [3.0], [0.0], [101.0])  # update norms 1, 2, 1, 100; median 1.5 -> limit 3
    result = strategy.aggregate(global_state, clients, [1, 2, 3, 4])
    torch.testing.assert_close(result["w"], torch.tensor([(2.0 * 1 + 3.0 * 2 + 0.0 * 3) / 6], dtype=torch.float64))
    assert strategy.last_log["dropped"] == 1 and strategy.last_log["threshold"] == pytest.approx(3.0)
    everyone_over = fu.Thresholded(fu.FedAvg(), 0.5, rule="absolute", action="drop")
    kept = everyone_over.aggregate(global_state, clients, [1, 1, 1, 1])
    assert torch.equal(kept["w"], global_state["w"])  # nothing left: the global state stays


@pytest.mark.parametrize("rule, action", [("median", "clip"), ("median", "drop"), ("absolute", "clip")])
def test_a_nan_or_inf_update_is_over_any_threshold_and_left_out(rule, action):
    """A Flower deployment's rule sees every reply: one NaN update must neither set the median threshold nor be
    kept, and an Inf one cannot be clipped (0 x Inf is NaN)."""
    strategy = fu.Thresholded(fu.RobustRule(fu.median), 2.0, rule=rule, action=action)
    global_state = {"w": torch.zeros(2, dtype=torch.float64)}
    clients = stacked_rows([1.0, 1.0], [1.0, 1.2], [0.8, 1.0], [1.0, 0.9], [float("nan"), 1.0], [float("inf"), 0.0])
    result = strategy.aggregate(global_state, clients, [1] * 6)
    finite = clients["w"][:4]  # norms 1.3-1.6: within either threshold, so the result is their median
    torch.testing.assert_close(result["w"], fu.median(fu.unstack_states({"w": finite}), [1] * 4)["w"])
    assert strategy.last_log[f"{action}ped"] >= 2  # the NaN and the Inf update
    if rule == "median":
        assert strategy.last_log["threshold"] == pytest.approx(2.0 * finite.norm(dim=1).quantile(0.5).item())


def test_threshold_set_in_the_config_wraps_the_named_strategy(tiny_config):
    strategy = fu.make_strategy(tiny_config(strategy="fedadam", update_threshold=2.0, threshold_action="drop"))
    assert isinstance(strategy, fu.Thresholded) and isinstance(strategy.inner, fu.ServerOptimizer)
    assert strategy.inner.kind == "fedadam" and strategy.action == "drop"


def stacked(*values):
    return {"w": torch.tensor([[v] for v in values]), "running_mean": torch.tensor([[v] for v in values])}


def test_fedavgm_without_momentum_and_with_lr_1_is_fedavg():
    strategy = fu.ServerOptimizer("fedavgm", server_lr=1.0, momentum=0.0)
    clients = stacked(1.0, 3.0)
    result = strategy.aggregate({"w": torch.tensor([0.0]), "running_mean": torch.tensor([0.0])}, clients, [1, 3])
    expected = fu.fedavg_stacked(clients, [1, 3])
    assert all(torch.equal(result[k], expected[k]) for k in expected) and result["w"].item() == 2.5


def test_fedavgm_accumulates_momentum_across_rounds():
    strategy = fu.ServerOptimizer("fedavgm", server_lr=1.0, momentum=0.5)
    first = strategy.aggregate({"w": torch.tensor([0.0])}, {"w": torch.tensor([[2.0]])}, [1])
    assert first["w"].item() == 2.0  # v = 2, x = 0 + 2
    second = strategy.aggregate(first, {"w": torch.tensor([[3.0]])}, [1])
    assert second["w"].item() == 4.0  # delta = 1, v = 0.5 * 2 + 1 = 2, x = 2 + 2


@pytest.mark.parametrize("kind", ["fedadagrad", "fedadam", "fedyogi"])
def test_adaptive_server_optimizers_follow_reddi_et_al_by_hand(kind):
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    strategy = fu.ServerOptimizer(kind, server_lr=lr, momentum=b1, beta2=b2, tau=tau)
    x, m, v = 0.0, 0.0, 0.0
    for client in (1.0, 0.5, 2.0):
        result = strategy.aggregate({"w": torch.tensor([x], dtype=torch.float64)},
                                    {"w": torch.tensor([[client]], dtype=torch.float64)}, [1])
        delta = client - x
        m = b1 * m + (1 - b1) * delta
        if kind == "fedadagrad":
            v = v + delta ** 2
        elif kind == "fedadam":
            v = b2 * v + (1 - b2) * delta ** 2
        else:
            v = v - (1 - b2) * delta ** 2 * np.sign(v - delta ** 2)
        x = x + lr * m / (np.sqrt(v) + tau)
        assert result["w"].item() == pytest.approx(x, rel=1e-12)


def test_server_optimizers_average_buffers_instead_of_stepping_them():
    strategy = fu.ServerOptimizer("fedadam", server_lr=0.5, buffer_keys={"running_mean"})
    result = strategy.aggregate({"w": torch.tensor([0.0]), "running_mean": torch.tensor([0.0])}, stacked(2.0, 4.0),
                                [1, 1])
    assert result["running_mean"].item() == 3.0 and result["w"].item() != 3.0


def test_strategies_by_name_carry_the_configs_parameters():
    assert isinstance(fu.make_strategy(fu.FedConfig()), fu.FedAvg)
    momentum = fu.make_strategy(fu.FedConfig(strategy="fedavgm"))
    assert momentum.server_lr == 1.0 and momentum.momentum == 0.9
    assert fu.make_strategy(fu.FedConfig(strategy="fedyogi")).server_lr == 1e-2
    assert fu.make_strategy(fu.FedConfig(strategy="fedadam", server_lr=0.3)).server_lr == 0.3
    krum = fu.make_strategy(fu.FedConfig(strategy="krum", krum_f=2, krum_m=3))
    assert krum.rule is fu.krum and krum.params == {"f": 2, "m": 3}
    states = random_states(5)
    by_rule = fu.make_strategy(fu.FedConfig(strategy="median")).aggregate({}, fu.stack_states(states), [1] * 5)
    assert all(torch.equal(by_rule[k], v) for k, v in fu.median(states, [1] * 5).items())


@pytest.mark.parametrize("kw,message", [
    (dict(kind="fedsgd", server_lr=1.0), "kind='fedsgd' is not allowed"),
    (dict(kind="fedadam", server_lr=0.0), "server_lr=0.0 is not allowed: a number > 0"),
    (dict(kind="fedadam", server_lr=1.0, tau=0), "tau=0 is not allowed"),
    (dict(kind="fedavgm", server_lr=1.0, momentum=1.0), r"momentum=1.0 is not allowed: a number in \[0, 1\)"),
])
def test_server_optimizer_rejects_bad_parameters(kw, message):
    with pytest.raises(ValueError, match=message):
        fu.ServerOptimizer(**kw)
