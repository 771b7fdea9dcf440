"""Keyword options checked against the class they configure, so that a misspelt option in a config is an error
naming the allowed ones rather than silently ignored (schedulers, guidance rules, metrics, feature spaces)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    return {} if cls.__init__ is object.__init__ else dict(inspect.signature(cls.__init__).parameters)


def named_options(cls: type) -> list[str]:
    """The named keyword parameters of ``cls.__init__`` (no ``self``, ``*args`` or ``**kwargs``)."""
    return [n for n, p in _init_parameters(cls).items() if n != "self" and p.kind not in _VARIADIC]


def takes_any_option(cls: type) -> bool:
    """Whether ``cls.__init__`` also accepts ``**kwargs``."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _init_parameters(cls).values())


def check_options(what: str, kwargs: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Raise ``ValueError("<what> has no option(s) [...]; allowed: [...]")`` for keys of ``kwargs`` not allowed."""
    allowed = sorted(allowed)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"{what} has no option(s) {unknown}; allowed: {allowed}")
