"""The configuration layer: YAML configs with validation and ``key=value`` overrides, and the one ``{name, kwargs}``
spec type, shared by every ``steerdiff`` command and by :mod:`steerdiff.benchmark`.

    load_config(GenerateConfig, "configs/generate/digits.yaml", ["steps=20", "scheduler.name=ddim"])

A :class:`Spec` names a registered thing (a scheduler, a guidance rule, a metric) and its keyword arguments:
``{name: dpmpp_2m, kwargs: {solver_order: 2}}``, or just ``dpmpp_2m``.  Guidance entries may write the rule's
weight beside the name, ``{name: apg, scale: 9}``, shorthand for ``{name: apg, kwargs: {scale: 9}}``.
"""

from __future__ import annotations

import re
from numbers import Real
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

M = TypeVar("M", bound=BaseModel)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading YAML 1.2 floats too: ``1e-3`` and ``1e300`` are numbers, not strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|" r"^[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?$|"
               r"^[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def load_yaml(text) -> Any:
    """YAML text or stream -> Python objects (safe: no arbitrary objects), with YAML 1.2 floats."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def check_guidance_scale(value: Any, name: str = "guidance scale") -> float:
    """A classifier-free guidance weight w: a real number (not a bool), finite and >= 0.  The one check of a numeric
    guidance scale; every entry that takes one (configs, the Denoiser, the pipelines, the benchmark) calls it."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, and so are infinite or NaN values of number fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and what it accepts."""


DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16")


def torch_dtype(name: str):
    """The torch dtype of a config's ``dtype`` name (one of :data:`DTYPE_NAMES`)."""
    import torch

    if name not in DTYPE_NAMES:
        raise ConfigError(f"dtype must be one of {DTYPE_NAMES}, got {name!r}")
    return getattr(torch, name)


def _compact(kwargs: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(kwargs.items()))


class Spec(StrictModel):
    """``{name, kwargs, label}``: a scheduler, guidance rule or metric by its registry name, with keyword arguments
    for its constructor and an optional display label.  A bare name is accepted, and so is ``scale`` beside the name
    (a guidance rule's weight: ``{name: cfg, scale: 5}`` is ``{name: cfg, kwargs: {scale: 5}}``)."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"name": data}
        if isinstance(data, dict) and "scale" in data:
            data = dict(data)
            scale = data.pop("scale")
            if scale is None:  # an unset scale (as configs written before the shorthand stored it)
                return data
            kwargs = dict(data.get("kwargs") or {})
            if "scale" in kwargs:
                raise ValueError("scale is given twice, beside the name and in kwargs; give it once")
            kwargs["scale"] = float(scale) if isinstance(scale, int) and not isinstance(scale, bool) else scale
            data["kwargs"] = kwargs
        return data

    @model_validator(mode="after")
    def _check_scale(self) -> "Spec":
        scale = self.kwargs.get("scale")
        if isinstance(scale, Real) and not isinstance(scale, bool):
            check_guidance_scale(scale, "scale")
        return self

    @classmethod
    def with_default_name(cls, data: Any, name: str) -> Any:
        """For a field's ``before`` validator: a mapping without ``name`` (an override such as
        ``scheduler.kwargs.eta=0.5``) names the field's default."""
        if isinstance(data, dict) and "name" not in data:
            return {"name": name, **data}
        return data

    @property
    def scale(self) -> Any:
        """The guidance weight (a number or a weight-schedule mapping), None when not given."""
        return self.kwargs.get("scale")

    @property
    def display(self) -> str:
        """The label, else ``name`` with the scale and the other kwargs: ``cfg 5``, ``ddim(eta=0.5)``."""
        if self.label:
            return self.label
        rest = {k: v for k, v in self.kwargs.items() if k != "scale"}
        scale = self.scale
        if "scale" not in self.kwargs:
            return f"{self.name}({_compact(rest)})" if rest else self.name
        if isinstance(scale, dict):
            sched = dict(scale)
            text = f"{self.name} {sched.pop('schedule', '?')}({_compact(sched)})"
        elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
            text = f"{self.name} {scale:g}"
        else:
            text = f"{self.name} {scale}"
        return text + (f" ({_compact(rest)})" if rest else "")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["steps=20", "scheduler.name=ddim"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (dotted keys for nested fields)")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        try:
            node[parts[-1]] = load_yaml(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(err).splitlines()[0]})") from None
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _section(annotation: Any) -> Any:
    """The config section (a model class) of a field's annotation: ``Spec | None`` and ``list[Spec]`` give Spec."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section(arg)
        if found is not None:
            return found
    return None


def _describe(err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            section: Any = model
            for part in e["loc"][:-1]:
                if isinstance(part, int) or section is None:  # a list index keeps the list's item model
                    continue
                field = section.model_fields.get(str(part))
                section = _section(field.annotation) if field is not None else None
            allowed = sorted(section.model_fields) if isinstance(section, type) and issubclass(section, BaseModel) else []
            lines.append(f"unknown key {loc!r}; allowed keys here: {', '.join(allowed)}")
        else:
            lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def load_config(model: type[M], path: str | Path | None = None, overrides: list[str] | None = None) -> M:
    """Defaults of ``model``, updated by the YAML file at ``path``, then by ``overrides``; validated."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            with open(path) as f:
                loaded = load_yaml(f) or {}
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"config file {str(path)!r} is not valid YAML{at}: {problem}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
        data = loaded
    data = _merge(data, parse_overrides(overrides or []))
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid {model.__name__}: {_describe(err, model)}") from None
