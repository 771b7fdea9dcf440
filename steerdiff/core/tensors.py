"""Small tensor helpers shared by every step: broadcasting per-sample coefficients, taking rows, validation."""

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


def take_rows(value, rows, n: int):
    """``value`` (a tensor, or dicts / lists / tuples of them: a network call's arguments, a conditioning) with the
    rows ``rows`` of every tensor whose first dimension is the batch ``n``, or k * n for inputs repeated per sample
    (``repeat_interleave``, e.g. AnimateDiff's text embeddings per frame); anything else as it is."""
    if isinstance(value, torch.Tensor):
        if not value.ndim or n == 0:
            return value
        if value.shape[0] == n:
            return value[rows]
        if value.shape[0] % n == 0 and value.shape[0] > n:
            k = value.shape[0] // n
            return value.reshape(n, k, *value.shape[1:])[rows].reshape(-1, *value.shape[1:])
        return value
    if isinstance(value, dict):
        return {k: take_rows(v, rows, n) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(take_rows(v, rows, n) for v in value)
    return value


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
