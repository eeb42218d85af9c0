"""Custom sync strategies: FedProx, damped and thresholded updates, FedNova, staleness, compression,
client selection, stragglers, G/D-only sync, asynchronous buffered aggregation and strategy objects."""
import dataclasses
import math

import numpy as np
import pytest
import torch

import fedgan_utils as fu
from conftest import with_engine


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stacked(*rows):
    return {"w": torch.tensor(rows, dtype=torch.float64)}


# -- server rules on hand-made inputs ------------------------------------------------------------

def test_damped_update_is_one_minus_alpha_global_plus_alpha_average():
    strategy = fu.make_strategy(fu.FedConfig(strategy="damped", server_lr=0.25), buffer_keys={"running_mean"})
    global_state = {"w": torch.tensor([4.0, 0.0]), "running_mean": torch.tensor([0.0])}
    clients = {"w": torch.tensor([[0.0, 2.0], [2.0, 6.0]]), "running_mean": torch.tensor([[1.0], [3.0]])}
    result = strategy.aggregate(global_state, clients, [1, 1])
    average = torch.tensor([1.0, 4.0])
    torch.testing.assert_close(result["w"], 0.75 * global_state["w"] + 0.25 * average)
    torch.testing.assert_close(result["running_mean"], torch.tensor([2.0]))  # buffers: plain average
    again = strategy.aggregate(result, clients, [1, 1])  # no momentum: the same rule every round
    torch.testing.assert_close(again["w"], 0.75 * result["w"] + 0.25 * average)


def test_threshold_clips_updates_above_an_absolute_norm_and_logs_how_many():
    strategy = fu.Thresholded(fu.FedAvg(), 3.0, rule="absolute", action="clip")
    global_state = {"w": torch.zeros(2, dtype=torch.float64)}
    clients = stacked([1.0, 0.0], [0.0, 2.0], [6.0, 8.0])  # update norms 1, 2, 10
    result = strategy.aggregate(global_state, clients, [1, 1, 1])
    clipped = torch.tensor([1.8, 2.4], dtype=torch.float64)  # (6, 8) scaled to norm 3
    expected = (torch.tensor([1.0, 0.0]) + torch.tensor([0.0, 2.0]) + clipped) / 3
    torch.testing.assert_close(result["w"], expected.double())
    assert strategy.last_log["clipped"] == 1 and strategy.last_log["threshold"] == 3.0


def test_threshold_relative_to_the_median_drops_outliers_with_their_weights():
    strategy = fu.Thresholded(fu.FedAvg(), 2.0, rule="median", action="drop")
    global_state = {"w": torch.ones(1, dtype=torch.float64)}
    clients = stacked([2.0], [3.0], [0.0], [101.0])  # update norms 1, 2, 1, 100; median 1.5 -> limit 3
    result = strategy.aggregate(global_state, clients, [1, 2, 3, 4])
    torch.testing.assert_close(result["w"], torch.tensor([(2.0 * 1 + 3.0 * 2 + 0.0 * 3) / 6], dtype=torch.float64))
    assert strategy.last_log["dropped"] == 1 and strategy.last_log["threshold"] == pytest.approx(3.0)
    everyone_over = fu.Thresholded(fu.FedAvg(), 0.5, rule="absolute", action="drop")
    kept = everyone_over.aggregate(global_state, clients, [1, 1, 1, 1])
    assert torch.equal(kept["w"], global_state["w"])  # nothing left: the global state stays


def test_fednova_normalises_updates_by_local_steps():
    global_state = {"w": torch.zeros(1, dtype=torch.float64)}
    clients = stacked([2.0], [10.0])  # client 0 ran 2 steps, client 1 ran 10
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


# -- compression -----------------------------------------------------------------------------------

def test_topk_sends_the_largest_coordinates_of_the_whole_update():
    update = {"a": torch.tensor([[0.1, -5.0, 0.2]]), "b": torch.tensor([[3.0, -0.3]]), "n": torch.tensor([[7]])}
    sent, nbytes = fu.compress_updates(update, "topk", fraction=0.4)  # 2 of 5 coordinates
    assert torch.equal(sent["a"], torch.tensor([[0.0, -5.0, 0.0]]))
    assert torch.equal(sent["b"], torch.tensor([[3.0, 0.0]]))
    assert torch.equal(sent["n"], update["n"]) and nbytes == 2 * 8 + 8  # two (value, index) pairs + the counter


def test_int8_quantisation_error_is_at_most_half_a_level():
    update = {"w": torch.randn(3, 50, generator=torch.Generator().manual_seed(0))}
    sent, nbytes = fu.compress_updates(update, "int8")
    level = update["w"].abs().amax(1, keepdim=True) / 127  # (3, 1)
    assert ((sent["w"] - update["w"]).abs() <= level / 2 + 1e-7).all()
    assert nbytes == 50 + 4


