"""Frequency-decoupled guidance (Sadat, Vontobel, Salehi, Weber, "Guidance in the Frequency Domain Enables
High-Fidelity Sampling at Low CFG Scales", arXiv 2506.19713, Algorithm 1): CFG applied per band of a Laplacian
pyramid, with its own weight in each band, then recombined:

    c_l, u_l = pyramid(c)_l, pyramid(u)_l           l = 0 (finest band) .. L - 1 (the coarse residual)
    g_l      = u_l + w_l (c_l - u_l)                (diffusers' convention; per band)
    g        = pyramid^-1(g_0, ..., g_{L-1})

``scales`` lists w_l from the highest band to the lowest, as diffusers' ``FrequencyDecoupledGuidance``
``guidance_scales`` (the paper's SDXL setting: w_high = 10 over w_low = 5 with two levels).  The pyramid is the
Burt-Adelson Laplacian pyramid kornia builds (5-tap binomial blur with reflect borders, bilinear resampling by 2):
each band and the recombination are linear, so with ``parallel_weights`` unset the rule is the same in every
parametrization and equals diffusers' guider on the raw model output.  ``parallel_weights`` (the paper's
Algorithm 2) damp the part of each band's update parallel to the conditional band, projected in float64 on the
data prediction (the paper's space; diffusers projects the raw model output).

The predictions must be image-shaped, (B, C, H, W) with H and W divisible by 2^(L-1) and every band at least 3
pixels wide (reflect padding); packed transformer latents (Flux, Qwen-Image) are not images to this rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .apg import project
from .base import GuidanceRule, GuidanceState, check_scalar
from .schedules import WeightSchedule, as_scale, scale_at

_TAPS = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """The 5 x 5 binomial blur (1 4 6 4 1)^2 / 256 with reflect borders, per channel."""
    c = x.shape[1]
    kernel = (_TAPS[:, None] * _TAPS[None, :] / 256.0).to(device=x.device, dtype=x.dtype)
    return F.conv2d(F.pad(x, [2, 2, 2, 2], mode="reflect"), kernel.expand(c, 1, 5, 5), groups=c)


def pyramid_down(x: torch.Tensor) -> torch.Tensor:
    """Blur, then bilinear resampling to half the size (kornia's ``pyrdown``)."""
    return F.interpolate(_blur(x), size=(x.shape[-2] // 2, x.shape[-1] // 2), mode="bilinear", align_corners=False)


def pyramid_up(x: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling to twice the size, then blur (kornia's ``pyrup``)."""
    return _blur(F.interpolate(x, size=(x.shape[-2] * 2, x.shape[-1] * 2), mode="bilinear", align_corners=False))


def check_pyramid(shape, levels: int) -> None:
    """Raise a clear error when a prediction of ``shape`` has no Laplacian pyramid of ``levels`` levels."""
    if len(shape) != 4:
        raise ValueError(f"FDG needs image-shaped predictions (B, C, H, W), got shape {tuple(shape)}")
    h, w = shape[-2:]
    stride = 2 ** (levels - 1)
    if h % stride or w % stride or min(h, w) // stride < 3:
        raise ValueError(
            f"FDG with {levels} levels needs H and W divisible by {stride} with the coarsest band at least 3 wide; "
            f"the predictions are {h} x {w} (use fewer scales)"
        )


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """[band 0 (finest), ..., band L-2, the coarse Gaussian level]; :func:`from_pyramid` inverts it exactly."""
    gaussian = [x]
    for _ in range(levels - 1):
        gaussian.append(pyramid_down(gaussian[-1]))
    return [gaussian[i] - pyramid_up(gaussian[i + 1]) for i in range(levels - 1)] + [gaussian[-1]]


def from_pyramid(bands: list[torch.Tensor]) -> torch.Tensor:
    image = bands[-1]
    for band in reversed(bands[:-1]):
        image = pyramid_up(image) + band
    return image


class FDG(GuidanceRule):
    """Frequency-decoupled guidance (see the module docstring).

    Args:
        scales: w_l per band, highest frequency first (at least 2; each a number >= 0 or a weight schedule).
        parallel_weights: None (plain CFG per band), or one weight in [0, 1] per band (or one for all) for the
            update's component parallel to the conditional band.
    """

    def __init__(self, scales: Sequence[float | WeightSchedule] = (10.0, 5.0),
                 parallel_weights: float | Sequence[float] | None = None):
        if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) < 2:
            raise ValueError(f"scales must list at least 2 weights (highest frequency first), got {scales!r}")
        self.scales = tuple(as_scale(s, f"scales[{i}]") for i, s in enumerate(scales))
        self.levels = len(self.scales)
        if parallel_weights is None:
            self.parallel_weights = None
        else:
            weights = [parallel_weights] * self.levels if isinstance(parallel_weights, (int, float)) else list(parallel_weights)
            if len(weights) != self.levels:
                raise ValueError(f"parallel_weights must hold {self.levels} weights (one per scale), got {len(weights)}")
            self.parallel_weights = tuple(check_scalar(p, "parallel_weights", low=0.0) for p in weights)

    def space_for(self, state: GuidanceState) -> str | None:
        """The model's own output (the pyramid is linear); the data prediction when projecting."""
        return None if self.parallel_weights is None else "sample"

    def combine(self, cond, uncond, state):
        check_pyramid(cond.shape, self.levels)
        bands_c = laplacian_pyramid(cond, self.levels)
        bands_u = laplacian_pyramid(uncond, self.levels)
        guided = []
        for level, (c, u) in enumerate(zip(bands_c, bands_u)):
            shift = c - u
            if self.parallel_weights is not None:
                parallel, orthogonal = project(shift, c)
                shift = (self.parallel_weights[level] * parallel + orthogonal).to(c.dtype)
            guided.append(u + scale_at(self.scales[level], state, c) * shift)
        return from_pyramid(guided)

    def __repr__(self) -> str:
        weights = "" if self.parallel_weights is None else f", parallel_weights={list(self.parallel_weights)!r}"
        return f"FDG(scales={list(self.scales)!r}{weights})"


__all__ = ["FDG", "from_pyramid", "laplacian_pyramid", "pyramid_down", "pyramid_up"]
