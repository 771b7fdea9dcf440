"""Load a class-conditional pipeline by name or from a local folder, with safetensors weights only.

``"digits"`` is the embedded digits UNet shipped with steerdiff; ``"mixture"`` is the analytic
Gaussian-mixture denoiser fitted to the same digits; anything else is a local folder in diffusers' format:
either a pipeline folder (``model_index.json`` with ``unet/`` and ``scheduler/``) or a model folder
(``config.json`` + ``*.safetensors``, with ``scheduler_config.json`` beside it or in ``scheduler/``).
Nothing is downloaded and no pickle is ever opened.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from ..samplers.registry import make_scheduler
from ..testbeds.digits import load_digits_model
from ..testbeds.mixture import GaussianMixtureDenoiser, fit_digits_mixture
from ..weights import check_safetensors_folder
from .class_conditional import ClassConditionalPipeline

BUILTIN_MODELS = ("digits", "digits-flow", "mixture", "mixture-flow")


def _load_model_folder(folder: Path):
    with open(folder / "config.json") as f:
        class_name = json.load(f).get("_class_name", "UNet2DModel")
    if class_name == "GaussianMixtureDenoiser":
        return GaussianMixtureDenoiser.from_pretrained(folder, use_safetensors=True)
    if class_name != "UNet2DModel":
        raise ValueError(f"model folder {str(folder)!r} holds a {class_name}; supported: UNet2DModel, GaussianMixtureDenoiser")
    return UNet2DModel.from_pretrained(folder, use_safetensors=True)


def load_pipeline(model: str = "digits", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A :class:`ClassConditionalPipeline` for a built-in model name or a local folder."""
    if model in ("digits", "digits-flow"):
        unet, scheduler = load_digits_model(variant="flow" if model == "digits-flow" else "vp")
    elif model in ("mixture", "mixture-flow"):
        from diffusers import FlowMatchEulerDiscreteScheduler

        # the analytic digits mixture, its exact eps under DDPM's schedule or its exact velocity as a flow model
        scheduler = FlowMatchEulerDiscreteScheduler() if model == "mixture-flow" else DDPMScheduler(clip_sample=False)
        unet = fit_digits_mixture(scheduler_config=scheduler)
    else:
        root = Path(model).expanduser()
        if not root.exists():
            raise FileNotFoundError(
                f"model {model!r} is neither a built-in model {BUILTIN_MODELS} nor an existing folder"
            )
        unet_dir = root / "unet" if (root / "model_index.json").is_file() else root
        check_safetensors_folder(unet_dir)
        unet = _load_model_folder(unet_dir)
        sched_dir = next(
            (d for d in (root / "scheduler", root) if (d / "scheduler_config.json").is_file()), None
        )
        if sched_dir is None:
            raise FileNotFoundError(f"no scheduler_config.json in {str(root)!r} or {str(root / 'scheduler')!r}")
        with open(sched_dir / "scheduler_config.json") as f:
            sched_config = json.load(f)
        scheduler = make_scheduler(sched_config.get("_class_name", "DDPMScheduler"), sched_config)
    unet.eval().requires_grad_(False)
    pipe = ClassConditionalPipeline(unet=unet, scheduler=scheduler)
    pipe.to(device=device)
    if unet.dtype != dtype:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
