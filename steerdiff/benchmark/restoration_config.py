"""The ``steerdiff restore`` config: tasks (an operator and a measurement noise sigma_y) x restoration methods, on
the digits split or a folder of images, scored by named metrics.

    model: digits                          # the embedded digits model or a local UNet pipeline folder
    data: {source: digits, split: test, num_images: 200, reference_split: train}
    tasks:
      - {name: box, operator: {name: box}}
      - {name: sr2 noisy, operator: {name: super_resolution, factor: 2}, sigma_y: 0.05}
    methods: [{name: mcg, step_size: 1}, {name: dps, step_size: 0.5}, {name: projection}, {name: unconditional}]
    sampler: {name: ancestral, steps: 100}  # the papers' ancestral DDPM sampler, or any scheduler name
    metrics: [psnr, ssim, fd, accuracy]     # the metrics registry's psnr, ssim, fd and class_accuracy

The run is :func:`steerdiff.benchmark.restoration.run`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..config import Spec, StrictModel
from ..guidance import get_rule
from ..guidance.manifold import RestorationMethod, make_method
from .grid import slug

OPERATOR_NAMES = ("box", "random", "extreme", "super_resolution", "blur", "denoising", "colorization")
METRICS = ("psnr", "ssim", "fd", "accuracy")


class OperatorSpec(StrictModel):
    name: Literal["box", "random", "extreme", "super_resolution", "blur", "denoising", "colorization"]
    size: int | None = Field(None, ge=1)  # box / extreme: side of the (missing / kept) box; None = half the image
    missing: float = Field(0.5, ge=0, le=1)  # random: fraction of missing pixels
    factor: int = Field(2, ge=1)  # super_resolution
    kernel_size: int = Field(3, ge=1)  # blur (odd)
    sigma: float = Field(1.0, gt=0)  # blur
    padding: Literal["circular", "zeros"] = "circular"  # blur


class MethodSpec(StrictModel):
    name: Literal["mcg", "dps", "dds", "projection", "unconditional"]
    step_size: float = Field(1.0, ge=0)  # mcg / dps
    step_size_rule: Literal["norm", "residual", "constant"] = "norm"  # mcg / dps
    cg_steps: int | None = Field(None, ge=0)  # dds (default 5)
    eta: float | None = Field(None, ge=0, le=1)  # dds (default 0.85)
    gamma: float | None = Field(None, gt=0)  # dds, noisy measurements (default 1)
    label: str | None = None  # name in tables and files; default e.g. "dps 0.5"

    @model_validator(mode="after")
    def _dds_options(self) -> "MethodSpec":
        given = [k for k in ("cg_steps", "eta", "gamma") if getattr(self, k) is not None]
        if given and self.name != "dds":
            raise ValueError(f"{', '.join(given)}: options of dds, not of {self.name}")
        return self

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        return f"{self.name} {self.step_size:g}" if self.name in ("mcg", "dps") else self.name

    def build(self) -> RestorationMethod:
        if self.name in ("mcg", "dps"):
            return make_method(self.name, step_size=self.step_size, step_size_rule=self.step_size_rule)
        if self.name == "dds":
            return make_method("dds", **{k: getattr(self, k) for k in ("cg_steps", "eta", "gamma") if getattr(self, k) is not None})
        return make_method(self.name)


class TaskSpec(StrictModel):
    name: str
    operator: OperatorSpec
    sigma_y: float = Field(0.0, ge=0)
    methods: list[MethodSpec] | None = None  # overrides the run's methods for this task


class SamplerSpec(Spec):
    """The shared ``{name, kwargs}`` spec with the number of steps."""

    name: str = "ancestral"  # the papers' ancestral DDPM sampler, or any scheduler name / alias (ddim, ...)
    steps: int = Field(100, ge=1)


class DataSpec(StrictModel):
    source: str = "digits"  # "digits" or a folder of images of the model's size
    split: Literal["all", "train", "test"] = "test"
    num_images: int = Field(200, ge=1)
    reference_split: Literal["all", "train", "test"] = "train"  # the FD reference (digits only)


class RestoreConfig(StrictModel):
    model: str = "digits"
    data: DataSpec = Field(default_factory=DataSpec)
    tasks: list[TaskSpec] = Field(min_length=1)
    methods: list[MethodSpec] = Field(min_length=1)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    use_labels: bool = False  # condition a class-conditional model on the true class
    guidance_scale: float = Field(1.0, ge=0)  # classifier-free guidance towards that class (needs use_labels)
    guidance: Spec | None = None  # or any guidance rule by name towards that class: {name: pag, scale: 3, kwargs: {...}}
    metrics: list[Literal["psnr", "ssim", "fd", "accuracy"]] = Field(default_factory=lambda: list(METRICS))
    seed: int = 0
    batch_size: int = Field(200, ge=1)
    device: str = "cpu"
    dtype: Literal["float32", "float64"] = "float32"
    num_threads: int | None = Field(None, ge=1)  # torch intra-op threads (None = torch's default)
    grid_images: int = Field(8, ge=1)
    upscale: int = Field(4, ge=1, le=64)
    output_dir: str = "outputs/restore/digits"
    resume: bool = True
    overwrite: bool = False  # an output_dir of another config: refused; true = run this one there

    def task_methods(self, task: TaskSpec) -> list[MethodSpec]:
        return task.methods if task.methods is not None else self.methods

    @model_validator(mode="after")
    def _unique_names(self):
        groups = [("task", [t.name for t in self.tasks])] + [
            ("method", [m.display for m in self.task_methods(t)]) for t in self.tasks]
        for what, names in groups:
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{what} names must be unique; repeated: {dup} (set a distinct name/label)")
            files = [slug(n) for n in dict.fromkeys(names)]  # the names of their files and folders
            clash = sorted({n for n in dict.fromkeys(names) if not slug(n) or files.count(slug(n)) > 1})
            if clash:
                raise ValueError(f"{what} names {clash} make the file names {[slug(n) for n in clash]} (empty or the "
                                 "same); name them apart with letters, digits and . + -")
        own_step = sorted({m.name for t in self.tasks for m in self.task_methods(t) if m.name == "dds"})
        if own_step and self.sampler.name != "ancestral":
            raise ValueError(f"methods {own_step} take their own DDIM step on the ancestral sampler; set sampler.name: "
                             f"ancestral (got {self.sampler.name!r})")
        if self.guidance_scale != 1.0 and not self.use_labels:
            raise ValueError("guidance_scale != 1 needs use_labels: true (guidance towards the true class)")
        if self.guidance is not None:
            if not self.use_labels:
                raise ValueError("guidance needs use_labels: true (guidance towards the true class)")
            if self.guidance_scale != 1.0:
                raise ValueError("give guidance_scale or guidance, not both (the rule sets the guidance)")
            try:
                get_rule(self.guidance.name, **self.guidance.kwargs)
            except (ValueError, TypeError, FileNotFoundError) as err:
                raise ValueError(f"guidance: {err}") from None
        return self
