"""Dormant neurons per layer, from neuron_stats in SQL; a sweep over training checkpoints.

    nwh dormancy --run demo-corpus --threshold 0.1
    nwh dormancy --run demo-corpus --definition never_active --log-file dormancy.csv
    nwh dormancy-sweep --model zoo-s0                       # every zoo checkpoint
    nwh dormancy-sweep --model EleutherAI/pythia-70m-deduped --revisions "step0 step1000 step143000"

The per-layer log is written in the reference CSV format:
    timestamp,model,revision,step,threshold,layer_name,layer_index,num_neurons,num_dormant,
    pct_dormant,avg_activation,max_activation
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl

from pipeline.core import tables
from pipeline.core.config import add_arguments, from_args, opt
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, atomic_path, slug

log = logging.getLogger(__name__)

DEFINITIONS = ("tau", "never_active", "max_abs")
LOG_COLUMNS = ("timestamp", "model", "revision", "step", "threshold", "layer_name", "layer_index",
               "num_neurons", "num_dormant", "pct_dormant", "avg_activation", "max_activation")


@dataclass
class DormancyConfig:
    run: str = opt(help="an extraction run")
    threshold: float = opt(0.1, help="tau: dormant iff score <= tau (definition tau)")
    definition: str = opt("tau", help="tau (Sokar et al. 2023), never_active or max_abs",
                          choices=DEFINITIONS)
    epsilon: float = opt(1e-6, help="max_abs: dormant iff max |a| <= epsilon")
    log_file: str | None = opt(None, help="CSV log (default dormancy_results_<model>_<time>.csv)")
    log_mode: str = opt("append", help="append to the log or write it anew",
                        choices=("append", "write"))
    step: int | None = opt(None, help="training step to log (default: parsed from the revision)")
    revision: str | None = opt(None, help="revision to log (default: the run's)")

    def __post_init__(self) -> None:
        if self.definition not in DEFINITIONS:
            raise UserError(f"--definition {self.definition!r} is unknown: use one of "
                            f"{', '.join(DEFINITIONS)}")
        if self.threshold < 0:
            raise UserError(f"--threshold must be >= 0, got {self.threshold}")
        if self.epsilon < 0:
            raise UserError(f"--epsilon must be >= 0, got {self.epsilon}")
        if self.log_mode not in ("append", "write"):
            raise UserError(f"--log-mode {self.log_mode!r} is unknown: use append or write")


def parse_step(revision: str | None) -> int | None:
    """Training step of a revision name such as 'step1000' (Pythia and the zoo)."""
    match = re.fullmatch(r"step(\d+)", revision or "")
    return int(match.group(1)) if match else None


def dormant_neurons(storage: Storage, run: str, *, definition: str = "tau",
                    threshold: float = 0.1, epsilon: float = 1e-6) -> pl.DataFrame:
    """Per-neuron score and dormant flag (sql/dormancy_neurons.sql)."""
    from pipeline.core.warehouse import connect, load_sql

    storage.finished_run(run)
    con = connect(storage)
    try:
        return con.sql(load_sql("dormancy_neurons"), params={
            "run_id": run, "definition": definition, "threshold": threshold,
            "epsilon": epsilon}).pl()
    finally:
        con.close()


def layer_dormancy(neurons: pl.DataFrame) -> pl.DataFrame:
    """Per-layer summary (sql/dormancy_layers.sql) of a dormant_neurons() frame."""
    import duckdb

    from pipeline.core.warehouse import load_sql

    con = duckdb.connect()
    try:
        con.register("dormant_neurons", neurons.to_arrow())
        return con.sql(load_sql("dormancy_layers")).pl()
    finally:
        con.close()


def dormancy(config: DormancyConfig, storage: Storage) -> tuple[pl.DataFrame, Path]:
    """Per-layer dormancy of a run: warehouse table `dormancy`, the CSV log; returns (rows, log)."""
    manifest = storage.finished_run(config.run)
    model = manifest["model"]["name"]
    revision = config.revision or manifest["model"].get("revision")
    step = config.step if config.step is not None else parse_step(revision)
    threshold = config.epsilon if config.definition == "max_abs" else config.threshold
    layers = layer_dormancy(dormant_neurons(storage, config.run, definition=config.definition,
                                            threshold=config.threshold, epsilon=config.epsilon))
    timestamp = datetime.now().isoformat(timespec="seconds")
    rows = layers.with_columns(
        pl.lit(timestamp).alias("timestamp"), pl.lit(model).alias("model"),
        pl.lit(revision or "N/A").alias("revision"), pl.lit(step, pl.Int64).alias("step"),
        pl.lit(config.definition).alias("definition"), pl.lit(threshold).alias("threshold"),
    ).select(tables.schema("dormancy").names)
    tables.write_part(storage, "dormancy", config.run, rows.to_arrow(),
                      part=f"{config.definition}-{threshold:g}")
    log_file = Path(config.log_file) if config.log_file else Path(
        f"dormancy_results_{slug(model.replace('/', '_'))}_{datetime.now():%Y%m%d_%H%M%S}.csv")
    write_log(rows, log_file, mode=config.log_mode)
    return rows, log_file


def _fmt(value, digits: int | None = None) -> str:
    if value is None:
        return "N/A"
    return f"{value:.{digits}f}" if digits is not None else str(value)


def write_log(rows: pl.DataFrame, path: Path, *, mode: str = "append") -> None:
    """Rows in the reference CSV format; append adds rows (a header only to a new file)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for r in rows.iter_rows(named=True):
        writer.writerow([r["timestamp"], r["model"], r["revision"], _fmt(r["step"]),
                         _fmt(r["threshold"]), r["layer_name"], r["layer_index"], r["num_neurons"],
                         r["num_dormant"], _fmt(r["pct_dormant"], 4),
                         _fmt(r["avg_activation"], 6), _fmt(r["max_activation"], 6)])
    header = ",".join(LOG_COLUMNS) + "\n"
    old = path.read_text() if mode == "append" and path.exists() else ""
    if old and old.splitlines()[0] != header.strip():
        raise UserError(f"--log-file {str(path)!r} exists with another header: pass --log-mode "
                        "write or another file")
    with atomic_path(path) as tmp:  # a whole new file, renamed: never half a log
        tmp.write_text((old or header) + buf.getvalue())


