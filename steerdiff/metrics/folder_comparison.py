"""Compare two image sets, each a folder or a statistics / features file: what ``steerdiff fid`` reports.

``compare(path1, path2, space, ...)`` returns one dict: the Frechet distance in the feature space (``fid`` for
Inception, ``fd_dinov2``, ``fd_clip``), optionally KID (:mod:`steerdiff.metrics.kid`), precision / recall (k = 3,
Kynkaanniemi et al. 2019; path1 is the reference set, path2 the generated one) and bootstrap confidence intervals,
with the number of images each side had and the settings that produced the number.

The Frechet distance is computed in float64 without ``scipy.linalg.sqrtm`` (:mod:`steerdiff.metrics.frechet`).
With fewer images than the feature dimension (N <= d) a side's covariance is singular: its rank is at most N - 1,
so the distance measures mostly the missing directions and is not comparable with numbers computed from more
images.  That is an error unless ``allow_low_rank`` is set, and then the result says ``"low_rank": true``.

Bootstrap (``bootstrap=B``): each side's features are resampled with replacement B times and the distance recomputed;
the result gives the 2.5 / 97.5 percentiles and the standard deviation of those B values (it needs features, so a
statistics file cannot be bootstrapped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .features import NetworkFeatures
from .folder_features import folder_features
from .frechet import feature_statistics, frechet_distance
from .kid import kernel_inception_distance
from .precision_recall import precision_recall as pr
from .statistics_files import FeatureSet, load_statistics_file

FD_KEYS = {"inception": "fid", "dinov2": "fd_dinov2", "clip": "fd_clip"}


def load_side(path: str | Path, space: NetworkFeatures, **folder_options) -> FeatureSet:
    """Features of a folder of images (:func:`steerdiff.metrics.folder_features.folder_features`), or the
    statistics / features of an ``.npz`` file."""
    p = Path(path).expanduser()
    if p.suffix == ".npz" and not p.is_dir():
        return load_statistics_file(p)
    return FeatureSet.of_features(folder_features(p, space, **folder_options), str(p))


def check_rank(source: str, count: int | None, d: int, allow_low_rank: bool) -> bool:
    """Whether ``count`` images give a singular d x d covariance (True: low rank, allowed); an error unless allowed."""
    if count is None or count > d:
        return False
    if not allow_low_rank:
        raise ValueError(
            f"{source} has {count} images for {d}-dimensional features: its covariance has rank at most "
            f"{count - 1} < {d}, so the Frechet distance measures mostly the missing directions and is not "
            f"comparable with one computed from more images; use at least {d + 1} images (papers use 10,000-50,000), "
            "or pass --allow-low-rank to compute it anyway"
        )
    return True


def bootstrap_frechet(features1: torch.Tensor, features2: torch.Tensor, rounds: int, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(rounds)):
        i = torch.from_numpy(rng.integers(0, features1.shape[0], features1.shape[0]))
        j = torch.from_numpy(rng.integers(0, features2.shape[0], features2.shape[0]))
        values.append(frechet_distance(*feature_statistics(features1[i]), *feature_statistics(features2[j])))
    low, high = np.percentile(values, [2.5, 97.5])
    return {"low": float(low), "high": float(high), "std": float(np.std(values)), "rounds": int(rounds)}


def compare(side1: FeatureSet, side2: FeatureSet, space_name: str, *, kid: bool = False, kid_subsets: int = 100,
            kid_subset_size: int = 1000, precision_recall: bool = False, bootstrap: int = 0, seed: int = 0,
            allow_low_rank: bool = False) -> dict[str, Any]:
    """The comparison of two loaded sides (module docstring)."""
    if side1.mu.shape != side2.mu.shape:
        raise ValueError(f"{side1.source} has {side1.mu.shape[0]}-d features and {side2.source} {side2.mu.shape[0]}-d; "
                         "both sides must come from the same feature network")
    low_rank = [check_rank(s.source, s.count, int(s.mu.shape[0]), allow_low_rank) for s in (side1, side2)]
    key = FD_KEYS[space_name]
    out: dict[str, Any] = {key: frechet_distance(side1.mu, side1.sigma, side2.mu, side2.sigma),
                           "num_images": [side1.count, side2.count], "feature_dim": int(side1.mu.shape[0])}
    if any(low_rank):
        out["low_rank"] = True
    needs = [("--kid", kid), ("--precision-recall", precision_recall), ("--bootstrap", bootstrap > 0)]
    missing = [s.source for s in (side1, side2) if s.features is None]
    if missing and any(flag for _, flag in needs):
        asked = ", ".join(name for name, flag in needs if flag)
        raise ValueError(f"{asked} need features, and {', '.join(missing)} holds statistics only (mu, sigma); give "
                         "the folder, or a file written with --save-features")
    if kid:
        mean, std = kernel_inception_distance(side1.features, side2.features, kid_subsets, kid_subset_size, seed)
        out["kid"] = {"mean": mean, "std": std, "subsets": int(kid_subsets),
                      "subset_size": int(min(kid_subset_size, side1.count, side2.count))}
    if precision_recall:
        out["precision"], out["recall"] = pr(side1.features, side2.features, k=3)
    if bootstrap > 0:
        out[f"{key}_bootstrap_95"] = bootstrap_frechet(side1.features, side2.features, bootstrap, seed)
    return out


__all__ = ["FD_KEYS", "bootstrap_frechet", "check_rank", "compare", "load_side"]
