"""``steerdiff generate``: sample a class-by-seed image grid from a class-conditional model.

Defaults are the embedded digits model, DPM-Solver++ 2M, 25 steps, guidance 3, eight samples of each digit;
``configs/generate/digits.yaml`` spells them out.  Sample i of the grid uses seed ``seed + i`` through its own
generator, so an image does not depend on the batch it was drawn in.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from tqdm.auto import tqdm

from ..atomic_io import atomic_write
from ..devices import check_device
from ..pipelines.loading import load_pipeline
from ..run_folder import check_output_file
from ..samplers.registry import make_scheduler
from .config import StrictModel, load_config

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SchedulerSpec(StrictModel):
    name: str = "dpmpp_2m"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class GenerateConfig(StrictModel):
    model: str = "digits"
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    steps: int = Field(25, ge=1)
    guidance_scale: float = Field(3.0, ge=0)
    classes: list[int] = Field(default_factory=lambda: list(range(10)), min_length=1)
    samples_per_class: int = Field(8, ge=1)
    seed: int = 0
    batch_size: int = Field(256, ge=1)
    device: str = "cpu"
    dtype: Literal["float32", "float64", "float16", "bfloat16"] = "float32"
    upscale: int = Field(4, ge=1, le=64)
    output: str = "outputs/generate/digits.png"  # a .png path (the grid)


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
    u8 = (grid * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(u8[..., 0] if c == 1 else u8)


def check_steps(scheduler, steps: int) -> None:
    """Lay the grid out once before sampling: a scheduler that cannot take ``steps`` distinct steps (a discrete
    training schedule has num_train_timesteps of them) is an error now, not an IndexError mid-run."""
    try:
        scheduler.set_timesteps(steps)
    except (ValueError, IndexError) as err:
        raise ValueError(f"steps={steps}: {type(scheduler).__name__} cannot lay out that many steps ({err})") from None
    timesteps = scheduler.timesteps
    if len(torch.unique(timesteps)) != len(timesteps):
        limit = scheduler.config.get("num_train_timesteps")
        raise ValueError(
            f"steps={steps}: {type(scheduler).__name__} repeats timesteps at this many steps"
            + (f" (the model has num_train_timesteps={limit}; use at most {limit})" if limit else "")
        )


def generate(cfg: GenerateConfig, progress: bool = True) -> tuple[Path, np.ndarray]:
    out = check_output_file(cfg.output, "output", suffixes=(".png",))  # before any work
    check_device(cfg.device)
    pipe = load_pipeline(cfg.model, device=cfg.device, dtype=DTYPES[cfg.dtype])
    pipe.scheduler = make_scheduler(cfg.scheduler.name, pipe.scheduler.config, **cfg.scheduler.kwargs)
    check_steps(pipe.scheduler, cfg.steps)
    pipe.set_progress_bar_config(disable=True)  # one bar over the images instead of one per batch
    labels = [c for c in cfg.classes for _ in range(cfg.samples_per_class)]
    chunks = []
    with tqdm(total=len(labels), desc="generate", unit="image", disable=not progress) as bar:
        for start in range(0, len(labels), cfg.batch_size):
            part = labels[start : start + cfg.batch_size]
            gens = [torch.Generator(device="cpu").manual_seed(cfg.seed + start + i) for i in range(len(part))]
            chunks.append(pipe(part, cfg.steps, cfg.guidance_scale, generator=gens, output_type="np").images)
            bar.update(len(part))
    images = np.concatenate(chunks)
    grid = image_grid(images, rows=len(cfg.classes), upscale=cfg.upscale)
    atomic_write(out, lambda tmp: grid.save(tmp, format="PNG"))
    return out, images


def config_from_args(args):
    return load_config(GenerateConfig, args.config, args.overrides)


def main(args) -> int:
    cfg = config_from_args(args)
    start = time.perf_counter()
    out, images = generate(cfg)
    print(
        f"wrote {out} ({len(images)} samples: classes {cfg.classes} x {cfg.samples_per_class}, "
        f"{cfg.scheduler.name} {cfg.steps} steps, guidance {cfg.guidance_scale}, model {cfg.model}) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0
