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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from .atomic_io import atomic_write, atomic_write_text
from .config import DTYPE_NAMES, ConfigError, Spec, StrictModel, check_guidance_scale, load_config, torch_dtype
from .devices import check_device
from .run_folder import check_output_file, check_writable_folder

PROMPT_SUFFIXES = (".txt", ".jsonl")
# the default scheduler where a pipeline passes its own sigmas (Qwen-Image): DPM-Solver++ 2M on steerdiff's core
DEFAULT_ON_OWN_SIGMAS = Spec(name="dpmpp_2m_hb", kwargs={"beta": 1.0})
# pipeline call arguments set from their own config fields, never from call_kwargs
CALL_FIELDS = frozenset({"prompt", "negative_prompt", "class_labels", "batch_size", "generator", "num_inference_steps",
                         "output_type", "image", "mask_image", "strength", "height", "width"})


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
def image_grid(images: np.ndarray, rows: int, upscale: int = 1, gap: int = 1) -> Image.Image:
    """Tile (N, H, W, C) images in [0, 1] into ``rows`` rows, each nearest-neighbour upscaled, with ``gap`` white
    pixels between cells (so that neighbouring images do not run together)."""
    n, h, w, c = images.shape
    cols = -(-n // rows)
    big = np.repeat(np.repeat(images, upscale, axis=1), upscale, axis=2) if upscale > 1 else images
    hh, ww = h * upscale, w * upscale
    grid = np.ones((rows * hh + (rows - 1) * gap, cols * ww + (cols - 1) * gap, c), dtype=np.float64)
    for i, img in enumerate(big):
        r, k = divmod(i, cols)
        top, left = r * (hh + gap), k * (ww + gap)
        grid[top : top + hh, left : left + ww] = img
    return to_pil(grid)


def to_pil(image: np.ndarray) -> Image.Image:
    """(H, W, C) in [0, 1] -> an 8-bit PIL image (grey for one channel)."""
    u8 = (np.asarray(image, dtype=np.float64) * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(u8[..., 0] if u8.shape[-1] == 1 else u8)


def check_steps(scheduler, steps: int) -> None:
    """Lay the grid out once before sampling: a scheduler that cannot take ``steps`` distinct steps (a discrete
    training schedule has num_train_timesteps of them) is an error now, not an IndexError mid-run."""
    from .samplers.registry import lay_out

    try:
        lay_out(scheduler, steps)
    except (ValueError, IndexError) as err:
        raise ValueError(f"steps={steps}: {type(scheduler).__name__} cannot lay out that many steps ({err})") from None
    timesteps = scheduler.timesteps
    deliberate = 1 if scheduler.config.get("skip_prk_steps") else 0  # PLMS repeats one timestep by design
    if len(timesteps) - len(torch.unique(timesteps)) > deliberate:
        limit = scheduler.config.get("num_train_timesteps")
        raise ValueError(
            f"steps={steps}: {type(scheduler).__name__} repeats timesteps at this many steps"
            + (f" (the model has num_train_timesteps={limit}; use at most {limit})" if limit else "")
        )


# -- conditioning ----------------------------------------------------------------------------------------------------
def load_prompts(value: list[str] | str, what: str = "prompts") -> list[dict[str, str | None]]:
    """``[{"prompt", "negative_prompt"}]`` from a list, a ``.txt`` file (one prompt per non-empty line) or a
    ``.jsonl`` file (one object per line with a string ``prompt`` and optionally ``negative_prompt``)."""
    if isinstance(value, list):
        if not all(isinstance(p, str) and p.strip() for p in value):
            raise ConfigError(f"{what}: every prompt must be a non-empty string")
        return [{"prompt": p, "negative_prompt": None} for p in value]
    path = Path(value).expanduser()
    if path.suffix not in PROMPT_SUFFIXES:
        raise ConfigError(f"{what}: {value!r} is neither a list of prompts nor a file ending in {' or '.join(PROMPT_SUFFIXES)}")
    if not path.is_file():
        raise ConfigError(f"{what}: prompt file {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: prompt file {str(path)!r} is not UTF-8 text") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            out.append({"prompt": line.strip(), "negative_prompt": None})
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{what}: {str(path)!r} line {n} is not JSON ({err.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise ConfigError(f"{what}: {str(path)!r} line {n} must be an object with a non-empty string \"prompt\"")
        unknown = sorted(set(item) - {"prompt", "negative_prompt"})
        if unknown:
            raise ConfigError(f"{what}: {str(path)!r} line {n} has unknown keys {unknown}; allowed: prompt, negative_prompt")
        negative = item.get("negative_prompt")
        if negative is not None and not isinstance(negative, str):
            raise ConfigError(f"{what}: {str(path)!r} line {n}: negative_prompt must be a string")
        out.append({"prompt": item["prompt"], "negative_prompt": negative})
    if not out:
        raise ConfigError(f"{what}: prompt file {str(path)!r} holds no prompts")
    return out


def resolve_prompts(prompts: list[str] | str, negative_prompts: list[str] | str | None = None) -> list[dict[str, str | None]]:
    """``[{"prompt", "negative_prompt"}]``: the prompts (a list or a file) with ``negative_prompts`` (one string for
    all, or a list / file with one per prompt) filled in where a ``.jsonl`` line gave none."""
    out = load_prompts(prompts, "prompts")
    if negative_prompts is None:
        return out
    if isinstance(negative_prompts, str) and Path(negative_prompts).suffix not in PROMPT_SUFFIXES:
        negative_prompts = [negative_prompts]
    negatives = [n["prompt"] for n in load_prompts(negative_prompts, "negative_prompts")]
    if len(negatives) == 1:
        negatives = negatives * len(out)
    if len(negatives) != len(out):
        raise ConfigError(f"negative_prompts: give one, or one per prompt ({len(out)}); got {len(negatives)}")
    for p, n in zip(out, negatives):
        p["negative_prompt"] = p["negative_prompt"] or n
    return out


@dataclass
class PipelineKind:
    """What a pipeline class takes, read from its ``__call__`` signature before any weights are loaded."""

    cls: type
    kind: Literal["class", "text", "unconditional"]
    params: frozenset = field(default_factory=frozenset)

    @property
    def name(self) -> str:
        return self.cls.__name__

    def takes(self, param: str) -> bool:
        return param in self.params


def pipeline_kind(cls: type) -> PipelineKind:
    from .pipelines.class_conditional import ClassConditionalPipeline

    params = frozenset(inspect.signature(cls.__call__).parameters)
    if issubclass(cls, ClassConditionalPipeline) or "class_labels" in params:
        kind = "class"
    elif "prompt" in params:
        kind = "text"
    else:
        kind = "unconditional"
    return PipelineKind(cls, kind, params)


def resolve_pipeline_class(model: str) -> tuple[type, Path | None]:
    """The pipeline class of a built-in name or a local folder, and the folder (None for built-ins): no weights
    are read.  A folder that is not a pipeline or model folder is an error naming what it lacks."""
    import diffusers

    from .pipelines.class_conditional import ClassConditionalPipeline
    from .pipelines.loading import BUILTIN_MODELS

    if model in BUILTIN_MODELS:
        return ClassConditionalPipeline, None
    root = Path(model).expanduser()
    if not root.is_dir():
        raise ConfigError(f"model: {model!r} is neither a built-in model {BUILTIN_MODELS} nor an existing folder")
    index = root / "model_index.json"
    if not index.is_file():
        if (root / "config.json").is_file():  # a class-conditional model folder (UNet2DModel / mixture)
            return ClassConditionalPipeline, root
        raise ConfigError(
            f"model: folder {str(root)!r} is not a diffusers pipeline (no model_index.json) nor a model folder "
            "(no config.json); save one with pipe.save_pretrained(folder)"
        )
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except json.JSONDecodeError as err:
        raise ConfigError(f"model: {str(index)!r} is not valid JSON ({err.msg})") from None
    if name == "ClassConditionalPipeline":
        return ClassConditionalPipeline, root
    cls = getattr(diffusers, str(name), None)
    if not isinstance(cls, type) or not issubclass(cls, diffusers.DiffusionPipeline):
        raise ConfigError(f"model: {str(index)!r} names pipeline class {name!r}, which diffusers {diffusers.__version__} does not have")
    return cls, root


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


def check_image_file(path: str, key: str) -> None:
    """``path`` is an image file PIL can decode (its pixels are read: a truncated file is found now)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}: image file {path!r} does not exist")
    try:
        with Image.open(file) as im:
            im.load()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ConfigError(f"{key}: {path!r} is not an image PIL can read ({type(err).__name__}: {err})") from None


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


def check_call_kwargs(kind: PipelineKind, call_kwargs: dict[str, Any]) -> None:
    """Each value has the type the pipeline's signature annotates (pydantic's lax rules: "0.5" is a float); an
    argument that takes tensors or images only cannot come from a config."""
    import typing

    from pydantic import ConfigDict, TypeAdapter, ValidationError

    try:
        hints = typing.get_type_hints(kind.cls.__call__)
    except Exception:  # annotations this Python cannot evaluate: the pipeline checks its own inputs
        return
    for key, value in call_kwargs.items():
        hint = hints.get(key)
        if hint is None or hint is Any:
            continue
        try:
            TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True)).validate_python(value)
        except ValidationError:
            raise ConfigError(f"call_kwargs.{key}: {kind.name} takes {_type_name(hint)}, got {value!r}") from None
        except Exception:  # a type pydantic cannot check
            continue


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


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


@dataclass
class GuidancePlan:
    """How the pipeline is called for ``cfg.guidance``: keyword arguments, and a rule for guide() (or None)."""

    kwargs: dict[str, Any]
    rule: Any = None
    negative_default: str | None = None  # true-CFG pipelines (Flux, Qwen-Image) guide only with a negative prompt


def plan_guidance(spec: Spec | None, kind: PipelineKind) -> GuidancePlan:
    if spec is None:
        return GuidancePlan({})
    if kind.kind == "unconditional":
        raise ConfigError(f"guidance: {kind.name} is unconditional and takes no guidance; set guidance: null")
    true_cfg = kind.takes("true_cfg_scale")
    key = "true_cfg_scale" if true_cfg else "guidance_scale"
    if not kind.takes(key):
        raise ConfigError(f"guidance: {kind.name} takes no guidance_scale; set guidance: null")
    from .guidance import get_rule
    from .pipelines.class_conditional import ClassConditionalPipeline
    from .pipelines.hooks import CFG_ON, SUPPORTED_PIPELINES

    hookable = kind.kind == "class" or any(c.__name__ in SUPPORTED_PIPELINES for c in kind.cls.__mro__)
    if spec.name == "cfg" and not isinstance(spec.scale, dict) and set(spec.kwargs) <= {"scale"}:
        try:
            scale = check_guidance_scale(spec.kwargs.get("scale", 1.0), "guidance: cfg scale (or a weight-schedule mapping)")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        # diffusers' pipelines switch their CFG branch off at scale <= 1 (steerdiff's class pipeline does not): a
        # scale under 1 goes in as a rule with the branch on, scale 0 being the unconditional model
        if scale >= 1 or issubclass(kind.cls, ClassConditionalPipeline):
            return GuidancePlan({key: float(scale)}, negative_default="" if true_cfg and scale > 1 else None)
        if not hookable:
            raise ConfigError(f"guidance: cfg scale {scale} < 1: {kind.name} turns its CFG off at scale <= 1 (it would "
                              "sample at scale 1) and guide() cannot hook it to apply the scale; use a scale >= 1")
    if not hookable:
        raise ConfigError(
            f"guidance: guide() cannot hook {kind.name} (it hooks {', '.join(SUPPORTED_PIPELINES)}); use guidance "
            "{name: cfg, scale: w} (the pipeline's own CFG) or null"
        )
    try:
        rule = get_rule(spec.name, **spec.kwargs)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise ConfigError(f"guidance: {err}") from None
    return GuidancePlan({key: CFG_ON}, rule=rule, negative_default="" if true_cfg else None)


def _num_classes(pipe) -> int | None:
    """Classes of a class-conditional pipeline: steerdiff's (its null class id), DiT's (num_embeds_ada_norm)."""
    from .pipelines.class_conditional import ClassConditionalPipeline, null_class_id
    from .pipelines.hooks import main_denoiser

    if isinstance(pipe, ClassConditionalPipeline):
        return null_class_id(pipe.unet)
    value = getattr(main_denoiser(pipe).config, "num_embeds_ada_norm", None)
    return int(value) if value else None


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


def png_info(settings: dict[str, Any]) -> PngInfo:
    """PNG text chunks: ``steerdiff`` (all settings as JSON) and one chunk per main setting."""
    info = PngInfo()
    info.add_text("steerdiff", json.dumps(settings, sort_keys=True))
    for key in ("model", "prompt", "negative_prompt", "class_label", "seed", "steps"):
        if settings.get(key) is not None:
            info.add_text(key, str(settings[key]))
    for key in ("scheduler", "guidance"):
        if settings.get(key) is not None:
            info.add_text(key, json.dumps(settings[key], sort_keys=True))
    return info


def _finished_image(path: Path, settings: dict[str, Any]) -> np.ndarray | None:
    """The image at ``path`` (H, W, C) in [0, 1] if an earlier run wrote it with these exact settings, else None."""
    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            if json.loads(im.text.get("steerdiff", "null")) != json.loads(json.dumps(settings)):
                return None
            pixels = np.asarray(im, dtype=np.float64) / 255
    except (OSError, ValueError):
        return None  # unreadable or damaged: made again
    return pixels[..., None] if pixels.ndim == 2 else pixels


def images_folder(output: Path) -> Path:
    """Where the images and manifest of the grid ``output`` go: the folder beside it named after it."""
    return output.with_suffix("")


def load_generation_pipeline(cfg: GenerateConfig, cls: type, folder: Path | None):
    return load_any_pipeline(cfg.model, cls, folder, cfg.device, torch_dtype(cfg.dtype))


def load_any_pipeline(model: str, cls: type, folder: Path | None, device, dtype: torch.dtype):
    """A built-in or local class-conditional model (:func:`steerdiff.pipelines.loading.load_pipeline`), or any local
    diffusers pipeline folder: ``cls.from_pretrained(folder, local_files_only=True, use_safetensors=True)`` after every
    component's weights are checked to be complete safetensors files."""
    from .pipelines.class_conditional import ClassConditionalPipeline
    from .pipelines.folder import check_components, model_index
    from .pipelines.loading import load_pipeline

    if issubclass(cls, ClassConditionalPipeline):
        return load_pipeline(model, device=device, dtype=dtype)
    from .weights import check_safetensors_folder

    check_components(folder)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if (sub / "config.json").is_file():  # a model component: safetensors only, complete, before diffusers reads it
            check_safetensors_folder(sub)
    # components saved as None (SD3 without its T5 encoder) are passed as None: diffusers would ask for them
    absent = {k: None for k, v in model_index(folder).items()
              if not k.startswith("_") and isinstance(v, list) and v[:1] == [None]}
    pipe = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, dtype=dtype, **absent)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def planned_scheduler(spec: Spec | None, folder: Path):
    """The scheduler a run of a diffusers folder samples with, built from the folder's scheduler config alone:
    ``spec`` by name (its noise process checked against the model's), or the folder's own class.  The model's
    noise process and prediction type must be ones steerdiff understands (:mod:`steerdiff.core.process`), whichever
    scheduler runs: a config it cannot read is an error here, not a failure in the first sampling step."""
    from .core.process import noise_process_from_config, prediction_type_from_config
    from .pipelines.folder import folder_scheduler_config
    from .samplers.registry import make_scheduler

    config = folder_scheduler_config(folder)
    try:
        noise_process_from_config(config), prediction_type_from_config(config)
    except ValueError as err:
        raise ConfigError(f"model: {str(folder / 'scheduler' / 'scheduler_config.json')!r}: {err}") from None
    name = spec.name if spec is not None else config.get("_class_name")
    try:
        return make_scheduler(name, config, **(spec.kwargs if spec is not None else {}))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"scheduler: {err}") from None


def with_default_scheduler(cfg: GenerateConfig) -> GenerateConfig:
    """``cfg``, or, where the config left the scheduler at its default and the pipeline passes its own sigmas, which
    the default (diffusers' DPMSolverMultistepScheduler) cannot take (Qwen-Image), ``cfg`` with
    ``DEFAULT_ON_OWN_SIGMAS``: DPM-Solver++ 2M on steerdiff's core, which takes them.  Said when it happens, and
    recorded with the images as what ran."""
    from .pipelines.class_conditional import ClassConditionalPipeline
    from .pipelines.folder import passes_own_sigmas, runs_in

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
    from contextlib import ExitStack

    from .pipelines.folder import check_image_size, check_runs_in, makes_videos

    cfg = with_default_scheduler(cfg)
    from .pipelines.hooks import guide
    from .pipelines.watch import watch_nonfinite
    from .run_folder import RunFolderLock, make_folder
    from .samplers.registry import make_scheduler

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
        from .pipelines.folder import check_components

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
            items, rows = plan_items(cfg, kind, _num_classes(pipe))
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
                stack.enter_context(guide(pipe, guidance.rule))
            except (ValueError, TypeError, FileNotFoundError) as err:
                raise ConfigError(f"guidance: {err}") from None
        elif kind.kind != "class":  # the class pipeline checks its own outputs
            stack.enter_context(watch_nonfinite(pipe))
        bar = stack.enter_context(tqdm(total=len(items), desc="generate", unit="image", disable=not progress))
        for start in range(0, len(items), cfg.batch_size):
            part = items[start : start + cfg.batch_size]
            done = [_finished_image(folder / it.file, settings[it.index]) for it in part]
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
                negatives = [it.negative_prompt if it.negative_prompt is not None else guidance.negative_default for it in part]
                if any(n is not None for n in negatives):
                    kwargs["negative_prompt"] = [n or "" for n in negatives]
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
        if index not in settings or _finished_image(path, settings[index]) is None:
            path.unlink()
    (folder / "manifest.jsonl").unlink(missing_ok=True)


def load_generate_config(path=None, overrides=None) -> GenerateConfig:
    return load_config(GenerateConfig, path, overrides)


__all__ = ["GenerateConfig", "check_steps", "generate", "image_grid", "load_prompts", "pipeline_kind", "png_info",
           "with_default_scheduler"]
