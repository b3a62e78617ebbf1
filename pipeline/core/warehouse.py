"""The warehouse in SQL: a DuckDB connection with one view per table and macros over Zarr arrays.

    nwh sql "select layer, count(*) from neuron_stats group by layer"
    nwh sql "select * from neuron_values('zoo-s0_stdlib', 'acts', 2, 3) order by value desc limit 20"
    nwh sql --out stats.parquet "select * from neuron_stats"

Stage queries live in sql/<name>.sql and run with bound parameters ($name), never with string
formatting of values.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from pipeline.core import tables
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
_VIEW = re.compile(r"create\s+or\s+replace\s+view\s+(\w+)", re.I)


@functools.lru_cache(maxsize=None)
def load_sql(name: str) -> str:
    path = SQL_DIR / f"{name}.sql"
    if not path.exists():
        raise FileNotFoundError(f"no query sql/{name}.sql")
    return path.read_text()


def _statements(text: str) -> list[str]:
    lines = [ln for ln in text.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def connect(storage: Storage) -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB over the warehouse: views of sql/views.sql and the array macros."""
    con = duckdb.connect()
    root = str(storage.root.resolve())
    con.execute(f"set file_search_path = '{_quote(root)}'")
    for stmt in _statements(load_sql("views")):
        table = _VIEW.search(stmt).group(1)
        if any(storage.table_dir(table).glob("*/*.parquet")):
            con.execute(stmt)
        else:  # no data yet: an empty view with the declared columns
            empty = tables.schema(table).empty_table().append_column("run_id", pa.array([], pa.string()))
            con.register(f"_empty_{table}", empty)
            con.execute(f"create or replace view {table} as select * from _empty_{table}")
    _register_array_functions(con, storage)
    for stmt in _statements(load_sql("array_macros")):
        con.execute(stmt)
    add_moment_macros(con)
    return con


