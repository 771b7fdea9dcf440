"""``steerdiff restore``: degrade images, restore them with MCG / DPS / projection-only / plain sampling, and score.

For every task (an operator and a measurement noise sigma_y) and every method of the config, the images of
``data`` (the digits split, or a folder of images) are measured, y = A x + sigma_y n, and restored with
:class:`~steerdiff.pipelines.restoration.RestorationPipeline`.  Written to ``output_dir``, each file atomically
(a temporary file renamed into place, so an interrupted run leaves no half-written file):

- ``results.jsonl``   one record per (task, method): metrics, network calls, wall time, the cell's fingerprint;
- ``table.md``        the same as a Markdown table, with the FD of the originals themselves (the floor at this N);
- ``<task>.png``      a grid: originals, measurements (A^+ y, or y where it is an image; missing pixels grey),
                      then one row per method;
- ``<task>/<method>.safetensors``  the restorations (float32, in [-1, 1] model space);
- ``config.yaml``     the config; a folder holding another config's results is refused (``overwrite: true``
                      runs the new one there), and a second process on the same folder is refused while the first runs.

With ``resume: true`` a cell whose fingerprint (everything that determines its result) matches a record and whose
restorations are on disk is not recomputed.  Metrics: PSNR and SSIM to the originals
(:mod:`steerdiff.metrics.similarity`), the Frechet distance of the restorations to the reference split in the
digits classifier's feature space, and the accuracy with which that classifier recognises the original digit.

Randomness: image i is restored from generator ``seed + i``, its measurement noise from ``seed + 2_000_000 + i``
and its random mask from ``seed + 1_000_000 + i``, so results do not depend on ``batch_size``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file

from ..guidance import get_rule
from ..guidance.manifold import RestorationMethod, make_method
from ..devices import check_device
from ..run_folder import check_writable_folder, claim_run_folder
from ..guidance.operators import (
    Colorization, Denoising, GaussianBlur, Inpainting, InverseProblem, LinearOperator,
    SuperResolution, box_mask, extreme_mask, random_mask,
)
from ..metrics.similarity import psnr, ssim
from ..pipelines.class_conditional import sample_shape
from ..pipelines.loading import load_pipeline
from ..pipelines.restoration import RestorationPipeline
from ..samplers.registry import make_scheduler
from ..atomic_io import atomic_write
from ..config import Spec, StrictModel, load_config, torch_dtype
from ..image_files import image_grid

OPERATOR_NAMES = ("box", "random", "extreme", "super_resolution", "blur", "denoising", "colorization")
METRICS = ("psnr", "ssim", "fd", "accuracy")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


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


# -- files ---------------------------------------------------------------------------------------------------------
def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


# -- data and operators ----------------------------------------------------------------------------------------------
def _num_images(spec: DataSpec, available: int, source: str, hint: str = "") -> int:
    """How many images to restore: ``num_images`` when the source has them.  More than it has is an error when the
    config asked for them; the default (200) on a smaller source uses all of them and says so."""
    if spec.num_images <= available:
        return spec.num_images
    if "num_images" in spec.model_fields_set:
        raise ValueError(f"data.num_images: {source} has {available} images, asked for {spec.num_images}; use at most "
                         f"{available}{hint}")
    print(f"data.num_images: {source} has {available} images (fewer than the default {spec.num_images}); restoring all {available}")
    return available


def load_images(spec: DataSpec, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, C, H, W) images in [-1, 1] and their labels (None for a folder)."""
    if spec.source == "digits":
        from ..testbeds.digits import load_digits_data

        images, labels = load_digits_data(spec.split)
        if tuple(images.shape[1:]) != shape:
            raise ValueError(f"the digits are {tuple(images.shape[1:])} images; the model expects {shape}")
        n = _num_images(spec, len(images), f"the digits' {spec.split} split",
                        " (split: all has 1797)" if spec.split != "all" else "")
        return images[:n].to(torch.float32), labels[:n]
    folder = Path(spec.source).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"data.source {spec.source!r} is neither 'digits' nor an existing folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {str(folder)!r}")
    files = files[: _num_images(spec, len(files), repr(str(folder)))]
    c, h, w = shape
    out = []
    for f in files:
        try:
            img = Image.open(f).convert("L" if c == 1 else "RGB")
        except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for damaged or unknown files
            raise ValueError(f"data.source: image {str(f)!r} cannot be read ({err}); remove or replace it") from None
        if img.size != (w, h):
            raise ValueError(f"{f.name} is {img.size[0]}x{img.size[1]}; the model expects {w}x{h} images")
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1
        out.append(torch.from_numpy(arr.reshape(h, w, c)).permute(2, 0, 1))
    return torch.stack(out), None


