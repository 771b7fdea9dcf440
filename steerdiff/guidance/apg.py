"""Adaptive Projected Guidance (Sadat, Hilliges, Weber, "Eliminating Oversaturation and Artifacts of High
Guidance Scales in Diffusion Models", ICLR 2025), the paper's formulation on the data prediction D = x0_hat:

    delta     = D_c - D_u
    delta_bar = delta + beta delta_bar_prev               (momentum, beta < 0; delta_bar = delta at the first step)
    delta     = delta_bar min(1, r / ||delta_bar||)        (rescale; norm over all non-batch dims per sample)
    delta_par = <delta, D_c_hat> D_c_hat,  D_c_hat = D_c / ||D_c||;   delta_perp = delta - delta_par
    D         = D_c + (w - 1) (delta_perp + eta delta_par)

w is diffusers' weight (eta = 1, beta = 0, r = inf gives CFG on D exactly).  Everything runs in float64.
Differences from diffusers' ``AdaptiveProjectedGuidance``: that one defaults to eta = 1 and no momentum, starts
from D_u (``u + w (...)``) unless ``use_original_formulation``, and acts on the raw model output.
"""

from __future__ import annotations

import math

import torch

from ..core.tensors import batch_dot, batch_norm, expand_to
from .base import GuidanceRule, GuidanceState, check_pair, check_scalar, mask_like, to_space
from .cfg import cfg_combination
from .schedules import WeightSchedule, as_scale, scale_at


def project(v: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(parallel, orthogonal) parts of ``v`` with respect to ``onto``, per sample, in float64."""
    v64, onto64 = v.to(torch.float64), onto.to(torch.float64)
    unit = onto64 / expand_to(batch_norm(onto64).clamp_min(torch.finfo(torch.float64).tiny), onto64)
    parallel = expand_to(batch_dot(v64, unit), unit) * unit
    return parallel, v64 - parallel


class APG(GuidanceRule):
    """Adaptive Projected Guidance on the data prediction (see the module docstring for the formulas).

    Args:
        scale: w (diffusers' convention; a number >= 0 or a weight schedule).
        eta: weight of the component of the update parallel to D_c (0 recommended: it drives saturation).
        norm_threshold: r, the largest norm of the update per sample (None or inf: no rescale).  It is a norm over
            all elements of one sample's data prediction, so it depends on the data size: the paper uses about
            15 for SD / SDXL latents, 2.5 for EDM2; the default 15 suits SD-sized latents.
        momentum: beta in (-1, 1), negative in the paper (-0.5); 0 disables the momentum.

    The momentum buffer is per run: it resets at the start of each sampling run; samples left unguided at an
    evaluation (``state.active``) keep their buffer unchanged.
    """

    space = "sample"

    def __init__(
        self,
        scale: float | WeightSchedule = 7.5,
        eta: float = 0.0,
        norm_threshold: float | None = 15.0,
        momentum: float = -0.5,
    ):
        self.scale = as_scale(scale)
        self.eta = check_scalar(eta, "eta")
        if norm_threshold is None or norm_threshold == math.inf:
            self.norm_threshold = math.inf
        else:
            self.norm_threshold = check_scalar(norm_threshold, "norm_threshold", low=0.0, low_open=True)
        self.momentum = check_scalar(momentum, "momentum", low=-1.0, high=1.0, low_open=True)
        if self.momentum == 1.0:
            raise ValueError("momentum must lie in (-1, 1): |beta| = 1 never forgets, got 1")
        self._average: torch.Tensor | None = None

    @property
    def stateful(self) -> bool:
        """The momentum buffer carries state between evaluations (momentum != 0)."""
        return self.momentum != 0.0

    def reset(self, timesteps=None) -> None:
        self._average = None

    def _momentum(self, delta: torch.Tensor, state: GuidanceState) -> torch.Tensor:
        if self.momentum == 0.0:
            return delta
        previous = self._average if self._average is not None else torch.zeros_like(delta)
        if previous.shape != delta.shape:
            raise ValueError(
                f"APG momentum holds shape {tuple(previous.shape)} but got {tuple(delta.shape)}: reset() the rule "
                "between runs with different batches"
            )
        average = delta + self.momentum * previous
        if state.active is not None:
            average = torch.where(mask_like(state.active, average), average, previous)
        self._average = average
        return average

    def combine(self, cond, uncond, state):
        delta = self._momentum(cond - uncond, state)
        if math.isfinite(self.norm_threshold):
            norm = batch_norm(delta).clamp_min(torch.finfo(torch.float64).tiny)
            delta = delta * expand_to(torch.clamp(self.norm_threshold / norm, max=1.0), delta)
        parallel, orthogonal = project(delta, cond)
        w = scale_at(self.scale, state, cond)
        return cond + (w - 1.0) * (orthogonal + self.eta * parallel)

    def __repr__(self) -> str:
        return (
            f"APG(scale={self.scale!r}, eta={self.eta:g}, norm_threshold={self.norm_threshold:g}, "
            f"momentum={self.momentum:g})"
        )


class APGMix(GuidanceRule):
    """APG-Mix (HunyuanImage 2.1; diffusers' ``AdaptiveProjectedMixGuidance``): classifier-free guidance at scale
    ``scale`` for the evaluations i <= ``start_step``, then :class:`APG` at scale ``apg_scale``.  APG's momentum
    buffer accumulates the update D_c - D_u during the CFG evaluations too, so it is warm when APG takes over.

    APG here is the paper's, on the data prediction D (see :class:`APG`); diffusers' mix guider applies its APG to
    the raw model output and starts it from u (so its ``adaptive_projected_guidance_rescale`` is a norm of eps or
    velocity differences, not of D's).  Defaults are that guider's: w = 3.5, APG w = 10, momentum -0.5, r = 10,
    eta = 0, APG from evaluation 6 on.
    """

    def __init__(
        self,
        scale: float | WeightSchedule = 3.5,
        apg_scale: float | WeightSchedule = 10.0,
        momentum: float = -0.5,
        norm_threshold: float | None = 10.0,
        eta: float = 0.0,
        start_step: int = 5,
    ):
        self.scale = as_scale(scale)
        self.apg = APG(apg_scale, eta=eta, norm_threshold=norm_threshold, momentum=momentum)
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < -1:
            raise ValueError(f"start_step must be an integer >= -1 (-1: APG from the first evaluation), got {start_step!r}")
        self.start_step = start_step

    @property
    def stateful(self) -> bool:
        return self.apg.stateful

    def reset(self, timesteps=None) -> None:
        self.apg.reset(timesteps)

    def __call__(self, cond, uncond, state):
        if state.step > self.start_step:
            return self.apg(cond, uncond, state)
        check_pair(cond, uncond, state)
        # the CFG phase: keep APG's momentum buffer up to date with D_c - D_u, guide with CFG
        self.apg._momentum(to_space(cond, state, "sample") - to_space(uncond, state, "sample"), state)
        guided = cfg_combination(cond, uncond, scale_at(self.scale, state, cond))
        if state.active is not None:
            guided = torch.where(mask_like(state.active, guided), guided, cond)
        return guided

    def __repr__(self) -> str:
        a = self.apg
        return (
            f"APGMix(scale={self.scale!r}, apg_scale={a.scale!r}, momentum={a.momentum:g}, "
            f"norm_threshold={a.norm_threshold:g}, eta={a.eta:g}, start_step={self.start_step})"
        )
