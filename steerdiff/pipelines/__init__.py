"""Pipelines: the class-conditional pipeline, loading by name, the guidance hook for diffusers pipelines, the
perturbations of perturbation guidance (:mod:`.perturb`), ``RuleGuider`` for modular pipelines (:mod:`.modular`),
calling any diffusers pipeline from a config (:mod:`.calling`) and the restoration pipeline.

The names below are imported on first use: they import diffusers' models, and the lighter modules of this package
(:mod:`.calling`, :mod:`.folder`) are read by ``steerdiff generate`` before any model is needed.
"""

import importlib

_LAZY = {
    "ClassConditionalPipeline": ".class_conditional",
    "SUPPORTED_PIPELINES": ".hooks",
    "GuidanceHook": ".hooks",
    "guide": ".hooks",
    "load_pipeline": ".loading",
    "RestorationPipeline": ".restoration",  # inverse problems
    "RuleGuider": ".modular",  # diffusers' modular guiders
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
