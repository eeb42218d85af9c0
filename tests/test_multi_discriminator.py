"""The layouts with one G at the server and a D a client (fedgan/multi_discriminator.py): each paper's defining
computation on a hand-made case, the stacked clients against the per-client reference, MD-GAN's swaps, bytes,
checkpoints and resume."""
import dataclasses
import math

import numpy as np
import pytest
import torch

import fedgan_utils as fu
from conftest import with_engine
from fedgan.multi_discriminator import (
    feedback_surrogate, forgiving_logits, forgiving_mixture, label_shares, step_bytes, swap_permutation,
    universal_logits)

LAYOUTS = ("md_gan", "ua_gan", "f2u", "f2a")


def test_ua_gans_universal_odds_are_the_label_share_weighted_odds():
    # D_1 = 0.5 (odds 1) and D_2 = 0.75 (odds 3) with shares 0.25 and 0.75: odds_u = 0.25 + 2.25 = 2.5
    logits = torch.tensor([[0.0, 5.0], [math.log(3.0), -1.0]])
    shares = torch.tensor([[0.25, 0.0], [0.75, 1.0]])  # the second label only the second client holds
    universal = universal_logits(logits, shares)
    torch.testing.assert_close(universal, torch.tensor([math.log(2.5), -1.0]))
    shares = label_shares(np.array([[3, 0], [1, 2]]), torch.tensor([0, 1, 0]))
    torch.testing.assert_close(shares, torch.tensor([[0.75, 0.0, 0.75], [0.25, 1.0, 0.25]]))


def test_f2u_takes_the_most_forgiving_discriminator_per_sample_and_f2a_a_softmax_of_them():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]], requires_grad=True)
    torch.testing.assert_close(forgiving_logits(logits), torch.tensor([1.0, 2.0]))
    forgiving_logits(logits).sum().backward()
    assert logits.grad.tolist() == [[0.0, 1.0], [1.0, 0.0]]  # G learns from the forgiving D of each sample only
    probs = torch.sigmoid(logits.detach())
    torch.testing.assert_close(forgiving_mixture(logits.detach(), 0.0), probs.mean(0))  # lambda = 0: the mean
    lam = 3.0  # by hand: weights exp(lam p_k) / sum_j exp(lam p_j)
    weights = torch.exp(lam * probs) / torch.exp(lam * probs).sum(0)
    torch.testing.assert_close(forgiving_mixture(logits.detach(), lam), (weights * probs).sum(0))
    torch.testing.assert_close(forgiving_mixture(logits.detach(), 1e4), probs.amax(0))  # lambda -> inf: F2U


def test_md_gans_feedback_surrogate_steps_g_on_the_mean_of_the_clients_gradients():
    # G(z) = W z; client k's G loss sum(a_k * x_k) has feedback F_k = a_k at its images x_k
    torch.manual_seed(0)
    weight = torch.randn(3, 2, requires_grad=True)
    z = torch.randn(2, 4, 2)  # (K, B, z)
    a = torch.randn(2, 4, 3)  # (K, B, out)
    fakes = z @ weight.T  # (K, B, out)
    (surrogate_grad,) = torch.autograd.grad(feedback_surrogate(fakes, a), weight)
    (direct_grad,) = torch.autograd.grad(((z @ weight.T) * a).sum((1, 2)).mean(), weight)
    torch.testing.assert_close(surrogate_grad, direct_grad)
    expected = sum(a[k].T @ z[k] for k in range(2)) / 2  # the mean over clients of J_k^T F_k, by hand
    torch.testing.assert_close(surrogate_grad, expected)


