"""Planning a round (fedgan/rounds.py): selection, batches, stragglers, dropout."""
import numpy as np
import pytest
import torch

import fedgan_utils as fu


def test_selection_frequencies_uniform_and_proportional():
    counts = np.zeros(10)
    for r in range(1, 3001):
        counts[fu.select_clients(10, 0.3, seed=0, round_index=r)] += 1
    np.testing.assert_allclose(counts / 3000, 0.3, atol=0.03)
    sizes = np.arange(1, 11) * 10
    counts = np.zeros(10)
    for r in range(1, 5001):
        counts[fu.select_clients(10, 0.1, seed=0, round_index=r, policy="proportional", sizes=sizes)] += 1
    np.testing.assert_allclose(counts / 5000, sizes / sizes.sum(), atol=0.015)


def test_power_of_choice_picks_the_highest_loss_candidates():
    sizes, losses = [10] * 10, {c: float(c) for c in range(10)}
    counts = np.zeros(10)
    for r in range(1, 2001):
        chosen = fu.select_clients(10, 0.2, seed=3, round_index=r, policy="power_of_choice", sizes=sizes,
                                   losses=losses, candidates=4)
        counts[chosen] += 1
        assert len(chosen) == 2
    assert counts[9] > counts[5] > counts[1]  # loss-aware: higher loss, chosen more often
    assert counts[0] == 0  # the lowest loss of any 4 candidates is never in the top 2
    never_seen = fu.select_clients(10, 0.1, seed=0, round_index=1, policy="power_of_choice", sizes=sizes,
                                   losses={c: 1.0 for c in range(9)}, candidates=10)
    assert never_seen.tolist() == [9]  # a client without a loss yet is explored first


def test_deadline_cuts_slow_clients_to_the_steps_that_fit_or_drops_them(tiny_config):
    parts = fu.partition(np.arange(400) % 10, 8, "iid", seed=0)
    config = tiny_config(num_clients=8, local_steps=10, client_speed_sigma=1.0, round_deadline=8.0)
    speeds = fu.client_speeds(8, 1.0, config.seed)
    plan = fu.plan_round(config, parts, 1)
    expected = np.minimum(10, np.maximum(1, np.floor(8.0 * speeds))).astype(int)
    assert plan.steps.tolist() == expected.tolist()
    assert plan.late == [c for c in range(8) if 10 / speeds[c] > 8.0] and plan.late
    assert plan.sim_time <= 8.0 + 1e-9 or expected.min() == 1
    dropping = fu.plan_round(tiny_config(num_clients=8, local_steps=10, client_speed_sigma=1.0, round_deadline=8.0,
                                         straggler_policy="drop"), parts, 1)
    assert dropping.client_ids.tolist() == [c for c in range(8) if c not in plan.late]
    assert (dropping.steps == 10).all()
    waiting = fu.plan_round(tiny_config(num_clients=8, local_steps=10, client_speed_sigma=1.0), parts, 1)
    assert waiting.sim_time == pytest.approx((10 / speeds).max()) and waiting.late == []


def test_dropout_leaves_out_about_that_share_of_the_selected_clients(tiny_config):
    parts = fu.partition(np.arange(400) % 10, 10, "iid", seed=0)
    config = tiny_config(num_clients=10, dropout=0.3)
    dropped = [len(fu.plan_round(config, parts, r).dropped_out) for r in range(1, 401)]
    assert np.mean(dropped) / 10 == pytest.approx(0.3, abs=0.03)


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


def test_stratified_selection_takes_one_client_of_each_group_in_turn():
    groups = [0, 0, 0, 0, 0, 0, 0, 1, 2, 3]  # seven clients of one dominant label, three of their own
    counts = np.zeros(10)
    for r in range(1, 4001):
        chosen = fu.select_clients(10, 0.4, seed=0, round_index=r, policy="stratified", groups=groups)
        assert sorted(np.asarray(groups)[chosen].tolist()) == [0, 1, 2, 3]  # every group, once, every round
        counts[chosen] += 1
    np.testing.assert_allclose(counts[:7] / 4000, 1 / 7, atol=0.02)  # the big group's one seat, shared evenly
    counts = np.zeros(10)
    for r in range(1, 4001):  # two seats for four groups: each group half the rounds, whatever its size
        chosen = fu.select_clients(10, 0.2, seed=1, round_index=r, policy="stratified", groups=groups)
        assert len(set(np.asarray(groups)[chosen].tolist())) == 2
        counts[chosen] += 1
    np.testing.assert_allclose(counts[7:] / 4000, 0.5, atol=0.03)
    np.testing.assert_allclose(counts[:7].sum() / 4000, 0.5, atol=0.03)
    # more seats than groups: the turn comes round again, past the groups with no one left
    for r in range(1, 50):
        chosen = fu.select_clients(4, 0.75, seed=2, round_index=r, policy="stratified", groups=[0, 0, 0, 1])
        assert 3 in chosen.tolist() and len(chosen) == 3
    with pytest.raises(ValueError, match=r"groups=None is not allowed: one group per client for policy='stratified'"):
        fu.select_clients(10, 0.2, seed=0, round_index=1, policy="stratified")


def test_a_federation_selects_stratified_by_each_clients_dominant_label(mnist_small, tiny_config):
    config = tiny_config(num_clients=10, partition="classes", classes_per_client=1, client_fraction=0.5,
                         selection="stratified", rounds=1)
    federation = fu.Federation(config, data=mnist_small, log=False)
    expected = [int(np.bincount(mnist_small[1][p].numpy(), minlength=10).argmax()) for p in federation.parts]
    assert federation.groups.tolist() == expected
    record = federation.run_round()
    assert len(set(federation.groups[record["clients"]].tolist())) == len(record["clients"]) == 5
