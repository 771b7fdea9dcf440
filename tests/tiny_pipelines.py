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


# -- the rest of the SD family, PixArt and AnimateDiff (configs from diffusers' tests) -----------------------------------
def _sd_parts(in_channels: int = 4):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4,
    )
    torch.manual_seed(0)
    return dict(unet=unet.eval(), vae=_vae().eval(), text_encoder=CLIPTextModel(_text_config()).eval(),
                tokenizer=tiny_tokenizer(), scheduler=DDIMScheduler(**SD_SCHEDULER, clip_sample=False),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_img2img_pipeline():
    from diffusers import StableDiffusionImg2ImgPipeline

    return _quiet(StableDiffusionImg2ImgPipeline(**_sd_parts()))


def tiny_sd_inpaint_pipeline():
    """The inpainting UNet sees 9 channels (latents, mask, masked-image latents) and predicts 4."""
    from diffusers import StableDiffusionInpaintPipeline

    return _quiet(StableDiffusionInpaintPipeline(**_sd_parts(in_channels=9)))


def tiny_sd_controlnet_pipeline():
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    torch.manual_seed(0)
    controlnet = ControlNetModel(
        block_out_channels=(8, 16), layers_per_block=1, in_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=32, conditioning_embedding_out_channels=(16, 32), norm_num_groups=4, attention_head_dim=4,
    )
    return _quiet(StableDiffusionControlNetPipeline(**_sd_parts(), controlnet=controlnet.eval()))


def tiny_sd_pag_pipeline():
    from diffusers import StableDiffusionPAGPipeline

    return _quiet(StableDiffusionPAGPipeline(**_sd_parts(), pag_applied_layers=["mid"]))


def tiny_sdxl_img2img_pipeline():
    from diffusers import StableDiffusionXLImg2ImgPipeline

    base = tiny_sdxl_pipeline()
    return _quiet(StableDiffusionXLImg2ImgPipeline(**base.components))


def tiny_pixart_sigma_pipeline():
    """Learned sigma (8 output channels for 4 latent ones); prompts are given as T5-sized embeddings (32)."""
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )
    return _quiet(PixArtSigmaPipeline(transformer=transformer.eval(), vae=_vae().eval(), scheduler=DDIMScheduler(),
                                      text_encoder=None, tokenizer=None))


def tiny_animatediff_pipeline():
    """A motion-adapter UNet on 5-D latents (B, C, F, H, W); the text embeddings are repeated per frame."""
    from diffusers import AnimateDiffPipeline, MotionAdapter

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 8), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2,
    )
    torch.manual_seed(0)
    adapter = MotionAdapter(block_out_channels=(8, 8), motion_layers_per_block=2, motion_norm_num_groups=2,
                            motion_num_attention_heads=4)
    torch.manual_seed(0)
    pipe = AnimateDiffPipeline(
        unet=unet, motion_adapter=adapter, vae=_vae().eval(), text_encoder=None, tokenizer=None,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False),
        feature_extractor=None, image_encoder=None,
    )
    pipe.unet.eval()
    return _quiet(pipe)
