"""Frechet distances of generated samples to a reference data set, as named benchmark metrics.

``fd``: in the digits classifier's feature space (the embedded default; Heusel et al. 2017's FID with the
digits CNN in place of Inception-v3).  ``fid``: Inception FID, in the pool3 space of the FID Inception-v3
loaded from a local weights file.  Both fit a Gaussian to each feature set
(:func:`~steerdiff.metrics.frechet.feature_statistics`) and return
FD = ||mu_g - mu_r||^2 + tr(S_g) + tr(S_r) - 2 tr((S_g S_r)^{1/2})
(:func:`~steerdiff.metrics.frechet.frechet_distance`, float64).
"""

from __future__ import annotations

from .base import SampleSet
from .features import FeatureMetric
from .frechet import feature_statistics, frechet_distance


class FrechetDistance(FeatureMetric):
    """``fd``: Frechet distance in a feature space (default the digits classifier's) to a reference set."""

    name = "fd"
    keys = ("fd",)

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        real, fake = self.features(samples)
        mu_r, s_r = feature_statistics(real)
        mu_g, s_g = feature_statistics(fake)
        return {self.keys[0]: frechet_distance(mu_g, s_g, mu_r, s_r)}


class InceptionFID(FrechetDistance):
    """``fid``: Frechet Inception Distance; kwargs ``weights`` (a local FID Inception weights file, required),
    ``allow_pickle`` (needed for a ``.pth`` file), ``batch_size``, ``device``, ``reference``."""

    name = "fid"
    keys = ("fid",)
    default_features = "inception"
