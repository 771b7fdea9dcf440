"""Reference solutions and exact log-likelihoods on the analytic Gaussian mixture."""

import math

import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from steerdiff.pipelines.calling import GuidancePlan
from steerdiff.core import NoiseSchedule
from steerdiff.metrics.base import SampleSet
from steerdiff.metrics.likelihood import MixtureLogLikelihood, mixture_log_likelihood
from steerdiff.metrics.reference_error import ReferenceL2, reference_solution
from steerdiff.testbeds.mixture import GaussianMixtureDenoiser


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_reference_solution_equals_the_exact_gaussian_flow(kind):
    """For N(mu, diag s^2) the probability-flow ODE keeps the standardised coordinate fixed:
    x_t = alpha_t mu + sqrt(alpha_t^2 s^2 + sigma_t^2) z.  The reference ends there to 1e-6 (measured 5e-10; the
    1,000-step DPM-Solver++ 2M it replaces was 6e-4 / 9e-5 off): flow at s = 0, VP at t = 0 followed by the data
    prediction there, the clean end every VP sampler takes."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    config = FlowMatchEulerDiscreteScheduler() if kind == "flow" else DDPMScheduler(clip_sample=False)
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(1, 1, 4, 4, generator=gen, dtype=torch.float64)
    var = 0.01 + 0.3 * torch.rand(1, 1, 4, 4, generator=gen, dtype=torch.float64)
    gaussian = GaussianMixtureDenoiser.from_components(mu, var, scheduler_config=config)
    schedule = gaussian.schedule
    x_t = torch.randn(6, 1, 4, 4, generator=gen, dtype=torch.float64)
    start, end = (torch.tensor(1000.0), torch.tensor(0.0)) if kind == "flow" else (torch.tensor(999), torch.tensor(0))
    (a0, s0), (a1, s1) = schedule.alpha_sigma(start), schedule.alpha_sigma(end)
    exact = a1 * mu + torch.sqrt(a1**2 * var + s1**2) * (x_t - a0 * mu) / torch.sqrt(a0**2 * var + s0**2)
    if kind == "vp":
        exact = gaussian.posterior_mean(exact, end)
    model_fn = lambda x, t: gaussian(x, t).sample  # noqa: E731
    ref = reference_solution(model_fn, x_t, schedule, gaussian.config.prediction_type)
    assert float((ref - exact).flatten(1).norm(dim=1).max()) < 1e-6


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_reference_solution_on_the_digits_mixture_is_converged(kind):
    """Guided (w = 3) on the digits mixture: within 1e-6 of the same solve at rtol 1e-13 (measured 2e-10 - 5e-10;
    the former 1,000-step DPM-Solver++ 2M was 1.0e-3 (VP) and 2.7e-4 (flow) off)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from steerdiff.testbeds.mixture import fit_digits_mixture

    config = FlowMatchEulerDiscreteScheduler() if kind == "flow" else DDPMScheduler(clip_sample=False)
    model = fit_digits_mixture(dtype=torch.float64, scheduler_config=config)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fn = GuidancePlan({}, scale=3.0).model_fn(model, torch.tensor([0, 3, 5, 8]), model.schedule, model.config.prediction_type)
    ref = reference_solution(fn, noise, model.schedule, model.config.prediction_type)
    tight = reference_solution(fn, noise, model.schedule, model.config.prediction_type, rtol=1e-13)
    assert float((ref - tight).flatten(1).norm(dim=1).max()) < 1e-6


def test_reference_refuses_a_stateful_rule_and_bad_tolerances():
    from steerdiff.guidance import APG

    mix, *_ = _two_class_mixture()
    schedule = NoiseSchedule.from_alphas_cumprod(mix.alphas_cumprod)
    fn = GuidancePlan({}, rule=APG(3.0)).model_fn(mix, torch.tensor([0, 1]), schedule)
    with pytest.raises(ValueError, match="keeps state from one evaluation to the next"):
        reference_solution(fn, torch.randn(2, 1, 2, 2, dtype=torch.float64), schedule)
    for bad in (0.0, 0.1, True, "1e-8"):
        with pytest.raises(ValueError, match="rtol must be a number in"):
            ReferenceL2(rtol=bad)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        ReferenceL2(batch_size=0)
    broken = lambda x, t: mix(x, t).sample * (float("nan") if float(torch.as_tensor(t).flatten()[0]) < 500 else 1.0)  # noqa: E731
    with pytest.raises(FloatingPointError, match=r"model output has NaN/Inf at timestep 4\d\d(\.\d+)? of the reference solve"):
        reference_solution(broken, torch.randn(2, 1, 2, 2, dtype=torch.float64), schedule)


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
    guidance = GuidancePlan({}, scale=3.0)
    ref = reference_solution(guidance.model_fn(mix, labels), noise.double(), schedule, rtol=1e-8)
    samples = SampleSet(samples=ref.float(), labels=labels, noise=noise, denoiser=mix, guidance=guidance,
                        process=schedule, work_dir=tmp_path, reference_key="k")
    metric = ReferenceL2(rtol=1e-8)
    assert metric(samples)["l2_error"] < 1e-5
    assert (tmp_path / "references" / "k-dop853-rtol1e-08.safetensors").is_file()
    shifted = SampleSet(**{**samples.__dict__, "samples": ref.float() + 0.5})
    assert metric(shifted)["l2_error"] == pytest.approx(0.5 * 2, rel=1e-5)  # ||0.5 * ones(4)|| = 1


def test_log_likelihood_metric_needs_an_exact_density(tiny_pipe):
    with pytest.raises(ValueError, match="needs a model with an exact density .* got UNet2DModel"):
        MixtureLogLikelihood().check((1, 8, 8), tiny_pipe.unet)
    with pytest.raises(ValueError, match="NaN or Inf"):
        mixture_log_likelihood(_two_class_mixture()[0], torch.full((1, 1, 2, 2), float("nan")), torch.tensor([0]))


def test_rule_model_fn_equals_the_pipeline_cfg_combination():
    from steerdiff.guidance import get_rule

    mix, *_ = _two_class_mixture()
    schedule = NoiseSchedule.from_alphas_cumprod(mix.alphas_cumprod)
    labels = torch.tensor([0, 1, 1])
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([500, 500, 500])
    rule = GuidancePlan({}, rule=get_rule("cfg", scale={"schedule": "constant", "w0": 4.0})).model_fn(mix, labels, schedule)
    builtin = GuidancePlan({}, scale=4.0).model_fn(mix, labels)
    torch.testing.assert_close(rule(x, t), builtin(x, t), rtol=1e-12, atol=1e-12)
