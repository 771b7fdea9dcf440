"""Flow matching in the core: the process and its grids against diffusers, the family read from a config (and the
errors where a config contradicts itself), flow_prediction conversions, and the bugs fixed on the way."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from steerdiff.core import (
    FlowMatchSchedule,
    NoiseSchedule,
    convert_prediction,
    make_grid,
    noise_process_family,
    noise_process_from_config,
    prediction_type_from_config,
    resolve_grid,
    spaced_timesteps,
    to_eps,
    to_x0,
    with_final,
)
from steerdiff.core.timesteps import linspace_timesteps

F64 = torch.float64

# FlowMatchEulerDiscreteScheduler configs as the SD3, Flux, Wan-style and LTX-style models ship them, plus the
# re-spacing options; each with the set_timesteps arguments its pipeline passes
FLOW_CASES = [
    (dict(shift=3.0), dict(num_inference_steps=7)),  # SD3
    (dict(shift=1.0), dict(num_inference_steps=5)),
    (dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), dict(sigmas=list(np.linspace(1.0, 1 / 6, 6)), mu=0.83)),  # Flux
    (dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(num_inference_steps=6, mu=1.3)),
    (dict(shift=5.0, shift_terminal=0.1), dict(num_inference_steps=8)),  # LTX-style terminal
    (dict(shift=3.0, use_karras_sigmas=True), dict(num_inference_steps=6)),
    (dict(shift=3.0, use_exponential_sigmas=True), dict(num_inference_steps=6)),
    (dict(shift=3.0, use_beta_sigmas=True), dict(num_inference_steps=6)),
    (dict(shift=3.0), dict(timesteps=[990.0, 700.0, 420.5, 100.0])),
    (dict(shift=1.0), dict(sigmas=[1.0, 0.7, 0.4, 0.1], timesteps=[999.0, 650.0, 390.0, 99.0])),
]


@pytest.mark.parametrize("config,call", FLOW_CASES)
def test_flow_grid_is_diffusers(config, call):
    ref = FlowMatchEulerDiscreteScheduler(**config)
    ref.set_timesteps(**call)
    process = noise_process_from_config(ref)
    assert isinstance(process, FlowMatchSchedule)
    grid = resolve_grid(process, call.get("num_inference_steps"), sigmas=call.get("sigmas"), mu=call.get("mu"),
                        timesteps=call.get("timesteps"))
    assert torch.equal(grid.sigma_host.float(), ref.sigmas)
    assert torch.equal(grid.timesteps.float(), ref.timesteps.float())
    assert torch.allclose(grid.alpha.cpu(), 1 - grid.sigma_host, atol=0)
    assert grid.ends_clean


def test_flow_process_quantities():
    p = FlowMatchSchedule(1000)
    t = torch.tensor([1000.0, 750.0, 500.0, 0.0, -1.0])
    a, s = p.alpha_sigma(t)
    assert torch.equal(s, torch.tensor([1.0, 0.75, 0.5, 0.0, 0.0], dtype=F64)) and torch.equal(a + s, torch.ones(5, dtype=F64))
    lam = p.lambda_(torch.tensor([750.0]))
    assert float(lam) == pytest.approx(math.log(0.25 / 0.75))
    assert float(p.sigma_bar(torch.tensor([500.0]))) == pytest.approx(1.0)
    assert torch.allclose(p.timestep_from_lambda(p.lambda_(torch.tensor([123.0, 876.0]))), torch.tensor([123.0, 876.0], dtype=F64))
    assert torch.equal(p.progress(torch.tensor([250.0])), torch.tensor([0.25], dtype=F64))
    assert p.dynamic_mu(256) == pytest.approx(0.5) and p.dynamic_mu(4096) == pytest.approx(1.15)


# -- the family of a config, and configs that contradict themselves --------------------------------------------------
def test_family_from_configs():
    assert noise_process_family(FlowMatchEulerDiscreteScheduler(shift=3.0)) == "flow"
    assert noise_process_family(dict(FlowMatchEulerDiscreteScheduler().config)) == "flow"  # no class name, flow keys
    assert noise_process_family({"_class_name": "FlowMatchEulerDiscreteScheduler"}) == "flow"
    assert noise_process_family(DDPMScheduler()) == "vp"
    assert noise_process_family(DPMSolverMultistepScheduler()) == "vp"  # its use_dynamic_shifting etc. at defaults
    sana = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    assert noise_process_family(sana) == "flow"
    assert noise_process_from_config(sana).shift == 3.0
    assert prediction_type_from_config(FlowMatchEulerDiscreteScheduler()) == "flow_prediction"
    assert prediction_type_from_config(DDPMScheduler(prediction_type="v_prediction")) == "v_prediction"


@pytest.mark.parametrize(
    "config,key",
    [
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "beta_start": 0.001}, "beta_start"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "beta_schedule": "scaled_linear"}, "beta_schedule"),
        ({"_class_name": "DDPMScheduler", "beta_start": 0.001, "shift": 3.0}, "shift"),
        ({"beta_start": 0.001, "use_dynamic_shifting": True}, "use_dynamic_shifting"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "prediction_type": "v_prediction"}, "v_prediction"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True}, "invert_sigmas"),
        ({"use_flow_sigmas": False, "prediction_type": "flow_prediction", "beta_start": 0.001}, "flow_prediction"),
        ({"noise_process": "vp", "use_flow_sigmas": True}, "noise_process"),
        ({"noise_process": "edm"}, "noise_process"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "time_shift_type": "cubic"}, "time_shift_type"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_karras_sigmas": True, "use_beta_sigmas": True}, "use_karras_sigmas"),
    ],
)
def test_contradicting_or_unknown_configs_are_errors_naming_the_key(config, key):
    with pytest.raises(ValueError, match=key):
        noise_process_from_config(config)


def test_nothing_falls_back_to_vp():
    with pytest.raises(ValueError, match="flow-matching"):
        NoiseSchedule.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0))
    with pytest.raises(ValueError, match="VP schedule"):
        FlowMatchSchedule.from_config(DDPMScheduler())
    with pytest.raises(ValueError, match="mu must be given"):
        resolve_grid(noise_process_from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)), 4)
    with pytest.raises(ValueError, match="sigmas= is a flow-matching option"):
        resolve_grid(NoiseSchedule.from_config(DDPMScheduler()), 4, sigmas=[0.9, 0.5])


def test_a_scheduler_of_neither_family_is_an_error():
    """Variance-exploding / EDM schedulers have no betas and no flow key: they were read as DDPM's default VP schedule."""
    from diffusers import CMStochasticIterativeScheduler, EDMEulerScheduler

    from steerdiff.core.process import model_process
    from steerdiff.samplers.registry import make_scheduler

    for config in (EDMEulerScheduler(), CMStochasticIterativeScheduler(), {"_class_name": "KarrasVeScheduler"}):
        name = config["_class_name"] if isinstance(config, dict) else type(config).__name__
        with pytest.raises(ValueError, match=rf"the scheduler config \({name}\) is neither variance preserving"):
            model_process(config)
    with pytest.raises(ValueError, match="neither variance preserving"):
        NoiseSchedule.from_config(EDMEulerScheduler())
    with pytest.raises(ValueError, match=r"the scheduler config \(with sigma_data, rho, sigma_min, sigma_max\) is neither"):
        make_scheduler("ghvb", EDMEulerScheduler().config)  # a config mapping: no class name, its noise levels tell
    assert noise_process_family({"num_train_timesteps": 500}) == "vp"  # a hand-written dict: DDPM's defaults
    with pytest.raises(ValueError, match="sigmas must be"):
        resolve_grid(FlowMatchSchedule(), sigmas=[1.2, 0.5])


