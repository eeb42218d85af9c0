"""Stacked client state (fedgan/engine/stacked.py): the stacked Adam, flat parameters, map_clients."""
import torch

import fedgan_utils as fu


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
