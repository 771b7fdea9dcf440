"""Schedulers by name: diffusers' own and steerdiff's, plus short aliases for common solver settings.

``make_scheduler("dpmpp_2m", pipe.scheduler.config)`` builds a scheduler from a model's scheduler config
(keeping its betas and prediction type), like ``X.from_config(config)``, but checks every keyword against
the class's signature so that a misspelt option is an error rather than silently ignored.
"""

from __future__ import annotations

import inspect
from typing import Any

import diffusers
from diffusers import SchedulerMixin

from ..options import check_options, named_options

# alias -> (class name, preset keyword arguments)
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "plms_hb": ("HeavyBallPLMSScheduler", {}),
    "dpmpp_2m_hb": ("HeavyBallDPMSolverScheduler", {}),
    "ghvb": ("GHVBScheduler", {}),
}


def _steerdiff_schedulers() -> dict[str, type]:
    from .. import samplers

    return {
        name: obj
        for name, obj in vars(samplers).items()
        if inspect.isclass(obj) and issubclass(obj, SchedulerMixin)
    }


def _diffusers_schedulers() -> dict[str, type]:
    return {
        name: getattr(diffusers, name)
        for name in dir(diffusers)
        if name.endswith("Scheduler") and inspect.isclass(getattr(diffusers, name, None))
        and issubclass(getattr(diffusers, name), SchedulerMixin)
    }


def available_schedulers() -> list[str]:
    return sorted(set(ALIASES) | set(_steerdiff_schedulers()) | set(_diffusers_schedulers()))


def resolve_scheduler(name: str) -> tuple[type, dict[str, Any]]:
    """The scheduler class for ``name`` (alias, steerdiff class name or diffusers class name) and its preset."""
    preset: dict[str, Any] = {}
    if name in ALIASES:
        name, preset = ALIASES[name]
    for table in (_steerdiff_schedulers(), _diffusers_schedulers()):
        if name in table:
            return table[name], dict(preset)
    raise ValueError(f"unknown scheduler {name!r}; available: {', '.join(available_schedulers())}")


def make_scheduler(name: str, base_config: Any = None, **kwargs: Any) -> SchedulerMixin:
    """``cls.from_config(base_config, **preset, **kwargs)`` with every keyword checked against the class."""
    cls, preset = resolve_scheduler(name)
    check_options(cls.__name__, kwargs, named_options(cls))
    if base_config is None:
        return cls(**{**preset, **kwargs})
    if hasattr(base_config, "config") and not isinstance(base_config, dict):
        base_config = base_config.config
    return cls.from_config(base_config, **{**preset, **kwargs})
