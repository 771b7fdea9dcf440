"""``steerdiff optimize``: the three AdjointDPM tasks (gradients through sampling) on the digits model.

``steerdiff optimize --config configs/adjoint/<task>.yaml [key=value ...]`` with ``task`` one of

- ``noise``: optimise x_T so the samples are classified as ``target_class`` (close to the original noise);
- ``embedding``: recover a class embedding from the images it generates;
- ``finetune``: fine-tune LoRA adapters (or all weights) towards thicker strokes.

It writes ``before.png`` / ``after.png`` (and task-specific grids) and ``metrics.json`` (the measured numbers,
the config and the per-iteration history) into ``output``, each file atomically.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..atomic_io import atomic_write
from ..config import StrictModel, load_config, torch_dtype
from ..devices import check_device
from ..image_files import tensor_grid
from ..metrics.classifier import load_digits_classifier
from ..pipelines import adjoint_tasks
from ..pipelines.adjoint import MODES
from ..pipelines.conditioning import conditioning_kind
from ..pipelines.loading import load_pipeline
from ..run_folder import check_writable_folder

TASKS = ("noise", "embedding", "finetune")


class SamplerSpec(StrictModel):
    steps: int = Field(20, ge=1)
    order: Literal[1, 2] = 1
    guidance_scale: float = Field(1.0, ge=0)
    mode: Literal[MODES] = "adjoint"  # type: ignore[valid-type]


class _Common(StrictModel):
    model: str = "digits"
    device: str = "cpu"
    dtype: Literal["float32", "float64"] = "float32"
    threads: int = Field(1, ge=1, description="torch intra-op threads (the digits problems are small)")
    seed: int = 0
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    upscale: int = Field(4, ge=1, le=64)


class NoiseTask(_Common):
    task: Literal["noise"] = "noise"
    target_class: int = Field(3, ge=0, le=9)
    source_class: int | None = Field(None, ge=0, le=9)
    num_samples: int = Field(32, ge=1)
    iterations: int = Field(60, ge=1)
    lr: float = Field(0.1, gt=0)
    proximity_weight: float = Field(1.0, ge=0)
    keep_norm: bool = True
    output: str = "outputs/adjoint/noise"


class EmbeddingTask(_Common):
    task: Literal["embedding"] = "embedding"
    target_class: int = Field(7, ge=0, le=9)
    init_class: int = Field(10, ge=0, le=10)
    num_samples: int = Field(16, ge=1)
    eval_samples: int = Field(50, ge=1)
    iterations: int = Field(40, ge=1)
    lr: float = Field(0.1, gt=0)
    output: str = "outputs/adjoint/embedding"


class FinetuneTask(_Common):
    task: Literal["finetune"] = "finetune"
    train: Literal["lora", "all"] = "lora"
    lora_rank: int = Field(4, ge=1)
    lora_targets: list[str] = Field(default_factory=lambda: ["conv1", "conv2"], min_length=1)
    samples_per_class: int = Field(2, ge=1)
    eval_samples_per_class: int = Field(5, ge=1)
    iterations: int = Field(40, ge=1)
    lr: float = Field(1e-3, gt=0)
    style_weight: float = Field(1.0, ge=0)
    class_weight: float = Field(0.5, ge=0)
    temperature: float = Field(0.1, gt=0)
    output: str = "outputs/adjoint/finetune"


TASK_CONFIGS: dict[str, type[_Common]] = {"noise": NoiseTask, "embedding": EmbeddingTask, "finetune": FinetuneTask}


class _Which(BaseModel):
    model_config = ConfigDict(extra="ignore")
    task: Literal["noise", "embedding", "finetune"]


def load_task_config(path=None, overrides=None) -> _Common:
    """The config of the task named by its ``task`` key, validated strictly."""
    which = load_config(_Which, path, overrides)
    return load_config(TASK_CONFIGS[which.task], path, overrides)


def run(cfg: _Common) -> tuple[Path, dict]:
    check_writable_folder(cfg.output, "output")  # before any work
    check_device(cfg.device)
    if cfg.task == "finetune" and importlib.util.find_spec("peft") is None:
        raise ValueError("task finetune trains LoRA adapters and needs the peft package: pip install 'steerdiff[lora]'")
    torch.set_num_threads(cfg.threads)
    pipe = load_pipeline(cfg.model, device=cfg.device, dtype=torch_dtype(cfg.dtype))
    if cfg.task in ("embedding", "finetune") and conditioning_kind(pipe.unet) != "class_embedding":
        raise ValueError(
            f"task {cfg.task} optimises a class-conditional UNet2DModel (its class embedding or LoRA weights); "
            f"model {cfg.model!r} is a {type(pipe.unet).__name__}: use task noise, or model digits / a UNet folder"
        )
    classifier = load_digits_classifier(device=cfg.device)
    sampler = adjoint_tasks.SamplerSettings(**cfg.sampler.model_dump())
    common = dict(sampler=sampler, seed=cfg.seed, iterations=cfg.iterations)
    start = time.perf_counter()
    if cfg.task == "noise":
        result = adjoint_tasks.optimize_noise(
            pipe.unet, pipe.scheduler, classifier, target_class=cfg.target_class, source_class=cfg.source_class,
            num_samples=cfg.num_samples, lr=cfg.lr, proximity_weight=cfg.proximity_weight, keep_norm=cfg.keep_norm,
            **common,
        )
        rows = max(1, cfg.num_samples // 8)
    elif cfg.task == "embedding":
        result = adjoint_tasks.invert_embedding(
            pipe.unet, pipe.scheduler, classifier, target_class=cfg.target_class, init_class=cfg.init_class,
            num_samples=cfg.num_samples, eval_samples=cfg.eval_samples, lr=cfg.lr, **common,
        )
        rows = max(1, cfg.num_samples // 8)
    else:
        result = adjoint_tasks.finetune_style(
            pipe.unet, pipe.scheduler, classifier, train=cfg.train, lora_rank=cfg.lora_rank,
            lora_targets=tuple(cfg.lora_targets), samples_per_class=cfg.samples_per_class,
            eval_samples_per_class=cfg.eval_samples_per_class, lr=cfg.lr, style_weight=cfg.style_weight,
            class_weight=cfg.class_weight, temperature=cfg.temperature, **common,
        )
        rows = result.images["before"].shape[0] // cfg.eval_samples_per_class  # one digit per row
    seconds = time.perf_counter() - start
    out = Path(cfg.output)
    for name, images in result.images.items():
        grid = tensor_grid(images, rows if images.shape[0] % rows == 0 else 1, cfg.upscale)
        atomic_write(out / f"{name}.png", lambda tmp, g=grid: g.save(tmp, format="PNG"))
    report = {"task": cfg.task, "metrics": result.metrics, "seconds": seconds, "config": cfg.model_dump(),
              "history": result.history}
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    return out, report


def config_from_args(args):
    return load_task_config(args.config, args.overrides)


def main(args) -> int:
    cfg = config_from_args(args)
    out, report = run(cfg)
    shown = {k: v for k, v in report["metrics"].items() if k != "goal"}
    print(f"steerdiff optimize {cfg.task}: {json.dumps(shown)} in {report['seconds']:.1f} s; wrote {out}/")
    return 0
