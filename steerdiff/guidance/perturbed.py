"""Guidance away from a deliberately weakened prediction of the same network, beside classifier-free guidance:

    g = u + w (c - u) + s (c - p)

with c, u the conditional and unconditional predictions, p the conditional prediction of the perturbed network,
w the CFG weight (diffusers' convention; w = 1: no CFG, and u is not evaluated) and s the perturbation's weight
(s = 0: p is not evaluated).  Affine in the predictions, so the same in every parametrization.

- :class:`PAG`, perturbed-attention guidance (Ahn et al., "Self-Rectifying Diffusion Sampling with
  Perturbed-Attention Guidance", ECCV 2024, arXiv 2403.17377): self-attention maps replaced by the identity in
  ``layers``.  ``adaptive_scale`` is diffusers' ``pag_adaptive_scale``: s_t = max(s - adaptive_scale (1000 - t), 0).
- :class:`SEG`, smoothed energy guidance (Hong, "Smoothed Energy Guidance: Guiding Diffusion Models with Reduced
  Energy Curvature of Attention", NeurIPS 2024, arXiv 2408.00760): the self-attention queries of ``layers``
  blurred by a Gaussian of std ``blur_sigma`` (inf: uniform queries).
- :class:`SLG`, skip-layer guidance (Stability AI, SD3.5): the transformer blocks ``layers`` skipped.

The CFG term.  ``scale`` may also be a two-prediction rule, which then replaces u + w (c - u): ``PAG(APG(7.5),
pag_scale=3)`` guides with APG on D plus the perturbed term (g = APG(c, u) + s (c - p)); the perturbation papers
pair their term with plain CFG, so that combination is offered, not what they measured.

Steps.  ``start`` / ``stop`` (fractions of the run's evaluations, SD3's ``skip_layer_guidance_start/stop``) limit
the perturbed term to evaluations i with N start < i < N stop (N: the run's number of evaluations); the CFG term
applies at every evaluation.  None (PAG's and SEG's default) puts no bound on that side.

Against diffusers.  With w > 1, PAG is diffusers' ``*PAGPipeline`` formula exactly.  At w <= 1 those pipelines
drop the CFG term whatever w is; here w < 1 is applied as given (w = 1 gives their c + s (c - p)).  SLG is
``StableDiffusion3Pipeline``'s ``skip_guidance_layers`` (which adds the term only when its CFG is on; here w = 1
keeps it).  diffusers' modular guiders apply the perturbed term on int(N start) < i < int(N stop), which differs
from SD3's pipeline where N start or N stop is not an integer; the pipeline's rule is followed here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..core.guidance_protocol import UNCOND
from .base import GuidanceRule, GuidanceState, check_scalar
from .cfg import cfg_combination
from .perturbations import AttentionIdentity, Perturbation, QueryBlur, SkipLayers
from .schedules import WeightSchedule, as_scale, scale_at


def _fraction(value, name: str) -> float | None:
    return None if value is None else check_scalar(value, name, low=0.0, high=1.0)


def _mask(value, keep) -> bool | None:
    """Whether a prediction is needed for a weight: ``keep(value)`` for a number; None (every sample) for a weight
    that varies per sample (a schedule), so that deciding costs no device synchronisation."""
    if torch.is_tensor(value):
        return None
    return bool(keep(value))


class PerturbedGuidance(GuidanceRule):
    """g = u + w (c - u) + s (c - p) for a perturbation given as ``perturbation`` (see the module docstring);
    PAG, SEG and SLG are this rule with their perturbations and defaults."""

    name = "perturbed"

    def __init__(self, scale: float | WeightSchedule, perturbed_scale: float | WeightSchedule,
                 perturbation: Perturbation, start: float | None = None, stop: float | None = None):
        if not isinstance(perturbation, Perturbation):
            raise TypeError(f"perturbation must be a steerdiff Perturbation, got {type(perturbation).__name__}")
        if isinstance(scale, GuidanceRule):
            if scale.perturbations:
                raise ValueError(f"the CFG term of {type(self).__name__} must be a two-prediction rule, got {scale!r}")
            self.cfg_rule, self.scale = scale, None
        else:
            self.cfg_rule, self.scale = None, as_scale(scale)
        self.perturbed_scale = as_scale(perturbed_scale, f"{self.name}_scale")
        self.perturbation = perturbation
        self.start = _fraction(start, "start")
        self.stop = _fraction(stop, "stop")
        if self.start is not None and self.stop is not None and not self.start < self.stop:
            raise ValueError(f"start must be below stop, got start={self.start:g}, stop={self.stop:g}")

    @property
    def perturbations(self) -> dict:
        return {self.name: self.perturbation}

    def in_window(self, state: GuidanceState) -> bool:
        """Whether the perturbed term applies at this evaluation (SD3's rule: N start < i < N stop)."""
        if self.start is None and self.stop is None:
            return True
        n = state.num_steps
        if n is None:
            raise ValueError(
                f"{self!r} limits its perturbed term to a window of steps, but the caller did not give the run's "
                "number of steps (reset the denoiser with num_steps=...)"
            )
        i = state.step
        return (self.start is None or i > n * self.start) and (self.stop is None or i < n * self.stop)

    def _perturbed_weight(self, state: GuidanceState, like: torch.Tensor):
        return scale_at(self.perturbed_scale, state, like)

    @property
    def stateful(self) -> bool:
        return self.cfg_rule is not None and self.cfg_rule.stateful

    def reset(self, timesteps=None) -> None:
        if self.cfg_rule is not None:
            self.cfg_rule.reset(timesteps)

    def predictions_needed(self, state):
        probe = state.sample
        if self.cfg_rule is not None:
            uncond = self.cfg_rule.uncond_needed(state)
        else:
            uncond = _mask(scale_at(self.scale, state, probe), lambda v: v != 1.0)
        s = self._perturbed_weight(state, probe)
        return {UNCOND: uncond, self.name: _mask(s, lambda v: v != 0.0) if self.in_window(state) else False}

    def combine(self, cond, uncond, state):
        if self.cfg_rule is not None:
            guided = self.cfg_rule(cond, uncond, state)
        else:
            guided = cfg_combination(cond, uncond, scale_at(self.scale, state, cond))
        if not self.in_window(state):
            return guided
        return guided + self._perturbed_weight(state, cond) * (cond - state.perturbed_prediction(self.name))

    def _window_repr(self) -> str:
        parts = [f"{k}={v:g}" for k, v in (("start", self.start), ("stop", self.stop)) if v is not None]
        return "".join(", " + p for p in parts)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(scale={self._cfg_repr()}, {self.name}_scale={self.perturbed_scale!r}, "
                f"{self.perturbation!r}{self._window_repr()})")

    def _cfg_repr(self) -> str:
        return repr(self.cfg_rule if self.cfg_rule is not None else self.scale)


class PAG(PerturbedGuidance):
    """Perturbed-attention guidance: g = u + w (c - u) + s_t (c - p), p with identity self-attention in ``layers``
    (diffusers' ``pag_applied_layers`` names: "mid", "down.block_1", "transformer_blocks.(0|1)", ...)."""

    name = "pag"

    def __init__(self, scale: float | WeightSchedule = 7.5, pag_scale: float | WeightSchedule = 3.0,
                 layers: str | Sequence[str] = ("mid",), adaptive_scale: float = 0.0,
                 start: float | None = None, stop: float | None = None):
        super().__init__(scale, pag_scale, AttentionIdentity(layers), start, stop)
        self.adaptive_scale = check_scalar(adaptive_scale, "adaptive_scale", low=0.0)

    @property
    def pag_scale(self):
        return self.perturbed_scale

    def _perturbed_weight(self, state, like):
        s = scale_at(self.perturbed_scale, state, like)
        if self.adaptive_scale == 0.0:
            return s
        # diffusers' pag_adaptive_scale, on the network's timestep t: max(s - adaptive (1000 - t), 0)
        decay = (self.adaptive_scale * (1000.0 - state.timestep)).reshape(-1, *([1] * (like.ndim - 1)))
        return torch.clamp(s - decay, min=0.0).to(like.dtype)

    def __repr__(self) -> str:
        adaptive = f", adaptive_scale={self.adaptive_scale:g}" if self.adaptive_scale else ""
        return (f"PAG(scale={self._cfg_repr()}, pag_scale={self.pag_scale!r}, layers={list(self.perturbation.layers)!r}"
                f"{adaptive}{self._window_repr()})")


class SEG(PerturbedGuidance):
    """Smoothed energy guidance: g = u + w (c - u) + s (c - p), p with the self-attention queries of ``layers``
    blurred by a Gaussian of std ``blur_sigma`` tokens (inf: their mean; the paper's SDXL setting: "mid",
    s = 3, sigma = 10 or inf)."""

    name = "seg"

    def __init__(self, scale: float | WeightSchedule = 7.5, seg_scale: float | WeightSchedule = 3.0,
                 layers: str | Sequence[str] = ("mid",), blur_sigma: float = math.inf,
                 start: float | None = None, stop: float | None = None):
        super().__init__(scale, seg_scale, QueryBlur(layers, blur_sigma), start, stop)

    def __repr__(self) -> str:
        p = self.perturbation
        return (f"SEG(scale={self._cfg_repr()}, seg_scale={self.perturbed_scale!r}, layers={list(p.layers)!r}, "
                f"blur_sigma={p.sigma:g}{self._window_repr()})")


class SLG(PerturbedGuidance):
    """Skip-layer guidance: g = u + w (c - u) + s (c - p) at evaluations N start < i < N stop, p with the
    transformer blocks ``layers`` skipped (SD3.5 Medium: [7, 8, 9], s = 2.8).  ``skip="attention"`` skips their
    attention only (spatiotemporal guidance's STG-A for video transformers); ``fqn`` names the block stack."""

    name = "slg"

    def __init__(self, scale: float | WeightSchedule = 7.0, slg_scale: float | WeightSchedule = 2.8,
                 layers: int | Sequence[int] = (7, 8, 9), start: float | None = 0.01, stop: float | None = 0.2,
                 fqn: str = "auto", skip: str = "block"):
        super().__init__(scale, slg_scale, SkipLayers(layers, fqn, skip), start, stop)

    def __repr__(self) -> str:
        p = self.perturbation
        extra = (f", fqn={p.fqn!r}" if p.fqn != "auto" else "") + (f", skip={p.skip!r}" if p.skip != "block" else "")
        return (f"SLG(scale={self._cfg_repr()}, slg_scale={self.perturbed_scale!r}, layers={list(p.layers)!r}"
                f"{self._window_repr()}{extra})")


__all__ = ["PAG", "SEG", "SLG", "PerturbedGuidance"]
