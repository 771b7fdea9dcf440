"""Magnitude-aware guidance, MAMBO-G (Zhu, Peng, Shu et al., "MAMBO-G: Magnitude-Aware Mitigation for Boosted
Guidance", arXiv 2508.03442): the CFG weight is damped where the guidance update is large relative to the
unconditional prediction,

    r = ||c - u|| / ||u||          (per sample, over all non-batch dimensions, float64)
    w' = 1 + (w - 1) exp(-alpha r)
    g = u + w' (c - u)

on the model's own output (the paper's velocity on flow models), as diffusers' ``MagnitudeAwareGuidance``.
"""

from __future__ import annotations

import torch

from ..core.tensors import batch_norm, expand_to
from .base import GuidanceRule, check_scalar
from .schedules import WeightSchedule, as_scale, scale_at


class MagnitudeAwareGuidance(GuidanceRule):
    """MAMBO-G (see the module docstring): ``scale`` is w (w_max in the paper), ``alpha`` the damping rate."""

    def __init__(self, scale: float | WeightSchedule = 10.0, alpha: float = 8.0):
        self.scale = as_scale(scale)
        self.alpha = check_scalar(alpha, "alpha", low=0.0)

    def combine(self, cond, uncond, state):
        diff = cond - uncond
        ratio = batch_norm(diff) / batch_norm(uncond).clamp_min(torch.finfo(torch.float64).tiny)
        damping = expand_to(torch.exp(-self.alpha * ratio), diff)
        w = 1.0 + (scale_at(self.scale, state, diff) - 1.0) * damping
        return uncond + w * diff

    def __repr__(self) -> str:
        return f"MagnitudeAwareGuidance(scale={self.scale!r}, alpha={self.alpha:g})"


__all__ = ["MagnitudeAwareGuidance"]
