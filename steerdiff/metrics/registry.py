"""Metrics by name, as a benchmark config names them: ``make_metric("fd")``, ``make_metric("fid", weights=...)``.

=================  ==============================================  =====================================
name               reports                                          applies to
=================  ==============================================  =====================================
fd                 fd (digits feature space vs the digits set)      1x8x8 image models
fid                fid (Inception pool3; ``weights`` required)      1- or 3-channel image models
kid                kid, kid_std (unbiased KID; ``weights``)          as fid
fd_dinov2          fd_dinov2 (DINOv2 CLS token; ``model`` folder)   as fid
precision_recall   precision, recall (k = 3)                        as fd (or ``features: inception``)
divergence         magnitude_score, out_of_range                    any (C, H, W) model
class_accuracy     class_accuracy (digits classifier)               1x8x8 class-conditional models
l2_to_reference    l2_error (vs an adaptive DOP853 solve)           any; the mixture's headline error
log_likelihood     log_likelihood (exact, nats)                     GaussianMixtureDenoiser models
clip_score         clip_score (a local CLIP folder, ``model``)      text-to-image pipelines (RGB)
saturation         saturation (HSV), clipped (fraction at bounds)   RGB image models
psnr               psnr (dB, to each sample's original)             restorations (``steerdiff restore``)
ssim               ssim (to each sample's original; ``window``)     restorations (``steerdiff restore``)
=================  ==============================================  =====================================
"""

from __future__ import annotations

from ..options import check_options, named_options, takes_any_option
from .accuracy import ClassAccuracy
from .base import Metric
from .clip_score import CLIPScore
from .divergence import Divergence
from .fd import DINOv2FD, FrechetDistance, InceptionFID, KernelInceptionDistance
from .likelihood import MixtureLogLikelihood
from .precision_recall import PrecisionRecall
from .reference_error import ReferenceL2
from .saturation import Saturation
from .similarity import PSNR, SSIM

METRICS: dict[str, type[Metric]] = {
    cls.name: cls
    for cls in (FrechetDistance, InceptionFID, KernelInceptionDistance, DINOv2FD, PrecisionRecall, Divergence, ClassAccuracy, ReferenceL2, MixtureLogLikelihood,
                CLIPScore, Saturation, PSNR, SSIM)
}


def available_metrics() -> list[str]:
    return sorted(METRICS)


def make_metric(name: str, **kwargs) -> Metric:
    """The metric called ``name`` built with ``kwargs``; unknown names and options are errors naming the choices."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(available_metrics())}")
    cls = METRICS[name]
    if not takes_any_option(cls):  # a FeatureMetric passes its extra options on to its feature space, which checks them
        check_options(f"metric {name!r}", kwargs, named_options(cls))
    return cls(**kwargs)
