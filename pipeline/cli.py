"""`nwh` / `python -m pipeline`: one subcommand per stage, generated from the stage's config.

Each stage module lists `STAGES`: entries naming a config dataclass (whose fields, with their
help, become the options), a `run(config, storage)` function, how to show its result and which
figures of pipeline.report to draw from the tables it wrote. Heavy imports (torch,
transformers) happen inside the stage functions, so `nwh sql` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline.core.config import Stage, add_arguments, from_args
from pipeline.core.errors import UserError

# stage modules in processing order; each lists STAGES
STAGE_MODULES = [
    "pipeline.stages.zoo",
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
    "pipeline.flows",
    "pipeline.stages.frequencies",
    "pipeline.stages.analysis",
    "pipeline.report.plots",
    "pipeline.stages.export",
    "pipeline.stages.query",
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
        for stage in importlib.import_module(name).STAGES:
            add_stage(sub, stage)
    return parser


def add_stage(sub, stage: Stage) -> argparse.ArgumentParser:
    """A stage's subparser: --storage, the config's options, its examples in the epilog."""
    from pipeline.core.storage import DEFAULT_ROOT

    parser = sub.add_parser(
        stage.name, help=stage.help, description=stage.help,
        epilog="Examples:\n" + stage.examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--storage", default=str(DEFAULT_ROOT),
                        help=f"warehouse root (default: {DEFAULT_ROOT})")
    add_arguments(parser, stage.config)
    parser.set_defaults(stage_entry=stage)
    return parser


def run_stage(stage: Stage, args: argparse.Namespace) -> int:
    from pipeline.core.storage import Storage

    config = from_args(stage.config, args)
    storage = Storage(args.storage)
    result = stage.run(config, storage)
    if stage.figures:
        module, function = stage.figures.split(":")
        for path in getattr(importlib.import_module(module), function)(result, config, storage) or []:
            echo(f"figure: {path}")
    if stage.show is not None:
        text = stage.show(result)
        if text:
            echo(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(run_stage(args.stage_entry, args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: committed work is kept; run the same command to resume", file=sys.stderr)
        return 130


def echo(*parts: object) -> None:
    """User-facing output (library code logs instead)."""
    print(*parts)

