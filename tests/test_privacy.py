"""Client-level DP (fedgan/privacy.py): DP-FedAvg's clip and noise, the accountant, DP-FedAvg-GAN."""
import numpy as np
import pytest
import torch
from scipy.stats import norm

import fedgan_utils as fu
from helpers import states_equal


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
    config = tiny_config(gan_layout="server_g", rounds=2, dp_clip=1.0, dp_noise_multiplier=0.5,
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
    resumed = fu.Federation(tiny_config(gan_layout="server_g", rounds=2, dp_clip=1.0, dp_noise_multiplier=0.5,
                                        checkpoint_dir=str(tmp_path / "b")), data=mnist_small, log=False)
    resumed.run(rounds=1, progress=False)
    again = fu.Federation(resumed.config, data=mnist_small, log=False, resume=True).run(progress=False)
    assert states_equal(again.generator.state_dict(), federation.generator.state_dict())


def test_an_epsilon_below_what_the_accountant_resolves_is_refused_not_answered():
    with pytest.raises(ValueError, match=r"target_epsilon=1e-09 is not allowed: .*the accountant"):
        fu.dp_noise_multiplier(1e-9, 0.1, 10, 1e-5)
    z = fu.dp_noise_multiplier(1.0, 0.1, 10, 1e-5)  # a reachable target still gets its multiplier
    assert 0 < fu.dp_epsilon(z, 0.1, 10, 1e-5) <= 1.0


@pytest.mark.parametrize("kw,name", [
    (dict(sample_rate=0), "sample_rate"), (dict(rounds=0), "rounds"), (dict(delta=1.0), "delta"),
    (dict(tolerance=0), "tolerance"), (dict(tolerance=1.5), "tolerance"), (dict(target_epsilon=float("inf")),
                                                                             "target_epsilon")])
def test_the_noise_search_checks_its_own_parameters_before_searching(kw, name):
    values = {**dict(target_epsilon=2.0, sample_rate=0.1, rounds=10, delta=1e-5), **kw}
    with pytest.raises(ValueError, match=f"^{name}="):
        fu.dp_noise_multiplier(**values)
