"""Perturbation guidance (PAG, SEG, SLG, AutoGuidance) under guide(), in the Denoiser and in modular pipelines:
PAG equals diffusers' PAG pipelines, SLG equals SD3's own skip_guidance_layers, SEG equals a reference written
from the paper's code, AutoGuidance equals its formula on the weak network; perturbed evaluations a rule does not
need are not run (counted at the network's first layer); the network is exactly as before after the block; and a
perturbation that cannot apply is a clear error naming what exists."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionXLPAGPipeline,
)
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from test_guide_pipelines import FIRST_LAYERS, PIPELINES, output, pipeline
from tiny_flow_pipelines import _kl_vae, flow_pipeline_call
from tiny_pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline

from steerdiff.core import NoiseSchedule
from steerdiff.guidance import (
    CFG,
    PAG,
    SEG,
    SLG,
    AdaptiveGuidance,
    AttentionIdentity,
    AutoGuidance,
    GuidanceInterval,
    QueryBlur,
    get_rule,
)
from steerdiff.pipelines import guide
from steerdiff.pipelines.conditioning import denoiser_for
from steerdiff.pipelines.perturb import blur_queries, perturbed, supports_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen():
    return torch.Generator().manual_seed(0)


def _sd_kwargs(**extra):
    return dict(prompt=["a cat", "a red dog"], num_inference_steps=3, output_type="latent", **extra)


# -- PAG: diffusers' PAG pipelines -----------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [5.0, 1.0])
def test_pag_under_guide_is_the_sd_pag_pipeline(scale):
    sd = tiny_sd_pipeline()
    pag = StableDiffusionPAGPipeline(**sd.components, pag_applied_layers=["mid", "up_blocks.0.attentions.0"])
    pag.set_progress_bar_config(disable=True)
    own = pag(**_sd_kwargs(), guidance_scale=scale, pag_scale=3.0, generator=_gen()).images
    with guide(sd, PAG(scale, 3.0, layers=["mid", "up_blocks.0.attentions.0"])) as hook:
        ours = sd(**_sd_kwargs(), guidance_scale=2.0, generator=_gen()).images
    assert torch.equal(ours, own)
    # [u; c; p] in one call with CFG (4 PNDM evaluations x 3 rows x 2 samples), [c; p] without
    assert hook.network_calls == 4 and hook.network_evaluations == 4 * (3 if scale != 1 else 2) * 2
    plain = sd(**_sd_kwargs(), guidance_scale=scale, generator=_gen()).images
    assert float((plain - own).abs().max()) > 1e-2  # PAG changed the result


def test_pag_with_adaptive_scale_is_the_sd_pag_pipeline():
    sd = tiny_sd_pipeline()
    pag = StableDiffusionPAGPipeline(**sd.components, pag_applied_layers=["mid"])
    pag.set_progress_bar_config(disable=True)
    own = pag(**_sd_kwargs(), guidance_scale=4.0, pag_scale=5.0, pag_adaptive_scale=0.004, generator=_gen()).images
    with guide(sd, PAG(4.0, 5.0, layers=["mid"], adaptive_scale=0.004)):
        ours = sd(**_sd_kwargs(), guidance_scale=2.0, generator=_gen()).images
    assert float((ours - own).abs().max()) <= 1e-5 * max(1.0, float(own.abs().max()))


def test_pag_under_guide_is_the_sdxl_pag_pipeline():
    xl = tiny_sdxl_pipeline()
    pag = StableDiffusionXLPAGPipeline(**xl.components, pag_applied_layers=["mid"])
    pag.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=["a cat"], num_inference_steps=3, output_type="latent", height=32, width=32)
    own = pag(**kwargs, guidance_scale=5.0, pag_scale=3.0, generator=_gen()).images
    with guide(xl, PAG(5.0, 3.0, layers=["mid"])):
        ours = xl(**kwargs, guidance_scale=2.0, generator=_gen()).images
    assert torch.equal(ours, own)


@pytest.mark.parametrize("name", ["sd", "dit", "pixart_sigma", "sd3", "sana"])
def test_the_batched_pag_layout_gives_the_same_perturbed_prediction_as_a_call_of_its_own(name):
    """diffusers' PAG processors on [c; p] and the attention-score skip hook on [p] alone: the same p (up to the
    batch size's effect on float32 kernels)."""
    pipe = pipeline(name)
    network = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    captured = []
    handle = network.register_forward_pre_hook(lambda m, a, k: captured.append((a, dict(k))), with_kwargs=True)
    try:
        output(pipe, {**PIPELINES[name][1](3.0), "num_inference_steps": 1})
    finally:
        handle.remove()
    args, kwargs = captured[0]
    x = args[0] if args else kwargs.pop(next(iter(kwargs)))
    n = x.shape[0]
    cond = slice(0, n // 2) if name == "dit" else slice(n // 2, n)

    def rows(value, index):
        if torch.is_tensor(value) and value.ndim and value.shape[0] == n:
            return value[index]
        if isinstance(value, dict):
            return {k: rows(v, index) for k, v in value.items()}
        return value

    layers = ["transformer_blocks.0"] if name != "sd" else ["mid"]
    spec = AttentionIdentity(layers)
    assert supports_groups(network, spec)
    pair = torch.cat([torch.arange(n)[cond]] * 2)
    extra = [a for a in args[1:]]
    with torch.no_grad():
        with perturbed(network, spec, groups=2):
            batched = network(rows(x, pair), *[rows(a, pair) for a in extra], **rows(kwargs, pair))[0]
        with perturbed(network, spec):
            alone = network(rows(x, cond), *[rows(a, cond) for a in extra], **rows(kwargs, cond))[0]
        plain = network(rows(x, cond), *[rows(a, cond) for a in extra], **rows(kwargs, cond))[0]
    p = batched[n // 2 :]
    assert float((p - alone).abs().max()) <= 1e-5 * max(1.0, float(alone.abs().max())), name
    assert float((p - plain).abs().max()) > 1e-4  # the perturbation is real
    assert float((batched[: n // 2] - plain).abs().max()) <= 1e-5 * max(1.0, float(plain.abs().max()))


# -- SLG: SD3's own skip_guidance_layers ------------------------------------------------------------------------
def tiny_sd3_layers(num_layers=3):
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=num_layers, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(4).eval(), text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd3_call(steps=10):
    kwargs = flow_pipeline_call("sd3", steps=steps)
    kwargs.pop("guidance_scale")
    kwargs.pop("generator")
    return kwargs


def first_layer_rows(network):
    first = next(getattr(network, n) for n in FIRST_LAYERS if hasattr(network, n))
    rows = []
    return rows, first.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))


def test_slg_under_guide_is_sd3s_skip_guidance_layers_and_runs_only_in_its_window():
    pipe = tiny_sd3_layers()
    kwargs = _sd3_call(steps=10)
    own = pipe(**kwargs, guidance_scale=5.0, skip_guidance_layers=[1], skip_layer_guidance_scale=2.8,
               skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.5, generator=_gen()).images
    rows, handle = first_layer_rows(pipe.transformer)
    try:
        with guide(pipe, SLG(5.0, 2.8, layers=[1], start=0.01, stop=0.5)) as hook:
            ours = pipe(**kwargs, guidance_scale=2.0, generator=_gen()).images
    finally:
        handle.remove()
    assert torch.equal(ours, own)
    # steps 1..4 (10 * 0.01 < i < 10 * 0.5) run the skip pass on the conditional row; the others do not
    assert rows == [2, 1] * 4 + [2] * 5 or rows == [2] + [2, 1] * 4 + [2] * 5, rows
    assert hook.network_calls == len(rows) == 14 and hook.network_evaluations == sum(rows)
    plain = pipe(**kwargs, guidance_scale=5.0, generator=_gen()).images
    assert float((plain - own).abs().max()) > 1e-3
    with guide(pipe, SLG(5.0, 2.8, layers=[1])), pytest.raises(ValueError, match="use the SLG rule"):
        pipe(**kwargs, guidance_scale=5.0, skip_guidance_layers=[1], generator=_gen())


# -- SEG: the paper's query blur ---------------------------------------------------------------------------------
class PaperSEGProcessor:
    """The SEG paper's perturbed attention (SusungHong/SEG-SDXL's SEGCFGSelfAttnProcessor, no-CFG branch), written
    out for a test: the query of every row blurred over the square token grid, keys and values untouched."""

    def __init__(self, sigma):
        self.sigma = sigma

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        b, n, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        heads, dim = attn.heads, key.shape[-1] // attn.heads
        q = query.view(b, -1, heads, dim).transpose(1, 2)
        side = math.isqrt(n)
        grid = q.permute(0, 1, 3, 2).reshape(b, heads * dim, side, side)
        if math.isinf(self.sigma):
            grid = grid.mean(dim=(-2, -1), keepdim=True).expand_as(grid)
        else:
            k = math.ceil(6 * self.sigma) + 1 - math.ceil(6 * self.sigma) % 2
            k = min(k, side - (side % 2 - 1))
            x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k)
            pdf = torch.exp(-0.5 * (x / self.sigma) ** 2)
            kernel = pdf / pdf.sum()
            kernel2d = (kernel[:, None] @ kernel[None, :]).expand(grid.shape[1], 1, k, k)
            grid = F.conv2d(F.pad(grid, [k // 2] * 4, mode="reflect"), kernel2d, groups=grid.shape[1])
        q = grid.reshape(b, heads, dim, n).permute(0, 1, 3, 2)
        out = F.scaled_dot_product_attention(q, key.view(b, -1, heads, dim).transpose(1, 2), value.view(b, -1, heads, dim).transpose(1, 2))
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, -1, heads * dim)))
        return out / attn.rescale_output_factor


@pytest.mark.parametrize("sigma", [1.5, math.inf])
def test_seg_blurs_the_queries_as_the_papers_code(sigma):
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, processor=AttnProcessor2_0()).eval()
    hidden = torch.randn(2, 36, 16)
    with torch.no_grad(), perturbed(torch.nn.ModuleList([attn]), QueryBlur(["^0"], sigma)):
        ours = attn(hidden)
    with torch.no_grad():
        reference = PaperSEGProcessor(sigma)(attn, hidden)
    assert float((ours - reference).abs().max()) <= 1e-5
    assert "forward" not in attn.to_q.__dict__ and "_diffusers_hook" not in attn.to_q.__dict__


def test_seg_follows_the_latents_aspect_ratio():
    q = torch.randn(1, 8 * 4, 3)  # an 8 x 4 token grid (a 2:1 latent)
    grid = q.transpose(1, 2).reshape(1, 3, 8, 4)
    blurred = blur_queries(q, math.inf, spatial=(16, 8))
    assert torch.allclose(blurred, grid.mean(dim=(-2, -1), keepdim=True).expand(1, 3, 8, 4).reshape(1, 3, 32).transpose(1, 2))
    finite = blur_queries(q, 1.0, spatial=(16, 8)).transpose(1, 2).reshape(1, 3, 8, 4)
    # a blur along the true rows: the columns of the 8 x 4 grid are blurred within themselves, not across a square
    assert torch.allclose(finite.mean(dim=(-2, -1)), grid.mean(dim=(-2, -1)), atol=0.2)
    with pytest.raises(ValueError, match="cannot lay the 7 query tokens"):
        blur_queries(torch.randn(1, 7, 3), 1.0, spatial=None, layer="x")


# -- skipped perturbed evaluations, both CFG patterns -------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd", "flux"])
def test_perturbed_evaluations_a_rule_does_not_need_are_not_run(name):
    pipe, call = pipeline(name), PIPELINES[name][1]
    network = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    layers = ["mid"] if name == "sd" else ["transformer_blocks.0"]
    counts = {}
    for label, rule in {
        "pag off": PAG(3.0, 0.0, layers=layers),  # pag_scale 0: no perturbed call
        "outside": GuidanceInterval(PAG(3.0, 2.0, layers=layers), sigma_low=0.0, sigma_high=1e-9),  # nothing but c
        "pag": PAG(3.0, 2.0, layers=layers),
        "window": PAG(3.0, 2.0, layers=layers, start=0.3, stop=0.9),
    }.items():
        rows, handle = first_layer_rows(network)
        try:
            with guide(pipe, rule) as hook:
                output(pipe, call(3.0))
        finally:
            handle.remove()
        assert hook.network_evaluations == sum(rows) and hook.network_calls == len(rows), label
        counts[label] = rows
    steps = 3 if name == "flux" else 4  # PNDM runs one more evaluation
    if name == "sd":  # one call per step: [u; c] 2 rows, [u; c; p] 3 rows (PAG's batched processors)
        assert counts["pag off"] == [2] * steps and counts["outside"] == [1] * steps and counts["pag"] == [3] * steps
        assert counts["window"] == [2, 2, 3, 3], counts["window"]  # 4 * 0.3 < i < 4 * 0.9: evaluations 2 and 3
    else:  # Flux: cond, uncond and (when needed) the perturbed call on the conditional inputs
        assert counts["pag off"] == [1, 1] * steps and counts["outside"] == [1] * steps
        assert counts["pag"] == [1, 1, 1] * steps
        assert counts["window"] == [1, 1] + [1, 1, 1] * 2, counts["window"]  # 3 * 0.3 < i < 3 * 0.9: steps 1, 2


def test_adaptive_guidance_stops_perturbed_calls_per_sample():
    pipe = pipeline("sd")
    rows, handle = first_layer_rows(pipe.unet)
    try:
        with guide(pipe, AdaptiveGuidance(PAG(3.0, 2.0, layers=["mid"]), threshold=-1.0, similarity_space="sample")) as hook:
            output(pipe, PIPELINES["sd"][1](3.0))
    finally:
        handle.remove()
    assert rows == [3] + [1] * 3  # after the first evaluation: conditional rows only
    assert hook.network_evaluations == sum(rows)


# -- leaving the block -------------------------------------------------------------------------------------------
def _module_state(network):
    return {name: (sorted(k for k in m.__dict__ if not k.startswith("_") or k in ("_diffusers_hook", "_forward_hooks")),
                   type(getattr(m, "processor", None)).__name__)
            for name, m in network.named_modules()}


@pytest.mark.parametrize("rule", [
    PAG(3.0, 2.0, layers=["mid"]), SEG(3.0, 2.0, layers=["mid"], blur_sigma=2.0),
    SLG(3.0, 2.0, layers=[0], fqn="mid_block.attentions.0.transformer_blocks", start=None, stop=None),
    SLG(3.0, 2.0, layers=[0], fqn="mid_block.attentions.0.transformer_blocks", skip="attention", start=None, stop=None),
], ids=["pag", "seg", "slg", "stg"])
def test_the_network_is_exactly_as_before_after_the_block(rule):
    pipe = tiny_sd_pipeline()
    before_state = _module_state(pipe.unet)
    before = pipe(**_sd_kwargs(), guidance_scale=3.0, generator=_gen()).images
    with guide(pipe, rule):
        guided = pipe(**_sd_kwargs(), guidance_scale=3.0, generator=_gen()).images
    assert _module_state(pipe.unet) == before_state
    assert torch.equal(pipe(**_sd_kwargs(), guidance_scale=3.0, generator=_gen()).images, before)
    assert float((guided - before).abs().max()) > 1e-4  # the perturbation did act


# -- AutoGuidance: the weak model's prediction -------------------------------------------------------------------
def test_autoguidance_is_its_formula_on_the_weak_network_and_skips_the_unconditional_branch(tmp_path):
    from conftest import tiny_class_unet

    good, weak = tiny_class_unet(seed=0), tiny_class_unet(seed=1)
    process = NoiseSchedule.from_config({"num_train_timesteps": 1000})
    labels = torch.tensor([0, 1, 2])
    x, t = torch.randn(3, 1, 8, 8, generator=_gen()), torch.tensor(500)
    w = 2.5
    denoiser = denoiser_for(good, process, "epsilon", AutoGuidance(w, weak), cond=labels)
    got = denoiser.output(x, t)
    with torch.no_grad():
        d0 = good(x, t, class_labels=labels).sample
        d1 = weak(x, t, class_labels=labels).sample
    assert torch.allclose(got, d1 + w * (d0 - d1), atol=1e-6)
    assert denoiser.network_calls == 2 and denoiser.network_evaluations == 6  # c and the weak model's p; no u
    # the weak model from a local folder (safetensors only), found in a pipeline folder by the model's class
    from steerdiff.pipelines.class_conditional import ClassConditionalPipeline
    from diffusers import DDPMScheduler

    ClassConditionalPipeline(unet=weak, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "weak", safe_serialization=True)
    from_folder = denoiser_for(good, process, "epsilon", get_rule("autoguidance", scale=w, weak_model=str(tmp_path / "weak")), cond=labels)
    assert torch.allclose(from_folder.output(x, t), got, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="weak_model .* is not a folder"):
        get_rule("autoguidance", scale=w, weak_model=str(tmp_path / "missing"))
    (tmp_path / "weak" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"12")
    broken = AutoGuidance(w, str(tmp_path / "weak"))
    with pytest.raises(ValueError, match="damaged"):
        denoiser_for(good, process, "epsilon", broken, cond=labels).output(x, t)


def test_autoguidance_under_guide_is_a_loop_written_from_the_paper():
    from conftest import tiny_class_unet
    from diffusers import DDIMScheduler

    from steerdiff.core.sde import sample_noise
    from steerdiff.pipelines.class_conditional import ClassConditionalPipeline

    pipe = ClassConditionalPipeline(unet=tiny_class_unet(seed=0), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    weak = tiny_class_unet(seed=1)
    calls = []
    handle = weak.register_forward_pre_hook(lambda m, a, k: calls.append(a[0].shape[0]), with_kwargs=True)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    with guide(pipe, AutoGuidance(2.5, weak)) as hook:
        ours = pipe([0, 1, 2], 3, guidance_scale=2.0, generator=gens(), output_type="latent").images
    handle.remove()
    assert calls == [3, 3, 3] and hook.network_evaluations == 3 * (3 + 3)  # c and D_1 per step, no u
    # D_w = D_1 + w (D_0 - D_1) (Karras et al. 2024, Eq. 1), in a plain loop over the same scheduler
    labels = torch.tensor([0, 1, 2])
    x = sample_noise((3, 1, 8, 8), gens(), torch.device("cpu"), torch.float32)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(3)
    with torch.no_grad():
        for t in scheduler.timesteps:
            d0, d1 = pipe.unet(x, t, class_labels=labels).sample, weak(x, t, class_labels=labels).sample
            x = scheduler.step(d1 + 2.5 * (d0 - d1), t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-6)


# -- refusals ----------------------------------------------------------------------------------------------------
def test_perturbations_that_cannot_apply_are_clear_errors():
    sd = tiny_sd_pipeline()
    with pytest.raises(ValueError, match=r"layer 'nope' matches no self-attention layer of UNet2DConditionModel; its "
                                         r"self-attention layers are: down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1"):
        guide(sd, PAG(3.0, 2.0, layers=["nope"]))
    with pytest.raises(ValueError, match="has no top-level transformer block stack; give fqn, one of: .*mid_block.attentions"):
        guide(sd, SLG(3.0, 2.0, layers=[0]))
    with pytest.raises(ValueError, match=r"layers \[4\] do not exist in transformer_blocks of SD3Transformer2DModel \(3 blocks"):
        guide(tiny_sd3_layers(), SLG(3.0, 2.0, layers=[4]))
    assert "_steerdiff_guidance_hook" not in sd.unet.__dict__  # nothing was installed
    pag = pipeline("sd_pag")
    with guide(pag, PAG(3.0, 2.0, layers=["mid"])), pytest.raises(ValueError, match="applies its own perturbed-attention guidance"):
        output(pag, PIPELINES["sd_pag"][1](3.0))
    with pytest.raises(ValueError, match="layers must be a non-empty list"):
        PAG(3.0, 2.0, layers=[])
    with pytest.raises(ValueError, match="start must be below stop"):
        SLG(3.0, 2.0, layers=[1], start=0.5, stop=0.2)
    with pytest.raises(ValueError, match=r"pag_scale must lie in \[0, inf\], got -1"):
        PAG(3.0, -1.0)


def test_seg_on_a_joint_text_image_stream_is_refused():
    pipe = pipeline("flux")
    with guide(pipe, SEG(3.0, 2.0, layers=["single_transformer_blocks.0"])), \
            pytest.raises(ValueError, match="cannot lay the .* query tokens of layer 'single_transformer_blocks.0.attn'"):
        output(pipe, PIPELINES["flux"][1](3.0))


def test_a_window_needs_the_runs_length():
    from steerdiff.core import GuidanceState

    process = NoiseSchedule.from_config({"num_train_timesteps": 1000})
    state = GuidanceState(process, 500, torch.zeros(1, 1, 8, 8), "epsilon", step=1)
    with pytest.raises(ValueError, match="did not give the run's number of steps"):
        SLG(3.0, 2.0, layers=[0]).predictions_needed(state)
    inside = GuidanceState(process, 500, torch.zeros(1, 1, 8, 8), "epsilon", step=1, num_steps=10)
    outside = GuidanceState(process, 500, torch.zeros(1, 1, 8, 8), "epsilon", step=2, num_steps=10)
    assert SLG(3.0, 2.0, layers=[0]).predictions_needed(inside)["slg"] is True  # 10 * 0.01 < 1 < 10 * 0.2
    assert SLG(3.0, 2.0, layers=[0]).predictions_needed(outside)["slg"] is False  # SD3: i < N stop, strictly


# -- every pipeline guide() hooks ------------------------------------------------------------------------------------
UNETS = ("sd", "sd_img2img", "sd_inpaint", "sd_controlnet", "sdxl", "sdxl_img2img", "animatediff")
PAG_LAYERS = {**{name: ["mid"] for name in UNETS}, "wan": ["blocks.0"]}
SLG_LAYERS = {**{name: dict(layers=[0], fqn="mid_block.attentions.0.transformer_blocks") for name in UNETS},
              "animatediff": dict(layers=[0], fqn="mid_block.attentions.0.transformer_blocks")}


@pytest.mark.parametrize("name", [n for n in PIPELINES if n != "sd_pag"])
def test_pag_and_slg_in_every_pipeline(name):
    """PAG and SLG run in every pipeline guide() hooks (SLG where diffusers knows the blocks), change the result,
    run the rows they say, and leave the network as it was."""
    pipe, call = pipeline(name), PIPELINES[name][1]
    network = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    with guide(pipe, CFG(3.0)):
        cfg = output(pipe, call(3.0))
    state = _module_state(network)  # after a first call: Flux's pipeline gives its transformer a hook registry itself
    rules = {"pag": PAG(3.0, 2.0, layers=PAG_LAYERS.get(name, ["transformer_blocks.0"]))}
    slg = dict(SLG_LAYERS.get(name, dict(layers=[0])), start=None, stop=None)
    if name == "sana":  # diffusers' layer-skip hooks know neither Sana's blocks nor its linear attention
        with pytest.raises(ValueError, match="skip='block' is not available for SanaTransformerBlock blocks"):
            guide(pipe, SLG(3.0, 2.0, **slg))
    else:
        rules["slg"] = SLG(3.0, 2.0, **slg)
    for label, rule in rules.items():
        rows, handle = first_layer_rows(network)
        try:
            with guide(pipe, rule) as hook:
                guided = output(pipe, call(3.0))
        finally:
            handle.remove()
        frames = 2 if name == "animatediff" else 1  # its first layer sees every frame as a row
        assert hook.network_evaluations * frames == sum(rows), (name, label)
        assert float((guided - cfg).abs().max()) > 1e-6, (name, label)
        assert _module_state(network) == state, (name, label)


def test_perturbed_rules_compose_with_schedules_and_a_cfg_rule():
    """g = u + w (c - u) + s (c - p) with a weight schedule on s (per sample, from each sample's noise level), and with
    APG in place of the CFG term: g = APG(c, u) + s (c - p)."""
    from steerdiff.core import GuidanceState
    from steerdiff.guidance import APG, Linear

    process = NoiseSchedule.from_config({"num_train_timesteps": 1000})
    gen = torch.Generator().manual_seed(0)
    x, c, u, p = torch.randn(4, 3, 1, 4, 4, generator=gen, dtype=torch.float64)
    state = GuidanceState(process, torch.tensor([900, 500, 100]), x, "epsilon", perturbed={"pag": p})
    schedule = Linear(w0=3.0)
    got = PAG(2.0, schedule)(c, u, state)
    s = schedule(state.progress).reshape(-1, 1, 1, 1)
    assert torch.allclose(got, u + 2.0 * (c - u) + s * (c - p), atol=1e-12)
    assert len(set(s.flatten().tolist())) == 3  # three different weights, one per sample
    apg = APG(5.0, norm_threshold=0.5, momentum=0.0)
    composed = PAG(APG(5.0, norm_threshold=0.5, momentum=0.0), 1.5)(c, u, state)
    assert torch.allclose(composed, apg(c, u, state) + 1.5 * (c - p), atol=1e-12)
    assert PAG(APG(5.0), 1.5).predictions_needed(state)["uncond"] is None
    with pytest.raises(ValueError, match="must be a two-prediction rule"):
        PAG(SEG(3.0, 2.0), 1.5)
