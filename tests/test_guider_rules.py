"""The rules of diffusers' guiders, in diffusers' modular SDXL pipeline through RuleGuider, against diffusers' own
guider of the same name at matched conventions; where diffusers deviates from the paper (APG-Mix on the raw
output, SEG, MAMBO-G on image latents, SLG on SD3's blocks), against a reference written from the paper."""

import math

import numpy as np
import pytest
import torch
from diffusers.guiders import (
    ClassifierFreeGuidance,
    FrequencyDecoupledGuidance,
    PerturbedAttentionGuidance,
    SmoothedEnergyGuidance,
    TangentialClassifierFreeGuidance,
)
from diffusers.guiders.magnitude_aware_guidance import mambo_guidance
from diffusers.hooks import LayerSkipConfig
from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceConfig
from test_guidance_modular import pipes  # noqa: F401  (the modular SDXL pipeline fixture)

from steerdiff.core import GuidanceState, NoiseSchedule
from steerdiff.guidance import APG, FDG, PAG, SEG, TCFG, APGMix, AutoGuidance, MagnitudeAwareGuidance, get_rule
from steerdiff.guidance.fdg import from_pyramid, laplacian_pyramid
from steerdiff.pipelines import guide
from steerdiff.pipelines.modular import RuleGuider

pytestmark = pytest.mark.usefixtures("one_thread")
KWARGS = dict(prompt="a red cat", num_inference_steps=4, height=32, width=32)


def make_state(batch, shape, step=0, t=500):
    sample = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(99))
    return GuidanceState(NoiseSchedule.from_config({"num_train_timesteps": 1000}), torch.tensor(t), sample, "epsilon", step)


def run(modular, guider):
    modular.update_components(guider=guider)
    rows = []
    handle = modular.unet.conv_in.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    try:
        latents = modular(**KWARGS, generator=torch.Generator().manual_seed(0), output="latents")
    finally:
        handle.remove()
    return latents, rows


def close(a, b, rel):
    return float((a - b).abs().max()) <= rel * max(1.0, float(b.abs().max()))


def test_tcfg_equals_diffusers_tangential_guider(pipes):
    _, modular = pipes
    own, own_rows = run(modular, TangentialClassifierFreeGuidance(guidance_scale=5.0))
    ours, rows = run(modular, RuleGuider(TCFG(5.0), scheduler=modular.scheduler))
    assert rows == own_rows == [1, 1] * 4
    assert close(ours, own, 1e-5)  # diffusers takes a float32 SVD, this rule a float64 Gram eigenproblem
    cfg, _ = run(modular, ClassifierFreeGuidance(guidance_scale=5.0))
    assert not close(ours, cfg, 1e-3)


def test_fdg_equals_diffusers_frequency_decoupled_guider(pipes):
    # diffusers builds its FDG pyramid with kornia (in the test extra)
    _, modular = pipes
    own, _ = run(modular, FrequencyDecoupledGuidance(guidance_scales=[6.0, 3.0]))
    ours, _ = run(modular, RuleGuider(FDG([6.0, 3.0]), scheduler=modular.scheduler))
    assert torch.equal(ours, own)


