"""`nwh sql` only reads, and only the warehouse: every kind of write, of outside read, of
extension and of setting is refused in one line (exit 2) with nothing written; reads under the
root work; results come out in every format, each parsed back by another reader."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest
from reference import files_of

from pipeline.cli import main
from pipeline.core import warehouse
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage
from pipeline.stages import query


@pytest.fixture(scope="module")
def wh(tmp_path_factory, micro_model_dir, corpus_file) -> Storage:
    root = tmp_path_factory.mktemp("sql") / "storage"
    assert main(["extract", "--model", str(micro_model_dir), "--corpus", str(corpus_file),
                 "--num-samples", "6", "--max-length", "16", "--store-acts", "--run", "w",
                 "--storage", str(root), "--device", "cpu", "--quiet"]) == 0
    return Storage(root)


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A folder beside the root, with a file no query may read."""
    d = tmp_path_factory.mktemp("outside")
    (d / "secret.csv").write_text("a,b\n1,2\n")
    return d


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def parquet_rows(root: Path, table: str) -> int:
    """Rows of a table counted from its Parquet files (not through DuckDB)."""
    return sum(pq.ParquetFile(p).metadata.num_rows
               for p in (root / "tables" / table).glob("run_id=*/*.parquet"))


REFUSED = {
    "copy into a run": "copy (select * from tokens) to '{root}/tables/tokens/run_id=w/extra.parquet'",
    "copy inside the root": "copy (select 1 as x) to '{root}/x.csv'",
    "copy outside": "copy (select 1 as x) to '{outside}/x.csv'",
    "copy from": "copy tokens from '{outside}/secret.csv'",
    "attach outside": "attach '{outside}/a.duckdb' as a",
    "attach inside": "attach '{root}/a.duckdb' as a",
    "install": "install httpfs",
    "load": "load httpfs",
    "read outside": "select * from read_csv('{outside}/secret.csv')",
    "read /etc": "select * from read_csv('/etc/passwd', sep = ':')",
    "read through ..": "select * from read_text('{root}/../secret.csv')",
    "read a sibling folder": "select * from read_text('{root}2/x')",
    "set a locked setting": "set enable_external_access = true",
    "reset": "reset lock_configuration",
    "create table": "create table t as select 1 as x",
    "create view": "create view v as select 1 as x",
    "insert": "insert into runs select * from runs",
    "export database": "export database '{outside}/exported'",
    "export inside": "export database '{root}/exported'",
    "explain analyze copy": "explain analyze copy (select 1 as x) to '{outside}/y.csv'",
    "after a select": "select 1; copy (select 1 as x) to '{outside}/z.csv'",
    "import": "import database '{outside}'",
    "call": "call checkpoint()",
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_in_one_line_and_nothing_written(name, wh, outside, capsys):
    sql = REFUSED[name].format(root=wh.root.resolve(), outside=outside)
    before, before_outside = files_of(wh.root), files_of(outside)
    tokens = parquet_rows(wh.root, "tokens")
    code, out, err = run_cli(capsys, "sql", sql, "--storage", str(wh.root))
    assert code == 2, (out, err)
    assert err.startswith("error: refused: ") and err.count("\n") == 1, err
    assert files_of(wh.root) == before and files_of(outside) == before_outside
    assert not Path(f"{wh.root.resolve()}2").exists()
    assert parquet_rows(wh.root, "tokens") == tokens


def test_reads_outside_name_the_root(wh, outside, capsys):
    code, _, err = run_cli(capsys, "sql", f"select * from read_csv('{outside}/secret.csv')",
                           "--storage", str(wh.root))
    assert code == 2 and "outside the storage root" in err and "secret.csv" in err


def test_the_connection_itself_is_sandboxed(wh, outside):
    """Beneath the statement check, DuckDB's own settings refuse the same (defence in depth)."""
    con = warehouse.connect(wh)
    try:
        with pytest.raises(duckdb.PermissionException):
            con.execute(f"copy (select 1 as x) to '{outside}/direct.csv'")
        with pytest.raises(duckdb.PermissionException):
            con.execute(f"select * from read_csv('{outside}/secret.csv')")
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute("set enable_external_access = true")
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute("set allowed_directories = ['/']")
        with pytest.raises(duckdb.Error):
            con.execute("load httpfs")
        with pytest.raises(duckdb.PermissionException):
            con.execute(f"attach '{outside}/direct.duckdb'")
    finally:
        con.close()
    assert not (outside / "direct.csv").exists() and not (outside / "direct.duckdb").exists()


def test_reads_under_the_root_work(wh, capsys):
    root = wh.root.resolve()
    manifest = json.loads((root / "runs" / "w" / "run.json").read_text())
    code, out, err = run_cli(capsys, "sql", "--format", "jsonl", "--storage", str(wh.root),
                             f"select run_id from read_json('{root}/runs/w/run.json')")
    assert code == 0, err
    assert json.loads(out) == {"run_id": manifest["run_id"]}
    code, out, _ = run_cli(capsys, "sql", "--format", "csv", "--storage", str(wh.root),
                           f"select count(*) as n from read_parquet('{root}/tables/tokens/*/*.parquet')")
    assert code == 0 and out.splitlines() == ["n", str(parquet_rows(root, "tokens"))]
    # a relative root reads the same files: the sandbox compares resolved paths
    frame = warehouse.query_frame(Storage(Path(wh.root)), "select count(*) as n from tokens")
    assert frame["n"].to_list() == [parquet_rows(root, "tokens")]


def test_python_functions_read_arrays_in_the_sandbox(wh):
    import zarr

    acts = zarr.open_group(str(wh.arrays("w")), mode="r")["acts/L1"][:]
    frame = warehouse.query_frame(wh, "select row, value from neuron_values('w', 'acts', 1, 4) "
                                      "order by row")
    assert frame["row"].to_list() == list(range(acts.shape[0]))
    assert frame["value"].to_list() == acts[:, 4].astype(float).tolist()


@pytest.mark.parametrize("sql", ["describe tokens", "show tables", "summarize runs",
                                 "explain select * from runs", "pragma table_info('runs')",
                                 "from runs select run_id", "pivot tokens on sample using count(*)"])
def test_read_only_statement_kinds_run(wh, sql):
    assert warehouse.query_frame(wh, sql) is not None


def test_bound_parameters_and_refusal_with_them(wh, outside):
    frame = warehouse.query_frame(wh, "select count(*) as n from tokens where run_id = $run", run="w")
    assert frame["n"].to_list() == [parquet_rows(wh.root, "tokens")]
    with pytest.raises(UserError, match="^refused: COPY"):
        warehouse.query_frame(wh, f"copy (select $x as x) to '{wh.root}/p.csv'", x=1)
    assert not (wh.root / "p.csv").exists()


def test_mistyped_storage_is_an_error(tmp_path, capsys):
    for root in (tmp_path / "no-such-root", tmp_path):  # absent, and a folder with no warehouse
        code, out, err = run_cli(capsys, "sql", "select 1", "--storage", str(root))
        assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # nothing created at the mistyped path


def test_out_may_not_land_in_the_tables(wh, capsys):
    before = files_of(wh.root)
    for target in (wh.root / "tables" / "tokens" / "run_id=w" / "extra.parquet",
                   wh.root / "runs" / "w" / "x.csv"):
        code, _, err = run_cli(capsys, "sql", "select * from tokens", "--out", str(target),
                               "--storage", str(wh.root))
        assert code == 2 and err.startswith("error: --out") and err.count("\n") == 1, err
    assert files_of(wh.root) == before


# -- formats

SQL = "select run_id, sample, position, token, [row, row + 1] as pair from tokens order by row"


@pytest.fixture(scope="module")
def truth(wh) -> list[dict]:
    """The rows of SQL read from the Parquet files with pyarrow (no DuckDB)."""
    parts = sorted((wh.root / "tables" / "tokens" / "run_id=w").glob("*.parquet"))
    rows = []
    for p in parts:
        rows += pq.read_table(p).to_pylist()
    rows.sort(key=lambda r: r["row"])
    return [{"run_id": "w", "sample": r["sample"], "position": r["position"], "token": r["token"],
             "pair": [r["row"], r["row"] + 1]} for r in rows]


def _as_text(rows: list[dict], one_line: bool = False) -> list[dict]:
    """How a text format writes the rows: every cell as text, a list as its items (markdown:
    a line break as a space)."""
    def text(v) -> str:
        v = " ".join(map(str, v)) if isinstance(v, list) else str(v)
        return v.replace("\n", " ") if one_line else v

    return [{k: text(v) for k, v in r.items()} for r in rows]


def _parse(fmt: str, data: bytes) -> list[dict]:
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(data.decode()), strict=True))
    if fmt == "tsv":
        return list(csv.DictReader(io.StringIO(data.decode()), delimiter="\t", strict=True))
    if fmt == "json":
        return json.loads(data)
    if fmt == "jsonl":
        return [json.loads(line) for line in data.decode().splitlines()]
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data)).to_pylist()
    if fmt == "markdown":
        lines = data.decode().splitlines()
        assert set(lines[1].replace("|", "").split()) == {"---"}

        def cells(line: str) -> list[str]:
            """Cells of a row: `|` separates, a backslash escapes the next character."""
            parts, cur, chars = [], "", iter(line.strip())
            assert next(chars) == "|"
            for ch in chars:
                if ch == "\\":
                    cur += next(chars)
                elif ch == "|":
                    parts.append(cur[1:-1])  # one space of padding each side
                    cur = ""
                else:
                    cur += ch
            assert cur == ""
            return parts

        header = cells(lines[0])
        return [dict(zip(header, cells(line))) for line in lines[2:]]
    raise AssertionError(fmt)


