"""guide(pipe, rule) on the 15 common diffusers pipelines that do classifier-free guidance, built tiny from diffusers'
test configs: CFG under the hook equals the pipeline's own CFG, APG is the paper's rule on x0 in each model's
parametrization at the pipeline's own noise levels, skipped unconditional evaluations really do not run (in both
CFG patterns), leaving the hook restores the pipeline exactly, and wrapped forwards are hooked correctly."""

import functools

import pytest
import torch
from tiny_flow_pipelines import FLOW_PIPELINES, flow_pipeline_call
from tiny_pipelines import (
    tiny_animatediff_pipeline,
    tiny_dit_pipeline,
    tiny_pixart_sigma_pipeline,
    tiny_sd_controlnet_pipeline,
    tiny_sd_img2img_pipeline,
    tiny_sd_inpaint_pipeline,
    tiny_sd_pag_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_img2img_pipeline,
    tiny_sdxl_pipeline,
)

from steerdiff.guidance import APG, CFG, AdaptiveGuidance, GuidanceInterval, GuidanceRule
from steerdiff.pipelines import guide

pytestmark = pytest.mark.usefixtures("one_thread")
W = 3.0


def _gen():
    return torch.Generator().manual_seed(0)


def _image(seed=1, size=32):
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _embeds(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _sd_call(**extra):
    return lambda w: dict(prompt=["a cat"], num_inference_steps=3, guidance_scale=w, generator=_gen(),
                          output_type="latent", **extra)


def _flow_call(name):
    def call(w):
        kwargs = flow_pipeline_call(name, steps=3)
        kwargs["true_cfg_scale" if name in ("flux", "qwen_image") else "guidance_scale"] = w
        return kwargs
    return call


PIPELINES = {
    "sd": (tiny_sd_pipeline, _sd_call()),
    "sd_img2img": (tiny_sd_img2img_pipeline, _sd_call(image=_image(), strength=0.9)),
    "sd_inpaint": (tiny_sd_inpaint_pipeline, _sd_call(image=_image(), mask_image=(_image(2)[:, :1] > 0.5).float(),
                                                       height=32, width=32)),
    "sd_controlnet": (tiny_sd_controlnet_pipeline, _sd_call(image=_image(3))),
    "sd_pag": (tiny_sd_pag_pipeline, _sd_call(pag_scale=2.0)),
    "sdxl": (tiny_sdxl_pipeline, _sd_call(height=32, width=32)),
    "sdxl_img2img": (tiny_sdxl_img2img_pipeline, _sd_call(image=_image(), strength=0.9)),
    "dit": (tiny_dit_pipeline, lambda w: dict(class_labels=[3, 999], num_inference_steps=3, guidance_scale=w,
                                               generator=_gen(), output_type="latent")),
    "pixart_sigma": (tiny_pixart_sigma_pipeline, lambda w: dict(
        prompt_embeds=_embeds(1, 6, 32, seed=1), prompt_attention_mask=torch.ones(1, 6, dtype=torch.long),
        negative_prompt_embeds=_embeds(1, 6, 32, seed=2), negative_prompt_attention_mask=torch.ones(1, 6, dtype=torch.long),
        negative_prompt=None, num_inference_steps=3, guidance_scale=w, height=16, width=16, use_resolution_binning=False,
        generator=_gen(), output_type="latent")),
    "animatediff": (tiny_animatediff_pipeline, lambda w: dict(
        prompt_embeds=_embeds(1, 6, 8, seed=1), negative_prompt_embeds=_embeds(1, 6, 8, seed=2), num_frames=2,
        height=16, width=16, num_inference_steps=3, guidance_scale=w, generator=_gen(), output_type="latent")),
    **{name: (FLOW_PIPELINES[name], _flow_call(name)) for name in FLOW_PIPELINES},
}
_built: dict = {}


def pipeline(name):
    if name not in _built:
        _built[name] = PIPELINES[name][0]()
    return _built[name]


def output(pipe, kwargs):
    out = pipe(**kwargs)
    return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_cfg_under_the_hook_is_the_pipelines_cfg_and_leaving_restores_it(name):
    pipe, call = pipeline(name), PIPELINES[name][1]
    before = output(pipe, call(W))
    with guide(pipe, CFG(W)) as hook:
        hooked = output(pipe, call(W + 4.0))  # the pipeline's own scale is not used under the hook
    assert hook.network_calls > 0
    assert float((hooked - before).abs().max()) <= 1e-5, name  # float32
    after = output(pipe, call(W))
    assert torch.equal(after, before)


class Recorder(GuidanceRule):
    """``rule``'s output, with what it saw recorded."""

    def __init__(self, rule):
        self.rule, self.records = rule, []

    def reset(self, timesteps=None):
        self.rule.reset(timesteps)

    def __call__(self, cond, uncond, state):
        out = self.rule(cond, uncond, state)
        self.records.append((cond.double(), uncond.double(), state.sample.double(), state.alpha.clone(),
                             state.sigma.clone(), state.prediction_type, out.double()))
        return out


def reference_apg(cond, uncond, x, alpha, sigma, kind, w, r):
    """APG (Sadat et al. 2025) on x0, no momentum, eta 0, written per parametrization (x = alpha x0 + sigma eps)."""
    a = alpha.reshape(-1, *[1] * (x.ndim - 1))
    s = sigma.reshape(-1, *[1] * (x.ndim - 1))
    if kind == "epsilon":
        to_x0 = lambda e: (x - s * e) / a  # noqa: E731
        back = lambda d: (x - a * d) / s  # noqa: E731
    else:  # flow velocity v = eps - x0 with alpha + sigma = 1
        to_x0 = lambda v: x - s * v  # noqa: E731
        back = lambda d: (x - d) / s  # noqa: E731
    dc, du = to_x0(cond), to_x0(uncond)
    delta = dc - du
    norm = delta.flatten(1).norm(dim=1).reshape(-1, *[1] * (x.ndim - 1))
    delta = delta * torch.clamp(r / norm, max=1.0)
    unit = dc / dc.flatten(1).norm(dim=1).reshape(-1, *[1] * (x.ndim - 1))
    parallel = (delta * unit).flatten(1).sum(1).reshape(-1, *[1] * (x.ndim - 1)) * unit
    return back(dc + (w - 1) * (delta - parallel))


@pytest.mark.parametrize("name", list(PIPELINES))
def test_apg_is_the_papers_rule_on_x0_at_the_pipelines_noise_levels(name):
    pipe, call = pipeline(name), PIPELINES[name][1]
    recorder = Recorder(APG(W, eta=0.0, norm_threshold=0.5, momentum=0.0))
    with guide(pipe, recorder):
        output(pipe, call(W))
    assert len(recorder.records) >= 2  # one per network evaluation (PNDM's warm-up adds one, img2img starts later)
    flow = name in FLOW_PIPELINES
    for i, (c, u, x, alpha, sigma, kind, out) in enumerate(recorder.records):
        assert kind == ("flow_prediction" if flow else "epsilon")
        if flow:  # the noise level is the scheduler's sigma at this step (Flux gives its network t / 1000)
            s = float(pipe.scheduler.sigmas[i])  # one evaluation per step on these flow schedulers
            assert torch.allclose(sigma, torch.full_like(sigma, s)) and torch.allclose(alpha, 1 - sigma)
        else:
            assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(alpha))
        ref = reference_apg(c, u, x, alpha, sigma, kind, W, 0.5)
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max()))), (name, i)


