"""``steerdiff generate``: sample images from the embedded digits model or any local diffusers pipeline.

The job and its config live in :mod:`steerdiff.generate`; defaults are the embedded digits model, DPM-Solver++ 2M,
25 steps, CFG 3, eight samples of each digit (``configs/generate/digits.yaml`` spells them out).
"""

from __future__ import annotations

import time

from ..generate import GenerateConfig, generate, images_folder, load_generate_config, with_default_scheduler


def config_from_args(args) -> GenerateConfig:
    return load_generate_config(args.config, args.overrides)


def main(args) -> int:
    cfg = with_default_scheduler(config_from_args(args))  # the scheduler that runs, for the summary below
    start = time.perf_counter()
    out, images = generate(cfg)
    guidance = "pipeline default" if cfg.guidance is None else cfg.guidance.display
    scheduler = "pipeline's own" if cfg.scheduler is None else cfg.scheduler.display
    print(
        f"wrote {out} ({len(images)} images, {scheduler} {cfg.steps} steps, guidance {guidance}, model {cfg.model}) "
        f"and each image with its settings and manifest.jsonl in {images_folder(out)}/ in {time.perf_counter() - start:.1f} s"
    )
    return 0
