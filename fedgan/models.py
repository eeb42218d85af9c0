"""The conditional DCGAN: generator and discriminator, their initialisation, and sampling."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedgan.checks import is_int, positive_int, require
from fedgan.config import D_CONDITIONINGS, D_NORMS, DATASETS, FedConfig, as_python

Tensor = torch.Tensor


def _check_sizes(image_shape: Any, **sizes: Any) -> tuple[int, int, int]:
    """A network's arguments: an image shape (C, H, W) with square sides, and each size an integer >= 1."""
    for name, value in sizes.items():
        require(positive_int(value), name, value, "an integer >= 1")
    shape = tuple(image_shape) if isinstance(image_shape, (tuple, list)) else ()
    require(len(shape) == 3 and all(positive_int(v) for v in shape) and shape[1] == shape[2], "image_shape",
            image_shape, "three integers >= 1, (C, H, W) with H == W: only square images are supported")
    return shape


def _resolution_plan(size: int) -> tuple[int, int]:
    """(base, doublings) with base * 2**doublings == size and base in 4..7: 28 -> (7, 2), 32 -> (4, 3)."""
    for doublings in range(1, 8):
        base, rest = divmod(size, 2 ** doublings)
        if rest == 0 and 4 <= base <= 7:
            return base, doublings
    raise ValueError(f"image size {size} is not supported: it must be 4..7 times a power of two (28, 32, 64, ...)")


def dcgan_init_(module: nn.Module) -> None:
    """DCGAN init: conv weights ~ N(0, 0.02), BatchNorm weights ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """Conditional DCGAN generator: [z, embed(label)] -> image in [-1, 1]."""

    def __init__(self, *, image_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, z_dim: int = 100,
                 embed_dim: int = 10, ngf: int = 64):
        super().__init__()
        channels, height, width = _check_sizes(image_shape, num_classes=num_classes, z_dim=z_dim, embed_dim=embed_dim,
                                               ngf=ngf)
        base, doublings = _resolution_plan(height)
        self.config = dict(image_shape=tuple(image_shape), num_classes=num_classes, z_dim=z_dim,
                           embed_dim=embed_dim, ngf=ngf)
        self.num_classes, self.z_dim = num_classes, z_dim
        self.label_embedding = nn.Embedding(num_classes, embed_dim)
        width_mult = 2 ** (doublings - 1)
        layers: list[nn.Module] = [  # (B, z+e, 1, 1) -> (B, ngf*2^(n-1), base, base)
            nn.ConvTranspose2d(z_dim + embed_dim, ngf * width_mult, base, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * width_mult), nn.ReLU(True)]
        for _ in range(doublings - 1):  # each block doubles the resolution and halves the width
            layers += [nn.ConvTranspose2d(ngf * width_mult, ngf * width_mult // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(ngf * width_mult // 2), nn.ReLU(True)]
            width_mult //= 2
        layers += [nn.ConvTranspose2d(ngf, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        dcgan_init_(self)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        x = torch.cat([z, self.label_embedding(labels)], dim=1)  # (B, z_dim + embed_dim)
        # The first layer, a transposed convolution of a 1x1 input, is a matrix product: computed as one, since
        # convolution kernels are slow at it, grouped ones (K clients under vmap) most (benchmarks/RESULTS.md)
        first = self.main[0].weight  # (z_dim + embed_dim, C', base, base)
        x = F.linear(x, first.flatten(1).t()).view(-1, *first.shape[1:])  # (B, C', base, base)
        return self.main[1:](x)  # (B, C, H, W)


class SpectralConv2d(nn.Conv2d):
    """A convolution whose weight is divided by its largest singular value sigma(W), W its [out, in x kh x kw]
    matrix (spectral normalisation, Miyato et al., ICLR 2018): a D made of such layers is Lipschitz-bounded.

    sigma is estimated by one power iteration each forward pass in training from the vector u, a buffer, so the
    estimate sharpens as W moves slowly: v = W^T u / |W^T u|, u = W v / |W v|, sigma = u^T W v, the gradient flowing
    through W only. As a buffer u travels and is aggregated as BatchNorm's statistics are: every client starts a
    round from the global u, so the clients' u stay aligned and their average is the next round's warm start (its
    length does not matter: the next iteration normalises it).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.register_buffer("u", F.normalize(torch.randn(self.out_channels), dim=0))

    def normalised_weight(self) -> Tensor:
        matrix = self.weight.flatten(1)  # (out, in x kh x kw)
        u = self.u
        with torch.no_grad():
            if self.training:  # one power iteration, its u kept for the next pass
                u = F.normalize(matrix @ F.normalize(matrix.t() @ u, dim=0), dim=0)
                self.u.copy_(u)
            v = F.normalize(matrix.t() @ u, dim=0)
        return self.weight / (u @ matrix @ v)

    def forward(self, images: Tensor) -> Tensor:
        return self._conv_forward(images, self.normalised_weight(), self.bias)