# -- flow_prediction --------------------------------------------------------------------------------------------------
TYPES = {"vp": ("epsilon", "v_prediction", "sample", "flow_prediction"), "flow": ("epsilon", "sample", "flow_prediction")}


@pytest.mark.parametrize("family", ["vp", "flow"])
def test_prediction_round_trips(family):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, generator=g, dtype=F64), torch.randn(3, 2, 4, generator=g, dtype=F64)
    if family == "vp":
        alpha = torch.tensor([0.9, 0.5, 0.1], dtype=F64)
        sigma = torch.sqrt(1 - alpha**2)
    else:
        sigma = torch.tensor([0.95, 0.5, 0.05], dtype=F64)
        alpha = 1 - sigma
    x = alpha.reshape(-1, 1, 1) * x0 + sigma.reshape(-1, 1, 1) * eps
    outputs = {
        "epsilon": eps, "sample": x0, "flow_prediction": eps - x0,
        "v_prediction": alpha.reshape(-1, 1, 1) * eps - sigma.reshape(-1, 1, 1) * x0,
    }
    for a in TYPES[family]:
        assert torch.allclose(to_x0(outputs[a], x, alpha, sigma, a), x0, atol=1e-12)
        assert torch.allclose(to_eps(outputs[a], x, alpha, sigma, a), eps, atol=1e-12)
        for b in TYPES[family]:
            got = convert_prediction(outputs[a], x, alpha, sigma, a, b)
            assert torch.allclose(got, outputs[b], atol=1e-11), (a, b)
            back = convert_prediction(got, x, alpha, sigma, b, a)
            assert torch.allclose(back, outputs[a], atol=1e-10), (a, b)