TYPED = ("json", "jsonl", "parquet")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "markdown", "parquet"])
def test_formats_to_file_and_stdout(fmt, wh, truth, tmp_path, capsysbinary):
    expect = truth if fmt in TYPED else _as_text(truth, one_line=fmt == "markdown")
    suffix = {"jsonl": "ndjson", "markdown": "md"}.get(fmt, fmt)
    path = tmp_path / f"result.{suffix}"
    assert main(["sql", SQL, "--out", str(path), "--storage", str(wh.root)]) == 0  # from the suffix
    out, _ = capsysbinary.readouterr()
    assert out.decode().strip() == f"wrote {len(truth)} rows ({fmt}) to {path}"
    assert _parse(fmt, path.read_bytes()) == expect
    assert main(["sql", SQL, "--out", "-", "--format", fmt, "--storage", str(wh.root)]) == 0
    out, _ = capsysbinary.readouterr()
    assert _parse(fmt, out) == expect
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


def test_format_overrides_the_suffix_and_out_dash_defaults_to_csv(wh, truth, tmp_path, capsysbinary):
    path = tmp_path / "result.txt"
    assert main(["sql", SQL, "--out", str(path), "--format", "jsonl", "--storage", str(wh.root)]) == 0
    assert _parse("jsonl", path.read_bytes()) == truth
    capsysbinary.readouterr()
    assert main(["sql", SQL, "--out", "-", "--storage", str(wh.root)]) == 0
    out, _ = capsysbinary.readouterr()
    assert _parse("csv", out) == _as_text(truth)


