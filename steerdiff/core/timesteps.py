"""Inference timestep grids, spaced as diffusers' schedulers space them (Lin et al. 2023, Table 2)."""

from __future__ import annotations

import numpy as np
import torch

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def check_num_steps(num_inference_steps: int, num_train_timesteps: int) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise TypeError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be between 1 and num_train_timesteps={num_train_timesteps}, got {num_inference_steps}"
        )
    return int(num_inference_steps)


def spaced_timesteps(
    num_train_timesteps: int,
    num_inference_steps: int,
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Decreasing integer timesteps t_0 > ... > t_{N-1}, with the rules of DPMSolverMultistepScheduler.

    ``linspace``: round(linspace(0, T-1, N+1)) reversed, last dropped; ``leading``: multiples of
    T // (N+1) reversed, last dropped, plus ``steps_offset``; ``trailing``: round(arange(T, 0, -T/N)) - 1.
    """
    n = check_num_steps(num_inference_steps, num_train_timesteps)
    T = num_train_timesteps
    if timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif timestep_spacing == "leading":
        ratio = T // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + int(steps_offset)
    elif timestep_spacing == "trailing":
        ts = np.arange(T, 0, -T / n).round().astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
    return torch.from_numpy(ts.copy()).to(device)


def linspace_timesteps(num_train_timesteps: int, num_inference_steps: int, device=None) -> torch.Tensor:
    """DDPM / DDIMScheduler's "linspace" rule, round(linspace(T - 1, 0, N)): from T - 1 down to 0, both included
    (N = 1: T - 1 alone); distinct for every N <= T (N = T gives every training timestep once).  ``spaced_timesteps``'
    "linspace" (DPM-Solver's rule) drops t = 0 instead and repeats timesteps when N approaches T."""
    n = check_num_steps(num_inference_steps, num_train_timesteps)
    ts = np.linspace(num_train_timesteps - 1, 0, n).round().astype(np.int64)
    return torch.from_numpy(ts.copy()).to(device)


def with_final(timesteps: torch.Tensor) -> torch.Tensor:
    """Append the end of sampling (timestep -1: alpha^2 = final_alpha_cumprod, sigma = 0 by default)."""
    timesteps = torch.as_tensor(timesteps)
    return torch.cat([timesteps, torch.full((1,), -1, dtype=timesteps.dtype, device=timesteps.device)])