def test_fdg_pyramid_is_exact_and_equal_scales_are_cfg():
    x = torch.randn(2, 3, 16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(from_pyramid(laplacian_pyramid(x, 3)), x, atol=1e-12)
    c, u = torch.randn(2, 2, 3, 16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    state = make_state(batch=2, shape=(3, 16, 12))
    assert torch.allclose(FDG([4.0, 4.0, 4.0])(c, u, state), u + 4.0 * (c - u), atol=1e-12)
    with pytest.raises(ValueError, match="FDG with 4 levels needs H and W divisible by 8"):
        FDG([4.0, 3.0, 2.0, 1.0])(c, u, state)


def test_pag_in_a_modular_pipeline_equals_diffusers_pag_guider(pipes):
    """diffusers' guider perturbs with its attention-score skip hook on the blocks it is given; PAG on the same
    self-attention layers (its window int(N start) < i < int(N stop) agrees with SD3's rule here)."""
    _, modular = pipes
    config = LayerSkipConfig(indices=[0], fqn="mid_block.attentions.0.transformer_blocks", skip_attention=False,
                             skip_attention_scores=True, skip_ff=False)
    own, own_rows = run(modular, PerturbedAttentionGuidance(
        guidance_scale=5.0, perturbed_guidance_scale=3.0, perturbed_guidance_start=0.01, perturbed_guidance_stop=1.0,
        perturbed_guidance_config=config))
    ours, rows = run(modular, RuleGuider(PAG(5.0, 3.0, layers=["mid"], start=0.01, stop=1.0), scheduler=modular.scheduler))
    assert rows == own_rows == [1, 1] + [1, 1, 1] * 3  # no perturbed batch at step 0 (4 * 0.01 < i)
    assert torch.equal(ours, own)


def test_pag_under_the_hook_equals_pag_in_the_modular_pipeline(pipes):
    classic, modular = pipes
    with guide(classic, PAG(5.0, 3.0, layers=["mid"])):
        hooked = classic(**KWARGS, guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="latent").images
    ours, _ = run(modular, RuleGuider(PAG(5.0, 3.0, layers=["mid"]), scheduler=modular.scheduler))
    assert close(ours, hooked, 1e-5)  # one [u; c; p] call under the hook, three calls in the modular loop


def test_seg_in_a_modular_pipeline_and_diffusers_seg_guider(pipes):
    """diffusers' SmoothedEnergyGuidance never blurs anything: its prepare_models does not count the batches it
    prepares, so the hook it applies to the third batch is never registered and its output is plain CFG (and its
    _gaussian_blur_2d takes the mean for finite sigma and blurs for infinite sigma, the reverse of the paper's code).
    SEG here changes the result, and is a reference written from the paper's code (test_perturbation_guidance)."""
    _, modular = pipes
    theirs, their_rows = run(modular, SmoothedEnergyGuidance(
        guidance_scale=5.0, seg_guidance_scale=3.0, seg_blur_sigma=2.0, seg_guidance_start=0.01, seg_guidance_stop=1.0,
        seg_guidance_config=SmoothedEnergyGuidanceConfig(indices=[0], fqn="mid_block.attentions.0.transformer_blocks")))
    cfg, _ = run(modular, ClassifierFreeGuidance(guidance_scale=5.0))
    assert torch.equal(theirs, cfg) and their_rows == [1, 1] + [1, 1, 1] * 3  # the third batch ran, unperturbed
    ours, rows = run(modular, RuleGuider(SEG(5.0, 3.0, layers=["mid"], blur_sigma=2.0, start=0.01, stop=1.0),
                                         scheduler=modular.scheduler))
    assert rows == their_rows and not close(ours, cfg, 1e-4)


def test_magnitude_aware_guidance_is_diffusers_mambo_formula():
    """diffusers' MagnitudeAwareGuidance crashes on image latents with torch 2.13 (torch.norm over three dims), so
    the reference is its own mambo_guidance function on flattened predictions."""
    c, u = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    state = make_state(batch=3, shape=(4, 8, 8))
    ours = MagnitudeAwareGuidance(6.0, alpha=3.0)(c, u, state)
    reference = mambo_guidance(c.flatten(1), u.flatten(1), 6.0, 3.0).reshape(c.shape)
    assert close(ours, reference, 1e-5)
    # the paper's formula: w' = 1 + (w - 1) exp(-alpha |c - u| / |u|)
    r = (c - u).flatten(1).norm(dim=1) / u.flatten(1).norm(dim=1)
    w = (1 + 5.0 * torch.exp(-3.0 * r)).reshape(-1, 1, 1, 1)
    assert close(ours, u + w * (c - u), 1e-6)


def test_apg_mix_is_cfg_then_the_papers_apg_with_a_warm_momentum_buffer():
    """HunyuanImage 2.1's mix written out: CFG for evaluations 0..start_step (APG's momentum buffer accumulating
    D_c - D_u meanwhile), then APG on D (the paper's, not diffusers' raw-output variant)."""
    rule = APGMix(scale=3.0, apg_scale=6.0, momentum=-0.5, norm_threshold=2.0, eta=0.0, start_step=1)
    reference_apg = APG(6.0, eta=0.0, norm_threshold=2.0, momentum=-0.5)
    rule.reset()
    for step in range(4):
        state = make_state(batch=2, shape=(1, 4, 4), step=step, t=900 - 200 * step)
        c, u = torch.randn(2, 2, 1, 4, 4, generator=torch.Generator().manual_seed(step))
        got = rule(c, u, state)
        if step <= 1:
            assert close(got, u + 3.0 * (c - u), 1e-6)
            x = state.sample.double()
            a = state.alpha.reshape(-1, 1, 1, 1)
            s = state.sigma.reshape(-1, 1, 1, 1)
            delta = ((x - s * c.double()) / a) - ((x - s * u.double()) / a)  # D_c - D_u
            reference_apg._momentum(delta, state)
        else:
            assert close(got, reference_apg(c, u, state), 1e-6)


def test_autoguidance_in_a_modular_pipeline_calls_the_weak_network(pipes):
    classic, modular = pipes
    weak = type(classic.unet).from_config(classic.unet.config)
    torch.manual_seed(3)
    weak = weak.eval()
    calls = []
    handle = weak.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        ours, rows = run(modular, RuleGuider(AutoGuidance(2.0, weak), scheduler=modular.scheduler))
    finally:
        handle.remove()
    assert calls == [1] * 4 and rows == [1] * 4  # the main unet runs the conditional batch only; the weak one D_1
    assert "forward" not in modular.unet.__dict__  # the weak network stood in for one batch, then left
    with guide(classic, AutoGuidance(2.0, weak)):
        hooked = classic(**KWARGS, guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert close(ours, hooked, 1e-5)


def test_every_rule_is_reachable_by_name():
    assert isinstance(get_rule("pag", scale=4, pag_scale=2, layers=["mid"]), PAG)
    assert isinstance(get_rule("seg", scale=4, seg_scale=2, blur_sigma=10), SEG)
    assert repr(get_rule("slg", scale=4, slg_scale={"schedule": "cosine", "w0": 3}, layers=[7, 8, 9])).startswith(
        "SLG(scale=4.0, slg_scale=Cosine(w0=3), layers=[7, 8, 9], start=0.01, stop=0.2")
    assert isinstance(get_rule("tcfg", scale=5), TCFG)
    assert repr(get_rule("fdg", scales=[10, {"schedule": "linear", "w0": 5}])) == "FDG(scales=[10.0, Linear(w0=5)])"
    assert isinstance(get_rule("mambo_g", scale=10, alpha=8), MagnitudeAwareGuidance)
    assert isinstance(get_rule("apg_mix", scale=3.5, apg_scale=10), APGMix)
    interval = get_rule("interval", rule={"name": "pag", "scale": 3, "pag_scale": 2}, sigma_high=5.0)
    assert set(interval.perturbations) == {"pag"}
    with pytest.raises(ValueError, match=r"rule 'pag' has no option\(s\) \['pag_sclae'\]"):
        get_rule("pag", pag_sclae=2)
    with pytest.raises(ValueError, match="AutoGuidance needs weak_model"):
        get_rule("autoguidance", scale=2)
    assert math.isinf(get_rule("seg").perturbation.sigma) and np.isclose(get_rule("seg").perturbed_scale, 3.0)
