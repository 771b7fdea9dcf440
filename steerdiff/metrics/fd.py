"""Frechet distances of generated samples to a reference data set, as named benchmark metrics.

``fd``: in the digits classifier's feature space (the embedded default; Heusel et al. 2017's FID with the
digits CNN in place of Inception-v3).  ``fid``: Inception FID, in the pool3 space of the FID Inception-v3
loaded from a local weights file.  Both fit a Gaussian to each feature set
(:func:`~steerdiff.metrics.frechet.feature_statistics`) and return
FD = ||mu_g - mu_r||^2 + tr(S_g) + tr(S_r) - 2 tr((S_g S_r)^{1/2})
(:func:`~steerdiff.metrics.frechet.frechet_distance`, float64).
"""

from __future__ import annotations

from .base import Metric, SampleSet
from .features import make_feature_space, reference_features, reference_id
from .frechet import feature_statistics, frechet_distance


class FrechetDistance(Metric):
    """``fd``: Frechet distance in a feature space (default the digits classifier's) to a reference set."""

    name = "fd"
    keys = ("fd",)
    default_features = "digits"

    def __init__(self, features: str | None = None, reference: str = "digits", **feature_kwargs):
        self.space = make_feature_space(features or self.default_features, **feature_kwargs)
        self.reference = reference

    def fingerprint(self) -> str:
        return f"{self.name}:{self.space.key()}:{reference_id(self.reference)}"

    def check(self, sample_shape, denoiser=None) -> None:
        self.space.check(sample_shape)

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        mu_r, s_r = feature_statistics(reference_features(self.space, self.reference, samples.cache_dir))
        mu_g, s_g = feature_statistics(samples.features(self.space))
        return {self.keys[0]: frechet_distance(mu_g, s_g, mu_r, s_r)}


class InceptionFID(FrechetDistance):
    """``fid``: Frechet Inception Distance; kwargs ``weights`` (a local FID Inception weights file, required),
    ``allow_pickle`` (needed for a ``.pth`` file), ``batch_size``, ``device``, ``reference``."""

    name = "fid"
    keys = ("fid",)
    default_features = "inception"