def test_error_feedback_reconstructs_the_sum_of_updates_over_rounds():
    rng = torch.Generator().manual_seed(1)
    residual = torch.zeros(1, 40)
    total_sent, total_update = torch.zeros(1, 40), torch.zeros(1, 40)
    for _ in range(25):
        update = torch.randn(1, 40, generator=rng)
        intended = update + residual
        sent = fu.compress_updates({"w": intended}, "topk", fraction=0.1)[0]["w"]
        residual = intended - sent
        total_sent += sent
        total_update += update
    torch.testing.assert_close(total_sent + residual, total_update, atol=1e-5, rtol=1e-5)
    assert residual.norm() < 0.5 * total_update.norm()  # what is still owed stays bounded


def test_federation_with_compression_counts_bytes_and_keeps_residuals(mnist_small, tiny_config):
    federation = fu.Federation(tiny_config(compression="topk", topk_fraction=0.05), data=mnist_small, log=False)
    dense = fu.Federation(tiny_config(checkpoint_dir=str(federation.run_dir) + "-dense"), data=mnist_small, log=False)
    record, dense_record = federation.run_round(), dense.run_round()
    assert record["bytes_down"] == dense_record["bytes_down"] == dense_record["bytes_up"]
    assert record["bytes_up"] < 0.15 * dense_record["bytes_up"]
    residual = federation.client_store[0]["g_residual"]
    assert set(residual) <= set(federation.generator.state_dict()) and any(v.abs().sum() > 0 for v in residual.values())


# -- selection, stragglers, dropout --------------------------------------------------------------------

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


def test_a_round_where_nobody_reports_keeps_the_global_models(mnist_small, tiny_config):
    config = tiny_config(client_speed_sigma=1.0, round_deadline=1e-3, straggler_policy="drop", rounds=1)
    federation = fu.Federation(config, data=mnist_small, log=False)
    before = {k: v.clone() for k, v in federation.generator.state_dict().items()}
    record = federation.run_round()
    assert record["clients"] == [] and math.isnan(record["d_loss"]) and record["late"] == [0, 1, 2]
    assert states_equal(federation.generator.state_dict(), before)


# -- which networks are synchronised ------------------------------------------------------------------

def test_sync_d_only_keeps_each_clients_generator_local(mnist_small, tiny_config):
    federation = fu.Federation(tiny_config(sync_networks="d"), data=mnist_small, log=False)
    d_bytes = sum(v.numel() * v.element_size() for v in federation.discriminator.state_dict().values())
    first = federation.run_round()
    assert first["bytes_down"] == 3 * d_bytes and first["bytes_up"] == 3 * d_bytes
    own = [federation.client_store[c]["g_local"] for c in range(3)]
    assert not states_equal(own[0], own[1])  # each client trains its own generator
    plan = fu.plan_round(federation.config, federation.parts, 2)
    start = federation._client_start("g", federation.generator, plan)
    for row in range(3):
        assert states_equal({k: v[row] for k, v in start.items()}, own[row])


# -- asynchronous, buffered aggregation -------------------------------------------------------------------

def test_async_with_everyone_in_one_buffer_and_no_staleness_is_synchronous_fedavg(mnist_small, tiny_config, tmp_path):
    sync = fu.run_federation(tiny_config(checkpoint_dir=str(tmp_path / "s")), data=mnist_small, progress=False)
    asynchronous = fu.run_federation(tiny_config(sync_mode="async", async_buffer=3, staleness="constant",
                                                 checkpoint_dir=str(tmp_path / "a")), data=mnist_small, progress=False)
    assert [r["staleness"] for r in asynchronous.history] == [[0.0] * 3, [0.0] * 3]
    assert [r["d_loss"] for r in asynchronous.history] == [r["d_loss"] for r in sync.history]
    assert states_equal(asynchronous.generator.state_dict(), sync.generator.state_dict())


def test_async_applies_stale_updates_weighted_and_resumes_exactly(mnist_small, tiny_config, tmp_path):
    config = dict(num_clients=4, sync_mode="async", async_buffer=1, client_speed_sigma=1.0, rounds=5)
    straight = fu.run_federation(tiny_config(**config, checkpoint_dir=str(tmp_path / "a")), data=mnist_small,
                                 progress=False)
    staleness = [s for r in straight.history for s in r["staleness"]]
    assert max(staleness) >= 1 and all(len(r["clients"]) == 1 for r in straight.history)
    assert all(r["sim_time"] >= 0 for r in straight.history) and len(straight.in_flight) == 3
    fu.run_federation(tiny_config(**{**config, "rounds": 2}, checkpoint_dir=str(tmp_path / "b")), data=mnist_small,
                      progress=False)
    resumed = fu.run_federation(tiny_config(**config, checkpoint_dir=str(tmp_path / "b")), data=mnist_small,
                                resume=True, progress=False)
    assert [r["staleness"] for r in resumed.history] == [r["staleness"] for r in straight.history]
    assert states_equal(resumed.generator.state_dict(), straight.generator.state_dict())
    # buffers travel as values, not stale differences: running variances stay >= 0 and samples finite
    assert all((v >= 0).all() for k, v in straight.generator.state_dict().items() if k.endswith("running_var"))
    assert torch.isfinite(straight.sample_grid()).all()


# -- strategies as objects --------------------------------------------------------------------------------

