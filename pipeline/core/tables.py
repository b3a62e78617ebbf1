"""Warehouse tables: schemas declared once in schemas/<table>.json, validated on every write.

A table lives at tables/<table>/run_id=<run_id>/part-*.parquet. Writes go to a temporary file
renamed into place, so a reader never sees half a file. On object storage the file is written
locally and uploaded in one PUT (storage.atomic_path); reads go through pyarrow's filesystem
over the root's fsspec filesystem.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.storage import Storage, as_path, atomic_path, is_remote, remove_tree

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"

_TYPES: dict[str, pa.DataType] = {
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "string": pa.string(),
    "list<int64>": pa.list_(pa.int64()),
    "list<int32>": pa.list_(pa.int32()),
    "list<float64>": pa.list_(pa.float64()),
}


class SchemaError(ValueError):
    """Data handed to a table does not match its declared schema (a bug, not user input)."""


@functools.lru_cache(maxsize=None)
def schema(table: str) -> pa.Schema:
    spec = json.loads((SCHEMA_DIR / f"{table}.json").read_text())
    fields = [
        pa.field(c["name"], _TYPES[c["type"]], nullable=c.get("nullable", False),
                 metadata={"doc": c.get("doc", "")})
        for c in spec["columns"]
    ]
    return pa.schema(fields, metadata={"doc": spec.get("doc", "")})


def table_names() -> list[str]:
    return sorted(p.stem for p in SCHEMA_DIR.glob("*.json"))


def to_arrow(table: str, data: pa.Table | Mapping[str, Any]) -> pa.Table:
    """Cast `data` (an Arrow table or a dict of columns) to the table's schema, or raise SchemaError."""
    target = schema(table)
    if not isinstance(data, pa.Table):
        types = {f.name: f.type for f in target}
        data = pa.table({name: arrow_column(values, types[name]) if name in types else values
                         for name, values in data.items()})
    missing = [n for n in target.names if n not in data.column_names]
    extra = [n for n in data.column_names if n not in target.names]
    if missing or extra:
        raise SchemaError(f"table {table}: missing columns {missing}, unexpected columns {extra}")
    data = data.select(target.names)
    try:
        out = data.cast(target, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise SchemaError(f"table {table}: {e}") from e
    for field in target:
        if not field.nullable and out.column(field.name).null_count:
            raise SchemaError(f"table {table}: column {field.name} has nulls")
    return out


def arrow_column(values: Any, type: pa.DataType) -> Any:
    """A column of a bool, number or string `type` (a NumPy array, or a list with None for
    null) as an Arrow array built on its buffers; any other column is left to pa.table, as is
    one whose values the type would change (the schema cast then names the problem). Why:
    pa.array checks every input for a pandas type and so imports pandas (~0.3 s), which a
    stage that only writes tables never needs otherwise."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            return values
        if values.dtype.kind in "biuf" and values.dtype.isnative:
            column = _number_column(values, type, None)
            return values if column is None else column
        if values.dtype.kind not in "OU":
            return values
        values = values.tolist()
    if not isinstance(values, list):
        return values
    valid = np.fromiter((v is not None for v in values), bool, len(values))
    present = [v for v in values if v is not None]
    if pa.types.is_string(type):
        return _string_column(values, valid) if all(isinstance(v, str) for v in present) \
            else values
    kinds = _PYTHON_OF.get(type)
    if kinds is None or not all(isinstance(v, kinds) for v in present):
        return values
    widest = np.bool_ if pa.types.is_boolean(type) else np.int64 if pa.types.is_integer(
        type) else np.float64
    try:
        data = np.zeros(len(values), widest)
        data[valid] = present
    except OverflowError:
        return values
    column = _number_column(data, type, valid)
    return values if column is None else column


def _validity(valid: np.ndarray | None) -> tuple[pa.Buffer | None, int]:
    nulls = 0 if valid is None else int(valid.size - valid.sum())
    return (pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None), nulls


def _number_column(values: np.ndarray, type: pa.DataType,
                   valid: np.ndarray | None) -> pa.Array | None:
    dtype = _NUMPY_OF.get(type)
    if dtype is None:
        return None
    data = values.astype(dtype, copy=False)
    if data is not values and not np.array_equal(data, values, equal_nan=data.dtype.kind == "f"):
        return None  # out of the type's range, or not whole numbers
    validity, nulls = _validity(valid)
    buffer = np.packbits(data, bitorder="little") if dtype is np.bool_ else data
    return pa.Array.from_buffers(type, len(data), [validity, pa.py_buffer(buffer)], nulls)


def _string_column(texts: list, valid: np.ndarray) -> pa.Array | list:
    encoded = [b"" if v is None else v.encode("utf-8") for v in texts]
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, len(texts)), out=offsets[1:])
    if offsets[-1] >= 2**31:  # past 32-bit offsets: pa.table's conversion decides
        return texts
    validity, nulls = _validity(valid)
    return pa.Array.from_buffers(pa.string(), len(texts), [
        validity, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))], nulls)


_NUMPY_OF: dict[pa.DataType, Any] = {
    pa.bool_(): np.bool_, pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32,
    pa.int64(): np.int64, pa.float32(): np.float32, pa.float64(): np.float64,
}
# the Python values a list column of each type may hold
_PYTHON_OF: dict[pa.DataType, tuple] = {
    pa.bool_(): (bool, np.bool_), **{t: (int, np.integer) for t in (
        pa.int8(), pa.int16(), pa.int32(), pa.int64())},
    pa.float32(): (float, int, np.floating, np.integer),
    pa.float64(): (float, int, np.floating, np.integer),
}


def part_path(storage: Storage, table: str, run_id: str, part: str) -> Path:
    """tables/<table>/run_id=<run>/<part>.parquet."""
    return storage.table_partition(table, run_id) / f"{part}.parquet"


def _arrow_filesystem(fs):
    """pyarrow's view of an fsspec filesystem (one per filesystem object)."""
    key = id(fs)
    if key not in _ARROW_FS or _ARROW_FS[key][0] is not fs:
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        _ARROW_FS[key] = (fs, PyFileSystem(FSSpecHandler(fs)))
    return _ARROW_FS[key][1]


_ARROW_FS: dict[int, tuple] = {}


def read_parquet(path: Path, table_schema: pa.Schema | None = None,
                 columns: list[str] | None = None) -> pa.Table:
    """One Parquet file, local or on object storage (the reader of every storage path)."""
    path = as_path(path)
    if is_remote(path):
        return pq.read_table(path.path, schema=table_schema, columns=columns,
                             filesystem=_arrow_filesystem(path.fs))
    return pq.read_table(path, schema=table_schema, columns=columns)


def scan_parquet(path: Path):
    """A polars LazyFrame of one Parquet file: scanned in place when local; read through
    pyarrow when on object storage (polars' own cloud reader takes other options)."""
    import polars as pl

    path = as_path(path)
    if is_remote(path):
        return pl.from_arrow(read_parquet(path)).lazy()
    return pl.scan_parquet(path)


def read_part(storage: Storage, table: str, run_id: str, part: str) -> pa.Table | None:
    """One part of a run's partition with the declared schema, or None when it is absent."""
    path = part_path(storage, table, run_id, part)
    return read_parquet(path, schema(table)) if path.exists() else None


def write_part(storage: Storage, table: str, run_id: str, data: Any, part: str = "part-0") -> Path:
    """Write one validated Parquet file of a run's partition, atomically."""
    arrow = to_arrow(table, data)
    path = part_path(storage, table, run_id, part)
    new_partition = not _has_parts(path.parent)
    with atomic_path(path) as tmp:
        pq.write_table(arrow, tmp, compression="zstd")
    if new_partition:
        _partitions_changed(storage, table)
    return path


def drop_partition(storage: Storage, table: str, run_id: str) -> None:
    folder = storage.table_partition(table, run_id)
    had_parts = _has_parts(folder)
    remove_tree(folder)
    if had_parts:
        _partitions_changed(storage, table)


def drop_partition_parts(storage: Storage, table: str, run_id: str, prefix: str) -> None:
    """Remove the parts of a run's partition whose name starts with `prefix` (before a rewrite)."""
    folder = storage.table_partition(table, run_id)
    removed = 0
    for part in folder.glob(f"{prefix}*.parquet"):
        part.unlink()
        removed += 1
    if removed and not _has_parts(folder):
        _partitions_changed(storage, table)


def _has_parts(folder: Path) -> bool:
    return any(folder.glob("*.parquet"))


def _partitions_changed(storage: Storage, table: str) -> None:
    # the catalog file (warehouse.duckdb) follows the set of partitions; imported here because
    # the warehouse module builds on this one
    from pipeline.core import warehouse

    warehouse.partitions_changed(storage, table)


def read_partition(storage: Storage, table: str, run_id: str) -> pa.Table:
    """All parts of a run's partition, in part-name order, with the declared schema."""
    parts = sorted(storage.table_partition(table, run_id).glob("*.parquet"))
    if not parts:
        return schema(table).empty_table()
    return pa.concat_tables([read_parquet(p, schema(table)) for p in parts])


FRAME_FORMATS = (".csv", ".parquet", ".json", ".ndjson")


def write_frame(frame, out: str | Path) -> Path:
    """Write a polars DataFrame to a .csv, .parquet, .json or .ndjson file, atomically (the one
    writer of every `--out`)."""
    from pipeline.core.errors import UserError

    out = as_path(out)  # a file name, or an fsspec URL
    suffix = out.suffix.lower()
    writers = {".csv": frame.write_csv, ".parquet": frame.write_parquet,
               ".json": frame.write_json, ".ndjson": frame.write_ndjson}
    if suffix not in writers:
        raise UserError(f"--out {str(out)!r}: use a file name ending in "
                        f"{', '.join(FRAME_FORMATS)}")
    if out.is_dir():
        raise UserError(f"--out {str(out)!r} is a folder: give a file name")
    if suffix == ".csv":  # CSV has no lists: a list cell is written as its items, space-separated
        import polars as pl

        lists = [n for n, t in frame.schema.items() if isinstance(t, (pl.List, pl.Array))]
        if lists:
            frame = frame.with_columns(pl.col(n).cast(pl.List(pl.Utf8)).list.join(" ")
                                       for n in lists)
            writers[suffix] = frame.write_csv
    with atomic_path(out) as tmp:
        writers[suffix](tmp)
    return out
