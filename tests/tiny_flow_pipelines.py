"""Tiny random flow-matching pipelines (SD3, Flux, Wan, Qwen-Image, Sana) built offline from the configs of diffusers'
own tests (tests/pipelines/*/test_*.py, get_dummy_components).

The text encoders and tokenizers are left out (None): the calls pass prompt embeddings of the shapes those
encoders produce, so nothing is downloaded and no tokenizer is needed.  ``flow_pipeline_call(name)`` gives the
keyword arguments of one small call with classifier-free guidance on.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
)


def _kl_vae(latent_channels: int) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )


def tiny_sd3(scheduler=None) -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(4).eval(),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )


def tiny_flux(scheduler=None) -> FluxPipeline:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    return FluxPipeline(
        transformer=transformer.eval(), scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(1).eval(),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )


def tiny_wan(scheduler=None) -> WanPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16, text_dim=32,
        freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    return WanPipeline(
        transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=None, tokenizer=None,
    )


def tiny_qwen_image(scheduler=None) -> QwenImagePipeline:
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )
    return QwenImagePipeline(
        transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler or FlowMatchEulerDiscreteScheduler(),
        text_encoder=None, tokenizer=None,
    )


def tiny_sana(scheduler=None) -> SanaPipeline:
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8, sample_size=32,
    )
    torch.manual_seed(0)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    )
    return SanaPipeline(
        transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=None, tokenizer=None,
    )


FLOW_PIPELINES = {"sd3": tiny_sd3, "flux": tiny_flux, "wan": tiny_wan, "qwen_image": tiny_qwen_image, "sana": tiny_sana}


def _embeds(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def flow_pipeline_call(name: str, steps: int = 4, seed: int = 0) -> dict:
    """Keyword arguments of a small latent-output call with classifier-free guidance (in each pipeline's own way)."""
    gen = torch.Generator().manual_seed(seed)
    common = dict(num_inference_steps=steps, generator=gen, output_type="latent")
    if name == "sd3":
        return dict(prompt_embeds=_embeds(1, 8, 32, seed=1), negative_prompt_embeds=_embeds(1, 8, 32, seed=2),
                    pooled_prompt_embeds=_embeds(1, 64, seed=3), negative_pooled_prompt_embeds=_embeds(1, 64, seed=4),
                    guidance_scale=5.0, height=32, width=32, **common)
    if name == "flux":
        return dict(prompt_embeds=_embeds(1, 8, 32, seed=1), pooled_prompt_embeds=_embeds(1, 32, seed=3),
                    negative_prompt_embeds=_embeds(1, 8, 32, seed=2), negative_pooled_prompt_embeds=_embeds(1, 32, seed=4),
                    true_cfg_scale=3.0, guidance_scale=3.5, height=16, width=16, **common)
    if name == "wan":
        return dict(prompt_embeds=_embeds(1, 8, 32, seed=1), negative_prompt_embeds=_embeds(1, 8, 32, seed=2),
                    guidance_scale=6.0, height=16, width=16, num_frames=5, **common)
    if name == "qwen_image":
        return dict(prompt_embeds=_embeds(1, 6, 16, seed=1), prompt_embeds_mask=torch.ones(1, 6, dtype=torch.long),
                    negative_prompt_embeds=_embeds(1, 6, 16, seed=2),
                    negative_prompt_embeds_mask=torch.ones(1, 6, dtype=torch.long),
                    true_cfg_scale=4.0, height=32, width=32, **common)
    if name == "sana":
        return dict(prompt_embeds=_embeds(1, 6, 8, seed=1), prompt_attention_mask=torch.ones(1, 6, dtype=torch.long),
                    negative_prompt=None, negative_prompt_embeds=_embeds(1, 6, 8, seed=2),
                    negative_prompt_attention_mask=torch.ones(1, 6, dtype=torch.long),
                    guidance_scale=4.5, height=32, width=32, use_resolution_binning=False, **common)  # binning: 1024 px
    raise ValueError(f"unknown pipeline {name!r}; one of {sorted(FLOW_PIPELINES)}")
