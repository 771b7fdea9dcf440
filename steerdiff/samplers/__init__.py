"""Diffusers-compatible schedulers, and the registry that finds any scheduler by name."""

from .ghvb import GHVBScheduler
from .heavy_ball import HeavyBallDPMSolverScheduler, HeavyBallPLMSScheduler, HeavyBallUniPCScheduler
from .registry import ALIASES, available_schedulers, make_scheduler, resolve_scheduler

__all__ = [
    "ALIASES", "GHVBScheduler", "HeavyBallDPMSolverScheduler", "HeavyBallPLMSScheduler", "HeavyBallUniPCScheduler", "available_schedulers",
    "make_scheduler", "resolve_scheduler",
]
