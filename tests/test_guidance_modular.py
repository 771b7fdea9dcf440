"""RuleGuider: steerdiff rules as guiders of diffusers' modular SDXL pipeline."""

import numpy as np
import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import StableDiffusionXLAutoBlocks
from tiny_pipelines import tiny_sdxl_pipeline

from steerdiff.guidance import APG, CFG, GuidanceInterval
from steerdiff.guidance.modular import RuleGuider
from steerdiff.pipelines import guide

KWARGS = dict(prompt="a red cat", num_inference_steps=3, height=32, width=32, output_type="np")


@pytest.fixture(scope="module")
def pipes():
    classic = tiny_sdxl_pipeline()
    modular = StableDiffusionXLAutoBlocks().init_pipeline()
    modular.update_components(**{k: v for k, v in classic.components.items() if v is not None})
    modular.set_progress_bar_config(disable=True)
    return classic, modular


def run_modular(modular, guider):
    modular.update_components(guider=guider)
    calls = []
    handle = modular.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        images = modular(**KWARGS, generator=torch.Generator().manual_seed(0), output="images")
    finally:
        handle.remove()
    return np.asarray(images), calls


def test_rule_guider_cfg_equals_diffusers_cfg_guider(pipes):
    classic, modular = pipes
    own, own_calls = run_modular(modular, ClassifierFreeGuidance(guidance_scale=5.0))
    ours, our_calls = run_modular(modular, RuleGuider(CFG(5.0), scheduler=modular.scheduler))
    assert (ours == own).all() and our_calls == own_calls == [1, 1] * 3


def test_rule_guider_matches_the_hook_and_skips_the_unconditional_batch(pipes):
    classic, modular = pipes
    classic.scheduler.set_timesteps(3)
    sigmas = classic.scheduler.sigmas[:3].tolist()
    rule = lambda: GuidanceInterval(APG(6.0, norm_threshold=2.0), sigma_low=sigmas[2] * 1.01, sigma_high=sigmas[1] * 1.01)
    with guide(classic, rule()):
        expected = classic(**KWARGS, guidance_scale=2.0, generator=torch.Generator().manual_seed(0)).images
    images, calls = run_modular(modular, RuleGuider(rule(), scheduler=modular.scheduler))
    assert calls == [1, 1, 1, 1]  # conditional only at steps 0 and 2, both batches at step 1
    assert np.allclose(images, expected, atol=1e-5)
    again, _ = run_modular(modular, RuleGuider(rule(), scheduler=modular.scheduler).new())
    assert np.array_equal(again, images)  # state reset at step 0; new() copies the rule


def test_rule_guider_refusals():
    with pytest.raises(TypeError, match="rule must be a steerdiff GuidanceRule"):
        RuleGuider("cfg", scheduler={"num_train_timesteps": 1000})
    with pytest.raises(ValueError, match="needs the pipeline's scheduler"):
        RuleGuider(CFG(3.0), scheduler=None)
    guider = RuleGuider(CFG(3.0), scheduler={"num_train_timesteps": 1000})
    guider.set_state(0, 3, torch.tensor(999))
    with pytest.raises(RuntimeError, match="did not see the denoiser's input"):
        guider.forward(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8))
