"""Tiny random Stable Diffusion, SDXL and DiT pipelines built offline from configs (as diffusers' tests do).

The CLIP tokenizer is made from an in-memory byte-level vocabulary (no merges), so nothing is downloaded.  Sizes are chosen so that a 2-step call takes well under a second on a CPU.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def tiny_tokenizer() -> CLIPTokenizer:
    chars = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=16)


def _text_config(**extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
        max_position_embeddings=16, **extra,
    )


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )


def tiny_sd_pipeline(scheduler=None) -> StableDiffusionPipeline:
    """SD 1.5-shaped: 4-channel 16x16 latents (32x32 images), epsilon prediction, PNDM scheduler config."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4,
    )
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=unet.eval(), vae=_vae().eval(), text_encoder=CLIPTextModel(_text_config()).eval(), tokenizer=tiny_tokenizer(),
        scheduler=scheduler or PNDMScheduler(**SD_SCHEDULER, skip_prk_steps=True),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(scheduler=None) -> StableDiffusionXLPipeline:
    """SDXL-shaped: two text encoders, text_time added conditioning, Euler scheduler config."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=4,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config(hidden_act="gelu", projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(hidden_act="gelu", projection_dim=32))
    pipe = StableDiffusionXLPipeline(
        unet=unet.eval(), vae=_vae().eval(), text_encoder=text_encoder.eval(), tokenizer=tiny_tokenizer(),
        text_encoder_2=text_encoder_2.eval(), tokenizer_2=tiny_tokenizer(),
        scheduler=scheduler or EulerDiscreteScheduler(**SD_SCHEDULER, timestep_spacing="leading"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_dit_pipeline(scheduler=None) -> DiTPipeline:
    """DiT-shaped class-conditional transformer (learned sigma: 8 output channels); DiTPipeline hard-codes the
    null class id 1000, so the label table has 1000 classes like ImageNet."""
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        in_channels=4, out_channels=8, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero", norm_elementwise_affine=False,
    )
    torch.manual_seed(0)
    # eval(): built from a config the modules are in train mode, where DiT drops labels at random
    pipe = DiTPipeline(transformer=transformer.eval(), vae=_vae().eval(), scheduler=scheduler or DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe
