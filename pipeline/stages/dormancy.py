"""Dormant neurons per layer, from neuron_stats in SQL.

    nwh dormancy --run demo-corpus --threshold 0.1
    nwh dormancy --run demo-corpus --definition never_active --log-file dormancy.csv

Writes the `dormancy` table (part <definition>-<threshold>, the threshold written exactly) and
the per-layer log in the reference CSV format, by default under reports/<run>/:
    timestamp,model,revision,step,threshold,layer_name,layer_index,num_neurons,num_dormant,
    pct_dormant,avg_activation,max_activation
The log keeps the reference's header; the table names its columns as every other table does
(layer_index is `layer`, layer_name is `site`).
The sweep over training checkpoints (extract + dormancy per revision) is a flow:
pipeline/flows.py, `nwh dormancy-sweep`.
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
from pipeline.core.config import Stage, config_hash, opt, to_dict
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, atomic_path, slug

log = logging.getLogger(__name__)

DEFINITIONS = ("tau", "never_active", "max_abs")
LOG_MODES = ("append", "write")
# the reference log's header (its layer_name, layer_index are the table's site, layer)
LOG_COLUMNS = ("timestamp", "model", "revision", "step", "threshold", "layer_name", "layer_index",
               "num_neurons", "num_dormant", "pct_dormant", "avg_activation", "max_activation")


@dataclass(kw_only=True)
class DormancyConfig:
    run: str = opt(help="an extraction run")
    threshold: float = opt(0.1, help="tau: dormant iff score <= tau (definition tau)")
    definition: str = opt("tau", help="tau (Sokar et al. 2023), never_active or max_abs",
                          choices=DEFINITIONS)
    epsilon: float = opt(1e-6, help="max_abs: dormant iff max |a| <= epsilon")
    log_file: str | None = opt(None, help="CSV log (default reports/<run>/dormancy_results_"
                               "<model>_<time>.csv under the storage root)", hash=False)
    log_mode: str = opt("append", help="append to the log or write it anew", choices=LOG_MODES,
                        hash=False)
    step: int | None = opt(None, help="training step to log (default: parsed from the revision)")
    revision: str | None = opt(None, help="revision to log (default: the run's)")
    overwrite: bool = opt(False, help="recompute the table even when this configuration is "
                          "already done", hash=False)

    def __post_init__(self) -> None:
        check_dormancy_options(self.definition, self.threshold, self.epsilon, self.log_mode)

    @property
    def tau(self) -> float:
        """The threshold the definition uses (epsilon for max_abs)."""
        return self.epsilon if self.definition == "max_abs" else self.threshold

    @property
    def part(self) -> str:
        """Table part (and marker key) of this definition and threshold; repr keeps every digit,
        so two thresholds never share a part."""
        return f"{self.definition}-{self.tau!r}"


def check_dormancy_options(definition: str, threshold: float, epsilon: float,
                           log_mode: str) -> None:
    """The one-line errors of the options a dormancy run takes (also the sweep's)."""
    if definition not in DEFINITIONS:
        raise UserError(f"--definition {definition!r} is unknown: use one of "
                        f"{', '.join(DEFINITIONS)}")
    if threshold < 0:
        raise UserError(f"--threshold must be >= 0, got {threshold}")
    if epsilon < 0:
        raise UserError(f"--epsilon must be >= 0, got {epsilon}")
    if log_mode not in LOG_MODES:
        raise UserError(f"--log-mode {log_mode!r} is unknown: use append or write")


def parse_step(revision: str | None) -> int | None:
    """Training step of a revision name such as 'step1000' (Pythia and the zoo)."""
    match = re.fullmatch(r"step(\d+)", revision or "")
    return int(match.group(1)) if match else None


def check_revisions(storage: Storage, model: str, revisions: list[str]) -> None:
    """Refuse a sweep naming a revision the model lacks before anything is extracted: zoo and
    local models list their checkpoints; a hub model's branches and tags are asked once
    (offline: each revision must be in the cache). Revisions the hub cannot be asked about
    are left to the extraction."""
    from pipeline.models import zoo

    if not revisions:
        raise UserError("--revisions is empty: name at least one checkpoint, e.g. 'step0 step1000'")
    if zoo.is_zoo_name(model):
        known = zoo.zoo_revisions(storage, model)
        where = f"zoo model {model!r}"
    elif Path(model).expanduser().is_dir():
        root = Path(model).expanduser()
        known = sorted(p.name for p in root.iterdir() if (p / "config.json").exists())
        where = f"model folder {model!r}"
    elif str(model).lower().endswith(".gguf"):
        raise UserError(f"--revisions with the GGUF file {model!r}: a GGUF file holds one "
                        "checkpoint; sweep a folder of checkpoints or a hub model")
    else:
        _check_hub_revisions(model, revisions)
        return
    unknown = [r for r in revisions if r not in known]
    if unknown:
        raise UserError(f"{where} has no revision {' '.join(unknown)}: available are "
                        f"{' '.join(known) or 'none'}; nothing was extracted")


def _check_hub_revisions(model: str, revisions: list[str]) -> None:
    from huggingface_hub import try_to_load_from_cache

    from pipeline.models.loading import _hub_offline_reason

    offline = _hub_offline_reason()
    if offline:  # the extraction would need each revision's files from the cache
        missing = [r for r in revisions if not isinstance(
            try_to_load_from_cache(model, "config.json", revision=r), str)]
        if missing:
            raise UserError(f"model {model!r} has no cached revision {' '.join(missing)} and "
                            f"the hub cannot be asked ({offline}): download them once online, or "
                            "sweep only cached revisions; nothing was extracted")
        return
    try:
        from huggingface_hub import HfApi

        refs = HfApi().list_repo_refs(model)
    except Exception as e:  # noqa: BLE001 - gated, private, rate-limited: the load will say
        log.debug("revisions of %s not checked: %s", model, e)
        return
    known = [b.name for b in refs.branches] + [t.name for t in refs.tags]
    unknown = [r for r in revisions if r not in known and not re.fullmatch(r"[0-9a-f]{7,40}", r)]
    if unknown:
        shown = " ".join(sorted(known, key=lambda r: (parse_step(r) is None, parse_step(r) or 0,
                                                      r))[:8])
        raise UserError(f"model {model!r} has no revision {' '.join(unknown)} on the hub "
                        f"(branches and tags: {shown}{' ...' if len(known) > 8 else ''}); "
                        "nothing was extracted")


def dormant_neurons(storage: Storage, run: str, *, definition: str = "tau",
                    threshold: float = 0.1, epsilon: float = 1e-6) -> pl.DataFrame:
    """Per-neuron score and dormant flag (sql/dormancy_neurons.sql)."""
    from pipeline.core.warehouse import run_query

    storage.finished_run(run)
    return run_query(storage, "dormancy_neurons", run_id=run, definition=definition,
                     threshold=threshold, epsilon=epsilon)


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


@dataclass
class DormancyResult:
    run: str
    rows: pl.DataFrame   # the dormancy table's rows of this definition and threshold
    log_file: Path
    skipped: bool = False


def default_log_file(storage: Storage, report: str, model: str) -> Path:
    """reports/<report>/dormancy_results_<model>_<time>.csv (the reference name), never the
    current directory."""
    name = f"dormancy_results_{slug(model.replace('/', '_'))}_{datetime.now():%Y%m%d_%H%M%S}.csv"
    return storage.reports(report) / name


def run(config: DormancyConfig, storage: Storage) -> DormancyResult:
    """Per-layer dormancy of a run: warehouse table `dormancy`, and the CSV log."""
    manifest = storage.finished_run(config.run)
    model = manifest["model"]["name"]
    key = config_hash(config)
    marker = storage.marker(config.run, "dormancy", config.part)
    part = tables.part_path(storage, "dormancy", config.run, config.part)
    skipped = not config.overwrite and marker.done(key) is not None and part.exists()
    if skipped:
        rows = pl.from_arrow(tables.read_parquet(part)).select(tables.schema("dormancy").names)
    else:
        rows = dormancy_rows(storage, config, manifest)
        tables.write_part(storage, "dormancy", config.run, rows.to_arrow(), part=config.part)
    log_file = (Path(config.log_file) if config.log_file
                else default_log_file(storage, config.run, model))
    write_log(rows, log_file, mode=config.log_mode)
    if not skipped:
        marker.write(to_dict(config), key, layers=rows.height)
    return DormancyResult(config.run, rows, log_file, skipped)


def dormancy_rows(storage: Storage, config: DormancyConfig, manifest: dict) -> pl.DataFrame:
    """The dormancy table's rows (its declared types): per-layer summaries with the run's model,
    revision and step."""
    revision = config.revision or manifest["model"].get("revision")
    step = config.step if config.step is not None else parse_step(revision)
    layers = layer_dormancy(dormant_neurons(storage, config.run, definition=config.definition,
                                            threshold=config.threshold, epsilon=config.epsilon))
    rows = layers.with_columns(
        pl.lit(datetime.now().isoformat(timespec="seconds")).alias("timestamp"),
        pl.lit(manifest["model"]["name"]).alias("model"),
        pl.lit(revision or "N/A").alias("revision"), pl.lit(step, pl.Int64).alias("step"),
        pl.lit(config.definition).alias("definition"),
        pl.lit(config.tau, pl.Float64).alias("threshold"),
    )
    return pl.from_arrow(tables.to_arrow("dormancy", rows.to_arrow()))


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
                         _fmt(r["threshold"]), r["site"], r["layer"], r["num_neurons"],
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


def format_rows(rows: pl.DataFrame, log_file: Path) -> str:
    """The per-layer table and where it was logged (the CLI's text)."""
    with pl.Config(tbl_rows=200, tbl_cols=-1, tbl_width_chars=160):
        table = str(rows.select("revision", "step", "layer", "num_neurons", "num_dormant",
                                "pct_dormant", "avg_activation", "max_activation"))
    return f"{table}\nlogged {rows.height} rows to {log_file}"


def show(result: DormancyResult) -> str:
    head = "stored result of this configuration (--overwrite recomputes it)\n" if result.skipped else ""
    return head + format_rows(result.rows, result.log_file)


STAGES = [Stage(
    "dormancy", "Dormant neurons per layer of a run (tau-dormant and other definitions).",
    "  nwh dormancy --run demo-corpus --threshold 0.1\n"
    "  nwh dormancy --run demo-corpus --definition never_active --log-file log.csv\n"
    "  nwh dormancy --run pythia-step1000 --revision step1000 --log-mode append --log-file p.csv\n",
    DormancyConfig, run, show)]
