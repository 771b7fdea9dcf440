"""Variance-preserving noise schedules.

x_t = alpha_t x_0 + sigma_t eps, alpha_t^2 + sigma_t^2 = 1, with diffusers' discrete convention
alpha_t^2 = alphas_cumprod[t].  Derived quantities:

    lambda_t    = log(alpha_t / sigma_t)          (half log-SNR)
    sigma_bar_t = sigma_t / alpha_t = exp(-lambda_t)

Timesteps may be integer or fractional.  Between integer timesteps log(alpha) is interpolated linearly
in t (the "discrete" VP schedule of DPM-Solver, Lu et al. 2022), so integer timesteps give diffusers'
values exactly.  A negative timestep means "the end of sampling": alpha^2 = final_alpha_cumprod (1 by
default, i.e. sigma = 0, lambda = +inf), matching DDIMScheduler's ``set_alpha_to_one``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .process import NoiseProcess, as_config, noise_process_family

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _betas_from_config(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Any,
) -> torch.Tensor:
    """Betas exactly as diffusers builds them (float32), so schedules agree bit for bit."""
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar

        return betas_for_alpha_bar(num_train_timesteps)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


class NoiseSchedule(NoiseProcess):
    """A VP schedule given by ``alphas_cumprod`` (one value per training timestep).

    Build it with :meth:`from_config` (any diffusers scheduler config or scheduler), or
    :meth:`from_alphas_cumprod`.  Every query takes a tensor of timesteps of any shape on any device and
    returns float tensors of the same shape on that device (float64 unless ``dtype`` is given); queries do
    no host synchronisation.
    """

    kind = "vp"

    def __init__(self, alphas_cumprod: torch.Tensor, final_alpha_cumprod: float = 1.0, clamped_terminal: bool = False):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D tensor with at least 2 entries, got shape {tuple(ac.shape)}")
        if not bool(torch.isfinite(ac).all()) or bool((ac <= 0).any()) or bool((ac > 1).any()):
            raise ValueError("alphas_cumprod must lie in (0, 1]; a zero terminal SNR must be clamped first")
        # a zero terminal SNR clamped to 2**-24 (diffusers' rule) may sit above the entry before it: only the
        # entries before the clamped one must then be non-increasing
        checked = ac[:-1] if clamped_terminal else ac
        if bool((checked[1:] > checked[:-1]).any()):
            raise ValueError("alphas_cumprod must be non-increasing in t")
        if not 0.0 < float(final_alpha_cumprod) <= 1.0:
            raise ValueError(f"final_alpha_cumprod must lie in (0, 1], got {final_alpha_cumprod}")
        self.alphas_cumprod = ac
        self.final_alpha_cumprod = float(final_alpha_cumprod)
        self.log_alphas = 0.5 * torch.log(ac)
        self.num_train_timesteps = ac.numel()
        self.betas: torch.Tensor | None = None  # the betas it was built from (from_config), when known
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod, final_alpha_cumprod: float = 1.0) -> "NoiseSchedule":
        return cls(alphas_cumprod, final_alpha_cumprod)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> "NoiseSchedule":
        """From a diffusers scheduler config (dict / FrozenDict) or a scheduler instance.

        Reads ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``, ``trained_betas``,
        ``rescale_betas_zero_snr`` and ``set_alpha_to_one`` with diffusers' defaults.  A zero terminal SNR is
        clamped to alphas_cumprod = 2**-24 as diffusers' DPM-Solver does.
        """
        source, config = config, as_config(config)  # the family check reads the scheduler's class too
        if noise_process_family(source) != "vp":
            raise ValueError(
                "this scheduler config describes a flow-matching process, not a VP schedule; build it with "
                "steerdiff.core.noise_process_from_config (or FlowMatchSchedule.from_config)"
            )
        get = config.get
        n = int(get("num_train_timesteps", 1000))
        if n < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {n}")
        betas = _betas_from_config(
            n,
            float(get("beta_start", 0.0001)),
            float(get("beta_end", 0.02)),
            get("beta_schedule", "linear"),
            get("trained_betas", None),
        )
        if get("rescale_betas_zero_snr", False):
            from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

            betas = rescale_zero_terminal_snr(betas)
        ac = torch.cumprod(1.0 - betas, dim=0)
        zero_snr = bool(get("rescale_betas_zero_snr", False))
        if zero_snr:
            ac[-1] = 2**-24
        final = 1.0 if get("set_alpha_to_one", True) else float(ac[0])
        schedule = cls(ac, final_alpha_cumprod=final, clamped_terminal=zero_snr)
        schedule.betas = betas  # float32, as diffusers' schedulers hold them
        return schedule

    # -- queries --------------------------------------------------------------------------------------
    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        if device not in self._tables:
            self._tables[device] = (
                self.log_alphas.to(device),
                torch.arange(self.num_train_timesteps, dtype=torch.float64, device=device),
            )
        return self._tables[device]

    def log_alpha(self, t: torch.Tensor | float | int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """log(alpha_t), linear in t between integer timesteps; t < 0 gives the final value."""
        t = torch.as_tensor(t)
        log_a, _ = self._table(t.device)
        if not t.is_floating_point():  # integer timesteps (diffusers'): a table lookup, no interpolation
            # index with 1-d tensors: a 0-d index tensor is read as a Python int (a device synchronisation)
            value = log_a[t.clamp(0, self.num_train_timesteps - 1).reshape(-1)].reshape(t.shape)
            return torch.where(t < 0, 0.5 * math.log(self.final_alpha_cumprod), value).to(dtype)
        tf = t.to(torch.float64)
        lo = tf.clamp(0, self.num_train_timesteps - 1).floor()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = tf.clamp(0, self.num_train_timesteps - 1) - lo
        # index with 1-d tensors: a 0-d index tensor is read as a Python int (a device synchronisation)
        lo_i, hi_i = lo.long().reshape(-1), hi.long().reshape(-1)
        value = torch.lerp(log_a[lo_i].reshape(lo.shape), log_a[hi_i].reshape(lo.shape), w)
        final = torch.full_like(value, 0.5 * math.log(self.final_alpha_cumprod))
        return torch.where(tf < 0, final, value).to(dtype)

    def log_alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        log_a = self.log_alpha(t)
        return log_a, 0.5 * torch.log(-torch.expm1(2 * log_a))

    def alpha(self, t, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.exp(self.log_alpha(t)).to(dtype)

    def sigma(self, t, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t))).to(dtype)

    def alpha_integrals(self, sigma_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VP: alpha = (1 + rho^2)^(-1/2), so the integrals are atan(rho) and asinh(rho)."""
        return torch.atan(sigma_bar), torch.asinh(sigma_bar)

    def progress(self, t) -> torch.Tensor:
        """s = t / (T - 1) clamped to [0, 1]: the trained timesteps run 0..T-1 (T - 1 = pure noise)."""
        t = torch.as_tensor(t).to(torch.float64)
        return (t / (self.num_train_timesteps - 1)).clamp(0.0, 1.0)

    def alpha_sigma(self, t, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        log_a = self.log_alpha(t)
        return torch.exp(log_a).to(dtype), torch.sqrt(-torch.expm1(2 * log_a)).to(dtype)

    def lambda_(self, t, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """lambda_t = log(alpha_t / sigma_t); +inf where sigma_t = 0."""
        log_a = self.log_alpha(t)
        return (log_a - 0.5 * torch.log(-torch.expm1(2 * log_a))).to(dtype)

    def sigma_bar(self, t, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """sigma_bar_t = sigma_t / alpha_t = exp(-lambda_t) (the noise level of the x / alpha ODE)."""
        log_a = self.log_alpha(t)
        return torch.sqrt(torch.expm1(-2 * log_a)).to(dtype)

    def timestep_from_lambda(self, lam: torch.Tensor | float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Inverse of :meth:`lambda_` on [0, T-1] (continuous timestep, clamped to the trained range)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        log_a_table, t_table = self._table(lam.device)
        log_a = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        # log_alpha decreases in t (its running minimum does, also past a clamped terminal entry): search the
        # reversed (increasing) table
        xs = torch.cummin(log_a_table, 0).values.flip(0)
        ts = t_table.flip(0)
        idx = torch.searchsorted(xs, log_a.clamp(xs[0], xs[-1]).contiguous()).clamp(1, xs.numel() - 1)
        x0, x1 = xs[idx - 1], xs[idx]
        t0, t1 = ts[idx - 1], ts[idx]
        w = (log_a.clamp(xs[0], xs[-1]) - x0) / (x1 - x0).clamp_min(torch.finfo(torch.float64).tiny)
        return (t0 + w * (t1 - t0)).to(dtype)

    def timestep_from_sigma_bar(self, sigma_bar, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return self.timestep_from_lambda(-torch.log(torch.as_tensor(sigma_bar, dtype=torch.float64)), dtype)

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(num_train_timesteps={self.num_train_timesteps}, "
            f"alpha_T^2={float(self.alphas_cumprod[-1]):.3g}, final_alpha_cumprod={self.final_alpha_cumprod})"
        )
