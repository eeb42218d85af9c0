"""The stacked local-training engine: plans, the stacked Adam, and equivalence with the per-client loop."""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fedgan_utils as fu
from fedgan.engine import trainer as engine_trainer
from conftest import TEST_DEVICE, with_engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_throughput import KernelCounter  # noqa: E402


def assert_states_close(actual, expected, atol=2e-5):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=1e-4, msg=key)


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


def test_stacked_adam_matches_torch_adam_for_each_client_with_its_own_step_count():
    torch.manual_seed(0)
    flat = torch.randn(3, 20)
    state = fu.fresh_adam_state(3, 20)
    state["step"] += torch.tensor([0.0, 5.0, 9.0])  # clients that kept their optimizer through earlier rounds
    references = [torch.nn.Parameter(flat[k].clone()) for k in range(3)]
    optimizers = [torch.optim.Adam([p], lr=1e-2, betas=(0.5, 0.999)) for p in references]
    for k, optimizer in enumerate(optimizers):
        optimizer.state[references[k]] = {"step": state["step"][k].clone(), "exp_avg": torch.zeros(20),
                                          "exp_avg_sq": torch.zeros(20)}
    adam = fu.StackedAdam(flat, state, lr=1e-2, betas=(0.5, 0.999))
    for _ in range(4):
        grads = torch.randn(3, 20)
        adam.step(grads)
        for k, (p, optimizer) in enumerate(zip(references, optimizers)):
            p.grad = grads[k].clone()
            optimizer.step()
    for k in range(3):
        torch.testing.assert_close(flat[k], references[k].detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(state["exp_avg_sq"][k], optimizers[k].state[references[k]]["exp_avg_sq"])
    assert state["step"].tolist() == [4.0, 9.0, 13.0]  # the counts are updated in the caller's state


def test_stacked_adam_leaves_inactive_clients_untouched():
    flat = torch.ones(2, 3)
    state = fu.fresh_adam_state(2, 3)
    fu.StackedAdam(flat, state, lr=0.1, betas=(0.9, 0.999)).step(torch.ones(2, 3), active=[True, False])
    assert torch.equal(flat[1], torch.ones(3))
    assert state["step"].tolist() == [1.0, 0.0]
    assert torch.equal(state["exp_avg"][1], torch.zeros(3))
    torch.testing.assert_close(flat[0], torch.full((3,), 0.9))  # first Adam step moves by lr


def test_plan_is_deterministic_and_walks_each_clients_own_data(tiny_config):
    config = tiny_config(num_clients=4, client_fraction=0.5, local_steps=None, local_epochs=2.0, batch_size=5)
    parts = fu.partition(np.arange(40) % 10, 4, "iid", seed=0)
    first, again = fu.plan_round(config, parts, 3), fu.plan_round(config, parts, 3)
    assert first.client_ids.tolist() == again.client_ids.tolist() and len(first.client_ids) == 2
    assert torch.equal(first.batch_indices, again.batch_indices)
    for row, client in enumerate(first.client_ids):
        assert first.steps[row] == 4  # ceil(2 epochs * 10 images / 5)
        seen = first.batch_indices[row, : first.steps[row]].flatten().numpy()
        assert set(seen) == set(parts[client])  # two epochs: every own image, twice, nothing else
        assert np.bincount(seen, minlength=40)[parts[client]].tolist() == [2] * 10


def test_selection_differs_between_rounds_but_not_between_calls():
    rounds = [tuple(fu.select_clients(100, 0.1, seed=0, round_index=r)) for r in range(1, 6)]
    assert len(set(rounds)) == 5
    assert all(len(r) == 10 for r in rounds)
    assert tuple(fu.select_clients(100, 0.1, seed=0, round_index=1)) == rounds[0]


def test_map_clients_stacks_what_vmap_stacks_and_writes_through_to_stacked_buffers():
    weights, buffer = torch.randn(3, 4), torch.zeros(3, 4)

    def fn(w, b, x):
        b.add_(w)  # an in-place buffer update, like BatchNorm's running mean
        return (w * x).sum()

    x = torch.randn(3, 4)
    looped = fu.map_clients(fn)(weights, buffer, x)
    torch.testing.assert_close(looped, (weights * x).sum(1))
    torch.testing.assert_close(buffer, weights)
    torch.testing.assert_close(torch.func.vmap(fn)(weights, torch.zeros(3, 4), x), looped)


def test_map_clients_skips_clients_that_finished_their_steps():
    calls = []

    def fn(w):
        calls.append(w.clone())
        return w * 2

    out = fu.map_clients(fn, active=[True, False, True])(torch.tensor([1.0, 2.0, 3.0]))
    assert len(calls) == 2 and out.tolist() == [2.0, 0.0, 6.0]


def local_training(config, prox_mu=0.0):
    return fu.LocalTraining(lr_g=config.lr_g, lr_d=config.lr_d, betas=config.betas, prox_mu=prox_mu)


def train_tiny(config, images, labels):
    torch.manual_seed(0)
    generator, discriminator = (m.to(images.device) for m in fu.build_models(config))
    plan = fu.plan_round(config, fu.partition(labels.cpu().numpy(), config.num_clients, seed=config.seed), 1)
    count = config.num_clients
    return fu.train_clients(generator, discriminator, fu.broadcast(generator.state_dict(), count),
                            fu.broadcast(discriminator.state_dict(), count), images, labels, plan,
                            local_training(config), config.engine)


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
    torch.testing.assert_close(vmapped.d_loss, looped.d_loss, atol=1e-3, rtol=0)  # vmap does not bypass the bfloat16 mode
    # Adam's first steps move a weight by about lr whatever the gradient's size: a rounding can flip one
    moved = 2 * 3 * tiny_config().lr_g  # 3 local steps
    torch.testing.assert_close(vmapped.g_state["main.0.weight"], looped.g_state["main.0.weight"], atol=moved, rtol=0)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("block", [1, 2, 5, 8])  # 2: five clients padded to three groups of two; 8: one group
def test_block_diagonal_convolution_computes_each_clients_own_convolution_and_gradients(transposed, block):
    device = torch.device(TEST_DEVICE)
    torch.manual_seed(0)
    x = torch.randn(5, 3, 2, 9, 9, device=device, requires_grad=True)  # (K, B, Cin, H, W)
    weight = torch.randn(5, *((2, 4) if transposed else (4, 2)), 4, 4, device=device, requires_grad=True)
    op = torch.nn.functional.conv_transpose2d if transposed else torch.nn.functional.conv2d
    expected = torch.stack([op(x[k], weight[k], stride=2, padding=1) for k in range(5)])  # (K, B, Cout, H', W')
    blocked = fu.block_diagonal_convolution(transposed, x, weight, 2, 1, block)  # (B, K, Cout, H', W')
    torch.testing.assert_close(blocked.transpose(0, 1), expected, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(blocked.transpose(0, 1), (x, weight), grad_out),
                               torch.autograd.grad(expected, (x, weight), grad_out), atol=1e-4, rtol=1e-5)


class ConvolutionGroups(torch.utils._python_dispatch.TorchDispatchMode):
    """The groups of every convolution run, by (transposed, number of input channels)."""

    def __init__(self):
        super().__init__()
        self.groups = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.groups.setdefault((args[6], args[0].shape[1]), set()).add(args[8])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("form,block,clients,thin_groups", [  # clients: in a thin convolution's input
    ("grouped", 2, 5, 5), ("block", 2, 6, 3), ("block", 10, 5, 1), ("auto", 10, 5, 1), ("loop", 2, 1, 1)])
def test_conv_forms_change_only_the_thin_convolutions_and_train_the_clients_alike(mnist_small, tiny_config, form,
                                                                                   block, clients, thin_groups):
    """D's first and G's last layer (2 and 1 channels a client) take the form asked for; the wider ones stay vmap's
    grouped convolutions (groups=K)."""
    images, labels = mnist_small
    config = with_engine(tiny_config(num_clients=5, device="cpu"), client_map="vmap")
    grouped = train_tiny(with_engine(config, conv_form="grouped"), images, labels)
    with ConvolutionGroups() as seen:
        result = train_tiny(with_engine(config, conv_form=form, conv_block_clients=block), images, labels)
    assert seen.groups[False, 2 * clients] == seen.groups[True, 8 * clients] == {thin_groups}  # D1 2->8, G3 8->1
    assert seen.groups[False, 8 * 5] == seen.groups[True, 16 * 5] == {5}  # D2 8->16, G2 16->8
    torch.testing.assert_close(result.d_loss, grouped.d_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.g_loss, grouped.g_loss, atol=1e-5, rtol=1e-5)
    assert_states_close(result.g_state, grouped.g_state)
    assert_states_close(result.d_state, grouped.d_state)


@pytest.mark.parametrize("clients,overrides,thin_groups", [
    (5, {}, 1), (10, {}, 1),  # float32, deterministic cuDNN, up to 10 clients: one block-diagonal convolution
    (12, {}, 12), (5, {"bfloat16": True}, 5), (5, {"deterministic": False}, 5), (1, {}, 1)])  # else groups=K
def test_auto_conv_form_blocks_the_thin_convolutions_only_where_it_was_measured_faster(mnist_small, tiny_config,
                                                                                       clients, overrides, thin_groups):
    images, labels = mnist_small
    with ConvolutionGroups() as seen:
        train_tiny(with_engine(tiny_config(num_clients=clients, device="cpu"), client_map="vmap", **overrides), images,
                   labels)
    assert seen.groups[False, 2 * clients] == {thin_groups}  # D's first layer


class CudnnFlagsAtConvolutions(torch.utils._python_dispatch.TorchDispatchMode):
    """cuDNN's (deterministic, benchmark) flags as each convolution and its backward run."""

    def __init__(self):
        super().__init__()
        self.flags = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default):
            self.flags.add((torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("deterministic", [True, False])
def test_local_training_sets_cudnns_algorithm_choice_for_its_convolutions_and_restores_it(mnist_small, tiny_config,
                                                                                          deterministic):
    images, labels = mnist_small
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = not deterministic, deterministic  # the other way round, to be undone
    try:
        with CudnnFlagsAtConvolutions() as seen:
            train_tiny(with_engine(tiny_config(), deterministic=deterministic), images, labels)
        assert seen.flags == {(deterministic, not deterministic)}  # forward and backward alike
        assert (cudnn.deterministic, cudnn.benchmark) == (not deterministic, deterministic)
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


def test_bfloat16_compute_runs_convolutions_in_bf16_and_batch_norm_in_float32_also_under_vmap():
    conv, norm = torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False)
    x = torch.randn(3, 5, 2, 8, 8)  # (K, B, C, H, W)

    def layers(x):
        convolved = conv(x)
        return convolved, norm(convolved)
    with fu.BFloat16Compute():
        for convolved, normed in (layers(x[0]), torch.func.vmap(layers)(x)):
            assert convolved.dtype == torch.bfloat16 and normed.dtype == torch.float32
    assert conv(x[0]).dtype == torch.float32  # only inside the mode
    assert conv.weight.dtype == torch.float32


def test_flat_params_are_views_of_one_tensor_and_flatten_and_split_round_trip(tiny_config):
    config = tiny_config()
    generator, _ = fu.build_models(config)
    stacked = fu.broadcast(generator.state_dict(), 3)
    flat = fu.FlatParams(generator, stacked)
    names = [n for n, _ in generator.named_parameters()]
    assert list(flat.params) == names and flat.flat.shape == (3, sum(p.numel() for p in generator.parameters()))
    for name in names:
        assert torch.equal(flat.params[name], stacked[name])
    with torch.no_grad():
        flat.flat.add_(1.0)  # the optimizer writes the flat tensor; the layers see it through the views
    assert all(torch.equal(flat.params[n], stacked[n] + 1) for n in names)
    moments = {n: torch.randn_like(stacked[n]) for n in names}  # an Adam moment by parameter, as torch keeps it
    back = flat.split(flat.flatten(moments))  # the stacked Adam state's columns are FlatParams' order
    assert list(back) == names and all(torch.equal(back[n], moments[n]) for n in names)
