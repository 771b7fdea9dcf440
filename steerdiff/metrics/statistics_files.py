"""Statistics and feature files that pytorch-fid, clean-fid and steerdiff read and write.

- Statistics: a ``.npz`` with ``mu`` (d,) and ``sigma`` (d, d), pytorch-fid's ``--save-stats`` format and clean-fid's
  ``*_clean_*.npz`` reference statistics; written in float64.
- Features: a ``.npz`` with ``features`` (N, d) (steerdiff's ``--save-features``) or ``feats`` (clean-fid's KID
  statistics ``*_kid.npz``); KID and precision / recall need them, FID needs only the statistics.

Files are read with ``allow_pickle=False``: an object array is refused, never unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic_io import atomic_write
from .frechet import feature_statistics


@dataclass
class FeatureSet:
    """One side of a comparison: its features (when known), their mean and covariance (float64), and where from."""

    source: str
    mu: torch.Tensor
    sigma: torch.Tensor
    count: int | None
    features: torch.Tensor | None = None

    @classmethod
    def of_features(cls, features: torch.Tensor, source: str) -> "FeatureSet":
        mu, sigma = feature_statistics(features)
        return cls(source, mu, sigma, int(features.shape[0]), features)


def load_statistics_file(path: str | Path) -> FeatureSet:
    """A pytorch-fid / clean-fid statistics file or a features file (module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"statistics file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            arrays = {k: np.asarray(f[k]) for k in keys & {"mu", "sigma", "features", "feats"}}
    except (OSError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not a readable .npz of numeric arrays ({err})") from None
    feats = arrays.get("features", arrays.get("feats"))
    if feats is not None:
        if feats.ndim != 2:
            raise ValueError(f"{str(path)!r}: features must be (N, d), got shape {feats.shape}")
        return FeatureSet.of_features(torch.from_numpy(feats.astype(np.float64)), str(path))
    if "mu" not in arrays or "sigma" not in arrays:
        raise ValueError(f"{str(path)!r} holds {sorted(keys)}; a statistics file holds mu and sigma (pytorch-fid, "
                         "clean-fid) or features / feats")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{str(path)!r}: mu must be (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
    return FeatureSet(str(path), torch.from_numpy(mu), torch.from_numpy(sigma), None)


def save_statistics(path: str | Path, features: FeatureSet) -> Path:
    """``mu`` and ``sigma`` (pytorch-fid's format), written atomically."""
    return _write(path, mu=features.mu.numpy(), sigma=features.sigma.numpy())


def save_features(path: str | Path, features: FeatureSet) -> Path:
    """``features`` with ``mu`` and ``sigma`` beside them (so the file also serves as a statistics file)."""
    if features.features is None:
        raise ValueError(f"{features.source} has statistics only; features come from a folder of images")
    return _write(path, features=features.features.numpy(), mu=features.mu.numpy(), sigma=features.sigma.numpy())


def _write(path: str | Path, **arrays) -> Path:
    path = Path(path).expanduser()
    if path.suffix != ".npz":
        raise ValueError(f"output {str(path)!r} must end in .npz")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)
    return path


__all__ = ["FeatureSet", "load_statistics_file", "save_features", "save_statistics"]
