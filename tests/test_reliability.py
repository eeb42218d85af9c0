"""Reliability and privacy: checksummed checkpoints and fallback, kill-and-resume, NaN clients, the watchdog,
attackers, DP-FedAvg with its accountant, the DP-FedAvg-GAN layout, and input validation under random input."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

import fedgan_utils as fu


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- faults and attackers ----------------------------------------------------------------------------------

def test_a_client_sending_nan_is_left_out_and_the_run_goes_on(mnist_small, tiny_config):
    config = tiny_config(attack="nan", attack_fraction=0.34, rounds=2)
    federation = fu.Federation(config, data=mnist_small, log=False)
    assert len(federation.attackers) == 1
    federation.run(progress=False)
    assert all(r["excluded"] == federation.attackers for r in federation.history)
    assert all(torch.isfinite(v).all() for v in federation.generator.state_dict().values() if v.is_floating_point())
    assert np.isfinite(federation.history[-1]["d_loss"])


def test_too_few_usable_updates_keep_the_global_model(mnist_small, tiny_config):
    federation = fu.Federation(tiny_config(attack="nan", attack_fraction=0.34, min_clients=3), data=mnist_small,
                               log=False)
    before = {k: v.clone() for k, v in federation.discriminator.state_dict().items()}
    record = federation.run_round()
    assert record["kept_global"] and states_equal(federation.discriminator.state_dict(), before)


def test_sign_flip_attackers_drag_fedavg_but_not_the_median(mnist_small, tiny_config, tmp_path):
    config = dict(num_clients=5, attack="sign_flip", attack_fraction=0.4, attack_scale=10.0, rounds=1)
    honest_run = fu.Federation(tiny_config(num_clients=5, rounds=1, checkpoint_dir=str(tmp_path / "h")),
                               data=mnist_small, log=False)
    honest_start = {k: v.clone() for k, v in honest_run.generator.state_dict().items()}
    honest_run.run_round()
    distances = {}
    for strategy in ("fedavg", "median"):
        run = fu.Federation(tiny_config(**config, strategy=strategy, checkpoint_dir=str(tmp_path / strategy)),
                            data=mnist_small, log=False)
        run.run_round()
        distances[strategy] = sum((run.generator.state_dict()[k] - honest_run.generator.state_dict()[k]).norm()
                                  for k in honest_start if honest_start[k].is_floating_point())
    assert distances["median"] < distances["fedavg"] / 3


def test_label_flip_poisons_only_the_attackers_training_labels(mnist_small, tiny_config):
    federation = fu.Federation(tiny_config(attack="label_flip", attack_fraction=0.34), data=mnist_small, log=False)
    (attacker,) = federation.attackers
    own = torch.as_tensor(federation.parts[attacker])
    assert torch.equal(federation.client_labels[own], 9 - federation.labels[own])
    others = torch.as_tensor(np.concatenate([federation.parts[c] for c in range(3) if c != attacker]))
    assert torch.equal(federation.client_labels[others], federation.labels[others])
    assert torch.equal(federation.labels, mnist_small[1])  # the clean labels stay for evaluation


def test_the_watchdog_stops_a_run_whose_discriminator_loss_collapsed(mnist_small, tiny_config):
    # collapse_loss above any real loss: every round counts as collapsed, so the third one stops the run
    federation = fu.Federation(tiny_config(rounds=5, watchdog_rounds=3, collapse_loss=100.0), data=mnist_small,
                               log=False)
    with pytest.raises(fu.DivergenceError, match=r"round 3: the discriminator loss stayed below collapse_loss=100.0"):
        federation.run(progress=False)
    assert len(federation.history) == 2 and "round_0002.pt" in str(fu.latest_checkpoint(federation.run_dir))


# -- checkpoints: checksums, fallback, kill and resume -------------------------------------------------------

def test_a_corrupted_latest_checkpoint_falls_back_to_the_previous_one_and_the_run_ends_the_same(
        mnist_small, tiny_config, tmp_path):
    straight = fu.run_federation(tiny_config(rounds=4, checkpoint_dir=str(tmp_path / "a")), data=mnist_small,
                                 progress=False)
    broken = fu.run_federation(tiny_config(rounds=3, checkpoint_dir=str(tmp_path / "b")), data=mnist_small,
                               progress=False)
    latest = fu.latest_checkpoint(broken.run_dir)
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a torn write
    assert fu.latest_good_checkpoint(broken.run_dir, log=False).name == "round_0002.pt"
    resumed = fu.Federation(tiny_config(rounds=4, checkpoint_dir=str(tmp_path / "b")), data=mnist_small,
                            resume=True, log=False)
    assert resumed.round == 2 and (broken.run_dir / "round_0003.pt.bad").is_file()  # set aside, not deleted
    resumed.run(progress=False)
    assert [r["d_loss"] for r in resumed.history] == [r["d_loss"] for r in straight.history]
    assert states_equal(resumed.generator.state_dict(), straight.generator.state_dict())
    assert fu.load_checkpoint(broken.run_dir / "round_0003.pt")["round"] == 3  # rewritten, with its checksum


RUNNER = """
import sys
import fedgan_utils as fu
images, labels = fu.load_dataset("mnist")
config = fu.FedConfig.from_json(sys.argv[1])
fu.run_federation(config, data=(images[:1200], labels[:1200]), resume=True, progress=False)
"""


def test_a_run_killed_with_sigkill_resumes_to_exactly_the_uninterrupted_result(mnist_small, tiny_config, tmp_path):
    config = tiny_config(rounds=8, local_steps=25, batch_size=16, optimizer_state="keep", bn_policy="local",
                         strategy="fedadam", checkpoint_dir=str(tmp_path / "killed"))
    env = {**os.environ, "PYTHONPATH": str(Path(fu.__file__).parent), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen([sys.executable, "-c", RUNNER, config.to_json()], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run_dir = Path(config.checkpoint_dir) / config.run_name
    deadline = time.time() + 120
    while not (run_dir / "round_0003.pt").exists():  # killed while round 4 trains (or its checkpoint is written)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the run did not reach round 3 in 2 minutes"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = fu.latest_good_checkpoint(run_dir, log=False)
    assert saved is not None and fu.load_checkpoint(saved)["round"] < 8  # it was killed mid-run
    # what a kill during the next checkpoint write leaves: a .partial file and, maybe, its checksum
    following = run_dir / f"round_{fu.load_checkpoint(saved)['round'] + 1:04d}.pt"
    if not following.exists():
        following.with_name(following.name + ".partial").write_bytes(b"torn")
        fu.checksum_path(following).write_text("0" * 64 + "  " + following.name + "\n")
    resumed = fu.run_federation(config, data=mnist_small, resume=True, progress=False)
    straight = fu.run_federation(tiny_config(**{**config.__dict__, "checkpoint_dir": str(tmp_path / "straight")}),
                                 data=mnist_small, progress=False)
    assert [r["g_loss"] for r in resumed.history] == [r["g_loss"] for r in straight.history]
    assert states_equal(resumed.generator.state_dict(), straight.generator.state_dict())
    assert states_equal(resumed.discriminator.state_dict(), straight.discriminator.state_dict())
    assert [p.name for p in fu.list_checkpoints(run_dir)] == [f"round_{r:04d}.pt" for r in range(1, 9)]


# -- privacy -------------------------------------------------------------------------------------------------

def test_dp_clipping_bounds_each_clients_whole_update_across_networks():
    g = {"w": torch.tensor([[3.0, 0.0], [0.3, 0.0]])}
    d = {"v": torch.tensor([[4.0], [0.4]])}  # client 0: joint norm 5; client 1: 0.5
    (noisy_g, noisy_d), norms = fu.privatize_updates([g, d], clip=1.0, noise_multiplier=0.0, expected_clients=2)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(noisy_g["w"], torch.tensor([(0.6 + 0.3) / 2, 0.0]))  # client 0 scaled by 1/5
    torch.testing.assert_close(noisy_d["v"], torch.tensor([(0.8 + 0.4) / 2]))


def test_dp_noise_has_std_noise_multiplier_times_clip_over_expected_clients():
    zeros = {"w": torch.zeros(1, 200_000)}
    draws = torch.Generator().manual_seed(0)
    (noisy,), _ = fu.privatize_updates([zeros], clip=2.0, noise_multiplier=1.5, expected_clients=4, generator=draws)
    assert noisy["w"].std().item() == pytest.approx(1.5 * 2.0 / 4, rel=0.01)
    assert abs(noisy["w"].mean().item()) < 4 * 0.75 / np.sqrt(200_000)
    (again,), _ = fu.privatize_updates([zeros], clip=2.0, noise_multiplier=1.5, expected_clients=4,
                                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy["w"], again["w"])  # a seeded generator: reproducible noise


def exact_gaussian_epsilon(mu, delta):
    """The tight epsilon of a Gaussian mechanism with sensitivity/noise mu (Balle & Wang, ICML 2018)."""
    def delta_at(eps):
        return norm.cdf(mu / 2 - eps / mu) - np.exp(eps) * norm.cdf(-mu / 2 - eps / mu)
    low, high = 0.0, 100.0
    for _ in range(200):
        low, high = ((low + high) / 2, high) if delta_at((low + high) / 2) > delta else (low, (low + high) / 2)
    return high


def test_the_accountant_bounds_the_exact_gaussian_epsilon_closely_and_inverts():
    # without subsampling, T releases with noise z compose to one Gaussian mechanism with mu = sqrt(T) / z
    for z, rounds in ((1.0, 1), (2.0, 10), (5.0, 100)):
        exact = exact_gaussian_epsilon(np.sqrt(rounds) / z, 1e-5)
        accounted = fu.dp_epsilon(z, 1.0, rounds, 1e-5)
        assert exact <= accounted <= 1.25 * exact, (z, rounds, exact, accounted)
    assert fu.dp_epsilon(1.0, 0.1, 100, 1e-5) < fu.dp_epsilon(1.0, 0.5, 100, 1e-5)  # subsampling amplifies
    assert fu.dp_epsilon(1.0, 0.1, 50, 1e-5) < fu.dp_epsilon(1.0, 0.1, 100, 1e-5)
    z = fu.dp_noise_multiplier(2.0, 0.1, 100, 1e-5)
    assert fu.dp_epsilon(z, 0.1, 100, 1e-5) <= 2.0 < fu.dp_epsilon(z * 0.99, 0.1, 100, 1e-5)
    with pytest.raises(ValueError, match="sample_rate"):
        fu.dp_epsilon(1.0, 1.5, 10, 1e-5)


def test_a_dp_run_logs_epsilon_each_round_and_is_reproducible(mnist_small, tiny_config, tmp_path):
    config = dict(dp_clip=0.05, dp_noise_multiplier=1.0, client_fraction=2 / 3, rounds=3)
    runs = [fu.run_federation(tiny_config(**config, checkpoint_dir=str(tmp_path / str(i))), data=mnist_small,
                              progress=False) for i in range(2)]
    epsilons = [r["epsilon"] for r in runs[0].history]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    assert epsilons[-1] == pytest.approx(fu.dp_epsilon(1.0, 2 / 3, 3, 1e-5))
    assert all(r["dp_clipped"] >= 0 for r in runs[0].history)
    assert states_equal(runs[0].generator.state_dict(), runs[1].generator.state_dict())
    with pytest.raises(ValueError, match="strategy='median' is not allowed: one of .* with dp_clip"):
        tiny_config(dp_clip=1.0, strategy="median")


def test_dp_fedavg_gan_trains_the_generator_only_on_the_server(mnist_small, tiny_config, tmp_path):
    config = tiny_config(server_generator=True, rounds=2, dp_clip=1.0, dp_noise_multiplier=0.5,
                         checkpoint_dir=str(tmp_path / "a"))
    federation = fu.Federation(config, data=mnist_small, log=False)
    g_bytes = sum(v.numel() * v.element_size() for v in federation.generator.state_dict().values())
    d_bytes = sum(v.numel() * v.element_size() for v in federation.discriminator.state_dict().values())
    before = {k: v.clone() for k, v in federation.generator.state_dict().items()}
    record = federation.run_round()
    assert record["bytes_up"] == 3 * d_bytes and record["bytes_down"] == 3 * (g_bytes + d_bytes)
    assert record["g_loss_clients"] == [0.0, 0.0, 0.0] and np.isfinite(record["server_g_loss"])
    assert not states_equal(federation.generator.state_dict(), before)  # moved by the server's steps
    federation.run(progress=False)
    resumed = fu.Federation(tiny_config(server_generator=True, rounds=2, dp_clip=1.0, dp_noise_multiplier=0.5,
                                        checkpoint_dir=str(tmp_path / "b")), data=mnist_small, log=False)
    resumed.run(rounds=1, progress=False)
    again = fu.Federation(resumed.config, data=mnist_small, log=False, resume=True).run(progress=False)
    assert states_equal(again.generator.state_dict(), federation.generator.state_dict())


# -- bad input --------------------------------------------------------------------------------------------

def test_images_of_the_wrong_shape_are_refused_by_the_metric_classifier():
    classifier = fu.Classifier()
    with pytest.raises(ValueError, match=r"images of shape \(4, 3, 28, 28\) given; the classifier takes a tensor "
                                         r"\[N, 1, 28, 28\]"):
        fu.classifier_outputs(classifier, torch.zeros(4, 3, 28, 28))


def test_a_client_whose_local_training_raises_is_left_out_and_the_others_train(mnist_small, tiny_config):
    federation = fu.Federation(tiny_config(rounds=1), data=mnist_small, log=False)
    broken = torch.as_tensor(federation.parts[1])
    federation.client_labels = federation.labels.clone()
    federation.client_labels[broken] = 99  # malformed data: a label the generator's embedding does not have
    record = federation.run_round()
    assert list(record["failed"]) == [1] and "IndexError" in record["failed"][1]
    assert record["clients"] == [0, 2] and np.isfinite(record["d_loss"])
    federation.client_labels[:] = 99
    with pytest.raises(RuntimeError, match="round 2: the local training of every client failed"):
        federation.run_round()


def test_every_torch_load_in_the_code_is_weights_only():
    import ast

    repo = Path(fu.__file__).parent
    sources = [*repo.glob("fedgan/**/*.py"), *repo.glob("benchmarks/*.py")]
    calls = [node for source in sources for node in ast.walk(ast.parse(source.read_text()))
             if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load"]
    assert calls, "the package loads checkpoints with torch.load"
    for call in calls:
        keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert keywords.get("weights_only") == "True", ast.unparse(call)
