"""Stages `frequencies`, `top-tokens`, `signs`, `histogram`: per-neuron tables of a run, read-only.

    nwh frequencies --run demo-corpus --out neuron_frequency.csv
    nwh frequencies --run demo-corpus --summary
    nwh top-tokens --run demo-corpus --layer 2 --neuron 3 --k 20 --context 8
    nwh signs --run smollm2-135m_stdlib --layer 11 --neuron 42   # gated MLPs: (g, u) signs
    nwh histogram --run demo-corpus --layer 2 --bins 50

The tables are queries over the warehouse (sql/neuron_frequency.sql, sql/neuron_summary.sql,
sql/top_tokens.sql, sql/sign_examples.sql) or a streamed pass over a layer's dense activations (histogram). They write
nothing into the warehouse; `--out` saves the table to a file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core import arrays, tables
from pipeline.core.config import Progress, Stage, at_least, opt
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage
from pipeline.core.warehouse import run_query

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TableOptions:
    run: str = opt(help="an extraction run")
    out: str | None = opt(None, help="write the table to a .csv, .parquet, .json or .ndjson file",
                          hash=False)


@dataclass(kw_only=True)
class FrequenciesConfig(TableOptions):
    summary: bool = opt(False, help="mean, variance, skew, kurtosis and sparsity per neuron "
                        "instead of activation counts")


@dataclass(kw_only=True)
class TopTokensConfig(TableOptions):
    run: str = opt(help="an extraction run with dense activations (--store-acts)")
    layer: int = opt(help="layer")
    neuron: int = opt(help="neuron index within the layer")
    k: int = opt(20, help="rows")
    context: int = opt(8, help="tokens of left context")

    def __post_init__(self) -> None:
        at_least(self, 1, "k")
        at_least(self, 0, "context")


@dataclass(kw_only=True)
class SignsConfig(TableOptions):
    run: str = opt(help="an extraction run of a gated MLP (Llama, Qwen, Mistral, Gemma, ...)")
    layer: int = opt(help="layer")
    neuron: int = opt(help="neuron index within the layer")
    context: int = opt(8, help="tokens of left context")

    def __post_init__(self) -> None:
        at_least(self, 0, "context")


@dataclass(kw_only=True)
class HistogramConfig(TableOptions, Progress):
    run: str = opt(help="an extraction run with dense activations (--store-acts)")
    layer: int = opt(help="layer")
    bins: int = opt(50, help="equal bins over the layer's [min, max]")
    block_rows: int = opt(8192, help="token rows read per block", cli=False, hash=False)

    def __post_init__(self) -> None:
        at_least(self, 1, "bins", "block_rows")


@dataclass
class TableResult:
    frame: Any          # polars DataFrame
    out: str | None     # the file it was written to


def _result(frame, out: str | None) -> TableResult:
    if out:
        tables.write_frame(frame, out)
    return TableResult(frame, out)


def _check_dense(manifest: dict, run: str, layer: int, neuron: int | None = None) -> None:
    model = manifest["model"]
    if layer not in model.get("dense_layers", []):
        raise UserError(f"run {run!r} has no dense activations of layer {layer} (stored: "
                        f"{model.get('dense_layers', [])}): re-extract with --store-acts")
    if neuron is not None:
        _check_neuron(manifest, run, layer, neuron)


def _check_neuron(manifest: dict, run: str, layer: int, neuron: int) -> None:
    model = manifest["model"]
    if layer not in model["layers"]:
        raise UserError(f"run {run!r} did not record layer {layer} (recorded: "
                        f"{model['layers']}): pick one of those")
    if not 0 <= neuron < model["widths"][layer]:
        raise UserError(f"neuron {neuron} is out of range for layer {layer} "
                        f"(0-{model['widths'][layer] - 1})")


def run_frequencies(config: FrequenciesConfig, storage: Storage) -> TableResult:
    """Activation count and frequency per neuron (columns neuron_id, layer, dimension,
    activation_count, activation_frequency, as the reference neuron_frequency.csv), or with
    `summary` the moments and sparsity per neuron."""
    storage.finished_run(config.run)
    name = "neuron_summary" if config.summary else "neuron_frequency"
    return _result(run_query(storage, name, run_id=config.run), config.out)


def run_top_tokens(config: TopTokensConfig, storage: Storage) -> TableResult:
    """The k rows where a neuron fires most, with their token and left context."""
    _check_dense(storage.finished_run(config.run), config.run, config.layer, config.neuron)
    frame = run_query(storage, "top_tokens", run_id=config.run, layer=config.layer,
                   neuron=config.neuron, k=config.k, context=config.context)
    return _result(frame, config.out)


def run_signs(config: SignsConfig, storage: Storage) -> TableResult:
    manifest = storage.finished_run(config.run)
    if not manifest["model"].get("gated"):
        raise UserError(f"run {config.run!r} is of a model without gated MLPs: sign "
                        "combinations of g and u exist only for gated ones (Llama, Qwen, ...)")
    _check_neuron(manifest, config.run, config.layer, config.neuron)
    frame = run_query(storage, "sign_examples", run_id=config.run, layer=config.layer,
                      neuron=config.neuron, context=config.context)
    return _result(frame, config.out)


def run_histogram(config: HistogramConfig, storage: Storage) -> TableResult:
    """Counts of a layer's activations in equal bins over [min, max], streamed over row blocks."""
    import polars as pl
    from tqdm import tqdm

    _check_dense(storage.finished_run(config.run), config.run, config.layer)
    stats = pl.from_arrow(tables.read_partition(storage, "neuron_stats", config.run)).filter(
        pl.col("layer") == config.layer)
    lo, hi = stats["min"].min(), stats["max"].max()
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, config.bins + 1)
    counts = np.zeros(config.bins, np.int64)
    acts = arrays.layer_array(arrays.open_group(storage.arrays(config.run), mode="r"), "acts",
                              config.layer)
    starts = range(0, acts.shape[0], config.block_rows)
    for s in tqdm(starts, desc=f"histogram L{config.layer}", unit="block",
                  disable=not config.progress):
        block = np.asarray(acts[s:s + config.block_rows], dtype=np.float64).ravel()
        # float16 storage may round a value just past the float32 min/max: it counts in an end bin
        counts += np.histogram(np.clip(block, edges[0], edges[-1]), bins=edges)[0]
    frame = pl.DataFrame({"layer": [config.layer] * config.bins, "bin_start": edges[:-1],
                          "bin_end": edges[1:], "count": counts})
    return _result(frame, config.out)


def show(result: TableResult) -> str:
    import polars as pl

    if result.out:
        return f"wrote {result.frame.height} rows to {result.out}"
    with pl.Config(tbl_rows=40, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
        return str(result.frame)


STAGES = [
    Stage("frequencies", "Activation count and frequency per neuron (moments with --summary).",
          "  nwh frequencies --run demo-corpus --out demo_neuron_frequency.csv\n"
          "  nwh frequencies --run demo-corpus --summary\n",
          FrequenciesConfig, run_frequencies, show),
    Stage("top-tokens", "Tokens (with context) where a neuron fires most; needs --store-acts.",
          "  nwh top-tokens --run demo-corpus --layer 2 --neuron 3 --k 20 --context 8\n",
          TopTokensConfig, run_top_tokens, show),
    Stage("signs", "A gated neuron's four sign combinations of (g, u): counts, mean |a| and "
          "top examples with context.",
          "  nwh signs --run smollm2-135m_stdlib --layer 11 --neuron 42\n",
          SignsConfig, run_signs, show),
    Stage("histogram", "Histogram of a layer's activations; needs --store-acts.",
          "  nwh histogram --run demo-corpus --layer 2 --bins 50\n",
          HistogramConfig, run_histogram, show),
]
