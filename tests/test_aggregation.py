"""Pure functions of client states (fedgan/aggregation.py): FedAvg by hand, the robust rules against their standard
definitions, FedNova and the staleness weights."""
import numpy as np
import pytest
import torch

import fedgan_utils as fu
from helpers import random_states, stacked_rows


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


def test_fednova_normalises_updates_by_local_steps():
    global_state = {"w": torch.zeros(1, dtype=torch.float64)}
    clients = stacked_rows([2.0], [10.0])  # client 0 ran 2 steps, client 1 ran 10
    rescaled = fu.fednova_rescale(global_state, clients, steps=[2, 10], weights=[1, 1], keys=["w"])
    tau_eff = 6.0
    average = fu.fedavg_stacked(rescaled, [1, 1])
    torch.testing.assert_close(average["w"], torch.tensor([tau_eff * (2.0 / 2 + 10.0 / 10) / 2], dtype=torch.float64))
    same = fu.fednova_rescale(global_state, clients, steps=[5, 5], weights=[3, 1], keys=["w"])
    torch.testing.assert_close(same["w"], clients["w"])  # equal steps: FedAvg unchanged


def test_staleness_weights_follow_the_fedasync_definitions():
    s = [0, 1, 3, 8]
    np.testing.assert_allclose(fu.staleness_weight(s, "constant"), [1, 1, 1, 1])
    np.testing.assert_allclose(fu.staleness_weight(s, "polynomial", a=0.5), [1, 2 ** -0.5, 0.5, 1 / 3])
    np.testing.assert_allclose(fu.staleness_weight(s, "hinge", a=2.0, b=2), [1, 1, 1 / 3, 1 / 13])
    with pytest.raises(ValueError, match="staleness"):
        fu.staleness_weight([-1])
