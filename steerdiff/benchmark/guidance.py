"""Guidance of a benchmark cell, built from its ``{name, scale, kwargs}`` entry.

:func:`build_guidance` is the single place where a config's guidance entry becomes something a pipeline
call and a reference solver can use.  Today it knows the pipeline's built-in classifier-free guidance
(Ho & Salimans 2022, diffusers' convention g = u + w (c - u), w = ``scale``; w = 1 is plain conditional
sampling with one network call per step).  Named rules from ``steerdiff.guidance`` are wired in here, and
only here, through ``steerdiff.pipelines.guide(pipe, rule)``, once that package provides them; until then any
other name is a config error that lists the available ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..pipelines.class_conditional import null_class_id
from .config import GuidanceSpec

GUIDANCE_RULES = ("cfg",)


class ClassifierFreeGuidance:
    """The pipeline's own CFG at scale w: the pipeline call gets ``guidance_scale=w``; the same combination of
    the batched [unconditional, conditional] call serves reference solvers through :meth:`model_fn`."""

    def __init__(self, scale: float):
        if not scale >= 0:
            raise ValueError(f"guidance scale must be >= 0, got {scale}")
        self.scale = float(scale)

    def describe(self) -> dict[str, Any]:
        return {"name": "cfg", "scale": self.scale}

    @contextmanager
    def pipeline_call(self, pipe) -> Iterator[dict[str, Any]]:
        """Keyword arguments for one pipeline call, with the rule active for its duration."""
        yield {"guidance_scale": self.scale}

    def model_fn(self, denoiser, labels: torch.Tensor):
        """``model_fn(x, t)``: the guided network output for ``labels``, as the pipeline computes it."""
        if self.scale == 1.0:
            return lambda x, t: denoiser(x, t, class_labels=labels).sample
        both = torch.cat([torch.full_like(labels, null_class_id(denoiser)), labels])

        def guided(x, t):
            uncond, cond = denoiser(torch.cat([x, x]), torch.cat([t, t]), class_labels=both).sample.chunk(2)
            return uncond + self.scale * (cond - uncond)

        return guided


def build_guidance(spec: GuidanceSpec) -> ClassifierFreeGuidance:
    """The guidance a cell samples with.

    A named rule will come back with the same interface: ``pipeline_call(pipe)`` entering ``guide(pipe, rule)``
    for the duration of a pipeline call, and ``model_fn`` applying the rule to the batched [uncond, cond]
    outputs for reference solutions.  The rest of the harness only sees this interface."""
    if spec.name == "cfg":
        if spec.kwargs:
            raise ValueError(f"guidance 'cfg' takes only `scale`; got kwargs {sorted(spec.kwargs)}")
        return ClassifierFreeGuidance(spec.scale)
    raise ValueError(f"unknown guidance rule {spec.name!r}; available: {', '.join(GUIDANCE_RULES)}")
