"""Pipelines: the class-conditional pipeline, loading by name, and the guidance hook for diffusers pipelines."""

from .class_conditional import ClassConditionalPipeline
from .hooks import SUPPORTED_PIPELINES, GuidanceHook, guide
from .loading import load_pipeline

__all__ = ["SUPPORTED_PIPELINES", "ClassConditionalPipeline", "GuidanceHook", "guide", "load_pipeline"]
