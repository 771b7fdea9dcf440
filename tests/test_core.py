"""The shared numerical core: schedules, conversions, steps, and sampling loops that reproduce diffusers."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from steerdiff.core import (
    History,
    NoiseSchedule,
    adams_bashforth,
    adams_bashforth_coefficients,
    ancestral_step,
    euler_step,
    exponential_step,
    from_eps,
    from_x0,
    sample_ddim,
    sample_dpmpp_2m,
    sample_noise,
    sample_plms,
    spaced_timesteps,
    to_eps,
    to_x0,
    with_final,
)

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
torch.manual_seed(0)


class GaussianData:
    """Exact denoiser of N(m, s^2 I) data, written out for these tests: eps = sigma (x - alpha m) / (alpha^2 s^2 + sigma^2)."""

    def __init__(self, schedule, prediction_type, shape=(1, 4, 4), s=0.5):
        self.schedule, self.prediction_type, self.s = schedule, prediction_type, s
        self.m = torch.linspace(-0.8, 0.8, math.prod(shape), dtype=torch.float64).reshape(shape)

    def __call__(self, x, t):
        a, sg = self.schedule.alpha_sigma(t.to(torch.float64))
        a, sg = a.reshape(-1, 1, 1, 1), sg.reshape(-1, 1, 1, 1)
        eps = sg * (x - a * self.m) / (a**2 * self.s**2 + sg**2)
        return from_eps(eps, x, a.flatten(), sg.flatten(), self.prediction_type)


# -- NoiseSchedule ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [
        dict(beta_schedule="linear"),
        SD_BETAS,
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(trained_betas=torch.linspace(1e-4, 0.03, 500).tolist(), num_train_timesteps=500),
    ],
)
def test_schedule_matches_diffusers_betas(cfg):
    ref = DDIMScheduler(**cfg)
    ns = NoiseSchedule.from_config(ref.config)
    assert ns.num_train_timesteps == ref.config.num_train_timesteps
    assert torch.equal(ns.alphas_cumprod, ref.alphas_cumprod.double())
    t = torch.tensor([0, 10, 999 if ns.num_train_timesteps == 1000 else 499])
    assert torch.allclose(ns.alpha(t) ** 2, ref.alphas_cumprod[t].double(), rtol=1e-12)


def test_schedule_identities_and_batching():
    ns = NoiseSchedule.from_config(SD_BETAS)
    t = torch.tensor([[0.0, 3.5], [500.25, 999.0]])
    a, s = ns.alpha_sigma(t)
    assert a.shape == t.shape and a.dtype == torch.float64
    assert torch.allclose(a**2 + s**2, torch.ones_like(a), atol=1e-14)
    assert torch.allclose(ns.lambda_(t), torch.log(a / s), rtol=1e-12)
    assert torch.allclose(ns.sigma_bar(t), s / a, rtol=1e-12)
    assert ns.alpha(t, dtype=torch.float32).dtype == torch.float32
    # fractional timesteps interpolate log(alpha) linearly
    mid = ns.log_alpha(torch.tensor(3.5))
    assert torch.allclose(mid, 0.5 * (ns.log_alpha(torch.tensor(3)) + ns.log_alpha(torch.tensor(4))), rtol=1e-14)
    # the end of sampling: alpha = 1, sigma = 0, lambda = inf
    a_end, s_end = ns.alpha_sigma(torch.tensor(-1))
    assert float(a_end) == 1.0 and float(s_end) == 0.0 and math.isinf(float(ns.lambda_(torch.tensor(-1))))
    no_one = NoiseSchedule.from_config({**SD_BETAS, "set_alpha_to_one": False})
    assert torch.allclose(no_one.alpha(torch.tensor(-1)) ** 2, no_one.alphas_cumprod[0])


def test_timestep_from_lambda_inverts_lambda():
    ns = NoiseSchedule.from_config({"beta_schedule": "squaredcos_cap_v2"})
    t = torch.rand(200, dtype=torch.float64) * 998 + 0.5
    assert torch.allclose(ns.timestep_from_lambda(ns.lambda_(t)), t, atol=1e-6)
    assert torch.allclose(ns.timestep_from_sigma_bar(ns.sigma_bar(t)), t, atol=1e-6)


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        NoiseSchedule.from_config({"beta_schedule": "cubic"})
    with pytest.raises(ValueError, match="non-increasing"):
        NoiseSchedule(torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NoiseSchedule(torch.tensor([0.9, 0.0]))


# -- prediction conversions -------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_conversions_round_trip(prediction_type):
    ns = NoiseSchedule.from_config({})
    t = torch.tensor([10, 400, 990])
    a, s = ns.alpha_sigma(t)
    x0, eps = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    x = a.reshape(-1, 1, 1, 1) * x0 + s.reshape(-1, 1, 1, 1) * eps
    out = from_eps(eps, x, a, s, prediction_type)
    assert torch.allclose(to_eps(out, x, a, s, prediction_type), eps, atol=1e-10)
    assert torch.allclose(to_x0(out, x, a, s, prediction_type), x0, atol=1e-10)
    assert torch.allclose(from_x0(x0, x, a, s, prediction_type), out, atol=1e-10)
    if prediction_type == "v_prediction":
        assert torch.allclose(out, a.reshape(-1, 1, 1, 1) * eps - s.reshape(-1, 1, 1, 1) * x0, atol=1e-12)


def test_unknown_prediction_type():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        to_x0(x, x, 1.0, 0.5, "flow")


# -- steps and loops reproduce diffusers --------------------------------------------------------------------
def _run_diffusers(scheduler, model, x, **step_kwargs):
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("steps", [5, 20])
def test_ddim_loop_matches_diffusers(prediction_type, spacing, offset, steps):
    cfg = dict(SD_BETAS, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=offset,
               clip_sample=False, set_alpha_to_one=False)
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(steps)
    ns = NoiseSchedule.from_config(ref.config)
    model = GaussianData(ns, prediction_type)
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    expected = _run_diffusers(ref, model, x, eta=0.0)
    # DDIMScheduler steps from t to t - T // N, ending below 0 at its final alpha
    grid = torch.cat([ref.timesteps, (ref.timesteps[-1:] - 1000 // steps).clamp(min=-1)])
    got = sample_ddim(model, x, ns, grid, prediction_type)
    assert (got - expected).abs().max() < 1e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpmpp_2m_loop_matches_diffusers(prediction_type, spacing, steps):
    ref = DPMSolverMultistepScheduler(**SD_BETAS, prediction_type=prediction_type, timestep_spacing=spacing,
                                      algorithm_type="dpmsolver++", solver_type="midpoint", solver_order=2)
    ref.set_timesteps(steps)
    ns = NoiseSchedule.from_config(ref.config)
    model = GaussianData(ns, prediction_type)
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    expected = _run_diffusers(ref, model, x)
    got = sample_dpmpp_2m(model, x, ns, with_final(ref.timesteps), prediction_type)
    assert (got - expected).abs().max() < 1e-6
    assert torch.equal(spaced_timesteps(1000, steps, spacing), ref.timesteps)


def test_ancestral_ddim_eta1_matches_ddpm():
    ref = DDPMScheduler(clip_sample=False)
    ref.set_timesteps(25)
    ns = NoiseSchedule.from_config(ref.config)
    model = GaussianData(ns, "epsilon")
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    expected = _run_diffusers(ref, model, x, generator=torch.Generator().manual_seed(7))
    grid = torch.cat([ref.timesteps, torch.tensor([-1])])
    got = sample_ddim(model, x, ns, grid, "epsilon", eta=1.0, generator=torch.Generator().manual_seed(7))
    assert (got - expected).abs().max() < 1e-6


def test_step_identities():
    ns = NoiseSchedule.from_config({})
    a_s, s_s = ns.alpha_sigma(torch.tensor(700))
    a_t, s_t = ns.alpha_sigma(torch.tensor(400))
    x, eps = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    data = (x - s_s * eps) / a_s
    ddim = euler_step(x, eps, a_s, s_s, a_t, s_t)
    # DDIM = DPM-Solver++ 1 = DDIM(eta=0) ancestral step
    assert torch.allclose(exponential_step(x, data, a_s, s_s, a_t, s_t), ddim, atol=1e-12)
    assert torch.allclose(ancestral_step(x, data, a_s, s_s, a_t, s_t, torch.randn_like(x), eta=0.0), ddim, atol=1e-12)
    # the sample's dtype is kept when the coefficients are float64
    assert euler_step(x.float(), eps.float(), a_s, s_s, a_t, s_t).dtype == torch.float32


def test_adams_bashforth_coefficients():
    classical = {1: (1,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
    for r, c in classical.items():
        assert adams_bashforth_coefficients(r, 1.0) == pytest.approx(c, abs=1e-15)
        for b in (0.3, 0.8):  # consistency: the weights of a constant history sum to one
            assert sum(adams_bashforth_coefficients(r, b)) == pytest.approx(1.0, abs=1e-14)
    with pytest.raises(ValueError, match="order must be one of"):
        adams_bashforth_coefficients(5)
    with pytest.raises(ValueError, match="beta must lie in"):
        adams_bashforth_coefficients(2, 0.0)


def test_history_and_adams_bashforth_use_available_order():
    h = History(4)
    es = [torch.full((1,), float(i)) for i in range(6)]
    for e in es:
        h.push(e)
    assert len(h) == 4 and [float(v) for v in h] == [5.0, 4.0, 3.0, 2.0]
    short = History(4)
    short.push(es[1])
    short.push(es[2])  # only two entries: AB2
    assert torch.allclose(adams_bashforth(short, 4), 1.5 * es[2] - 0.5 * es[1])
    h.reset()
    assert len(h) == 0


def _exact_gaussian_flow(model, ns, x, t0, t1):
    """Closed-form probability-flow solution for N(m, s^2 I) data: x_bar - m grows like sqrt(s^2 + sigma_bar^2)."""
    sb0, sb1 = ns.sigma_bar(t0), ns.sigma_bar(t1)
    a0, a1 = ns.alpha(t0), ns.alpha(t1)
    return a1 * (model.m + (x / a0 - model.m) * torch.sqrt((model.s**2 + sb1**2) / (model.s**2 + sb0**2)))


@pytest.mark.parametrize(
    "sampler,grid_in,expected_order",
    [(sample_ddim, "sigma_bar", (0.85, 1.15)), (sample_dpmpp_2m, "lambda", (1.7, 2.3)), (sample_plms, "sigma_bar", (2.8, 4.5))],
)
def test_measured_order_on_smooth_grids(sampler, grid_in, expected_order):
    """Against the exact flow of Gaussian data: DDIM is first order, DPM-Solver++ 2M second, PLMS (AB4) fourth,
    on grids uniform in the variable each method integrates in (from t = 500 to t = 50).  PLMS's lower-order
    warm-up steps cap its asymptotic order; over 40 -> 160 steps its measured order is about 3.4."""
    ns = NoiseSchedule.from_config({})
    model = GaussianData(ns, "epsilon")
    x = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    ends = torch.tensor([500.0, 50.0])
    errors = []
    for n in (40, 160):
        if grid_in == "lambda":
            grid = ns.timestep_from_lambda(torch.linspace(*ns.lambda_(ends).tolist(), n + 1, dtype=torch.float64))
        else:
            grid = ns.timestep_from_sigma_bar(torch.linspace(*ns.sigma_bar(ends).tolist(), n + 1, dtype=torch.float64))
        got = sampler(model, x, ns, grid)
        errors.append(float((got - _exact_gaussian_flow(model, ns, x, grid[0], grid[-1])).abs().max()))
    order = math.log2(errors[0] / errors[1]) / 2  # two halvings of the step
    assert expected_order[0] < order < expected_order[1], (errors, order)


def test_per_sample_noise_is_batch_independent():
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    batch = sample_noise((3, 1, 4, 4), gens, "cpu", torch.float32)
    single = sample_noise((1, 1, 4, 4), [torch.Generator().manual_seed(2)], "cpu", torch.float32)
    assert torch.equal(batch[1:2], single)
    with pytest.raises(ValueError, match="one per sample"):
        sample_noise((2, 1, 4, 4), gens, "cpu", torch.float32)


def test_spaced_timesteps_rejects_bad_input():
    with pytest.raises(ValueError, match="num_inference_steps must be between 1"):
        spaced_timesteps(1000, 0)
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        spaced_timesteps(1000, 10, "uniform")
    with pytest.raises(TypeError, match="num_inference_steps must be an integer"):
        spaced_timesteps(1000, 2.5)
