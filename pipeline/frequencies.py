"""Per-neuron tables of a run: activation frequencies, moments, top tokens, histograms.

    nwh frequencies --run demo-corpus --out neuron_frequency.csv
    nwh frequencies --run demo-corpus --summary
    nwh top-tokens --run demo-corpus --layer 2 --neuron 3 --k 20 --context 8
    nwh top-tokens --run demo-corpus --layer 2 --k 5 --out layer2_top.csv   # every neuron
    nwh histogram --run demo-corpus --layer 2 --bins 50

Frequencies and moments come from neuron_stats (sql/neuron_frequency.sql,
sql/neuron_summary.sql); top tokens and histograms read the dense activations (a run extracted
with --store-acts): top tokens in SQL over the neuron_values / layer_values macros, histograms
with NumPy over the Zarr array in row blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pipeline import arrays, tables
from pipeline.config import add_arguments, from_args, opt
from pipeline.errors import UserError
from pipeline.storage import DEFAULT_ROOT, Storage, validate_run_id

log = logging.getLogger(__name__)

BLOCK_VALUES = 1 << 22  # activations per streamed block of a layer (~32 MB as float64)


@dataclass
class TopTokensConfig:
    run: str = opt(help="an extraction run with dense activations (--store-acts)")
    layer: int = opt(help="layer")
    neuron: int | None = opt(None, help="neuron index within the layer (default: every neuron)")
    k: int = opt(20, help="rows per neuron")
    context: int = opt(8, help="tokens of left context shown before each token")

    def __post_init__(self) -> None:
        validate_run_id(self.run)
        if self.k < 1:
            raise UserError(f"--k must be at least 1, got {self.k}")
        if self.context < 0:
            raise UserError(f"--context must be at least 0, got {self.context}")


@dataclass
class HistogramConfig:
    run: str = opt(help="an extraction run with dense activations (--store-acts)")
    layer: int = opt(help="layer")
    bins: int = opt(50, help="equal-width bins over the layer's [min, max]")

    def __post_init__(self) -> None:
        validate_run_id(self.run)
        if self.bins < 1:
            raise UserError(f"--bins must be at least 1, got {self.bins}")


def _connect(storage: Storage):
    from pipeline.warehouse import connect

    return connect(storage)


def _query(con, name: str, **params) -> pl.DataFrame:
    import duckdb

    from pipeline.warehouse import load_sql

    try:
        return con.sql(load_sql(name), params=params).pl()
    except duckdb.Error as e:
        message = " ".join(str(e).split())
        if "has no acts array" in message or "no arrays" in message:
            raise UserError(message.split("Error: ")[-1] + ": re-extract with --store-acts") from None
        raise


def _run_query(storage: Storage, name: str, **params) -> pl.DataFrame:
    con = _connect(storage)
    try:
        return _query(con, name, **params)
    finally:
        con.close()


def neuron_frequency(storage: Storage, run: str) -> pl.DataFrame:
    """Columns id, layer, dimension, count, frequency (the reference neuron_frequency.csv):
    count = token rows where the neuron is active, frequency = count / token rows."""
    storage.finished_run(run)
    return _run_query(storage, "neuron_frequency", run_id=run)


def neuron_summary(storage: Storage, run: str) -> pl.DataFrame:
    """Mean, variance, mean |a|, skew, kurtosis (E[z^4]), min, max and sparsity (share of rows
    above the run's active threshold) per neuron, from the moment sums of neuron_stats."""
    storage.finished_run(run)
    return _run_query(storage, "neuron_summary", run_id=run)


def _check_dense(manifest: dict, run: str, layer: int, neuron: int | None) -> None:
    model = manifest["model"]
    if layer not in model.get("layers", []):
        raise UserError(f"layer {layer} is not recorded in run {run!r} (layers: "
                        f"{model.get('layers', [])}): pass one of them")
    if layer not in model.get("dense_layers", []):
        raise UserError(f"run {run!r} has no dense activations of layer {layer} (stored: "
                        f"{model.get('dense_layers', [])}): re-extract with --store-acts")
    if neuron is not None and not 0 <= neuron < model["widths"][layer]:
        raise UserError(f"neuron {neuron} is out of range for layer {layer} "
                        f"(0-{model['widths'][layer] - 1})")


def top_tokens(storage: Storage, run: str, layer: int, neuron: int | None = None, *,
               k: int = 20, context: int = 8, block_rows: int | None = None,
               progress: bool = True) -> pl.DataFrame:
    """The k rows where a neuron (or each neuron of the layer, when `neuron` is None) fires
    most: layer, neuron, rank, row, sample, position, token, context (the `context` tokens
    before it in its sample) and value. Ties go to the earlier row."""
    from tqdm.auto import tqdm

    config = TopTokensConfig(run=run, layer=layer, neuron=neuron, k=k, context=context)
    manifest = storage.finished_run(run)
    _check_dense(manifest, run, layer, neuron)
    con = _connect(storage)
    try:
        if neuron is not None:
            return _query(con, "top_tokens", run_id=run, layer=layer, neuron=neuron, k=config.k,
                          context=config.context)
        # every neuron: per-block candidates (bounded memory), then the exact top-k of their union
        rows, width = manifest["rows"], manifest["model"]["widths"][layer]
        step = block_rows or max(1, BLOCK_VALUES // width)
        parts = [_query(con, "top_tokens_block", run_id=run, layer=layer, row_start=start,
                        row_stop=min(start + step, rows), k=config.k)
                 for start in tqdm(range(0, rows, step), desc=f"top tokens L{layer}",
                                   unit="block", disable=not progress or rows <= step)]
        candidates = pl.concat(parts) if parts else pl.DataFrame(
            schema={"neuron": pl.Int32, "row": pl.Int64, "value": pl.Float64})
        con.register("candidates", candidates.to_arrow())
        return _query(con, "top_tokens_layer", run_id=run, layer=layer, k=config.k,
                      context=config.context)
    finally:
        con.close()


def layer_histogram(storage: Storage, run: str, layer: int, *, bins: int = 50,
                    block_rows: int | None = None) -> pl.DataFrame:
    """Counts of a layer's dense activations in `bins` equal bins over the layer's [min, max]
    (from neuron_stats), streamed over row blocks of the Zarr array. Values that float16
    storage rounded just outside [min, max] count in the end bins."""
    config = HistogramConfig(run=run, layer=layer, bins=bins)
    manifest = storage.finished_run(run)
    _check_dense(manifest, run, layer, None)
    stats = pl.from_arrow(tables.read_partition(storage, "neuron_stats", run))
    stats = stats.filter(pl.col("layer") == layer)
    lo, hi = float(stats["min"].min()), float(stats["max"].max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, config.bins + 1)
    counts = np.zeros(config.bins, np.int64)
    acts = arrays.layer_array(arrays.open_group(storage.arrays(run), mode="r"), "acts", layer)
    step = block_rows or max(1, BLOCK_VALUES // acts.shape[1])
    for start in range(0, acts.shape[0], step):
        block = np.asarray(acts[start:start + step], dtype=np.float64).ravel()
        counts += np.histogram(np.clip(block, edges[0], edges[-1]), bins=edges)[0]
    return pl.DataFrame({"layer": np.full(config.bins, layer, np.int32), "bin": np.arange(config.bins),
                         "bin_start": edges[:-1], "bin_end": edges[1:], "count": counts})


def write_frame(frame: pl.DataFrame, out: str) -> None:
    """A frame to .csv, .parquet or .json by the file name's suffix."""
    suffix = Path(out).suffix.lower()
    writers = {".csv": frame.write_csv, ".parquet": frame.write_parquet, ".json": frame.write_json}
    if suffix not in writers:
        raise UserError(f"--out {out!r}: use a .csv, .parquet or .json file name")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    writers[suffix](out)


# -- CLI


def _common(parser) -> None:
    parser.add_argument("--out", help="write the table to a .csv, .parquet or .json file")
    parser.add_argument("--storage", default=str(DEFAULT_ROOT), help="warehouse root (default: storage)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def register(sub) -> None:
    from pipeline.cli import add_stage_parser

    parser = add_stage_parser(
        sub, "frequencies", "Activation count and frequency per neuron (moments with --summary).",
        "  nwh frequencies --run demo-corpus --out demo_neuron_frequency.csv\n"
        "  nwh frequencies --run demo-corpus --summary --out summary.parquet\n")
    parser.add_argument("--run", required=True, help="an extraction run")
    parser.add_argument("--summary", action="store_true",
                        help="mean, variance, skew, kurtosis and sparsity per neuron instead")
    _common(parser)
    parser.set_defaults(handler=_cli_frequencies)

    parser = add_stage_parser(
        sub, "top-tokens", "Tokens (with context) where a neuron fires most; needs --store-acts.",
        "  nwh top-tokens --run demo-corpus --layer 2 --neuron 3 --k 20 --context 8\n"
        "  nwh top-tokens --run demo-corpus --layer 2 --k 5 --out layer2_top.csv\n")
    add_arguments(parser, TopTokensConfig)
    _common(parser)
    parser.set_defaults(handler=_cli_top)

    parser = add_stage_parser(
        sub, "histogram", "Histogram of a layer's activations; needs --store-acts.",
        "  nwh histogram --run demo-corpus --layer 2 --bins 50\n"
        "  nwh histogram --run demo-corpus --layer 0 --bins 200 --out l0_hist.csv\n")
    add_arguments(parser, HistogramConfig)
    _common(parser)
    parser.set_defaults(handler=_cli_histogram)


def _show(frame: pl.DataFrame, out: str | None) -> int:
    from pipeline.cli import echo

    if out:
        write_frame(frame, out)
        echo(f"wrote {frame.height} rows to {out}")
    else:
        with pl.Config(tbl_rows=60, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
            echo(frame)
    return 0


def _cli_frequencies(args) -> int:
    storage = Storage(args.storage)
    fn = neuron_summary if args.summary else neuron_frequency
    return _show(fn(storage, args.run), args.out)


def _cli_top(args) -> int:
    config = from_args(TopTokensConfig, args)
    frame = top_tokens(Storage(args.storage), config.run, config.layer, config.neuron,
                       k=config.k, context=config.context, progress=not args.quiet)
    return _show(frame, args.out)


def _cli_histogram(args) -> int:
    config = from_args(HistogramConfig, args)
    return _show(layer_histogram(Storage(args.storage), config.run, config.layer,
                                 bins=config.bins), args.out)
