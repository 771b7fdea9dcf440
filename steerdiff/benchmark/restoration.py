"""Restoration tasks on the benchmark machinery: degrade images, restore them with MCG / DPS / DDS / projection-only /
plain sampling, and score them (``steerdiff restore``; the config is
:class:`~steerdiff.benchmark.restoration_config.RestoreConfig`).

For every task (an operator and a measurement noise sigma_y) and every method of the config, the images of
``data`` (the digits split, or a folder of images) are measured, y = A x + sigma_y n, and restored with
:class:`~steerdiff.pipelines.restoration.RestorationPipeline`.  A (task, method) pair is a cell, as in the benchmark:
identified by a hash of everything that determines its restorations (:func:`fingerprint`, the benchmark's
:func:`~steerdiff.benchmark.grid.stable_hash`), scored by the metrics registry (``psnr``, ``ssim``, ``fd`` against
the digits ``reference_split``, ``class_accuracy`` as ``accuracy``), its record written with the benchmark's
:func:`~steerdiff.benchmark.report.write_results` and tabulated by
:func:`~steerdiff.benchmark.report.restoration_table`.  Written to ``output_dir``, each file atomically (a
temporary file renamed into place, so an interrupted run leaves no half-written file):

- ``results.jsonl``   one record per (task, method): metrics, network calls, wall time, the cell's fingerprint;
- ``table.md``        the same as a Markdown table, with the FD of the originals themselves (the floor at this N);
- ``<task>.png``      a grid: originals, measurements (A^+ y, or y where it is an image; missing pixels grey),
                      then one row per method;
- ``<task>/<method>.safetensors``  the restorations (float32, in [-1, 1] model space);
- ``config.yaml``     the config; a folder holding another config's results is refused (``overwrite: true``
                      runs the new one there), and a second process on the same folder is refused while the first runs.

With ``resume: true`` a cell whose fingerprint matches a record and whose restorations are on disk is not
recomputed.  Randomness: image i is restored from generator ``seed + i``, its measurement noise from
``seed + 2_000_000 + i`` and its random mask from ``seed + 1_000_000 + i``, so results do not depend on
``batch_size``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from ..atomic_io import atomic_save_safetensors, atomic_write, atomic_write_text
from ..config import torch_dtype
from ..devices import check_device
from ..guidance import get_rule
from ..guidance.operators import (
    Colorization, Denoising, GaussianBlur, Inpainting, InverseProblem, LinearOperator, SuperResolution, box_mask,
    extreme_mask, random_mask,
)
from ..image_files import tensor_grid
from ..metrics.base import Metric, SampleSet
from ..metrics.features import IMAGE_SUFFIXES
from ..metrics.registry import make_metric
from ..pipelines.class_conditional import sample_shape
from ..pipelines.loading import load_pipeline
from ..pipelines.restoration import RestorationPipeline
from ..run_folder import check_writable_folder, claim_run_folder
from ..samplers.registry import make_scheduler
from ..testbeds.digits import load_digits_data
from .grid import sample_generators, slug, stable_hash
from .report import load_results, restoration_table, write_results
from .restoration_config import DataSpec, MethodSpec, OperatorSpec, RestoreConfig, TaskSpec


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
        return random_mask(shape[1:], spec.missing, generator=sample_generators(seed + 1_000_000, 0, n))
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


def display(op: LinearOperator, y: torch.Tensor, shape) -> torch.Tensor:
    """An image of a measurement: y itself where it is image-shaped, else A^+ y (or A^T y)."""
    if tuple(y.shape[1:]) == tuple(shape):
        return y
    return op.pinv(y) if op.has_projection else op.transpose(y)


# -- metrics ---------------------------------------------------------------------------------------------------------
REGISTRY_NAMES = {"psnr": "psnr", "ssim": "ssim", "fd": "fd", "accuracy": "class_accuracy"}
"""The config's metric names -> the metrics registry's (the record keeps the config's name)."""


def restoration_metrics(cfg: RestoreConfig, shape, labels: torch.Tensor | None, denoiser) -> dict[str, Metric]:
    """The registry's metrics the config asks for, checked against the images before any work: FD is taken against
    the digits ``reference_split``; FD and accuracy need the digits' labels and split."""
    needs_digits = sorted({"fd", "accuracy"} & set(cfg.metrics))
    if needs_digits and labels is None:
        raise ValueError(f"metrics {needs_digits} need the digits data set (data.source: digits); "
                         "for an image folder use metrics: [psnr, ssim]")
    split = cfg.data.reference_split
    options = {"fd": {"reference": "digits" if split == "all" else f"digits-{split}"}}
    metrics = {}
    for name in cfg.metrics:
        metric = make_metric(REGISTRY_NAMES[name], **options.get(name, {}))
        metric.check(shape, denoiser)
        metrics[name] = metric
    return metrics


def score(metrics: dict[str, Metric], restored: torch.Tensor, originals: torch.Tensor,
          labels: torch.Tensor | None) -> dict[str, float]:
    """Each metric of the restorations (float64, clipped to [-1, 1]) against their originals and true labels."""
    samples = SampleSet(samples=restored.to(torch.float64).clamp(-1, 1), labels=labels, targets=originals)
    return {name: value for name, metric in metrics.items() for value in metric(samples).values()}


# -- the run ---------------------------------------------------------------------------------------------------------
def fingerprint(cfg: RestoreConfig, task: TaskSpec, method: MethodSpec) -> str:
    """Hash of everything that determines a cell's restorations (plain sampling ignores the task)."""
    keys = cfg.model_dump(include={"model", "data", "sampler", "use_labels", "guidance_scale", "seed", "dtype"})
    if cfg.guidance is not None:  # absent otherwise, so that the cells of earlier runs keep their fingerprints
        keys.update(guidance=cfg.guidance.model_dump(exclude={"label"}, exclude_none=True))
    keys.update(method=method.model_dump(exclude={"label"}, exclude_none=True))  # unset dds options: as before them
    if method.name != "unconditional":
        keys.update(task=task.model_dump(exclude={"name", "methods"}))
    return stable_hash(keys, length=16)


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
                   generator=sample_generators(cfg.seed, sl.start, sl.stop), output_type="latent", **kwargs)
        chunks.append(out.images.detach().to("cpu", torch.float32))
        calls, backward = calls + out.network_calls, backward + out.backward_calls
    return torch.cat(chunks), {"network_calls": calls, "backward_calls": backward, "wall_s": time.perf_counter() - start}


