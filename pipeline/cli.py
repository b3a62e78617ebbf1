"""`nwh` / `python -m pipeline`: one subcommand per stage, generated from the stage's config.

Each stage module lists `STAGES`: entries naming a config dataclass (whose fields, with their
help, become the options), a `run(config, storage)` function, how to show its result and which
figures of pipeline.report to draw from the tables it wrote. Heavy imports (torch,
transformers) happen inside the stage functions, and `nwh <stage>` imports only its stage's
module (STAGE_INDEX), so a stage does not pay for the others' imports (matplotlib, polars,
duckdb) at start-up; `nwh --help` imports them all to list them.

What users see is decided here, not in library code: `--quiet` keeps only warnings and errors
(no INFO lines, no progress bars), library FutureWarning/UserWarning/DeprecationWarning are
hidden unless `--verbose`, and a UserError or a full disk anywhere in a stage is one line on
stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import warnings

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
    "pipeline.stages.similar",
    "pipeline.stages.probe",
    "pipeline.report.html",
    "pipeline.report.site",
    "pipeline.stages.dormancy",
    "pipeline.flows",
    "pipeline.stages.frequencies",
    "pipeline.stages.analysis",
    "pipeline.report.plots",
    "pipeline.stages.export",
    "pipeline.stages.query",
]

# stage name -> its module, so a command line imports one module; a stage missing here (or
# whose module is not in STAGE_MODULES) is still found, by importing every module
STAGE_INDEX = {
    "zoo": "pipeline.stages.zoo",
    "extract": "pipeline.stages.extract",
    "trace": "pipeline.stages.trace",
    "coactivation": "pipeline.stages.coactivation",
    "graph": "pipeline.stages.graph",
    "subset": "pipeline.stages.subsets",
    "subset-grid": "pipeline.stages.subsets",
    "ablate": "pipeline.stages.ablation",
    "neuron-stats": "pipeline.stages.neuron_properties",
    "gradients": "pipeline.stages.gradients",
    "universal": "pipeline.stages.universal",
    "similar": "pipeline.stages.similar",
    "probe": "pipeline.stages.probe",
    "report": "pipeline.report.html",
    "site": "pipeline.report.site",
    "dormancy": "pipeline.stages.dormancy",
    "dormancy-sweep": "pipeline.flows",
    "frequencies": "pipeline.stages.frequencies",
    "top-tokens": "pipeline.stages.frequencies",
    "signs": "pipeline.stages.frequencies",
    "histogram": "pipeline.stages.frequencies",
    "analyze": "pipeline.stages.analysis",
    "plots": "pipeline.report.plots",
    "export": "pipeline.stages.export",
    "sql": "pipeline.stages.query",
}
GLOBAL_FLAGS = frozenset({"-h", "--help", "--version", "-v", "--verbose", "-q", "--quiet"})

# stages that may start from an empty storage root (they read models, not runs); every other
# stage reads a warehouse, and a --storage that is none is a one-line error, not an empty result
CREATES_WAREHOUSE = frozenset({"zoo", "extract", "trace", "gradients", "universal",
                               "dormancy-sweep"})

EXAMPLES = """\
Examples (the common flows):
  build the embedded models, then extract a corpus and a prompts file
    nwh zoo
    nwh extract --model zoo-s0 --corpus stdlib --num-samples 256
    nwh extract --model zoo-s0 --prompts examples/prompts.csv --temperature 0.8 --top-k 50
  a hub model, planned first (sizes, disk needed, resume point)
    nwh extract --model gpt2 --num-samples 4096 --store-acts --dry-run
  ask the warehouse in SQL
    nwh sql "select run_id, model, num_rows from runs"
    nwh sql --out stats.parquet "select * from neuron_stats where run_id = 'zoo-s0_stdlib'"
  dormant neurons of a run, and over every training checkpoint
    nwh dormancy --run zoo-s0_stdlib --threshold 0.1
    nwh dormancy-sweep --model zoo-s0
  co-activation graph, influential subsets, ablation against random controls
    nwh coactivation --run zoo-s0_stdlib
    nwh graph --run zoo-s0_stdlib --threshold 0.5
    nwh subset-grid --run zoo-s0_stdlib --thresholds 0.3 0.5 --ratios 0.01 --methods degree pagerank
    nwh ablate --run zoo-s0_stdlib --subsets degree_t0.5_r0.01 --controls 5
  universal neurons across seeds, loss-gradient importance
    nwh universal --models zoo-s0 zoo-s1 zoo-s2
    nwh gradients --model zoo-s0 --num-samples 64
  figures, an HTML report, the reference scripts' files
    nwh plots --run zoo-s0_stdlib --rows 0 50 200
    nwh report --name demo --folders zoo-s0_stdlib
    nwh export --run zoo-s0_stdlib --out-dir exports
  browse the neurons, a neuron's nearest ones, linear probes per layer
    nwh site --top 50 --score mean
    nwh similar --run zoo-s0_stdlib --neuron 2/17 --metric npmi
    nwh probe --run zoo-s0_stdlib --target next-token

Every stage takes --storage DIR (default: storage/, or $NWH_STORAGE). A killed or failed run
resumes from its last commit when the same command runs again.
Run `nwh <stage> --help` for a stage's options and examples."""


