"""Tangential damping CFG (Kwon, Hwang, Cha, Kim, "TCFG: Tangential Damping Classifier-free Guidance", CVPR 2025,
arXiv 2503.18137): before CFG, keep only the component of the unconditional prediction along the dominant
direction of the pair [c; u].  Per sample, with M = [c; u] (2 x D, flattened) = U S V^T and v_1 its first right
singular vector,

    u' = <u, v_1> v_1,        g = u' + w (c - u')          (diffusers' weight convention)

v_1 comes from the 2 x 2 Gram matrix M M^T (its top eigenvector e gives v_1 = M^T e / s_1), in float64; the sign
of v_1 does not matter.  As diffusers' ``TangentialClassifierFreeGuidance`` (which takes a float32 SVD) the rule acts
on the model's own output (eps for SD, the velocity for flow models).
"""

from __future__ import annotations

import torch

from ..core.tensors import expand_to
from .base import GuidanceRule
from .schedules import WeightSchedule, as_scale, scale_at


def tangential_uncond(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """u projected on the first right singular vector of [c; u], per sample, float64."""
    m = torch.stack([cond.flatten(1), uncond.flatten(1)], dim=1).to(torch.float64)  # (B, 2, D)
    gram = m @ m.transpose(1, 2)  # (B, 2, 2)
    values, vectors = torch.linalg.eigh(gram)  # ascending
    top = vectors[:, :, -1:]  # (B, 2, 1)
    direction = (m.transpose(1, 2) @ top).squeeze(-1)  # (B, D) = s_1 v_1
    norm2 = values[:, -1].clamp_min(torch.finfo(torch.float64).tiny)  # s_1^2
    coeff = (uncond.flatten(1).to(torch.float64) * direction).sum(dim=1) / norm2
    return (expand_to(coeff, direction) * direction).reshape(uncond.shape)


class TCFG(GuidanceRule):
    """Tangential damping CFG (see the module docstring); ``scale`` is w (a number >= 0 or a weight schedule)."""

    def __init__(self, scale: float | WeightSchedule = 7.5):
        self.scale = as_scale(scale)

    def combine(self, cond, uncond, state):
        u = tangential_uncond(cond, uncond)
        c = cond.to(torch.float64)
        return (u + scale_at(self.scale, state, c) * (c - u)).to(cond.dtype)

    def __repr__(self) -> str:
        return f"TCFG(scale={self.scale!r})"


__all__ = ["TCFG", "tangential_uncond"]
