"""The ``steerdiff generate`` job: sample images from a class-conditional model or any local diffusers pipeline, with
any scheduler and guidance rule, and write them with their settings.

    model: digits                    # built-in (digits, digits-flow, mixture, mixture-flow) or a local folder
    scheduler: {name: dpmpp_2m}      # any make_scheduler name with kwargs (diffusers' or steerdiff's, VP or flow)
    guidance: {name: cfg, scale: 3}  # cfg + number: the pipeline's own CFG; any other rule goes in with guide()
    steps: 25

Conditioning follows what the pipeline takes: ``classes`` x ``samples_per_class`` for class-conditional models,
``prompts`` (a list, or a ``.txt`` / ``.jsonl`` file) x ``images_per_prompt`` for text-to-image pipelines (with
``negative_prompts``), ``num_images`` for unconditional ones, and ``image`` / ``mask_image`` / ``strength`` for
image-to-image and inpainting pipelines.  Everything is checked before the pipeline's weights are read.

Image i uses seed ``seed + i`` through its own generator, so an image does not depend on the batch it was drawn in.
Each image is written (atomically) as soon as its batch is done; a rerun after a crash reuses every batch whose
images an earlier run wrote with the same settings.  The images folder is locked while a run uses it.
Outputs: the grid PNG at ``output`` and, in the folder beside it named after it (``outputs/generate/digits/``),
every image as a PNG carrying its settings in its text metadata, and ``manifest.jsonl`` (one line per image).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from .atomic_io import atomic_write, atomic_write_text
from .config import DTYPE_NAMES, ConfigError, Spec, StrictModel, load_config, torch_dtype
from .devices import check_device
from .image_files import finished_image, image_grid, images_folder, png_info, to_pil
from .pipelines.calling import (
    CALL_FIELDS, PipelineKind, check_call_kwargs, check_image_file, check_steps, load_any_pipeline, load_prompts,
    num_classes, pipeline_kind, plan_guidance, planned_scheduler, resolve_pipeline_class, resolve_prompts,
)
from .pipelines.folder import (
    check_components, check_image_size, check_runs_in, makes_videos, passes_own_sigmas, runs_in,
)
from .run_folder import RunFolderLock, check_output_file, check_writable_folder, make_folder

# the default scheduler where a pipeline passes its own sigmas (Qwen-Image): DPM-Solver++ 2M on steerdiff's core
DEFAULT_ON_OWN_SIGMAS = Spec(name="dpmpp_2m_hb", kwargs={"beta": 1.0})


class GenerateConfig(StrictModel):
    model: str = "digits"
    scheduler: Spec | None = Field(default_factory=lambda: Spec(name="dpmpp_2m"))  # null: the pipeline's own
    guidance: Spec | None = Field(default_factory=lambda: Spec(name="cfg", scale=3.0))  # null: the pipeline's default
    steps: int = Field(25, ge=1)
    # class-conditional models
    classes: list[int] | None = None          # null: every class of the model (0..9 for the digits; up to 16)
    samples_per_class: int = Field(8, ge=1)
    # text-to-image pipelines
    prompts: list[str] | str | None = None    # a list, or the path of a .txt (one per line) / .jsonl file
    negative_prompts: list[str] | str | None = None  # one for all, or one per prompt
    images_per_prompt: int = Field(1, ge=1)
    # unconditional pipelines
    num_images: int | None = Field(None, ge=1)
    # image-to-image / inpainting pipelines
    image: str | None = None
    mask_image: str | None = None
    strength: float | None = Field(None, gt=0, le=1)
    height: int | None = Field(None, ge=8)
    width: int | None = Field(None, ge=8)
    call_kwargs: dict[str, Any] = Field(default_factory=dict)  # other arguments of the pipeline call
    seed: int = Field(0, ge=0)
    batch_size: int = Field(256, ge=1)
    device: str = "cpu"
    dtype: Literal[DTYPE_NAMES] = "float32"  # type: ignore[valid-type]
    attention: Literal["sdpa", "xformers"] = "sdpa"
    upscale: int | None = Field(None, ge=1, le=64)  # grid cells; null: 4 for images under 32 px, else 1
    output: str = "outputs/generate/digits.png"  # the grid; images and manifest.jsonl go to outputs/generate/digits/
    overwrite: bool = False  # an images folder holding images of other settings: refused; true = replace them

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and "guidance_scale" in data:
            raise ValueError("guidance_scale: the guidance weight is guidance.kwargs.scale (e.g. guidance.kwargs.scale=7.5)")
        return data

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_name(cls, value: Any) -> Any:
        return Spec.with_default_name(value, "dpmpp_2m")

    @field_validator("guidance", mode="before")
    @classmethod
    def _guidance_name(cls, value: Any) -> Any:
        return Spec.with_default_name(value, "cfg")

    @model_validator(mode="after")
    def _lists(self) -> "GenerateConfig":
        if isinstance(self.prompts, list) and not self.prompts:
            raise ValueError("prompts must not be an empty list")
        if isinstance(self.classes, list) and not self.classes:
            raise ValueError("classes must not be an empty list (null: every class)")
        if self.mask_image is not None and self.image is None:
            raise ValueError("mask_image needs image (the picture to inpaint)")
        return self


# -- images ----------------------------------------------------------------------------------------------------------


# -- conditioning ----------------------------------------------------------------------------------------------------


def check_conditioning(cfg: GenerateConfig, kind: PipelineKind) -> None:
    """Every conditioning field against what the pipeline takes; errors name the field and what is allowed."""
    what = f"model {cfg.model!r} ({kind.name}"
    if kind.kind == "class":
        for key in ("prompts", "negative_prompts", "num_images"):
            if getattr(cfg, key) is not None:
                raise ConfigError(f"{key}: {what} is class-conditional); give classes and samples_per_class instead")
    elif kind.kind == "text":
        if cfg.classes is not None:
            raise ConfigError(f"classes: {what} is a text-to-image pipeline); give prompts instead")
        if cfg.prompts is None:
            raise ConfigError(f"prompts: {what} is a text-to-image pipeline) needs prompts: a list, or a .txt / .jsonl file")
        if cfg.num_images is not None:
            raise ConfigError(f"num_images: {what}) makes images_per_prompt images of each prompt; set that instead")
    else:
        for key in ("classes", "prompts", "negative_prompts"):
            if getattr(cfg, key) is not None:
                raise ConfigError(f"{key}: {what} is unconditional); it takes num_images only")
    for key in ("image", "mask_image", "strength", "height", "width"):
        if getattr(cfg, key) is not None and not kind.takes(key):
            allowed = [k for k in ("image", "mask_image", "strength", "height", "width") if kind.takes(k)]
            raise ConfigError(f"{key}: {what}) takes no {key}; of image, mask_image, strength, height and width it takes "
                              f"{', '.join(allowed) or 'none'}")
    if kind.takes("image") and cfg.image is None and kind.kind != "class":
        raise ConfigError(f"image: {what}) transforms an input image; give its path")
    if kind.takes("mask_image") and cfg.mask_image is None:
        raise ConfigError(f"mask_image: {what}) inpaints; give the mask's path (white = repaint)")
    for key in ("image", "mask_image"):
        path = getattr(cfg, key)
        if path is not None:
            check_image_file(path, key)
    check_strength(cfg, kind)
    if "num_images_per_prompt" in cfg.call_kwargs:
        raise ConfigError("call_kwargs: num_images_per_prompt is set by images_per_prompt (each image gets its own "
                          "seed); give images_per_prompt instead")
    unknown = sorted(k for k in cfg.call_kwargs if k not in kind.params)
    if unknown:
        raise ConfigError(f"call_kwargs: {kind.name} takes no {unknown}")
    reserved = sorted(set(cfg.call_kwargs) & CALL_FIELDS)
    if reserved:
        raise ConfigError(f"call_kwargs: {reserved} are set from their own config fields")
    check_call_kwargs(kind, cfg.call_kwargs)
    if cfg.attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise ConfigError("attention: xformers is not installed (pip install xformers); use attention: sdpa")
        if not str(cfg.device).startswith("cuda"):
            raise ConfigError(f"attention: xformers runs on CUDA only, device is {cfg.device!r}; use attention: sdpa")


def check_strength(cfg: GenerateConfig, kind: PipelineKind) -> None:
    """img2img / inpainting run int(steps x strength) denoising steps: zero of them is refused."""
    if not kind.takes("strength"):
        return
    strength = cfg.strength
    if strength is None:
        default = inspect.signature(kind.cls.__call__).parameters["strength"].default
        strength = default if isinstance(default, (int, float)) else None
    if strength is not None and int(cfg.steps * strength) < 1:
        need = math.ceil(1 / strength - 1e-12)
        raise ConfigError(f"strength: {kind.name} runs int(steps x strength) denoising steps, and steps={cfg.steps} x "
                          f"strength={strength} makes none; use steps >= {need} or a larger strength")


# -- the job ---------------------------------------------------------------------------------------------------------
@dataclass
class Item:
    """One image to make: its index (its seed is seed + index) and its conditioning."""

    index: int
    label: int | None = None
    prompt: str | None = None
    negative_prompt: str | None = None

    @property
    def file(self) -> str:
        """Its PNG's name in the images folder."""
        return f"{self.index:05d}.png"


