"""Testbeds with known answers: the analytic Gaussian-mixture denoiser and the embedded digits model."""

from .mixture import GaussianMixtureDenoiser, fit_digits_mixture

__all__ = ["GaussianMixtureDenoiser", "fit_digits_mixture"]
