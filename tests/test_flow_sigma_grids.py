"""A DPM-Solver / UniPC / DEIS / SA-Solver config with ``use_flow_sigmas=True`` (Sana's, Wan's) keeps its own grid in
steerdiff's schedulers: timesteps equal to diffusers', sigmas equal (UniPC's first one excepted: steerdiff keeps
s = 1 where diffusers moves it to 1 - 1e-6), for every flow config family; and the samples of HB-DPM at beta = 1
from Sana's config are diffusers' DPM-Solver++ 2M's."""

import numpy as np
import pytest
import torch
from diffusers import (
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SASolverScheduler,
    UniPCMultistepScheduler,
)

from steerdiff.core.flow import FlowMatchSchedule, flow_grid_of_config
from steerdiff.core.process import noise_process_from_config
from steerdiff.samplers import GHVBScheduler, HeavyBallDPMSolverScheduler, HeavyBallPLMSScheduler, HeavyBallUniPCScheduler

OURS = [HeavyBallPLMSScheduler, HeavyBallDPMSolverScheduler, GHVBScheduler, HeavyBallUniPCScheduler]
FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")

# (diffusers class, its config, set_timesteps keywords for N steps)
FAMILIES = [
    (DPMSolverMultistepScheduler, dict(flow_shift=3.0), lambda n: dict(num_inference_steps=n)),  # Sana
    (DPMSolverMultistepScheduler, dict(flow_shift=3.0, use_dynamic_shifting=True), lambda n: dict(num_inference_steps=n, mu=0.7)),
    (DPMSolverMultistepScheduler, dict(flow_shift=3.0, use_dynamic_shifting=True), lambda n: dict(num_inference_steps=n)),
    (DPMSolverSinglestepScheduler, dict(flow_shift=5.0), lambda n: dict(num_inference_steps=n)),
    (DEISMultistepScheduler, dict(flow_shift=2.0), lambda n: dict(num_inference_steps=n)),
    (SASolverScheduler, dict(flow_shift=2.0), lambda n: dict(num_inference_steps=n)),
    (UniPCMultistepScheduler, dict(flow_shift=3.0), lambda n: dict(num_inference_steps=n)),  # Wan 480p
    (UniPCMultistepScheduler, dict(flow_shift=5.0), lambda n: dict(num_inference_steps=n)),  # Wan 720p
    (UniPCMultistepScheduler, dict(flow_shift=1.0), lambda n: dict(sigmas=np.linspace(1.0, 1 / n, n))),
    (UniPCMultistepScheduler, dict(use_dynamic_shifting=True), lambda n: dict(num_inference_steps=n, mu=0.9)),
    (UniPCMultistepScheduler, dict(use_dynamic_shifting=True, time_shift_type="linear"), lambda n: dict(num_inference_steps=n, mu=0.9)),
    (UniPCMultistepScheduler, dict(flow_shift=3.0, shift_terminal=0.1), lambda n: dict(num_inference_steps=n)),
]
IDS = [f"{cls.__name__[:-9]}-{'-'.join(f'{k}={v}' for k, v in cfg.items())}-{sorted(call(1))}" for cls, cfg, call in FAMILIES]


def same_grid(ours, ref, unipc: bool):
    assert ours.timesteps.dtype == ref.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, ref.timesteps), (ours.timesteps, ref.timesteps)
    first = 1 if unipc else 0  # UniPC: diffusers' 1 - 1e-6 start, steerdiff's exact s = 1 (compared below)
    assert torch.equal(ours.sigmas[first:-1], ref.sigmas[first:-1]), (ours.sigmas, ref.sigmas)
    if unipc:
        assert abs(float(ours.sigmas[0]) - float(ref.sigmas[0])) <= 1.1e-6
    assert float(ours.sigmas[-1]) == 0.0


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
@pytest.mark.parametrize("cls", OURS)
def test_a_use_flow_sigmas_config_keeps_its_grid(family, cls):
    ref_cls, config, call = family
    ref = ref_cls(**FLOW, **config)
    expected = "unipc" if ref_cls is UniPCMultistepScheduler else "dpm_solver"
    for source in (ref.config, ref, {**ref.config, "_class_name": ref_cls.__name__}):
        assert flow_grid_of_config(source) == expected
    ours = cls.from_config(ref.config)
    assert ours.config.noise_process == "flow" and ours.config.flow_grid == expected
    for n in (4, 8, 25):
        ref.set_timesteps(**call(n))
        ours.set_timesteps(**call(n))
        same_grid(ours, ref, ref_cls is UniPCMultistepScheduler)


