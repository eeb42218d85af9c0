"""One client's local step (fedgan/gan.py): the losses and FedProx's term on hand-made cases, and gan_step's order."""
import dataclasses
import math

import numpy as np
import pytest
import torch

import fedgan_utils as fu


def fixed_logits(real_logit: float, fake_logit: float):
    """A discriminator that calls every real image `real_logit` and every generated one `fake_logit`."""
    def discriminator(images, labels):
        return torch.where(images[:, 0, 0, 0] > 0, torch.tensor(real_logit), torch.tensor(fake_logit))
    return discriminator


REAL, FAKE, LABELS = torch.ones(2, 1, 2, 2), -torch.ones(2, 1, 2, 2), torch.tensor([3, 7])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_discriminator_loss_is_the_binary_cross_entropy_of_real_as_1_and_fake_as_0():
    # BCE of logit a against 1 is softplus(-a), against 0 softplus(a)
    loss = fu.discriminator_loss(fixed_logits(2.0, -1.0), REAL, FAKE, LABELS)
    assert loss.item() == pytest.approx(softplus(-2.0) + softplus(-1.0))
    undecided = fu.discriminator_loss(fixed_logits(0.0, 0.0), REAL, FAKE, LABELS)
    assert undecided.item() == pytest.approx(2 * math.log(2))  # D at chance: log 2 on each side


def test_generator_loss_is_non_saturating_small_when_d_calls_the_fakes_real():
    assert fu.generator_loss(fixed_logits(0.0, -3.0), FAKE, LABELS).item() == pytest.approx(softplus(3.0))
    assert fu.generator_loss(fixed_logits(0.0, 3.0), FAKE, LABELS).item() == pytest.approx(softplus(-3.0))


def test_the_losses_compute_in_float32_whatever_d_returns():
    def bfloat16_discriminator(images, labels):
        return fixed_logits(1.0, -1.0)(images, labels).to(torch.bfloat16)
    assert fu.discriminator_loss(bfloat16_discriminator, REAL, FAKE, LABELS).dtype == torch.float32
    assert fu.generator_loss(bfloat16_discriminator, FAKE, LABELS).dtype == torch.float32


def test_the_proximal_term_is_half_mu_times_the_squared_distance_to_the_start():
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    anchors = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    assert fu.proximal_term(params, anchors, 0.5).item() == pytest.approx(0.25 * (1 + 4 + 4))
    weight = torch.tensor([1.0, 2.0], requires_grad=True)
    fu.proximal_term([weight], [torch.zeros(2)], 0.5).backward()
    assert weight.grad.tolist() == [0.5, 1.0]  # mu (w - w_start): what the engine adds to its gradients


def test_gan_step_updates_d_on_detached_fakes_then_g_against_the_updated_d():
    calls = []
    generator_weight = torch.tensor(2.0, requires_grad=True)

    def generator(noise, labels):
        calls.append("generate")
        return generator_weight * noise

    def d_loss(real, fake, labels):
        calls.append("d_loss")
        assert not fake.requires_grad  # D's step does not reach G
        return (real - fake).square().mean()

    def g_loss(fake, labels):
        calls.append("g_loss")
        assert fake.requires_grad  # G's loss flows back into G
        return fake.square().mean()

    d_loss_value, g_loss_value = fu.gan_step(
        generator=generator, d_loss=d_loss, g_loss=g_loss, update_d=lambda loss: calls.append(("update_d", loss)),
        update_g=lambda loss: calls.append(("update_g", loss)), real=torch.ones(3), labels=LABELS,
        noise=torch.ones(3))
    assert [c if isinstance(c, str) else c[0] for c in calls] == ["generate", "d_loss", "update_d", "g_loss",
                                                                     "update_g"]
    assert d_loss_value.item() == 1.0 and g_loss_value.item() == 4.0  # (1 - 2)^2 and 2^2
    assert not d_loss_value.requires_grad and not calls[2][1].requires_grad  # the fakes were detached


def test_gan_step_without_the_generator_trains_only_d():
    calls = []
    d_loss_value, g_loss_value = fu.gan_step(
        generator=lambda noise, labels: noise * 2, d_loss=lambda real, fake, labels: (real - fake).sum(),
        g_loss=lambda fake, labels: calls.append("g_loss"), update_d=lambda loss: calls.append("update_d"),
        update_g=lambda loss: calls.append("update_g"), real=torch.ones(2), labels=LABELS, noise=torch.ones(2),
        train_generator=False)
    assert calls == ["update_d"] and g_loss_value is None and d_loss_value.item() == -2.0


@pytest.mark.parametrize("field,value", [("lr_g", 0.0), ("lr_d", -1.0), ("prox_mu", -0.1), ("prox_mu", math.nan)])
def test_local_training_refuses_what_cannot_train(field, value):
    values = {**dict(lr_g=1e-3, lr_d=1e-3, betas=(0.5, 0.999)), field: value}
    with pytest.raises(ValueError, match=f"{field}="):
        fu.LocalTraining(**values)