def write_grid(path: Path, rows: list[torch.Tensor], upscale: int) -> None:
    grid = tensor_grid(torch.cat(rows), rows=len(rows), upscale=upscale)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def run(cfg: RestoreConfig) -> list[dict[str, Any]]:
    """Run (or resume) every (task, method) cell of ``cfg`` in ``cfg.output_dir``; returns the records."""
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
    metrics = restoration_metrics(cfg, shape, labels, base.unet)
    # the config is valid: one process per folder, one config per folder, checked (and locked) before any sampling
    lock = claim_run_folder(cfg.output_dir, cfg.model_dump(), cfg.overwrite, ignore=("overwrite", "resume", "num_threads"))
    try:
        return _restore_tasks(cfg, pipe, shape, images, labels, metrics)
    finally:
        lock.release()


def _restore_tasks(cfg: RestoreConfig, pipe, shape, images, labels, metrics) -> list[dict[str, Any]]:
    out_dir = Path(cfg.output_dir)
    jsonl = out_dir / "results.jsonl"
    done = {}
    if cfg.resume and jsonl.is_file():
        done = {r["fingerprint"]: r for r in load_results(jsonl) if r.get("fingerprint")}
    records: list[dict[str, Any]] = []
    computed: dict[str, tuple[torch.Tensor, dict[str, Any]]] = {}  # this run's restorations by fingerprint
    originals = images.to(torch.float64)
    originals_fd = score({"fd": metrics["fd"]}, images, originals, labels)["fd"] if "fd" in metrics else None

    def flush():
        write_results(out_dir, records)
        atomic_write_text(out_dir / "table.md", restoration_table(records))

    for task in cfg.tasks:
        masks = task_masks(task.operator, shape, images.shape[0], cfg.seed)
        operator = make_operator(task.operator, masks)
        y = InverseProblem(operator, task.sigma_y).measure(
            images.to(pipe.device, pipe.unet.dtype), generator=sample_generators(cfg.seed + 2_000_000, 0, images.shape[0]))
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
                result.update(score(metrics, restored, originals, labels))
                if originals_fd is not None:
                    result["fd_originals"] = originals_fd
            if not tensor_file.is_file() or fp not in done:
                atomic_save_safetensors(tensor_file, {"restored": restored})
            computed[fp] = restored, result
            record.update(result)
            records.append(record)
            rows.append(restored[:k])
            flush()
        write_grid(out_dir / f"{slug(task.name)}.png", rows, cfg.upscale)
    return records
