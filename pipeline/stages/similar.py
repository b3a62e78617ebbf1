"""Stage `similar`: the nearest neurons of one neuron, by co-activation or by correlation.

    nwh similar --run demo-corpus --neuron 2/17
    nwh similar --run demo-corpus --neuron 2/17 --metric npmi --top 10 --out near.csv
    nwh similar --neuron 0/7 --by correlation --universal universal_zoo-s0_zoo-s1_zoo-s2

--by coactivation: the neurons of every layer counted with layer L (the pairs of
`nwh coactivation`: a pair (L, b) gives row n of coact/L<L>_L<b>, a pair (a, L) its column n, a
pair L:L the neuron's own layer), that fired with L/n in at least one included row, ranked by
Jaccard or NPMI from the counts and the active counts of neuron_stats, T = the run's included
rows: the formulas of the co-activation graph's edge weights (sql/edge_weights.sql). The neuron
itself is left out.

--by correlation: from a `nwh universal` result, L/n is a neuron of its reference model (the
first of --models); in every other model, the --top neurons of any layer with the largest
Pearson r over the result's token rows, read from its blocks corr/m<i>/L<a>_L<b>, beside the
baseline's best r for L/n (correlation_summary.baseline_max).

Both are table macros of sql/similar_neurons.sql on a DuckDB connection of
pipeline.core.warehouse.connect (co-activation reads the counts through its coact_block), once
`register` has put the function universal_corr and the macros on it:

    select * from similar_neurons('demo-corpus', 2, 17, 'jaccard', 20)
    select * from correlated_neurons('universal_zoo-s0_zoo-s1_zoo-s2', 0, 7, 10)
    select universal_corr('universal_...', 0, 7)        -- [{model_b, layer, neuron, corr}, ...]

Memory: one row (or column) of one layer pair's counts, one row of a correlation block, at a time.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.core import arrays, coact, tables, warehouse
from pipeline.core.config import Stage, at_least, opt
from pipeline.core.errors import UserError
from pipeline.core.layers import check_neuron
from pipeline.core.storage import Storage, read_json, validate_run_id

log = logging.getLogger(__name__)

BY = ("coactivation", "correlation")
METRICS = ("jaccard", "npmi")
_NEURON = re.compile(r"^\s*L?(\d+)\s*/\s*N?(\d+)\s*$", re.I)


def parse_neuron(spec: str, flag: str = "--neuron") -> tuple[int, int]:
    """(layer, index) of 'L/n' ('2/17'; 'L2/N17' too)."""
    m = _NEURON.match(str(spec))
    if not m:
        raise UserError(f"{flag} {spec!r} is malformed: write layer/index, e.g. 2/17")
    return int(m.group(1)), int(m.group(2))


@dataclass(kw_only=True)
class SimilarConfig:
    neuron: str = opt(help="the neuron, as layer/index: 2/17", metavar="L/N")
    run: str | None = opt(None, help="extraction run (--by coactivation; with --by correlation "
                          "optional: then checked to have the widths of the reference model)")
    by: str = opt("coactivation", help="coactivation (neurons that fire with it, from `nwh "
                  "coactivation` counts) or correlation (neurons of other models, from a `nwh "
                  "universal` result)")
    metric: str = opt("jaccard", help="--by coactivation: jaccard (count / (n_a + n_b - count)) "
                      "or npmi (normalised pointwise mutual information)")
    top: int = opt(20, help="neighbours returned (per other model with --by correlation)")
    universal: str | None = opt(None, help="--by correlation: name of a `nwh universal` result")
    out: str | None = opt(None, help="also write the table to a .csv, .parquet, .json or "
                          ".ndjson file")

    def __post_init__(self) -> None:
        self.layer, self.index = parse_neuron(self.neuron)
        if self.by not in BY:
            raise UserError(f"--by {self.by!r} is unknown: use {' or '.join(BY)}")
        if self.metric not in METRICS:
            raise UserError(f"--metric {self.metric!r} is unknown: use {' or '.join(METRICS)}")
        at_least(self, 1, "top")
        if self.by == "coactivation" and not self.run:
            raise UserError("--by coactivation needs --run: the extraction run whose "
                            "co-activation counts to read")
        if self.by == "correlation" and not self.universal:
            raise UserError("--by correlation needs --universal NAME: a result of `nwh "
                            "universal --models ...` (its name is printed at the end)")
        for name in (self.run, self.universal):
            if name:
                validate_run_id(name)


@dataclass
class SimilarResult:
    config: SimilarConfig
    frame: pl.DataFrame      # similar_neurons or correlated_neurons rows
    info: dict               # what the header line says (active count, models)


# -- the functions the macros call


def register(con, storage: Storage):
    """Put universal_corr(result, layer, neuron) -> STRUCT(model_b, layer, neuron, corr)[] on a
    DuckDB connection of pipeline.core.warehouse.connect, and the macros of
    sql/similar_neurons.sql (co-activation reads the counts through that connection's
    coact_block). Returns the connection."""
    import duckdb

    from pipeline.core.warehouse import _statements, load_sql

    groups: dict[str, Any] = {}

    def group_of(name: str):
        if name not in groups:
            path = storage.arrays(name)
            if not path.exists():
                raise ValueError(f"{name!r} has no arrays in {storage.root}")
            groups[name] = arrays.open_group(path, mode="r")
        return groups[name]

    def universal_corr(result, layer, neuron):
        out = []
        for r, l, n in zip(result.to_pylist(), layer.to_pylist(), neuron.to_pylist()):
            out.append(correlation_row(storage, group_of(r), r, l, n))
        return pa.array(out, type=pa.list_(CORR_CELL))

    V, I = duckdb.sqltype("VARCHAR"), duckdb.sqltype("INTEGER")
    cell = duckdb.struct_type({"model_b": V, "layer": I, "neuron": I,
                               "corr": duckdb.sqltype("DOUBLE")})
    try:  # registered again: the newest storage wins
        con.remove_function("universal_corr")
    except duckdb.Error:
        pass
    con.create_function("universal_corr", universal_corr, [V, I, I], duckdb.list_type(cell),
                        type="arrow")
    for stmt in _statements(load_sql("similar_neurons")):
        con.execute(stmt)
    return con


warehouse.add_connection_extension(register)  # the macros in `nwh sql` and every connection

CORR_CELL = pa.struct([("model_b", pa.string()), ("layer", pa.int32()), ("neuron", pa.int32()),
                       ("corr", pa.float64())])


def _universal_models(storage: Storage, result: str) -> list[str]:
    marker = storage.marker(result, "universal")
    return read_json(marker.path)["config"]["models"] if marker.exists() else []


def correlation_row(storage: Storage, group, result: str, layer: int, neuron: int) -> list[dict]:
    """r of reference neuron layer/neuron with every neuron of every other model of a universal
    result, from its blocks corr/m<i>/L<layer>_L<b>."""
    if "corr" not in group:
        raise ValueError(f"result {result!r} has no correlation blocks")
    models = _universal_models(storage, result)
    cells = []
    for key, model in sorted(group["corr"].groups(), key=lambda kv: int(kv[0][1:])):
        index = int(key[1:])
        name = models[index] if index < len(models) else key
        for block_key, array in sorted(model.arrays(), key=lambda kv: arrays.parse_pair_key(kv[0])):
            a, b = arrays.parse_pair_key(block_key)
            if a != layer:
                continue
            if not 0 <= neuron < array.shape[0]:
                raise ValueError(f"neuron {neuron} is out of range for layer {layer} "
                                 f"(width {array.shape[0]})")
            values = np.asarray(array[neuron], np.float64)
            cells += [{"model_b": name, "layer": b, "neuron": j, "corr": float(v)}
                      for j, v in enumerate(values)]
    return cells


# -- the library functions (what the CLI and the site call)


def _connection(storage: Storage):
    from pipeline.core.warehouse import connect

    return register(connect(storage), storage)


def similar_neurons(storage: Storage, run: str, layer: int, neuron: int, *,
                    by: str = "coactivation", metric: str = "jaccard", k: int = 20,
                    universal: str | None = None, con=None) -> pl.DataFrame:
    """The k nearest neurons of `layer`/`neuron` as a polars DataFrame.

    by="coactivation" (run: an extraction run with `nwh coactivation` counts): rank, layer,
    neuron, neuron_id, count, active_a, active_b, tokens, jaccard, npmi, weight (the `metric`).
    by="correlation" (universal: a `nwh universal` result; run is ignored and may be None):
    model_b, rank, layer, neuron, corr, baseline_max, excess, k per other model.
    con: a connection that `register` has prepared (many calls share it); default a new one."""
    if by == "coactivation":
        check_coactivation(storage, run, layer, neuron)
        sql = "select * from similar_neurons($run, $layer, $neuron, $metric, $k)"
        params = {"run": run, "layer": layer, "neuron": neuron, "metric": metric, "k": k}
    elif by == "correlation":
        if universal is None:
            raise UserError("--by correlation needs --universal NAME: a `nwh universal` result")
        check_correlation(storage, universal, layer, neuron)
        sql = "select * from correlated_neurons($result, $layer, $neuron, $k)"
        params = {"result": universal, "layer": layer, "neuron": neuron, "k": k}
    else:
        raise UserError(f"--by {by!r} is unknown: use {' or '.join(BY)}")
    if con is not None:
        return con.sql(sql, params=params).pl()
    con = _connection(storage)
    try:
        return con.sql(sql, params=params).pl()
    finally:
        con.close()


def check_coactivation(storage: Storage, run: str, layer: int, neuron: int) -> dict:
    """The one-line errors of --by coactivation, before any query: an unknown run, a neuron out
    of range, no counts (or none with the neuron's layer). Returns the run's manifest."""
    manifest = storage.finished_run(run)
    check_neuron(coact.layer_widths(manifest), layer, neuron, f"run {run!r}")
    path = storage.arrays(run)
    pairs = coact.completed_pairs(arrays.open_group(path, mode="r") if path.exists() else None)
    if not pairs:
        raise UserError(f"run {run!r} has no co-activation counts: run `nwh coactivation "
                        f"--run {run}`")
    if not any(layer in p for p in pairs):
        others = [l for l in coact.layer_widths(manifest) if l != layer]
        hint = ",".join(f"{min(layer, o)}:{max(layer, o)}" for o in others[:2]) or f"{layer}:{layer}"
        raise UserError(f"run {run!r} has no co-activation counts with layer {layer} (counted: "
                        f"{', '.join(f'{a}:{b}' for a, b in pairs)}): run `nwh coactivation "
                        f"--run {run} --pairs {hint}`")
    return manifest


def universal_widths(storage: Storage, universal: str) -> dict[int, int]:
    """Layer -> width of a universal result's reference model (its correlation_summary)."""
    summary = tables.read_partition(storage, "correlation_summary", universal)
    if summary.num_rows == 0:
        raise UserError(f"{universal!r} is not a finished `nwh universal` result in "
                        f"{storage.root}: run `nwh universal --models ... --name {universal}`")
    frame = pl.from_arrow(summary.select(["layer", "neuron"])).unique()
    return dict(frame.group_by("layer").agg(pl.len()).sort("layer").iter_rows())


def check_correlation(storage: Storage, universal: str, layer: int, neuron: int) -> None:
    widths = universal_widths(storage, universal)
    check_neuron(widths, layer, neuron, f"the reference model of {universal!r}")
    path = storage.arrays(universal)
    group = arrays.open_group(path, mode="r") if path.exists() else None
    if group is None or "corr" not in group or not any(
            arrays.parse_pair_key(k)[0] == layer for _, m in group["corr"].groups()
            for k, _ in m.arrays()):
        raise UserError(f"result {universal!r} kept no correlation blocks of layer {layer} (it "
                        "ran with --no-save-blocks): run `nwh universal` again with --save-blocks "
                        "--overwrite")


def run(config: SimilarConfig, storage: Storage) -> SimilarResult:
    info: dict[str, Any] = {}
    if config.by == "correlation" and config.run:
        manifest = storage.finished_run(config.run)
        widths = coact.layer_widths(manifest)
        reference = universal_widths(storage, config.universal)
        if any(reference.get(l) != w for l, w in widths.items()):
            raise UserError(f"run {config.run!r} has layer widths {widths}, the reference model "
                            f"of {config.universal!r} {reference}: pick the run of that model "
                            "(or leave --run out)")
        models = _universal_models(storage, config.universal)
        if models and manifest["model"]["name"] != models[0]:
            log.warning("run %s is of model %s, result %s's reference is %s", config.run,
                        manifest["model"]["name"], config.universal, models[0])
    frame = similar_neurons(storage, config.run, config.layer, config.index, by=config.by,
                            metric=config.metric, k=config.top, universal=config.universal)
    if config.by == "coactivation":
        stats = tables.read_partition(storage, "neuron_stats", config.run)
        sel = pl.from_arrow(stats.select(["layer", "neuron", "active_count"])).filter(
            (pl.col("layer") == config.layer) & (pl.col("neuron") == config.index))
        info["active"] = int(sel["active_count"][0]) if sel.height else 0
    if config.out:
        tables.write_frame(frame, config.out)
    return SimilarResult(config, frame, info)


def show(result: SimilarResult) -> str:
    c, frame = result.config, result.frame
    if c.by == "coactivation":
        head = (f"neurons that fire with {c.layer}/{c.index} in run {c.run} (active in "
                f"{result.info.get('active', 0)} rows), by {c.metric}:")
        if frame.is_empty():
            head += (" none: the neuron is never active in the counted rows"
                     if not result.info.get("active") else " none fired with it")
    else:
        head = (f"neurons of the other models of {c.universal} most correlated with reference "
                f"neuron {c.layer}/{c.index} (Pearson r; baseline_max: the baseline's best):")
    lines = [head]
    if not frame.is_empty():
        with pl.Config(tbl_rows=max(frame.height, 10), tbl_cols=-1, tbl_width_chars=160):
            lines.append(str(frame))
    if c.out:
        lines.append(f"wrote {frame.height} rows to {c.out}")
    return "\n".join(lines)


STAGES = [Stage(
    "similar", "The nearest neurons of a neuron: by co-activation (Jaccard, NPMI) or by "
    "correlation across models.",
    "  nwh similar --run demo-corpus --neuron 2/17\n"
    "  nwh similar --run demo-corpus --neuron 2/17 --metric npmi --top 10 --out near.csv\n"
    "  nwh similar --neuron 0/7 --by correlation --universal universal_zoo-s0_zoo-s1_zoo-s2\n"
    "  nwh sql \"select * from similar_neurons('demo-corpus', 2, 17, 'jaccard', 20)\"\n",
    SimilarConfig, run, show)]
