"""Exact log-likelihood of final samples under the target distribution of the analytic mixture testbed.

For the class-conditional Gaussian mixture p(x0 | c) = sum_{k in c} w_k N(x0; mu_k, diag(s_k^2)) / sum_{k in c} w_k
(:class:`steerdiff.testbeds.mixture.GaussianMixtureDenoiser`), the metric is the mean over samples of
log p(x_i | c_i) in nats, computed exactly (logsumexp over components, float64).  It is the target of
unguided sampling; with guidance > 1 the sampler aims elsewhere on purpose and the number describes how far.
"""

from __future__ import annotations

import torch

from .base import Metric, SampleSet


def mixture_log_likelihood(mixture, samples: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(x_i | c_i) for each sample (float64 (N,)) under a :class:`GaussianMixtureDenoiser`."""
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("samples contain NaN or Inf; their likelihood is undefined")
    device = mixture.means.device
    x = samples.to(device, torch.float64)
    return mixture.log_prob(x, timestep=None, class_labels=labels.to(device)).to(torch.float64).cpu()


class MixtureLogLikelihood(Metric):
    """``log_likelihood``: mean exact log p(x | c) of the samples under the mixture they were drawn from."""

    name = "log_likelihood"
    keys = ("log_likelihood",)

    def check(self, sample_shape, denoiser=None) -> None:
        from ..testbeds.mixture import GaussianMixtureDenoiser

        if not isinstance(denoiser, GaussianMixtureDenoiser):
            raise ValueError(
                f"log_likelihood needs a model with an exact density (GaussianMixtureDenoiser, e.g. model: mixture); "
                f"got {type(denoiser).__name__}"
            )

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        return {"log_likelihood": float(mixture_log_likelihood(samples.denoiser, samples.samples, samples.labels).mean())}
