"""Stage `sql`: ad-hoc, read-only SQL over the warehouse (DuckDB views per table, macros over arrays).

    nwh sql "select layer, count(*) from neuron_stats group by layer"
    nwh sql "select * from neuron_values('zoo-s0_stdlib', 'acts', 2, 3) order by value desc limit 20"
    nwh sql "select * from coactivation('zoo-s0_stdlib', 2, 3) order by count desc limit 20"
    nwh sql --out stats.parquet "select * from neuron_stats"
    nwh sql --format csv "select * from runs" | sort

A query only reads (pipeline/core/warehouse.py refuses COPY, ATTACH, INSTALL, CREATE...); the one
way to write a result is --out, written here through a temporary name and a rename.
"""

from __future__ import annotations

import io
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core import tables
from pipeline.core.config import Stage, opt
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, as_path, atomic_path, is_remote

FORMATS = ("table", "csv", "tsv", "json", "jsonl", "markdown", "parquet")
SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".json": "json", ".jsonl": "jsonl",
            ".ndjson": "jsonl", ".md": "markdown", ".markdown": "markdown",
            ".parquet": "parquet", ".pq": "parquet", ".txt": None}
# table stores of the warehouse that a result must not land in (it would join a table's rows)
_PROTECTED = ("tables", "runs", "models")


@dataclass(kw_only=True)
class QueryConfig:
    query: str = opt(help="a DuckDB SQL query (read-only: SELECT, WITH, DESCRIBE, SHOW, ...)",
                     positional=True)
    out: str | None = opt(None, help="write the result to FILE (format from its suffix: .csv "
                          ".tsv .json .jsonl .ndjson .md .parquet) or - for standard output")
    format: str | None = opt(None, help="table, csv, tsv, json, jsonl, markdown or parquet "
                             "(default: table on the terminal, the suffix of --out, csv for "
                             "--out -)", choices=FORMATS)
    max_rows: int = opt(40, help="rows shown in table format (-1: all)")


@dataclass
class QueryResult:
    frame: Any          # polars DataFrame, or None for a statement without result
    out: str | None     # the file written, "-" for standard output, None for a table shown
    format: str
    max_rows: int


def resolve_format(config: QueryConfig) -> str:
    if config.format:
        return config.format
    if config.out is None:
        return "table"
    if config.out == "-":
        return "csv"
    suffix = Path(config.out).suffix.lower()
    fmt = SUFFIXES.get(suffix)
    if fmt is None:
        raise UserError(f"--out {config.out!r}: use a file name ending in "
                        f"{', '.join(s for s, f in SUFFIXES.items() if f)}, or give --format")
    return fmt


def _check_out(out: str, storage: Storage) -> Path:
    path = as_path(out)  # a file name, or an fsspec URL
    if path.is_dir():
        raise UserError(f"--out {out!r} is a folder: give a file name")
    if is_remote(path) != (not storage.is_local):  # one on object storage, one local: apart
        return path
    if is_remote(path):  # both remote: compare the URLs' text
        target, root = str(path).rstrip("/"), storage.url
        inside = [n for n in _PROTECTED if target.startswith(f"{root}/{n}/")]
        if inside:
            raise UserError(f"--out {out!r} is inside the warehouse's {inside[0]}/ folder, whose "
                            "files belong to the stages: write the result elsewhere")
        if target.rsplit("/", 1)[0] == root and \
                target.rsplit("/", 1)[-1].lstrip(".").startswith("warehouse.duckdb"):
            raise UserError(f"--out {out!r} would replace the catalog: write the result elsewhere")
        return path
    target = path.resolve()
    root = storage.root.resolve()
    for name in _PROTECTED:
        if target.is_relative_to(root / name):
            raise UserError(f"--out {out!r} is inside the warehouse's {name}/ folder, whose files "
                            "belong to the stages: write the result elsewhere")
    if target.parent == root and target.name.lstrip(".").startswith("warehouse.duckdb"):
        raise UserError(f"--out {out!r} would replace the catalog: write the result elsewhere")
    return path


def run(config: QueryConfig, storage: Storage) -> QueryResult:
    from pipeline.core import warehouse

    warehouse.check_warehouse(storage)
    fmt = resolve_format(config)
    if config.out not in (None, "-"):
        _check_out(config.out, storage)
    elif fmt == "parquet" and config.out is None and sys.stdout.isatty():
        raise UserError("--format parquet writes binary data: give --out FILE, or --out - "
                        "into a pipe")
    try:  # a warehouse from before the catalog, or new views: brought up to date, best effort
        warehouse.refresh_catalog(storage)
    except Exception as e:  # a read-only root still answers queries
        warehouse.log.debug("catalog not refreshed: %s", e)
    frame = warehouse.query_frame(storage, config.query)
    out = config.out
    if frame is not None and fmt != "table" and out in (None, "-"):
        out = "-"
        data = render(frame, fmt)
        if isinstance(data, bytes):
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        else:
            sys.stdout.write(data)
            sys.stdout.flush()
    elif frame is not None and out not in (None, "-"):
        write(frame, out, fmt)
    elif out == "-" and fmt == "table":
        out = None  # shown by show()
    return QueryResult(frame, out, fmt, config.max_rows)


# -- formats


def _flat(frame):
    """Columns text formats can hold: a list cell as its items, space-separated (as CSV has
    always been written here); a struct as JSON."""
    import polars as pl

    out = []
    for name, dtype in frame.schema.items():
        if isinstance(dtype, (pl.List, pl.Array)):
            out.append(pl.col(name).cast(pl.List(pl.Utf8)).list.join(" "))
        elif isinstance(dtype, pl.Struct):
            out.append(pl.col(name).struct.json_encode())
        elif dtype == pl.Object:
            out.append(pl.col(name).map_elements(str, return_dtype=pl.Utf8))
    return frame.with_columns(out) if out else frame


def _markdown(frame) -> str:
    def cell(v: Any) -> str:
        text = "" if v is None else str(v)
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

    frame = _flat(frame)
    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
             "|" + "|".join(" --- " for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join(lines) + "\n"


def render(frame, fmt: str) -> str | bytes:
    """The whole result in one format (bytes for parquet)."""
    if fmt == "csv":
        return _flat(frame).write_csv()
    if fmt == "tsv":
        return _flat(frame).write_csv(separator="\t")
    if fmt == "json":  # an array of row objects
        return frame.write_json() + "\n"
    if fmt == "jsonl":
        return frame.write_ndjson()
    if fmt == "markdown":
        return _markdown(frame)
    if fmt == "parquet":
        buffer = io.BytesIO()
        frame.write_parquet(buffer)
        return buffer.getvalue()
    if fmt == "table":
        return table_text(frame, -1) + "\n"
    raise UserError(f"--format {fmt!r} is unknown: use one of {', '.join(FORMATS)}")


def write(frame, out: str | Path, fmt: str) -> Path:
    """Write the result to a file through a temporary name and a rename (on object storage: a
    local file uploaded in one PUT)."""
    out = as_path(out)
    data = render(frame, fmt)
    with atomic_path(out) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
    return out


def table_text(frame, max_rows: int, width: int | None = None) -> str:
    """A table that fits the terminal: columns as wide as their content (up to 32 characters),
    long strings cut, and the middle columns elided (…) when they do not all fit."""
    import polars as pl

    width = width or shutil.get_terminal_size((160, 24)).columns
    shown = frame.head(max_rows) if max_rows >= 0 else frame
    needs = []
    for name in frame.columns:
        sample = shown[name].head(50).cast(pl.Utf8, strict=False) if shown.height else None
        longest = 0 if sample is None else max((len(v) for v in sample.to_list() if v), default=0)
        needs.append(min(max(len(name), len(str(frame.schema[name])), longest, 4), 32) + 3)
    cols, used = len(needs), 1
    if sum(needs) + 1 > width:  # keep as many as fit, from both ends (polars' own elision)
        cols, used = 0, 4  # the … column
        order = [x for pair in zip(range(len(needs)), reversed(range(len(needs)))) for x in pair]
        for i in order[:len(needs)]:
            if used + needs[i] > width:
                break
            used += needs[i]
            cols += 1
        cols = max(cols, 2)
    with pl.Config(tbl_rows=max_rows, tbl_cols=-1 if cols == len(needs) else cols,
                   fmt_str_lengths=32, tbl_width_chars=width):
        return str(frame)


def show(result: QueryResult) -> str:
    if result.frame is None:
        return ""
    if result.out == "-":
        return ""  # already on standard output
    if result.out:
        return f"wrote {result.frame.height} rows ({result.format}) to {result.out}"
    return table_text(result.frame, result.max_rows)


STAGES = [Stage(
    "sql", "Ask read-only SQL of the warehouse (DuckDB): views per table, macros over arrays.",
    '  nwh sql "select run_id, model, revision, step, num_rows from runs order by step"\n'
    '  nwh sql "select layer, avg(active_count / count) from neuron_stats group by layer"\n'
    "  nwh sql \"select t.token, v.value from neuron_values('RUN', 'acts', 2, 3) v\n"
    "           join tokens t on t.run_id = 'RUN' and t.row = v.row\n"
    '           order by v.value desc limit 20"\n'
    "  nwh sql \"select * from coactivation('RUN', 2, 3) order by count desc limit 20\"\n"
    '  nwh sql --out stats.csv "select * from neuron_stats"\n'
    '  nwh sql --format jsonl "select * from runs" | jq .model\n'
    '  nwh sql --out - --format parquet "select * from edges" > edges.parquet\n\n'
    "Views: " + ", ".join(tables.table_names()) + ".\n"
    "Macros: neuron_values(run, kind, layer, neuron), "
    "layer_values(run, kind, layer, row_start, row_stop); kind is 'acts' or 'active';\n"
    "coactivation(run, layer_a, layer_b): counted neuron pairs in long form;\n"
    "revision_step(revision); moment_mean/var/skew/kurt(n, ...) of power sums (sql/moments.sql).\n"
    "Queries only read: COPY, ATTACH, INSTALL/LOAD, SET, CREATE/INSERT and reads outside the\n"
    "storage root are refused; write a result with --out. Any DuckDB client opens the same views\n"
    "in <storage>/warehouse.duckdb (run it from the storage root: paths are relative).",
    QueryConfig, run, show)]
