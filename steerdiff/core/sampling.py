"""Sampling loops as short functions over the shared steps, with a small registry.

A sampler integrates over the grid ``timesteps`` (N + 1 points for N steps, the last one the end; a
:class:`~steerdiff.core.grid.Grid` is taken as is) of the noise process ``process`` (VP or flow matching).
``model`` is the model boundary, a :class:`~steerdiff.core.denoiser.Denoiser` (guidance, conditioning and the
parametrization live there), or a plain ``model(x, t) -> output`` of ``prediction_type``, which is wrapped
into one.

    x0 = SAMPLERS["dpmpp_2m"](denoiser, x_T, process, with_final(spaced_timesteps(1000, 20)))

Each step is one evaluation of the denoiser.  ``callback(i, t, x, data)`` sees the state before step i is applied.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .denoiser import as_denoiser
from .grid import Grid, make_grid
from .multistep import History, adams_bashforth
from .process import NoiseProcess
from .sde import ancestral_step, sample_noise
from .steps import dpmpp_2m_data


def _setup(model, x: torch.Tensor, process: NoiseProcess, timesteps, prediction_type):
    grid = timesteps if isinstance(timesteps, Grid) else make_grid(process, timesteps, device=x.device)
    denoiser = as_denoiser(model, process, prediction_type)
    denoiser.reset(grid.timesteps, num_steps=grid.num_steps)
    return grid, denoiser


def _predict(denoiser, grid: Grid, i: int, x: torch.Tensor):
    a, s = grid.point(i)
    return denoiser.predict(x, grid.t[i], a, s)


@torch.no_grad()
def sample_ddim(model, x, process, timesteps, prediction_type=None, eta=0.0, generator=None, callback=None):
    """DDIM (Song et al. 2021): Euler in (x_bar, sigma_bar) (flow Euler on flow grids); with eta > 0 the
    ancestral DDIM(eta) step."""
    grid, denoiser = _setup(model, x, process, timesteps, prediction_type)
    for i in range(grid.num_steps):
        pred = _predict(denoiser, grid, i, x)
        if callback is not None:
            callback(i, grid.t[i], x, pred.x0)
        if eta == 0:
            x = grid.euler(i, x, pred.eps, pred)
        else:
            noise = sample_noise(x.shape, generator, x.device, x.dtype)
            x = ancestral_step(x, pred.x0, *grid.point(i), *grid.point(i + 1), noise, eta)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, process, timesteps, prediction_type=None, lower_order_final=True, callback=None):
    """DPM-Solver++ 2M (Lu et al. 2022), multistep, midpoint form, diffusers' lower-order-final rule."""
    grid, denoiser = _setup(model, x, process, timesteps, prediction_type)
    prev_data = None
    for i in range(grid.num_steps):
        data = _predict(denoiser, grid, i, x).x0
        if callback is not None:
            callback(i, grid.t[i], x, data)
        combined = data if grid.first_order(i, lower_order_final) else dpmpp_2m_data(data, prev_data, grid.ratio(i))
        x = grid.exponential(i, x, combined)
        prev_data = data
    return x


@torch.no_grad()
def sample_plms(model, x, process, timesteps, prediction_type=None, order=4, callback=None):
    """Pseudo linear multistep (Liu et al. 2022) as Adams-Bashforth in (x_bar, sigma_bar), lower order while
    the history is short (no Runge-Kutta warm-up, so every step is one network call)."""
    grid, denoiser = _setup(model, x, process, timesteps, prediction_type)
    history = History(order)
    for i in range(grid.num_steps):
        pred = _predict(denoiser, grid, i, x)
        if callback is not None:
            callback(i, grid.t[i], x, pred.x0)
        history.push(pred.eps)
        x = grid.euler(i, x, adams_bashforth(history, order), pred)
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
