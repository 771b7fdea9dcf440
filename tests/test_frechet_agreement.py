"""steerdiff's Frechet distance against the textbook formula (scipy.linalg.sqrtm, as pytorch-fid computes it) and
against torchmetrics' FID formula, on random features.  The 2048-d / 10,000-sample speed comparison is
benchmarks/frechet_speed.py."""

import numpy as np
import pytest
import torch

from steerdiff.metrics.frechet import feature_statistics, frechet_distance


from benchmarks.frechet_speed import textbook_fd


def _feature_sets(d: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    a = rng.normal(size=(n, d)) @ mix
    b = rng.normal(loc=0.1, size=(n, d)) @ (mix + 0.2 * rng.normal(size=(d, d)) / np.sqrt(d))
    return feature_statistics(a), feature_statistics(b)


@pytest.mark.parametrize("d,n", [(64, 500), (128, 600)])
def test_agrees_with_scipy_sqrtm_textbook_formula(d, n):
    (mu1, s1), (mu2, s2) = _feature_sets(d, n)
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = textbook_fd(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy())
    assert ours == pytest.approx(ref, rel=1e-6)


def test_equals_torchmetrics_fid_formula():
    from torchmetrics.image.fid import _compute_fid

    (mu1, s1), (mu2, s2) = _feature_sets(64, 500, seed=1)
    ours = frechet_distance(mu1, s1, mu2, s2)
    theirs = float(_compute_fid(mu1, s1, mu2, s2))  # float64 inputs: eigvals of S1 S2
    assert ours == pytest.approx(theirs, rel=1e-8)


def test_identical_statistics_give_zero():
    (mu, s), _ = _feature_sets(32, 200)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(mu, s, mu + torch.ones_like(mu), s) == pytest.approx(32.0, rel=1e-8)


def test_singular_covariance_agrees_with_the_swapped_order():
    # 20 samples in 50 dimensions: S1 is singular (no Cholesky factor), S2 is not; FD is symmetric in its arguments
    g = torch.Generator().manual_seed(4)
    mu1, s1 = feature_statistics(torch.randn(20, 50, generator=g, dtype=torch.float64))
    mu2, s2 = feature_statistics(torch.randn(200, 50, generator=g, dtype=torch.float64) * 1.3)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-6)
