"""Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models"), with k = 3 nearest neighbours as in the paper.

Each set of feature vectors estimates its manifold as the union of balls around its points, the radius of
point phi being the distance to its k-th nearest neighbour within its own set (itself excluded):

    f(phi, Phi) = 1  if  ||phi - phi'|| <= NND_k(phi')  for some phi' in Phi,  else 0
    precision   = mean_{phi_g in Phi_g} f(phi_g, Phi_r)      (generated samples that fall on the real manifold)
    recall      = mean_{phi_r in Phi_r} f(phi_r, Phi_g)      (real samples that fall on the generated manifold)

Distances are computed in float64, in blocks, so memory stays O(block x N).
"""

from __future__ import annotations

import torch

from .base import SampleSet
from .features import FeatureMetric


def _as_features(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.ndim != 2:
        raise ValueError(f"{name} must be an (N, d) feature matrix, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def kth_neighbour_radii(features: torch.Tensor, k: int = 3, block: int = 1024) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (the point itself excluded), float64 (N,)."""
    f = _as_features(features, "features")
    if not 1 <= k < f.shape[0]:
        raise ValueError(f"k must lie in 1..{f.shape[0] - 1} (fewer than the {f.shape[0]} points), got {k}")
    radii = []
    for start in range(0, f.shape[0], block):
        d = torch.cdist(f[start : start + block], f)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the smallest distance is the point itself (0)
    return torch.cat(radii)


def manifold_coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """f(q, support) for every query row: whether it lies in some ball B(support_j, radii_j); bool (Nq,)."""
    inside = []
    for start in range(0, queries.shape[0], block):
        d = torch.cdist(queries[start : start + block], support)
        inside.append((d <= radii.unsqueeze(0)).any(dim=1))
    return torch.cat(inside)


def precision_recall(real_features, fake_features, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of generated features against real ones, with k-NN manifold estimates."""
    real = _as_features(real_features, "real_features")
    fake = _as_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real_features and fake_features must have the same dimension, got {real.shape[1]} and {fake.shape[1]}")
    precision = manifold_coverage(fake, real, kth_neighbour_radii(real, k)).double().mean()
    recall = manifold_coverage(real, fake, kth_neighbour_radii(fake, k)).double().mean()
    return float(precision), float(recall)


class PrecisionRecall(FeatureMetric):
    """``precision`` and ``recall`` (k nearest neighbours) of the samples against a reference data set, in a
    feature space (default: the digits classifier's, as for ``fd``)."""

    name = "precision_recall"
    keys = ("precision", "recall")

    def __init__(self, k: int = 3, features: str | None = None, reference: str = "digits", **feature_kwargs):
        if int(k) < 1:
            raise ValueError(f"precision_recall: k must be >= 1, got {k}")
        self.k = int(k)
        super().__init__(features, reference, **feature_kwargs)

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        real, fake = self.features(samples)
        precision, recall = precision_recall(real, fake, self.k)
        return {"precision": precision, "recall": recall}
