"""Small tensor helpers shared by every step: broadcasting per-sample coefficients and validation."""

from __future__ import annotations

import torch


def expand_to(coef: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or per-sample coefficient of shape (B,) against ``x`` of shape (B, ...).

    The result is on ``x``'s device and dtype.
    """
    coef = torch.as_tensor(coef, device=x.device, dtype=x.dtype)
    if coef.ndim == 0:
        return coef
    if coef.ndim == 1:
        if coef.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"a per-sample coefficient has {coef.shape[0]} entries for a batch of {x.shape[0]}")
        return coef.reshape(-1, *([1] * (x.ndim - 1)))
    return coef


def check_finite(x: torch.Tensor, what: str, step: int | None = None) -> None:
    """Raise if ``x`` holds NaN or Inf.  This synchronises with the device; callers decide when it is worth it."""
    if not bool(torch.isfinite(x).all()):
        where = f" at step {step}" if step is not None else ""
        n_bad = int((~torch.isfinite(x)).sum())
        raise FloatingPointError(f"{what} has {n_bad} NaN/Inf values{where}")


def batch_dot(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-sample inner product over all non-batch dimensions, accumulated in ``dtype`` (float64 by default)."""
    return (a.to(dtype) * b.to(dtype)).flatten(1).sum(dim=1)


def batch_norm(a: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-sample L2 norm over all non-batch dimensions, in ``dtype`` (float64 by default)."""
    return torch.linalg.vector_norm(a.to(dtype).flatten(1), dim=1)