def test_flow_velocity_is_defined_at_pure_noise():
    """At s = 1 (alpha = 0, where flow grids start) x0 = x - v and eps = x are finite."""
    x, v = torch.randn(2, 4, dtype=F64), torch.randn(2, 4, dtype=F64)
    assert torch.equal(to_x0(v, x, 0.0, 1.0, "flow_prediction"), x - v)
    assert torch.equal(to_eps(v, x, 0.0, 1.0, "flow_prediction"), x)
    assert torch.equal(convert_prediction(v, x, 0.0, 1.0, "flow_prediction", "sample"), x - v)


# -- bugs found on the way --------------------------------------------------------------------------------------------
def test_spaced_linspace_repeats_at_n_equals_t_and_the_grid_refuses_it():
    ts = spaced_timesteps(1000, 1000, "linspace")
    assert ts.unique().numel() < 1000  # DPM-Solver's rule (and diffusers') repeats timesteps here
    with pytest.raises(ValueError, match="strictly"):
        make_grid(NoiseSchedule.from_config(DDPMScheduler()), with_final(ts))
    every = linspace_timesteps(1000, 1000)
    assert torch.equal(every, torch.arange(999, -1, -1))  # DDPM's rule: every timestep once, t = 0 included
    assert torch.equal(linspace_timesteps(1000, 4), torch.tensor([999, 666, 333, 0]))
    assert torch.equal(linspace_timesteps(10, 1), torch.tensor([9]))


def test_zero_snr_linear_schedule_is_accepted_as_diffusers_does():
    config = dict(beta_schedule="linear", rescale_betas_zero_snr=True)
    ref = DPMSolverMultistepScheduler(**config)
    ns = NoiseSchedule.from_config(ref.config)
    assert torch.allclose(ns.alphas_cumprod, ref.alphas_cumprod.double(), rtol=1e-6, atol=0)
    assert ns.alphas_cumprod[-1] > ns.alphas_cumprod[-2]  # the clamped terminal entry
    lam = ns.lambda_(torch.tensor([10.0, 500.0, 990.0]))
    assert torch.allclose(ns.timestep_from_lambda(lam), torch.tensor([10.0, 500.0, 990.0], dtype=F64), atol=1e-6)


def test_flow_grid_from_dpm_solver_flow_config_and_its_errors():
    process = FlowMatchSchedule(shift=3.0)
    with pytest.raises(ValueError, match="sigma_min"):
        resolve_grid(process, 4, final_sigmas_type="sigma_min")
    grid = resolve_grid(process, 4)
    assert grid.starts_at_pure_noise and grid.t_host[-1] == 0.0
