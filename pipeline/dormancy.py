"""Dormant neurons per layer, from neuron_stats in SQL; a sweep over training checkpoints.

    nwh dormancy --run demo-corpus --threshold 0.1
    nwh dormancy --run demo-corpus --definition never_active --log-file dormancy.csv
    nwh dormancy-sweep --model zoo-s0                       # every zoo checkpoint
    nwh dormancy-sweep --model ./my-model --revisions "step0 step1"   # local revision folders
    nwh dormancy-sweep --model EleutherAI/pythia-70m-deduped --revisions "step0 step1000 step143000"

Definitions (per neuron i of a layer, from neuron_stats alone, no second pass over activations):
    tau           score_i = mean|a_i| / (mean over the layer's neurons of mean|a_k| + 1e-9),
                  dormant iff score_i <= tau (Sokar et al. 2023, The Dormant Neuron Phenomenon)
    never_active  active_count = 0 (never above the run's active threshold)
    max_abs       max |a_i| = greatest(|min|, |max|) <= epsilon

The per-layer rows go to the warehouse table `dormancy` (one part per definition and
threshold) and to a log in the reference CSV format:
    timestamp,model,revision,step,threshold,layer_name,layer_index,num_neurons,num_dormant,
    pct_dormant,avg_activation,max_activation
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl

from pipeline import tables
from pipeline.config import add_arguments, from_args, opt
from pipeline.errors import UserError
from pipeline.storage import DEFAULT_ROOT, Storage, atomic_path, slug, validate_run_id

log = logging.getLogger(__name__)

DEFINITIONS = ("tau", "never_active", "max_abs")
LOG_MODES = ("append", "write")
LOG_COLUMNS = ("timestamp", "model", "revision", "step", "threshold", "layer_name", "layer_index",
               "num_neurons", "num_dormant", "pct_dormant", "avg_activation", "max_activation")


def _validate(*, threshold: float, definition: str, epsilon: float, log_mode: str) -> None:
    if definition not in DEFINITIONS:
        raise UserError(f"--definition {definition!r} is unknown: use one of {', '.join(DEFINITIONS)}")
    if not (math.isfinite(threshold) and threshold >= 0):
        raise UserError(f"--threshold must be a number >= 0, got {threshold}")
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise UserError(f"--epsilon must be a number >= 0, got {epsilon}")
    if log_mode not in LOG_MODES:
        raise UserError(f"--log-mode {log_mode!r} is unknown: use append or write")


@dataclass
class DormancyConfig:
    run: str = opt(help="an extraction run")
    threshold: float = opt(0.1, help="tau: dormant iff score <= tau (definition tau)")
    definition: str = opt("tau", help="tau (Sokar et al. 2023: score = mean|a| / layer mean of "
                          "mean|a|), never_active (active_count = 0) or max_abs (max |a| <= epsilon)")
    epsilon: float = opt(1e-6, help="max_abs: dormant iff max |a| <= epsilon")
    log_file: str | None = opt(None, help="CSV log (default dormancy_results_<model>_<time>.csv)")
    log_mode: str = opt("append", help="append rows (header only for a new file) or write the "
                        "log anew")
    step: int | None = opt(None, help="training step to log (default: parsed from the revision, "
                           "e.g. step1000; N/A when unknown)")
    revision: str | None = opt(None, help="revision to log (default: the run's)")

    def __post_init__(self) -> None:
        validate_run_id(self.run)
        _validate(threshold=self.threshold, definition=self.definition, epsilon=self.epsilon,
                  log_mode=self.log_mode)
        if self.step is not None and self.step < 0:
            raise UserError(f"--step must be >= 0, got {self.step}")


def default_log_file(model: str) -> Path:
    """dormancy_results_<model>_<YYYYmmdd_HHMMSS>.csv in the working folder ('/' -> '_')."""
    return Path(f"dormancy_results_{slug(model.replace('/', '_'))}_"
                f"{datetime.now():%Y%m%d_%H%M%S}.csv")


def parse_step(revision: str | None) -> int | None:
    """Training step of a revision name such as 'step1000' (Pythia and the zoo)."""
    match = re.fullmatch(r"step(\d+)", revision or "")
    return int(match.group(1)) if match else None


def dormant_neurons(storage: Storage, run: str, *, definition: str = "tau",
                    threshold: float = 0.1, epsilon: float = 1e-6) -> pl.DataFrame:
    """Per neuron of a run: layer, neuron, neuron_id, site, mean, mean_abs, max_abs, score
    (mean|a| over the layer mean of mean|a|), active_count and the `dormant` flag under
    `definition` (sql/dormancy_neurons.sql)."""
    from pipeline.warehouse import connect, load_sql

    _validate(threshold=threshold, definition=definition, epsilon=epsilon, log_mode="append")
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

    from pipeline.warehouse import load_sql

    con = duckdb.connect()
    try:
        con.register("dormant_neurons", neurons.to_arrow())
        return con.sql(load_sql("dormancy_layers")).pl()
    finally:
        con.close()


def dormancy(config: DormancyConfig, storage: Storage) -> tuple[pl.DataFrame, Path]:
    """Per-layer dormancy of a run into the table `dormancy` and the CSV log; returns (rows, log).

    The logged threshold is tau, epsilon for max_abs, or the run's active threshold for
    never_active (active = activation > it).
    """
    manifest = storage.finished_run(config.run)
    model = manifest["model"]["name"]
    revision = config.revision or manifest["model"].get("revision")
    step = config.step if config.step is not None else parse_step(revision)
    threshold = {"tau": config.threshold, "max_abs": config.epsilon,
                 "never_active": float(manifest.get("config", {}).get("active_threshold", 0.0))
                 }[config.definition]
    layers = layer_dormancy(dormant_neurons(storage, config.run, definition=config.definition,
                                            threshold=config.threshold, epsilon=config.epsilon))
    timestamp = datetime.now().isoformat(timespec="seconds")
    rows = layers.with_columns(
        pl.lit(timestamp).alias("timestamp"), pl.lit(model).alias("model"),
        pl.lit(revision or "N/A").alias("revision"), pl.lit(step, pl.Int64).alias("step"),
        pl.lit(config.definition).alias("definition"),
        pl.lit(threshold, pl.Float64).alias("threshold"),
    ).select(tables.schema("dormancy").names)
    # one part per definition and threshold: a rerun replaces its own rows only
    tables.write_part(storage, "dormancy", config.run, rows.to_arrow(),
                      part=f"{config.definition}-{threshold:g}")
    log_file = Path(config.log_file) if config.log_file else default_log_file(model)
    write_log(rows, log_file, mode=config.log_mode)
    log.info("run %s: %d layers logged to %s", config.run, rows.height, log_file)
    return rows, log_file


def _fmt(value, digits: int | None = None) -> str:
    if value is None:
        return "N/A"
    return f"{value:.{digits}f}" if digits is not None else str(value)


def write_log(rows: pl.DataFrame, path: Path, *, mode: str = "append") -> None:
    """Rows in the reference CSV format; append adds rows (a header only to a new file), write
    replaces the file. Either way the new file is renamed into place: never half a log."""
    if mode not in LOG_MODES:
        raise UserError(f"--log-mode {mode!r} is unknown: use append or write")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for r in rows.iter_rows(named=True):
        writer.writerow([r["timestamp"], r["model"], r["revision"], _fmt(r["step"]),
                         _fmt(r["threshold"]), r["layer_name"], r["layer_index"], r["num_neurons"],
                         r["num_dormant"], _fmt(r["pct_dormant"], 4),
                         _fmt(r["avg_activation"], 6), _fmt(r["max_activation"], 6)])
    header = ",".join(LOG_COLUMNS) + "\n"
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--log-file {str(path)!r} is a folder: give a .csv file name")
    old = path.read_text() if mode == "append" and path.exists() else ""
    if old.strip() and old.splitlines()[0] != header.strip():
        raise UserError(f"--log-file {str(path)!r} exists with another header: pass --log-mode "
                        "write or another file")
    if old.strip() and not old.endswith("\n"):
        old += "\n"
    with atomic_path(path) as tmp:
        tmp.write_text((old if old.strip() else header) + buf.getvalue())


def read_log(path: str | Path) -> pl.DataFrame:
    """A dormancy log CSV (reference format) as a DataFrame; 'N/A' steps become null."""
    return pl.read_csv(path, null_values=["N/A"], infer_schema_length=None)


# -- sweep over checkpoints


@dataclass
class SweepConfig:
    model: str = opt(help="zoo name, local folder with revision subfolders, or hub id")
    revisions: str | None = opt(None, help="space-separated revisions, passed unchanged to the "
                                "loader, e.g. 'step0 step1000 step143000' (default: every "
                                "checkpoint of a zoo model or local folder)")
    corpus: str = opt("stdlib", help="corpus for extraction (as in nwh extract)")
    dataset_config: str | None = opt(None, help="config name of a hub dataset")
    num_samples: int = opt(64, help="corpus windows per checkpoint")
    max_length: int = opt(128, help="tokens per window")
    batch_size: int = opt(8, help="windows per forward pass")
    device: str = opt("auto", help="auto, cpu, cuda or cuda:N")
    threshold: float = opt(0.1, help="tau: dormant iff score <= tau")
    definition: str = opt("tau", help="tau, never_active or max_abs")
    epsilon: float = opt(1e-6, help="max_abs: dormant iff max |a| <= epsilon")
    log_file: str | None = opt(None, help="CSV log every checkpoint is appended to (default "
                               "dormancy_results_<model>_<time>.csv)")
    log_mode: str = opt("append", help="append, or write the log anew before the first checkpoint")

    def __post_init__(self) -> None:
        _validate(threshold=self.threshold, definition=self.definition, epsilon=self.epsilon,
                  log_mode=self.log_mode)
        for name in ("num_samples", "max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.revisions is not None and not self.revisions.split():
            raise UserError("--revisions is empty: give names such as 'step0 step1000', or leave "
                            "it out to sweep every local checkpoint")
        if self.log_file is None:  # resolved once, so every checkpoint lands in one file
            self.log_file = str(default_log_file(self.model))

    def run_id(self, revision: str) -> str:
        """Extraction run of one checkpoint: model, revision, corpus and its size."""
        return slug(Path(self.model).name, revision, Path(self.corpus).name.split(":")[0],
                    f"n{self.num_samples}x{self.max_length}")


def sweep_revisions(storage: Storage, model: str, revisions: str | None) -> list[str]:
    """The given revisions, else every checkpoint of a zoo model or local folder (by step)."""
    if revisions:
        return revisions.split()
    from pipeline.zoo import is_zoo_name, zoo_revisions

    if is_zoo_name(model):
        return zoo_revisions(storage, model)
    root = Path(model)
    if root.is_dir():
        found = [p.name for p in root.iterdir() if (p / "config.json").exists()]
        if found:
            return sorted(found, key=lambda r: (parse_step(r) is None, parse_step(r) or 0, r))
    raise UserError(f"model {model!r} has no local checkpoints to sweep: pass --revisions, e.g. "
                    "'step0 step1000 step143000'")


def dormancy_sweep(config: SweepConfig, storage: Storage, *, overwrite: bool = False,
                   progress: bool = True) -> pl.DataFrame:
    """Extract each revision (resumable; finished runs are reused) and append its per-layer
    dormancy to one log (config.log_file); returns every logged row."""
    from tqdm.auto import tqdm

    from pipeline.extract import ExtractConfig, extract

    revisions = sweep_revisions(storage, config.model, config.revisions)
    frames = []
    for i, revision in enumerate(tqdm(revisions, desc=f"sweep {config.model}", unit="rev",
                                      disable=not progress or len(revisions) < 2)):
        extract_config = ExtractConfig(
            model=config.model, revision=revision, corpus=config.corpus,
            dataset_config=config.dataset_config, device=config.device,
            num_samples=config.num_samples, max_length=config.max_length,
            batch_size=config.batch_size, run=config.run_id(revision))
        extract(extract_config, storage, overwrite=overwrite, progress=progress)
        rows, _ = dormancy(DormancyConfig(
            run=extract_config.run_id, threshold=config.threshold, definition=config.definition,
            epsilon=config.epsilon, log_file=config.log_file,
            log_mode="write" if i == 0 and config.log_mode == "write" else "append",
            revision=revision), storage)
        frames.append(rows)
        log.info("%s %s: %.2f%% dormant on average over layers", config.model, revision,
                 rows["pct_dormant"].mean())
    return pl.concat(frames)


# -- CLI


def register(sub) -> None:
    from pipeline.cli import add_stage_parser

    parser = add_stage_parser(
        sub, "dormancy", "Dormant neurons per layer of a run (tau-dormant and other definitions).",
        "  nwh dormancy --run demo-corpus --threshold 0.1\n"
        "  nwh dormancy --run demo-corpus --definition never_active --log-file log.csv\n"
        "  nwh dormancy --run demo-corpus --definition max_abs --epsilon 1e-4 --neurons-out n.csv\n"
        "  nwh dormancy --run pythia-step1000 --revision step1000 --log-mode append --log-file p.csv\n",
    )
    add_arguments(parser, DormancyConfig)
    parser.add_argument("--neurons-out", help="also write the per-neuron scores and flags to "
                        "a .csv, .parquet or .json file")
    _common(parser)
    parser.set_defaults(handler=_cli)

    parser = add_stage_parser(
        sub, "dormancy-sweep", "Extract every checkpoint of a model and log its dormancy.",
        "  nwh dormancy-sweep --model zoo-s0 --log-file zoo_s0.csv\n"
        "  nwh dormancy-sweep --model zoo-s0 --revisions 'step0 step8 step500' --num-samples 32\n"
        "  nwh dormancy-sweep --model EleutherAI/pythia-70m-deduped \\\n"
        "      --revisions 'step0 step1000 step143000' --corpus wikitext \\\n"
        "      --dataset-config wikitext-2-raw-v1 --num-samples 500 --log-file pythia.csv\n",
    )
    add_arguments(parser, SweepConfig)
    parser.add_argument("--overwrite", action="store_true", help="re-extract a checkpoint whose "
                        "run exists with another configuration")
    _common(parser)
    parser.set_defaults(handler=_cli_sweep)


def _common(parser) -> None:
    parser.add_argument("--storage", default=str(DEFAULT_ROOT), help="warehouse root (default: storage)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, no table")


def _print(rows: pl.DataFrame, log_file: Path | str, quiet: bool) -> None:
    from pipeline.cli import echo

    if not quiet:
        with pl.Config(tbl_rows=500, tbl_cols=-1, tbl_width_chars=200, fmt_str_lengths=40):
            echo(rows.select("revision", "step", "layer_index", "layer_name", "num_neurons",
                             "num_dormant", "pct_dormant", "avg_activation", "max_activation"))
    echo(f"logged {rows.height} rows to {log_file}")


def _cli(args) -> int:
    from pipeline.cli import echo
    from pipeline.frequencies import write_frame

    config = from_args(DormancyConfig, args)
    storage = Storage(args.storage)
    rows, log_file = dormancy(config, storage)
    _print(rows, log_file, args.quiet)
    if args.neurons_out:
        write_frame(dormant_neurons(storage, config.run, definition=config.definition,
                                    threshold=config.threshold, epsilon=config.epsilon),
                    args.neurons_out)
        echo(f"wrote per-neuron dormancy to {args.neurons_out}")
    return 0


def _cli_sweep(args) -> int:
    config = from_args(SweepConfig, args)
    rows = dormancy_sweep(config, Storage(args.storage), overwrite=args.overwrite,
                          progress=not args.quiet)
    _print(rows, config.log_file, args.quiet)
    return 0