def test_swaps_are_seeded_permutations_and_bytes_are_counted_per_step():
    first = swap_permutation(5, seed=1, round_index=1)
    assert sorted(first.tolist()) == list(range(5)) and (first == swap_permutation(5, 1, 1)).all()
    assert any((swap_permutation(5, 1, r) != first).any() for r in range(2, 6))
    # B = 2 images of 1 x 2 x 2 floats: an image batch 32 bytes, labels 16, scores 8
    assert step_bytes("md_gan", 2, (1, 2, 2)) == (16 + 32, 32)
    assert step_bytes("ua_gan", 2, (1, 2, 2)) == (16 + 8 + 32, 2 * 32 + 16 + 8)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stacked_discriminators_match_the_per_client_reference(mnist_small, tiny_config, layout):
    # unequal clients (quantity skew): after the shortest is done it sits out; Adam states kept for f2u
    config = tiny_config(gan_layout=layout, partition="quantity", sigma=1.0, min_size=20, local_steps=None,
                         local_epochs=0.1, optimizer_state="keep" if layout == "f2u" else "reset")
    reference = fu.Federation(with_engine(dataclasses.replace(config, run_name="ref"), client_map="reference"),
                              data=mnist_small, log=False).run(progress=False)
    assert len(set(fu.plan_round(config, reference.parts, 1).steps.tolist())) > 1
    for client_map in ("loop", "vmap"):
        engine = fu.Federation(with_engine(dataclasses.replace(config, run_name=client_map), client_map=client_map),
                               data=mnist_small, log=False).run(progress=False)
        for record, expected in zip(engine.history, reference.history):
            assert record["clients"] == expected["clients"] and record["bytes_up"] == expected["bytes_up"]
            np.testing.assert_allclose(record["d_loss_clients"], expected["d_loss_clients"], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(record["g_loss_clients"], expected["g_loss_clients"], rtol=1e-4, atol=1e-5)
            assert record["server_g_loss"] == pytest.approx(expected["server_g_loss"], rel=1e-4)
        states = engine.generator.state_dict(), reference.generator.state_dict()
        for key in states[1]:
            torch.testing.assert_close(states[0][key], states[1][key], atol=2e-5, rtol=1e-4, msg=key)
        for key, value in reference.multi_d.d_state.items():  # every client's own D
            torch.testing.assert_close(engine.multi_d.d_state[key], value, atol=2e-5, rtol=1e-4, msg=key)
        if config.optimizer_state == "keep":
            torch.testing.assert_close(engine.multi_d.d_opt["exp_avg_sq"], reference.multi_d.d_opt["exp_avg_sq"],
                                       atol=1e-9, rtol=1e-3)
    d_state = reference.multi_d.d_state
    first = {k: v[0] for k, v in d_state.items()}
    assert any(not torch.equal(first[k], d_state[k][1]) for k in first)  # nothing averaged: the Ds differ


def test_md_gan_swaps_the_trained_discriminators_among_the_clients(mnist_small, tiny_config):
    runs = {}
    for swap in (None, 1):
        config = tiny_config(gan_layout="md_gan", rounds=1, swap_every=swap, run_name=f"swap{swap}")
        runs[swap] = fu.Federation(config, data=mnist_small, log=False).run(progress=False)
    order = torch.as_tensor(swap_permutation(3, runs[1].config.seed, 1))
    assert (order != torch.arange(3)).any()
    for key, value in runs[None].multi_d.d_state.items():
        assert torch.equal(runs[1].multi_d.d_state[key], value[order]), key
    d_bytes = sum(v.numel() * v.element_size() for v in runs[1].discriminator.state_dict().values())
    swapped, plain = runs[1].history[0], runs[None].history[0]
    assert swapped["swapped"] and "swapped" not in plain
    assert swapped["bytes_up"] - plain["bytes_up"] == swapped["bytes_down"] - plain["bytes_down"] == 3 * d_bytes
    up, down = step_bytes("md_gan", 8, (1, 28, 28))
    assert plain["bytes_up"] == up * 9 and plain["bytes_down"] == down * 9  # 3 clients, 3 steps each


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_resumed_run_computes_exactly_what_a_straight_one_does(mnist_small, tiny_config, layout):
    # with selection (2 of 3 a round), a deadline that cuts a slow client short and a label-flipping attacker
    config = tiny_config(gan_layout=layout, rounds=3, client_fraction=0.67, client_speed_sigma=1.0, round_deadline=2,
                         attack="label_flip", attack_fraction=0.34, optimizer_state="keep")
    straight = fu.Federation(config, data=mnist_small, log=False).run(progress=False)
    assert any(record["late"] for record in straight.history)
    parts = dataclasses.replace(config, run_name="parts")
    fu.Federation(dataclasses.replace(parts, rounds=1), data=mnist_small, log=False).run(progress=False)
    resumed = fu.Federation(parts, data=mnist_small, log=False, resume=True).run(progress=False)
    assert [r["clients"] for r in resumed.history] == [r["clients"] for r in straight.history]
    for key, value in straight.generator.state_dict().items():
        assert torch.equal(resumed.generator.state_dict()[key], value), key
    for key, value in straight.multi_d.d_state.items():
        assert torch.equal(resumed.multi_d.d_state[key], value), key
    if layout == "f2a":
        assert resumed.history[-1]["temperature"] == straight.history[-1]["temperature"] != 1.0
