"""Measurement consistency for inverse problems: MCG, DPS and the projection-only baseline.

Problem: y = A x0 + n, n ~ N(0, sigma_y^2 I).  At each reverse step i (x_i at noise level (alpha_i, sigma_i),
the next level (alpha_{i-1}, sigma_{i-1})), with the Tweedie estimate x0_hat(x_i) = E[x0 | x_i] computed by the
network *with autograd* and the residual r_i = y - A x0_hat(x_i):

    x'       = the sampler's unconditional step from x_i (ancestral DDPM in both papers)
    g_i      = grad_{x_i} ||r_i||^2                      (through the network: the manifold constraint)

    DPS  (Chung, Kim, Mccann, Klasky, Ye, ICLR 2023, Alg. 1):
        x_{i-1} = x' - zeta_i g_i
    MCG  (Chung, Sim, Ryu, Ye, NeurIPS 2022, eq. 14):
        x''     = x' - zeta_i (I - A^+ A) g_i             (the gradient restricted to the unmeasured part)
        x_{i-1} = x'' + A^+ (y_{i-1} - A x''),  y_{i-1} = alpha_{i-1} y + sigma_{i-1} A z,  z ~ N(0, I)
                  (projection onto the measurement noised to the *next* level; for inpainting
                  (1 - M) x'' + M y_{i-1})
    Projection only (Score-SDE style, Song et al. 2021; the baseline of both papers):
        x_{i-1} = x' + A^+ (y_{i-1} - A x')

Step sizes zeta_i (``step_size_rule``), made explicit because papers and reference code differ:

    "norm"      zeta_i = step_size / (2 ||r_i||): a step of ``step_size`` along grad ||r_i|| (the unsquared
                norm).  This is what both reference implementations do (DPS: ``scale`` 0.5 for inpainting,
                1.0 otherwise; MCG: 1.0 for inpainting, 0.1 in its colorization and CT scripts), except
                that they take ||r|| over the *whole batch*, which couples the samples of a batch; here it
                is per sample.
    "residual"  zeta_i = step_size / ||r_i||: the DPS paper's zeta_i = zeta' / ||y - A x0_hat|| on the
                squared norm (so "residual" with step_size s equals "norm" with step_size 2 s).
    "constant"  zeta_i = step_size: the MCG paper's fixed alpha on the squared norm.

Pitfalls of the reference code avoided here: x0_hat is never clamped to [-1, 1] on the gradient path (a clamp
zeroes the gradient wherever it is active; both reference implementations clip); the projection is
(1 - M) x + M y (DPS's generic operator writes (I - A^T A) y - A x); and the measurement is noised to the level
of x_{i-1}, not x_i (both reference loops noise it to the level of x_i and project x_{i-1} onto it).  With noisy measurements (sigma_y > 0) MCG's
projection forces x onto a noisy y, which is why DPS drops it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.tensors import batch_norm, expand_to
from .operators import LinearOperator

STEP_SIZE_RULES = ("norm", "residual", "constant")


def step_coefficients(step_size: float, rule: str, residual_norm: torch.Tensor) -> torch.Tensor:
    """Per-sample zeta_i (shape (B,)) multiplying grad ||r_i||^2, for ``rule`` in :data:`STEP_SIZE_RULES`.

    A zero residual has a zero gradient: its coefficient is 0 (not step / 0).
    """
    if rule == "constant":
        return torch.full_like(residual_norm, step_size)
    zeta = torch.where(residual_norm > 0, step_size / residual_norm, torch.zeros_like(residual_norm))
    return 0.5 * zeta if rule == "norm" else zeta


def gradient_step(grad: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """zeta_i * grad per sample, multiplied in float64 (zeta ~ 1 / ||r|| may not fit a half-precision sample)."""
    return (expand_to(coefficients, grad.to(torch.float64)) * grad.to(torch.float64)).to(grad.dtype)


def manifold_gradient(x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_x ||r||^2 per sample through the graph that produced ``residual`` from ``x``, and ||r|| (float64, (B,)).

    ||r||^2 is accumulated in float64; the gradient comes back in ``x``'s dtype.
    """
    norm = batch_norm(residual)
    (grad,) = torch.autograd.grad(norm.square().sum(), x)
    return grad, norm.detach()