def task_masks(spec: OperatorSpec, shape, n: int, seed: int) -> torch.Tensor | None:
    if spec.name == "box":
        return box_mask(shape[1:], spec.size)
    if spec.name == "extreme":
        return extreme_mask(shape[1:], spec.size)
    if spec.name == "random":
        return random_mask(shape[1:], spec.missing, generator=generators(seed + 1_000_000, n))
    return None


def make_operator(spec: OperatorSpec, masks: torch.Tensor | None) -> LinearOperator:
    if spec.name in ("box", "extreme", "random"):
        return Inpainting(masks)
    if spec.name == "super_resolution":
        return SuperResolution(spec.factor)
    if spec.name == "blur":
        return GaussianBlur(spec.kernel_size, spec.sigma, spec.padding)
    if spec.name == "colorization":
        return Colorization()
    return Denoising()


def batch_operator(spec: OperatorSpec, masks: torch.Tensor | None, sl: slice) -> LinearOperator:
    """The operator for images ``sl`` (per-image masks are sliced)."""
    return make_operator(spec, masks[sl] if masks is not None and masks.ndim == 4 else masks)


def generators(start: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(start + i) for i in range(n)]


def display(op: LinearOperator, y: torch.Tensor, shape) -> torch.Tensor:
    """An image of a measurement: y itself where it is image-shaped, else A^+ y (or A^T y)."""
    if tuple(y.shape[1:]) == tuple(shape):
        return y
    return op.pinv(y) if op.has_projection else op.transpose(y)


# -- metrics ---------------------------------------------------------------------------------------------------------
class Scorer:
    """Computes the requested metrics of restorations against the originals (lazy-loading the classifier)."""

    def __init__(self, metrics, originals, labels, reference_split):
        self.metrics, self.originals, self.labels = list(metrics), originals, labels
        needs_digits = {"fd", "accuracy"} & set(self.metrics)
        if needs_digits and labels is None:
            raise ValueError(
                f"metrics {sorted(needs_digits)} need the digits data set (data.source: digits); "
                "for an image folder use metrics: [psnr, ssim]"
            )
        self.reference_split = reference_split
        self._reference = None

    def reference_features(self):
        if self._reference is None:
            from ..metrics.classifier import digits_features
            from ..testbeds.digits import load_digits_data

            self._reference = digits_features(load_digits_data(self.reference_split)[0])
        return self._reference

    def fd(self, images: torch.Tensor) -> float:
        from ..metrics.classifier import digits_features
        from ..metrics.frechet import frechet_distance_from_features

        return frechet_distance_from_features(digits_features(images), self.reference_features())

    def __call__(self, restored: torch.Tensor) -> dict[str, float]:
        x = restored.to(torch.float64).clamp(-1, 1)
        out = {}
        if "psnr" in self.metrics:
            out["psnr"] = float(psnr(x, self.originals).mean())
        if "ssim" in self.metrics:
            out["ssim"] = float(ssim(x, self.originals).mean())
        if "fd" in self.metrics:
            out["fd"] = self.fd(x)
        if "accuracy" in self.metrics:
            from ..metrics.classifier import classify_digits

            out["accuracy"] = float((classify_digits(x) == self.labels).double().mean())
        return out


