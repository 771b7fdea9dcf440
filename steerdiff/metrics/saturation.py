"""Colour saturation of RGB samples, the symptom of over-guidance (Sadat et al., "Eliminating Oversaturation and
Artifacts of High Guidance Scales in Diffusion Models", ICLR 2025, measure it to compare APG with CFG).

    saturation = mean over pixels of (max_c x - min_c x) / max_c x   (HSV saturation; 0 where max_c x = 0)
    clipped    = fraction of channel values at the ends of the range, x <= 0 or x >= 1

on images mapped from [-1, 1] to [0, 1] and clamped (a pipeline's decoded images are already clamped, so values
pushed past the range show up as ``clipped``).  Per-sample values are averaged in float64.
"""

from __future__ import annotations

import torch

from .base import Metric, SampleSet


def hsv_saturation(images: torch.Tensor) -> torch.Tensor:
    """Per-sample mean HSV saturation (float64 (N,)) of (N, 3, H, W) images in [-1, 1]."""
    x = ((images.to(torch.float64) + 1) / 2).clamp(0, 1)
    high, low = x.amax(dim=1), x.amin(dim=1)
    sat = torch.where(high > 0, (high - low) / high.clamp(min=1e-12), torch.zeros_like(high))
    return sat.flatten(1).mean(1)


def clipped_fraction(images: torch.Tensor) -> torch.Tensor:
    """Per-sample fraction (float64 (N,)) of channel values at or beyond the ends of [-1, 1]."""
    x = images.to(torch.float64)
    return ((x <= -1) | (x >= 1)).flatten(1).to(torch.float64).mean(1)


class Saturation(Metric):
    """``saturation`` and ``clipped`` of RGB samples (see the module docstring)."""

    name = "saturation"
    keys = ("saturation", "clipped")

    def check(self, sample_shape, denoiser=None) -> None:
        if len(sample_shape) != 3 or sample_shape[0] != 3:
            raise ValueError(f"saturation needs RGB images (3, H, W); this model makes {tuple(sample_shape)} samples")

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        return {"saturation": float(hsv_saturation(samples.samples).mean()),
                "clipped": float(clipped_fraction(samples.samples).mean())}
