"""Calling any diffusers pipeline from a config: what a pipeline class takes (read from its signature, before any
weights), prompts from lists or files, the guidance plan of a guidance entry, loading a built-in model or a local
pipeline folder, and the scheduler a run samples with.  Used by ``steerdiff generate`` and every benchmark cell.

The modules that import diffusers' models (our pipelines, the hook, the registry) are imported inside the functions
that need them, so that reading and checking a config (and ``steerdiff --help``) stays fast.
"""

from __future__ import annotations

import copy
import inspect
import json
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from ..config import ConfigError, Spec, check_guidance_scale
from ..weights import check_safetensors_folder
from .folder import check_components, folder_scheduler_config, model_index

PROMPT_SUFFIXES = (".txt", ".jsonl")
# pipeline call arguments set from their own config fields, never from call_kwargs
CALL_FIELDS = frozenset({"prompt", "negative_prompt", "class_labels", "batch_size", "generator", "num_inference_steps",
                         "output_type", "image", "mask_image", "strength", "height", "width"})


def check_steps(scheduler, steps: int) -> None:
    """Lay the grid out once before sampling: a scheduler that cannot take ``steps`` distinct steps (a discrete
    training schedule has num_train_timesteps of them) is an error now, not an IndexError mid-run."""
    from ..samplers.registry import lay_out

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
    from .class_conditional import ClassConditionalPipeline

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

    from .class_conditional import ClassConditionalPipeline
    from .loading import BUILTIN_MODELS

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


def check_call_kwargs(kind: PipelineKind, call_kwargs: dict[str, Any]) -> None:
    """Each value has the type the pipeline's signature annotates (pydantic's lax rules: "0.5" is a float); an
    argument that takes tensors or images only cannot come from a config."""
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


