"""Generator, Discriminator and generate(): shapes for MNIST and CIFAR, conditioning, DCGAN init."""
import numpy as np
import pytest
import torch

import fedgan_utils as fu


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)])
def test_generator_and_discriminator_fit_the_image_shape(shape):
    generator = fu.Generator(image_shape=shape, z_dim=16, embed_dim=4, ngf=8)
    discriminator = fu.Discriminator(image_shape=shape, ndf=8)
    labels = torch.tensor([0, 3, 9])
    images = generator(torch.randn(3, 16), labels)
    assert images.shape == (3, *shape)
    assert images.min() >= -1 and images.max() <= 1
    assert discriminator(images, labels).shape == (3,)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_the_layers_computed_as_matrix_products_are_the_convolutions_they_hold(shape):
    torch.manual_seed(0)
    generator = fu.Generator(image_shape=shape, z_dim=16, embed_dim=4, ngf=8)
    discriminator = fu.Discriminator(image_shape=shape, ndf=8)
    z, labels = torch.randn(5, 16), torch.tensor([0, 3, 9, 9, 1])
    x = torch.cat([z, generator.label_embedding(labels)], 1)[:, :, None, None]  # (B, z + e, 1, 1)
    images = generator.main(x)  # the transposed convolution of a 1x1 input, as the layer itself computes it
    torch.testing.assert_close(generator(z, labels), images, atol=1e-6, rtol=1e-5)
    label_map = discriminator.label_channel(labels).view(-1, 1, *shape[1:])
    logits = discriminator.main(torch.cat([images, label_map], 1)).flatten()
    torch.testing.assert_close(discriminator(images, labels), logits, atol=1e-6, rtol=1e-5)


def test_unsupported_image_sizes_are_refused():
    with pytest.raises(ValueError, match="image size 30 is not supported"):
        fu.Generator(image_shape=(1, 30, 30))
    with pytest.raises(ValueError, match="only square images"):
        fu.Discriminator(image_shape=(1, 28, 32))


def test_the_label_changes_what_the_generator_draws():
    generator = fu.Generator(z_dim=16, ngf=8)
    z = torch.randn(1, 16).repeat(2, 1)
    images = generator(z, torch.tensor([1, 7]))
    assert not torch.allclose(images[0], images[1])


def test_dcgan_init_draws_conv_weights_with_std_0_02_and_batchnorm_around_1():
    torch.manual_seed(0)
    generator = fu.Generator(ngf=64)
    conv = generator.main[0].weight
    assert abs(conv.std().item() - 0.02) < 0.002 and abs(conv.mean().item()) < 0.002
    batchnorm = generator.main[1]
    assert abs(batchnorm.weight.mean().item() - 1.0) < 0.01 and batchnorm.bias.abs().max().item() == 0.0


def test_build_models_follows_the_config():
    generator, discriminator = fu.build_models(fu.FedConfig(ngf=16, ndf=8, z_dim=20, embed_dim=5))
    assert generator.config == dict(image_shape=(1, 28, 28), num_classes=10, z_dim=20, embed_dim=5, ngf=16)
    assert discriminator.config["ndf"] == 8


def test_norm_state_keys_are_the_batchnorm_entries():
    keys = fu.norm_state_keys(fu.Generator(ngf=8))
    assert "main.1.running_mean" in keys and "main.1.weight" in keys and "main.1.num_batches_tracked" in keys
    assert "main.0.weight" not in keys and "label_embedding.weight" not in keys


def test_generate_is_seeded_and_keeps_the_training_mode():
    generator = fu.Generator(z_dim=16, ngf=8).train()
    first = fu.generate(generator, [7] * 10, seed=1)
    assert first.shape == (10, 1, 28, 28)
    assert torch.equal(first, fu.generate(generator, [7] * 10, seed=1))
    assert not torch.equal(first, fu.generate(generator, [7] * 10, seed=2))
    assert generator.training


@pytest.mark.parametrize("labels", [[10], [-1], []])
def test_generate_refuses_labels_outside_the_classes(labels):
    with pytest.raises(ValueError, match=r"labels must be a non-empty list of integers in \[0, 9\]"):
        fu.generate(fu.Generator(z_dim=16, ngf=8), labels)


def test_generate_checks_the_noise_shape():
    with pytest.raises(ValueError, match=r"noise has shape \(2, 5\), expected \(2, 16\)"):
        fu.generate(fu.Generator(z_dim=16, ngf=8), [1, 2], noise=torch.zeros(2, 5))


@pytest.mark.parametrize("labels", [[1.5, 2.0], torch.tensor([1.0, float("nan")]), [[1, 2], [3, 4]], [True, False],
                                    "7", [None]])
def test_generate_refuses_labels_that_are_not_a_list_of_integers(labels):
    with pytest.raises(ValueError, match=r"labels must be a non-empty list of integers in \[0, 9\]"):
        fu.generate(fu.Generator(z_dim=16, ngf=8), labels)


@pytest.mark.parametrize("seed", [1.5, -1, "0", None, 2 ** 64])
def test_generate_refuses_a_seed_that_is_not_an_integer_torch_takes(seed):
    with pytest.raises(ValueError, match=r"seed=.* is not allowed: an integer from 0 to 2\*\*63 - 1"):
        fu.generate(fu.Generator(z_dim=16, ngf=8), [1], seed=seed)