FIRST_LAYERS = ("conv_in", "x_embedder", "img_in", "patch_embedding", "patch_embed", "pos_embed")


def counted_rows(pipe):
    """The rows that really reach the network: counted at its first layer (a hook on the network itself would see
    the rows the pipeline passed, before the guidance hook slices them)."""
    network = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    first = next(getattr(network, n) for n in FIRST_LAYERS if hasattr(network, n))
    rows = []
    handle = first.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    return rows, handle


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux", "qwen_image", "wan"])
def test_skipped_unconditional_evaluations_are_not_run(name):
    pipe, call = pipeline(name), PIPELINES[name][1]
    rows, handle = counted_rows(pipe)
    try:
        # AdaptiveGuidance with threshold -1 stops guiding after the first evaluation: cos(c, u) > -1 always
        with guide(pipe, AdaptiveGuidance(CFG(W), threshold=-1.0, similarity_space="sample")) as hook:
            output(pipe, call(W))
    finally:
        handle.remove()
    separate = name in ("flux", "qwen_image", "wan")
    batch = rows[0] if separate else rows[0] // 2
    evaluations = len(rows) - 1 if separate else len(rows)  # one more call at step 0 in the two-call pattern
    assert hook.network_evaluations == sum(rows) and hook.network_calls == len(rows)
    # the first evaluation runs both branches; every later one the conditional rows only
    assert rows == ([batch, batch] if separate else [2 * batch]) + [batch] * (evaluations - 1), rows


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_an_interval_skips_whole_steps(name):
    pipe, call = pipeline(name), PIPELINES[name][1]
    rows, handle = counted_rows(pipe)
    try:
        with guide(pipe, GuidanceInterval(CFG(W), sigma_low=0.0, sigma_high=1e-9)) as hook:  # never inside
            unguided = output(pipe, call(W))
    finally:
        handle.remove()
    batch = 1
    assert rows == [batch] * len(rows) and hook.network_evaluations == sum(rows) and len(rows) >= 3
    with guide(pipe, CFG(1.0)):  # the conditional prediction alone, for comparison
        conditional = output(pipe, call(W))
    assert torch.allclose(unguided, conditional, atol=1e-6)


