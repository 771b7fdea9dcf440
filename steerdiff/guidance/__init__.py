"""Guidance rules that combine the conditional and unconditional predictions of one network evaluation.

Weight convention (diffusers'): g = u + w (c - u); w = 1 is conditional only.  Rules: :class:`CFG`,
:class:`APG`, :class:`CFGRescale`, :class:`CFGZeroStar`; wrappers: :class:`GuidanceInterval`,
:class:`AdaptiveGuidance`, :class:`LinearAG`; weight schedules of the noise level usable as any rule's
``scale``.  Use them in a diffusers pipeline with :func:`steerdiff.pipelines.guide`, in a modular pipeline with
:class:`steerdiff.guidance.modular.RuleGuider`, or by name with :func:`get_rule`.
"""

from .adaptive import AdaptiveGuidance, LinearAG, cosine_similarity
from .apg import APG, project
from .base import GuidanceRule, GuidanceState
from .cfg import CFG, CFGRescale, CFGZeroStar
from .interval import GuidanceInterval
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
