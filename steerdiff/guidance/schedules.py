"""CFG weight schedules (Wang et al., "Analysis of Classifier-Free Guidance Weight Schedulers", TMLR 2024).

A schedule is the guidance weight as a function of the noise level, never of the step index:

    s = t / (T - 1) in [0, 1]      (t the network's timestep, T the training timesteps; 1 = pure noise, 0 = clean)

so "increasing" means increasing as the noise falls, whatever the number of steps, the scheduler or the order in
which it visits timesteps.  (Plugging the step index in where t belongs reverses every schedule.)

Weight convention.  The paper writes its schedules for the guidance strength of eps = c + w' (c - u), i.e.
w' = w - 1 in diffusers' convention g = u + w (c - u).  Each schedule here applies the paper's shape f(s) to
w - 1 and returns diffusers' w:

    w(s) = 1 + (w0 - 1) f(s)

so ``w0`` is diffusers' weight, w = 1 (conditional only) is the paper's w' = 0, and for the shapes normalised to
mean 1 over s in [0, 1] the run-averaged weight is w0 (``Linear(w0=7.5)`` averages 7.5 like ``CFG(7.5)``).

==================  ====================================  ==========================
schedule            f(s)                                  direction as noise falls
==================  ====================================  ==========================
Constant            1                                     flat
Linear              2 (1 - s)                             increasing
Cosine              1 + cos(pi s)                         increasing
InverseLinear       2 s                                   decreasing
Sine                1 + sin(pi s - pi/2)                  decreasing
VShape              2 |2 s - 1|                           down, then up (min at s = 1/2)
LambdaShape         2 (1 - |2 s - 1|)                     up, then down (max at s = 1/2)
PowerCosine         (1 - cos(pi (1 - s)^p)) / 2           increasing, from 1 to w0 (MUSE's schedule)
ClampLinear         Linear, clamped below at w = c        increasing
ClampCosine         Cosine, clamped below at w = c        increasing
==================  ====================================  ==========================

V- and Lambda-shape are the paper's piecewise linear / inverse-linear schedules split at s = 1/2.  PowerCosine's
w0 is its final (largest) weight, not its mean.  The clamps' floor ``c`` is a diffusers weight: the paper's
clamp c' in {1, 2, 4} (on w') is c = c' + 1 here.
"""

from __future__ import annotations

import math

import torch

from ..core.tensors import expand_to
from .base import check_scalar

_CHECK_GRID = torch.linspace(0.0, 1.0, 1025, dtype=torch.float64)


