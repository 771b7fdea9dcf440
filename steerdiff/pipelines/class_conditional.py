"""A diffusers pipeline for class-conditional denoisers with classifier-free guidance.

Works with any class-conditional ``UNet2DModel`` (``num_class_embeds`` = classes + 1, the last id being the
null class used for the unconditional branch) and with
:class:`~steerdiff.testbeds.mixture.GaussianMixtureDenoiser` (config ``num_classes``, null id = num_classes),
and with any diffusers or steerdiff scheduler.

Guidance follows diffusers' convention (Ho & Salimans 2022): g = u + w (c - u), u = unconditional and
c = conditional prediction; w = 1 is plain conditional sampling (one network call per step).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor

from ..config import check_guidance_scale
from ..core.nonfinite import NonFiniteWatch
from ..core.sde import sample_noise
from ..guidance.cfg import cfg_combination

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_call_arguments(num_inference_steps, guidance_scale, output_type) -> None:
    """The argument checks every steerdiff pipeline call shares."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    check_guidance_scale(guidance_scale, "guidance_scale")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def null_class_id(model) -> int:
    """The class id a model reads as "no class" (the unconditional branch of CFG)."""
    cfg = model.config
    if cfg.get("num_classes") is not None and cfg.get("sample_shape") is not None:  # GaussianMixtureDenoiser
        if int(cfg["num_classes"]) < 1:
            raise ValueError("this mixture denoiser is unconditional (num_classes = 0)")
        return int(cfg["num_classes"])
    if cfg.get("num_class_embeds"):
        return int(cfg["num_class_embeds"]) - 1
    raise ValueError(
        f"{type(model).__name__} is not class-conditional: expected a UNet2DModel with num_class_embeds or a "
        "GaussianMixtureDenoiser with num_classes"
    )


def sample_shape(model) -> tuple[int, ...]:
    """(C, H, W) of one sample."""
    cfg = model.config
    if cfg.get("sample_shape") is not None:
        return tuple(int(s) for s in cfg["sample_shape"])
    size = cfg["sample_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (int(cfg["in_channels"]), *size)


class ClassConditionalPipeline(DiffusionPipeline):
    """Generate images of given classes: ``pipe(class_labels=[3, 7], num_inference_steps=50, guidance_scale=3)``.

    Pass ``generator`` as a list with one ``torch.Generator`` per sample to make each image independent of
    the batch it is drawn in (up to floating-point reassociation in the network).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    @property
    def num_classes(self) -> int:
        return null_class_id(self.unet)

    @property
    def guidance_scale(self) -> float:
        """The guidance scale of the current (or last) call."""
        return getattr(self, "_guidance_scale", 1.0)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the current call runs the unconditional branch (guidance_scale != 1), as in diffusers' pipelines."""
        return self.guidance_scale != 1.0

    def _check_labels(self, class_labels) -> torch.Tensor:
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        labels = torch.as_tensor(class_labels)
        if labels.ndim != 1 or labels.numel() == 0 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be a non-empty 1-D sequence of integers, got {class_labels!r}")
        null = self.num_classes
        bad = labels[(labels < 0) | (labels > null)]
        if bad.numel():
            raise ValueError(
                f"class_labels must lie in 0..{null - 1} (or {null} for unconditional samples); got {bad.tolist()}"
            )
        return labels.to(self.device)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        nonfinite_check: str = "auto",
    ) -> ImagePipelineOutput | tuple:
        """
        Args:
            class_labels: one class id per sample (the null id gives unconditional samples).
            num_inference_steps: scheduler steps (>= 1).
            guidance_scale: w in g = u + w (c - u); w = 1 skips the unconditional branch. Must be >= 0.
            generator: one generator, or one per sample.
            latents: initial noise (B, C, H, W); drawn from ``generator`` when None.
            output_type: "pil" (list of images), "np" (B, H, W, C) in [0, 1], "pt" (B, C, H, W) in [0, 1],
                or "latent" (the raw final samples in model space, not clipped).
            nonfinite_check: NaN/Inf in the (guided) model output is a FloatingPointError naming the step, the
                timestep and how many samples, whatever the scheduler: "auto" (at the step on the CPU, at the end
                of the run on accelerators), "eager", "deferred" or "off" (:mod:`steerdiff.core.nonfinite`).
        """
        labels = self._check_labels(class_labels)
        check_call_arguments(num_inference_steps, guidance_scale, output_type)
        batch = labels.shape[0]
        shape = (batch, *sample_shape(self.unet))
        if latents is None:
            latents = sample_noise(shape, generator, self.device, self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        # flow-matching schedulers (FlowMatchEuler...) have neither an initial noise scale nor a model-input scaling
        x = latents.to(self.device, self.unet.dtype) * getattr(self.scheduler, "init_noise_sigma", 1.0)
        scale_input = getattr(self.scheduler, "scale_model_input", lambda sample, timestep: sample)

        self._guidance_scale = float(guidance_scale)
        use_cfg = self.do_classifier_free_guidance
        model_labels = torch.cat([torch.full_like(labels, self.num_classes), labels]) if use_cfg else labels
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        what = "the guided model output" if use_cfg else "the model output"
        watch = NonFiniteWatch(nonfinite_check, what, len(self.scheduler.timesteps))
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_in = scale_input(x, t)
            if use_cfg:
                model_in = torch.cat([model_in, model_in])
            out = self.unet(model_in, t, class_labels=model_labels).sample
            if use_cfg:
                uncond, cond = out.chunk(2)
                out = cfg_combination(cond, uncond, guidance_scale)
            watch.update(i, out, t)
            x = self.scheduler.step(out, t, x, **step_kwargs).prev_sample
        watch.finish()

        images = x if output_type == "latent" else self.image_processor.postprocess(x, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
