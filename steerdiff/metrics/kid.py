"""Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimate of the squared
maximum mean discrepancy between two feature sets under the cubic polynomial kernel

    k(x, y) = (x . y / d + 1)^3,
    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2,

averaged over ``subsets`` random subsets of m = min(n_x, n_y, subset_size) features drawn without replacement from
each side (clean-fid's and torch-fidelity's defaults: 100 subsets of 1,000), reported as the mean and the standard
deviation over subsets (ddof 0, as torch-fidelity).  With one subset of all samples of two equal-sized sets it is
the full unbiased estimate.  Unlike FID it is unbiased in the number of samples.  Computed in float64.
"""

from __future__ import annotations

import numpy as np
import torch


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased MMD^2 of two (m, d) feature sets of one size m >= 2 (module docstring)."""
    m = x.shape[0]
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    off = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(off - 2 * kxy.sum() / m**2)


def kernel_inception_distance(features1, features2, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """(mean, standard deviation) of the unbiased MMD^2 over ``subsets`` subsets (module docstring); subsets are
    drawn with ``numpy.random.default_rng(seed)``."""
    x = torch.as_tensor(np.asarray(features1), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(features2), dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"KID needs two (N, d) feature sets of one dimension, got {tuple(x.shape)} and {tuple(y.shape)}")
    if int(subsets) < 1 or int(subset_size) < 2:
        raise ValueError(f"kid subsets must be >= 1 and the subset size >= 2, got {subsets} and {subset_size}")
    m = min(x.shape[0], y.shape[0], int(subset_size))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features on each side, got {x.shape[0]} and {y.shape[0]}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(subsets)):
        i = torch.from_numpy(rng.choice(x.shape[0], m, replace=False))
        j = torch.from_numpy(rng.choice(y.shape[0], m, replace=False))
        values.append(mmd2_unbiased(x[i], y[j]))
    return float(np.mean(values)), float(np.std(values))


__all__ = ["kernel_inception_distance", "mmd2_unbiased", "polynomial_kernel"]
