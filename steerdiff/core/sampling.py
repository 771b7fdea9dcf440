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

from ..config import check_guidance_scale
from .denoiser import Denoiser, as_denoiser
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


PCG_PREDICTORS = ("ddim", "ddpm")


def _guided_view(denoiser, scale: float):
    """The same network and conditioning with classifier-free guidance at ``scale`` (1 = the conditional model),
    checking NaN/Inf in every evaluation."""
    return Denoiser(denoiser.network, denoiser.process, denoiser.prediction_type, scale, denoiser.cond, check_finite=True)


@torch.no_grad()
def sample_pcg(model, x, process, timesteps, prediction_type=None, *, gamma: float, corrector_steps: int = 1,
               step_size: float | None = None, predictor: str = "ddim", generator=None, callback=None):
    """Predictor-corrector guidance (PCG; Bradley & Nakkiran 2024, "Classifier-Free Guidance is a Predictor-Corrector").

    Each step: a predictor on the *conditional* model from noise level i to i + 1 (``"ddim"``: the Euler step in
    (x_bar, sigma_bar); ``"ddpm"``: the ancestral step), then ``corrector_steps`` Langevin steps at level i + 1 on
    the gamma-powered distribution p(x | c)^gamma p(x)^(1 - gamma), whose score is the CFG combination at scale gamma,

        x_bar <- x_bar + (eta / 2) s_gamma + sqrt(eta) z,   s_gamma = -(eps_u + gamma (eps_c - eps_u)) / sigma_bar,

    in x_bar = x / alpha (so one formula serves VP and flow).  ``step_size`` None takes eta = sigma_bar_i^2 -
    sigma_bar_{i+1}^2, the choice under which one corrector step after the DDIM predictor is, to first order in the
    step, the CFG-DDPM step at w = (gamma + 1) / 2: the reverse-SDE step is the probability-flow step plus one
    Langevin step of that size, and the CFG score splits as s_w = (s_c + s_gamma) / 2 with gamma = 2 w - 1 (our
    derivation of the paper's SDE-limit equivalence, written out in docs/pcg.md).  A number r gives eta = r sigma_bar_{i+1}^2.
    No corrector runs at sigma = 0 (a grid's clean end); a step from pure noise (a flow grid's s = 1, sigma_bar
    infinite) takes the next step's eta.  Network calls: N predictor calls (conditional only) plus corrector_steps
    guided calls at each level but the clean end.

    ``model`` is a conditional :class:`~steerdiff.core.Denoiser` (its own guidance is not used: the predictor runs
    the conditional branch, the corrector CFG at gamma); ``generator``: one per sample for per-sample noise.
    """
    gamma = check_guidance_scale(gamma, "gamma")  # the corrector's CFG weight (gamma = 2 w - 1 for CFG scale w)
    if isinstance(corrector_steps, bool) or not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise ValueError(f"corrector_steps must be an integer >= 0, got {corrector_steps!r}")
    if step_size is not None and (isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not 0 < step_size < float("inf")):
        raise ValueError(f"step_size must be None (the CFG-DDPM-matching eta) or a finite number > 0, got {step_size!r}")
    if predictor not in PCG_PREDICTORS:
        raise ValueError(f"predictor must be one of {PCG_PREDICTORS}, got {predictor!r}")
    grid, denoiser = _setup(model, x, process, timesteps, prediction_type)
    if not hasattr(denoiser.network, "null"):
        raise ValueError("PCG needs a conditional network (one with a null / unconditional input)")
    conditional, powered = _guided_view(denoiser, 1.0), _guided_view(denoiser, gamma)
    bar = grid.sigma_bar_host.tolist()
    n = grid.num_steps
    for i in range(n):
        pred = _predict(conditional, grid, i, x)
        if callback is not None:
            callback(i, grid.t[i], x, pred.x0)
        if predictor == "ddim":
            x = grid.euler(i, x, pred.eps, pred)
        else:
            x = ancestral_step(x, pred.x0, *grid.point(i), *grid.point(i + 1), sample_noise(x.shape, generator, x.device, x.dtype), 1.0)
        if corrector_steps == 0 or bar[i + 1] == 0.0:
            continue
        if step_size is not None:
            eta = step_size * bar[i + 1] ** 2
        else:
            k = i if bar[i] != float("inf") else i + 1  # from pure noise: the next step's size
            eta = bar[k] ** 2 - bar[k + 1] ** 2 if k + 1 <= n else bar[i + 1] ** 2
        scale = grid.point(i + 1)[0].to(x.dtype)  # x = alpha x_bar
        for _ in range(corrector_steps):
            eps = _predict(powered, grid, i + 1, x).eps
            noise = sample_noise(x.shape, generator, x.device, x.dtype)
            x = x - scale * (eta / (2 * bar[i + 1])) * eps + scale * (eta**0.5) * noise
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
