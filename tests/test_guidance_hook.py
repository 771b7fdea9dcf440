"""guide(pipe, rule): same images as the pipelines' own CFG, real savings when a rule skips the unconditional
branch (network calls counted), per-call reset, reversibility and clear errors."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, EulerDiscreteScheduler, UNet2DModel
from reference_rules import EvaluateAll
from tiny_pipelines import tiny_dit_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

from steerdiff.core import NoiseSchedule
from steerdiff.guidance import (
    APG,
    CFG,
    AdaptiveGuidance,
    CFGRescale,
    GuidanceInterval,
    GuidanceRule,
    GuidanceState,
    cosine_similarity,
)
from steerdiff.pipelines import guide


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def gens(*seeds):
    return [gen(s) for s in seeds]


def dit_pipeline():
    pipe = tiny_dit_pipeline()
    pipe.transformer.eval()  # train mode drops class labels at random
    return pipe


PIPELINES = {
    "sd": (tiny_sd_pipeline, lambda: dict(prompt=["a cat", "a red dog"], num_inference_steps=3, output_type="np")),
    "sdxl": (tiny_sdxl_pipeline, lambda: dict(prompt=["a cat"], num_inference_steps=3, height=32, width=32, output_type="np")),
    "dit": (dit_pipeline, lambda: dict(class_labels=[3, 999], num_inference_steps=3, output_type="np")),
}


def call(pipe, kwargs, scale, seed=0):
    return pipe(**kwargs, guidance_scale=scale, generator=gen(seed))


def network_counter(pipe):
    """Counts the samples that really go through the network (a hook on its first layer)."""
    first = pipe.transformer.pos_embed if hasattr(pipe, "transformer") else pipe.unet.conv_in
    counts = []
    handle = first.register_forward_hook(lambda module, args, out: counts.append(args[0].shape[0]))
    return counts, handle


@pytest.mark.parametrize("name", list(PIPELINES))
def test_cfg_through_the_hook_gives_the_pipelines_own_images(name):
    build, kwargs = PIPELINES[name]
    pipe = build()
    own = call(pipe, kwargs(), 5.0).images
    with guide(pipe, CFG(5.0)) as hook:
        guided = call(pipe, kwargs(), 2.0).images  # the pipeline's own scale is not used
    assert guided.shape == own.shape and (guided == own).all()
    assert hook.network_calls >= 3 and hook.network_evaluations == 2 * hook.network_calls * (guided.shape[0])


def test_cfg_through_the_hook_on_the_class_conditional_pipeline(tiny_pipe):
    own = tiny_pipe([0, 1, 2], 4, guidance_scale=3.0, generator=gens(0, 1, 2), output_type="latent").images
    with guide(tiny_pipe, CFG(3.0)):
        guided = tiny_pipe([0, 1, 2], 4, guidance_scale=7.0, generator=gens(0, 1, 2), output_type="latent").images
    assert torch.equal(own, guided)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_skipped_unconditional_rows_really_do_not_run(name):
    """GuidanceInterval over the middle step only: the other steps run the conditional half only, with every
    batched argument sliced (prompt embeddings, SDXL's added conditions, DiT's labels and timesteps)."""
    build, kwargs = PIPELINES[name]
    pipe = build()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.set_timesteps(3)
    ac = pipe.scheduler.alphas_cumprod
    sigmas = [float(((1 - ac[t]) / ac[t]).sqrt()) for t in pipe.scheduler.timesteps]
    window = (sigmas[2] * 1.01, sigmas[1] * 1.01)  # (low, high] holds the middle step's sigma only
    reference = call_with(pipe, kwargs(), EvaluateAll(GuidanceInterval(APG(6.0), *window)))
    counts, handle = network_counter(pipe)
    with guide(pipe, GuidanceInterval(APG(6.0), *window)) as hook:
        images = call(pipe, kwargs(), 2.0).images
    handle.remove()
    batch = images.shape[0]
    assert counts == [batch, 2 * batch, batch] and hook.network_evaluations == 4 * batch
    assert torch.allclose(torch.as_tensor(images), torch.as_tensor(reference), atol=1e-5)


def call_with(pipe, kwargs, rule):
    with guide(pipe, rule):
        return call(pipe, kwargs, 2.0).images


def test_rescale_in_model_space_matches_diffusers_guidance_rescale():
    pipe = tiny_sd_pipeline()
    kwargs = PIPELINES["sd"][1]()
    own = pipe(**kwargs, guidance_scale=6.0, guidance_rescale=0.7, generator=gen()).images
    with guide(pipe, CFGRescale(6.0, phi=0.7, space="model")):
        guided = pipe(**kwargs, guidance_scale=6.0, generator=gen()).images
    plain = pipe(**kwargs, guidance_scale=6.0, generator=gen()).images
    assert abs(guided - own).max() < 1e-5 < abs(plain - own).max()


# -- counted savings on the class-conditional pipeline (float64, so batch composition cannot flip a decision) --
@pytest.fixture
def pipe64(tiny_pipe):
    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    return tiny_pipe.to(dtype=torch.float64)


LABELS, STEPS = [0, 1, 2, 0], 10


def run(pipe, rule):
    counts, handle = network_counter(pipe)
    with guide(pipe, rule) as hook:
        latents = pipe(LABELS, STEPS, guidance_scale=2.0, generator=gens(0, 1, 2, 3), output_type="latent").images
    handle.remove()
    assert sum(counts) == hook.network_evaluations
    return latents, counts


class CosineRecorder(GuidanceRule):
    def __init__(self, rule):
        self.rule, self.cosines = rule, []

    def __call__(self, cond, uncond, state):
        self.cosines.append(cosine_similarity(cond, uncond))
        return self.rule(cond, uncond, state)


def test_adaptive_guidance_saves_the_counted_calls_and_equals_cfg_at_threshold_one(pipe64):
    cfg_latents, cfg_counts = run(pipe64, CFG(4.0))
    assert cfg_counts == [8] * STEPS
    same, counts = run(pipe64, AdaptiveGuidance(CFG(4.0), threshold=1.0))
    assert torch.equal(same, cfg_latents) and counts == cfg_counts

    recorder = CosineRecorder(CFG(4.0))
    run(pipe64, recorder)
    cos = torch.stack(recorder.cosines)  # (steps, samples) along CFG's trajectory
    mid = cos[STEPS // 2].sort().values
    threshold = float((mid[1] + mid[2]) / 2)  # half the samples have passed it by the middle step
    crossed = cos > threshold
    first = torch.where(crossed.any(0), crossed.int().argmax(0), torch.full((4,), STEPS))
    # a sample's uncond runs up to and including the step where it first passes (its trajectory is CFG's until then)
    expected = [4 + int(((first >= i)).sum()) for i in range(STEPS)]
    assert 4 * STEPS < sum(expected) < 8 * STEPS  # the threshold bites, and not from the start
    _, counts = run(pipe64, AdaptiveGuidance(CFG(4.0), threshold=threshold))
    assert counts == expected


def test_interval_counts_and_full_interval_equals_cfg(pipe64):
    cfg_latents, _ = run(pipe64, CFG(4.0))
    everywhere, counts = run(pipe64, GuidanceInterval(CFG(4.0), 0.0, float("inf")))
    assert torch.equal(everywhere, cfg_latents) and counts == [8] * STEPS
    pipe64.scheduler.set_timesteps(STEPS)
    ac = pipe64.scheduler.alphas_cumprod.double()
    sigma = ((1 - ac) / ac).sqrt()[pipe64.scheduler.timesteps]
    low, high = 0.3, 2.0
    expected = [4 + 4 * int(low < s <= high) for s in sigma.tolist()]
    assert 4 * STEPS < sum(expected) < 8 * STEPS
    _, counts = run(pipe64, GuidanceInterval(CFG(4.0), low, high))
    assert counts == expected


def test_rule_state_resets_at_each_call_and_the_hook_matches_a_manual_loop(pipe64):
    pipe64.scheduler = DDIMScheduler.from_config(pipe64.scheduler.config, prediction_type="v_prediction")
    rule = APG(5.0, eta=0.2, norm_threshold=4.0, momentum=-0.5)
    x = torch.randn(2, 1, 8, 8, generator=gen(3), dtype=torch.float64)
    with guide(pipe64, rule):
        first = pipe64([1, 2], 6, guidance_scale=2.0, latents=x, output_type="latent").images
        second = pipe64([1, 2], 6, guidance_scale=2.0, latents=x, output_type="latent").images
    assert torch.equal(first, second)  # the momentum of the first call did not leak into the second

    reference_rule = APG(5.0, eta=0.2, norm_threshold=4.0, momentum=-0.5)
    schedule = NoiseSchedule.from_config(pipe64.scheduler.config)
    sched = DDIMScheduler.from_config(pipe64.scheduler.config)
    sched.set_timesteps(6)
    y, labels, null = x.clone(), torch.tensor([1, 2]), torch.tensor([3, 3])
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            c = pipe64.unet(y, t, class_labels=labels).sample
            u = pipe64.unet(y, t, class_labels=null).sample
            g = reference_rule(c, u, GuidanceState(schedule, t, y, "v_prediction", i))
            y = sched.step(g, t, y).prev_sample
    assert torch.allclose(first, y, atol=1e-10)


# -- reversibility --------------------------------------------------------------------------------------------
def patched(pipe):
    return "forward" in pipe.unet.__dict__ or "set_timesteps" in pipe.scheduler.__dict__


def test_the_hook_is_reversible_also_on_exceptions(tiny_pipe):
    before = tiny_pipe([0, 1], 3, guidance_scale=3.0, generator=gens(0, 1), output_type="latent").images
    with pytest.raises(KeyError):
        with guide(tiny_pipe, APG(9.0)):
            assert patched(tiny_pipe)
            raise KeyError("boom")
    assert not patched(tiny_pipe)
    hook = guide(tiny_pipe, APG(9.0))
    with pytest.raises(RuntimeError, match="already guided"):
        guide(tiny_pipe, CFG(2.0))
    changed = tiny_pipe([0, 1], 3, guidance_scale=3.0, generator=gens(0, 1), output_type="latent").images
    hook.remove()
    hook.remove()
    assert not patched(tiny_pipe) and "removed" in repr(hook)
    after = tiny_pipe([0, 1], 3, guidance_scale=3.0, generator=gens(0, 1), output_type="latent").images
    assert torch.equal(before, after) and not torch.equal(before, changed)


# -- errors ---------------------------------------------------------------------------------------------------
def test_unsupported_pipelines_and_schedulers_are_named(tiny_pipe):
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(TypeError, match="guide\\(\\) supports pipelines that run classifier-free guidance in one of "
                                        "diffusers' ways: StableDiffusionPipeline, .*WanPipeline \\(and their subclasses\\); "
                                        "got DDPMPipeline"):
        guide(DDPMPipeline(unet=unet, scheduler=DDIMScheduler()), CFG(3.0))
    tiny_pipe.scheduler = EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction")
    with pytest.raises(ValueError, match="timestep_type='continuous'"):
        guide(tiny_pipe, CFG(3.0))
    with pytest.raises(TypeError, match="rule must be a steerdiff GuidanceRule"):
        guide(tiny_pipe, lambda c, u: c)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_a_call_without_the_cfg_branch_is_refused(name):
    build, kwargs = PIPELINES[name]
    pipe = build()
    with guide(pipe, CFG(5.0)):
        with pytest.raises(ValueError, match=r"runs no unconditional branch: call the pipeline with its CFG on \(guidance_scale > 1"):
            call(pipe, kwargs(), 1.0)


def test_class_conditional_refusals_and_nan_outputs(tiny_pipe):
    with guide(tiny_pipe, CFG(5.0)):
        with pytest.raises(ValueError, match="ClassConditionalPipeline, but this call runs no unconditional branch"):
            tiny_pipe([0], 2, guidance_scale=1.0, output_type="latent")
        tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
        with pytest.raises(RuntimeError, match="pipe.scheduler was replaced after guide"):
            tiny_pipe([0], 2, guidance_scale=2.0, output_type="latent")
    with torch.no_grad():
        tiny_pipe.unet.conv_out.bias.fill_(float("nan"))
    with guide(tiny_pipe, CFG(5.0)):
        with pytest.raises(FloatingPointError, match=r"the network output holds NaN/Inf at step 0 \(timestep \d+\) in 1 of 1 samples"):
            tiny_pipe([0], 2, guidance_scale=2.0, output_type="latent")


def test_sd_guidance_rescale_is_refused_under_the_hook():
    pipe = tiny_sd_pipeline()
    with guide(pipe, CFG(5.0)):
        with pytest.raises(ValueError, match="guidance_rescale > 0 .* use CFGRescale"):
            pipe(**PIPELINES["sd"][1](), guidance_scale=5.0, guidance_rescale=0.5)
