"""SCAFFOLD (fedgan/scaffold.py): its control-variate updates on hand-made numbers, one client computing what FedAvg
computes, the batched engine against the reference loop with the correction in the obvious place, and resume."""
import dataclasses

import numpy as np
import torch

import fedgan_utils as fu
from conftest import with_engine
from fedgan.scaffold import client_control, server_control
from test_engine import assert_federations_agree


def test_option_two_client_and_server_control_variates_by_hand():
    # c_i = 1, c = 2, x = 5, y_i = 3 after K = 2 steps of lr 0.5: c_i+ = 1 - 2 + (5 - 3) / (2 x 0.5) = 1
    # a second client: c_i = 0, x = 5, y_i = 4 after 1 step: 0 - 2 + 1 / 0.5 = 0
    new = client_control(torch.tensor([[1.0], [0.0]]), torch.tensor([2.0]), torch.tensor([[5.0], [5.0]]),
                         torch.tensor([[3.0], [4.0]]), [2, 1], 0.5)
    assert new.tolist() == [[1.0], [0.0]]
    # the server, N = 4 clients: c_i = 1, 3 and two still 0 -> c = 1; a round where the first sends dc = 2 and a
    # third client dc = 4: c += (2 + 4) / 4 = 2.5, the mean of 3, 3, 4, 0
    assert server_control(torch.tensor([[1.0], [3.0]]), 4).tolist() == [1.0]
    assert server_control(torch.tensor([[3.0], [3.0], [4.0]]), 4).tolist() == [1.0 + (2 + 4) / 4]


def test_one_client_computes_exactly_what_fedavg_computes(mnist_small, tiny_config):
    """With one client c = c_i after every round (c += dc_i / 1), so the correction c - c_i is zero each round."""
    runs = {}
    for strategy in ("fedavg", "scaffold"):
        config = tiny_config(num_clients=1, rounds=4, strategy=strategy, run_name=strategy)
        runs[strategy] = fu.Federation(config, data=mnist_small, log=False).run(progress=False)
    for which in ("generator", "discriminator"):
        a, b = (getattr(runs[s], which).state_dict() for s in ("fedavg", "scaffold"))
        assert all(torch.equal(a[k], b[k]) for k in a), which
    controls, store = runs["scaffold"].controls, runs["scaffold"].client_store[0]
    assert controls.server["d"].abs().sum() > 0  # the control variates did move
    torch.testing.assert_close(controls.server["d"].cpu(), store["d_control"], rtol=1e-6, atol=1e-7)


def test_the_engine_matches_the_reference_loop_with_the_correction(mnist_small, tiny_config):
    # unequal step counts (quantity skew), 2 of 3 clients a round: c moves by 1/N of the senders' changes
    config = tiny_config(strategy="scaffold", partition="quantity", sigma=1.0, min_size=20, local_steps=None,
                         local_epochs=0.1, client_fraction=0.67, rounds=3)
    for client_map in ("loop", "vmap"):
        engine = fu.Federation(with_engine(config, client_map=client_map), data=mnist_small, log=False)
        reference = fu.Federation(with_engine(dataclasses.replace(config, run_name=f"ref-{client_map}"),
                                              client_map="reference"), data=mnist_small, log=False)
        assert_federations_agree(engine, reference, rounds=3)
        for which in ("g", "d"):  # c is a weight change over K lr (~1e-3): the weights' float rounding, x 1000
            torch.testing.assert_close(engine.controls.server[which], reference.controls.server[which],
                                       rtol=1e-3, atol=1e-2)
            assert engine.controls.server[which].abs().mean() > 0.1  # c is O(1): Adam's steps over lr
    # the correction changed the training: SCAFFOLD is not FedAvg here
    fedavg = fu.Federation(dataclasses.replace(config, strategy="fedavg", run_name="fedavg"), data=mnist_small,
                           log=False).run(progress=False)
    assert not torch.allclose(next(fedavg.generator.parameters()), next(engine.generator.parameters()))


def test_control_variates_are_counted_checkpointed_and_resume_exactly(mnist_small, tiny_config):
    config = tiny_config(strategy="scaffold", rounds=3)
    straight = fu.Federation(config, data=mnist_small, log=False).run(progress=False)
    fedavg = fu.Federation(dataclasses.replace(config, strategy="fedavg", run_name="fedavg"), data=mnist_small,
                           log=False)
    record, plain = straight.history[0], fedavg.run_round()
    controls = sum(p.numel() * 4 for m in (straight.generator, straight.discriminator) for p in m.parameters())
    assert record["bytes_up"] - plain["bytes_up"] == controls * len(record["clients"])  # dc_i beside the update
    assert record["bytes_down"] - plain["bytes_down"] == controls * len(record["clients"])  # c beside the models
    first = fu.Federation(dataclasses.replace(config, run_name="parts", rounds=1), data=mnist_small,
                          log=False).run(progress=False)
    assert "d_control" in fu.load_checkpoint(first.run_dir / "round_0001.pt")["client_store"]["0"]
    resumed = fu.Federation(dataclasses.replace(config, run_name="parts"), data=mnist_small, log=False,
                            resume=True).run(progress=False)
    for which in ("generator", "discriminator"):
        a, b = getattr(straight, which).state_dict(), getattr(resumed, which).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), which
    assert all(torch.equal(straight.controls.server[w], resumed.controls.server[w]) for w in ("g", "d"))
    assert np.isfinite([r["d_loss"] for r in resumed.history]).all()
