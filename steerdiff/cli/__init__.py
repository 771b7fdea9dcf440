"""The ``steerdiff`` command line: one sub-command per job, each driven by a validated YAML config."""

from __future__ import annotations

import argparse
import sys

from . import benchmark, generate, optimize, restore
from .config import ConfigError

COMMANDS = (generate, benchmark, restore, optimize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"steerdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
