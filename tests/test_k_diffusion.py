"""steerdiff.k_diffusion's sampler functions: k-diffusion's own samplers at beta = 1 (reference loops written out
from k-diffusion's formulas: Euler, DPM-Solver++ 2M, LMS with scipy's quad), steerdiff's schedulers at beta < 1 on
the same noise levels (VP and flow), k-diffusion's calling conventions, the flow process ComfyUI uses, bad input."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from steerdiff.core import NoiseSchedule
from steerdiff.k_diffusion import (
    GuidedDenoiser, sample_dpmpp_2m_hb, sample_dpmpp_3m_hb, sample_ghvb, sample_plms_hb, sample_unipc_hb,
)
from steerdiff.samplers import GHVBScheduler, HeavyBallDPMSolverScheduler, HeavyBallPLMSScheduler, HeavyBallUniPCScheduler

MU, S0 = 0.3, 0.7  # data x0 ~ N(MU, S0^2) per coordinate: every denoiser below is exact


def gaussian_denoiser(x, sigma):
    """E[x0 | x0 + sigma eps = x] (k-diffusion's VE convention)."""
    s = sigma.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
    return MU + S0**2 / (S0**2 + s**2) * (x - MU)


def flow_denoiser(x, s):
    """E[x0 | (1 - s) x0 + s eps = x], exact at s = 1 too."""
    s = s.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
    a = 1 - s
    return MU + a * S0**2 / (a**2 * S0**2 + s**2) * (x - a * MU)


def karras(n, sigma_min=0.03, sigma_max=14.6, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


def start(sigma0, batch=4, seed=0):
    return torch.randn(batch, 3, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sigma0


# -- k-diffusion's samplers, written out from their formulas (k_diffusion/sampling.py, v0.1.1) --------------------
def ref_euler(model, x, sigmas):
    for i in range(len(sigmas) - 1):
        d = (x - model(x, sigmas[i] * x.new_ones(x.shape[0]))) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def ref_dpmpp_2m(model, x, sigmas):
    """t = -log sigma; first order on the first step and on a step to sigma = 0; else the 2M data combination
    with r = h_last / h."""
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]))
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            data = denoised
        else:
            r = (t + sigmas[i - 1].log()) / h
            data = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * data
        old = denoised
    return x


def ref_lms(model, x, sigmas, order):
    """Linear multistep in sigma: the Lagrange basis of the last ``order`` derivatives integrated over each step
    with scipy.integrate.quad(epsrel=1e-4), as k-diffusion does."""
    nodes, ds = sigmas.numpy(), []
    for i in range(len(sigmas) - 1):
        ds.append((x - model(x, sigmas[i] * x.new_ones(x.shape[0]))) / sigmas[i])
        ds = ds[-order:]
        r = min(i + 1, order)

        def coefficient(j):
            basis = lambda tau: math.prod((tau - nodes[i - k]) / (nodes[i - j] - nodes[i - k]) for k in range(r) if k != j)
            return integrate.quad(basis, nodes[i], nodes[i + 1], epsrel=1e-4)[0]

        x = x + sum(coefficient(j) * d for j, d in zip(range(r), reversed(ds)))
    return x


@pytest.mark.parametrize("steps", [5, 12])
def test_euler_and_dpmpp_2m_at_beta_one(steps):
    sigmas = karras(steps)
    x = start(sigmas[0])
    euler = sample_ghvb(gaussian_denoiser, x, sigmas, momentum_number=1, disable=True)
    torch.testing.assert_close(euler, ref_euler(gaussian_denoiser, x, sigmas), rtol=0, atol=1e-13)
    for momentum_number in (1, 1.0):
        torch.testing.assert_close(sample_plms_hb(gaussian_denoiser, x, sigmas, order=1, beta=1, disable=True), euler, rtol=0, atol=1e-13)
    two_m = sample_dpmpp_2m_hb(gaussian_denoiser, x, sigmas, beta=1, disable=True)
    torch.testing.assert_close(two_m, ref_dpmpp_2m(gaussian_denoiser, x, sigmas), rtol=0, atol=1e-13)
    assert not torch.allclose(two_m, euler)  # the two references tell the solvers apart


