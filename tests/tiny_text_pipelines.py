"""Tiny random text-to-image pipelines with real (tiny) text encoders and offline tokenizers, saved with
``save_pretrained`` so that the command line loads them with ``from_pretrained(..., local_files_only=True)``.

Configs follow diffusers' tests (tests/pipelines/{stable_diffusion_3,flux}/test_*.py, get_dummy_components); the
CLIP tokenizer is the byte-level one of :mod:`tests.tiny_pipelines`.  SD3's T5 encoder is left out (the pipeline
then uses zeros, as it does for a checkpoint saved without it); Flux's T5 encoder is a tiny random T5 reading the
same byte-level tokenizer (no T5 vocabulary can be built offline).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from tests.tiny_flow_pipelines import _kl_vae
from tests.tiny_pipelines import _text_config, tiny_sd_pipeline, tiny_tokenizer


def _clip(with_projection: bool):
    torch.manual_seed(0)
    config = _text_config(projection_dim=32, hidden_act="gelu")
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def tiny_sd3_text() -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(4).eval(),
        text_encoder=_clip(True), tokenizer=tiny_tokenizer(), text_encoder_2=_clip(True), tokenizer_2=tiny_tokenizer(),
        text_encoder_3=None, tokenizer_3=None,
    )


def tiny_flux_text() -> FluxPipeline:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)).eval()
    return FluxPipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=_kl_vae(1).eval(), text_encoder=_clip(False), tokenizer=tiny_tokenizer(), text_encoder_2=t5,
        tokenizer_2=tiny_tokenizer(),
    )


def tiny_sd_img2img_text() -> StableDiffusionImg2ImgPipeline:
    return StableDiffusionImg2ImgPipeline(**tiny_sd_pipeline().components)


BUILDERS = {"sd": tiny_sd_pipeline, "sd3": tiny_sd3_text, "flux": tiny_flux_text, "sd_img2img": tiny_sd_img2img_text}


def save_tiny_pipeline(name: str, folder: Path) -> Path:
    """Build the tiny pipeline ``name`` (sd, sd3, flux, sd_img2img) and save it in diffusers' folder format."""
    pipe = BUILDERS[name]()
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
