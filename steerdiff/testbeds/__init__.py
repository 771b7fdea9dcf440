"""Testbeds with known answers: the analytic Gaussian-mixture denoiser and the embedded digits model."""

from .digits import DIGITS_MODEL_PATH, NULL_CLASS, NUM_CLASSES, load_digits_data, load_digits_model
from .mixture import GaussianMixtureDenoiser, fit_digits_mixture

__all__ = [
    "DIGITS_MODEL_PATH",
    "NULL_CLASS",
    "NUM_CLASSES",
    "GaussianMixtureDenoiser",
    "fit_digits_mixture",
    "load_digits_data",
    "load_digits_model",
]
