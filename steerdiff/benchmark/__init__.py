"""``steerdiff benchmark``: sample quality against NFE over a grid of models, schedulers, guidance and seeds."""

from .config import BenchmarkConfig, GuidanceSpec, MetricSpec, ModelSpec, ReportSpec, SchedulerSpec
from .report import load_results, markdown_report, plot_metric
from .runner import prepare, run_benchmark

__all__ = [
    "BenchmarkConfig", "GuidanceSpec", "MetricSpec", "ModelSpec", "ReportSpec", "SchedulerSpec",
    "load_results", "markdown_report", "plot_metric", "prepare", "run_benchmark",
]
