"""RuleGuider in diffusers' modular SD3, Wan and Qwen-Image pipelines (built tiny from diffusers' test configs; the
text-encoder block is dropped and prompt embeddings are given): CFG equals diffusers' ClassifierFreeGuidance, and
APG is the paper's rule on x0 = x - s v with the flow noise level read from the scheduler config."""

import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines.flux.modular_blocks_flux import FluxAutoBlocks
from diffusers.modular_pipelines.qwenimage.modular_blocks_qwenimage import QwenImageAutoBlocks
from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import StableDiffusion3AutoBlocks
from diffusers.modular_pipelines.wan.modular_blocks_wan import WanBlocks
from test_guide_pipelines import Recorder, reference_apg
from tiny_flow_pipelines import flow_pipeline_call, tiny_flux, tiny_qwen_image, tiny_sd3, tiny_wan

from steerdiff.guidance import APG, CFG, RuleGuider

pytestmark = pytest.mark.usefixtures("one_thread")
MODULAR = {"sd3": (tiny_sd3, StableDiffusion3AutoBlocks), "wan": (tiny_wan, WanBlocks),
           "qwen_image": (tiny_qwen_image, QwenImageAutoBlocks)}
# Flux's modular blocks (diffusers 0.42) take no negative prompt: no unconditional branch runs there, with diffusers'
# guider or ours (3 transformer calls for 3 steps at guidance 4); the CFG test covers that it stays so
MODULAR_CFG = {**MODULAR, "flux": (tiny_flux, FluxAutoBlocks)}
_built: dict = {}


def modular(name):
    if name not in _built:
        build, blocks = MODULAR_CFG[name]
        b = blocks()
        b.sub_blocks.pop("text_encoder", None)  # prompt embeddings are given
        classic = build()
        pipe = b.init_pipeline()
        pipe.update_components(**{k: v for k, v in classic.components.items() if v is not None})
        pipe.set_progress_bar_config(disable=True)
        _built[name] = pipe
    return _built[name]


def run(name, guider):
    pipe = modular(name)
    pipe.update_components(guider=guider)
    kwargs = flow_pipeline_call(name, steps=3)
    for key in ("generator", "output_type", "true_cfg_scale", "guidance_scale") + (
        ("negative_prompt_embeds", "negative_pooled_prompt_embeds") if name == "flux" else ()
    ):
        kwargs.pop(key, None)
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0), output="latents")


@pytest.mark.parametrize("name", list(MODULAR_CFG))
def test_rule_guider_cfg_equals_diffusers_guider(name):
    own = run(name, ClassifierFreeGuidance(guidance_scale=4.0))
    ours = run(name, RuleGuider(CFG(4.0), scheduler=modular(name).scheduler))
    assert float((ours - own).abs().max()) <= 1e-5 * max(1.0, float(own.abs().max()))


@pytest.mark.parametrize("name", list(MODULAR))
def test_rule_guider_apg_is_the_x0_rule_on_flow(name):
    recorder = Recorder(APG(4.0, eta=0.0, norm_threshold=0.5, momentum=0.0))
    guider = RuleGuider(recorder, scheduler=modular(name).scheduler)
    assert guider.process.kind == "flow" and guider.prediction_type == "flow_prediction"
    run(name, guider)
    assert len(recorder.records) == 3
    sigmas = modular(name).scheduler.sigmas
    for i, (c, u, x, alpha, sigma, kind, out) in enumerate(recorder.records):
        assert kind == "flow_prediction" and torch.allclose(alpha + sigma, torch.ones_like(alpha))
        assert torch.allclose(sigma, torch.full_like(sigma, float(sigmas[i])), atol=1e-6)  # s = t / T of this step
        ref = reference_apg(c, u, x, alpha, sigma, kind, 4.0, 0.5)
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max())))
