"""Stochastic (ancestral) steps and per-sample noise.

The DDIM step with stochasticity eta (Song et al. 2021) from s to t < s, written with e^{-h} = sigma_bar_t /
sigma_bar_s:

    x_t = alpha_t D + sqrt(sigma_t^2 - c^2) (x_s - alpha_s D) / sigma_s + c z,   c = eta sigma_t sqrt(1 - e^{-2h}).

eta = 1 is the DDPM ancestral step (its posterior q(x_t | x_s, x0 = D)) and equals SDE-DPM-Solver++ 1;
eta = 0 is DDIM.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from .steps import exp_neg_h
from .tensors import expand_to


def sample_noise(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise; a list of generators draws sample i from generator i, so a sample's noise
    does not depend on the batch it is drawn in (diffusers' ``randn_tensor`` semantics)."""
    if isinstance(generator, list) and len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample")
    return randn_tensor(tuple(shape), generator=generator, device=torch.device(device or "cpu"), dtype=dtype)


def ancestral_step(x, data, alpha_s, sigma_s, alpha_t, sigma_t, noise, eta: float = 1.0) -> torch.Tensor:
    """One DDIM(eta) step from the data prediction ``data``; ``noise`` is standard normal, shaped like x."""
    alpha_s, sigma_s, alpha_t, sigma_t = (torch.as_tensor(c) for c in (alpha_s, sigma_s, alpha_t, sigma_t))
    e2h = exp_neg_h(alpha_s, sigma_s, alpha_t, sigma_t) ** 2
    c_noise = eta * sigma_t * torch.sqrt(torch.clamp(1 - e2h, min=0))
    c_eps = torch.sqrt(torch.clamp(sigma_t**2 - c_noise**2, min=0)) / sigma_s
    c_x = c_eps
    c_d = alpha_t - c_eps * alpha_s
    return expand_to(c_x, x) * x + expand_to(c_d, x) * data + expand_to(c_noise, x) * noise
