"""Stage `sql`: ad-hoc SQL over the warehouse (DuckDB views per table, macros over arrays).

    nwh sql "select layer, count(*) from neuron_stats group by layer"
    nwh sql "select * from neuron_values('zoo-s0_stdlib', 'acts', 2, 3) order by value desc limit 20"
    nwh sql --out stats.parquet "select * from neuron_stats"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.core import tables
from pipeline.core.config import Stage, opt
from pipeline.core.storage import Storage
from pipeline.core.warehouse import query_frame


@dataclass(kw_only=True)
class QueryConfig:
    query: str = opt(help="a DuckDB SQL query", positional=True)
    out: str | None = opt(None, help="write the result to a .csv, .parquet, .json or .ndjson file")
    max_rows: int = opt(40, help="rows to print")


@dataclass
class QueryResult:
    frame: Any          # polars DataFrame, or None for a statement without result
    out: str | None
    max_rows: int


def run(config: QueryConfig, storage: Storage) -> QueryResult:
    frame = query_frame(storage, config.query)
    if frame is not None and config.out:
        tables.write_frame(frame, config.out)
    return QueryResult(frame, config.out, config.max_rows)


def show(result: QueryResult) -> str:
    import polars as pl

    if result.frame is None:
        return ""
    if result.out:
        return f"wrote {result.frame.height} rows to {result.out}"
    with pl.Config(tbl_rows=result.max_rows, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
        return str(result.frame)


STAGES = [Stage(
    "sql", "Ask SQL of the warehouse (DuckDB): views per table, macros over arrays.",
    '  nwh sql "select run_id, model, num_rows from runs"\n'
    '  nwh sql "select layer, avg(active_count / count) from neuron_stats group by layer"\n'
    "  nwh sql \"select t.token, v.value from neuron_values('RUN', 'acts', 2, 3) v\n"
    "           join tokens t on t.run_id = 'RUN' and t.row = v.row\n"
    '           order by v.value desc limit 20"\n'
    '  nwh sql --out stats.csv "select * from neuron_stats"\n\n'
    "Views: " + ", ".join(tables.table_names()) + ".\n"
    "Macros: neuron_values(run, kind, layer, neuron), "
    "layer_values(run, kind, layer, row_start, row_stop); kind is 'acts' or 'active';\n"
    "moment_mean/var/skew/kurt(n, ...) of power sums (sql/moments.sql).",
    QueryConfig, run, show)]
