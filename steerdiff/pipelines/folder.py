"""What a local diffusers pipeline folder decides before any weights are read.

A pipeline folder (``pipe.save_pretrained(folder)``) holds ``model_index.json`` (the pipeline class and one
``[library, class]`` entry per component) and one sub-folder per component, each with its small JSON config.  Those
configs settle, without loading a weight:

- :func:`check_components`: every component the index lists has its folder (a missing ``unet/`` is named, not an
  OSError from inside diffusers);
- :func:`folder_scheduler_config`: the scheduler's config, so the scheduler a run asks for is built, checked against
  the model's noise process and laid out for the step count first;
- :func:`check_image_size`: the height / width rule of the pipeline's ``check_inputs`` (a multiple of the VAE's
  scale factor times the transformer's patch size), for the pipelines whose rule is known here; diffusers raises on
  it (SD, SDXL, PixArt, SD3, Sana, Wan) or silently resizes (Flux, Qwen-Image: the image would not have the size the
  settings record), so both are refused before the run;
- :func:`passes_own_sigmas`: the pipeline gives the scheduler its own sigma grid, which diffusers' multistep
  solvers cannot take;
- :func:`makes_videos`: a video pipeline (its call takes ``num_frames``) returns frames, not images.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from ..config import ConfigError


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{what}: {str(path)!r} is not valid JSON ({err.msg})") from None
    except OSError as err:
        raise ConfigError(f"{what}: {str(path)!r} cannot be read ({err.strerror})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: {str(path)!r} must hold a JSON object")
    return value


def model_index(folder: Path) -> dict[str, Any]:
    return _read_json(folder / "model_index.json", "model")


def listed_components(folder: Path) -> dict[str, list]:
    """``name -> [library, class]`` for every component ``model_index.json`` lists and does not save as None."""
    return {k: v for k, v in model_index(folder).items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None}


def check_components(folder: Path) -> None:
    """Every listed component has its folder; model components (diffusers / transformers models) their config."""
    for name, (library, cls) in listed_components(folder).items():
        sub = folder / name
        if not sub.is_dir():
            raise ConfigError(
                f"model: pipeline folder {str(folder)!r} lacks its {name}/ folder (model_index.json lists {name}: "
                f"{library} {cls}); save the whole pipeline with pipe.save_pretrained(folder)"
            )
        if name == "scheduler" and not (sub / "scheduler_config.json").is_file():
            raise ConfigError(f"model: {str(sub)!r} has no scheduler_config.json")


def folder_scheduler_config(folder: Path) -> dict[str, Any]:
    """The pipeline's scheduler config as saved (``scheduler/scheduler_config.json``)."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise ConfigError(f"model: pipeline folder {str(folder)!r} has no scheduler/scheduler_config.json")
    return _read_json(path, "model")


def _config(folder: Path, component: str) -> dict[str, Any]:
    path = folder / component / "config.json"
    return _read_json(path, "model") if path.is_file() else {}


def vae_scale_factor(folder: Path) -> int | None:
    """The spatial down-sampling of the folder's VAE, as the pipelines compute it from its config."""
    vae = _config(folder, "vae")
    if "scale_factor_spatial" in vae:  # Wan's
        return int(vae["scale_factor_spatial"])
    if "temperal_downsample" in vae:  # Qwen-Image's (diffusers' spelling)
        return 2 ** len(vae["temperal_downsample"])
    channels = vae.get("block_out_channels") or vae.get("encoder_block_out_channels")
    return 2 ** (len(channels) - 1) if channels else None


def _patch(folder: Path) -> int:
    size = _config(folder, "transformer").get("patch_size", 1) or 1
    return int(size if isinstance(size, int) else size[-1])


def image_size_multiple(cls: type, folder: Path | None) -> int | None:
    """The number height and width must be multiples of for pipeline ``cls`` (its ``check_inputs`` rule), or None
    where steerdiff does not know the rule (the pipeline then checks at run time)."""
    if folder is None:
        return None
    name = cls.__name__
    factor = vae_scale_factor(folder)
    if "StableDiffusion3" in name:
        return (factor or 8) * _patch(folder)
    if name.startswith(("Flux", "QwenImage")):
        return (factor or 8) * 2
    if name.startswith("Sana"):
        return 32
    if name.startswith("Wan"):
        return 16
    if name.startswith(("StableDiffusion", "PixArt")):
        return 8
    return None


def check_image_size(cls: type, folder: Path | None, height: int | None, width: int | None, where: str = "") -> None:
    """``height`` / ``width`` (when given) fit the pipeline's rule; the error names the field and the nearest sizes."""
    multiple = image_size_multiple(cls, folder)
    if multiple is None:
        return
    for key, value in (("height", height), ("width", width)):
        if value is not None and value % multiple:
            lower, upper = value - value % multiple, value - value % multiple + multiple
            nearest = f"{lower} or {upper}" if lower else f"{upper}"
            raise ConfigError(f"{where}{key}: {cls.__name__} takes multiples of {multiple} (its VAE and patch size); "
                              f"got {value}, use {nearest}")


def passes_own_sigmas(cls: type) -> bool:
    """Whether pipeline ``cls`` always calls ``scheduler.set_timesteps(..., sigmas=...)`` with its own grid (Qwen-Image,
    Chroma, LTX and Flux's img2img / control variants build ``np.linspace(1.0, 1 / num_inference_steps, ...)`` and
    never consult ``use_flow_sigmas``): a scheduler whose ``set_timesteps`` takes no ``sigmas`` fails in it.  Read from
    the pipeline's source; a pipeline whose source is unavailable counts as not passing them."""
    try:
        source = inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        return False
    return "np.linspace(1.0, 1 / num_inference_steps" in source and "use_flow_sigmas" not in source


def runs_in(scheduler, cls: type) -> bool:
    """Whether ``scheduler`` can lay out the grid pipeline ``cls`` asks for (its own sigmas, where it passes them)."""
    return not passes_own_sigmas(cls) or "sigmas" in inspect.signature(scheduler.set_timesteps).parameters


def check_runs_in(scheduler, cls: type) -> None:
    """:func:`runs_in`, or a ConfigError naming what to use instead."""
    if not runs_in(scheduler, cls):
        raise ConfigError(
            f"{cls.__name__} passes its own sigmas to set_timesteps, which {type(scheduler).__name__} cannot take; use "
            "dpmpp_2m_hb with beta=1 (DPM-Solver++ 2M on the pipeline's sigmas), another steerdiff scheduler (plms_hb, "
            "dpmpp_3m_hb, unipc_hb, ghvb) or flow_euler")


def makes_videos(params) -> bool:
    """A pipeline whose call takes ``num_frames`` returns videos (frames), not images."""
    return "num_frames" in params


__all__ = ["check_components", "check_image_size", "folder_scheduler_config", "image_size_multiple", "listed_components",
           "check_runs_in", "makes_videos", "model_index", "passes_own_sigmas", "runs_in", "vae_scale_factor"]
