"""Pipelines: the class-conditional pipeline, loading by name, the guidance hook for diffusers pipelines, the
perturbations of perturbation guidance (:mod:`.perturb`) and ``RuleGuider`` for modular pipelines (:mod:`.modular`)."""

from .class_conditional import ClassConditionalPipeline
from .hooks import SUPPORTED_PIPELINES, GuidanceHook, guide
from .loading import load_pipeline
from .restoration import RestorationPipeline  # inverse problems (issue 6)

__all__ = ["SUPPORTED_PIPELINES", "ClassConditionalPipeline", "GuidanceHook", "guide", "load_pipeline"]
__all__ += ["RestorationPipeline"]  # inverse problems (issue 6)
__all__ += ["RuleGuider"]


def __getattr__(name):
    """``RuleGuider`` on first use (it imports diffusers' modular guiders)."""
    if name == "RuleGuider":
        from .modular import RuleGuider

        return RuleGuider
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