def _check_step(step_size: float, rule: str) -> float:
    step_size = float(step_size)
    if not math.isfinite(step_size) or step_size < 0:
        raise ValueError(f"step_size must be a finite number >= 0, got {step_size}")
    if rule not in STEP_SIZE_RULES:
        raise ValueError(f"step_size_rule must be one of {STEP_SIZE_RULES}, got {rule!r}")
    return step_size


class RestorationMethod:
    """What a restoration sampler does after each unconditional step.

    ``uses_gradient``: needs the residual with a graph back to x_i (one extra backward pass per step);
    ``uses_projection``: needs the operator's projection and the measurement noised to the next level;
    ``takes_own_step``: replaces the sampler's step by its own ``step(x, x0_hat, alpha, sigma, alpha_next,
    sigma_next, noise, y, operator, sigma_y)`` (DDS; the ancestral sampler only).
    """

    uses_gradient = False
    uses_projection = False
    takes_own_step = False
    name = "unconditional"

    def check_operator(self, operator: LinearOperator) -> None:
        if self.uses_projection and not operator.has_projection:
            raise ValueError(
                f"{type(self).__name__} projects onto the measurements, but {type(operator).__name__} has no "
                "projection (no closed-form pseudo-inverse); use DPS, which needs only the gradient"
            )

    def update(self, x_next, x, residual, operator, noised_measurement):
        """The corrected x_{i-1} from the sampler's step ``x_next``; ``residual`` = y - A x0_hat(x)."""
        return x_next


@dataclass(frozen=True)
class ManifoldGradient(RestorationMethod):
    """The shared part of MCG and DPS: a step size and its rule (see the module docstring), checked once."""

    step_size: float = 1.0
    step_size_rule: str = "norm"

    uses_gradient = True

    def __post_init__(self):
        object.__setattr__(self, "step_size", _check_step(self.step_size, self.step_size_rule))

    def gradient_term(self, x, residual, restrict=None) -> torch.Tensor:
        """zeta_i grad_{x_i} ||r_i||^2 (``restrict`` applied to the gradient first)."""
        grad, norm = manifold_gradient(x, residual)
        if restrict is not None:
            grad = restrict(grad)
        return gradient_step(grad, step_coefficients(self.step_size, self.step_size_rule, norm))


class DPS(ManifoldGradient):
    """Diffusion posterior sampling: x_{i-1} = x' - zeta_i grad_{x_i} ||y - A x0_hat(x_i)||^2.

    Defaults follow the reference code: a step of 1.0 along grad ||r|| ("norm" rule); its inpainting setting is 0.5.
    """

    name = "dps"

    def update(self, x_next, x, residual, operator, noised_measurement):
        return x_next - self.gradient_term(x, residual)


class MCG(ManifoldGradient):
    """Manifold-constrained gradient: the DPS step restricted to the null space of A, then the projection
    onto the measurement noised to the next level.  Defaults: the reference code's 1.0 along grad ||r||.
    (The restriction does not change the result, since the projection replaces the measured part; it is kept
    to follow eq. 14 of the paper.)"""

    uses_projection = True
    name = "mcg"

    def update(self, x_next, x, residual, operator, noised_measurement):
        return operator.project(x_next - self.gradient_term(x, residual, operator.null_part), noised_measurement)


@dataclass(frozen=True)
class ProjectionOnly(RestorationMethod):
    """The Score-SDE baseline: project every step onto the measurement noised to the next level, no gradient."""

    uses_projection = True
    name = "projection"

    def update(self, x_next, x, residual, operator, noised_measurement):
        return operator.project(x_next, noised_measurement)


@dataclass(frozen=True)
class Unconditional(RestorationMethod):
    """Plain sampling that ignores the measurement (the lower baseline)."""


def _methods() -> dict[str, type[RestorationMethod]]:
    from .dds import DDS  # dds builds on this module

    return {"mcg": MCG, "dps": DPS, "dds": DDS, "projection": ProjectionOnly, "unconditional": Unconditional}


def make_method(name: str, **kwargs) -> RestorationMethod:
    """A restoration method by name (``mcg``, ``dps``, ``dds``, ``projection``, ``unconditional``) with its options."""
    methods = _methods()
    if name not in methods:
        raise ValueError(f"unknown restoration method {name!r}; available: {sorted(methods)}")
    return methods[name](**kwargs)


__all__ = [
    "DPS", "MCG", "STEP_SIZE_RULES", "ManifoldGradient", "ProjectionOnly", "RestorationMethod", "Unconditional",
    "gradient_step", "make_method", "manifold_gradient", "step_coefficients",
]