def plan_items(cfg: GenerateConfig, kind: PipelineKind, num_classes: int | None) -> tuple[list[Item], int]:
    """The images in grid order, and the grid's number of rows."""
    if kind.kind == "class":
        if cfg.classes is None and (num_classes is None or num_classes > 16):
            many = f"has {num_classes} classes" if num_classes else "does not say how many classes it has"
            raise ConfigError(f"classes: model {cfg.model!r} {many}; give the class ids to draw, e.g. classes=[207, 360]")
        classes = cfg.classes if cfg.classes is not None else list(range(num_classes))
        if num_classes is not None:
            bad = [c for c in classes if not 0 <= c < num_classes]
            if bad:
                raise ConfigError(f"classes: {bad} are not classes of model {cfg.model!r} (0..{num_classes - 1})")
        labels = [c for c in classes for _ in range(cfg.samples_per_class)]
        return [Item(i, label=c) for i, c in enumerate(labels)], len(classes)
    if kind.kind == "text":
        prompts = resolve_prompts(cfg.prompts, cfg.negative_prompts)
        items = [Item(0, prompt=p["prompt"], negative_prompt=p["negative_prompt"]) for p in prompts for _ in range(cfg.images_per_prompt)]
        for i, item in enumerate(items):
            item.index = i
        if cfg.images_per_prompt == 1:  # one image per prompt: a near-square grid, not one tall column
            return items, max(1, round(math.sqrt(len(items))))
        return items, len(prompts)
    n = cfg.num_images or 16
    return [Item(i) for i in range(n)], max(1, int(math.sqrt(n)))