def package_version() -> str:
    """The installed distribution's version (pyproject.toml), else the package's own."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("neuron-warehouse")
    except PackageNotFoundError:
        from pipeline import __version__

        return __version__


def stage_modules(argv: list[str] | None = None) -> list[str]:
    """The stage modules a command line needs: its stage's alone when STAGE_INDEX names it
    (the stage is the first word that is not a global flag), else every one."""
    words = [w for w in argv or () if w not in GLOBAL_FLAGS]
    module = STAGE_INDEX.get(words[0]) if words and not words[0].startswith("-") else None
    return [module] if module in STAGE_MODULES else list(STAGE_MODULES)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The CLI's parser: of every stage, or (given the command line) of its stage only."""
    modules = stage_modules(argv)
    stages = [stage for name in modules for stage in importlib.import_module(name).STAGES]
    words = [w for w in argv or () if w not in GLOBAL_FLAGS]
    if len(modules) == 1 and words[0] not in {stage.name for stage in stages}:
        stages = [stage for name in STAGE_MODULES  # the index is stale: look everywhere
                  for stage in importlib.import_module(name).STAGES]
    parser = argparse.ArgumentParser(
        prog="nwh",
        description="Neuron Warehouse: stream MLP neuron activations into a columnar warehouse "
        "and analyse them with SQL.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nwh {package_version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log debug messages and show library warnings")
    parser.add_argument("-q", "--quiet", dest="global_quiet", action="store_true",
                        help="only warnings and errors: no INFO lines, no progress bars")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage in stages:
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


def reads_warehouse(stage: Stage, config) -> bool:
    """Whether the stage needs an existing warehouse: every stage but those that start from
    models, unless it was given no run to read (`nwh plots --dormancy-log log.csv` alone)."""
    return stage.name not in CREATES_WAREHOUSE and getattr(config, "run", "") is not None


def run_stage(stage: Stage, args: argparse.Namespace) -> int:
    from pipeline.core import stdlib_corpus
    from pipeline.core.storage import Storage

    config = from_args(stage.config, args)
    storage = Storage(args.storage, must_exist=reads_warehouse(stage, config))
    # the parsed stdlib corpus is kept in the root (a dry run only reads it: it writes nothing)
    with stdlib_corpus.cache_in(storage.cache_dir(), write=not getattr(config, "dry_run", False)):
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


LIBRARY_WARNINGS = (FutureWarning, UserWarning, DeprecationWarning, PendingDeprecationWarning)


def main(argv: list[str] | None = None) -> int:
    # the filters and the log level hold for this call only (main also runs in-process)
    with warnings.catch_warnings():
        _hide_library_warnings()
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser(argv).parse_args(argv)  # the stage modules import libraries
    with warnings.catch_warnings(), _log_level() as set_level:
        if not args.verbose:
            _hide_library_warnings()
        quiet = args.global_quiet or bool(getattr(args, "quiet", False))
        if quiet and hasattr(args, "quiet"):
            args.quiet = True  # `nwh --quiet extract ...` also hides the progress bars
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        set_level(logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO)
        try:
            return int(run_stage(args.stage_entry, args) or 0)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: committed work is kept; run the same command to resume",
                  file=sys.stderr)
            return 130
        except Exception as e:
            from pipeline.core.storage import (
                disk_full_message,
                is_disk_full,
                is_url,
                remote_error_message,
            )

            if is_disk_full(e):  # wherever it happened: a commit is atomic, so the rerun resumes
                print(f"error: {disk_full_message(args.storage)}", file=sys.stderr)
                return 2
            # an object store failing mid-stage (endpoint, bucket, credentials): one line too
            if is_url(args.storage) and (message := remote_error_message(e, args.storage)):
                print(f"error: {message}", file=sys.stderr)
                return 2
            raise


def program() -> None:
    """The `nwh` command (and `python -m pipeline`): main(), then an exit that skips the
    interpreter's teardown of its ~3,000 modules (torch, transformers), which costs ~1.3 s after
    the work is done. What that teardown would do that matters still happens, in its order:
    worker threads are joined, the at-exit handlers run (logging, Ray, weakref finalizers, which
    release the run locks), and the standard streams are flushed. An exception main() lets
    through (a bug: its traceback) takes Python's ordinary exit."""
    code = main()
    exit_without_teardown(code)


def exit_without_teardown(code: int) -> None:
    import atexit
    import os
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # what Py_Finalize calls first
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`nwh ... | head`), a closed stream
            pass
    os._exit(code)


def _hide_library_warnings() -> None:
    """transformers, torch, zarr... warn about their own futures; our messages are log lines
    and one-line errors, so these only confuse a user (-W options given to Python stay)."""
    if sys.warnoptions:
        return
    for category in LIBRARY_WARNINGS:
        warnings.simplefilter("ignore", category)


@contextlib.contextmanager
def _log_level():
    """A setter of the root logger's level, restored on exit."""
    root = logging.getLogger()
    before = root.level
    try:
        yield root.setLevel
    finally:
        root.setLevel(before)


def echo(*parts: object) -> None:
    """User-facing output (library code logs instead)."""
    print(*parts)

