"""SCAFFOLD (fedgan/scaffold.py): its control variates on hand-made numbers, one client computing what FedAvg
computes, the batched engine against the reference loop with the correction in the obvious place, and resume."""
import dataclasses

import numpy as np
import pytest
import torch

import fedgan_utils as fu
from conftest import TEST_DEVICE, with_engine
from fedgan.scaffold import server_control
from helpers import assert_states_close


def test_option_two_is_the_mean_local_gradient_and_the_server_keeps_the_mean_control_variate():
    # by hand, SGD: x = 5, c = 2, c_i = 1.5, two steps of lr 0.5 with gradients 1 and 3, each corrected by
    # c - c_i = 0.5: y = 5 - 0.5 (1.5) - 0.5 (3.5) = 2.5, and option II's c_i - c + (x - y) / (K lr) = 2 = mean(1, 3)
    x, c, c_i, lr, grads = 5.0, 2.0, 1.5, 0.5, (1.0, 3.0)
    y = x - sum(lr * (g + c - c_i) for g in grads)
    assert c_i - c + (x - y) / (len(grads) * lr) == sum(grads) / len(grads) == 2.0
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


@pytest.mark.parametrize("prox_mu", [0.0, 1.0])
@pytest.mark.parametrize("client_map", ["loop", "vmap"])
def test_the_engine_adds_the_correction_where_the_reference_loop_does(mnist_small, tiny_config, client_map, prox_mu):
    """A round of unequal clients with given corrections (random, well above float rounding: where c - c_i cancels a
    gradient, Adam's normalisation turns rounding into whole steps, so federations of several rounds drift apart by
    a learning rate in a few coordinates, engine or not): the same weights and the same mean gradients, also with
    FedProx's term in the gradients (a client done before the others must not add it to its sum while it waits)."""
    config = tiny_config(strategy="scaffold", partition="quantity", sigma=1.0, min_size=20, local_steps=None,
                         local_epochs=0.1, prox_mu=prox_mu)
    images, labels = (t.to(TEST_DEVICE) for t in mnist_small)
    torch.manual_seed(0)
    generator, discriminator = (m.to(images.device) for m in fu.build_models(config))
    plan = fu.plan_round(config, fu.partition(labels.cpu().numpy(), 3, "quantity", seed=0, sigma=1.0, min_size=20),
                         1)
    assert len(set(plan.steps.tolist())) > 1
    sizes = {w: sum(p.numel() for p in m.parameters()) for w, m in (("g", generator), ("d", discriminator))}
    corrections = {w: 0.05 * torch.randn(3, n, device=images.device) for w, n in sizes.items()}  # (K, P)
    local = fu.LocalTraining.of(config)
    results = {}
    for mapped in (client_map, "reference"):
        results[mapped] = fu.train_clients(
            generator, discriminator, fu.broadcast(generator.state_dict(), 3),
            fu.broadcast(discriminator.state_dict(), 3), images, labels, plan, local,
            with_engine(config, client_map=mapped).engine, corrections=corrections)
    engine, reference = results[client_map], results["reference"]
    assert_states_close(engine.g_state, reference.g_state)
    assert_states_close(engine.d_state, reference.d_state)
    for which in ("g", "d"):
        torch.testing.assert_close(engine.mean_gradients[which], reference.mean_gradients[which], rtol=1e-3,
                                   atol=1e-6)
        assert engine.mean_gradients[which].abs().sum() > 0
    plain = fu.train_clients(generator, discriminator, fu.broadcast(generator.state_dict(), 3),
                             fu.broadcast(discriminator.state_dict(), 3), images, labels, plan,
                             dataclasses.replace(local, control_variates=False), config.engine)
    assert not torch.allclose(plain.g_state["main.0.weight"], engine.g_state["main.0.weight"])  # it corrected


def test_the_server_keeps_c_the_mean_of_the_clients_control_variates(mnist_small, tiny_config):
    config = tiny_config(strategy="scaffold", partition="quantity", sigma=1.0, min_size=20, local_steps=None,
                         local_epochs=0.1, client_fraction=0.67, rounds=3)
    federation = fu.Federation(config, data=mnist_small, log=False).run(progress=False)
    for which in ("g", "d"):
        stored = [federation.client_store[c][f"{which}_control"] for c in range(3) if c in federation.client_store]
        torch.testing.assert_close(federation.controls.server[which].cpu(), sum(stored) / 3)
    fedavg = fu.Federation(dataclasses.replace(config, strategy="fedavg", run_name="fedavg"), data=mnist_small,
                           log=False).run(progress=False)
    assert not torch.allclose(next(fedavg.generator.parameters()), next(federation.generator.parameters()))


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
