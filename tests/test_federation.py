"""Federation and run_federation: history, determinism, resume, run folders, BN and optimizer policies, what
clients send, G- or D-only sync, asynchrony, and strategy objects."""
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fedgan_utils as fu
from helpers import BestHalf, states_equal


def test_run_federation_returns_models_and_a_history_per_round(mnist_small, tiny_config):
    federation = fu.run_federation(tiny_config(), data=mnist_small, progress=False)
    assert isinstance(federation.generator, fu.Generator) and isinstance(federation.discriminator, fu.Discriminator)
    assert [r["round"] for r in federation.history] == [1, 2]
    record = federation.history[-1]
    assert record["clients"] == [0, 1, 2] and len(record["d_loss_clients"]) == 3
    assert record["images"] == 3 * 3 * 8 and record["images_total"] == 2 * 72
    assert np.isfinite([record["d_loss"], record["g_loss"]]).all() and record["seconds"] > 0
    assert sorted(federation.grid_snapshots) == [0, 1, 2]
    assert federation.grid_snapshots[2].shape == (100, 1, 28, 28)


def test_same_seed_same_result_and_another_seed_another(mnist_small, tiny_config, tmp_path):
    runs = [fu.run_federation(tiny_config(seed=s, checkpoint_dir=str(tmp_path / f"c{i}")), data=mnist_small,
                              progress=False) for i, s in enumerate((0, 0, 1))]
    assert [r["d_loss"] for r in runs[0].history] == [r["d_loss"] for r in runs[1].history]
    assert states_equal(runs[0].generator.state_dict(), runs[1].generator.state_dict())
    assert not states_equal(runs[0].generator.state_dict(), runs[2].generator.state_dict())


RESUMED = {  # a run stopped after round 1 and resumed equals a straight one, with each of these
    "plain": {},
    "FedAdam": dict(strategy="fedadam", num_clients=4),  # with the server rule's state
    "trimmed mean": dict(strategy="trimmed_mean", num_clients=4, trim_beta=0.25),
    "spectral + noise": dict(d_norm="spectral", instance_noise=0.2),  # the power iteration's vectors: buffers of D
    "projection + hinge": dict(d_conditioning="projection", gan_loss="hinge"),
    "smoothing, Adam kept": dict(label_smoothing=0.1, optimizer_state="keep"),
}


@pytest.mark.parametrize("options", list(RESUMED.values()), ids=list(RESUMED))
def test_resume_continues_exactly_where_the_first_run_stopped(mnist_small, tiny_config, tmp_path, options):
    straight = fu.run_federation(tiny_config(rounds=3, checkpoint_dir=str(tmp_path / "a"), **options),
                                 data=mnist_small, progress=False)
    fu.Federation(tiny_config(rounds=3, checkpoint_dir=str(tmp_path / "b"), **options), data=mnist_small,
                  log=False).run(rounds=1, progress=False)  # stopped after round 1
    resumed = fu.run_federation(tiny_config(rounds=3, checkpoint_dir=str(tmp_path / "b"), **options),
                                data=mnist_small, resume=True, progress=False)
    assert [r["round"] for r in resumed.history] == [1, 2, 3]
    assert [r["g_loss"] for r in resumed.history] == [r["g_loss"] for r in straight.history]
    assert states_equal(resumed.generator.state_dict(), straight.generator.state_dict())
    assert states_equal(resumed.discriminator.state_dict(), straight.discriminator.state_dict())
    assert (options.get("d_norm") == "spectral") == any(name.endswith(".u")
                                                         for name in straight.discriminator.state_dict())
    if options:  # and the option changed what was computed
        plain = fu.run_federation(tiny_config(rounds=3, checkpoint_dir=str(tmp_path / "c"),
                                              num_clients=options.get("num_clients", 3)), data=mnist_small,
                                  progress=False)
        assert not states_equal(plain.generator.state_dict(), straight.generator.state_dict())


