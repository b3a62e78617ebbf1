"""Per-neuron tables of a run: activation frequencies, moments, top tokens, histograms.

    nwh frequencies --run demo-corpus --out neuron_frequency.csv
    nwh top-tokens --run demo-corpus --layer 2 --neuron 3 --k 20 --context 8
    nwh histogram --run demo-corpus --layer 2 --bins 50
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.core import arrays, tables
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage

log = logging.getLogger(__name__)


def _query(storage: Storage, name: str, **params) -> pl.DataFrame:
    import duckdb

    from pipeline.core.warehouse import connect, load_sql

    con = connect(storage)
    try:
        return con.sql(load_sql(name), params=params).pl()
    except duckdb.Error as e:
        message = " ".join(str(e).split())
        if "has no acts array" in message or "no arrays" in message:
            raise UserError(message.split("Error: ")[-1] + ": re-extract with --store-acts") from None
        raise
    finally:
        con.close()


def neuron_frequency(storage: Storage, run: str) -> pl.DataFrame:
    """Columns neuron_id, layer, dimension, activation_count, activation_frequency (the reference
    neuron_frequency.csv)."""
    storage.finished_run(run)
    return _query(storage, "neuron_frequency", run_id=run)


def neuron_summary(storage: Storage, run: str) -> pl.DataFrame:
    """Mean, variance, skew, kurtosis (E[z^4]), sparsity per neuron from the moment sums."""
    storage.finished_run(run)
    return _query(storage, "neuron_summary", run_id=run)


def _check_neuron(manifest: dict, run: str, layer: int, neuron: int | None) -> None:
    model = manifest["model"]
    if layer not in model.get("dense_layers", []):
        raise UserError(f"run {run!r} has no dense activations of layer {layer} (stored: "
                        f"{model.get('dense_layers', [])}): re-extract with --store-acts")
    if neuron is not None and not 0 <= neuron < model["widths"][layer]:
        raise UserError(f"neuron {neuron} is out of range for layer {layer} "
                        f"(0-{model['widths'][layer] - 1})")


def top_tokens(storage: Storage, run: str, layer: int, neuron: int, *, k: int = 20,
               context: int = 8) -> pl.DataFrame:
    """The k rows where a neuron fires most, with their token and left context."""
    _check_neuron(storage.finished_run(run), run, layer, neuron)
    if k < 1 or context < 0:
        raise UserError("--k must be at least 1 and --context at least 0")
    return _query(storage, "top_tokens", run_id=run, layer=layer, neuron=neuron, k=k,
                  context=context)


def layer_histogram(storage: Storage, run: str, layer: int, *, bins: int = 50,
                    block_rows: int = 8192) -> pl.DataFrame:
    """Counts of a layer's activations in equal bins over [min, max], streamed over row blocks."""
    manifest = storage.finished_run(run)
    _check_neuron(manifest, run, layer, None)
    if bins < 1:
        raise UserError("--bins must be at least 1")
    stats = tables.read_partition(storage, "neuron_stats", run).to_pydict()
    sel = [i for i, l in enumerate(stats["layer"]) if l == layer]
    lo = min(stats["min"][i] for i in sel)
    hi = max(stats["max"][i] for i in sel)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    counts = np.zeros(bins, np.int64)
    acts = arrays.layer_array(arrays.open_group(storage.arrays(run), mode="r"), "acts", layer)
    for s in range(0, acts.shape[0], block_rows):
        block = acts[s:s + block_rows].astype(np.float64).ravel()
        counts += np.histogram(np.clip(block, edges[0], edges[-1]), bins=edges)[0]
    return pl.DataFrame({"layer": [layer] * bins, "bin_start": edges[:-1], "bin_end": edges[1:],
                         "count": counts})


def write_frame(frame: pl.DataFrame, out: str) -> None:
    suffix = Path(out).suffix.lower()
    writers = {".csv": frame.write_csv, ".parquet": frame.write_parquet, ".json": frame.write_json}
    if suffix not in writers:
        raise UserError(f"--out {out!r}: use a .csv, .parquet or .json file name")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    writers[suffix](out)


# -- CLI


def register(sub) -> None:
    from pipeline.cli import add_stage_parser

    parser = add_stage_parser(
        sub, "frequencies", "Activation count and frequency per neuron (and moments with --summary).",
        "  nwh frequencies --run demo-corpus --out demo_neuron_frequency.csv\n"
        "  nwh frequencies --run demo-corpus --summary\n")
    parser.add_argument("--run", required=True, help="an extraction run")
    parser.add_argument("--summary", action="store_true",
                        help="mean, variance, skew, kurtosis and sparsity instead")
    parser.add_argument("--out", help="write the table to a .csv, .parquet or .json file")
    parser.set_defaults(handler=_cli_frequencies)

    parser = add_stage_parser(
        sub, "top-tokens", "Tokens (with context) where a neuron fires most; needs --store-acts.",
        "  nwh top-tokens --run demo-corpus --layer 2 --neuron 3 --k 20 --context 8\n")
    parser.add_argument("--run", required=True, help="an extraction run with dense activations")
    parser.add_argument("--layer", type=int, required=True, help="layer")
    parser.add_argument("--neuron", type=int, required=True, help="neuron index within the layer")
    parser.add_argument("--k", type=int, default=20, help="rows (default 20)")
    parser.add_argument("--context", type=int, default=8, help="tokens of left context (default 8)")
    parser.add_argument("--out", help="write the table to a .csv, .parquet or .json file")
    parser.set_defaults(handler=_cli_top)

    parser = add_stage_parser(
        sub, "histogram", "Histogram of a layer's activations; needs --store-acts.",
        "  nwh histogram --run demo-corpus --layer 2 --bins 50\n")
    parser.add_argument("--run", required=True, help="an extraction run with dense activations")
    parser.add_argument("--layer", type=int, required=True, help="layer")
    parser.add_argument("--bins", type=int, default=50, help="bins (default 50)")
    parser.add_argument("--out", help="write the table to a .csv, .parquet or .json file")
    parser.set_defaults(handler=_cli_histogram)


def _show(frame: pl.DataFrame, out: str | None) -> int:
    from pipeline.cli import echo

    if out:
        write_frame(frame, out)
        echo(f"wrote {frame.height} rows to {out}")
    else:
        with pl.Config(tbl_rows=40, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
            echo(frame)
    return 0


def _cli_frequencies(args) -> int:
    storage = Storage(args.storage)
    fn = neuron_summary if args.summary else neuron_frequency
    return _show(fn(storage, args.run), args.out)


def _cli_top(args) -> int:
    return _show(top_tokens(Storage(args.storage), args.run, args.layer, args.neuron, k=args.k,
                            context=args.context), args.out)


def _cli_histogram(args) -> int:
    return _show(layer_histogram(Storage(args.storage), args.run, args.layer, bins=args.bins),
                 args.out)