def test_one_sided_label_smoothing_moves_only_the_real_target():
    # BCE of logit a against target t: t softplus(-a) + (1 - t) softplus(a); the fakes' target stays 0
    loss = fu.discriminator_loss(fixed_logits(2.0, -1.0), REAL, FAKE, LABELS, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * softplus(-2.0) + 0.1 * softplus(2.0) + softplus(-1.0))
    # G's loss is not smoothed
    assert fu.generator_loss(fixed_logits(0.0, 0.5), FAKE, LABELS).item() == pytest.approx(softplus(-0.5))


def test_the_hinge_loss_pays_only_inside_the_margins():
    # D: mean(relu(1 - real)) + mean(relu(1 + fake)); each image here has its own logit
    def discriminator(images, labels):
        return images.flatten(1)[:, 0]

    real, fake = torch.tensor([2.0, 0.5]).view(2, 1, 1, 1), torch.tensor([-3.0, 0.0]).view(2, 1, 1, 1)
    loss = fu.discriminator_loss(discriminator, real, fake, LABELS, loss="hinge")
    assert loss.item() == pytest.approx((0.0 + 0.5) / 2 + (0.0 + 1.0) / 2)
    assert fu.generator_loss(discriminator, fake, LABELS, loss="hinge").item() == pytest.approx(1.5)  # -mean(D(fake))


def test_local_training_binds_its_losses_and_refuses_smoothing_with_the_hinge():
    local = fu.LocalTraining(lr_g=1e-3, lr_d=1e-3, betas=(0.5, 0.999), gan_loss="bce", label_smoothing=0.2)
    discriminator = fixed_logits(1.0, -1.0)
    assert local.d_loss(discriminator, REAL, FAKE, LABELS).item() == pytest.approx(
        0.8 * softplus(-1.0) + 0.2 * softplus(1.0) + softplus(-1.0))
    assert local.g_loss(discriminator, FAKE, LABELS).item() == pytest.approx(softplus(1.0))
    with pytest.raises(ValueError, match=r"label_smoothing=0.2 is not allowed: .* 0 with the hinge loss"):
        fu.LocalTraining(lr_g=1e-3, lr_d=1e-3, betas=(0.5, 0.999), gan_loss="hinge", label_smoothing=0.2)
    with pytest.raises(ValueError, match=r"label_smoothing=0.1 is not allowed: 0 with gan_loss='hinge'"):
        fu.FedConfig(gan_loss="hinge", label_smoothing=0.1)
    assert fu.LocalTraining.of(fu.FedConfig(gan_loss="hinge")).gan_loss == "hinge"


def test_instance_noise_is_added_to_everything_d_sees_and_annealed_over_the_run():
    config = fu.FedConfig(instance_noise=0.2, rounds=4)
    assert [fu.instance_noise_std(config, r) for r in (1, 2, 3, 4)] == pytest.approx([0.2, 0.15, 0.1, 0.05])
    seen = []

    def discriminator(images, labels):  # records what it is shown; logits 0
        seen.append(images.clone())
        return torch.zeros(len(images))
    real, fake = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    noise = torch.arange(3.0).view(3, 1, 1, 1, 1).expand(3, 2, 1, 2, 2)  # 0, 1 and 2 everywhere: told apart
    fu.gan_step(generator=lambda z, y: fake.clone().requires_grad_(True),
                d_loss=lambda r, f, y: fu.discriminator_loss(discriminator, r, f, y),
                g_loss=lambda f, y: fu.generator_loss(discriminator, f, y), update_d=lambda loss: None,
                update_g=lambda loss: None, real=real, labels=torch.zeros(2, dtype=torch.long),
                noise=torch.zeros(2, 3), input_noise=noise)
    assert [float(x.mean()) for x in seen] == [0.0 + 0.0, 1.0 + 1.0, 1.0 + 2.0]  # real + n0, fake + n1, fake + n2
    plan = fu.RoundPlan(1, np.array([4, 7]), np.array([8, 8]), np.array([1, 1]), torch.zeros(2, 1, 2).long(), 3,
                        instance_noise=0.5)
    draws = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    both = fu.step_input_noise(plan, draws(), (2, 1, 2, 2), torch.device("cpu"))  # (3, K, B, C, H, W)
    assert both.shape == (3, 2, 2, 1, 2, 2) and 0.3 < float(both.std()) < 0.7
    alone = dataclasses.replace(plan, client_ids=plan.client_ids[1:], noise_rows=np.array([1]), noise_width=2)
    assert torch.equal(fu.step_input_noise(alone, draws(), (2, 1, 2, 2), torch.device("cpu")), both[:, 1:])