def test_a_checkpoint_from_before_engine_options_and_flat_adam_states_resumes_exactly(mnist_small, tiny_config,
                                                                                      tmp_path):
    """Format 2: engine options as FedConfig fields (amp, client_map, ...) and kept Adam moments by parameter name."""
    config = tiny_config(rounds=3, optimizer_state="keep", checkpoint_dir=str(tmp_path / "a"))
    straight = fu.run_federation(config, data=mnist_small, progress=False)
    old = dataclasses.replace(config, rounds=1, checkpoint_dir=str(tmp_path / "b"))
    first = fu.run_federation(old, data=mnist_small, progress=False)
    path = fu.latest_checkpoint(first.run_dir)
    checkpoint = fu.load_checkpoint(path)
    values = json.loads(checkpoint["config"])
    engine = values.pop("engine")
    values.update(client_map=engine["client_map"], amp=engine["bfloat16"], cuda_graphs=engine["cuda_graphs"],
                  conv_form=engine["conv_form"], conv_block_clients=engine["conv_block_clients"],
                  deterministic=engine["deterministic"])
    for store in checkpoint["client_store"].values():
        for which, model in (("g_opt", first.generator), ("d_opt", first.discriminator)):
            flat = fu.FlatParams(model, {n: p.detach().unsqueeze(0) for n, p in model.named_parameters()})
            store[which] = {"step": store[which]["step"], **{m: {n: v[0] for n, v in flat.split(
                store[which][m].unsqueeze(0)).items()} for m in fu.ADAM_MOMENTS}}
    path.unlink()
    fu.checksum_path(path).unlink()
    fu.save_checkpoint(path, {**checkpoint, "format": 2, "config": json.dumps(values)})
    resumed = fu.run_federation(dataclasses.replace(old, rounds=3), data=mnist_small, resume=True, progress=False)
    assert [r["g_loss"] for r in resumed.history] == [r["g_loss"] for r in straight.history]
    assert states_equal(resumed.generator.state_dict(), straight.generator.state_dict())
    assert states_equal(resumed.client_store[0]["d_opt"], straight.client_store[0]["d_opt"])


def test_resume_refuses_a_changed_config(mnist_small, tiny_config):
    fu.run_federation(tiny_config(rounds=1), data=mnist_small, progress=False)
    with pytest.raises(ValueError, match=r"the config differs in \['lr_g'\]"):
        fu.Federation(tiny_config(rounds=2, lr_g=1e-3), data=mnist_small, resume=True)
    # instance noise anneals over the run's rounds: more rounds would move the noise of the rounds still to run
    fu.run_federation(tiny_config(rounds=1, instance_noise=0.1, run_name="noisy"), data=mnist_small, progress=False)
    with pytest.raises(ValueError, match=r"differs in \['rounds'\]; .*\(only device may change\)"):
        fu.Federation(tiny_config(rounds=2, instance_noise=0.1, run_name="noisy"), data=mnist_small, resume=True)


def test_a_fresh_run_never_overwrites_an_earlier_one(mnist_small, tiny_config):
    first = fu.run_federation(tiny_config(rounds=1), data=mnist_small, progress=False)
    saved = fu.list_checkpoints(first.run_dir)
    before = [p.read_bytes() for p in saved]
    second = fu.run_federation(tiny_config(rounds=1), data=mnist_small, progress=False)
    assert second.run_dir.name == first.run_dir.name + "-2"
    assert second.out_dir.name == second.run_dir.name
    assert [p.read_bytes() for p in saved] == before


def test_client_fraction_trains_a_subset_each_round(mnist_small, tiny_config):
    federation = fu.run_federation(tiny_config(num_clients=6, client_fraction=0.5, rounds=3), data=mnist_small,
                                   progress=False)
    chosen = [r["clients"] for r in federation.history]
    assert all(len(c) == 3 for c in chosen) and len({tuple(c) for c in chosen}) > 1