def read_log(path: str | Path) -> pl.DataFrame:
    """A dormancy log CSV (reference format) as a DataFrame; 'N/A' steps become null."""
    return pl.read_csv(path, null_values=["N/A"], infer_schema_length=None)


# -- sweep over checkpoints


@dataclass
class SweepConfig:
    model: str = opt(help="zoo name, local folder with revision subfolders, or hub id")
    revisions: str | None = opt(None, help="space-separated revisions, e.g. 'step0 step1000' "
                                "(default: every checkpoint of a zoo or local model)")
    corpus: str = opt("stdlib", help="corpus for extraction")
    num_samples: int = opt(64, help="corpus windows per checkpoint")
    max_length: int = opt(128, help="tokens per window")
    batch_size: int = opt(8, help="windows per forward pass")
    device: str = opt("auto", help="auto, cpu, cuda")
    threshold: float = opt(0.1, help="tau")
    definition: str = opt("tau", help="tau, never_active or max_abs", choices=DEFINITIONS)
    log_file: str | None = opt(None, help="CSV log every checkpoint is appended to")
    log_mode: str = opt("append", help="append, or write the log anew before the first checkpoint",
                        choices=("append", "write"))

    def __post_init__(self) -> None:
        DormancyConfig(run="x", threshold=self.threshold, definition=self.definition,
                       log_mode=self.log_mode)  # same validation