def test_a_call_without_cfg_is_refused_in_the_two_call_pattern():
    pipe, call = pipeline("flux"), PIPELINES["flux"][1]
    kwargs = call(1.0)  # true_cfg_scale 1: Flux runs no unconditional call
    with guide(pipe, CFG(W)), pytest.raises(ValueError, match="runs no unconditional branch"):
        output(pipe, kwargs)


def test_pag_keeps_its_own_term():
    """[uncond; cond; perturbed]: CFG under the hook plus the pipeline's pag_scale (c - p) is the pipeline's output."""
    pipe, call = pipeline("sd_pag"), PIPELINES["sd_pag"][1]
    rows, handle = counted_rows(pipe)
    try:
        with guide(pipe, CFG(W)):
            output(pipe, call(W))
    finally:
        handle.remove()
    assert rows == [3] * len(rows)  # the tripled batch runs whole (PAG's processors split it in three)


@pytest.mark.parametrize("wrap", ["accelerate", "functools", "compile"])
def test_wrapped_forwards_are_hooked(wrap):
    from tiny_pipelines import tiny_sd_pipeline as build

    pipe = build()
    call = PIPELINES["sd"][1]
    reference = output(pipe, call(W))
    if wrap == "accelerate":
        from accelerate.hooks import ModelHook, add_hook_to_module

        add_hook_to_module(pipe.unet, ModelHook())
    elif wrap == "functools":
        inner = pipe.unet.forward

        @functools.wraps(inner)
        def forward(*args, **kwargs):
            return inner(*args, **kwargs)

        pipe.unet.forward = forward
    else:
        pipe.unet = torch.compile(pipe.unet, backend="eager")
    rows, handle = counted_rows(pipe if wrap != "compile" else pipe)
    with guide(pipe, CFG(W)) as hook:
        got = output(pipe, call(W + 1))
    handle.remove()
    assert hook.network_calls == len(rows) > 0
    assert float((got - reference).abs().max()) <= 1e-5
    with pytest.raises(RuntimeError, match="already guided"):
        with guide(pipe, CFG(W)):
            guide(pipe, CFG(W))


