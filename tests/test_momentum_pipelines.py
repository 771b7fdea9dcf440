"""The momentum schedulers inside real pipelines: tiny random Stable Diffusion 1.5 and SDXL (built offline, as
diffusers' tests build them) and ClassConditionalPipeline.  Each runs, repeats itself exactly, makes one network
call per step, and a batch of 4 equals 4 single calls.  The pipelines run in float64, so that "equal" can mean
1e-9: in float32 the networks' own batch-size-dependent rounding (~1e-6 relative) would hide a small leak of state
between samples."""

import pytest
import torch
from tiny_pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline

from steerdiff.samplers import GHVBScheduler, HeavyBallDPMSolverScheduler, HeavyBallPLMSScheduler

MOMENTUM = [
    (HeavyBallPLMSScheduler, dict(order=4, beta=0.8)),
    (HeavyBallDPMSolverScheduler, dict(beta=0.8)),
    (GHVBScheduler, dict(momentum_number=3.8)),
]
IDS = ["plms4_hb0.8", "dpmpp_2m_hb0.8", "ghvb3.8"]
PROMPTS = ["a red square", "two dogs", "a house by the sea", "night sky"]
STEPS = 3


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def count_calls(module):
    calls = []
    hook = module.register_forward_hook(lambda m, args, out: calls.append(1))
    return calls, hook


def check_pipeline(pipe, call):
    """Runs; repeats exactly; one network call per step; a batch of 4 equals 4 single calls."""
    calls, hook = count_calls(pipe.unet)
    first = call(pipe, PROMPTS, gens(range(4)))
    hook.remove()
    assert len(calls) == STEPS  # classifier-free guidance batches both branches into one call per step
    assert torch.isfinite(first).all() and first.shape[0] == 4
    assert torch.equal(call(pipe, PROMPTS, gens(range(4))), first)
    for i, prompt in enumerate(PROMPTS):
        single = call(pipe, [prompt], gens([i]))
        assert torch.allclose(single, first[i : i + 1], rtol=1e-9, atol=1e-9), (i, (single - first[i : i + 1]).abs().max())


def sd_call(pipe, prompts, generator):
    return pipe(prompts, num_inference_steps=STEPS, guidance_scale=5.0, generator=generator, output_type="latent").images


@pytest.fixture(scope="module")
def sd_pipe():
    """The tiny SD 1.5 pipeline in float64, and the PNDM scheduler it ships with."""
    pipe = tiny_sd_pipeline().to(torch.float64)
    return pipe, pipe.scheduler


@pytest.fixture(scope="module")
def sdxl_pipe():
    """The tiny SDXL pipeline in float64, and the Euler scheduler it ships with."""
    pipe = tiny_sdxl_pipeline().to(torch.float64)
    return pipe, pipe.scheduler


@pytest.mark.parametrize("cls,kwargs", MOMENTUM, ids=IDS)
def test_stable_diffusion_pipeline(sd_pipe, cls, kwargs):
    pipe, pndm = sd_pipe
    pipe.scheduler = cls.from_config(pndm.config, **kwargs)
    assert torch.equal(pipe.scheduler.alphas_cumprod, pndm.alphas_cumprod)
    assert pipe.scheduler.config.prediction_type == pndm.config.prediction_type
    check_pipeline(pipe, sd_call)


@pytest.mark.parametrize("cls,kwargs", MOMENTUM, ids=IDS)
def test_stable_diffusion_xl_pipeline(sdxl_pipe, cls, kwargs):
    pipe, euler = sdxl_pipe
    pipe.scheduler = cls.from_config(euler.config, **kwargs)
    assert pipe.scheduler.config.timestep_spacing == "leading"  # from the SDXL Euler config
    check_pipeline(pipe, sd_call)


@pytest.mark.parametrize("cls,kwargs", MOMENTUM, ids=IDS)
def test_class_conditional_pipeline(tiny_pipe, cls, kwargs):
    tiny_pipe.to(dtype=torch.float64)
    tiny_pipe.scheduler = cls.from_config(tiny_pipe.scheduler.config, **kwargs)

    def call(pipe, labels, generator):
        labels = [PROMPTS.index(p) % 3 for p in labels]
        return pipe(labels, STEPS, guidance_scale=5.0, generator=generator, output_type="latent").images

    check_pipeline(tiny_pipe, call)