# -- the run ---------------------------------------------------------------------------------------------------------
def fingerprint(cfg: RestoreConfig, task: TaskSpec, method: MethodSpec) -> str:
    """Hash of everything that determines a cell's restorations (plain sampling ignores the task)."""
    keys = cfg.model_dump(include={"model", "data", "sampler", "use_labels", "guidance_scale", "seed", "dtype"})
    if cfg.guidance is not None:  # absent otherwise, so that the cells of earlier runs keep their fingerprints
        keys.update(guidance=cfg.guidance.model_dump(exclude={"label"}, exclude_none=True))
    keys.update(method=method.model_dump(exclude={"label"}, exclude_none=True))  # unset dds options: as before them
    if method.name != "unconditional":
        keys.update(task=task.model_dump(exclude={"name", "methods"}))
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def restore_all(pipe, cfg, task, method, y, labels, masks) -> tuple[torch.Tensor, dict[str, Any]]:
    """Restore every measurement of ``y`` in batches; returns the restorations and the cell's cost record."""
    n, calls, backward, start = y.shape[0], 0, 0, time.perf_counter()
    pipe.method = method.build()
    kwargs: dict[str, Any] = {"sampler": "ancestral" if cfg.sampler.name == "ancestral" else "scheduler"}
    chunks = []
    for lo in range(0, n, cfg.batch_size):
        sl = slice(lo, min(lo + cfg.batch_size, n))
        if cfg.use_labels:
            kwargs.update(class_labels=labels[sl].to(pipe.device), guidance_scale=cfg.guidance_scale)
            if cfg.guidance is not None:
                kwargs["guidance_rule"] = get_rule(cfg.guidance.name, **cfg.guidance.kwargs)
        out = pipe(y[sl], batch_operator(task.operator, masks, sl), task.sigma_y, cfg.sampler.steps,
                   generator=generators(cfg.seed + lo, sl.stop - lo), output_type="latent", **kwargs)
        chunks.append(out.images.detach().to("cpu", torch.float32))
        calls, backward = calls + out.network_calls, backward + out.backward_calls
    return torch.cat(chunks), {"network_calls": calls, "backward_calls": backward, "wall_s": time.perf_counter() - start}


def write_grid(path: Path, rows: list[torch.Tensor], upscale: int) -> None:
    stacked = torch.cat(rows).clamp(-1, 1)
    arr = ((stacked + 1) / 2).permute(0, 2, 3, 1).numpy()
    grid = image_grid(arr, rows=len(rows), upscale=upscale)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


