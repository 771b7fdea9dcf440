"""Schedulers by name: diffusers' own and steerdiff's, plus short aliases for common solver settings.

``make_scheduler("dpmpp_2m", pipe.scheduler.config)`` builds a scheduler from a model's scheduler config
(keeping its betas and prediction type), like ``X.from_config(config)``, but checks every keyword against
the class's signature so that a misspelt option is an error rather than silently ignored.

The noise process is kept too.  From a flow-matching config (FlowMatchEulerDiscreteScheduler's), steerdiff's
schedulers integrate the flow ODE (they read it themselves), diffusers' flow classes are built as usual, and
diffusers' multistep solvers that have a flow mode (DPM-Solver, UniPC) are built in it:
``use_flow_sigmas=True``, ``flow_shift`` = the config's shift (or dynamic shifting), ``prediction_type=
"flow_prediction"``.  Any other diffusers class would silently run VP dynamics on a flow model, and a flow-only
class on a VP model: both are ValueErrors naming the classes that fit.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import diffusers
from diffusers import SchedulerMixin

from ..core.process import noise_process_family
from ..options import check_options, named_options

# alias -> (class name, preset keyword arguments)
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "plms_hb": ("HeavyBallPLMSScheduler", {}),
    "dpmpp_2m_hb": ("HeavyBallDPMSolverScheduler", {}),
    "dpmpp_3m_hb": ("HeavyBallDPMSolverScheduler", {"solver_order": 3}),
    "unipc_hb": ("HeavyBallUniPCScheduler", {}),
    "ghvb": ("GHVBScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}


@functools.cache
def _steerdiff_schedulers() -> dict[str, type]:
    from .. import samplers  # the package, which imports this module; read once its classes are all defined

    return {
        name: obj
        for name, obj in vars(samplers).items()
        if inspect.isclass(obj) and issubclass(obj, SchedulerMixin)
    }


@functools.cache
def _diffusers_schedulers() -> dict[str, type]:
    return {
        name: getattr(diffusers, name)
        for name in dir(diffusers)
        if name.endswith("Scheduler") and inspect.isclass(getattr(diffusers, name, None))
        and issubclass(getattr(diffusers, name), SchedulerMixin)
    }


class StaticShiftDPMSolverMultistepScheduler(diffusers.DPMSolverMultistepScheduler):
    """diffusers' DPM-Solver in flow mode with a static shift: ``set_timesteps`` ignores ``mu`` (module docstring).
    Its config is DPMSolverMultistepScheduler's, under that class name."""

    def set_timesteps(self, num_inference_steps=None, device=None, mu=None, timesteps=None):
        if not self.config.get("use_dynamic_shifting"):
            mu = None
        return super().set_timesteps(num_inference_steps, device=device, mu=mu, timesteps=timesteps)


StaticShiftDPMSolverMultistepScheduler.__name__ = "DPMSolverMultistepScheduler"  # the name its config is saved under
FLOW_MODE_BROKEN = {name: "its flow mode never reaches s = 0 (the last noise level repeats, the samples keep noise)"
                    for name in ("DEISMultistepScheduler", "SASolverScheduler")}


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


def _family_of_class(cls: type) -> str:
    """"flow", "vp" or "both" (steerdiff's schedulers; diffusers' solvers with a use_flow_sigmas mode)."""
    if cls.__name__.startswith("FlowMatch"):
        return "flow"
    names = set(inspect.signature(cls.__init__).parameters)
    if "noise_process" in names or "use_flow_sigmas" in names:
        return "both"
    return "vp"


def _flow_mode(cls: type, source: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keywords that put a diffusers solver with a ``use_flow_sigmas`` mode into it, from a flow config."""
    if "noise_process" in inspect.signature(cls.__init__).parameters:  # steerdiff's schedulers read the config
        return {}
    names = set(inspect.signature(cls.__init__).parameters)
    flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
    if source.get("use_flow_sigmas"):
        flow["flow_shift"] = source.get("flow_shift", 1.0)
    else:
        flow["flow_shift"] = float(source.get("shift", 1.0) or 1.0)
        if source.get("use_dynamic_shifting") and "use_dynamic_shifting" in names:
            flow["use_dynamic_shifting"] = True
            flow["time_shift_type"] = source.get("time_shift_type", "exponential")
    return {k: v for k, v in flow.items() if k in names and k not in kwargs}


def make_scheduler(name: str, base_config: Any = None, **kwargs: Any) -> SchedulerMixin:
    """``cls.from_config(base_config, **preset, **kwargs)`` with every keyword checked against the class, and the
    base config's noise process kept (module docstring)."""
    cls, preset = resolve_scheduler(name)
    check_options(cls.__name__, kwargs, named_options(cls))
    if base_config is None:
        return cls(**{**preset, **kwargs})
    source_class = "" if isinstance(base_config, dict) or not hasattr(base_config, "config") else type(base_config).__name__
    if hasattr(base_config, "config") and not isinstance(base_config, dict):
        base_config = base_config.config
    source = dict(base_config)
    if source_class:
        source.setdefault("_class_name", source_class)
    family, target = noise_process_family(source), _family_of_class(cls)
    if family == "flow" and target == "vp":
        raise ValueError(
            f"{cls.__name__} integrates VP schedules only, but the model's scheduler config is flow matching "
            f"({source.get('_class_name', 'flow keys')}); use a steerdiff scheduler (plms_hb, dpmpp_2m_hb, dpmpp_3m_hb, unipc_hb, ghvb), "
            "FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler, or DPMSolverMultistepScheduler / "
            "UniPCMultistepScheduler (built in their flow mode)"
        )
    if family == "vp" and target == "flow":
        raise ValueError(
            f"{cls.__name__} is a flow-matching scheduler, but the model's scheduler config is variance preserving"
        )
    if family == "flow" and cls.__name__ in FLOW_MODE_BROKEN:
        raise ValueError(
            f"{cls.__name__} cannot sample flow-matching models in diffusers {diffusers.__version__}: "
            f"{FLOW_MODE_BROKEN[cls.__name__]}; use dpmpp_2m, dpmpp_3m, unipc, flow_euler, or steerdiff's plms_hb, "
            "dpmpp_2m_hb, dpmpp_3m_hb, unipc_hb, ghvb"
        )
    extra = _flow_mode(cls, source, kwargs) if family == "flow" else {}
    settings = {**preset, **extra, **kwargs}
    if cls is diffusers.DPMSolverMultistepScheduler and settings.get("use_flow_sigmas") and not settings.get(
            "use_dynamic_shifting", source.get("use_dynamic_shifting")):
        cls = StaticShiftDPMSolverMultistepScheduler
    return cls.from_config(base_config, **settings)


def lay_out(scheduler, steps: int, device=None) -> None:
    """``scheduler.set_timesteps(steps)`` outside a pipeline, to inspect the grid it makes: a scheduler with dynamic
    shifting is given mu = 1 (a pipeline passes its own mu, which moves the timesteps but never changes their number)."""
    extra = {"mu": 1.0} if scheduler.config.get("use_dynamic_shifting") else {}
    scheduler.set_timesteps(steps, device=device, **extra)