def _settings(cfg: GenerateConfig, item: Item) -> dict[str, Any]:
    out: dict[str, Any] = {"index": item.index, "seed": cfg.seed + item.index, "model": cfg.model}
    if item.label is not None:
        out["class_label"] = item.label
    if item.prompt is not None:
        out["prompt"] = item.prompt
        out["negative_prompt"] = item.negative_prompt
    out.update(
        scheduler=None if cfg.scheduler is None else cfg.scheduler.model_dump(exclude_none=True),
        guidance=None if cfg.guidance is None else cfg.guidance.model_dump(exclude_none=True),
        steps=cfg.steps, dtype=cfg.dtype,
    )
    for key in ("image", "mask_image", "strength", "height", "width"):
        if getattr(cfg, key) is not None:
            out[key] = getattr(cfg, key)
    if cfg.call_kwargs:
        out["call_kwargs"] = cfg.call_kwargs
    return out


def load_generation_pipeline(cfg: GenerateConfig, cls: type, folder: Path | None):
    return load_any_pipeline(cfg.model, cls, folder, cfg.device, torch_dtype(cfg.dtype))


def with_default_scheduler(cfg: GenerateConfig) -> GenerateConfig:
    """``cfg``, or, where the config left the scheduler at its default and the pipeline passes its own sigmas, which
    the default (diffusers' DPMSolverMultistepScheduler) cannot take (Qwen-Image), ``cfg`` with
    ``DEFAULT_ON_OWN_SIGMAS``: DPM-Solver++ 2M on steerdiff's core, which takes them.  Said when it happens, and
    recorded with the images as what ran."""
    from .pipelines.class_conditional import ClassConditionalPipeline

    if "scheduler" in cfg.model_fields_set or cfg.scheduler is None:
        return cfg
    cls, folder = resolve_pipeline_class(cfg.model)
    if (folder is None or issubclass(cls, ClassConditionalPipeline) or not passes_own_sigmas(cls)
            or runs_in(planned_scheduler(cfg.scheduler, folder), cls)):
        return cfg.model_copy(update={"scheduler": cfg.scheduler})  # decided: a second call returns at once
    print(f"scheduler: {cls.__name__} passes its own sigmas, which the default {cfg.scheduler.name} (diffusers' "
          f"DPMSolverMultistepScheduler) cannot take; using {DEFAULT_ON_OWN_SIGMAS.name} with beta=1 (DPM-Solver++ 2M)")
    return cfg.model_copy(update={"scheduler": DEFAULT_ON_OWN_SIGMAS})