def test_a_large_request_is_drawn_in_chunks_that_match_drawing_them_one_by_one(monkeypatch):
    from fedgan import models

    generator = fu.Generator(z_dim=16, ngf=8)
    labels = torch.arange(25) % 10
    whole = fu.generate(generator, labels, seed=3)
    batches = []
    forward = generator.forward
    monkeypatch.setattr(generator, "forward", lambda z, y: batches.append(len(y)) or forward(z, y))
    monkeypatch.setattr(models, "GENERATE_CHUNK", 10)
    noise = torch.randn(25, 16, generator=torch.Generator().manual_seed(3))
    chunked = fu.generate(generator, labels, noise=noise)
    assert batches == [10, 10, 5]  # never more than a chunk through the network at once
    torch.testing.assert_close(chunked, whole)  # up to 25 images the noise is drawn in one piece, as before
    assert fu.generate(generator, labels, seed=np.int64(3)).shape == (25, 1, 28, 28)


@pytest.mark.parametrize("make,message", [
    (lambda: fu.Generator(ngf=0), "ngf=0 is not allowed: an integer >= 1"),
    (lambda: fu.Generator(z_dim=2.5), "z_dim=2.5 is not allowed"),
    (lambda: fu.Discriminator(num_classes=-1), "num_classes=-1 is not allowed"),
    (lambda: fu.Discriminator(image_shape=(1, 28)), r"image_shape=\(1, 28\) is not allowed: three integers"),
])
def test_networks_refuse_sizes_they_cannot_be_built_with(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_the_projection_discriminator_adds_the_inner_product_of_the_label_embedding_and_the_features():
    torch.manual_seed(0)
    discriminator = fu.Discriminator(ndf=8, conditioning="projection").eval()
    images, labels = torch.randn(3, 1, 28, 28), torch.tensor([0, 4, 9])
    features = discriminator.main[:-1](images).flatten(1)  # phi(x): (3, 16 * 7 * 7)
    assert discriminator.label_projection.weight.shape == (10, features.shape[1])
    psi = features @ discriminator.main[-1].weight.flatten()
    expected = psi + (discriminator.label_projection.weight[labels] * features).sum(1)
    torch.testing.assert_close(discriminator(images, labels), expected)
    # the label changes the logit by exactly the difference of the two embeddings' inner products
    other = torch.tensor([1, 4, 2])
    torch.testing.assert_close(discriminator(images, other) - discriminator(images, labels),
                               ((discriminator.label_projection.weight[other]
                                 - discriminator.label_projection.weight[labels]) * features).sum(1))
    assert discriminator.main[0].in_channels == 1 and not hasattr(discriminator, "label_channel")
    assert fu.build_models(fu.FedConfig(d_conditioning="projection", ndf=8))[1].conditioning == "projection"
    with pytest.raises(ValueError, match=r"conditioning='label' is not allowed: one of \['channel', 'projection'\]"):
        fu.Discriminator(conditioning="label")


def test_spectral_normalisation_divides_the_weight_by_its_largest_singular_value():
    conv = fu.SpectralConv2d(2, 2, 1, bias=False)  # a 1x1 convolution: its matrix is W
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]).view(2, 2, 1, 1))
        conv.u.copy_(torch.tensor([0.6, 0.8]))
    # one power iteration by hand: v = W^T u / |.| = (1.8, 0.8) / |.|, u = W v / |.|, sigma = u^T W v
    v = torch.tensor([1.8, 0.8]) / torch.tensor([1.8, 0.8]).norm()
    u = torch.tensor([3.0, 1.0]) * v / (torch.tensor([3.0, 1.0]) * v).norm()
    sigma = u @ torch.diag(torch.tensor([3.0, 1.0])) @ (torch.diag(torch.tensor([3.0, 1.0])) @ u
                                                          / (torch.diag(torch.tensor([3.0, 1.0])) @ u).norm())
    x = torch.randn(4, 2, 3, 3)
    torch.testing.assert_close(conv.train()(x), torch.nn.functional.conv2d(x, conv.weight / sigma))
    torch.testing.assert_close(conv.u, u)  # the iteration's u is kept for the next pass
    for _ in range(30):  # the estimate converges to sigma(W) = 3: the layer's largest gain is 1
        conv(x)
    torch.testing.assert_close(conv.normalised_weight().flatten(1), torch.diag(torch.tensor([1.0, 1 / 3])))
    frozen = conv.u.clone()
    conv.eval()(x)
    assert torch.equal(conv.u, frozen)  # in evaluation the estimate is used, not moved


def test_a_spectral_discriminator_has_no_batch_norm_and_every_layer_normalised():
    config = fu.FedConfig(d_norm="spectral", ndf=8, d_conditioning="projection")
    _, discriminator = fu.build_models(config)
    convolutions = [m for m in discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(isinstance(m, fu.SpectralConv2d) for m in convolutions)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in discriminator.modules())
    images, labels = torch.randn(5, 1, 28, 28), torch.arange(5)
    assert discriminator(images, labels).shape == (5,)
    for module in convolutions:  # every layer's normalised weight has spectral norm ~1 after a few passes
        for _ in range(50):
            discriminator(images, labels)
        gain = torch.linalg.matrix_norm(module.normalised_weight().detach().flatten(1), ord=2)
        assert float(gain) == pytest.approx(1.0, abs=1e-2)
    with pytest.raises(ValueError, match=r"d_norm='layer' is not allowed: one of \['batch', 'spectral'\]"):
        fu.FedConfig(d_norm="layer")
