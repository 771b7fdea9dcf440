"""The ``steerdiff benchmark`` config: a grid over model x scheduler x guidance x NFE x seed.

    name: baselines
    output_dir: runs/benchmark/baselines   # the run folder (resumable)
    models:                                # built-in "digits" / "mixture" or a local diffusers folder
      - {model: digits}
      - {model: mixture, metrics: [fd, divergence, l2_to_reference, log_likelihood]}
      - model: /models/sd15                # a text-to-image pipeline folder with its prompt set
        prompts: prompts/coco_1k.txt
        metrics: [{name: fid, kwargs: {weights: inception.safetensors, reference: coco_val_512/}},
                  {name: clip_score, kwargs: {model: /models/clip-vit-b32}}, saturation]
    schedulers:                            # any make_scheduler name (alias, diffusers or steerdiff class)
      - {name: ddim}
      - {name: dpmpp_2m, kwargs: {lower_order_final: true}, label: dpm++2m}
    guidance:                              # cfg + number: the pipeline's CFG, g = u + scale (c - u)
      - {name: cfg, scale: 1}
      - {name: cfg, scale: 5}
      - {name: apg, scale: 9, kwargs: {momentum: -0.5}}          # any steerdiff.guidance rule, via guide()
      - {name: cfg, scale: {schedule: linear, w0: 5}, label: cfg linear 5}
    nfe: [5, 10, 20]                       # denoiser evaluations per sample (a CFG batch counts once)
    seeds: [0]                             # sample i of a cell uses seed + i: same noise in every cell
    num_samples: 1000
    classes: null                          # null = every class; an int n = classes 0..n-1; or a list of ids
    batch_size: 250                        # fixed chunk size (results do not depend on the process count)
    metrics: [fd, precision_recall, divergence]   # default for models that do not list their own
    device: auto                           # auto = accelerate's device for this process

A metric, scheduler or guidance entry is a :class:`steerdiff.config.Spec`, ``{name, kwargs, label}``; a bare name is
accepted, and a guidance entry's weight may sit beside its name (``{name: apg, scale: 9}``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from ..config import Spec, StrictModel
from ..pipelines.loading import BUILTIN_MODELS

# One spec type for every named entry (steerdiff.config.Spec); the names say which list an entry belongs to.
MetricSpec = SchedulerSpec = GuidanceSpec = Spec


class ModelSpec(StrictModel):
    """A model of the grid: a built-in name or a local folder; a text-to-image pipeline folder takes ``prompts`` (a
    list, or a ``.txt`` / ``.jsonl`` file; sample i uses prompt i mod len(prompts)) and optionally
    ``negative_prompts``, ``height``, ``width`` and other ``call_kwargs`` of the pipeline call."""

    model: str
    label: str | None = None
    dtype: Literal["float32", "float64", "float16", "bfloat16"] = "float32"
    metrics: list[Spec] | None = None
    prompts: list[str] | str | None = None
    negative_prompts: list[str] | str | None = None
    height: int | None = Field(None, ge=8)
    width: int | None = Field(None, ge=8)
    call_kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _accept_bare_model(cls, data: Any) -> Any:
        return {"model": data} if isinstance(data, str) else data

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        return self.model if self.model in BUILTIN_MODELS else re.sub(r"[/\\]+$", "", self.model).split("/")[-1]


class ReportSpec(StrictModel):
    pivot: list[str] | None = None     # metric keys tabulated scheduler x NFE per model/guidance; None = fd, fid, l2_error
    table: list[str] | None = None     # metric keys (columns) of the all-cells table; None = all reported
    plots: list[str] | None = None     # metric keys plotted against NFE; None = all reported
    log_scale: list[str] = Field(default_factory=lambda: ["fd", "fid", "l2_error"])


class BenchmarkConfig(StrictModel):
    name: str = "benchmark"
    output_dir: str = "runs/benchmark"
    models: list[ModelSpec] = Field(min_length=1)
    schedulers: list[Spec] = Field(min_length=1)
    guidance: list[Spec] = Field(default_factory=lambda: [Spec(name="cfg", scale=1.0)], min_length=1)
    nfe: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0], min_length=1)
    num_samples: int = Field(1000, ge=1)
    classes: Annotated[int, Field(ge=1)] | list[Annotated[int, Field(ge=0)]] | None = None
    batch_size: int = Field(250, ge=1)
    metrics: list[Spec] = Field(
        default_factory=lambda: [Spec(name="fd"), Spec(name="precision_recall"), Spec(name="divergence")]
    )
    device: str = "auto"
    cache_dir: str | None = None       # reference statistics; None = $STEERDIFF_CACHE or ~/.cache/steerdiff
    keep_samples: bool = True          # keep the sample chunks after a cell is finished (needed to re-score)
    progress: bool = True
    overwrite: bool = False            # a run folder of another config: refused; true = run this one there
    report: ReportSpec = Field(default_factory=ReportSpec)

    @field_validator("guidance", mode="before")
    @classmethod
    def _guidance_names(cls, value: Any) -> Any:  # {scale: 5} is the pipeline's CFG at 5
        return [Spec.with_default_name(v, "cfg") for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _unique_labels(self) -> "BenchmarkConfig":
        for field, items in (("models", self.models), ("schedulers", self.schedulers), ("guidance", self.guidance)):
            labels = [item.display for item in items]
            dupes = sorted({x for x in labels if labels.count(x) > 1})
            if dupes:
                raise ValueError(f"{field}: entries {dupes} appear twice; give them distinct `label`s")
        for field, values in (("nfe", self.nfe), ("seeds", self.seeds)):
            if len(set(values)) != len(values):
                raise ValueError(f"{field} lists a value twice: {values}")
        if isinstance(self.classes, list) and not self.classes:
            raise ValueError("classes must not be an empty list (use null for every class)")
        return self

    def metrics_for(self, model: ModelSpec) -> list[Spec]:
        return model.metrics if model.metrics is not None else self.metrics
