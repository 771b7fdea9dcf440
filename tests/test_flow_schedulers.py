"""The momentum schedulers on flow-matching configs: from_config, the flow grids pipelines ask for, order-1 / beta-1
equality with diffusers' flow solvers, img2img's scale_noise, and the keys of the other family refused."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from steerdiff.samplers import GHVBScheduler, HeavyBallDPMSolverScheduler, HeavyBallPLMSScheduler

F64 = torch.float64
SCHEDULERS = [HeavyBallPLMSScheduler, HeavyBallDPMSolverScheduler, GHVBScheduler]


def field(x, t):
    """A smooth stand-in network output (a velocity field) that depends on x and on the timestep."""
    t = torch.as_tensor(t, dtype=F64)
    return 0.4 * x + torch.sin(1.7 * x) * (t / 1000) - 0.2


def run(sched, x, **set_kw):
    sched.set_timesteps(**set_kw)
    for t in sched.timesteps:
        x = sched.step(field(x, t), t, x).prev_sample
    return x


def start():
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)


EULER_CALLS = [
    (dict(shift=3.0), dict(num_inference_steps=8)),  # SD3
    (dict(use_dynamic_shifting=True), dict(sigmas=list(np.linspace(1.0, 1 / 6, 6)), mu=0.9)),  # Flux
    (dict(shift=5.0, shift_terminal=0.1), dict(num_inference_steps=6)),
    (dict(shift=3.0), dict(timesteps=[990.0, 700.0, 420.5, 100.0])),
]


@pytest.mark.parametrize("config,call", EULER_CALLS)
@pytest.mark.parametrize("make", [
    lambda c: GHVBScheduler.from_config(c, momentum_number=1.0),
    lambda c: HeavyBallPLMSScheduler.from_config(c, order=1, beta=1.0),
])
def test_order_one_beta_one_is_flow_match_euler(config, call, make):
    ref = FlowMatchEulerDiscreteScheduler(**config)
    ours = make(ref.config)
    assert ours.config.noise_process == "flow" and ours.config.prediction_type == "flow_prediction"
    x = start()
    expected = run(ref, x.clone(), **call)
    got = run(ours, x.clone(), **call)
    assert torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.timesteps.float(), ref.timesteps.float())
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)


def test_hb_dpm_beta_one_is_dpm_solver_with_flow_sigmas():
    ref = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction", solver_order=2)
    ref.set_timesteps(9)
    ours = HeavyBallDPMSolverScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=1.0).config, beta=1.0)
    x = start()
    expected = x.clone()
    for t in ref.timesteps:
        expected = ref.step(field(expected, t), t, expected).prev_sample
    got = run(ours, x.clone(), sigmas=ref.sigmas[:-1].tolist(), timesteps=ref.timesteps.tolist())
    assert torch.allclose(ours.sigmas, ref.sigmas)
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)


def test_from_a_dpm_solver_flow_config():
    sana = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    ours = GHVBScheduler.from_config(sana.config)
    assert ours.config.noise_process == "flow" and ours.config.shift == 3.0
    assert ours.config.prediction_type == "flow_prediction"


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_flow_config_round_trips(cls, tmp_path):
    ours = cls.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False).config)
    ours.save_pretrained(tmp_path)
    again = cls.from_pretrained(tmp_path)
    assert again.config.noise_process == "flow" and again.config.shift == 3.0
    back = FlowMatchEulerDiscreteScheduler.from_config(again.config)
    assert back.config.shift == 3.0
    again.set_timesteps(5)
    back.set_timesteps(5)
    assert torch.equal(again.sigmas, back.sigmas)
    vp = cls.from_config(DDPMScheduler(beta_schedule="scaled_linear").config)
    assert vp.config.noise_process == "vp" and vp.config.prediction_type == "epsilon"


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_pipeline_contract_on_flow(cls):
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = cls.from_config(ref.config)
    for s in (ref, ours):
        s.set_timesteps(10)
        s.set_begin_index(4)
    x0, noise = start(), torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = ours.timesteps[4:5].repeat(2)
    assert torch.allclose(ours.scale_noise(x0, t, noise), ref.scale_noise(x0, t, noise), atol=1e-7)
    assert ours.order == 1 and ours.init_noise_sigma == 1.0 and ours.timesteps.numel() == 10
    assert not hasattr(ours, "betas")  # a flow process has no betas (FlowMatchEulerDiscreteScheduler has none)
    with pytest.raises(ValueError, match="mu must be given"):
        cls.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config).set_timesteps(4)


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_betas_and_alphas_on_vp(cls):
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = cls.from_config(ref.config)
    assert torch.allclose(ours.betas, ref.betas, rtol=1e-5, atol=1e-9)
    assert torch.allclose(ours.alphas, ref.alphas, rtol=1e-6)


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_keys_of_the_other_family_are_refused(cls):
    with pytest.raises(ValueError, match="shift"):
        cls(shift=3.0)  # a VP scheduler (noise_process='vp') with a flow shift
    with pytest.raises(ValueError, match="beta_start"):
        cls(noise_process="flow", beta_start=0.001)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        cls(use_karras_sigmas=True)
    with pytest.raises(ValueError, match="v_prediction"):
        cls(noise_process="flow", prediction_type="v_prediction")
    with pytest.raises(ValueError, match="noise_process"):
        cls(noise_process="edm")
    sched = cls.from_config(DDPMScheduler().config)
    with pytest.raises(ValueError, match="flow-matching option"):
        sched.set_timesteps(4, sigmas=[0.9, 0.6, 0.3, 0.1])
    with pytest.raises(ValueError, match="scale_noise"):
        sched.set_timesteps(4)
        sched.scale_noise(start(), torch.tensor([999]), start())


def test_make_scheduler_keeps_the_noise_process():
    from diffusers import DDIMScheduler, UniPCMultistepScheduler

    from steerdiff.samplers import make_scheduler

    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    dpm = make_scheduler("dpmpp_2m", flow)
    assert dpm.config.use_flow_sigmas and dpm.config.flow_shift == 3.0 and dpm.config.prediction_type == "flow_prediction"
    assert isinstance(make_scheduler("unipc", flow.config), UniPCMultistepScheduler)
    assert make_scheduler("ghvb", flow).config.noise_process == "flow"
    with pytest.raises(ValueError, match="DDIMScheduler integrates VP schedules only"):
        make_scheduler("ddim", flow)
    with pytest.raises(ValueError, match="flow-matching scheduler"):
        make_scheduler("FlowMatchEulerDiscreteScheduler", DDIMScheduler())
    vp = make_scheduler("dpmpp_2m", DDPMScheduler(beta_schedule="scaled_linear"))
    assert not vp.config.use_flow_sigmas and vp.config.prediction_type == "epsilon"
