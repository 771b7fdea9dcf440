"""Decomposed Diffusion Sampler (DDS; Chung, Lee, Ye, ICLR 2024, "Decomposed Diffusion Sampler for Accelerating
Large-Scale Inverse Problems"; official code HJ-harry/DDS, ``solver_2d.py``).

Per reverse step, from x_i at noise level (alpha_i, sigma_i) to (alpha_{i-1}, sigma_{i-1}), with the network's
prediction taken *without* autograd:

    x0_hat  = E[x0 | x_i]                                       (Tweedie, through the model boundary)
    eps_hat = (x_i - alpha_i x0_hat) / sigma_i
    x0'     = M steps of conjugate gradients from x0_hat on the normal equations
                  A^T A x = A^T y                                 (sigma_y = 0)
                  (I + gamma A^T A) x = x0_hat + gamma A^T y      (sigma_y > 0; gamma = 1 in the code)
              so x0' - x0_hat lies in the Krylov subspace K_M, which keeps it near the clean-data manifold's
              tangent space (the paper's argument) with no backpropagation through the network
    x_{i-1} = alpha_{i-1} x0' + sigma_{i-1} (eta z + sqrt(1 - eta^2) eps_hat),  z ~ N(0, I)    (eta = 0.85)

and the last step (sigma = 0) returns x0'.  Written in (alpha, sigma), so it serves VP and flow-matching processes.
Defaults are the official code's: ``cg_steps=5``, ``eta=0.85``, ``gamma=1``.  Two differences from it: the CG
inner products are per sample (the code takes them over the whole batch, which couples the samples of a batch),
and it runs on the restoration pipeline's ancestral grid (DDPM's linspace timesteps and the clean end) where the
code uses ``range(0, 1000, skip)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.tensors import expand_to
from .manifold import RestorationMethod
from .operators import LinearOperator


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.to(torch.float64) * b.to(torch.float64)).flatten(1).sum(1)


def conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x: torch.Tensor,
                       steps: int) -> torch.Tensor:
    """``steps`` iterations of conjugate gradients for apply(x) = b (apply symmetric positive semi-definite), from
    ``x``, independently per sample (inner products over all but the batch dimension, in float64).  A sample whose
    residual reaches 0 stops moving (its step length is 0, not 0 / 0)."""
    r = b - apply(x)
    p, rs = r, _dot(r, r)
    for _ in range(steps):
        ap = apply(p)
        curvature = _dot(p, ap)
        step = torch.where(curvature > 0, rs / curvature.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(rs))
        x = x + expand_to(step, x).to(x.dtype) * p
        r = r - expand_to(step, r).to(r.dtype) * ap
        rs_new = _dot(r, r)
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(rs))
        p, rs = r + expand_to(beta, r).to(r.dtype) * p, rs_new
    return x


def normal_equations(operator: LinearOperator, y: torch.Tensor, x0_hat: torch.Tensor, sigma_y: float, gamma: float):
    """(apply, b) of DDS's data-consistency system (module docstring)."""
    if sigma_y == 0:
        return (lambda v: operator.transpose(operator.forward(v))), operator.transpose(y)
    return (lambda v: v + gamma * operator.transpose(operator.forward(v))), x0_hat + gamma * operator.transpose(y)


@dataclass(frozen=True)
class DDS(RestorationMethod):
    """Decomposed Diffusion Sampler (module docstring): CG data consistency on the Tweedie estimate, then DDIM with
    eta; no network gradient.  Runs on the restoration pipeline's ancestral sampler."""

    cg_steps: int = 5
    eta: float = 0.85
    gamma: float = 1.0

    name = "dds"
    takes_own_step = True

    def __post_init__(self):
        if isinstance(self.cg_steps, bool) or int(self.cg_steps) != self.cg_steps or self.cg_steps < 0:
            raise ValueError(f"cg_steps must be an integer >= 0, got {self.cg_steps!r}")
        if not (math.isfinite(self.eta) and 0 <= self.eta <= 1):
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma must be a finite number > 0, got {self.gamma}")

    def check_operator(self, operator: LinearOperator) -> None:
        if type(operator).transpose is LinearOperator.transpose:
            raise ValueError(f"DDS solves normal equations with the adjoint A^T, which {type(operator).__name__} does not "
                             "define (transpose); use DPS")

    def refine(self, x0_hat: torch.Tensor, y: torch.Tensor, operator: LinearOperator, sigma_y: float) -> torch.Tensor:
        """x0': ``cg_steps`` CG iterations from x0_hat on the normal equations."""
        apply, b = normal_equations(operator, y, x0_hat, sigma_y, self.gamma)
        return conjugate_gradient(apply, b, x0_hat, self.cg_steps)

    def step(self, x, x0_hat, alpha, sigma, alpha_next, sigma_next, noise, y, operator, sigma_y):
        """x_{i-1} from x_i (module docstring)."""
        x0 = self.refine(x0_hat, y, operator, sigma_y)
        eps_hat = (x - expand_to(alpha, x) * x0_hat) / expand_to(sigma, x)
        mix = self.eta * noise + math.sqrt(1 - self.eta**2) * eps_hat
        return expand_to(alpha_next, x) * x0 + expand_to(sigma_next, x) * mix


__all__ = ["DDS", "conjugate_gradient", "normal_equations"]
