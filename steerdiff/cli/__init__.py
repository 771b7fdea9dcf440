"""The steerdiff command line: one sub-command per job, each driven by a validated YAML config.

The parser is built from the table below without importing the sub-commands, so that ``steerdiff --help`` does
not load torch or diffusers; a sub-command's module is imported when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from . import fid  # its own options (pytorch-fid's shape, no config); the module imports nothing heavy

DESCRIPTION = (
    "steerdiff: diffusion samplers and guidance methods for diffusers pipelines. generate, benchmark, restore and "
    "optimize read a YAML config (--config) and key=value overrides (--print-config shows the full config they would "
    "run); fid takes pytorch-fid's options."
)

# name -> (help, --config help, whether --config is required, override example)
SUBCOMMANDS = {
    "generate": ("sample images from the embedded digits model or any local diffusers pipeline (prompts, classes, "
                 "img2img), with any scheduler and guidance rule",
                 "YAML config (default: built-in defaults = configs/generate/digits.yaml)", False,
                 "steps=50 scheduler.name=ddim guidance.name=apg"),
    "benchmark": ("sample quality (FD / FID, CLIP score, divergence, ...) against NFE over a grid",
                  "YAML config, e.g. configs/benchmark/baselines.yaml", True, "num_samples=100 output_dir=runs/quick"),
    "restore": ("degrade images, restore them (MCG, DPS, projection, plain) and score",
                "YAML config, e.g. configs/restore/box.yaml", True, "data.num_images=50 sampler.steps=50"),
    "optimize": ("AdjointDPM tasks: optimise noise, a class embedding or LoRA weights",
                 "YAML config, e.g. configs/adjoint/noise.yaml (key 'task' picks the task)", True,
                 "iterations=10 sampler.steps=10"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerdiff", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, config_help, required, example) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", required=required, help=config_help)
        p.add_argument("--print-config", action="store_true",
                       help="print the full config (defaults, the file and the overrides merged) as YAML and exit")
        p.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    fid.add_arguments(sub.add_parser("fid", help=fid.HELP, description=fid.HELP))
    return parser


class _QuietTorchvisionFallback(logging.Filter):
    """Drops transformers' notice that an image processor (a pipeline's feature extractor) falls back to its PIL
    version without torchvision: steerdiff installs no torchvision and the PIL version is the one it means to use,
    so the notice, printed on every text-pipeline run, tells a user nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    notices = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _QuietTorchvisionFallback) for f in notices.filters):
        notices.addFilter(_QuietTorchvisionFallback())
    from ..config import ConfigError

    command = importlib.import_module(f".{args.command}", __package__)
    try:
        if getattr(args, "print_config", False):
            import yaml

            print(yaml.safe_dump(command.config_from_args(args).model_dump(), sort_keys=False), end="")
            return 0
        return command.main(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"steerdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # NaN/Inf while sampling: the message names the step and the timestep
        print(f"steerdiff {args.command}: sampling diverged: {err}", file=sys.stderr)
        return 1
