"""fedavg: the weighted mean against a hand computation, dtypes kept, integer buffers, bad input."""
import numpy as np
import pytest
import torch

import fedgan_utils as fu


def test_fedavg_is_the_sample_weighted_mean():
    states = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}]
    # weights 1 and 3: (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5
    assert fu.fedavg(states, [100, 300])["w"].tolist() == [2.5, 5.0]


def test_fedavg_keeps_each_dtype_and_takes_the_largest_counter():
    states = [{"half": torch.tensor([1.0], dtype=torch.float16), "double": torch.tensor([0.1], dtype=torch.float64),
               "num_batches_tracked": torch.tensor(7)},
              {"half": torch.tensor([2.0], dtype=torch.float16), "double": torch.tensor([0.2], dtype=torch.float64),
               "num_batches_tracked": torch.tensor(9)}]
    result = fu.fedavg(states, [1, 1])
    assert result["half"].dtype == torch.float16 and result["half"].item() == 1.5
    assert result["double"].dtype == torch.float64 and result["double"].item() == pytest.approx(0.15, abs=1e-15)
    assert result["num_batches_tracked"].dtype == torch.int64 and result["num_batches_tracked"].item() == 9


def test_fedavg_of_batchnorm_models_loads_back_into_the_model():
    models = [torch.nn.BatchNorm2d(3) for _ in range(2)]
    models[0](torch.randn(4, 3, 2, 2))
    result = fu.fedavg([m.state_dict() for m in models], [1, 1])
    merged = torch.nn.BatchNorm2d(3)
    merged.load_state_dict(result)
    expected = (models[0].running_mean + models[1].running_mean) / 2
    torch.testing.assert_close(merged.running_mean, expected)
    assert merged.num_batches_tracked.item() == 1


def test_one_client_gives_its_own_state():
    state = {"w": torch.randn(3, 3)}
    torch.testing.assert_close(fu.fedavg([state], [5])["w"], state["w"])


def test_zero_weight_clients_do_not_count():
    states = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([100.0])}]
    assert fu.fedavg(states, [2, 0])["w"].item() == 1.0


@pytest.mark.parametrize("states,weights,message", [
    ([], [], "no client states"),
    ([{"w": torch.ones(1)}, {"v": torch.ones(1)}], [1, 1], "keys"),
    ([{"w": torch.ones(1)}, {"w": torch.ones(2)}], [1, 1], "shape"),
    ([{"w": torch.ones(1)}, {"w": torch.ones(1)}], [1], "got 1 weights for 2 client states"),
    ([{"w": torch.ones(1)}, {"w": torch.ones(1)}], [1, -1], "weights must be finite, >= 0"),
    ([{"w": torch.ones(1)}, {"w": torch.ones(1)}], [0, 0], "not all 0"),
])
def test_bad_input_raises_a_clear_value_error(states, weights, message):
    with pytest.raises(ValueError, match=message):
        fu.fedavg(states, weights)


# --- robust rules, against numpy versions of the standard definitions (those of Flower's aggregate.py) ----------

def random_states(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(3, 4, generator=generator), "b": torch.randn(5, generator=generator),
             "num_batches_tracked": torch.tensor(i)} for i in range(count)]


def numpy_layers(states, key):
    return np.stack([s[key].numpy() for s in states])


def numpy_trim_mean(array, proportion):
    cut = int(proportion * len(array))
    return np.sort(array, axis=0)[cut:len(array) - cut].mean(0)


def numpy_krum(states, weights, f, m):
    flat = [np.concatenate([s["w"].numpy().ravel(), s["b"].numpy().ravel()]).astype(np.float64) for s in states]
    distances = np.array([[np.linalg.norm(a - b) ** 2 for b in flat] for a in flat])
    nearest = max(1, len(flat) - f - 2)
    # each client's nearest others (Flower drops the first of argsort, i.e. the client itself)
    scores = [np.sum(np.sort(np.delete(row, i))[:nearest]) for i, row in enumerate(distances)]
    kept = np.argsort(scores)[:m]  # Multi-Krum: the m lowest scores, averaged by their example counts
    w = np.array(weights, dtype=np.float64)[kept]
    result = {}
    for key in ("w", "b"):
        layers = numpy_layers(states, key)[kept]
        result[key] = (w.reshape((-1,) + (1,) * (layers.ndim - 1)) * layers).sum(0) / w.sum()
    return result


@pytest.mark.parametrize("count", [5, 6])
def test_median_is_numpys_coordinate_wise_median(count):
    states = random_states(count)
    result = fu.median(states, [1] * count)
    for key in ("w", "b"):
        np.testing.assert_allclose(result[key].numpy(), np.median(numpy_layers(states, key), axis=0), rtol=1e-6)
    assert result["num_batches_tracked"].item() == count - 1


def test_median_ignores_one_wild_client():
    states = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, {"w": torch.tensor([1e6])}]
    assert fu.median(states, [1, 1, 100])["w"].item() == 2.0


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.4])
def test_trimmed_mean_is_the_standard_trim_mean(beta):
    states = random_states(7, seed=1)
    result = fu.trimmed_mean(states, [1] * 7, beta)
    for key in ("w", "b"):
        np.testing.assert_allclose(result[key].numpy(), numpy_trim_mean(numpy_layers(states, key), beta), rtol=1e-6)


def test_trimmed_mean_drops_the_extremes_by_hand():
    states = [{"w": torch.tensor([v])} for v in (-100.0, 1.0, 2.0, 3.0, 100.0)]
    assert fu.trimmed_mean(states, [1] * 5, beta=0.2)["w"].item() == 2.0  # int(0.2 * 5) = 1 cut each side


@pytest.mark.parametrize("f,m", [(0, 1), (1, 1), (2, 1), (1, 3), (2, 4)])
def test_krum_matches_the_standard_definition(f, m):
    states = random_states(8, seed=2)
    weights = [10, 20, 30, 40, 50, 60, 70, 80]
    result, expected = fu.krum(states, weights, f, m), numpy_krum(states, weights, f, m)
    for key in ("w", "b"):
        np.testing.assert_allclose(result[key].numpy(), expected[key], rtol=1e-5, atol=1e-6)


def test_krum_picks_a_client_from_the_honest_cluster():
    honest = [{"w": torch.tensor([1.0, 1.0]) + 0.01 * i} for i in range(4)]
    attackers = [{"w": torch.tensor([50.0, -50.0])}, {"w": torch.tensor([-40.0, 60.0])}]
    chosen = fu.krum(honest + attackers, [1] * 6, f=2)["w"]
    assert any(torch.equal(chosen, h["w"]) for h in honest)


@pytest.mark.parametrize("call,message", [
    (lambda s: fu.trimmed_mean(s, [1] * 4, beta=0.5), "beta=0.5 is not allowed"),
    (lambda s: fu.trimmed_mean(s, [1] * 4, beta=-0.1), "beta=-0.1 is not allowed"),
    (lambda s: fu.krum(s, [1] * 4, f=4), "f=4 is not allowed: an integer from 0 to 3"),
    (lambda s: fu.krum(s, [1] * 4, f=1, m=0), "m=0 is not allowed: an integer from 1 to 4"),
    (lambda s: fu.median(s, [1] * 3), "got 3 weights for 4 client states"),
])
def test_robust_rules_reject_bad_parameters(call, message):
    with pytest.raises(ValueError, match=message):
        call(random_states(4))


# --- strategies: server state between rounds ------------------------------------------------------------------

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
