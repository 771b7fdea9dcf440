"""The momentum schedulers inside tiny StableDiffusion3, Flux, Wan, Qwen-Image and Sana pipelines (built offline from
diffusers' test configs): order 1 with beta 1 reproduces the pipeline's own FlowMatchEulerDiscreteScheduler, and every
momentum sampler runs there with the grid the pipeline asks for (SD3's shift, Flux's sigmas and mu, ...)."""

import pytest
import torch
from tiny_flow_pipelines import FLOW_PIPELINES, flow_pipeline_call

from steerdiff.samplers import GHVBScheduler, HeavyBallDPMSolverScheduler, HeavyBallPLMSScheduler

pytestmark = pytest.mark.usefixtures("one_thread")
_built: dict = {}


def pipeline(name):
    if name not in _built:
        pipe = FLOW_PIPELINES[name]()
        pipe.set_progress_bar_config(disable=True)
        _built[name] = (pipe, pipe.scheduler)
    pipe, original = _built[name]
    pipe.scheduler = original
    return pipe


@pytest.mark.parametrize("name", list(FLOW_PIPELINES))
def test_momentum_schedulers_run_inside_flow_pipelines(name):
    pipe = pipeline(name)
    original = pipe.scheduler
    reference = pipe(**flow_pipeline_call(name))[0]
    for make in (lambda c: GHVBScheduler.from_config(c, momentum_number=1.0),
                 lambda c: HeavyBallPLMSScheduler.from_config(c, order=1, beta=1.0)):
        pipe.scheduler = make(original.config)
        assert pipe.scheduler.config.noise_process == "flow"
        got = pipe(**flow_pipeline_call(name))[0]
        # float32 in both; the steps round differently (x + ds v there, x / alpha coordinates here)
        scale = max(1.0, float(reference.abs().max()))
        assert float((got - reference).abs().max()) <= 1e-6 * scale * 10, float((got - reference).abs().max())
    outputs = []
    for make in (lambda c: HeavyBallPLMSScheduler.from_config(c, order=4, beta=0.8),
                 lambda c: HeavyBallDPMSolverScheduler.from_config(c, beta=0.8),
                 lambda c: GHVBScheduler.from_config(c, momentum_number=3.8)):
        pipe.scheduler = make(original.config)
        out = pipe(**flow_pipeline_call(name))[0]
        assert out.shape == reference.shape and torch.isfinite(out).all()
        assert torch.equal(out, pipe(**flow_pipeline_call(name))[0])  # deterministic, state reset per call
        outputs.append(out)
    assert not torch.allclose(outputs[0], reference, atol=1e-4)  # the multistep solvers really differ from Euler
    pipe.scheduler = original
