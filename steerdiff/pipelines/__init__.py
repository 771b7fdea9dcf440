"""Pipelines: the class-conditional pipeline, loading by name, and the guidance hook for diffusers pipelines."""

from .class_conditional import ClassConditionalPipeline
from .hooks import SUPPORTED_PIPELINES, GuidanceHook, guide
from .loading import load_pipeline
from .restoration import RestorationPipeline  # inverse problems (issue 6)

__all__ = ["SUPPORTED_PIPELINES", "ClassConditionalPipeline", "GuidanceHook", "guide", "load_pipeline"]
__all__ += ["RestorationPipeline"]  # inverse problems (issue 6)
