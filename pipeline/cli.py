"""`nwh` / `python -m pipeline`: one subcommand per stage, each a thin layer over a stage function.

Each stage module defines `register(subparsers)`, which adds its parser and sets `handler`
(a function of the parsed args returning an exit code or None). Heavy imports (torch,
transformers) happen inside the handlers, so `nwh sql` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline.core.errors import UserError

# stage modules in processing order; each has register(subparsers)
STAGE_MODULES = [
    "pipeline.models.zoo",
    "pipeline.stages.extract",
    "pipeline.stages.trace",
    "pipeline.stages.coactivation",
    "pipeline.stages.graph",
    "pipeline.stages.subsets",
    "pipeline.stages.ablation",
    "pipeline.stages.neuron_properties",
    "pipeline.stages.gradients",
    "pipeline.stages.universal",
    "pipeline.report.html",
    "pipeline.stages.dormancy",
    "pipeline.stages.frequencies",
    "pipeline.stages.analysis",
    "pipeline.report.plots",
    "pipeline.stages.export",
    "pipeline.core.warehouse",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nwh",
        description="Neuron Warehouse: stream MLP neuron activations into a columnar warehouse "
        "and analyse them with SQL.",
        epilog="Examples:\n  nwh zoo\n  nwh extract --model zoo-s0 --corpus stdlib --num-samples 64\n"
        '  nwh sql "select * from runs"\n\nRun `nwh <stage> --help` for a stage\'s options.',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name in STAGE_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def add_stage_parser(sub, name: str, help: str, examples: str, *,  # noqa: A002
                     progress: bool = False) -> argparse.ArgumentParser:
    """A stage's subparser with its examples in the epilog, the `--storage` option every stage
    takes, and `--quiet` for stages that show progress bars."""
    from pipeline.core.storage import DEFAULT_ROOT

    parser = sub.add_parser(
        name, help=help, description=help, epilog="Examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--storage", default=str(DEFAULT_ROOT), help="warehouse root (default: storage)")
    if progress:
        parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        code = args.handler(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: committed work is kept; run the same command to resume", file=sys.stderr)
        return 130
    return int(code or 0)


def echo(*parts: object) -> None:
    """User-facing output of a CLI handler (library code logs instead)."""
    print(*parts)
