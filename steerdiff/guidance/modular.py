"""``RuleGuider``, steerdiff's rules as guiders of diffusers' modular pipelines, lives in
:mod:`steerdiff.pipelines.modular` (it applies perturbations to the pipeline's network); this module keeps the
import path ``steerdiff.guidance.modular.RuleGuider`` it had before."""

from ..pipelines.modular import RuleGuider

__all__ = ["RuleGuider"]
