"""Precision, recall, density and coverage: whether generated samples lie on the real data's manifold, and how much of
it they cover, each manifold estimated by k-nearest-neighbour balls in a feature space.

Precision and recall are Kynkaanniemi et al. (NeurIPS 2019): a sample is on a manifold when it falls inside the ball
of some point of it, the ball's radius that point's distance to its k-th nearest neighbour. Density and coverage are
Naeem et al. (ICML 2020): density counts how many real balls hold each generated sample (1 on average for samples
like the real ones, more where they crowd), coverage is the share of real points whose ball holds a generated
sample, so it falls when a generator drops a mode (a rare class of a skewed split, say). FID cannot tell the two
failures apart. Distances are computed in blocks of rows, so 10,000 x 10,000 pairs never sit in memory at once.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor
BLOCK = 1024  # rows of a distance block: [BLOCK, N] distances at a time


def knn_radii(features: Tensor, k: int) -> Tensor:
    """Each point's distance to its k-th nearest other point: [N] (the point itself, at distance 0, not counted)."""
    return torch.cat([torch.cdist(features[i:i + BLOCK], features).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(features), BLOCK)])


def manifold_metrics(real: Tensor, fake: Tensor, k: int = 5, real_radii: Tensor | None = None) -> dict[str, float]:
    """precision, recall, density and coverage of `fake` [M, F] against `real` [N, F], with k-NN balls; computed in
    the features' dtype. `real_radii` (knn_radii(real, k)) may be given when one real set scores many fakes."""
    if not (1 <= k < min(len(real), len(fake))):
        raise ValueError(f"k={k} is not allowed: an integer from 1 to {min(len(real), len(fake)) - 1} (fewer than "
                         f"the {len(real)} real and {len(fake)} generated points)")
    real_radii = knn_radii(real, k) if real_radii is None else real_radii  # (N,)
    fake_radii = knn_radii(fake, k)  # (M,)
    balls_holding = torch.zeros(len(fake), dtype=torch.long)  # per fake: real balls it lies in
    recalled = torch.zeros(len(real), dtype=torch.bool)  # per real: inside some fake ball
    covered = torch.zeros(len(real), dtype=torch.bool)  # per real: its own ball holds a fake
    for i in range(0, len(real), BLOCK):
        distances = torch.cdist(real[i:i + BLOCK], fake)  # (b, M)
        inside_real = distances < real_radii[i:i + BLOCK, None]  # fake j in real ball i
        balls_holding += inside_real.sum(0).cpu()
        recalled[i:i + BLOCK] = (distances < fake_radii[None, :]).any(1).cpu()
        covered[i:i + BLOCK] = inside_real.any(1).cpu()
    return {"precision": float((balls_holding > 0).double().mean()), "recall": float(recalled.double().mean()),
            "density": float(balls_holding.double().mean() / k), "coverage": float(covered.double().mean())}