class BestHalf(fu.Strategy):
    """A custom rule as the notebook writes one: FedAvg of the clients whose update is no larger than the median."""

    def aggregate(self, global_state, client_states, weights, info=None):
        keys = [k for k, v in client_states.items() if v.dtype.is_floating_point]
        norms = fu.update_norms(global_state, client_states, keys)
        keep = norms <= norms.median()
        self.last_log = {"kept": int(keep.sum())}
        return fu.fedavg_stacked({k: v[keep] for k, v in client_states.items()}, np.asarray(weights)[keep.numpy()])


def test_a_custom_strategy_object_plugs_into_the_federation(mnist_small, tiny_config):
    federation = fu.Federation(tiny_config(rounds=1), data=mnist_small, log=False, strategy=BestHalf())
    assert federation.strategy_name == "BestHalf"
    assert federation.strategies["g"] is not federation.strategies["d"]
    assert federation.strategies["g"].buffer_keys == {n for n, _ in federation.generator.named_buffers()}
    record = federation.run_round()
    assert record["server"]["g"] == {"kept": 2} and record["server"]["d"] == {"kept": 2}
    with pytest.raises(TypeError, match="strategy must be a Strategy"):
        fu.Federation(tiny_config(), data=mnist_small, strategy="median")


def test_threshold_set_in_the_config_wraps_the_named_strategy(tiny_config):
    strategy = fu.make_strategy(tiny_config(strategy="fedadam", update_threshold=2.0, threshold_action="drop"))
    assert isinstance(strategy, fu.Thresholded) and isinstance(strategy.inner, fu.ServerOptimizer)
    assert strategy.inner.kind == "fedadam" and strategy.action == "drop"


def test_run_ablation_gives_a_row_a_cell_and_keeps_going_past_a_diverged_cell(mnist_small, tiny_config):
    base = tiny_config(rounds=3, eval_samples=50, classifier_epochs=1, classifier_subset=500, run_name="grid")
    cells = {"plain": {}, "custom rule": {"strategy": BestHalf(), "partition": "dirichlet", "alpha": 0.5},
             "collapsing": {"collapse_loss": 100.0, "watchdog_rounds": 2}}
    rows, runs = fu.run_ablation(base, cells, data=mnist_small, log=False)
    assert [r["cell"] for r in rows] == list(cells) and list(runs) == list(cells)
    assert rows[1]["strategy"] == "BestHalf" and rows[1]["partition"] == "dirichlet(0.5)"
    assert rows[0]["images"] == 3 * 3 * 3 * 8 and rows[0]["MB"] > 0 and np.isfinite(rows[0]["fid"])
    assert "stopped" not in rows[0] and rows[2]["stopped"].startswith("round 2: the discriminator loss")
    assert runs["plain"].evaluator is runs["custom rule"].evaluator  # one metric classifier for the grid
    assert runs["plain"].run_dir.name == "grid-plain" and runs["custom rule"].run_dir.name == "grid-custom-rule"


def test_run_seeds_reuses_the_grids_rows_reruns_the_rest_on_its_classifier_and_summarises(mnist_small, tiny_config):
    base = tiny_config(rounds=2, eval_samples=50, classifier_epochs=1, classifier_subset=500, run_name="seeds")
    cells = {"plain": {}, "skewed": {"partition": "dirichlet", "alpha": 0.5}}
    grid_rows, grid_runs = fu.run_ablation(base, cells, data=mnist_small, log=False)
    evaluator = grid_runs["plain"].evaluator
    rows, summary = fu.run_seeds(base, cells, (0, 1), data=mnist_small, evaluator=evaluator,
                                 known={"plain": grid_rows[0]}, log=False)
    assert [(r["cell"], r["seed"]) for r in rows] == [("plain | seed 0", 0), ("plain | seed 1", 1),
                                                      ("skewed | seed 0", 0), ("skewed | seed 1", 1)]
    assert rows[0]["fid"] == grid_rows[0]["fid"]  # reused
    assert rows[2]["fid"] == grid_rows[1]["fid"] and rows[2]["cond_acc"] == grid_rows[1]["cond_acc"]  # rerun, same
    assert rows[1]["fid"] != rows[0]["fid"]  # another seed, another run
    assert [s["cell"] for s in summary] == list(cells) and summary[0]["seeds"] == 2
    for line, pair in zip(summary, (rows[:2], rows[2:])):
        fids = np.array([r["fid"] for r in pair])
        assert line["fid@0"] == fids[0] and line["fid@1"] == fids[1]
        assert math.isclose(line["fid_mean"], fids.mean())
        assert math.isclose(line["fid_sd"], abs(fids[1] - fids[0]) / 2 ** 0.5)  # sample sd of two values
        assert math.isclose(line["cond_acc_mean"], (pair[0]["cond_acc"] + pair[1]["cond_acc"]) / 2)
    with pytest.raises(ValueError, match="seeds"):
        fu.run_seeds(base, cells, (0,), data=mnist_small, evaluator=evaluator)
    with pytest.raises(ValueError, match="evaluator"):
        fu.run_seeds(base, cells, (0, 1), data=mnist_small, known={"plain": grid_rows[0]})
