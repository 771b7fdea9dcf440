"""``steerdiff benchmark --config configs/benchmark/<name>.yaml [key=value ...]``: run or resume a benchmark grid.

The same command under ``accelerate launch`` shards the samples of every cell across processes:

    accelerate launch --multi_gpu --num_processes 2 -m steerdiff benchmark --config configs/benchmark/baselines.yaml

(on a machine without GPUs this starts two CPU processes; see :mod:`steerdiff.benchmark.sharding`).

Exit status: 0 when every cell finished (ok, diverged or skipped), 1 when a cell failed (rerun to retry it),
2 for a config error.
"""

from __future__ import annotations

from ..config import load_config


def config_from_args(args):
    from ..benchmark import BenchmarkConfig  # lazily: the benchmark package imports cli.config

    return load_config(BenchmarkConfig, args.config, args.overrides)


def main(args) -> int:
    from ..benchmark import run_benchmark

    cfg = config_from_args(args)
    records = run_benchmark(cfg)
    return 1 if any(r["status"] == "failed" for r in records) else 0
