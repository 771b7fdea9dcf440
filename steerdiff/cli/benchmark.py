"""``steerdiff benchmark --config configs/benchmark/<name>.yaml [key=value ...]``: run or resume a benchmark grid.

The same command under ``accelerate launch`` shards the samples of every cell across processes:

    accelerate launch --multi_gpu --num_processes 2 -m steerdiff benchmark --config configs/benchmark/baselines.yaml

(on a machine without GPUs this starts two CPU processes; see :mod:`steerdiff.benchmark.sharding`).

Exit status: 0 when every cell finished (ok, diverged or skipped), 1 when a cell failed (rerun to retry it),
2 for a config error.
"""

from __future__ import annotations

from .config import load_config


def main(args) -> int:
    from ..benchmark import BenchmarkConfig, run_benchmark  # lazily: the benchmark package imports cli.config

    cfg = load_config(BenchmarkConfig, args.config, args.overrides)
    records = run_benchmark(cfg)
    return 1 if any(r["status"] == "failed" for r in records) else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("benchmark", help="sample quality (FD, precision/recall, divergence, ...) against NFE over a grid")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/benchmark/baselines.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. num_samples=100 output_dir=runs/quick")
    p.set_defaults(func=main)