def test_the_issue_example_sanas_grid_and_samples():
    """flow_shift = 3, N = 8: diffusers' last nonzero sigma is 0.30 (FlowMatchEuler's grid would end at 0.009), and HB on
    DPM-Solver++ 2M at beta = 1 from Sana's config samples what diffusers' DPM-Solver++ 2M does."""
    ref = DPMSolverMultistepScheduler(**FLOW, flow_shift=3.0, solver_order=2)
    ours = HeavyBallDPMSolverScheduler.from_config(ref.config, beta=1.0)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    samples = []
    for sched in (ref, ours):
        sched.set_timesteps(8)
        y = x.clone()
        for t in sched.timesteps:
            v = 0.4 * y + torch.sin(1.7 * y) * (t.double() / 1000) - 0.2
            y = sched.step(v, t, y).prev_sample
        samples.append(y)
    assert abs(float(ours.sigmas[-2]) - 0.30) < 0.01
    assert torch.allclose(samples[1], samples[0], rtol=0, atol=1e-6)


def test_the_grid_round_trips_and_reaches_the_process(tmp_path):
    wan = UniPCMultistepScheduler(**FLOW, flow_shift=5.0)
    ours = HeavyBallUniPCScheduler.from_config(wan.config)
    ours.save_pretrained(tmp_path)
    again = HeavyBallUniPCScheduler.from_pretrained(tmp_path)
    assert again.config.flow_grid == "unipc" and again.config.shift == 5.0
    assert GHVBScheduler.from_config(again.config).config.flow_grid == "unipc"  # steerdiff's own key, no class needed
    wan.save_pretrained(tmp_path / "wan")
    loaded = UniPCMultistepScheduler.from_pretrained(tmp_path / "wan")
    assert loaded.config["_class_name"] == "UniPCMultistepScheduler"
    assert noise_process_from_config(loaded.config).flow_grid == "unipc"
    assert noise_process_from_config(FlowMatchEulerDiscreteScheduler(shift=3.0)).flow_grid == "flow_match"


def test_grids_that_cannot_be_followed_are_errors():
    with pytest.raises(ValueError, match="use_flow_sigmas=True but its class is 'EulerDiscreteScheduler'"):
        flow_grid_of_config({"_class_name": "EulerDiscreteScheduler", "use_flow_sigmas": True})
    with pytest.raises(ValueError, match="class is None"):
        flow_grid_of_config({"use_flow_sigmas": True, "flow_shift": 3.0})  # no class, no family key
    with pytest.raises(ValueError, match="flow_grid must be one of"):
        HeavyBallDPMSolverScheduler(noise_process="flow", flow_grid="sana")
    with pytest.raises(ValueError, match="flow_grid"):
        HeavyBallDPMSolverScheduler(flow_grid="unipc")  # a VP scheduler with a flow key
    sana = HeavyBallDPMSolverScheduler.from_config(DPMSolverMultistepScheduler(**FLOW, flow_shift=3.0).config)
    with pytest.raises(ValueError, match="sigmas= and timesteps= are not part of DPM-Solver's flow grid"):
        sana.set_timesteps(sigmas=[1.0, 0.5, 0.2])
    with pytest.raises(ValueError, match="mu= needs use_dynamic_shifting=True"):
        sana.set_timesteps(4, mu=0.5)
    with pytest.raises(ValueError, match="mu must be a finite number"):
        sana.set_timesteps(4, mu=float("nan"))
    with pytest.raises(ValueError, match="give num_inference_steps"):
        FlowMatchSchedule(flow_grid="dpm_solver").inference_sigmas()
    wan = HeavyBallUniPCScheduler.from_config(UniPCMultistepScheduler(**FLOW, flow_shift=3.0).config)
    with pytest.raises(ValueError, match="timesteps= is not part of UniPC's flow grid"):
        wan.set_timesteps(timesteps=[900, 500, 100])
    with pytest.raises(ValueError, match="does not combine"):
        FlowMatchSchedule(flow_grid="unipc", sigma_spacing="karras")
    with pytest.raises(ValueError, match="shift_terminal applies"):
        FlowMatchSchedule(flow_grid="dpm_solver", shift_terminal=0.1)