@pytest.mark.parametrize("order", [2, 3, 4])
def test_lms_at_beta_one(order):
    """Variable-step Adams-Bashforth weights are the exact integrals of the Lagrange basis; k-diffusion's quad gets
    them to its tolerance (for these cubic-at-most integrands, to rounding)."""
    sigmas = karras(9)
    x = start(sigmas[0])
    ours = sample_plms_hb(gaussian_denoiser, x, sigmas, order=order, beta=1, disable=True)
    torch.testing.assert_close(ours, ref_lms(gaussian_denoiser, x, sigmas, order), rtol=0, atol=1e-10)
    # GHVB of integer momentum number is the same method
    ghvb = sample_ghvb(gaussian_denoiser, x, sigmas, momentum_number=order, disable=True)
    torch.testing.assert_close(ghvb, ours, rtol=0, atol=1e-12)


def vp_levels(steps):
    """Fractional VP timesteps, their sigma_bar as k-diffusion sigmas (ending at 0), and the VP schedule."""
    process = NoiseSchedule.from_config(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    timesteps = torch.linspace(999, 20.5, steps, dtype=torch.float64)
    sigma_bar = process.sigma_bar(timesteps)
    return process, timesteps, torch.cat([sigma_bar, sigma_bar.new_zeros(1)])


SCHEDULER_CASES = [
    (sample_plms_hb, HeavyBallPLMSScheduler, dict(order=4, beta=0.8)),
    (sample_plms_hb, HeavyBallPLMSScheduler, dict(order=3, beta=0.6, adams_weights="fixed")),
    (sample_ghvb, GHVBScheduler, dict(momentum_number=3.8)),
    (sample_ghvb, GHVBScheduler, dict(momentum_number=2.5, warmup="rk4")),
    (sample_dpmpp_2m_hb, HeavyBallDPMSolverScheduler, dict(beta=0.8)),
    (sample_dpmpp_3m_hb, HeavyBallDPMSolverScheduler, dict(beta=0.7)),
    (sample_unipc_hb, HeavyBallUniPCScheduler, dict(beta=0.8)),
    (sample_unipc_hb, HeavyBallUniPCScheduler, dict(beta=0.9, order=3, solver_type="bh1")),
]


def _scheduler_options(fn, options):
    options = dict(options)
    if fn is sample_dpmpp_2m_hb or fn is sample_dpmpp_3m_hb:
        options.update(solver_order=2 if fn is sample_dpmpp_2m_hb else 3, lower_order_final=False)
    if fn is sample_unipc_hb:
        options["solver_order"] = options.pop("order", 2)
    return options


def _run_scheduler(scheduler, model_output, x, calls):
    for t in calls:
        x = scheduler.step(model_output(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("fn,cls,options", SCHEDULER_CASES, ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_functions_equal_the_schedulers_on_vp(fn, cls, options):
    """On the VP process: the scheduler over timesteps t_i, with an eps model, and the function over sigma_bar(t_i)
    in k-diffusion's x = x_vp / alpha, with the same model as a denoiser, end at the same sample."""
    process, timesteps, sigmas = vp_levels(8)
    scheduler = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **_scheduler_options(fn, options))
    scheduler.set_timesteps(timesteps=timesteps.tolist())
    x_ve = start(sigmas[0])
    alpha0, _ = process.alpha_sigma(timesteps[0])

    def eps_model(x_vp, t):
        a, s = process.alpha_sigma(torch.as_tensor(t, dtype=torch.float64))
        bar = s / a
        return (x_vp / a - gaussian_denoiser(x_vp / a, bar.reshape(1).expand(x_vp.shape[0]))) / bar

    vp = _run_scheduler(scheduler, eps_model, alpha0 * x_ve, [t for t, _ in scheduler.network_calls])
    ve = fn(gaussian_denoiser, x_ve, sigmas, disable=True, **options)
    torch.testing.assert_close(ve, vp, rtol=0, atol=1e-10)
    ref = sample_ghvb(gaussian_denoiser, x_ve, sigmas, momentum_number=1, disable=True)
    assert (ve - ref).abs().max() > 1e-4  # not the Euler path


@pytest.mark.parametrize("fn,cls,options", SCHEDULER_CASES, ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_functions_equal_the_schedulers_on_flow(fn, cls, options):
    """process='flow' (ComfyUI's CONST sampling, sigma = s from 1): the flow scheduler with the pipeline's sigmas and
    a velocity model ends where the function ends with the denoiser."""
    scheduler = cls.from_config(dict(_class_name="FlowMatchEulerDiscreteScheduler", shift=3.0), **_scheduler_options(fn, options))
    scheduler.set_timesteps(7)
    sigmas = scheduler.grid.sigma.clone()  # SD3's shifted grid, from s = 1 to 0
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    x = start(1.0)

    points = dict(zip(scheduler.grid.t_host, scheduler.grid.sigma.tolist()))  # grid timesteps are float32 s T

    def velocity(x_t, t):
        level = torch.tensor(points.get(t, t / 1000), dtype=torch.float64)  # warm-up midpoints: s T in float64
        return (x_t - flow_denoiser(x_t, level.reshape(1).expand(x_t.shape[0]))) / level

    flow = _run_scheduler(scheduler, velocity, x, [t for t, _ in scheduler.network_calls])
    ours = fn(flow_denoiser, x, sigmas, disable=True, process="flow", **options)
    torch.testing.assert_close(ours, flow, rtol=0, atol=1e-10)


def test_flow_euler_is_k_diffusion_euler_on_const():
    """On ComfyUI's CONST x, k-diffusion's Euler is flow Euler: GHVB 1 in process='flow' reproduces it."""
    sigmas = torch.cat([torch.linspace(1, 0.05, 9, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = start(1.0)
    ours = sample_ghvb(flow_denoiser, x, sigmas, momentum_number=1, process="flow", disable=True)
    torch.testing.assert_close(ours, ref_euler(flow_denoiser, x, sigmas), rtol=0, atol=1e-13)


def test_flow_process_is_not_the_ve_formula():
    """DPM-Solver++ on a flow model steps in lambda = log((1 - s) / s); k-diffusion's VE formula applied to s is a
    different (less accurate) method, so 'flow' must not equal 've' on the same sigmas, and is closer to the exact
    solution."""
    sigmas = torch.cat([torch.linspace(0.999, 0.02, 6, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = start(1.0)
    flow = sample_dpmpp_2m_hb(flow_denoiser, x, sigmas, beta=1, process="flow", disable=True)
    as_ve = sample_dpmpp_2m_hb(flow_denoiser, x, sigmas, beta=1, process="ve", disable=True)
    exact = sample_ghvb(flow_denoiser, x, torch.cat([torch.linspace(0.999, 1e-4, 4000, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]),
                        momentum_number=1, process="flow", disable=True)
    assert (flow - exact).abs().max() < (as_ve - exact).abs().max()


def test_calling_conventions():
    """extra_args reach the model, sigma is passed per sample, the callback gets k-diffusion's dict once per step,
    the tqdm bar is off with disable=True, and a single sigma returns x unchanged."""
    sigmas = karras(5)
    x = start(sigmas[0], batch=3)
    seen, steps = [], []

    def model(x_t, sigma, *, scale):
        seen.append((sigma.shape, scale))
        return gaussian_denoiser(x_t, sigma)

    sample_ghvb(model, x, sigmas, extra_args={"scale": 2.0}, callback=steps.append, disable=True, warmup="rk4")
    assert all(shape == (3,) and scale == 2.0 for shape, scale in seen)
    assert len(seen) == 5 + 3 * 3  # the rk4 warm-up's three extra calls for each of its r - 1 = 3 steps
    assert [s["i"] for s in steps] == list(range(5))
    assert set(steps[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert float(steps[2]["sigma"]) == float(sigmas[2])
    assert sample_plms_hb(model, x, sigmas[:1], extra_args={"scale": 1.0}) is x


def test_float32_on_karras_grid_matches_float64():
    sigmas = karras(10).float()
    x = start(sigmas[0]).float()
    low = sample_ghvb(gaussian_denoiser, x, sigmas, disable=True)
    high = sample_ghvb(gaussian_denoiser, x.double(), sigmas.double(), disable=True)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), high, rtol=0, atol=1e-4)


def test_bad_input_is_named():
    sigmas = karras(4)
    x = start(sigmas[0])
    with pytest.raises(ValueError, match="process must be one of"):
        sample_ghvb(gaussian_denoiser, x, sigmas, process="eps")
    with pytest.raises(ValueError, match="beta must be a number in"):
        sample_plms_hb(gaussian_denoiser, x, sigmas, beta=1.5)
    with pytest.raises(ValueError, match="momentum_number must be"):
        sample_ghvb(gaussian_denoiser, x, sigmas, momentum_number=7)
    with pytest.raises(ValueError, match="sigmas must be a 1-D"):
        sample_ghvb(gaussian_denoiser, x, sigmas[None])
    with pytest.raises(ValueError, match="strictly"):
        sample_ghvb(gaussian_denoiser, x, sigmas.flip(0))
    with pytest.raises(ValueError, match="flow sigmas must lie in"):
        sample_ghvb(flow_denoiser, x, sigmas, process="flow")
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        sample_ghvb(gaussian_denoiser, x.long(), sigmas)
    from steerdiff.k_diffusion.sampling import run_sampler

    vp_scheduler = HeavyBallPLMSScheduler(noise_process="vp", prediction_type="sample")
    with pytest.raises(ValueError, match=r"this scheduler's noise_process is 'vp'; the grid's process is FlowSigma\(\)"):
        run_sampler(vp_scheduler, flow_denoiser, x, sigmas / sigmas[0], process="flow")


def test_nonfinite_denoiser_output_names_the_step():
    sigmas = karras(6)
    x = start(sigmas[0])

    def broken(x_t, sigma):
        out = gaussian_denoiser(x_t, sigma)
        return out * float("nan") if float(sigma[0]) < 1.0 else out

    with pytest.raises(FloatingPointError, match=r"model_output holds NaN/Inf at step \d+ of 6 \(timestep 0\.\d+"):
        sample_dpmpp_2m_hb(broken, x, sigmas, disable=True)


class _ModelSampling:
    pass


def _comfy_like(model, *families):
    """A model as ComfyUI hands it to sampler functions: .inner_model.model_patcher.get_model_object."""
    sampling = type("ModelSampling", tuple(type(f, (), {}) for f in families), {})()

    class Patcher:
        def get_model_object(self, name):
            assert name == "model_sampling"
            return sampling

    class Guider:
        model_patcher = Patcher()

    class Wrapped:
        inner_model = Guider()

        def __call__(self, x, sigma, **kw):
            return model(x, sigma, **kw)

    return Wrapped()


def test_comfy_model_sampling_picks_the_process():
    s = torch.cat([torch.linspace(1, 0.05, 6, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = start(1.0)
    const = _comfy_like(flow_denoiser, "ModelSamplingDiscreteFlow", "CONST")
    torch.testing.assert_close(
        sample_dpmpp_2m_hb(const, x, s, disable=True), sample_dpmpp_2m_hb(flow_denoiser, x, s, process="flow", disable=True)
    )
    sigmas = karras(5)
    eps = _comfy_like(gaussian_denoiser, "ModelSamplingDiscrete", "V_PREDICTION_", "EPS")
    torch.testing.assert_close(sample_ghvb(eps, start(sigmas[0]), sigmas, disable=True),
                               sample_ghvb(gaussian_denoiser, start(sigmas[0]), sigmas, process="ve", disable=True))
    unknown = _comfy_like(gaussian_denoiser, "ModelSamplingDiscrete", "SOMETHING_NEW")
    with pytest.raises(ValueError, match="SOMETHING_NEW.*pass process='ve' or process='flow'"):
        sample_ghvb(unknown, start(sigmas[0]), sigmas, disable=True)
