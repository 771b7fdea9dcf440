"""The one inference grid: timesteps -> (t, alpha, sigma, lambda, sigma_bar), and the one timestep resolver.

A grid of N steps has N + 1 points, from the first noise level to the clean end.  ``t`` holds what the network
is given at each point (diffusers' timesteps; the end point is never evaluated: -1 on VP grids that end at
sigma = 0, 0 on flow grids), ``alpha`` / ``sigma`` the noise level (from the process at ``t``, or from the flow
sigmas a pipeline passes, which may differ from t / T), and ``lam`` / ``sigma_bar`` are derived.  Tables are
float64 on the sample's device (float32 on MPS); their host copies answer every question asked while
sampling (is this the first step at pure noise, does the grid end clean), so steps never synchronise.

Each solver reaches the steps of :mod:`.steps` through :meth:`Grid.euler` / :meth:`Grid.exponential` /
:meth:`Grid.ratio` and decides first- vs second-order steps with :meth:`Grid.first_order`.

:func:`resolve_grid` is the single place a (process, N | timesteps | sigmas, mu) request becomes a grid, with
diffusers' rules: VP timesteps spaced by ``timestep_spacing`` (DPMSolverMultistepScheduler's rules), flow sigmas
as ``FlowMatchEulerDiscreteScheduler`` builds them (:meth:`FlowMatchSchedule.inference_sigmas`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .process import NoiseProcess
from .steps import dpmpp_2m_first_order, euler_step, exponential_step, step_ratio
from .tensors import expand_to
from .timesteps import TIMESTEP_SPACINGS, spaced_timesteps

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


@dataclass
class Grid:
    """N + 1 grid points of one sampling run (see the module docstring)."""

    t: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    lam: torch.Tensor
    sigma_bar: torch.Tensor
    t_host: list[float]
    sigma_host: torch.Tensor  # sigma on the CPU (float64)
    sigma_bar_host: torch.Tensor  # sigma_bar on the CPU (float64)
    starts_at_pure_noise: bool  # alpha_0 = 0 (flow grids from s = 1): the x / alpha form is singular there
    ends_clean: bool  # sigma_N = 0
    process: NoiseProcess | None = None  # the process the noise levels are of (what a warm-up stage between points asks)
    points: list = field(default_factory=list)  # (alpha_i, sigma_i) as separate 0-d tensors, see point()

    @property
    def num_steps(self) -> int:
        return self.t.numel() - 1

    @property
    def timesteps(self) -> torch.Tensor:
        """The N timesteps the network is evaluated at (the end point excluded)."""
        return self.t[:-1]

    def euler(self, i: int, x: torch.Tensor, direction: torch.Tensor, prediction=None) -> torch.Tensor:
        """Step i in (x_bar, sigma_bar): x_bar_{i+1} = x_bar_i + (sigma_bar_{i+1} - sigma_bar_i) direction
        (:func:`~.steps.euler_step`; DDIM when the direction is eps, flow Euler x + (s' - s) v on flow grids).

        At alpha_i = 0 (a flow grid's first point) x_bar is infinite; every solver's first direction is then the
        model's eps, and the step is its limit x_{i+1} = alpha_{i+1} D + sigma_{i+1} eps with the data prediction
        D = ``prediction.x0`` (a :class:`~.denoiser.Prediction`, required there and read only there)."""
        a, s = self.alpha, self.sigma
        if i == 0 and self.starts_at_pure_noise:
            if prediction is None:
                raise ValueError("the grid starts at pure noise (alpha = 0): its first Euler step needs the data prediction")
            return expand_to(a[1], x) * prediction.x0 + expand_to(s[1], x) * direction
        return euler_step(x, direction, a[i], s[i], a[i + 1], s[i + 1])

    def exponential(self, i: int, x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        """Step i of the first-order exponential integrator on the data prediction (:func:`~.steps.exponential_step`)."""
        a, s = self.alpha, self.sigma
        return exponential_step(x, data, a[i], s[i], a[i + 1], s[i + 1])

    def ratio(self, i: int) -> torch.Tensor:
        """r0 = h_{i-1} / h_i of the multistep methods at step i >= 1."""
        return step_ratio(self.lam[i - 1], self.lam[i], self.lam[i + 1])

    def first_order(self, i: int, lower_order_final: bool = True) -> bool:
        """Whether a two-step method (DPM-Solver++ 2M, its adjoint, HB on it) takes a first-order step at i:
        the first step, and the last one when the grid ends at sigma = 0 or, with ``lower_order_final``, when it
        has fewer than 15 steps (diffusers' rule, :func:`~.steps.dpmpp_2m_first_order`)."""
        return dpmpp_2m_first_order(i, self.num_steps, lower_order_final, self.ends_clean)

    def point(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_i, sigma_i) as 0-d tensors of their own (not views of the tables), so that an autograd graph that
        saves them keeps 16 bytes alive, not the whole grid."""
        if not self.points:
            self.points = [(a.clone(), s.clone()) for a, s in zip(self.alpha, self.sigma)]
        return self.points[i]


def make_grid(process: NoiseProcess, timesteps, sigmas=None, device=None) -> Grid:
    """The grid of N + 1 points ``timesteps`` (the last one the end), with the noise levels of ``process`` at
    them, or of the flow ``sigmas`` (N + 1 values) when given.  Checked: 1-D, at least 2 points, finite, noise
    level strictly decreasing."""
    t = torch.as_tensor(timesteps).detach().cpu()
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(f"timesteps must be a 1-D grid of at least 2 entries (1 step), got shape {tuple(t.shape)}")
    if sigmas is None:
        alpha, sigma = process.alpha_sigma(t)
    else:
        if process.kind != "flow":
            raise ValueError("sigmas= is a flow-matching grid; this model's noise process is variance preserving")
        s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
        if s.shape != t.shape:
            raise ValueError(f"sigmas must have one entry per grid point ({t.numel()}), got shape {tuple(s.shape)}")
        alpha, sigma = process.alpha_sigma_of_sigmas(s)
    if not bool(torch.isfinite(alpha).all() & torch.isfinite(sigma).all()):
        raise ValueError("the grid's noise levels must be finite")
    if process.kind == "flow" and not bool(((sigma >= 0) & (sigma <= 1)).all()):
        raise ValueError(f"flow sigmas must lie in [0, 1], got {sigma.tolist()}")
    lam = torch.log(alpha) - torch.log(sigma)
    if not bool((lam[1:] > lam[:-1]).all()):
        raise ValueError("the grid must go strictly from noise to data (strictly decreasing timesteps / sigmas)")
    device = torch.device("cpu" if device is None else device)
    dtype = torch.float32 if device.type == "mps" else torch.float64
    table = dict(device=device, dtype=dtype)
    sigma_bar = sigma / alpha
    ends = torch.stack([alpha[0], sigma[-1]]).tolist()  # one host read: does the grid start at pure noise, end clean
    return Grid(
        t=t.to(device),
        alpha=alpha.to(**table),
        sigma=sigma.to(**table),
        lam=lam.to(**table),
        sigma_bar=sigma_bar.to(**table),
        t_host=t.to(torch.float64).tolist(),
        sigma_host=sigma,
        sigma_bar_host=sigma_bar,
        starts_at_pure_noise=ends[0] == 0,
        ends_clean=ends[1] == 0,
        process=process,
    )


def check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def custom_timesteps(timesteps, num_train_timesteps: int) -> torch.Tensor:
    """User timesteps as a decreasing 1-D tensor in [0, T - 1]: int64 when all are integers, else float64."""
    ts = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu()
    if ts.ndim != 1 or ts.numel() < 1:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {tuple(ts.shape)}")
    if not bool(torch.isfinite(ts).all()) or bool((ts < 0).any()) or bool((ts > num_train_timesteps - 1).any()):
        raise ValueError(f"timesteps must lie in [0, num_train_timesteps - 1 = {num_train_timesteps - 1}]")
    if bool((ts[1:] >= ts[:-1]).any()):
        raise ValueError("timesteps must be strictly decreasing (from noise to data)")
    return ts.long() if bool((ts == ts.round()).all()) else ts


def resolve_grid(
    process: NoiseProcess,
    num_inference_steps: int | None = None,
    *,
    timesteps=None,
    sigmas=None,
    mu: float | None = None,
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    final_sigmas_type: str = "zero",
    device=None,
) -> Grid:
    """The grid of a sampling run, as a diffusers scheduler's ``set_timesteps`` would lay it out.

    VP: ``num_inference_steps`` spaced by ``timestep_spacing`` / ``steps_offset``, or custom decreasing
    ``timesteps`` in [0, T - 1]; the end is sigma = 0 (``final_sigmas_type="zero"``) or timestep 0
    (``"sigma_min"``).  ``sigmas`` and ``mu`` are flow-only and refused.

    Flow: ``num_inference_steps``, and/or ``sigmas=`` (N values in (0, 1]), ``timesteps=`` and ``mu=`` as the
    SD3 / Flux / Wan / Qwen-Image / Sana pipelines pass them; the grid ends at s = 0.
    """
    check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    if process.kind == "flow":
        if final_sigmas_type != "zero":
            raise ValueError("final_sigmas_type='sigma_min' applies to VP schedules; flow-matching grids end at sigma = 0")
        if num_inference_steps is None and sigmas is None and timesteps is None:
            raise ValueError("give num_inference_steps, sigmas or timesteps")
        if sigmas is not None:
            given = torch.as_tensor(sigmas, dtype=torch.float64)
            if given.ndim != 1 or given.numel() < 1 or not bool(((given > 0) & (given <= 1)).all()):
                raise ValueError(f"sigmas must be a 1-D sequence of noise levels in (0, 1], got {sigmas!r}")
        t, s = process.inference_sigmas(num_inference_steps, sigmas, mu, timesteps)
        return make_grid(process, torch.cat([t, torch.zeros(1, dtype=t.dtype)]), s, device)
    for name, value in (("sigmas", sigmas), ("mu", mu)):
        if value is not None:
            raise ValueError(f"{name}= is a flow-matching option; this model's noise process is variance preserving")
    T = process.num_train_timesteps
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError("pass exactly one of num_inference_steps or timesteps")
    if timesteps is None:
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        ts = spaced_timesteps(T, num_inference_steps, timestep_spacing, steps_offset)
    else:
        ts = custom_timesteps(timesteps, T)
    end = -1 if final_sigmas_type == "zero" else 0
    return make_grid(process, torch.cat([ts, torch.full((1,), end, dtype=ts.dtype)]), None, device)


__all__ = ["FINAL_SIGMAS_TYPES", "Grid", "custom_timesteps", "make_grid", "resolve_grid"]
