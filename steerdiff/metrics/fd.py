"""Frechet distances of generated samples to a reference data set, as named benchmark metrics.

``fd``: in the digits classifier's feature space (the embedded default; Heusel et al. 2017's FID with the
digits CNN in place of Inception-v3).  ``fid``: Inception FID, in the pool3 space of the FID Inception-v3
loaded from a local weights file; ``fd_dinov2``: in DINOv2's CLS-token space (Stein et al. 2023), from a local
transformers folder.  All fit a Gaussian to each feature set
(:func:`~steerdiff.metrics.frechet.feature_statistics`) and return
FD = ||mu_g - mu_r||^2 + tr(S_g) + tr(S_r) - 2 tr((S_g S_r)^{1/2})
(:func:`~steerdiff.metrics.frechet.frechet_distance`, float64).  ``kid``: the unbiased KID
(:mod:`steerdiff.metrics.kid`) in the Inception space.  Features come through the same path as ``steerdiff fid``'s
(:class:`~steerdiff.metrics.features.NetworkFeatures`: quantize to 8 bits, resize by the preprocessing mode,
normalise, run the network).
"""

from __future__ import annotations

from .base import SampleSet
from .features import FeatureMetric
from .frechet import feature_statistics, frechet_distance
from .kid import kernel_inception_distance


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


class DINOv2FD(FrechetDistance):
    """``fd_dinov2``: Frechet distance in DINOv2's feature space; kwargs ``model`` (a local transformers DINOv2
    folder, required), ``mode``, ``batch_size``, ``device``, ``dtype``, ``reference``."""

    name = "fd_dinov2"
    keys = ("fd_dinov2",)
    default_features = "dinov2"


class KernelInceptionDistance(FeatureMetric):
    """``kid`` and ``kid_std``: KID in the Inception space; kwargs ``subsets`` (100), ``subset_size`` (1000),
    ``weights`` (required), ``features`` (another space), ``reference`` and the space's options."""

    name = "kid"
    keys = ("kid", "kid_std")
    default_features = "inception"

    def __init__(self, subsets: int = 100, subset_size: int = 1000, features: str | None = None, reference: str = "digits",
                 **feature_kwargs):
        if int(subsets) < 1 or int(subset_size) < 2:
            raise ValueError(f"subsets must be >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
        super().__init__(features, reference, **feature_kwargs)
        self.subsets, self.subset_size = int(subsets), int(subset_size)

    def fingerprint(self) -> str:
        return f"{super().fingerprint()}:{self.subsets}x{self.subset_size}"

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        real, fake = self.features(samples)
        mean, std = kernel_inception_distance(real, fake, self.subsets, self.subset_size)
        return {"kid": mean, "kid_std": std}