@dataclass
class PipelineCall:
    """Keyword arguments of one pipeline call; ``evaluations`` is filled in after the call where the plan's rule
    knows how many network rows really ran (a rule that skips unconditional rows), else left None."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    evaluations: int | None = None


@dataclass
class GuidancePlan:
    """How a pipeline is called for one guidance entry, made once per (entry, pipeline kind) by :func:`plan_guidance`
    and used by ``steerdiff generate`` and every benchmark cell: the call's keyword arguments, the rule that goes in
    with ``guide()`` (None: the pipeline's own CFG at ``scale``), and the negative prompt true-CFG pipelines need."""

    kwargs: dict[str, Any]
    rule: Any = None
    negative_default: str | None = None  # true-CFG pipelines (Flux, Qwen-Image) guide only with a negative prompt
    scale: float | None = None  # the pipeline's own CFG weight (None with a rule, or without guidance)

    @contextmanager
    def pipeline_call(self, pipe, check_finite: bool = False) -> Iterator[PipelineCall]:
        """The call's keyword arguments, with a fresh copy of the rule attached by ``guide()`` for the call (its NaN
        check off by default: a benchmark records a diverging cell); afterwards the network rows it ran."""
        call = PipelineCall(dict(self.kwargs))
        if self.rule is None:
            yield call
            return
        from .hooks import guide

        with guide(pipe, copy.deepcopy(self.rule), check_finite=check_finite) as hook:
            yield call
        call.evaluations = hook.network_evaluations

    def negative_prompts(self, negatives: list[str | None]) -> list[str] | None:
        """The ``negative_prompt`` argument for samples with these negative prompts (None where a sample has none):
        the plan's default fills the gaps; None when no sample has one."""
        filled = [n if n is not None else self.negative_default for n in negatives]
        return [n or "" for n in filled] if any(n is not None for n in filled) else None

    def model_fn(self, denoiser, labels: torch.Tensor, process=None, prediction_type: str = "epsilon"):
        """The guided network as a model boundary (:class:`steerdiff.core.Denoiser`) for reference solutions: the
        pipeline's own CFG at ``scale``, or a fresh copy of the rule (the solver resets it at its start)."""
        from .conditioning import denoiser_for

        if process is None:
            process = getattr(denoiser, "process", None)  # the analytic mixture carries its own
            if process is None:
                raise ValueError("model_fn needs the model's noise process (process=)")
        guidance = self.scale if self.rule is None else copy.deepcopy(self.rule)
        return denoiser_for(denoiser, process, prediction_type, 1.0 if guidance is None else guidance, cond=labels)


def guidance_entry(spec: Spec):
    """What a guidance entry asks for, independent of the pipeline: the weight w of ``{name: cfg, scale: w}`` (a
    number, no other kwargs: the pipeline's own CFG), or the rule any other entry names (``get_rule``).  A ValueError
    (TypeError, FileNotFoundError for a missing LinearAG file) names the rule's options."""
    if spec.name == "cfg" and not isinstance(spec.scale, dict) and set(spec.kwargs) <= {"scale"}:
        return check_guidance_scale(spec.kwargs.get("scale", 1.0), "cfg scale (or a weight-schedule mapping)")
    from ..guidance import get_rule

    return get_rule(spec.name, **spec.kwargs)


def plan_guidance(spec: Spec | None, kind: PipelineKind, entry=None) -> GuidancePlan:
    """The plan of ``spec`` for pipelines of ``kind`` (``entry``: :func:`guidance_entry` of ``spec`` when the caller
    built it already, so that a rule is built once for every pipeline).  A w >= 1 is the pipeline's own CFG; a
    w < 1, where a diffusers pipeline turns its CFG branch off, and every rule go in with ``guide()``."""
    if spec is None:
        return GuidancePlan({})
    if kind.kind == "unconditional":
        raise ConfigError(f"guidance: {kind.name} is unconditional and takes no guidance; set guidance: null")
    true_cfg = kind.takes("true_cfg_scale")
    key = "true_cfg_scale" if true_cfg else "guidance_scale"
    if not kind.takes(key):
        raise ConfigError(f"guidance: {kind.name} takes no guidance_scale; set guidance: null")
    if entry is None:
        try:
            entry = guidance_entry(spec)
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise ConfigError(f"guidance: {err}") from None
    from .class_conditional import ClassConditionalPipeline
    from .hooks import CFG_ON, SUPPORTED_PIPELINES

    hookable = kind.kind == "class" or any(c.__name__ in SUPPORTED_PIPELINES for c in kind.cls.__mro__)
    rule = entry
    if isinstance(entry, float):
        # diffusers' pipelines switch their CFG branch off at scale <= 1 (steerdiff's class pipeline does not): a
        # scale under 1 goes in as a rule with the branch on, scale 0 being the unconditional model
        if entry >= 1 or issubclass(kind.cls, ClassConditionalPipeline):
            return GuidancePlan({key: entry}, negative_default="" if true_cfg and entry > 1 else None, scale=entry)
        if not hookable:
            raise ConfigError(f"guidance: cfg scale {entry} < 1: {kind.name} turns its CFG off at scale <= 1 (it would "
                              "sample at scale 1) and guide() cannot hook it to apply the scale; use a scale >= 1")
        from ..guidance import get_rule

        rule = get_rule("cfg", scale=entry)
    if not hookable:
        raise ConfigError(
            f"guidance: guide() cannot hook {kind.name} (it hooks {', '.join(SUPPORTED_PIPELINES)}); use guidance "
            "{name: cfg, scale: w} (the pipeline's own CFG) or null"
        )
    return GuidancePlan({key: CFG_ON}, rule=rule, negative_default="" if true_cfg else None)


def num_classes(pipe) -> int | None:
    """Classes of a class-conditional pipeline: steerdiff's (its null class id), DiT's (num_embeds_ada_norm)."""
    from .class_conditional import ClassConditionalPipeline, null_class_id
    from .hooks import main_denoiser

    if isinstance(pipe, ClassConditionalPipeline):
        return null_class_id(pipe.unet)
    value = getattr(main_denoiser(pipe).config, "num_embeds_ada_norm", None)
    return int(value) if value else None


def load_any_pipeline(model: str, cls: type, folder: Path | None, device, dtype: torch.dtype):
    """A built-in or local class-conditional model (:func:`steerdiff.pipelines.loading.load_pipeline`), or any local
    diffusers pipeline folder: ``cls.from_pretrained(folder, local_files_only=True, use_safetensors=True)`` after every
    component's weights are checked to be complete safetensors files."""
    from .class_conditional import ClassConditionalPipeline
    from .loading import load_pipeline

    if issubclass(cls, ClassConditionalPipeline):
        return load_pipeline(model, device=device, dtype=dtype)

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
    from ..core.process import model_process
    from ..samplers.registry import make_scheduler

    config = folder_scheduler_config(folder)
    try:
        model_process(config)
    except ValueError as err:
        raise ConfigError(f"model: {str(folder / 'scheduler' / 'scheduler_config.json')!r}: {err}") from None
    name = spec.name if spec is not None else config.get("_class_name")
    try:
        return make_scheduler(name, config, **(spec.kwargs if spec is not None else {}))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"scheduler: {err}") from None
