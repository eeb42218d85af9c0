"""Precision, recall, density and coverage (fedgan/manifolds.py): a hand-made case, agreement with the reference
implementation (prdc, Naeem et al.) on random features, a dropped mode, and the Evaluator's figures."""
import numpy as np
import pytest
import torch
from prdc import compute_prdc

from fedgan.manifolds import knn_radii, manifold_metrics


def test_a_hand_made_case_on_a_line():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    fake = torch.tensor([[0.5], [10.0]], dtype=torch.float64)
    assert knn_radii(real, 1).tolist() == [1.0, 1.0, 1.0, 1.0] and knn_radii(fake, 1).tolist() == [9.5, 9.5]
    # 0.5 lies in the balls of 0 and 1, 10 in none: precision 1/2, density (2 + 0) / 2 / k; the balls of 0 and 1
    # hold a fake, those of 2 and 3 none: coverage 1/2; every real point lies in a fake's ball of radius 9.5
    assert manifold_metrics(real, fake, k=1) == {"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5}


@pytest.mark.parametrize("k", [1, 5])
def test_the_figures_equal_prdcs_on_random_features(k, capsys, monkeypatch):
    monkeypatch.setattr("fedgan.manifolds.BLOCK", 64)  # several blocks of rows, as 10,000 points take
    rng = np.random.default_rng(k)
    real = rng.normal(size=(300, 8))
    fake = rng.normal(size=(250, 8)) * np.linspace(0.5, 1.5, 8) + 0.3
    expected = compute_prdc(real, fake, nearest_k=k)
    got = manifold_metrics(torch.from_numpy(real), torch.from_numpy(fake), k=k)
    assert got == {key: pytest.approx(float(value), abs=1e-12) for key, value in expected.items()}


def test_a_generator_that_drops_a_mode_keeps_its_precision_and_loses_coverage():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [20.0, 0.0]])
    real = torch.cat([c + torch.randn(500, 2, generator=gen) for c in centres])
    one_mode = centres[0] + torch.randn(1000, 2, generator=gen)
    both = torch.cat([c + torch.randn(500, 2, generator=gen) for c in centres])
    dropped, kept = manifold_metrics(real, one_mode), manifold_metrics(real, both)
    assert dropped["precision"] > 0.9 and kept["precision"] > 0.9
    assert dropped["coverage"] < 0.55 < 0.9 < kept["coverage"]
    assert dropped["recall"] < 0.55 < 0.9 < kept["recall"]
    with pytest.raises(ValueError, match=r"k=1000 is not allowed: an integer from 1 to 999"):
        manifold_metrics(real, one_mode, k=1000)
