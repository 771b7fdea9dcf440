"""``steerdiff restore``: degrade images, restore them with MCG / DPS / DDS / projection-only / plain sampling, and
score them.

The config is :class:`steerdiff.benchmark.restoration_config.RestoreConfig` (``configs/restore/*.yaml``); the run,
its files and resume are :mod:`steerdiff.benchmark.restoration`.
"""

from __future__ import annotations

import time

from ..benchmark.report import restoration_table
from ..benchmark.restoration import run
from ..benchmark.restoration_config import RestoreConfig
from ..config import load_config


def config_from_args(args) -> RestoreConfig:
    return load_config(RestoreConfig, args.config, args.overrides)


def main(args) -> int:
    cfg = config_from_args(args)
    start = time.perf_counter()
    records = run(cfg)
    print(restoration_table(records), end="")
    print(f"wrote {cfg.output_dir}/results.jsonl, table.md and {len(cfg.tasks)} grids "
          f"({len(records)} cells) in {time.perf_counter() - start:.1f} s")
    return 0