def test_local_batchnorm_stays_with_its_client(mnist_small, tiny_config):
    federation = fu.Federation(tiny_config(bn_policy="local"), data=mnist_small, log=False)
    federation.run_round()
    bn_keys = fu.norm_state_keys(federation.generator)
    own = [federation.client_store[c]["g_local"] for c in range(3)]
    assert set(own[0]) == bn_keys
    assert not torch.equal(own[0]["main.1.running_mean"], own[1]["main.1.running_mean"])
    average = fu.fedavg(own, [len(p) for p in federation.parts])  # the global BN is their average
    torch.testing.assert_close(federation.generator.state_dict()["main.1.running_mean"].cpu(),  # clients: CPU
                               average["main.1.running_mean"])
    plan = fu.plan_round(federation.config, federation.parts, 2)
    start = federation._client_start("g", federation.generator, plan)  # next round starts from its own BN
    torch.testing.assert_close(start["main.1.running_mean"][1].cpu(), own[1]["main.1.running_mean"])


def test_kept_optimizer_state_carries_each_clients_adam_across_rounds(mnist_small, tiny_config):
    federation = fu.Federation(tiny_config(optimizer_state="keep"), data=mnist_small, log=False)
    federation.run_round()
    federation.run_round()
    assert federation.client_store[0]["g_opt"]["step"].item() == 6.0  # 3 local steps in each of 2 rounds
    reset = fu.Federation(tiny_config(), data=mnist_small, log=False)
    reset.run_round()
    assert "g_opt" not in reset.client_store.get(0, {})


def test_a_config_object_is_required(mnist_small):
    with pytest.raises(TypeError, match="config must be a FedConfig, got dict"):
        fu.Federation({"num_clients": 3}, data=mnist_small)


def test_run_info_saves_the_environment_and_the_config(mnist_small, tiny_config):
    import json

    federation = fu.Federation(tiny_config(), data=mnist_small, log=False)
    report = federation.save_run_info()
    assert json.loads((federation.out_dir / "env.json").read_text()) == report
    assert fu.FedConfig.from_json((federation.out_dir / "config.json").read_text()) == federation.config


def test_a_run_whose_output_folder_is_taken_gets_a_new_name(mnist_small, tiny_config, tmp_path):
    taken = tmp_path / "outputs" / tiny_config().run_name
    taken.mkdir(parents=True)
    (taken / "losses.png").write_bytes(b"a plot someone saved")
    federation = fu.Federation(tiny_config(), data=mnist_small, log=False)
    assert federation.out_dir.name == taken.name + "-2"
    assert (taken / "losses.png").read_bytes() == b"a plot someone saved"


def test_resume_restores_the_global_random_state(mnist_small, tiny_config):
    fu.run_federation(tiny_config(rounds=1), data=mnist_small, progress=False)
    after_first_run = torch.rand(3)  # what the global RNG would give next, had the run gone on
    fu.seed_everything(123)
    fu.Federation(tiny_config(rounds=2), data=mnist_small, resume=True, log=False)
    assert torch.equal(torch.rand(3), after_first_run)


def test_federation_with_compression_counts_bytes_and_keeps_residuals(mnist_small, tiny_config):
    federation = fu.Federation(tiny_config(compression="topk", topk_fraction=0.05), data=mnist_small, log=False)
    dense = fu.Federation(tiny_config(checkpoint_dir=str(federation.run_dir) + "-dense"), data=mnist_small, log=False)
    record, dense_record = federation.run_round(), dense.run_round()
    assert record["bytes_down"] == dense_record["bytes_down"] == dense_record["bytes_up"]
    assert record["bytes_up"] < 0.15 * dense_record["bytes_up"]
    residual = federation.client_store[0]["g_residual"]
    assert set(residual) <= set(federation.generator.state_dict()) and any(v.abs().sum() > 0 for v in residual.values())


def test_a_round_where_nobody_reports_keeps_the_global_models(mnist_small, tiny_config):
    config = tiny_config(client_speed_sigma=1.0, round_deadline=1e-3, straggler_policy="drop", rounds=1)
    federation = fu.Federation(config, data=mnist_small, log=False)
    before = {k: v.clone() for k, v in federation.generator.state_dict().items()}
    record = federation.run_round()
    assert record["clients"] == [] and math.isnan(record["d_loss"]) and record["late"] == [0, 1, 2]
    assert states_equal(federation.generator.state_dict(), before)


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




