"""Guidance rules and weight schedules by name, with keyword arguments as a YAML config gives them.

    get_rule("cfg", scale=7.5)
    get_rule("apg", scale={"schedule": "linear", "w0": 9.0}, momentum=-0.5)
    get_rule("interval", rule={"name": "cfg", "scale": 5.0}, sigma_low=0.28, sigma_high=5.42)
    get_rule("adaptive", rule={"name": "cfg", "scale": 5.0}, threshold=0.99)
    get_rule("linear_ag", rule={"name": "cfg", "scale": 5.0}, coefficients="linear_ag.safetensors")
    get_rule("pag", scale=5.0, pag_scale={"schedule": "linear", "w0": 3.0}, layers=["mid"])
    get_rule("autoguidance", scale=2.0, weak_model="path/to/weak/pipeline")

Every keyword is checked against the rule's signature: a misspelt option is an error listing the allowed ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..options import check_options, named_options
from .adaptive import AdaptiveGuidance, LinearAG
from .apg import APG, APGMix
from .autoguidance import AutoGuidance
from .base import GuidanceRule
from .cfg import CFG, CFGRescale, CFGZeroStar
from .fdg import FDG
from .interval import GuidanceInterval
from .magnitude import MagnitudeAwareGuidance
from .perturbed import PAG, SEG, SLG
from .schedules import SCHEDULES, WeightSchedule
from .tcfg import TCFG

RULES: dict[str, type[GuidanceRule]] = {
    "cfg": CFG,
    "apg": APG,
    "cfg_rescale": CFGRescale,
    "cfg_zero_star": CFGZeroStar,
    "interval": GuidanceInterval,
    "adaptive": AdaptiveGuidance,
    "linear_ag": LinearAG,
    "pag": PAG,
    "seg": SEG,
    "slg": SLG,
    "autoguidance": AutoGuidance,
    "tcfg": TCFG,
    "fdg": FDG,
    "mambo_g": MagnitudeAwareGuidance,
    "apg_mix": APGMix,
}
WRAPPERS = ("interval", "adaptive", "linear_ag")


def get_schedule(name: str, **kwargs: Any) -> WeightSchedule:
    """A weight schedule by name (``constant``, ``linear``, ``cosine``, ... see ``SCHEDULES``)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown weight schedule {name!r}; available: {', '.join(SCHEDULES)}")
    cls = SCHEDULES[name]
    check_options(f"schedule {name!r}", kwargs, named_options(cls))
    return cls(**kwargs)


def _scale(value: Any) -> Any:
    if isinstance(value, Mapping):
        spec = dict(value)
        if "name" in spec and "schedule" not in spec:  # a rule as the CFG term of PAG / SEG / SLG
            return _inner_rule(spec)
        if "schedule" not in spec:
            raise ValueError(
                f"a scale given as a mapping needs a 'schedule' key (one of {', '.join(SCHEDULES)}), or a 'name' key for "
                f"a rule as PAG / SEG / SLG's CFG term; got {value!r}"
            )
        return get_schedule(spec.pop("schedule"), **spec)
    return value


def _inner_rule(value: Any) -> GuidanceRule:
    if isinstance(value, GuidanceRule):
        return value
    if isinstance(value, Mapping):
        spec = dict(value)
        if "name" not in spec:
            raise ValueError(f"an inner rule given as a mapping needs a 'name' key (one of {', '.join(RULES)}), got {value!r}")
        return get_rule(spec.pop("name"), **spec)
    raise ValueError(f"rule must be a GuidanceRule or a mapping with a 'name' key, got {value!r}")


def get_rule(name: str, **kwargs: Any) -> GuidanceRule:
    """A guidance rule by name (one of ``RULES``); ``scale`` (and any ``*_scale``, and FDG's ``scales``) may be a
    schedule mapping, ``rule`` (for the
    wrappers interval / adaptive / linear_ag) a nested rule mapping; ``linear_ag`` takes ``coefficients``, the
    path of a file written by :meth:`LinearAG.save`."""
    if name not in RULES:
        raise ValueError(f"unknown guidance rule {name!r}; available: {', '.join(RULES)}")
    cls = RULES[name]
    if name == "linear_ag":
        check_options("rule 'linear_ag'", kwargs, ["rule", "coefficients"])
        if "rule" not in kwargs or "coefficients" not in kwargs:
            raise ValueError("rule 'linear_ag' needs 'rule' (the guidance to apply) and 'coefficients' (a LinearAG file)")
        return LinearAG.load(kwargs["coefficients"], _inner_rule(kwargs["rule"]))
    check_options(f"rule {name!r}", kwargs, named_options(cls))
    kwargs = dict(kwargs)
    for key in kwargs:  # any scale may be a weight schedule: scale, pag_scale, seg_scale, slg_scale, apg_scale, scales
        if key == "scale" or key.endswith("_scale"):
            kwargs[key] = _scale(kwargs[key])
        elif key == "scales" and isinstance(kwargs[key], (list, tuple)):
            kwargs[key] = [_scale(v) for v in kwargs[key]]
    if name in WRAPPERS:
        if "rule" not in kwargs:
            raise ValueError(f"rule {name!r} wraps another rule: give it as rule={{'name': 'cfg', 'scale': ...}}")
        kwargs["rule"] = _inner_rule(kwargs["rule"])
    return cls(**kwargs)
