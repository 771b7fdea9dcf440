"""Sampling loops as short functions over the shared steps, with a small registry.

A sampler integrates from ``timesteps[0]`` to ``timesteps[-1]`` over the decreasing grid ``timesteps``
(N + 1 entries for N steps; a final -1 means "clean": alpha^2 = final_alpha_cumprod, usually sigma = 0).
``model(x, t)`` returns the network output of ``prediction_type`` for a batch x and per-sample timesteps t
of shape (B,); classifier-free guidance or any other wrapping lives in that callable.

    x0 = SAMPLERS["dpmpp_2m"](model, x_T, schedule, with_final(spaced_timesteps(1000, 20)))

Each step is one network call.  ``callback(i, t, x, data)`` sees the state before step i is applied.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .multistep import History, adams_bashforth
from .prediction import to_eps, to_x0
from .schedule import NoiseSchedule
from .sde import ancestral_step, sample_noise
from .steps import dpmpp_2m_data, dpmpp_2m_first_order, euler_step, exponential_step, step_ratio

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _grid(schedule: NoiseSchedule, timesteps: torch.Tensor, x: torch.Tensor):
    timesteps = torch.as_tensor(timesteps, device=x.device)
    if timesteps.ndim != 1 or timesteps.numel() < 2:
        raise ValueError(f"timesteps must be a 1-D grid of at least 2 entries (1 step), got shape {tuple(timesteps.shape)}")
    alphas, sigmas = schedule.alpha_sigma(timesteps)
    return timesteps, alphas, sigmas, schedule.lambda_(timesteps)


def _call(model: ModelFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return model(x, t.expand(x.shape[0]))


@torch.no_grad()
def sample_ddim(model, x, schedule, timesteps, prediction_type="epsilon", eta=0.0, generator=None, callback=None):
    """DDIM (Song et al. 2021): Euler in (x_bar, sigma_bar); with eta > 0 the ancestral DDIM(eta) step."""
    ts, a, s, _ = _grid(schedule, timesteps, x)
    for i in range(ts.numel() - 1):
        out = _call(model, x, ts[i])
        data = to_x0(out, x, a[i], s[i], prediction_type)
        if callback is not None:
            callback(i, ts[i], x, data)
        if eta == 0:
            x = euler_step(x, to_eps(out, x, a[i], s[i], prediction_type), a[i], s[i], a[i + 1], s[i + 1])
        else:
            noise = sample_noise(x.shape, generator, x.device, x.dtype)
            x = ancestral_step(x, data, a[i], s[i], a[i + 1], s[i + 1], noise, eta)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, schedule, timesteps, prediction_type="epsilon", lower_order_final=True, callback=None):
    """DPM-Solver++ 2M (Lu et al. 2022), multistep, midpoint form, diffusers' lower-order-final rule."""
    ts, a, s, lam = _grid(schedule, timesteps, x)
    n = ts.numel() - 1
    ends_clean = bool(s[-1] == 0)  # a property of the grid, decided once before the loop
    prev_data = None
    for i in range(n):
        data = to_x0(_call(model, x, ts[i]), x, a[i], s[i], prediction_type)
        if callback is not None:
            callback(i, ts[i], x, data)
        if dpmpp_2m_first_order(i, n, lower_order_final, ends_clean):
            combined = data
        else:
            combined = dpmpp_2m_data(data, prev_data, step_ratio(lam[i - 1], lam[i], lam[i + 1]))
        x = exponential_step(x, combined, a[i], s[i], a[i + 1], s[i + 1])
        prev_data = data
    return x


@torch.no_grad()
def sample_plms(model, x, schedule, timesteps, prediction_type="epsilon", order=4, callback=None):
    """Pseudo linear multistep (Liu et al. 2022) as Adams-Bashforth in (x_bar, sigma_bar), lower order while
    the history is short (no Runge-Kutta warm-up, so every step is one network call)."""
    ts, a, s, _ = _grid(schedule, timesteps, x)
    history = History(order)
    for i in range(ts.numel() - 1):
        out = _call(model, x, ts[i])
        if callback is not None:
            callback(i, ts[i], x, to_x0(out, x, a[i], s[i], prediction_type))
        history.push(to_eps(out, x, a[i], s[i], prediction_type))
        x = euler_step(x, adams_bashforth(history, order), a[i], s[i], a[i + 1], s[i + 1])
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "plms": sample_plms,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; available: {sorted(SAMPLERS)}")
    return SAMPLERS[name]