class SecondSampleOnly(GuidanceRule):
    """CFG for the second sample of a batch of two; the first gets its conditional prediction and needs no
    unconditional one (so its unconditional rows are left out of the network call)."""

    def uncond_needed(self, state):
        return torch.tensor([False, True], device=state.device)

    def __call__(self, cond, uncond, state):
        guided = CFG(W)(cond, uncond, state)
        return torch.cat([cond[:1], guided[1:]])


class EvaluateAll(GuidanceRule):
    """``rule``'s combination with every unconditional row evaluated (the reference for skipped rows)."""

    def __init__(self, rule):
        self.rule = rule

    def __call__(self, cond, uncond, state):
        return self.rule(cond, uncond, state)


def _two(name):
    """A call of ``name`` with two samples."""
    kwargs = PIPELINES[name][1](W)
    if "prompt" in kwargs:
        kwargs["prompt"] = ["a cat", "a red dog"]
        if "image" in kwargs and name == "sd_controlnet":
            kwargs["image"] = torch.cat([kwargs["image"], _image(7)])
    else:
        for key in ("prompt_embeds", "negative_prompt_embeds", "prompt_attention_mask", "negative_prompt_attention_mask",
                    "prompt_embeds_mask", "negative_prompt_embeds_mask", "pooled_prompt_embeds",
                    "negative_pooled_prompt_embeds"):
            if key in kwargs:
                v = kwargs[key]
                kwargs[key] = torch.cat([v, v.flip(-1) if v.is_floating_point() else v])
    return kwargs


@pytest.mark.parametrize("name", ["sd_controlnet", "sdxl", "animatediff", "pixart_sigma", "sana", "sd3", "wan"])
def test_per_row_inputs_follow_the_rows_a_rule_keeps(name):
    """Leaving out one sample's unconditional rows slices control-net residuals, added_cond_kwargs, per-frame
    embeddings and attention masks with them: the result equals evaluating every row."""
    pipe = pipeline(name)
    rows, handle = counted_rows(pipe)
    try:
        with guide(pipe, SecondSampleOnly()) as hook:
            skipped = output(pipe, _two(name))
        with guide(pipe, EvaluateAll(SecondSampleOnly())):
            reference = output(pipe, _two(name))
    finally:
        handle.remove()
    separate = name in ("flux", "qwen_image", "wan")
    frames = 2 if name == "animatediff" else 1  # its UNet's first layer sees every frame as a row
    rows = [r // frames for r in rows]
    n = len(rows) // 2 if separate else len(rows)
    # sample 0's unconditional rows really were left out: 3 rows a step (batched), or 2 then 1 (two calls)
    assert rows[: len(rows) // 2] == ([2, 1] * n if separate else [3] * n)[: len(rows) // 2], rows
    assert hook.network_evaluations == sum(rows[: len(rows) // 2])  # the hook's count, in samples
    assert float((skipped - reference).abs().max()) <= 1e-5 * max(1.0, float(reference.abs().max())), name


def test_wan22_two_transformers_are_both_guided_and_guidance_scale_2_is_checked():
    from diffusers import WanPipeline

    base = pipeline("wan")
    torch.manual_seed(1)
    second = type(base.transformer)(**base.transformer.config).eval()
    pipe = WanPipeline(transformer=base.transformer, transformer_2=second, vae=base.vae, scheduler=base.scheduler,
                       text_encoder=None, tokenizer=None, boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    kwargs = PIPELINES["wan"][1](W)
    own = output(pipe, kwargs)
    with guide(pipe, CFG(W)) as hook:
        guided = output(pipe, PIPELINES["wan"][1](W))
        assert hook.network_calls == 2 * 3  # the high-noise steps on transformer, the low-noise ones on transformer_2
        with pytest.raises(ValueError, match="guidance_scale_2=1.5 .* differs from guidance_scale"):
            output(pipe, {**PIPELINES["wan"][1](W), "guidance_scale_2": 1.5})
    assert float((guided - own).abs().max()) <= 1e-5 * max(1.0, float(own.abs().max()))
    assert "_steerdiff_guidance_hook" not in second.__dict__  # both unhooked on leaving
