"""fedavg: the weighted mean against a hand computation, dtypes kept, integer buffers, bad input."""
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
