"""Guidance rules and measurement-consistency methods."""

from .manifold import DPS, MCG, ProjectionOnly, Unconditional  # inverse problems (issue 6)