def test_parquet_to_a_pipe(wh, truth):
    """A separate process writing parquet bytes to its standard output (nothing else on it)."""
    done = subprocess.run([sys.executable, "-m", "pipeline", "sql", SQL, "--out", "-", "--format",
                           "parquet", "--storage", str(wh.root)], capture_output=True, check=True)
    assert pq.read_table(io.BytesIO(done.stdout)).to_pylist() == truth


def test_markdown_escapes_pipes(wh):
    frame = warehouse.query_frame(wh, "select 'a|b' as x, 'c\\d' as y")
    assert _parse("markdown", query.render(frame, "markdown").encode()) == [{"x": "a|b", "y": "c\\d"}]


def test_wide_tables_fit_the_terminal(wh, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "90")
    columns = ", ".join(f"neuron_id + {i} as a_rather_long_column_name_{i}" for i in range(20))
    code, out, _ = run_cli(capsys, "sql", f"select {columns}, site from neuron_stats "
                           "join neurons using (run_id, neuron_id) limit 5", "--storage", str(wh.root))
    assert code == 0
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 90, out
    assert "a_rather_long_column_name_0" in out and "…" in out  # first columns kept, middle elided
    # a narrow result is shown whole
    code, out, _ = run_cli(capsys, "sql", "select run_id, num_rows from runs", "--storage", str(wh.root))
    assert code == 0 and "…" not in out and "num_rows" in out


def test_unknown_suffix_and_folder_refused(wh, tmp_path):
    for out in (str(tmp_path / "r.txt"), str(tmp_path)):
        with pytest.raises(UserError, match="^--out"):
            query.run(query.QueryConfig(query="select 1", out=out), wh)


def test_sums_of_counts_are_bigint(wh):
    frame = warehouse.query_frame(wh, "select sum(active_count) as s, sum(count) as c "
                                      "from neuron_stats")
    assert frame.schema["s"] == pl.Int64 and frame.schema["c"] == pl.Int64
    stats = pl.concat([pl.read_parquet(p) for p in
                       (wh.root / "tables" / "neuron_stats").glob("run_id=*/*.parquet")])
    assert frame.row(0) == (int(stats["active_count"].to_numpy().sum()),
                            int(stats["count"].to_numpy().sum()))
