"""Divergence measures of final samples (Wizadwongsa & Suwajanakorn, "Diffusion Sampling with Momentum
for Mitigating Divergence Artifacts", ICLR 2024, the magnitude score of their divergence study).

Magnitude score, for samples x of shape (N, C, H, W) and per-channel statistics (m_c, s_c):

    z      = |x - m_c| / s_c                       (per-channel normalization)
    a      = max_c z                               (N, H, W)
    p      = maxpool_{4x4}(a)                      (stride 4; a last partial window is pooled too)
    score  = mean( p * [p >= tau] ),  tau = 3      (values below the threshold count as 0)

so 0 means no 4x4 patch strays more than tau standard deviations from the typical value, and a diverged
sample with a saturated blotch scores high.  The paper does not pin down which statistics normalize the channels;
steerdiff uses those of the model's reference data (``normalize: data``, the default, so that a uniformly
blown-up batch is caught), or of the scored samples themselves (``samples``), or mean 0 / std 1 (``unit``,
for latents scaled to unit variance).

Out-of-range fraction: the fraction of values of x outside [-1, 1] before any clipping (saturation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Metric, SampleSet
from .features import reference_images

NORMALIZATIONS = ("data", "samples", "unit")


def _check_images(x: torch.Tensor, name: str = "samples") -> torch.Tensor:
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf; a diverged sample has no magnitude score")
    return x


def channel_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation over samples and pixels, float64 (C,) each."""
    x = _check_images(torch.as_tensor(x)).to(torch.float64)
    flat = x.transpose(0, 1).flatten(1)
    return flat.mean(1), flat.std(1)


def magnitude_score(x: torch.Tensor, mean, std, pool: int = 4, threshold: float = 3.0) -> torch.Tensor:
    """Per-sample magnitude score (float64 (N,)); average it over samples for the set's score."""
    x = _check_images(torch.as_tensor(x)).to(torch.float64)
    mean = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float64).reshape(1, -1, 1, 1)
    if mean.shape[1] != x.shape[1] or std.shape[1] != x.shape[1]:
        raise ValueError(f"mean and std need one entry per channel ({x.shape[1]}), got {mean.shape[1]} and {std.shape[1]}")
    if not bool((std > 0).all()):
        raise ValueError("std must be > 0 in every channel")
    z = ((x - mean) / std).abs().amax(dim=1, keepdim=True)
    pooled = F.max_pool2d(z, kernel_size=pool, stride=pool, ceil_mode=True)
    return torch.where(pooled >= threshold, pooled, torch.zeros_like(pooled)).flatten(1).mean(1)


def out_of_range_fraction(x: torch.Tensor, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """Per-sample fraction of values outside [low, high] (before clipping), float64 (N,)."""
    x = _check_images(torch.as_tensor(x))
    return ((x < low) | (x > high)).flatten(1).to(torch.float64).mean(1)


class Divergence(Metric):
    """``magnitude_score`` (pool 4, threshold 3) and ``out_of_range`` (fraction of values outside [-1, 1])."""

    name = "divergence"
    keys = ("magnitude_score", "out_of_range")

    def __init__(self, normalize: str = "data", reference: str = "digits", pool: int = 4, threshold: float = 3.0):
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"divergence: normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if int(pool) < 1 or not float(threshold) > 0:
            raise ValueError(f"divergence: pool must be >= 1 and threshold > 0, got pool={pool}, threshold={threshold}")
        self.normalize, self.reference, self.pool, self.threshold = normalize, reference, int(pool), float(threshold)
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def check(self, sample_shape, denoiser=None) -> None:
        if len(sample_shape) != 3:
            raise ValueError(f"divergence needs (C, H, W) samples, got shape {tuple(sample_shape)}")
        if self.normalize == "data":
            images, _ = reference_images(self.reference)
            if tuple(images.shape[1:]) != tuple(sample_shape):
                raise ValueError(
                    f"divergence (normalize: data) normalizes by the {self.reference!r} data set's channel statistics, "
                    f"whose images are {tuple(images.shape[1:])}, but this model makes {tuple(sample_shape)} samples; "
                    f"use normalize: samples or unit"
                )

    def statistics(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.normalize == "samples":
            return channel_statistics(samples)
        if self.normalize == "unit":
            c = samples.shape[1]
            return torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
        if self._stats is None:
            self._stats = channel_statistics(reference_images(self.reference)[0])
        return self._stats

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        mean, std = self.statistics(samples.samples)
        score = magnitude_score(samples.samples, mean, std, self.pool, self.threshold)
        return {"magnitude_score": float(score.mean()), "out_of_range": float(out_of_range_fraction(samples.samples).mean())}
