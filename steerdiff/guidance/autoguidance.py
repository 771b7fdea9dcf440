"""AutoGuidance (Karras, Aittala, Kynkaanniemi, Lehtinen, Aila, Laine, "Guiding a Diffusion Model with a Bad Version
of Itself", NeurIPS 2024, arXiv 2406.02507, Eq. 1):

    D_w(x; sigma, c) = D_1(x; sigma, c) + w (D_0(x; sigma, c) - D_1(x; sigma, c))

with D_0 the model (its conditional prediction) and D_1 a weaker version of it, called with the same conditioning:
a smaller and / or less-trained network (the paper's best on ImageNet-512: EDM2-XS trained for 1/16 of the
budget guiding EDM2-M).  No unconditional prediction is used.  Affine in the predictions, so the same in every
parametrization; w = 1 gives the model alone (and the weak model is not run).

diffusers' ``AutoGuidance`` guider is a different, cheaper approximation: its D_1 is the same network with layers
skipped or dropped out, evaluated on the unconditional inputs.  Here D_1 is the weak network the user gives (a
module, or a local folder holding one).
"""

from __future__ import annotations

from ..core.guidance_protocol import UNCOND
from .base import GuidanceRule
from .perturbations import WeakModel
from .perturbed import _mask
from .schedules import WeightSchedule, as_scale, scale_at


class AutoGuidance(GuidanceRule):
    """g = p + w (c - p), p = the weak model's conditional prediction (``weak_model``: a network with the model's
    call signature, or the path of a local diffusers pipeline / model folder holding it)."""

    name = "weak"

    def __init__(self, scale: float | WeightSchedule = 2.0, weak_model=None):
        if weak_model is None:
            raise ValueError("AutoGuidance needs weak_model: a weaker version of the model (a network or a local folder)")
        self.scale = as_scale(scale)
        self.weak = weak_model if isinstance(weak_model, WeakModel) else WeakModel(weak_model)

    @property
    def perturbations(self) -> dict:
        return {self.name: self.weak}

    def predictions_needed(self, state):
        return {UNCOND: False, self.name: _mask(scale_at(self.scale, state, state.sample), lambda v: v != 1.0)}

    def combine(self, cond, uncond, state):
        weak = state.perturbed_prediction(self.name)
        return weak + scale_at(self.scale, state, cond) * (cond - weak)

    def __repr__(self) -> str:
        return f"AutoGuidance(scale={self.scale!r}, weak_model={self.weak._fields()['model']!r})"


__all__ = ["AutoGuidance"]
