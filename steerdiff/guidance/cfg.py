"""Classifier-free guidance and two variants that act on its output: CFG rescale and CFG-Zero*."""

from __future__ import annotations

import torch

from ..core.guidance_protocol import COND, UNCOND
from ..core.prediction import PREDICTION_TYPES
from ..core.tensors import batch_dot, batch_norm, expand_to
from .base import GuidanceRule, GuidanceState, check_scalar
from .schedules import WeightSchedule, as_scale, scale_at


def cfg_combination(cond, uncond, w):
    """g = u + w (c - u), the classifier-free guidance combination in diffusers' convention (w = 1: c; w = 0: u);
    ``w`` a number or a per-sample tensor shaped to broadcast.  Every CFG in steerdiff forms it here."""
    return uncond + w * (cond - uncond)


class CFG(GuidanceRule):
    """Classifier-free guidance (Ho & Salimans 2022), diffusers' convention:  g = u + w (c - u).

    ``scale`` is w (a number >= 0, or a :class:`~steerdiff.guidance.schedules.WeightSchedule` of the noise
    level).  Affine in (c, u), so it is the same in every parametrization and runs on the raw model output.
    """

    def __init__(self, scale: float | WeightSchedule = 7.5):
        self.scale = as_scale(scale)

    def combine(self, cond, uncond, state):
        return cfg_combination(cond, uncond, scale_at(self.scale, state, cond))

    def __repr__(self) -> str:
        return f"CFG(scale={self.scale!r})"


class CFGRescale(GuidanceRule):
    """CFG with the rescale of Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Sec. 3.4), against over-exposure at high w:

        g = u + w (c - u);   g <- phi g std(c) / std(g) + (1 - phi) g       (std over the non-batch dims)

    ``space``: the parametrization the std is taken in.  The paper's model predicts v, so the default is
    "v_prediction" (the same numbers for any parametrization of one denoiser); ``space="model"`` rescales the
    raw model output, as diffusers' ``guidance_rescale`` does.  The std ratio is computed in float64.
    """

    def __init__(self, scale: float | WeightSchedule = 7.5, phi: float = 0.7, space: str = "v_prediction"):
        self.scale = as_scale(scale)
        self.phi = check_scalar(phi, "phi", low=0.0, high=1.0)
        if space not in (*PREDICTION_TYPES, "model"):
            raise ValueError(f"space must be one of {(*PREDICTION_TYPES, 'model')}, got {space!r}")
        self.space = None if space == "model" else space

    def space_for(self, state: GuidanceState) -> str | None:
        """v-prediction is a VP quantity: on flow-matching models the velocity v = eps - x0 takes its place."""
        if self.space == "v_prediction" and state.process.kind == "flow":
            return "flow_prediction"
        return self.space

    def combine(self, cond, uncond, state):
        guided = cfg_combination(cond, uncond, scale_at(self.scale, state, cond))
        ratio = cond.to(torch.float64).flatten(1).std(dim=1) / guided.to(torch.float64).flatten(1).std(dim=1)
        factor = self.phi * ratio + (1.0 - self.phi)
        return guided * expand_to(factor, guided)

    def __repr__(self) -> str:
        return f"CFGRescale(scale={self.scale!r}, phi={self.phi:g}, space={self.space or 'model'!r})"


class CFGZeroStar(GuidanceRule):
    """CFG-Zero* (Fan et al. 2025): guide from the unconditional prediction scaled by its optimal factor,

        a* = <c, u> / ||u||^2   (per sample, float64);   g = a* u + w (c - a* u),

    and "zero-init": zero velocity for the first ``zero_init_steps`` evaluations of a run, which need no network
    output: callers that can (the Denoiser, ``guide()`` where the prediction is shaped like the network's input) skip
    those calls and count them in ``skipped_calls``.  The paper works on the
    velocity of a rectified-flow ODE, x_rf = (1 - s) x0 + s eps: on flow-matching models the rule works on that
    velocity v = eps - x0 (``space_for`` gives "flow_prediction") and zero-init outputs v = 0; on VP models it
    works on eps.

    Zero-init on a VP model (``zero_init="flow"``, the default).  A VP sample is a rectified-flow sample in other
    coordinates: x_rf = x / (alpha + sigma) with s = sigma / (alpha + sigma).  Zero velocity keeps x_rf fixed,
    which on the VP ODE d x_bar / d sigma_bar = eps (x_bar = x / alpha) is the prediction

        eps = x / (alpha + sigma)        (equivalently x0 = x / (alpha + sigma)),

    and DDIM and DPM-Solver++ steps with it keep x_rf exactly.  ``zero_init="zero"`` outputs eps = 0 instead,
    as diffusers' guider zeroes the raw model output; that keeps x_bar fixed, which at the start of a schedule
    whose sigma_bar falls fast (linear betas: 157 at t = 999) leaves the sample far noisier than the next noise
    level, and the network then sees inputs out of its training range.
    """

    space = "epsilon"

    ZERO_INIT = ("flow", "zero")

    def space_for(self, state: GuidanceState) -> str:
        """The rectified-flow velocity on flow-matching models (the paper's setting), eps on VP models."""
        return "flow_prediction" if state.process.kind == "flow" else "epsilon"

    def __init__(self, scale: float | WeightSchedule = 7.5, zero_init_steps: int = 1, zero_init: str = "flow"):
        self.scale = as_scale(scale)
        if isinstance(zero_init_steps, bool) or not isinstance(zero_init_steps, int) or zero_init_steps < 0:
            raise ValueError(f"zero_init_steps must be an integer >= 0, got {zero_init_steps!r}")
        if zero_init not in self.ZERO_INIT:
            raise ValueError(f"zero_init must be one of {self.ZERO_INIT}, got {zero_init!r}")
        self.zero_init_steps = zero_init_steps
        self.zero_init = zero_init

    def predictions_needed(self, state: GuidanceState):
        """No prediction at all during zero-init (the output does not depend on the network): the call is skipped."""
        if state.step < self.zero_init_steps:
            return {COND: False, UNCOND: False}
        return {UNCOND: None}

    def combine(self, cond, uncond, state: GuidanceState):
        if state.step < self.zero_init_steps:
            if self.zero_init == "zero" or state.process.kind == "flow":  # on flow: the velocity itself is zeroed
                return torch.zeros_like(cond)
            return (state.sample / expand_to(state.alpha + state.sigma, state.sample)).to(cond.dtype)
        a = batch_dot(cond, uncond) / batch_norm(uncond).square().clamp_min(torch.finfo(torch.float64).tiny)
        scaled_uncond = expand_to(a, uncond) * uncond
        w = scale_at(self.scale, state, cond)
        return scaled_uncond + w * (cond - scaled_uncond)

    def __repr__(self) -> str:
        return f"CFGZeroStar(scale={self.scale!r}, zero_init_steps={self.zero_init_steps}, zero_init={self.zero_init!r})"
