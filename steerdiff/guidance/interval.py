"""Guidance in a limited interval of noise levels (Kynkaanniemi et al., "Applying Guidance in a Limited
Interval Improves Sample and Distribution Quality in Diffusion Models", NeurIPS 2024).

Guide with ``rule`` only where sigma_low < sigma <= sigma_high; elsewhere return the conditional prediction,
without evaluating the unconditional branch.  sigma is the EDM / Karras noise level sigma_t / alpha_t
(``state.sigma_bar``), the number the paper and diffusers' EulerDiscreteScheduler.sigmas use.
Reported: EDM2-XXL ImageNet-512 FID 1.81 -> 1.40 (guidance in (0.28, 5.42]).
"""

from __future__ import annotations

import math

import torch

from .base import GuidanceRule, GuidanceState, and_masks, check_scalar, restrict_needs


class GuidanceInterval(GuidanceRule):
    """``rule`` for sigma in (sigma_low, sigma_high], conditional only (one network call) elsewhere: neither the
    unconditional nor any perturbed prediction of the rule is evaluated outside the interval."""

    def __init__(self, rule: GuidanceRule, sigma_low: float = 0.0, sigma_high: float = math.inf):
        if not isinstance(rule, GuidanceRule):
            raise TypeError(f"rule must be a GuidanceRule (CFG, APG, ...), got {type(rule).__name__}")
        self.rule = rule
        self.sigma_low = check_scalar(sigma_low, "sigma_low", low=0.0)
        if sigma_high == math.inf:
            self.sigma_high = math.inf
        else:
            self.sigma_high = check_scalar(sigma_high, "sigma_high", low=0.0)
        if not self.sigma_high > self.sigma_low:
            raise ValueError(f"sigma_high must exceed sigma_low, got ({self.sigma_low:g}, {self.sigma_high:g}]")

    def inside(self, state: GuidanceState) -> torch.Tensor:
        """bool (B,): the samples whose noise level lies in (sigma_low, sigma_high]."""
        return (state.sigma_bar > self.sigma_low) & (state.sigma_bar <= self.sigma_high)

    @property
    def stateful(self) -> bool:
        return self.rule.stateful

    def reset(self, timesteps=None) -> None:
        self.rule.reset(timesteps)

    @property
    def perturbations(self) -> dict:
        return self.rule.perturbations

    def uncond_needed(self, state):
        return and_masks(self.inside(state), self.rule.uncond_needed(state))

    def predictions_needed(self, state):
        return restrict_needs(self.rule.predictions_needed(state), self.inside(state))

    def __call__(self, cond, uncond, state):
        active = and_masks(state.active, self.inside(state))
        return self.rule(cond, uncond, state.replace(active=active))

    def __repr__(self) -> str:
        return f"GuidanceInterval({self.rule!r}, sigma_low={self.sigma_low:g}, sigma_high={self.sigma_high:g})"