def sweep_revisions(storage: Storage, model: str, revisions: str | None) -> list[str]:
    if revisions:
        return revisions.split()
    from pipeline.models.zoo import is_zoo_name, zoo_revisions

    if is_zoo_name(model):
        return zoo_revisions(storage, model)
    root = Path(model)
    if root.is_dir():
        found = [p.name for p in root.iterdir() if (p / "config.json").exists()]
        if found:
            return sorted(found, key=lambda r: (parse_step(r) is None, parse_step(r) or 0, r))
    raise UserError(f"model {model!r} has no local checkpoints to sweep: pass --revisions, e.g. "
                    "'step0 step1000 step143000'")


def dormancy_sweep(config: SweepConfig, storage: Storage, *, progress: bool = True) -> tuple[pl.DataFrame, Path]:
    from pipeline.stages.extract import ExtractConfig, extract

    revisions = sweep_revisions(storage, config.model, config.revisions)
    log_file = Path(config.log_file) if config.log_file else Path(
        f"dormancy_results_{slug(config.model.replace('/', '_'))}_{datetime.now():%Y%m%d_%H%M%S}.csv")
    frames = []
    for i, revision in enumerate(revisions):
        extract_config = ExtractConfig(
            model=config.model, revision=revision, corpus=config.corpus, device=config.device,
            num_samples=config.num_samples, max_length=config.max_length,
            batch_size=config.batch_size,
            run=slug(Path(config.model).name, revision, Path(config.corpus).name.split(":")[0],
                     f"n{config.num_samples}x{config.max_length}"))
        extract(extract_config, storage, progress=progress)  # resumable; skipped when finished
        rows, _ = dormancy(DormancyConfig(
            run=extract_config.run_id, threshold=config.threshold, definition=config.definition,
            log_file=str(log_file), log_mode="write" if i == 0 and config.log_mode == "write"
            else "append", revision=revision), storage)
        frames.append(rows)
        log.info("%s %s: %.2f%% dormant on average", config.model, revision,
                 rows["pct_dormant"].mean())
    return pl.concat(frames), log_file


# -- CLI


def register(sub) -> None:
    from pipeline.cli import add_stage_parser

    parser = add_stage_parser(
        sub, "dormancy", "Dormant neurons per layer of a run (tau-dormant and other definitions).",
        "  nwh dormancy --run demo-corpus --threshold 0.1\n"
        "  nwh dormancy --run demo-corpus --definition never_active --log-file log.csv\n"
        "  nwh dormancy --run pythia-step1000 --revision step1000 --log-mode append --log-file p.csv\n",
    )
    add_arguments(parser, DormancyConfig)
    parser.set_defaults(handler=_cli)

    parser = add_stage_parser(
        sub, "dormancy-sweep", "Extract every checkpoint of a model and log its dormancy.",
        "  nwh dormancy-sweep --model zoo-s0 --log-file zoo_s0.csv\n"
        "  nwh dormancy-sweep --model EleutherAI/pythia-70m-deduped \\\n"
        "      --revisions 'step0 step1000 step143000' --corpus wikitext --num-samples 500\n",
        progress=True,
    )
    add_arguments(parser, SweepConfig)
    parser.set_defaults(handler=_cli_sweep)


def _print(rows: pl.DataFrame, log_file: Path) -> None:
    from pipeline.cli import echo

    with pl.Config(tbl_rows=200, tbl_cols=-1, tbl_width_chars=160):
        echo(rows.select("revision", "step", "layer_index", "num_neurons", "num_dormant",
                         "pct_dormant", "avg_activation", "max_activation"))
    echo(f"logged {rows.height} rows to {log_file}")


def _cli(args) -> int:
    rows, log_file = dormancy(from_args(DormancyConfig, args), Storage(args.storage))
    _print(rows, log_file)
    return 0


def _cli_sweep(args) -> int:
    rows, log_file = dormancy_sweep(from_args(SweepConfig, args), Storage(args.storage),
                                    progress=not args.quiet)
    _print(rows, log_file)
    return 0