def earlier_run_conflict(folder: Path, items: list[Item], settings: dict[int, dict[str, Any]]) -> str | None:
    """Why the images folder cannot take this run without replacing another run's images (None if it can): an
    image of another settings at one of this run's file names, or an earlier manifest listing other images."""
    wanted = {i: json.loads(json.dumps(v)) for i, v in settings.items()}  # as stored: JSON types
    for it in items:
        path = folder / it.file
        if not path.is_file():
            continue
        try:
            with Image.open(path) as im:
                old = json.loads(im.text.get("steerdiff", "null"))
        except (OSError, ValueError):
            continue  # damaged: made again
        if isinstance(old, dict) and old != wanted[it.index]:
            keys = sorted(k for k in set(old) | set(wanted[it.index]) if old.get(k) != wanted[it.index].get(k))
            return f"{it.file} was made with other settings (differs in {', '.join(keys)})"
    manifest = folder / "manifest.jsonl"
    if manifest.is_file():
        files = [line for line in manifest.read_text().splitlines() if line.strip()]
        if len(files) != len(items):
            return f"its manifest.jsonl lists {len(files)} images of an earlier run, this run makes {len(items)}"
    return None


def generate(cfg: GenerateConfig, progress: bool = True) -> tuple[Path, np.ndarray]:
    """Run ``cfg``; returns the grid's path and the images (N, H, W, C) in [0, 1].  Everything the config and the
    model folder's JSON files decide is checked, and the images folder locked, before any weights are read."""
    from .pipelines.watch import watch_nonfinite
    from .samplers.registry import make_scheduler

    cfg = with_default_scheduler(cfg)

    out = check_output_file(cfg.output, "output", suffixes=(".png",))  # before any work
    folder = check_writable_folder(images_folder(out), "output (its images folder)")
    check_device(cfg.device)
    cls, model_folder = resolve_pipeline_class(cfg.model)
    kind = pipeline_kind(cls)
    if makes_videos(kind.params):
        raise ConfigError(f"model: {kind.name} makes videos (its call takes num_frames); generate writes images — run "
                          "it from Python with guide(pipe, rule)")
    check_conditioning(cfg, kind)
    guidance = plan_guidance(cfg.guidance, kind)
    clash = sorted(set(cfg.call_kwargs) & set(guidance.kwargs))
    if clash:
        raise ConfigError(f"call_kwargs: {clash} are set by guidance ({cfg.guidance.display}); give the weight there")
    scheduler = None
    if model_folder is not None and kind.cls.__name__ != "ClassConditionalPipeline":  # a diffusers folder

        check_components(model_folder)
        check_image_size(cls, model_folder, cfg.height, cfg.width)
        scheduler = planned_scheduler(cfg.scheduler, model_folder)
        try:
            check_runs_in(scheduler, cls)
        except ConfigError as err:
            raise ConfigError(f"scheduler: {err}") from None
        check_steps(scheduler, cfg.steps)
    if kind.kind != "class":  # prompt files and negatives checked before the weights are read
        items, rows = plan_items(cfg, kind, None)
        settings = {it.index: _settings(cfg, it) for it in items}

    with ExitStack() as stack:
        make_folder(folder, "output (its images folder)")
        lock = RunFolderLock(folder, what="output")  # one run per images folder, taken before the weights load
        stack.callback(lock.release)
        if kind.kind != "class":
            _claim_images_folder(cfg, folder, items, settings)
        pipe = load_generation_pipeline(cfg, cls, model_folder)
        if kind.kind == "class":  # the model says how many classes it has
            items, rows = plan_items(cfg, kind, num_classes(pipe))
            settings = {it.index: _settings(cfg, it) for it in items}
            _claim_images_folder(cfg, folder, items, settings)
        if scheduler is not None:  # planned and checked from the folder's config above
            pipe.scheduler = scheduler
        else:  # a built-in or class-conditional model folder: its scheduler comes with the loaded model
            if cfg.scheduler is not None:
                try:
                    pipe.scheduler = make_scheduler(cfg.scheduler.name, pipe.scheduler.config, **cfg.scheduler.kwargs)
                except (ValueError, TypeError) as err:
                    raise ConfigError(f"scheduler: {err}") from None
            check_steps(pipe.scheduler, cfg.steps)
        if cfg.attention == "xformers":
            pipe.enable_xformers_memory_efficient_attention()
        pipe.set_progress_bar_config(disable=True)  # one bar over the images instead of one per batch
        fixed: dict[str, Any] = {**guidance.kwargs, **cfg.call_kwargs}
        for key in ("strength", "height", "width"):
            if getattr(cfg, key) is not None:
                fixed[key] = getattr(cfg, key)
        inputs = {key: Image.open(Path(getattr(cfg, key)).expanduser()).convert("RGB" if key == "image" else "L")
                  for key in ("image", "mask_image") if getattr(cfg, key) is not None}
        chunks, reused = [], 0
        if guidance.rule is not None:
            try:  # a perturbation that does not fit the network, a weak model that does not load
                stack.enter_context(guidance.pipeline_call(pipe, check_finite=True))
            except (ValueError, TypeError, FileNotFoundError) as err:
                raise ConfigError(f"guidance: {err}") from None
        elif kind.kind != "class":  # the class pipeline checks its own outputs
            stack.enter_context(watch_nonfinite(pipe))
        bar = stack.enter_context(tqdm(total=len(items), desc="generate", unit="image", disable=not progress))
        for start in range(0, len(items), cfg.batch_size):
            part = items[start : start + cfg.batch_size]
            done = [finished_image(folder / it.file, settings[it.index]) for it in part]
            if all(d is not None for d in done):  # an interrupted run wrote these already: resume after them
                chunks.append(np.stack(done))
                reused += len(part)
                bar.update(len(part))
                continue
            gens = [torch.Generator(device="cpu").manual_seed(cfg.seed + it.index) for it in part]
            kwargs = dict(fixed, num_inference_steps=cfg.steps, generator=gens, output_type="np")
            if kind.kind == "class":
                kwargs["class_labels"] = [it.label for it in part]
            elif kind.kind == "text":
                kwargs["prompt"] = [it.prompt for it in part]
                negatives = guidance.negative_prompts([it.negative_prompt for it in part])
                if negatives is not None:
                    kwargs["negative_prompt"] = negatives
            else:
                kwargs["batch_size"] = len(part)
            kwargs.update({key: [img] * len(part) for key, img in inputs.items()})
            result = pipe(**kwargs)
            images = getattr(result, "images", None)
            if images is None:
                raise ConfigError(f"model: {kind.name} does not return images (got {type(result).__name__}); generate writes images only")
            images = np.asarray(images, dtype=np.float64)
            if images.ndim == 3:
                images = images[..., None]
            for it, img in zip(part, images):
                info = png_info(settings[it.index])
                atomic_write(folder / it.file, lambda tmp, im=to_pil(img), inf=info: im.save(tmp, format="PNG", pnginfo=inf))
            chunks.append(images)
            bar.update(len(part))
    images = np.concatenate(chunks)
    manifest = "".join(json.dumps({"file": it.file, **settings[it.index]}, sort_keys=True) + "\n" for it in items)
    atomic_write_text(folder / "manifest.jsonl", manifest)
    upscale = cfg.upscale or (4 if min(images.shape[1:3]) < 32 else 1)
    grid = image_grid(images, rows=rows, upscale=upscale)
    atomic_write(out, lambda tmp: grid.save(tmp, format="PNG"))
    if reused:
        print(f"reused {reused} images an earlier run of the same settings wrote in {folder}")
    return out, images


def _claim_images_folder(cfg: GenerateConfig, folder: Path, items: list[Item], settings: dict[int, dict]) -> None:
    """Refuse to replace another run's images unless ``overwrite``; with it, remove that run's images and manifest."""
    conflict = earlier_run_conflict(folder, items, settings)
    if conflict is None:
        return
    if not cfg.overwrite:
        raise ConfigError(f"output: the images folder {str(folder)!r} holds another run's images ({conflict}); choose "
                          "another output, or set overwrite=true to replace them")
    for path in folder.glob("[0-9][0-9][0-9][0-9][0-9].png"):  # what this run can reuse stays
        index = int(path.stem)
        if index not in settings or finished_image(path, settings[index]) is None:
            path.unlink()
    (folder / "manifest.jsonl").unlink(missing_ok=True)


def load_generate_config(path=None, overrides=None) -> GenerateConfig:
    return load_config(GenerateConfig, path, overrides)


__all__ = ["GenerateConfig", "check_steps", "generate", "image_grid", "load_prompts", "pipeline_kind", "png_info",
           "with_default_scheduler"]
