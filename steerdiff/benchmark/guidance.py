"""Guidance of a benchmark cell, built from its ``{name, scale, kwargs}`` entry.

:func:`build_guidance` is the single place where a config's guidance entry becomes something a pipeline call
and a reference solver can use:

- ``{name: cfg, scale: w}`` with a number w: the pipeline's own classifier-free guidance (Ho & Salimans 2022,
  diffusers' convention g = u + w (c - u); w = 1 is plain conditional sampling, one network call per step);
- any rule of :mod:`steerdiff.guidance` by name (``apg``, ``cfg_rescale``, ``cfg_zero_star``, ``interval``,
  ``adaptive``, ``linear_ag``, or ``cfg`` with a weight schedule as its scale), built with
  :func:`steerdiff.guidance.get_rule` from ``scale`` and ``kwargs`` and attached for each pipeline call with
  :func:`steerdiff.pipelines.guide` (the hook's own NaN check is off: a diverging cell is recorded, not raised).

Both expose the same interface: ``pipeline_call(pipe)`` (a context manager giving the call's keyword
arguments, and afterwards the network evaluations it really ran when the rule skips some) and
``model_fn(denoiser, labels, schedule, prediction_type)``: the model boundary (:class:`steerdiff.core.Denoiser`)
of the guided network for reference solutions.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import Spec, check_guidance_scale


@dataclass
class PipelineCall:
    """Keyword arguments of one pipeline call; ``evaluations`` is filled in after the call by guidance that
    knows how many network rows really ran (a rule that skips unconditional rows), else left None."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    evaluations: int | None = None


def _boundary(denoiser, labels: torch.Tensor, schedule, prediction_type: str, guidance):
    from ..pipelines.conditioning import denoiser_for

    if schedule is None:
        schedule = getattr(denoiser, "schedule", None)  # the analytic mixture carries its own
        if schedule is None:
            raise ValueError("model_fn needs the model's noise process (schedule=)")
    return denoiser_for(denoiser, schedule, prediction_type, guidance, cond=labels)


class ClassifierFreeGuidance:
    """The pipeline's own CFG at scale w (``guidance_scale=w``); :meth:`model_fn` forms the same combination of
    the batched [unconditional, conditional] call."""

    def __init__(self, scale: float):
        self.scale = check_guidance_scale(scale)

    @contextmanager
    def pipeline_call(self, pipe) -> Iterator[PipelineCall]:
        yield PipelineCall({"guidance_scale": self.scale})

    def model_fn(self, denoiser, labels: torch.Tensor, schedule=None, prediction_type: str = "epsilon"):
        return _boundary(denoiser, labels, schedule, prediction_type, self.scale)


class RuleGuidance:
    """A :mod:`steerdiff.guidance` rule, attached to the pipeline with ``guide(pipe, rule)`` for each call."""

    def __init__(self, rule):
        self.rule = rule

    @contextmanager
    def pipeline_call(self, pipe) -> Iterator[PipelineCall]:
        from ..pipelines.hooks import CFG_ON, guide

        call = PipelineCall({"guidance_scale": CFG_ON})  # the CFG branch must run; the rule alone sets the guidance
        with guide(pipe, self.rule, check_finite=False) as hook:
            yield call
        call.evaluations = hook.network_evaluations

    def model_fn(self, denoiser, labels: torch.Tensor, schedule, prediction_type: str = "epsilon"):
        """The rule (a fresh copy) applied to every evaluation of a run; the reference solver resets it at the start
        (per-run state such as APG's momentum then follows the reference solver's own steps)."""
        return _boundary(denoiser, labels, schedule, prediction_type, copy.deepcopy(self.rule))


def build_guidance(spec: Spec) -> ClassifierFreeGuidance | RuleGuidance:
    """The guidance a cell samples with; errors name the rule and its allowed options.  ``cfg`` with a number (or
    no scale: 1) and no other kwargs is the pipeline's own CFG; anything else is a rule built by ``get_rule``."""
    kwargs = dict(spec.kwargs)
    if spec.name == "cfg" and not isinstance(spec.scale, dict):
        scale = kwargs.pop("scale", 1.0)
        if kwargs:
            raise ValueError(f"guidance 'cfg' with a numeric scale is the pipeline's own CFG and takes no other kwargs; got {sorted(kwargs)}")
        return ClassifierFreeGuidance(check_guidance_scale(scale, "guidance 'cfg': scale (or a weight-schedule mapping)"))
    from ..guidance import get_rule

    return RuleGuidance(get_rule(spec.name, **kwargs))
