"""Conversions between what a network predicts and the quantities samplers use.

For x_t = alpha x0 + sigma eps and the four diffusers ``prediction_type`` values:

- ``epsilon``:         eps = output,                      x0 = (x - sigma eps) / alpha
- ``sample``:          x0 = output,                       eps = (x - alpha x0) / sigma
- ``v_prediction``:    v = alpha eps - sigma x0 = output,  x0 = alpha x - sigma v,  eps = sigma x + alpha v
  (Salimans & Ho 2022; these two inverses need alpha^2 + sigma^2 = 1, a VP process)
- ``flow_prediction``: u = eps - x0 = output (the rectified-flow velocity dx/ds of x_s = (1 - s) x0 + s eps),
  x0 = (x - sigma u) / (alpha + sigma),  eps = (x + alpha u) / (alpha + sigma)
  (any process; on flow matching alpha + sigma = 1: x0 = x - s u, eps = x + (1 - s) u)

``alpha`` and ``sigma`` are scalars or per-sample tensors of shape (B,).  Each conversion divides only where the
quantity is undefined otherwise: x0 from eps at alpha = 0 (pure noise) and eps from x0 at sigma = 0 (clean data)
carry no information, so there they are inf/NaN; x0 and eps from a velocity are defined everywhere.
"""

from __future__ import annotations

import torch

from .tensors import expand_to

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return prediction_type


def to_x0(output: torch.Tensor, x: torch.Tensor, alpha, sigma, prediction_type: str) -> torch.Tensor:
    """The data prediction D = x0_hat from a model output."""
    check_prediction_type(prediction_type)
    a, s = expand_to(alpha, x), expand_to(sigma, x)
    if prediction_type == "epsilon":
        return (x - s * output) / a
    if prediction_type == "sample":
        return output
    if prediction_type == "flow_prediction":
        return (x - s * output) / (a + s)
    return a * x - s * output


def to_eps(output: torch.Tensor, x: torch.Tensor, alpha, sigma, prediction_type: str) -> torch.Tensor:
    """The noise prediction eps_hat from a model output."""
    check_prediction_type(prediction_type)
    a, s = expand_to(alpha, x), expand_to(sigma, x)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "sample":
        return (x - a * output) / s
    if prediction_type == "flow_prediction":
        return (x + a * output) / (a + s)
    return s * x + a * output


def from_x0(x0: torch.Tensor, x: torch.Tensor, alpha, sigma, prediction_type: str) -> torch.Tensor:
    """The model output of ``prediction_type`` whose data prediction is ``x0``."""
    check_prediction_type(prediction_type)
    a, s = expand_to(alpha, x), expand_to(sigma, x)
    if prediction_type == "sample":
        return x0
    if prediction_type == "epsilon":
        return (x - a * x0) / s
    if prediction_type == "flow_prediction":
        return (x - (a + s) * x0) / s  # from x = (alpha + sigma) x0 + sigma u
    return (a * x - x0) / s  # v = alpha eps - sigma x0 with eps = (x - alpha x0) / sigma and alpha^2 + sigma^2 = 1


def from_eps(eps: torch.Tensor, x: torch.Tensor, alpha, sigma, prediction_type: str) -> torch.Tensor:
    """The model output of ``prediction_type`` whose noise prediction is ``eps``."""
    check_prediction_type(prediction_type)
    a, s = expand_to(alpha, x), expand_to(sigma, x)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return (x - s * eps) / a
    if prediction_type == "flow_prediction":
        return ((a + s) * eps - x) / a  # from eps = (x + alpha u) / (alpha + sigma)
    return (eps - s * x) / a  # from eps = sigma x + alpha v


def convert_prediction(output: torch.Tensor, x: torch.Tensor, alpha, sigma, from_type: str, to_type: str) -> torch.Tensor:
    """Re-express a model output of ``from_type`` as the output of ``to_type`` with the same data prediction.

    Each pair converts directly where a direct formula exists (so eps <-> v never divides by sigma, and a flow
    velocity gives eps and x0 at every noise level, also at alpha = 0 where the flow grids start); v <-> flow
    velocity goes through x0.
    """
    check_prediction_type(from_type)
    check_prediction_type(to_type)
    if from_type == to_type:
        return output
    if to_type == "sample":
        return to_x0(output, x, alpha, sigma, from_type)
    if from_type == "sample":
        return from_x0(output, x, alpha, sigma, to_type)
    if to_type == "epsilon":
        return to_eps(output, x, alpha, sigma, from_type)
    if from_type == "epsilon":
        return from_eps(output, x, alpha, sigma, to_type)
    return from_x0(to_x0(output, x, alpha, sigma, from_type), x, alpha, sigma, to_type)  # v <-> flow velocity