def test_a_custom_strategy_object_plugs_into_the_federation(mnist_small, tiny_config):
    federation = fu.Federation(tiny_config(rounds=1), data=mnist_small, log=False, strategy=BestHalf())
    assert federation.strategy_name == "BestHalf"
    assert federation.strategies["g"] is not federation.strategies["d"]
    assert federation.strategies["g"].buffer_keys == {n for n, _ in federation.generator.named_buffers()}
    record = federation.run_round()
    assert record["server"]["g"] == {"kept": 2} and record["server"]["d"] == {"kept": 2}
    with pytest.raises(TypeError, match="strategy must be a Strategy"):
        fu.Federation(tiny_config(), data=mnist_small, strategy="median")


@pytest.mark.parametrize("make,message", [
    (lambda images, labels: (images.float() / 255, labels), r"images must be uint8 in \[0, 255\].*float32"),
    (lambda images, labels: (images[:, 0], labels), r"images must be a tensor \[N, 1, 28, 28\]"),
    (lambda images, labels: (images, labels[:-5]), "1,200 images and 1,195 labels"),
    (lambda images, labels: (images, labels + 5), "holds label 10: mnist has classes 0 to 9"),
])
def test_data_given_to_a_federation_is_checked_as_load_dataset_gives_it(mnist_small, tiny_config, make, message):
    with pytest.raises(ValueError, match=message):
        fu.Federation(tiny_config(), data=make(*mnist_small), log=False)


