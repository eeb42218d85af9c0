"""Federation and run_federation: history, determinism, resume, run folders, BN and optimizer policies."""
import numpy as np
import pytest
import torch

import fedgan_utils as fu


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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


def test_resume_continues_exactly_where_the_first_run_stopped(mnist_small, tiny_config, tmp_path):
    straight = fu.run_federation(tiny_config(rounds=3, checkpoint_dir=str(tmp_path / "a")), data=mnist_small,
                                 progress=False)
    fu.run_federation(tiny_config(rounds=1, checkpoint_dir=str(tmp_path / "b")), data=mnist_small, progress=False)
    resumed = fu.run_federation(tiny_config(rounds=3, checkpoint_dir=str(tmp_path / "b")), data=mnist_small,
                                resume=True, progress=False)
    assert [r["round"] for r in resumed.history] == [1, 2, 3]
    assert [r["g_loss"] for r in resumed.history] == [r["g_loss"] for r in straight.history]
    assert states_equal(resumed.generator.state_dict(), straight.generator.state_dict())
    assert states_equal(resumed.discriminator.state_dict(), straight.discriminator.state_dict())


def test_resume_refuses_a_changed_config(mnist_small, tiny_config):
    fu.run_federation(tiny_config(rounds=1), data=mnist_small, progress=False)
    with pytest.raises(ValueError, match=r"the config differs in \['lr_g'\]"):
        fu.Federation(tiny_config(rounds=2, lr_g=1e-3), data=mnist_small, resume=True)


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


@pytest.mark.parametrize("strategy", ["fedadam", "trimmed_mean"])
def test_a_server_rule_resumes_exactly_with_its_server_state(mnist_small, tiny_config, tmp_path, strategy):
    config = dict(strategy=strategy, num_clients=4, trim_beta=0.25)
    straight = fu.run_federation(tiny_config(rounds=3, checkpoint_dir=str(tmp_path / "a"), **config),
                                 data=mnist_small, progress=False)
    fu.run_federation(tiny_config(rounds=2, checkpoint_dir=str(tmp_path / "b"), **config), data=mnist_small,
                      progress=False)
    resumed = fu.run_federation(tiny_config(rounds=3, checkpoint_dir=str(tmp_path / "b"), **config),
                                data=mnist_small, resume=True, progress=False)
    assert states_equal(resumed.generator.state_dict(), straight.generator.state_dict())
    plain = fu.run_federation(tiny_config(rounds=3, checkpoint_dir=str(tmp_path / "c"), num_clients=4),
                              data=mnist_small, progress=False)
    assert not states_equal(plain.generator.state_dict(), straight.generator.state_dict())
