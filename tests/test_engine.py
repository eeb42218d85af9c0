"""The batched engine (fedgan/engine/trainer.py) against the reference loop, and its CUDA graphs, kept trainers,
CUDA streams, client maps and bfloat16 compute."""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fedgan_utils as fu
from conftest import TEST_DEVICE, with_engine
from fedgan.engine import trainer as engine_trainer
from helpers import assert_states_close, local_training, states_equal, train_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_throughput import KernelCounter  # noqa: E402


def assert_federations_agree(engine, reference, rounds=2):
    """Two federations of one config, one per client map, round by round: same clients, losses and global models."""
    for _ in range(rounds):
        record, expected = engine.run_round(), reference.run_round()
        assert record["clients"] == expected["clients"] and "failed" not in record and "failed" not in expected
        np.testing.assert_allclose(record["d_loss_clients"], expected["d_loss_clients"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(record["g_loss_clients"], expected["g_loss_clients"], rtol=1e-4, atol=1e-5)
    assert_states_close(engine.generator.state_dict(), reference.generator.state_dict())
    assert_states_close(engine.discriminator.state_dict(), reference.discriminator.state_dict())


@pytest.mark.parametrize("client_map", ["vmap", "loop", "streams"])
@pytest.mark.parametrize("scheme,kw", [("iid", {}), ("quantity", {"sigma": 1.0, "min_size": 20})])
def test_engine_matches_the_per_client_reference_loop_over_two_rounds(mnist_small, tiny_config, scheme, kw,
                                                                       client_map):
    # quantity skew gives clients different step counts, which exercises the engine's masking
    config = tiny_config(partition=scheme, local_steps=None, local_epochs=0.1, **kw)
    engine = fu.Federation(with_engine(config, client_map=client_map), data=mnist_small, log=False)
    reference = fu.Federation(with_engine(dataclasses.replace(config, run_name="reference"), client_map="reference"),
                              data=mnist_small, log=False)
    if scheme == "quantity":
        steps = fu.plan_round(config, engine.parts, 1).steps
        assert len(set(steps.tolist())) > 1, "the test needs clients with different step counts"
    assert_federations_agree(engine, reference)


@pytest.mark.parametrize("client_map", ["vmap", "loop"])
@pytest.mark.parametrize("overrides", [
    dict(optimizer_state="keep", strategy="fedprox", prox_mu=0.5),  # Adam states in and out, FedProx's term
    dict(gan_layout="server_g"),  # the clients train only D
    dict(bn_policy="local", partition="dirichlet", alpha=0.5, min_size=20, local_steps=None, local_epochs=0.1),
    dict(gan_loss="hinge", d_conditioning="projection"),  # the stronger-baseline options
    dict(label_smoothing=0.1, d_conditioning="projection", gan_layout="server_g"),
    dict(d_norm="spectral"),  # the power iterations' u, buffers updated in place each forward
    dict(instance_noise=0.2, partition="quantity", sigma=1.0, min_size=20, local_steps=None, local_epochs=0.1),
    dict(d_norm="spectral", d_conditioning="projection", gan_loss="hinge", optimizer_state="keep")])
def test_engine_matches_the_reference_loop_with_kept_adam_states_and_d_only_clients(mnist_small, tiny_config,
                                                                                    overrides, client_map):
    config = tiny_config(**overrides)
    engine = fu.Federation(with_engine(config, client_map=client_map), data=mnist_small, log=False)
    reference = fu.Federation(with_engine(dataclasses.replace(config, run_name="reference"), client_map="reference"),
                              data=mnist_small, log=False)
    assert_federations_agree(engine, reference)
    if config.optimizer_state == "keep":
        for which in ("g_opt", "d_opt"):  # each client's Adam state, kept between rounds, in one format
            for client, store in engine.client_store.items():
                expected = reference.client_store[client][which]
                assert store[which]["step"].item() == expected["step"].item() == 6.0
                for moment in fu.ADAM_MOMENTS:
                    torch.testing.assert_close(store[which][moment], expected[moment], atol=1e-6, rtol=1e-3)


def test_cuda_graphs_replay_the_eager_steps_with_a_fraction_of_the_dispatches(mnist_small, tiny_config):
    """On a GPU the steps all clients take are replayed from a CUDA graph, and the steps after the shortest client
    is done from a second; elsewhere the option changes nothing."""
    device = torch.device(TEST_DEVICE)
    images, labels = (t.to(device) for t in mnist_small)
    config = tiny_config()
    steps = np.array([12, 20, 12])  # 12 steps of all three, 8 of one alone: each 2 warm-up, a capture, replays
    rng = np.random.default_rng(0)
    indices = torch.from_numpy(rng.integers(0, len(labels), (3, 20, config.batch_size)))
    plan = fu.RoundPlan(1, np.arange(3), steps * config.batch_size, steps, indices, noise_seed=5)
    results, dispatched = {}, {}
    for graphs in (False, True):
        torch.manual_seed(0)
        generator, discriminator = (m.to(device) for m in fu.build_models(config))
        with KernelCounter() as counter:
            results[graphs] = fu.train_clients(
                generator, discriminator, fu.broadcast(generator.state_dict(), 3),
                fu.broadcast(discriminator.state_dict(), 3), images, labels, plan, local_training(config),
                fu.EngineOptions(cuda_graphs=graphs))
        dispatched[graphs] = counter.count
    eager, graphed = results[False], results[True]
    torch.testing.assert_close(graphed.d_loss, eager.d_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(graphed.g_loss, eager.g_loss, atol=1e-5, rtol=1e-5)
    assert_states_close(graphed.g_state, eager.g_state)
    assert_states_close(graphed.d_state, eager.d_state)
    assert graphed.g_opt["step"].tolist() == eager.g_opt["step"].tolist() == [12.0, 20.0, 12.0]
    if device.type == "cuda":  # 6 of the 20 steps go through the dispatcher
        assert dispatched[True] < 0.5 * dispatched[False], dispatched
    else:
        assert dispatched[True] == dispatched[False]


@pytest.mark.parametrize("client_map", ["vmap", "loop"])
def test_a_kept_trainer_gives_a_later_round_what_a_new_one_gives(mnist_small, tiny_config, client_map):
    """train_clients keeps its LocalTrainer (state tensors and, on a GPU, its CUDA graphs) for the next round of the
    same shape: a round through the kept one computes what a new trainer computes from the same states, and the
    earlier round's results are copies that the later round leaves alone."""
    device = torch.device(TEST_DEVICE)
    images, labels = (t.to(device) for t in mnist_small)
    config = with_engine(tiny_config(), client_map=client_map)
    rng = np.random.default_rng(0)

    def plan(round_index, steps):
        indices = torch.from_numpy(rng.integers(0, len(labels), (3, 20, config.batch_size)))
        return fu.RoundPlan(round_index, np.arange(3), steps * config.batch_size, steps, indices, noise_seed=5)
    first, second = plan(1, np.array([12, 20, 12])), plan(2, np.array([20, 9, 15]))  # unequal: both graphs
    torch.manual_seed(0)
    generator, discriminator = (m.to(device) for m in fu.build_models(config))

    def train(round_plan, g_state, d_state, g_opt=None, d_opt=None):
        return fu.train_clients(generator, discriminator, g_state, d_state, images, labels, round_plan,
                                local_training(config, prox_mu=0.01), config.engine, g_opt=g_opt, d_opt=d_opt)
    fu.clear_local_trainers()
    one = train(first, fu.broadcast(generator.state_dict(), 3), fu.broadcast(discriminator.state_dict(), 3))
    trainer = next(iter(engine_trainer._LOCAL_TRAINERS.values()))
    one_before = [t.clone() for t in (*one.g_state.values(), *one.d_state.values(), one.g_opt["step"], one.d_loss)]
    kept = train(second, one.g_state, one.d_state, one.g_opt, one.d_opt)
    assert list(engine_trainer._LOCAL_TRAINERS.values()) == [trainer], "the second round built a new trainer"
    for before, after in zip(one_before, (*one.g_state.values(), *one.d_state.values(), one.g_opt["step"],
                                          one.d_loss)):
        assert torch.equal(before, after), "the second round changed the first round's results"
    fu.clear_local_trainers()
    new = train(second, one.g_state, one.d_state, one.g_opt, one.d_opt)
    assert next(iter(engine_trainer._LOCAL_TRAINERS.values())) is not trainer
    torch.testing.assert_close(kept.d_loss, new.d_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kept.g_loss, new.g_loss, atol=1e-5, rtol=1e-5)
    assert_states_close(kept.g_state, new.g_state)
    assert_states_close(kept.d_state, new.d_state)
    torch.testing.assert_close(kept.d_opt["exp_avg_sq"], new.d_opt["exp_avg_sq"], atol=2e-5, rtol=1e-4)
    assert kept.g_opt["step"].tolist() == new.g_opt["step"].tolist() == [32.0, 29.0, 27.0]


@pytest.mark.parametrize("client_map", ["vmap", "loop"])
def test_models_lent_in_eval_mode_train_as_models_in_training_mode(mnist_small, tiny_config, client_map):
    """Local training is training whatever mode the models lending their structure are in: BatchNorm normalises by
    the batch and updates its running statistics, as in the reference's copies put in training mode."""
    config = with_engine(tiny_config(), client_map=client_map)
    images, labels = (t.to(TEST_DEVICE) for t in mnist_small)
    plan = fu.plan_round(config, fu.partition(labels.cpu().numpy(), 3, seed=0), 1)
    results = {}
    for mode in ("train", "eval"):
        fu.clear_local_trainers()
        torch.manual_seed(0)
        generator, discriminator = (m.to(images.device).train(mode == "train") for m in fu.build_models(config))
        results[mode] = fu.train_clients(generator, discriminator, fu.broadcast(generator.state_dict(), 3),
                                         fu.broadcast(discriminator.state_dict(), 3), images, labels, plan,
                                         local_training(config), config.engine)
        assert generator.training and discriminator.training
    trained, lent_in_eval = results["train"], results["eval"]
    assert states_equal(trained.g_state, lent_in_eval.g_state) and states_equal(trained.d_state, lent_in_eval.d_state)
    assert torch.equal(trained.d_loss, lent_in_eval.d_loss)
    start = discriminator.state_dict()
    moved = [k for k in start if "running_mean" in k and not torch.equal(lent_in_eval.d_state[k][0], start[k])]
    assert moved, "the running statistics were not updated"


@pytest.mark.parametrize("streams", [2, 8])  # 2: clients share streams; 8: one each
def test_streams_run_the_loops_computation_bit_for_bit(mnist_small, tiny_config, monkeypatch, streams):
    """client_map="streams": the loop's clients side by side on CUDA streams, replayed from a CUDA graph after the
    warm-up steps; off a GPU it is the loop."""
    images, labels = (t.to(TEST_DEVICE) for t in mnist_small)
    config = with_engine(tiny_config(num_clients=4, local_steps=8), cuda_streams=streams)  # 8 steps: 2 eager,
    looped = train_tiny(with_engine(config, client_map="loop"), images, labels)  # a capture and replays on a GPU
    streamed = train_tiny(with_engine(config, client_map="streams"), images, labels)
    assert torch.equal(streamed.d_loss, looped.d_loss) and torch.equal(streamed.g_loss, looped.g_loss)
    for key, value in {**looped.g_state, **looped.d_state}.items():
        assert torch.equal({**streamed.g_state, **streamed.d_state}[key], value), key


def test_auto_client_map_is_the_loop_on_a_cpu_and_streams_on_a_gpu_unless_the_clients_take_unequal_steps():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [fu.resolved_client_map("auto", cpu, steps) for steps in ([5], [5] * 9 + [6])] == ["loop"] * 2
    assert [fu.resolved_client_map("auto", cuda, [5] * k) for k in (1, 2, 100)] == ["streams"] * 3
    assert [fu.resolved_client_map("auto", cuda, steps) for steps in ([7], [5, 6])] == ["streams", "vmap"]
    assert [fu.resolved_client_map(m, cuda, [5]) for m in ("vmap", "loop")] == ["vmap", "loop"]  # asked for, kept


def test_bfloat16_trains_both_client_maps_alike_and_keeps_float32_state(mnist_small, tiny_config):
    images, labels = mnist_small
    exact = train_tiny(with_engine(tiny_config(), client_map="vmap"), images, labels)
    vmapped = train_tiny(with_engine(tiny_config(), client_map="vmap", bfloat16=True), images, labels)
    looped = train_tiny(with_engine(tiny_config(), client_map="loop", bfloat16=True), images, labels)
    for low in (vmapped, looped):
        assert not torch.equal(low.d_loss, exact.d_loss), "bfloat16=True computed in float32"
        torch.testing.assert_close(low.d_loss, exact.d_loss, atol=5e-3, rtol=0)  # bf16 rounding, same model
        torch.testing.assert_close(low.g_loss, exact.g_loss, atol=5e-3, rtol=0)
        for key, value in {**low.g_state, **low.d_state}.items():  # float32 master weights and BN statistics
            assert value.dtype == {**exact.g_state, **exact.d_state}[key].dtype, key
        assert low.g_opt["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(vmapped.d_loss, looped.d_loss, atol=1e-3, rtol=0)  # vmap does not bypass bfloat16
    # Adam's first steps move a weight by about lr whatever the gradient's size: a rounding can flip one
    moved = 2 * 3 * tiny_config().lr_g  # 3 local steps
    torch.testing.assert_close(vmapped.g_state["main.0.weight"], looped.g_state["main.0.weight"], atol=moved, rtol=0)


def test_fedprox_engine_matches_the_reference_loop_with_a_proximal_loss(mnist_small, tiny_config):
    config = tiny_config(strategy="fedprox", prox_mu=5.0, local_steps=4)
    federation = fu.Federation(config, data=mnist_small, log=False)
    assert federation.local_training.prox_mu == 5.0  # from the config straight to the clients' local training
    reference = fu.Federation(with_engine(dataclasses.replace(config, run_name="reference"), client_map="reference"),
                              data=mnist_small, log=False)
    record, expected = federation.run_round(), reference.run_round()  # the reference adds (mu/2)|w - w_start|^2
    np.testing.assert_allclose(record["d_loss_clients"], expected["d_loss_clients"], rtol=1e-4, atol=1e-5)
    for key, value in reference.generator.state_dict().items():
        torch.testing.assert_close(federation.generator.state_dict()[key], value, atol=2e-5, rtol=1e-4)
    plain = fu.Federation(tiny_config(checkpoint_dir=config.checkpoint_dir + "-plain"), data=mnist_small, log=False)
    plain.run_round()
    assert not states_equal(plain.generator.state_dict(), federation.generator.state_dict())


@pytest.mark.parametrize("client_map", ["loop", "reference"])
def test_a_client_trained_apart_with_its_noise_row_trains_its_row_of_the_round(mnist_small, tiny_config, client_map):
    """What a Flower SuperNode (or the fallback for a failing client) computes: a plan of one client that takes row
    r of the round's noise gives exactly row r of the round trained together; without its row it does not."""
    images, labels = mnist_small
    config = tiny_config()
    steps = np.array([4, 6, 5])
    rng = np.random.default_rng(1)
    indices = torch.from_numpy(rng.integers(0, len(labels), (3, 6, config.batch_size)))
    plan = fu.RoundPlan(1, np.arange(3), steps * config.batch_size, steps, indices, noise_seed=7)
    torch.manual_seed(0)
    generator, discriminator = fu.build_models(config)
    engine = fu.EngineOptions(client_map=client_map)

    def train(round_plan):
        count = len(round_plan.client_ids)
        return fu.train_clients(generator, discriminator, fu.broadcast(generator.state_dict(), count),
                                fu.broadcast(discriminator.state_dict(), count), images, labels, round_plan,
                                local_training(config), engine)
    together = train(plan)
    row = 2
    alone = dataclasses.replace(plan, client_ids=plan.client_ids[row:], sizes=plan.sizes[row:],
                                steps=plan.steps[row:], batch_indices=plan.batch_indices[row:, :steps[row]])
    apart = train(dataclasses.replace(alone, noise_rows=np.array([row]), noise_width=3))
    for key, value in {**apart.g_state, **apart.d_state}.items():
        expected = {**together.g_state, **together.d_state}[key][row]
        assert torch.equal(value[0], expected), key
    assert apart.d_loss[0].item() == together.d_loss[row].item()
    first_row = train(alone)  # the noise of row 0: another client's
    assert not torch.equal(first_row.g_state["main.0.weight"][0], together.g_state["main.0.weight"][row])
