"""Reference solutions and exact log-likelihoods on the analytic Gaussian mixture."""

import math

import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from steerdiff.benchmark.guidance import ClassifierFreeGuidance
from steerdiff.core import NoiseSchedule
from steerdiff.metrics.base import SampleSet
from steerdiff.metrics.likelihood import MixtureLogLikelihood, mixture_log_likelihood
from steerdiff.metrics.reference_error import ReferenceL2, reference_solution
from steerdiff.testbeds.mixture import GaussianMixtureDenoiser


def test_reference_solution_equals_the_exact_gaussian_flow():
    # For N(mu, s^2 I) the probability-flow ODE keeps the standardized coordinate fixed:
    # x_0 = mu + s (x_T - alpha_T mu) / sqrt(alpha_T^2 s^2 + sigma_T^2).
    mu, s = 0.3, 0.5
    gaussian = GaussianMixtureDenoiser.from_components(torch.full((1, 1, 2, 2), mu, dtype=torch.float64),
                                                       torch.full((1, 1, 2, 2), s**2, dtype=torch.float64))
    schedule = NoiseSchedule.from_config({})
    x_t = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(torch.tensor(999))
    exact = mu + s * (x_t - alpha * mu) / torch.sqrt(alpha**2 * s**2 + sigma**2)
    model_fn = lambda x, t: gaussian(x, t).sample  # noqa: E731
    errors = [(reference_solution(model_fn, x_t, schedule, steps=n) - exact).abs().max() for n in (50, 1000)]
    # what is left at 1,000 steps is the last step, t = 0 (sigma = 0.01) -> clean, whose first-order error is
    # ~ (sigma_0 / s)^2 / 2 |x - alpha mu| ~ 1e-4; every diffusers solver ends with that same step
    assert errors[1] < 2e-4 and errors[1] < errors[0] / 10


def _two_class_mixture():
    means = torch.tensor([[1.0, -1.0, 0.5, 0.0], [-1.0, 1.0, 0.0, 0.5], [0.0, 0.0, 2.0, -2.0]], dtype=torch.float64)
    variances = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.2, 0.1], [0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    return GaussianMixtureDenoiser.from_components(
        means, variances, weights, component_classes=torch.tensor([0, 0, 1]), sample_shape=(1, 2, 2)
    ), means, variances, weights


def test_log_likelihood_equals_scipy():
    mix, means, variances, weights = _two_class_mixture()
    x = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 2])  # 2 = the null class: the whole mixture
    got = mixture_log_likelihood(mix, x, labels)
    flat = x.reshape(5, 4).numpy()
    comp = [[multivariate_normal(means[k].numpy(), torch.diag(variances[k]).numpy()).logpdf(flat[i]) for k in range(3)] for i in range(5)]
    w = weights.numpy()
    expected = [
        logsumexp([comp[0][0], comp[0][1]], b=[w[0], w[1]]) - math.log(w[0] + w[1]),
        comp[1][2],
        logsumexp([comp[2][0], comp[2][1]], b=[w[0], w[1]]) - math.log(w[0] + w[1]),
        comp[3][2],
        logsumexp(comp[4], b=w),
    ]
    assert got.tolist() == pytest.approx(expected, abs=1e-9)


def test_l2_metric_is_zero_for_the_reference_itself_and_cached(tmp_path):
    mix, *_ = _two_class_mixture()
    schedule = NoiseSchedule.from_alphas_cumprod(mix.alphas_cumprod)
    noise = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 1, 0])
    guidance = ClassifierFreeGuidance(3.0)
    ref = reference_solution(guidance.model_fn(mix, labels), noise.double(), schedule, steps=100)
    samples = SampleSet(samples=ref.float(), labels=labels, noise=noise, denoiser=mix, guidance=guidance,
                        schedule=schedule, work_dir=tmp_path, reference_key="k")
    metric = ReferenceL2(steps=100)
    assert metric(samples)["l2_error"] < 1e-5
    assert (tmp_path / "references" / "k-dpmpp2m100.safetensors").is_file()
    shifted = SampleSet(**{**samples.__dict__, "samples": ref.float() + 0.5})
    assert metric(shifted)["l2_error"] == pytest.approx(0.5 * 2, rel=1e-5)  # ||0.5 * ones(4)|| = 1


def test_log_likelihood_metric_needs_an_exact_density(tiny_pipe):
    with pytest.raises(ValueError, match="needs a model with an exact density .* got UNet2DModel"):
        MixtureLogLikelihood().check((1, 8, 8), tiny_pipe.unet)
    with pytest.raises(ValueError, match="NaN or Inf"):
        mixture_log_likelihood(_two_class_mixture()[0], torch.full((1, 1, 2, 2), float("nan")), torch.tensor([0]))


def test_rule_model_fn_equals_the_pipeline_cfg_combination():
    from steerdiff.benchmark.guidance import RuleGuidance
    from steerdiff.guidance import get_rule

    mix, *_ = _two_class_mixture()
    schedule = NoiseSchedule.from_alphas_cumprod(mix.alphas_cumprod)
    labels = torch.tensor([0, 1, 1])
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([500, 500, 500])
    rule = RuleGuidance(get_rule("cfg", scale={"schedule": "constant", "w0": 4.0})).model_fn(mix, labels, schedule)
    builtin = ClassifierFreeGuidance(4.0).model_fn(mix, labels)
    torch.testing.assert_close(rule(x, t), builtin(x, t), rtol=1e-12, atol=1e-12)