class Returns(fu.Strategy):
    """A broken custom rule: returns what `make` makes of the global state."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def aggregate(self, global_state, client_states, weights, info=None):
        return self.make(dict(global_state))


@pytest.mark.parametrize("make,message", [
    (lambda state: None, "returned NoneType, not a state dict"),
    (lambda state: {k: v for k, v in list(state.items())[1:]},
     r"returned a state that lacks \['label_embedding.weight'\]"),
    (lambda state: {**state, "extra": torch.zeros(1)},
     r"returned a state that has keys \['extra'\] the generator does not"),
    (lambda state: {**state, "label_embedding.weight": torch.zeros(2, 2)},
     r"returned label_embedding.weight of shape \(2, 2\)"),
])
def test_a_strategy_returning_something_else_than_a_state_is_named(mnist_small, tiny_config, make, message):
    federation = fu.Federation(tiny_config(), data=mnist_small, log=False, strategy=Returns(make))
    with pytest.raises(ValueError, match=f"strategy Returns for the generator {message}"):
        federation.run_round()


def trees_equal(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(trees_equal(a[k], b[k]) for k in a)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_a_round_whose_aggregation_fails_applies_none_of_it(mnist_small, tiny_config):
    config = tiny_config(optimizer_state="keep", compression="topk", topk_fraction=0.1, bn_policy="local",
                         strategy="fedadam")
    federation = fu.Federation(config, data=mnist_small, log=False)
    federation.run_round()  # a good round first: client and server state to keep or lose
    before = {"g": {k: v.clone() for k, v in federation.generator.state_dict().items()},
              "store": copy.deepcopy(federation.client_store),
              "server": copy.deepcopy(federation.strategies["g"].state_dict())}

    def broken(*args):
        raise RuntimeError("the rule broke")
    federation.strategies["d"].aggregate = broken  # D's rule fails after G's has run
    with pytest.raises(RuntimeError, match="the rule broke"):
        federation.run_round()
    assert federation.round == 1 and len(federation.history) == 1
    assert states_equal(federation.generator.state_dict(), before["g"])  # G was aggregated, then given back
    assert trees_equal(federation.client_store, before["store"])  # residuals, kept Adam states, local BN layers
    assert trees_equal(federation.strategies["g"].state_dict(), before["server"])  # FedAdam's moments


CONCURRENT_RUN = """
import sys
import fedgan_utils as fu
images, labels = fu.load_dataset("mnist")
fu.run_federation(fu.FedConfig.from_json(sys.argv[1]), data=(images[:1200], labels[:1200]), progress=False)
"""


def test_two_processes_starting_one_run_name_at_once_write_into_their_own_folders(tiny_config, tmp_path):
    configs = [tiny_config(seed=seed, run_name="same", rounds=2) for seed in (1, 2)]
    env = {**os.environ, "PYTHONPATH": str(Path(fu.__file__).parent)}
    processes = [subprocess.Popen([sys.executable, "-c", CONCURRENT_RUN, c.to_json()], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in configs]
    errors = [p.communicate(timeout=300)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [e[-800:] for e in errors]
    folders = sorted(Path(configs[0].checkpoint_dir).iterdir())
    assert [f.name for f in folders] == ["same", "same-2"]
    seeds = [{fu.FedConfig.from_json(fu.load_checkpoint(p)["config"]).seed for p in fu.list_checkpoints(f)}
             for f in folders]
    assert sorted(seeds, key=min) == [{1}, {2}]  # each folder holds one run's two rounds, nothing of the other
    assert all(len(fu.list_checkpoints(f)) == 2 for f in folders)


def test_a_checkpoint_folder_that_cannot_be_written_is_found_before_any_training(mnist_small, tiny_config, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.raises(PermissionError, match=f"checkpoints cannot be written in {blocked}"):
        fu.Federation(tiny_config(checkpoint_dir=str(blocked / "checkpoints")), data=mnist_small, log=False)


def test_resume_matches_its_own_run_not_one_whose_name_it_begins(mnist_small, tiny_config, capsys):
    fu.run_federation(tiny_config(rounds=1, run_name="exp"), data=mnist_small, progress=False)
    fu.run_federation(tiny_config(rounds=2, run_name="exp-big"), data=mnist_small, progress=False)
    resumed = fu.Federation(tiny_config(rounds=3, run_name="exp"), data=mnist_small, resume=True)
    assert resumed.run_dir.name == "exp" and resumed.round == 1


def test_resume_with_no_run_of_its_name_says_it_starts_a_new_one(mnist_small, tiny_config, capsys):
    federation = fu.Federation(tiny_config(run_name="never-ran"), data=mnist_small, resume=True)
    assert federation.round == 0
    assert "resume=True: no run named never-ran has a checkpoint" in capsys.readouterr().out


def test_resume_with_no_loadable_checkpoint_sets_them_aside_and_starts_over(mnist_small, tiny_config):
    config = tiny_config(rounds=2, run_name="empty")
    run_dir = Path(config.checkpoint_dir) / "empty"
    run_dir.mkdir(parents=True)
    (run_dir / "round_0001.pt").write_bytes(b"")  # a 0-byte file without its checksum
    federation = fu.Federation(config, data=mnist_small, resume=True, log=False)
    assert federation.round == 0 and federation.run_dir == run_dir
    federation.run(progress=False)  # no FileExistsError on the file that would not load
    assert (run_dir / "round_0001.pt.bad").read_bytes() == b""  # set aside, never deleted
    assert [p.name for p in fu.list_checkpoints(run_dir)] == ["round_0001.pt", "round_0002.pt"]


def test_a_second_fallback_at_the_same_round_keeps_the_first_set_aside_file(mnist_small, tiny_config):
    config = tiny_config(rounds=2)
    first = fu.run_federation(config, data=mnist_small, progress=False)
    latest = fu.latest_checkpoint(first.run_dir)
    for damage in (b"first", b"second"):
        latest.write_bytes(damage)
        fu.Federation(config, data=mnist_small, resume=True, log=False).run(progress=False)
    assert (first.run_dir / "round_0002.pt.bad").read_bytes() == b"first"
    assert (first.run_dir / "round_0002.pt.bad-2").read_bytes() == b"second"


@pytest.mark.parametrize("damage", [
    lambda c: {**c, "generator": {**c["generator"], "main.1.weight": torch.zeros(3)}},  # a wrong-shaped tensor
    lambda c: {k: v for k, v in c.items() if k != "history"},
    lambda c: {**c, "config": c["config"][:-10]},  # a broken config string
])
def test_a_checkpoint_that_passes_its_checksum_but_does_not_restore_falls_back(mnist_small, tiny_config, damage):
    config = tiny_config(rounds=3)
    straight = fu.run_federation(dataclasses.replace(config, run_name="straight"), data=mnist_small, progress=False)
    broken = fu.run_federation(config, data=mnist_small, progress=False)
    latest = fu.latest_checkpoint(broken.run_dir)
    payload = damage(fu.load_checkpoint(latest))
    latest.unlink()
    fu.checksum_path(latest).unlink()
    fu.save_checkpoint(latest, payload)  # a valid checksum over contents that do not restore
    resumed = fu.Federation(config, data=mnist_small, resume=True, log=False)
    assert resumed.round == 2 and (broken.run_dir / "round_0003.pt.bad").is_file()
    resumed.run(progress=False)
    assert states_equal(resumed.generator.state_dict(), straight.generator.state_dict())


class FailingEvaluator:
    def __call__(self, generator):
        raise RuntimeError("out of memory while scoring")


def test_a_failing_evaluation_keeps_the_rounds_checkpoint(mnist_small, tiny_config):
    config = tiny_config(rounds=2, eval_every=1, checkpoint_every=0)
    federation = fu.Federation(config, data=mnist_small, log=False)
    federation.evaluator = FailingEvaluator()
    with pytest.raises(RuntimeError, match="out of memory while scoring"):
        federation.run_round()
    assert [p.name for p in fu.list_checkpoints(federation.run_dir)] == ["round_0001.pt"]
    resumed = fu.Federation(config, data=mnist_small, resume=True, log=False)
    assert resumed.round == 1 and "metrics" not in resumed.history[0]


class NumpyMomentum(fu.FedAvg):
    """A user's rule that keeps numpy values in its server state and its log."""

    def __init__(self):
        super().__init__()
        self.calls = np.int64(0)

    def aggregate(self, global_state, client_states, weights, info=None):
        self.calls += 1
        self.last_log = {"calls": self.calls, "mean_weight": np.float32(np.mean(weights))}
        return super().aggregate(global_state, client_states, weights, info)

    def state_dict(self):
        return {"calls": self.calls, "trace": np.arange(3)}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_a_strategy_keeping_numpy_values_writes_checkpoints_that_resume(mnist_small, tiny_config):
    config = tiny_config(rounds=2)
    fu.Federation(dataclasses.replace(config, rounds=1), data=mnist_small, log=False,
                  strategy=NumpyMomentum()).run(progress=False)
    resumed = fu.Federation(config, data=mnist_small, resume=True, log=False, strategy=NumpyMomentum())
    assert resumed.round == 1 and resumed.strategies["g"].calls == 1
    assert resumed.history[0]["server"]["g"] == {"calls": 1, "mean_weight": 400.0}


def test_scoring_during_a_run_does_not_change_its_training(mnist_small, tiny_config):
    """Notebook 3 scores its later cells only at the end: the same training, the same final metrics."""
    scored = dict(eval_samples=50, classifier_epochs=1, classifier_subset=500)
    every_round = fu.run_federation(tiny_config(rounds=3, eval_every=1, run_name="every", **scored), data=mnist_small,
                                    progress=False)
    at_end = fu.run_federation(tiny_config(rounds=3, eval_every=None, run_name="end", **scored), data=mnist_small,
                               progress=False)
    assert all("metrics" in r for r in every_round.history) and not any("metrics" in r for r in at_end.history)
    assert [r["d_loss"] for r in every_round.history] == [r["d_loss"] for r in at_end.history]
    assert states_equal(every_round.generator.state_dict(), at_end.generator.state_dict())
    at_end.evaluator = every_round.evaluator
    assert at_end.evaluate()["fid"] == every_round.history[-1]["metrics"]["fid"]