def add_moment_macros(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """The central-moment macros of sql/moments.sql on a connection."""
    for stmt in _statements(load_sql("moments")):
        con.execute(stmt)
    return con


def central_moments(n, shift, s1, s2, s3, s4) -> dict[str, np.ndarray]:
    """Mean, var, skew, kurt (E[z^4]) of each entry from power sums about `shift`, computed by
    the macros of sql/moments.sql (the one definition), for NumPy arrays of equal length."""
    arrays_ = [np.broadcast_to(np.asarray(v, dtype=np.float64), np.shape(s1))
               for v in (n, shift, s1, s2, s3, s4)]
    con = add_moment_macros(duckdb.connect())
    try:
        con.register("power_sums", pa.table({
            "idx": np.arange(len(arrays_[2]), dtype=np.int64),
            **{k: np.ascontiguousarray(v) for k, v in zip(("n", "shift", "s1", "s2", "s3", "s4"),
                                                       arrays_)}}))
        got = con.sql(load_sql("central_moments")).fetchnumpy()
    finally:
        con.close()
    return {k: np.asarray(got[k], dtype=np.float64) if not hasattr(got[k], "filled")
            else got[k].astype(np.float64).filled(np.nan) for k in ("mean", "var", "skew", "kurt")}


def _quote(path: str) -> str:
    # the storage root is a setting, not a value bound into a query; DuckDB's SET takes no parameters
    return path.replace("'", "''")


def query(con: duckdb.DuckDBPyConnection, name: str, **params: Any):
    """Run sql/<name>.sql with bound parameters; returns a polars DataFrame."""
    return con.sql(load_sql(name), params=params).pl()


def run_query(storage: Storage, name: str, **params: Any):
    """sql/<name>.sql over the warehouse (a connection of its own); a query that reads dense
    activations a run did not store is a one-line UserError."""
    con = connect(storage)
    try:
        return query(con, name, **params)
    except duckdb.Error as e:
        message = " ".join(str(e).split())
        if "has no acts array" in message or "no arrays" in message:
            raise UserError(message.split("Error: ")[-1] + ": re-extract with --store-acts") from None
        raise
    finally:
        con.close()


# -- Zarr access from SQL


def _register_array_functions(con: duckdb.DuckDBPyConnection, storage: Storage) -> None:
    from pipeline.core import arrays

    cache: dict[tuple[str, str, int], Any] = {}

    def array_of(run: str, kind: str, layer: int):
        key = (run, kind, layer)
        if key not in cache:
            if kind not in ("acts", "active"):
                raise ValueError(f"kind must be 'acts' or 'active', not {kind!r}")
            path = storage.arrays(run)
            if not path.exists():
                raise ValueError(f"run {run!r} has no arrays in {storage.root}")
            group = arrays.open_group(path, mode="r")
            if f"{kind}/L{layer}" not in group:
                hint = " (dense activations need --store-acts)" if kind == "acts" else ""
                raise ValueError(f"run {run!r} has no {kind} array for layer {layer}{hint}")
            width = (_run_widths(storage, run)[layer] if kind == "active"
                     else group[f"{kind}/L{layer}"].shape[1])
            cache[key] = (group[f"{kind}/L{layer}"], width)
        return cache[key]

    def values(kind: str, array, width: int, rows: slice, neuron: int | None) -> np.ndarray:
        if kind == "acts":
            block = array[rows] if neuron is None else array[rows, neuron]
            return np.asarray(block, dtype=np.float64).reshape(-1)
        if neuron is not None:
            byte = np.asarray(array[rows, neuron // 8])
            return ((byte >> (neuron % 8)) & 1).astype(np.float64)
        return arrays.unpack_mask(np.asarray(array[rows]), width).astype(np.float64).reshape(-1)

    def as_lists(chunks: list[np.ndarray]) -> pa.Array:
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
        flat = np.concatenate(chunks) if chunks else np.zeros(0)
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat))

    def zarr_column(run, kind, layer, neuron):
        out = []
        for r, k, l, n in zip(run.to_pylist(), kind.to_pylist(), layer.to_pylist(), neuron.to_pylist()):
            array, width = array_of(r, k, l)
            if not 0 <= n < width:
                raise ValueError(f"neuron {n} is out of range for layer {l} (width {width})")
            out.append(values(k, array, width, slice(None), n))
        return as_lists(out)

    def zarr_block(run, kind, layer, start, stop):
        out = []
        for r, k, l, a, b in zip(run.to_pylist(), kind.to_pylist(), layer.to_pylist(),
                                 start.to_pylist(), stop.to_pylist()):
            array, width = array_of(r, k, l)
            out.append(values(k, array, width, slice(a, b), None))
        return as_lists(out)

    def zarr_width(run, kind, layer):
        return pa.array([array_of(r, k, l)[1] for r, k, l in
                         zip(run.to_pylist(), kind.to_pylist(), layer.to_pylist())], pa.int64())

    V, I, B = duckdb.sqltype("VARCHAR"), duckdb.sqltype("INTEGER"), duckdb.sqltype("BIGINT")
    dbl_list = duckdb.list_type(duckdb.sqltype("DOUBLE"))
    con.create_function("zarr_column", zarr_column, [V, V, I, I], dbl_list, type="arrow")
    con.create_function("zarr_block", zarr_block, [V, V, I, B, B], dbl_list, type="arrow")
    con.create_function("zarr_width", zarr_width, [V, V, I], B, type="arrow")


def _run_widths(storage: Storage, run: str) -> list[int]:
    from pipeline.core.storage import read_json

    return read_json(storage.run_manifest(run))["model"]["widths"]


def query_frame(storage: Storage, sql: str):
    """An ad-hoc query over the warehouse as a polars DataFrame (None for a statement without
    result); a failing query is a one-line UserError."""
    con = connect(storage)
    try:
        rel = con.sql(sql)
        return None if rel is None else rel.pl()
    except duckdb.Error as e:
        message = " ".join(str(e).split())
        raise UserError(f"query failed: {message}") from None
    finally:
        con.close()
