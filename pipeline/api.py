"""The warehouse from Python (notebooks, scripts): SQL, runs, one neuron, masks and activations.

    from pipeline.api import Warehouse

    wh = Warehouse("storage")                       # a warehouse root (created on first write)
    wh.run("extract", model="zoo-s0", corpus="stdlib", num_samples=16, store_acts=True,
           run="demo", quiet=True)                  # any stage, by its CLI name and options
    wh.runs()                                       # the runs table (polars)
    wh.sql("select layer, avg(active_count / count) from neuron_stats "
           "where run_id = $run group by layer", run="demo")   # bound parameters ($name)
    n = wh.neuron("demo", layer=1, neuron=7)        # stats, values and top tokens of one neuron
    n.stats["mean"], n.values[:10], n.top_tokens
    wh.masks("demo", 1, slice(0, 100))              # bool [100, width], unpacked
    wh.acts("demo", 1, [3, 5, 8])                   # float32 [3, width] (needs store_acts)

Every stage is also a plain function over its config dataclass, `run(config, storage)`; the CLI
and `Warehouse.run` are thin layers over it:

    from pipeline.core.storage import Storage
    from pipeline.stages import dormancy, extract

    storage = Storage("storage")
    extract.run(extract.ExtractConfig(model="zoo-s0", num_samples=16, run="demo"), storage)
    dormancy.run(dormancy.DormancyConfig(run="demo", threshold=0.1), storage).rows

`stages()` lists each stage's name, config class and function (e.g. `top-tokens` is
pipeline.stages.frequencies.run_top_tokens over TopTokensConfig). Tables come back as polars
DataFrames, arrays as NumPy; bad input (an unknown run, layer or option) is a one-line UserError.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.storage import DEFAULT_ROOT, Storage

# rows of a run: all (None), a slice or range, one row, or row numbers
Rows = Union[slice, range, int, Sequence[int], np.ndarray, None]


def stages() -> dict:
    """{name: Stage} of every stage and flow, in processing order (the `nwh` subcommands)."""
    from pipeline.cli import STAGE_MODULES  # the one registry of stage modules

    pyplot = sys.modules.get("matplotlib.pyplot")
    backend = pyplot.get_backend() if pyplot else None
    found = {s.name: s for m in STAGE_MODULES for s in importlib.import_module(m).STAGES}
    # the report modules pick Agg on import (a headless CLI); a notebook keeps its own backend
    if backend and pyplot.get_backend() != backend:
        ipython = sys.modules.get("IPython")
        shell = ipython.get_ipython() if ipython else None
        if shell is not None and "inline" in backend:
            shell.run_line_magic("matplotlib", "inline")  # also registers the figure formatters
        else:
            pyplot.switch_backend(backend)
    return found


@dataclass
class Neuron:
    """One neuron of a run: its neuron_stats row (with mean, var, skew, kurt and frequency), its
    value at every token row and, when the run stored dense activations, its top tokens."""

    run: str
    layer: int
    neuron: int
    neuron_id: int
    stats: dict[str, Any]      # the neuron_stats columns + mean, var, skew, kurt, frequency
    kind: str                  # what `values` holds: "acts" (float32) or "active" (bool)
    values: np.ndarray         # [rows]: row r is row r of the run's tokens table
    top_tokens: Any            # polars DataFrame of sql/top_tokens.sql; None without dense acts

    def __repr__(self) -> str:
        tops = "no dense acts" if self.top_tokens is None else f"{self.top_tokens.height} top tokens"
        return (f"Neuron(run={self.run!r}, layer={self.layer}, neuron={self.neuron}, "
                f"neuron_id={self.neuron_id}, {self.kind} over {len(self.values)} rows, "
                f"mean={self.stats['mean']:.4g}, frequency={self.stats['frequency']:.3g}, {tops})")


class Warehouse:
    """A warehouse root opened from Python; every method reads, only `run` writes."""

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT):
        self.storage = Storage(root)
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Warehouse({str(self.root)!r}, runs={self.storage.list_runs()})"

    # -- tables

    def sql(self, query: str, **params: Any):
        """A query over the warehouse views as a polars DataFrame (None for a statement without
        a result); `$name` placeholders are bound from keyword arguments, never formatted in."""
        from pipeline.core import warehouse

        return warehouse.query_frame(self.storage, query, **params)  # read-only, as `nwh sql`

    def runs(self):
        """The runs table: one row per finished extraction run."""
        return self.sql("select * from runs order by run_id")

    def tokens(self, run: str):
        """The run's tokens table in row order (row r is row r of every array of the run)."""
        import polars as pl

        from pipeline.core import tables

        self.storage.finished_run(run)
        return pl.from_arrow(tables.read_partition(self.storage, "tokens", run)).sort("row")

    # -- arrays

    def masks(self, run: str, layer: int, rows: Rows = None) -> np.ndarray:
        """Active masks of a layer, unpacked: bool [rows, width] (the run's active rule)."""
        from pipeline.core import arrays

        manifest = self._layer(run, layer)
        array = self._array(run, "active", layer)
        width = manifest["model"]["widths"][layer]
        return arrays.unpack_mask(_read_rows(array, rows, run), width)

    def acts(self, run: str, layer: int, rows: Rows = None) -> np.ndarray:
        """Dense activations of a layer: float32 [rows, width] (stored as float16; needs a run
        extracted with store_acts)."""
        self._dense(run, layer)
        return _read_rows(self._array(run, "acts", layer), rows, run).astype(np.float32)

    def neuron(self, run: str, layer: int, neuron: int, *, k: int = 20, context: int = 8) -> Neuron:
        """One neuron: its stats, its values (activations if stored, else its mask bits) and its
        k top tokens with `context` tokens of left context (sql/top_tokens.sql)."""
        import polars as pl

        from pipeline.core import tables
        from pipeline.core.warehouse import central_moments

        manifest = self._layer(run, layer)
        width = manifest["model"]["widths"][layer]
        if not 0 <= neuron < width:
            raise UserError(f"neuron {neuron} is out of range for layer {layer} of run {run!r} "
                            f"(0-{width - 1})")
        found = pl.from_arrow(tables.read_partition(self.storage, "neuron_stats", run)).filter(
            (pl.col("layer") == layer) & (pl.col("neuron") == neuron))
        if found.is_empty():
            raise UserError(f"run {run!r} has no neuron_stats row of layer {layer}, neuron "
                            f"{neuron}: re-extract it")
        stats = found.drop("run_id", strict=False).row(0, named=True)
        moments = central_moments(*([stats[c]] for c in ("count", "shift", "shifted_sum",
                                                         "shifted_sum_sq", "shifted_sum_cube",
                                                         "shifted_sum_quad")))
        stats.update({name: float(v[0]) for name, v in moments.items()})
        # share of the accumulated (included) rows where the neuron was active
        stats["frequency"] = stats["active_count"] / stats["count"] if stats["count"] else 0.0
        dense = layer in manifest["model"].get("dense_layers", [])
        if dense:
            from pipeline.stages.frequencies import TopTokensConfig, run_top_tokens

            values = self._column(run, "acts", layer, neuron).astype(np.float32)
            top = run_top_tokens(TopTokensConfig(run=run, layer=layer, neuron=neuron, k=k,
                                                 context=context), self.storage).frame
        else:
            byte = self._column(run, "active", layer, neuron // 8)
            values = ((byte >> (neuron % 8)) & 1).astype(bool)  # bit n%8 of byte n//8
            top = None
        return Neuron(run, layer, neuron, int(stats["neuron_id"]), stats,
                      "acts" if dense else "active", values, top)

    # -- stages

    def run(self, stage: str, **options: Any):
        """Run a stage (its `nwh` name, e.g. "extract", "top-tokens") on this warehouse with the
        options of its config (the CLI's, with underscores); returns the stage's result."""
        known = stages()
        entry = known.get(stage) or known.get(stage.replace("_", "-"))
        if entry is None:
            raise UserError(f"stage {stage!r} is unknown: use one of {', '.join(known)}")
        names = [f.name for f in fields(entry.config) if f.init]
        unknown = [k for k in options if k not in names]
        if unknown:
            raise UserError(f"stage {entry.name!r} has no option(s) {unknown}: its options are "
                            f"{', '.join(names)}")
        missing = [f.name for f in fields(entry.config) if f.init and f.name not in options
                   and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise UserError(f"stage {entry.name!r} needs option(s) {missing}: pass them, e.g. "
                            f"wh.run({entry.name!r}, {missing[0]}=...)")
        return entry.run(entry.config(**options), self.storage)

    # -- checks and reads

    def _layer(self, run: str, layer: int) -> dict:
        manifest = self.storage.finished_run(run)
        recorded = manifest["model"]["layers"]
        if layer not in recorded:
            raise UserError(f"run {run!r} did not record layer {layer} (recorded: {recorded}): "
                            "pick one of those")
        return manifest

    def _dense(self, run: str, layer: int) -> dict:
        manifest = self._layer(run, layer)
        dense = manifest["model"].get("dense_layers", [])
        if layer not in dense:
            raise UserError(f"run {run!r} has no dense activations of layer {layer} (stored: "
                            f"{dense}): re-extract with store_acts=True (--store-acts), or read "
                            "its masks")
        return manifest

    def _array(self, run: str, kind: str, layer: int):
        from pipeline.core import arrays

        group = arrays.open_group(self.storage.arrays(run), mode="r")
        if f"{kind}/L{layer}" not in group:
            raise UserError(f"run {run!r} has no {kind} array of layer {layer}: re-extract it")
        return arrays.layer_array(group, kind, layer)

    def _column(self, run: str, kind: str, layer: int, column: int) -> np.ndarray:
        return np.asarray(self._array(run, kind, layer)[:, column])


def _read_rows(array, rows, run: str) -> np.ndarray:
    """Rows of a [T, w] Zarr array: all (None), a slice or range, one int, or a sequence of ints
    (negative ones count from the end); out-of-range rows are a UserError."""
    total = array.shape[0]
    if rows is None:
        return np.asarray(array[:])
    if isinstance(rows, range) and rows.step == 1:
        rows = slice(rows.start, rows.stop)
    if isinstance(rows, slice):
        if rows.step not in (None, 1):
            return _read_rows(array, range(*rows.indices(total)), run)
        start, stop, _ = rows.indices(total)
        return np.asarray(array[start:max(start, stop)])
    index = np.atleast_1d(np.asarray(rows))
    if index.size == 0 and index.dtype == np.float64:  # [] reads as float: no rows
        index = index.astype(np.int64)
    if index.dtype == bool or not np.issubdtype(index.dtype, np.integer):
        raise UserError(f"rows {rows!r}: pass a slice, a range or row numbers (ints)")
    index = np.where(index < 0, index + total, index)
    bad = index[(index < 0) | (index >= total)]
    if bad.size:
        raise UserError(f"rows {bad[:5].tolist()} are out of range for run {run!r} "
                        f"({total} rows: 0-{total - 1})")
    if index.size == 0:
        return np.asarray(array[0:0])
    # Zarr reads sorted unique rows; the caller's order and repeats are restored after
    unique, inverse = np.unique(index, return_inverse=True)
    return np.asarray(array.get_orthogonal_selection((unique, slice(None))))[inverse]
