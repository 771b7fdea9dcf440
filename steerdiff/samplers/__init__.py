"""Diffusers-compatible schedulers, and the registry that finds any scheduler by name."""

from .registry import ALIASES, available_schedulers, make_scheduler, resolve_scheduler

__all__ = ["ALIASES", "available_schedulers", "make_scheduler", "resolve_scheduler"]
