"""The Frechet distance between two Gaussians, the statistic behind FID (Heusel et al. 2017).

For N(mu1, S1) and N(mu2, S2) the squared 2-Wasserstein (Frechet) distance is (Dowson & Landau 1982)

    FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

The trace of the matrix square root is computed without ``scipy.linalg.sqrtm``: S1 S2 is similar to the
symmetric positive semi-definite matrix M = S1^{1/2} S2 S1^{1/2} (conjugate by S1^{1/2}), so the
eigenvalues of (S1 S2)^{1/2} are the square roots of the eigenvalues of M and

    tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(M)),

with S1^{1/2} = U diag(sqrt(l)) U^T from the eigendecomposition S1 = U diag(l) U^T (``torch.linalg.eigh``).
Everything is float64; eigenvalues that round-off makes slightly negative are clamped to 0 (covariances
are positive semi-definite, and a rank-deficient S1 or S2 -- fewer samples than dimensions, or dead
features -- is handled without the complex parts ``sqrtm`` produces).  Unlike the iterative ``sqrtm``
route this needs no diagonal offset for nearly singular covariances.

``feature_statistics(features)`` gives (mu, sigma) of an (N, d) feature matrix: the mean and the unbiased
covariance (divisor N - 1), as in the reference FID implementations.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_float64(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a numpy array or torch tensor of real numbers, got {type(x).__name__}") from err
    if t.is_complex():
        raise TypeError(f"{name} must be real, got a complex array")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return t


def _check_covariance(sigma: torch.Tensor, name: str, d: int) -> torch.Tensor:
    if sigma.ndim != 2 or sigma.shape != (d, d):
        raise ValueError(
            f"{name} must be a ({d}, {d}) covariance matrix to match the mean's dimension {d}, got shape {tuple(sigma.shape)}"
        )
    scale = float(sigma.abs().max()) if sigma.numel() else 0.0
    asym = float((sigma - sigma.T).abs().max()) if sigma.numel() else 0.0
    if asym > 1e-6 * max(scale, 1e-300) and asym > 1e-12:
        raise ValueError(f"{name} must be symmetric; max |{name} - {name}^T| = {asym:.3g} (max |entry| {scale:.3g})")
    return 0.5 * (sigma + sigma.T)


def _sqrt_psd(sigma: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix via its eigendecomposition, negative eigenvalues clamped to 0."""
    evals, evecs = torch.linalg.eigh(sigma)
    return (evecs * _clamp_round_off(evals).sqrt()) @ evecs.T


def _trace_sqrt(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    # With S1 = R R^T, M = R^T S2 R is symmetric PSD with the eigenvalues of S2 S1 (hence of S1 S2).  A Cholesky
    # factor is the cheap R; a singular S1 (fewer samples than dimensions, dead features) has none and takes the
    # symmetric square root instead.
    chol, info = torch.linalg.cholesky_ex(s1)
    root = chol if int(info) == 0 else _sqrt_psd(s1)
    m = root.T @ s2 @ root
    m = 0.5 * (m + m.T)
    return _clamp_round_off(torch.linalg.eigvalsh(m)).sqrt().sum()


def _clamp_round_off(evals: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix with those below its numerical rank's tolerance (d * eps * max) set to 0.

    Round-off leaves the zero eigenvalues of a rank-deficient matrix at about +-eps * max; their square roots
    (~sqrt(eps) relative) would otherwise add noise of order 1e-8 to the trace and break its symmetry in S1, S2."""
    tol = evals.numel() * torch.finfo(evals.dtype).eps * evals.abs().max().clamp_min(torch.finfo(evals.dtype).tiny)
    return torch.where(evals > tol, evals, torch.zeros_like(evals))


def trace_sqrt_product(sigma1, sigma2) -> float:
    """tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(S1^{1/2} S2 S1^{1/2})) for PSD S1, S2 (float64)."""
    s1 = _as_float64(sigma1, "sigma1")
    if s1.ndim != 2 or s1.shape[0] != s1.shape[1]:
        raise ValueError(f"sigma1 must be a square matrix, got shape {tuple(s1.shape)}")
    d = s1.shape[0]
    s1 = _check_covariance(s1, "sigma1", d)
    s2 = _check_covariance(_as_float64(sigma2, "sigma2"), "sigma2", d)
    return float(_trace_sqrt(s1, s2))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}) between N(mu1, S1) and N(mu2, S2).

    ``mu1``, ``mu2``: shape (d,); ``sigma1``, ``sigma2``: symmetric PSD (d, d); numpy arrays or torch
    tensors of any real dtype, computed in float64.  Returns a Python float >= 0 (a round-off negative
    result is clamped to 0).  Raises ``ValueError`` naming the offending argument for a wrong shape,
    a dimension mismatch, a non-symmetric covariance or non-finite entries.
    """
    m1 = _as_float64(mu1, "mu1")
    m2 = _as_float64(mu2, "mu2")
    if m1.ndim != 1:
        raise ValueError(f"mu1 must be a 1-D mean vector of shape (d,), got shape {tuple(m1.shape)}")
    if m2.ndim != 1:
        raise ValueError(f"mu2 must be a 1-D mean vector of shape (d,), got shape {tuple(m2.shape)}")
    d = m1.shape[0]
    if d == 0:
        raise ValueError("mu1 must have at least one dimension, got shape (0,)")
    if m2.shape[0] != d:
        raise ValueError(f"mu2 must have shape ({d},) to match mu1, got shape {tuple(m2.shape)}")
    s1 = _check_covariance(_as_float64(sigma1, "sigma1"), "sigma1", d)
    s2 = _check_covariance(_as_float64(sigma2, "sigma2"), "sigma2", d)

    diff = m1 - m2
    fd = diff.dot(diff) + torch.trace(s1) + torch.trace(s2) - 2.0 * _trace_sqrt(s1, s2)
    return max(float(fd), 0.0)


def feature_statistics(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (divisor N - 1) of an (N, d) feature matrix, both float64 tensors.

    ``features``: numpy array or torch tensor with N >= 2 rows.
    """
    f = _as_float64(features, "features")
    if f.ndim != 2:
        raise ValueError(f"features must be a 2-D (N, d) matrix, got shape {tuple(f.shape)}")
    if f.shape[0] < 2:
        raise ValueError(f"features must have at least 2 rows (samples) to estimate a covariance, got {f.shape[0]}")
    if f.shape[1] < 1:
        raise ValueError("features must have at least one column (feature dimension), got 0")
    mu = f.mean(dim=0)
    centered = f - mu
    sigma = centered.T @ centered / (f.shape[0] - 1)
    return mu, 0.5 * (sigma + sigma.T)


def frechet_distance_from_features(features1, features2) -> float:
    """FD between the Gaussians fitted (``feature_statistics``) to two (N, d) feature matrices."""
    mu1, s1 = feature_statistics(features1)
    mu2, s2 = feature_statistics(features2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"features1 and features2 must have the same feature dimension, got {mu1.shape[0]} and {mu2.shape[0]}")
    return frechet_distance(mu1, s1, mu2, s2)


__all__ = ["feature_statistics", "frechet_distance", "frechet_distance_from_features", "trace_sqrt_product"]