class WeightSchedule:
    """A guidance weight w(s) in diffusers' convention; ``schedule(progress)`` maps float64 s to float64 w.

    Subclasses define :meth:`shape` (the paper's f) or override :meth:`__call__`, and set their own parameters
    before calling ``super().__init__(w0)``, which evaluates the schedule on a dense grid of s in [0, 1] and
    refuses NaN/Inf or negative weights (rules check again when they are given a schedule).
    """

    def __init__(self, w0: float):
        self.w0 = check_scalar(w0, f"{type(self).__name__} w0", low=0.0)
        self._validate()

    def shape(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(s, dtype=torch.float64)
        return 1.0 + (self.w0 - 1.0) * self.shape(s)

    def _validate(self) -> None:
        w = self(_CHECK_GRID)
        bad = ~torch.isfinite(w)
        if bool(bad.any()):
            s = float(_CHECK_GRID[bad][0])
            raise ValueError(f"{self!r} yields NaN/Inf weights (first at s = {s:g}); check its parameters")
        if bool((w < 0).any()):
            s = float(_CHECK_GRID[w < 0][0])
            raise ValueError(f"{self!r} yields negative weights (w = {float(w.min()):g} at s = {s:g}); guidance scales must be >= 0")

    def _params(self) -> str:
        return f"w0={self.w0:g}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._params()})"


class Constant(WeightSchedule):
    """w = w0 at every noise level (static CFG)."""

    def shape(self, s):
        return torch.ones_like(s)


class Linear(WeightSchedule):
    """Linear, increasing as the noise falls: f(s) = 2 (1 - s)."""

    def shape(self, s):
        return 2.0 * (1.0 - s)


class Cosine(WeightSchedule):
    """Cosine, increasing as the noise falls: f(s) = 1 + cos(pi s)."""

    def shape(self, s):
        return 1.0 + torch.cos(math.pi * s)


class InverseLinear(WeightSchedule):
    """Inverse linear, decreasing as the noise falls: f(s) = 2 s."""

    def shape(self, s):
        return 2.0 * s


class Sine(WeightSchedule):
    """Sine, decreasing as the noise falls: f(s) = sin(pi s - pi/2) + 1."""

    def shape(self, s):
        return torch.sin(math.pi * s - math.pi / 2) + 1.0


class VShape(WeightSchedule):
    """V-shape: inverse-linear down to 0 at s = 1/2, then linear back up: f(s) = 2 |2 s - 1|."""

    def shape(self, s):
        return 2.0 * (2.0 * s - 1.0).abs()


class LambdaShape(WeightSchedule):
    """Lambda-shape: linear up to 2 at s = 1/2, then inverse-linear back down: f(s) = 2 (1 - |2 s - 1|)."""

    def shape(self, s):
        return 2.0 * (1.0 - (2.0 * s - 1.0).abs())


class PowerCosine(WeightSchedule):
    """Power-cosine (MUSE, Chang et al. 2023): f(s) = (1 - cos(pi (1 - s)^p)) / 2, from w = 1 at pure noise to
    w = w0 at the clean end; larger ``p`` keeps the weight low for longer."""

    def __init__(self, w0: float, p: float = 1.0):
        self.p = check_scalar(p, "PowerCosine p", low=0.0, low_open=True)
        super().__init__(w0)

    def shape(self, s):
        return (1.0 - torch.cos(math.pi * (1.0 - s) ** self.p)) / 2.0

    def _params(self) -> str:
        return f"w0={self.w0:g}, p={self.p:g}"


class _Clamped(WeightSchedule):
    base: type[WeightSchedule]

    def __init__(self, w0: float, c: float = 2.0):
        self.c = check_scalar(c, f"{type(self).__name__} c", low=0.0)
        super().__init__(w0)

    def shape(self, s):
        return self.base.shape(self, s)

    def __call__(self, s):
        return super().__call__(s).clamp_min(self.c)

    def _params(self) -> str:
        return f"w0={self.w0:g}, c={self.c:g}"


class ClampLinear(_Clamped):
    """max(c, Linear(w0)): the linear schedule with its weight floored at ``c`` (a diffusers weight)."""

    base = Linear


class ClampCosine(_Clamped):
    """max(c, Cosine(w0)): the cosine schedule with its weight floored at ``c`` (a diffusers weight)."""

    base = Cosine


SCHEDULES: dict[str, type[WeightSchedule]] = {
    "constant": Constant,
    "linear": Linear,
    "cosine": Cosine,
    "inverse_linear": InverseLinear,
    "sine": Sine,
    "v_shape": VShape,
    "lambda_shape": LambdaShape,
    "power_cosine": PowerCosine,
    "clamp_linear": ClampLinear,
    "clamp_cosine": ClampCosine,
}


def as_scale(scale, name: str = "scale") -> float | WeightSchedule:
    """A rule's scale: a number >= 0 or a :class:`WeightSchedule`."""
    if isinstance(scale, WeightSchedule):
        scale._validate()
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"{name} must be a number >= 0 or a WeightSchedule ({', '.join(SCHEDULES)}), got {scale!r}")
    return check_scalar(scale, name, low=0.0)


def scale_at(scale: float | WeightSchedule, state, like: torch.Tensor) -> float | torch.Tensor:
    """The weight at this evaluation, ready to multiply ``like`` (B, ...): the number itself, or the schedule at
    ``state.progress`` broadcast per sample in ``like``'s dtype."""
    if isinstance(scale, WeightSchedule):
        return expand_to(scale(state.progress), like)
    return scale