TABLE_COLUMNS = [("psnr", "PSNR dB", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"), ("fd", "FD", "{:.2f}"),
                 ("accuracy", "class acc.", "{:.3f}")]


def markdown_table(records: list[dict[str, Any]]) -> str:
    cols = [c for c in TABLE_COLUMNS if any(c[0] in r for r in records)]
    head = ["task", "sigma_y", "method"] + [c[1] for c in cols] + ["network calls (fwd / bwd)", "time s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if r.get("skipped"):
            cells = ["n/a"] * len(cols) + [r["skipped"], ""]
        else:
            cells = [fmt.format(r[key]) if key in r else "" for key, _, fmt in cols]
            cells += [f"{r['network_calls']} / {r['backward_calls']}", f"{r['wall_s']:.1f}"]
        lines.append("| " + " | ".join([r["task"], f"{r['sigma_y']:g}", r["method"]] + cells) + " |")
    floor = next((r for r in records if "fd_originals" in r), None)
    if floor is not None:  # FD is strongly biased upwards at small N: show what the originals themselves score
        lines += ["", f"FD of the {floor['num_images']} original images themselves: {floor['fd_originals']:.2f} "
                      "(the floor for this number of images; compare FDs with it, not with 0)"]
    return "\n".join(lines) + "\n"


def run(cfg: RestoreConfig) -> list[dict[str, Any]]:
    check_writable_folder(cfg.output_dir)
    check_device(cfg.device)
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    base = load_pipeline(cfg.model, device=cfg.device, dtype=torch_dtype(cfg.dtype))
    scheduler = base.scheduler
    if cfg.sampler.name != "ancestral":
        scheduler = make_scheduler(cfg.sampler.name, scheduler.config, **cfg.sampler.kwargs)
    elif cfg.sampler.kwargs:
        raise ValueError("sampler.kwargs are options of a scheduler; the ancestral sampler takes none")
    pipe = RestorationPipeline(base.unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    shape = sample_shape(base.unet)
    images, labels = load_images(cfg.data, shape)
    if cfg.use_labels and labels is None:
        raise ValueError("use_labels needs labelled data (data.source: digits)")
    for task in cfg.tasks:  # fail before any work on an operator that cannot act on these images
        make_operator(task.operator, task_masks(task.operator, shape, 1, cfg.seed)).check_sample_shape(shape)
    scorer = Scorer(cfg.metrics, images.to(torch.float64), labels, cfg.data.reference_split)
    # the config is valid: one process per folder, one config per folder, checked (and locked) before any sampling
    lock = claim_run_folder(cfg.output_dir, cfg.model_dump(), cfg.overwrite, ignore=("overwrite", "resume", "num_threads"))
    try:
        return _restore_tasks(cfg, pipe, shape, images, labels, scorer)
    finally:
        lock.release()


def _restore_tasks(cfg: RestoreConfig, pipe, shape, images, labels, scorer) -> list[dict[str, Any]]:

    out_dir = Path(cfg.output_dir)
    jsonl = out_dir / "results.jsonl"
    done = {}
    if cfg.resume and jsonl.is_file():
        done = {r["fingerprint"]: r for r in map(json.loads, jsonl.read_text().splitlines()) if r.get("fingerprint")}
    records: list[dict[str, Any]] = []
    computed: dict[str, tuple[torch.Tensor, dict[str, Any]]] = {}  # this run's restorations by fingerprint
    originals_fd = scorer.fd(images) if "fd" in cfg.metrics else None

    def flush():
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        atomic_write(jsonl, lambda tmp: tmp.write_text(text))
        atomic_write(out_dir / "table.md", lambda tmp: tmp.write_text(markdown_table(records)))

    for task in cfg.tasks:
        masks = task_masks(task.operator, shape, images.shape[0], cfg.seed)
        operator = make_operator(task.operator, masks)
        y = InverseProblem(operator, task.sigma_y).measure(
            images.to(pipe.device, pipe.unet.dtype), generator=generators(cfg.seed + 2_000_000, images.shape[0]))
        k = min(cfg.grid_images, images.shape[0])
        shown = display(batch_operator(task.operator, masks, slice(0, k)), y[:k], shape).to("cpu", torch.float32)
        rows = [images[:k], shown]
        for method in cfg.task_methods(task):
            fp = fingerprint(cfg, task, method)
            record = {"task": task.name, "sigma_y": task.sigma_y, "method": method.display, "fingerprint": fp,
                      "num_images": images.shape[0], "sampler": cfg.sampler.name, "steps": cfg.sampler.steps}
            built = method.build()
            if built.uses_projection and not operator.has_projection:
                records.append({**record, "skipped": f"{task.operator.name} has no projection"})
                flush()
                continue
            tensor_file = out_dir / slug(task.name) / f"{slug(method.display)}.safetensors"
            if fp in computed:  # plain sampling, already run for another task
                restored, result = computed[fp]
            elif fp in done and tensor_file.is_file():
                restored = load_file(str(tensor_file))["restored"]
                result = {key: v for key, v in done[fp].items() if key not in record}
            else:
                restored, result = restore_all(pipe, cfg, task, method, y, labels, masks)
                result.update(scorer(restored))
                if originals_fd is not None:
                    result["fd_originals"] = originals_fd
            if not tensor_file.is_file() or fp not in done:
                atomic_write(tensor_file, lambda tmp: save_file({"restored": restored.contiguous()}, str(tmp)))
            computed[fp] = restored, result
            record.update(result)
            records.append(record)
            rows.append(restored[:k])
            flush()
        write_grid(out_dir / f"{slug(task.name)}.png", rows, cfg.upscale)
    return records


def config_from_args(args):
    return load_config(RestoreConfig, args.config, args.overrides)


def main(args) -> int:
    cfg = config_from_args(args)
    start = time.perf_counter()
    records = run(cfg)
    print(markdown_table(records), end="")
    print(f"wrote {cfg.output_dir}/results.jsonl, table.md and {len(cfg.tasks)} grids "
          f"({len(records)} cells) in {time.perf_counter() - start:.1f} s")
    return 0
