"""The noise processes of k-diffusion's sampler interface, where the model is called with its noise level itself.

k-diffusion (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"), and ComfyUI,
Forge / A1111 and sdkit through it, call ``model(x, sigma)`` and step over a list of sigmas:

- :class:`VarianceExplodingSigma` (kind "ve"): x = x0 + sigma eps, k-diffusion's own convention; a VP model enters
  it through a wrapper (x_ve = x_vp / alpha, sigma_ve = sigma_vp / alpha = sigma_bar), ComfyUI's ``EPS`` /
  ``V_PREDICTION`` model sampling.  alpha = 1, so x_bar = x and sigma_bar = sigma: every step of :mod:`.steps`,
  written in (x_bar, sigma_bar) or lambda = -log sigma, is the same step as on the VP process.
- :class:`FlowSigma` (kind "flow"): x = (1 - s) x0 + s eps with the model given s in [0, 1], as ComfyUI runs
  flow-matching models (SD3, Flux, Wan, Qwen-Image; its ``CONST`` model sampling).

The timestep of a grid on these processes is the noise level (t = sigma, t = s), so ``num_train_timesteps`` is 1
and a grid is laid out with :func:`~.grid.make_grid` from the sigmas the caller gives.
"""

from __future__ import annotations

import torch

from .process import NoiseProcess


def _level(t) -> torch.Tensor:
    return torch.as_tensor(t).to(torch.float64).clamp(min=0.0)


class VarianceExplodingSigma(NoiseProcess):
    """x = x0 + sigma eps with the model's timestep t = sigma (alpha = 1); t <= 0 is the clean end."""

    kind = "ve"
    num_train_timesteps = 1

    def log_alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        s = _level(t)
        return torch.zeros_like(s), torch.log(s)

    def alpha_sigma(self, t, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        s = _level(t)
        return torch.ones_like(s).to(dtype), s.to(dtype)

    def alpha_integrals(self, sigma_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha = 1: both integrals are rho itself."""
        return sigma_bar, sigma_bar

    def progress(self, t) -> torch.Tensor:
        raise ValueError(
            "a variance-exploding sigma has no progress in [0, 1] without the model's training schedule; give the "
            "model's VP schedule (steerdiff.core.NoiseSchedule) where a rule needs it"
        )

    def timestep_from_lambda(self, lam, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """t = sigma = e^{-lambda}."""
        return torch.exp(-torch.as_tensor(lam, dtype=torch.float64)).to(dtype)

    def timestep_from_sigma_bar(self, sigma_bar, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """t = sigma_bar = sigma, exactly."""
        return torch.as_tensor(sigma_bar, dtype=torch.float64).to(dtype)

    def alpha_sigma_of_sigmas(self, sigmas) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha = 1 and sigma itself."""
        level = torch.as_tensor(sigmas).to(torch.float64)
        return torch.ones_like(level), level

    def timestep_of_sigmas(self, sigmas) -> torch.Tensor:
        """t = sigma."""
        return torch.as_tensor(sigmas).to(torch.float64)

    def __repr__(self) -> str:
        return "VarianceExplodingSigma()"


class FlowSigma(NoiseProcess):
    """x = (1 - s) x0 + s eps with the model's timestep t = s in [0, 1]; t <= 0 is the clean end."""

    kind = "flow"
    num_train_timesteps = 1

    def log_alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        s = _level(t).clamp(max=1.0)
        return torch.log1p(-s), torch.log(s)

    def alpha_sigma(self, t, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        s = _level(t).clamp(max=1.0)
        return (1.0 - s).to(dtype), s.to(dtype)

    def alpha_integrals(self, sigma_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`steerdiff.core.FlowMatchSchedule.alpha_integrals`: s and -log(1 - s)."""
        return sigma_bar / (1 + sigma_bar), torch.log1p(sigma_bar)

    def progress(self, t) -> torch.Tensor:
        """s itself (1 = pure noise, 0 = clean)."""
        return _level(t).clamp(max=1.0)

    def timestep_from_lambda(self, lam, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """s = 1 / (1 + e^lambda)."""
        return torch.sigmoid(-torch.as_tensor(lam, dtype=torch.float64)).to(dtype)

    def __repr__(self) -> str:
        return "FlowSigma()"


__all__ = ["FlowSigma", "VarianceExplodingSigma"]
