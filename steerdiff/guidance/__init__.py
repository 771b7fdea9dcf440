"""Guidance rules that combine the predictions of one network evaluation: conditional, unconditional, and the
perturbed ones a rule declares (:mod:`.perturbations`).

Weight convention (diffusers'): g = u + w (c - u); w = 1 is conditional only.  Rules: :class:`CFG`,
:class:`APG`, :class:`APGMix`, :class:`CFGRescale`, :class:`CFGZeroStar`, :class:`TCFG`, :class:`FDG`,
:class:`MagnitudeAwareGuidance`; with perturbed predictions (:mod:`.perturbations`): :class:`PAG`, :class:`SEG`,
:class:`SLG`, :class:`AutoGuidance`; wrappers: :class:`GuidanceInterval`,
:class:`AdaptiveGuidance`, :class:`LinearAG`; weight schedules of the noise level usable as any rule's
``scale``.  For inverse problems, :class:`MCG` and :class:`DPS` (:mod:`.manifold`), :class:`DDS` (:mod:`.dds`) with the measurement
operators of :mod:`.operators`.  Use the guidance rules in a diffusers pipeline with :func:`steerdiff.pipelines.guide`, in a modular pipeline with
:class:`steerdiff.pipelines.modular.RuleGuider` (also ``steerdiff.guidance.RuleGuider``), or by name with
:func:`get_rule`.
"""

from .adaptive import AdaptiveGuidance, LinearAG, cosine_similarity
from .apg import APG, APGMix, project
from .autoguidance import AutoGuidance
from .base import GuidanceRule, GuidanceState
from .cfg import CFG, CFGRescale, CFGZeroStar
from .fdg import FDG
from .interval import GuidanceInterval
from .magnitude import MagnitudeAwareGuidance
from .perturbations import AttentionIdentity, Perturbation, QueryBlur, SkipLayers, WeakModel
from .perturbed import PAG, SEG, SLG, PerturbedGuidance
from .tcfg import TCFG
from .dds import DDS  # inverse problems
from .manifold import DPS, MCG, ProjectionOnly, Unconditional
from .registry import RULES, get_rule, get_schedule
from .schedules import (
    SCHEDULES,
    ClampCosine,
    ClampLinear,
    Constant,
    Cosine,
    InverseLinear,
    LambdaShape,
    Linear,
    PowerCosine,
    Sine,
    VShape,
    WeightSchedule,
)

__all__ = [
    "APG", "CFG", "RULES", "SCHEDULES", "AdaptiveGuidance", "CFGRescale", "CFGZeroStar", "ClampCosine",
    "ClampLinear", "Constant", "Cosine", "GuidanceInterval", "GuidanceRule", "GuidanceState", "InverseLinear",
    "LambdaShape", "Linear", "LinearAG", "PowerCosine", "Sine", "VShape", "WeightSchedule", "cosine_similarity",
    "get_rule", "get_schedule", "project",
]
__all__ += ["APGMix", "AutoGuidance", "FDG", "MagnitudeAwareGuidance", "PAG", "PerturbedGuidance", "SEG", "SLG", "TCFG"]
__all__ += ["AttentionIdentity", "Perturbation", "QueryBlur", "SkipLayers", "WeakModel"]  # perturbed predictions
__all__ += ["DDS", "DPS", "MCG", "ProjectionOnly", "Unconditional"]  # inverse problems
__all__ += ["RuleGuider", "modular"]


def __getattr__(name):
    """``steerdiff.guidance.modular`` and ``RuleGuider`` on first use (they import diffusers' modular guiders)."""
    if name in ("modular", "RuleGuider"):
        import importlib

        module = importlib.import_module(".modular", __name__)
        return module if name == "modular" else module.RuleGuider
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