class Discriminator(nn.Module):
    """Conditional DCGAN discriminator. conditioning="channel": the label enters as an extra learned image channel;
    "projection" (Miyato & Koyama, ICLR 2018): D's logit is psi(phi(x)) + <embed(y), phi(x)>, the inner product of a
    learned embedding of the label with the features phi(x) that the last layer reads. norm="batch": batch norm in
    the hidden blocks (DCGAN); "spectral": every convolution spectrally normalised (SpectralConv2d) and no batch norm,
    as in SN-GAN (the label's embeddings are not normalised)."""

    def __init__(self, *, image_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, ndf: int = 64,
                 conditioning: str = "channel", norm: str = "batch"):
        super().__init__()
        channels, height, width = _check_sizes(image_shape, num_classes=num_classes, ndf=ndf)
        require(conditioning in D_CONDITIONINGS, "conditioning", conditioning, f"one of {list(D_CONDITIONINGS)}")
        require(norm in D_NORMS, "norm", norm, f"one of {list(D_NORMS)}")
        base, doublings = _resolution_plan(height)
        self.config = dict(image_shape=tuple(image_shape), num_classes=num_classes, ndf=ndf, conditioning=conditioning,
                           norm=norm)
        self.num_classes, self.image_size, self.conditioning = num_classes, height, conditioning
        if conditioning == "channel":  # made first: the order the random initialisation draws in
            self.label_channel = nn.Embedding(num_classes, height * width)
        else:  # one phi(x)-sized vector a label; phi(x) has the width of the last block times base x base
            self.label_projection = nn.Embedding(num_classes, ndf * 2 ** (doublings - 1) * base * base)
        in_channels = channels + 1 if conditioning == "channel" else channels
        conv = SpectralConv2d if norm == "spectral" else nn.Conv2d
        layers: list[nn.Module] = [conv(in_channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        width_mult = 1
        for _ in range(doublings - 1):  # each block halves the resolution and doubles the width
            layers += [conv(ndf * width_mult, ndf * width_mult * 2, 4, 2, 1, bias=False),
                       *([nn.BatchNorm2d(ndf * width_mult * 2)] if norm == "batch" else []), nn.LeakyReLU(0.2, True)]
            width_mult *= 2
        layers += [conv(ndf * width_mult, 1, base, 1, 0, bias=False)]  # (B, 1, 1, 1)
        self.main = nn.Sequential(*layers)
        dcgan_init_(self)
        if conditioning == "projection":
            nn.init.normal_(self.label_projection.weight, 0.0, 0.02)  # on the scale of the last layer's weights

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        if self.conditioning == "channel":
            size = self.image_size
            label_map = self.label_channel(labels).view(-1, 1, size, size)  # (B, 1, H, W)
            images = torch.cat([images, label_map], dim=1)
        features = self.main[:-1](images).flatten(1)  # (B, C', base, base) -> (B, F): phi(x)
        # the last layer's kernel covers the whole map: a matrix product, computed as one (as in the Generator)
        last = self.main[-1]
        weight = last.normalised_weight() if isinstance(last, SpectralConv2d) else last.weight
        logits = F.linear(features, weight.flatten(1)).flatten()  # (B,)
        if self.conditioning == "projection":
            logits = logits + (self.label_projection(labels) * features).sum(1)  # + <embed(y), phi(x)>
        return logits


def build_models(config: FedConfig) -> tuple[Generator, Discriminator]:
    """G and D for the config's dataset, freshly initialised from the current torch RNG."""
    info = DATASETS[config.dataset]
    generator = Generator(image_shape=info.image_shape, num_classes=info.num_classes, z_dim=config.z_dim,
                          embed_dim=config.embed_dim, ngf=config.ngf)
    discriminator = Discriminator(image_shape=info.image_shape, num_classes=info.num_classes, ndf=config.ndf,
                                  conditioning=config.d_conditioning, norm=config.d_norm)
    return generator, discriminator


def norm_state_keys(module: nn.Module) -> set[str]:
    """State-dict keys of the BatchNorm layers (weights, biases and running statistics)."""
    keys = set()
    for prefix, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            keys.update(f"{prefix}.{name}" for name in m.state_dict())
    return keys


GENERATE_CHUNK = 1000  # images a forward pass of generate(): a large request costs one chunk's activations


def _as_labels(labels: Any, num_classes: int) -> Tensor:
    """A request's labels as an int64 tensor [N]; anything but a non-empty 1-D list of class indices is refused."""
    allowed = f"labels must be a non-empty list of integers in [0, {num_classes - 1}]"
    try:
        array = np.asarray(labels.detach().cpu() if isinstance(labels, Tensor) else labels)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{allowed}, got {labels!r:.80}") from error
    if (array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer)
            or array.min() < 0 or array.max() >= num_classes):
        raise ValueError(f"{allowed}, got {array.tolist()[:20]!r:.120} ({array.dtype}, shape {array.shape})")
    return torch.from_numpy(array.astype(np.int64))


@torch.no_grad()
def generate(generator: Generator, labels: Sequence[int] | Tensor, seed: int = 0,
             noise: Tensor | None = None) -> Tensor:
    """Images in [-1, 1] for the requested labels: [len(labels), C, H, W], on the generator's device.

    Uses the generator in eval mode (BatchNorm running statistics), GENERATE_CHUNK images at a time; `noise`
    [N, z_dim] overrides `seed`, whose noise is drawn a chunk at a time from one generator.
    """
    device = next(generator.parameters()).device
    labels = _as_labels(labels, generator.num_classes)
    seed = as_python(seed)
    require(is_int(seed) and 0 <= seed < 2 ** 63, "seed", seed, "an integer from 0 to 2**63 - 1")
    if noise is not None and (not isinstance(noise, Tensor) or tuple(noise.shape) != (len(labels), generator.z_dim)):
        shape = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(f"noise has shape {shape}, expected ({len(labels)}, {generator.z_dim})")
    draws = torch.Generator().manual_seed(seed)
    was_training = generator.training
    generator.eval()
    try:
        images = []
        for start in range(0, len(labels), GENERATE_CHUNK):
            chunk = labels[start:start + GENERATE_CHUNK]
            z = (noise[start:start + GENERATE_CHUNK] if noise is not None
                 else torch.randn(len(chunk), generator.z_dim, generator=draws))
            images.append(generator(z.to(device), chunk.to(device)))
        return torch.cat(images)
    finally:
        generator.train(was_training)
