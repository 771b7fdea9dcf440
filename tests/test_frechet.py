"""frechet_distance against a slow scipy.linalg.sqrtm reference, and its invariants and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steerdiff.metrics.frechet import feature_statistics, frechet_distance, frechet_distance_from_features, trace_sqrt_product


from benchmarks.frechet_speed import textbook_fd as reference_fd  # the textbook route (pytorch-fid), scipy's sqrtm


def random_covariance(rng, d, rank=None, scale=1.0):
    rank = d if rank is None else rank
    a = rng.standard_normal((d, rank)) * scale
    return a @ a.T / rank


@pytest.mark.parametrize("d", [1, 2, 8, 64])
def test_matches_scipy_reference_full_rank(d):
    rng = np.random.default_rng(d)
    for _ in range(3):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1 = random_covariance(rng, d) + 0.1 * np.eye(d)
        s2 = random_covariance(rng, d, scale=2.0) + 0.1 * np.eye(d)
        expected = reference_fd(mu1, s1, mu2, s2)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8, abs=1e-8)


@pytest.mark.parametrize("rank", [1, 5, 31])
def test_matches_reference_nearly_singular(rank):
    """Rank-deficient covariances plus a tiny ridge: sqrtm still converges, and the eigenvalue route agrees."""
    rng = np.random.default_rng(100 + rank)
    d = 32
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1 = random_covariance(rng, d, rank=rank) + 1e-6 * np.eye(d)
    s2 = random_covariance(rng, d, rank=rank) + 1e-6 * np.eye(d)
    expected = reference_fd(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6, abs=1e-5)


def test_exactly_singular_covariances():
    """Fewer samples than dimensions: exact zeros in the spectrum are handled (no nan, no complex part)."""
    rng = np.random.default_rng(7)
    f1 = rng.standard_normal((10, 40))
    f2 = rng.standard_normal((10, 40)) + 0.5
    mu1, s1 = feature_statistics(f1)
    mu2, s2 = feature_statistics(f2)
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(fd) and fd > 0
    # reference: the same eigenvalue route in numpy.  The 31 zero eigenvalues come out as +-1e-16 round-off
    # whose square roots (~1e-8) limit agreement between any two implementations to ~sqrt(machine eps).
    w, v = np.linalg.eigh(s1.numpy())
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2.numpy() @ root), 0, None)).sum()
    diff = (mu1 - mu2).numpy()
    expected = diff @ diff + np.trace(s1.numpy()) + np.trace(s2.numpy()) - 2 * tr
    assert fd == pytest.approx(expected, rel=1e-7)
    # and scipy's sqrtm with a 1e-9 ridge (pytorch-fid's fix for singular products) agrees to the ridge's effect
    ridge = 1e-9 * np.eye(40)
    assert fd == pytest.approx(reference_fd(mu1.numpy(), s1.numpy() + ridge, mu2.numpy(), s2.numpy() + ridge), rel=1e-5)


def test_identical_distributions_give_zero():
    rng = np.random.default_rng(1)
    for rank in (3, 16):
        mu = rng.standard_normal(16)
        s = random_covariance(rng, 16, rank=rank)
        assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)


def test_a_round_off_negative_becomes_zero_and_a_real_distance_is_exact():
    """The unclamped formula tr S + tr S - 2 tr (S S)^(1/2) of two identical covariances comes out a tiny negative
    for some S (round-off); frechet_distance returns exactly 0 there.  Equal covariances with means a apart give
    ||a||^2, unclamped."""
    from steerdiff.metrics.frechet import _trace_sqrt

    rng = np.random.default_rng(5)
    for _ in range(200):
        s = torch.as_tensor(random_covariance(rng, 12))
        raw = float(2 * torch.trace(s) - 2 * _trace_sqrt(s, s))
        if raw < 0:
            break
    assert raw < 0, "no covariance with a negative round-off found"
    assert frechet_distance(np.zeros(12), s, np.zeros(12), s) == 0.0
    shift = np.linspace(-1, 1, 12)
    assert frechet_distance(np.zeros(12), s, shift, s) == pytest.approx(float(shift @ shift) + raw, rel=0, abs=1e-12)


def test_symmetric_in_its_arguments():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    s1, s2 = random_covariance(rng, 12, rank=4), random_covariance(rng, 12)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9, abs=1e-9)


def test_closed_form_for_diagonal_covariances():
    """Diagonal S1, S2: FD = ||mu1 - mu2||^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    a = np.array([1.0, 4.0, 0.25, 0.0])
    b = np.array([9.0, 1.0, 0.25, 2.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = 1 + 4 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0 + 2.0
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert trace_sqrt_product(np.diag(a), np.diag(b)) == pytest.approx(3 + 2 + 0.25 + 0, rel=1e-12)


def test_accepts_torch_and_numpy_of_any_float_dtype_and_returns_float():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = random_covariance(rng, 6), random_covariance(rng, 6)
    ref = frechet_distance(mu1, s1, mu2, s2)
    got = frechet_distance(torch.tensor(mu1), torch.tensor(s1), torch.tensor(mu2, dtype=torch.float32), s2.astype(np.float32))
    assert isinstance(ref, float) and isinstance(got, float)
    assert got == pytest.approx(ref, rel=1e-5)


def test_feature_statistics_match_numpy():
    rng = np.random.default_rng(4)
    f = rng.standard_normal((50, 5)).astype(np.float32)
    mu, sigma = feature_statistics(torch.from_numpy(f))
    assert mu.dtype == torch.float64 and sigma.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), f.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(f.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
    assert frechet_distance_from_features(f, f) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros((2, 2)), np.eye(2), np.zeros(2), np.eye(2)), "mu1"),
        ((np.zeros(2), np.eye(2), np.zeros(3), np.eye(2)), "mu2"),
        ((np.zeros(2), np.eye(3), np.zeros(2), np.eye(2)), "sigma1"),
        ((np.zeros(2), np.eye(2), np.zeros(2), np.ones(2)), "sigma2"),
        ((np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2)), "sigma1 must be symmetric"),
        ((np.array([0.0, np.nan]), np.eye(2), np.zeros(2), np.eye(2)), "mu1 contains non-finite"),
        ((np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, np.inf])), "sigma2 contains non-finite"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(*args)


def test_feature_statistics_rejects_bad_shapes():
    with pytest.raises(ValueError, match="features must be a 2-D"):
        feature_statistics(np.zeros(5))
    with pytest.raises(ValueError, match="at least 2 rows"):
        feature_statistics(np.zeros((1, 5)))
    with pytest.raises(ValueError, match="same feature dimension"):
        frechet_distance_from_features(np.zeros((3, 2)), np.zeros((3, 4)))
