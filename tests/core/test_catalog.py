"""The catalog <root>/warehouse.duckdb opens in the DuckDB command line, a fresh Python DuckDB
and (the files under it) polars, with relative paths (the root can move); it follows the
tables' partitions, atomically and safely under concurrent rebuilds. Types: run_id is a string,
counts are BIGINT, a checkpoint has a numeric step. The coactivation macro equals the counts of
the stored masks computed with NumPy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import zarr

from pipeline.cli import main
from pipeline.core import tables, warehouse
from pipeline.core.storage import Storage

RUN = "123"  # all digits: a hive partition folder that readers would take for a number


@pytest.fixture(scope="module")
def built(tmp_path_factory, micro_model_dir, corpus_file) -> Path:
    root = tmp_path_factory.mktemp("catalog") / "storage"
    assert main(["extract", "--model", str(micro_model_dir), "--corpus", str(corpus_file),
                 "--num-samples", "6", "--max-length", "16", "--run", RUN,
                 "--storage", str(root), "--device", "cpu", "--quiet"]) == 0
    assert main(["coactivation", "--run", RUN, "--storage", str(root), "--quiet"]) == 0
    return root


@pytest.fixture()
def wh(built, tmp_path) -> Storage:
    """A private copy (a test that writes)."""
    shutil.copytree(built, tmp_path / "storage")
    return Storage(tmp_path / "storage")


def parquet_rows(root: Path, table: str) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows
               for p in (Path(root) / "tables" / table).glob("run_id=*/*.parquet"))


def duckdb_cli() -> str | None:
    here = Path(sys.executable).parent / "duckdb"  # pip install duckdb-cli puts it beside python
    return str(here) if here.exists() else shutil.which("duckdb")


def test_written_with_the_tables(built):
    assert (built / "warehouse.duckdb").is_file()
    assert not list(built.glob(".warehouse.duckdb.tmp-*")) and not list(built.glob("*.wal"))


@pytest.mark.skipif(duckdb_cli() is None, reason="the DuckDB command line is not installed "
                    "(pip install duckdb-cli)")
def test_duckdb_command_line_opens_it(built):
    sql = ("select run_id, typeof(run_id) as t, num_rows from runs; "
           "select count(*) as n from tokens; "
           "select count(*) as n from edges; "
           "select moment_var(4, 2.0, 6.0) as v;")
    done = subprocess.run([duckdb_cli(), "-readonly", "-csv", "warehouse.duckdb", "-c", sql],
                          cwd=built, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    rows = pq.read_table(next((built / "tables" / "runs").glob("*/*.parquet"))).to_pylist()
    assert lines[:2] == ["run_id,t,num_rows", f"{RUN},VARCHAR,{rows[0]['num_rows']}"]
    assert lines[2:4] == ["n", str(parquet_rows(built, "tokens"))]
    assert lines[4:6] == ["n", "0"]  # a table with no data: an empty view
    assert lines[6:8] == ["v", str(6.0 / 4 - (2.0 / 4) ** 2)]


def test_python_duckdb_opens_it_from_the_root_and_elsewhere(built, tmp_path, monkeypatch):
    monkeypatch.chdir(built)
    con = duckdb.connect("warehouse.duckdb", read_only=True)
    try:
        assert con.sql("select distinct run_id from neurons").fetchall() == [(RUN,)]
        assert con.sql("select count(*) from tokens").fetchall()[0][0] == parquet_rows(built, "tokens")
    finally:
        con.close()
    monkeypatch.chdir(tmp_path)  # elsewhere: name the root, either way
    for setup in (f"set file_search_path = '{built}'", f"set variable warehouse_root = '{built}'"):
        con = duckdb.connect(str(built / "warehouse.duckdb"), read_only=True)
        try:
            con.execute(setup)
            assert con.sql("select count(*) from neuron_stats").fetchall()[0][0] == \
                parquet_rows(built, "neuron_stats")
        finally:
            con.close()


def test_empty_views_have_the_declared_columns(built):
    con = duckdb.connect(str(built / "warehouse.duckdb"), read_only=True)
    try:
        for table in tables.table_names():
            if parquet_rows(built, table):
                continue
            got = con.sql(f"describe {table}").fetchall()
            declared = tables.schema(table).names + ["run_id"]
            assert [r[0] for r in got][:len(declared)] == declared, table
            # the types DuckDB itself gives the declared Arrow schema
            empty = tables.schema(table).empty_table()
            expect = [str(t) for t in duckdb.connect().from_arrow(empty).types] + ["VARCHAR"]
            assert [r[1] for r in got][:len(declared)] == expect, table
            assert con.sql(f"select count(*) from {table}").fetchall()[0][0] == 0
    finally:
        con.close()


def test_polars_reads_the_files_with_string_run_ids(built):
    frame = pl.read_parquet(built / "tables" / "runs" / "*" / "*.parquet",
                            hive_partitioning=True, hive_schema={"run_id": pl.String})
    assert frame["run_id"].to_list() == [RUN]


def test_the_root_can_move(wh, tmp_path, monkeypatch):
    moved = tmp_path / "elsewhere" / "warehouse-root"
    shutil.move(str(wh.root), moved)
    monkeypatch.chdir(moved)
    con = duckdb.connect("warehouse.duckdb", read_only=True)
    try:
        assert con.sql("select count(*) from tokens").fetchall()[0][0] == parquet_rows(moved, "tokens")
    finally:
        con.close()


def _catalog_rows(storage: Storage, table: str) -> int:
    con = duckdb.connect(str(storage.catalog()), read_only=True)
    try:
        con.execute(f"set file_search_path = '{storage.root}'")
        return con.sql(f"select count(*) from {table}").fetchall()[0][0]
    finally:
        con.close()


def _rows(table: str, n: int, **given) -> dict:
    """n rows of a table: the given columns, the others a constant of their declared type."""
    import pyarrow as pa

    def value(t):
        if pa.types.is_string(t):
            return "x"
        if pa.types.is_boolean(t):
            return True
        if pa.types.is_floating(t):
            return 0.5
        if pa.types.is_list(t):
            return [value(t.value_type)]
        return 1

    return {f.name: [given[f.name] if f.name in given else value(f.type)] * n
            for f in tables.schema(table)}


def _trace_rows(n: int) -> dict:
    return _rows("trace", n)


def test_follows_partitions_written_and_removed(wh):
    assert _catalog_rows(wh, "trace") == 0
    tables.write_part(wh, "trace", "t1", _trace_rows(3))
    assert _catalog_rows(wh, "trace") == 3  # rebuilt: the view now reads files
    before = wh.catalog().stat().st_mtime_ns
    tables.write_part(wh, "trace", "t2", _trace_rows(2))
    assert _catalog_rows(wh, "trace") == 5  # a partition more: the glob sees it
    assert wh.catalog().stat().st_mtime_ns == before  # without a rebuild
    tables.drop_partition(wh, "trace", "t1")
    tables.drop_partition(wh, "trace", "t2")
    assert _catalog_rows(wh, "trace") == 0  # no file left: an empty view again, not an error
    assert not warehouse.refresh_catalog(wh)  # up to date: nothing to do


def test_rebuilds_a_missing_or_outdated_catalog(wh):
    wh.catalog().unlink()
    assert warehouse.refresh_catalog(wh) and wh.catalog().exists()
    state = wh.root / ".warehouse.duckdb.json"
    state.write_text('{"format": 0}')  # built by an older version
    assert warehouse.refresh_catalog(wh)
    assert not warehouse.refresh_catalog(wh)


def test_concurrent_rebuilds_leave_one_valid_catalog(wh):
    code = ("import sys; from pipeline.core.storage import Storage; "
            "from pipeline.core.warehouse import refresh_catalog; "
            "s = Storage(sys.argv[1]); [refresh_catalog(s, force=True) for _ in range(5)]")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(wh.root)]) for _ in range(3)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    assert _catalog_rows(wh, "tokens") == parquet_rows(wh.root, "tokens")
    assert not list(wh.root.glob(".warehouse.duckdb.tmp-*"))


def test_a_failed_rebuild_never_fails_the_write(wh, monkeypatch, caplog):
    def broken(storage, with_data):
        raise duckdb.IOException("disk trouble")

    monkeypatch.setattr(warehouse, "_build_catalog", broken)
    tables.write_part(wh, "trace", "t1", _trace_rows(1))  # the write itself succeeds
    assert "could not rebuild" in caplog.text
    assert tables.read_partition(wh, "trace", "t1").num_rows == 1
    monkeypatch.undo()
    assert warehouse.refresh_catalog(wh)  # retried later
    assert _catalog_rows(wh, "trace") == 1


# -- types


def _write_runs(storage: Storage, revisions: dict[str, str | None]) -> None:
    row = pq.read_table(next((storage.table_dir("runs")).glob("*/*.parquet"))).to_pylist()[0]
    for run, revision in revisions.items():
        tables.write_part(storage, "runs", run, {k: [revision if k == "revision" else v]
                                                  for k, v in row.items()})


def test_run_id_is_a_string_everywhere(wh):
    for frame in (warehouse.query_frame(wh, "select run_id from runs"),
                  warehouse.query_frame(wh, "select distinct run_id from tokens")):
        assert frame.schema["run_id"] == pl.String and frame["run_id"].to_list() == [RUN]
    con = duckdb.connect(str(wh.catalog()), read_only=True)
    try:
        con.execute(f"set file_search_path = '{wh.root}'")
        kinds = con.sql("select table_name, data_type from information_schema.columns "
                        "where column_name = 'run_id' and table_schema = 'main'").fetchall()
        assert len(kinds) == len(tables.table_names())
        assert {t for _, t in kinds} == {"VARCHAR"}
        wide = con.sql("select table_name, column_name, data_type from information_schema.columns "
                       "where data_type like 'HUGEINT%' or data_type like 'DECIMAL%'").fetchall()
        assert wide == []
    finally:
        con.close()


def test_checkpoints_sort_by_step(wh):
    revisions = {"c0": "step0", "c128": "step128", "c32": "step32", "cm": "main", "cx": "step5x"}
    _write_runs(wh, revisions)
    frame = warehouse.query_frame(wh, "select run_id, revision, step from runs "
                                      "where run_id like 'c%' order by step nulls last, run_id")
    assert frame.schema["step"] == pl.Int64
    expect = sorted(((int(r[4:]) if r[4:].isdigit() and r.startswith("step") else None, run)
                     for run, r in revisions.items()), key=lambda x: (x[0] is None, x[0] or 0, x[1]))
    assert list(zip(frame["step"].to_list(), frame["run_id"].to_list())) == expect
    assert _catalog_rows(wh, "runs") == 1 + len(revisions)


def test_dormancy_step_from_revision_unless_logged(wh):
    for run, revision, step in (("d1", "step64", None), ("d2", "step64", 7), ("d3", "N/A", None)):
        tables.write_part(wh, "dormancy", run, _rows("dormancy", 1, revision=revision, step=step))
    frame = warehouse.query_frame(wh, "select run_id, step from dormancy order by run_id")
    assert frame.rows() == [("d1", 64), ("d2", 7), ("d3", None)]


# -- the coactivation macro


def _masks(root: Path) -> tuple[dict[int, np.ndarray], np.ndarray]:
    group = zarr.open_group(str(root / "runs" / RUN / "arrays.zarr"), mode="r")
    masks = {}
    for key, array in group["active"].arrays():  # bit n%8 of byte n//8 is neuron n
        masks[int(key[1:])] = np.unpackbits(array[:], axis=1, bitorder="little").astype(bool)
    kept = (group["included"][:, 0].astype(bool) if "included" in group
            else np.ones(len(next(iter(masks.values()))), bool))
    return masks, kept


def test_coactivation_macro_equals_numpy_counts(built):
    storage = Storage(built)
    neurons = pq.read_table(next(storage.table_dir("neurons").glob("*/*.parquet"))).to_pylist()
    width = {n["layer"]: n["layer_width"] for n in neurons}
    offset = {n["layer"]: n["layer_offset"] for n in neurons}
    masks, kept = _masks(built)
    for a, b in ((1, 2), (2, 1)):  # 2:1 reads the 1:2 counts transposed
        ma, mb = masks[a][kept, :width[a]], masks[b][kept, :width[b]]
        expect = ma.T.astype(np.int64) @ mb.astype(np.int64)
        frame = warehouse.query_frame(storage, f"select * from coactivation('{RUN}', {a}, {b})")
        assert frame.columns == ["layer_a", "neuron_a", "layer_b", "neuron_b", "count",
                                 "neuron_id_a", "neuron_id_b"]
        assert frame.schema["count"] == pl.Int64
        got = np.zeros_like(expect)
        got[frame["neuron_a"].to_numpy(), frame["neuron_b"].to_numpy()] = frame["count"].to_numpy()
        np.testing.assert_array_equal(got, expect)
        assert frame.height == np.count_nonzero(expect) and (frame["count"] > 0).all()
        assert set(frame["layer_a"]) == {a} and set(frame["layer_b"]) == {b}
        assert (frame["neuron_id_a"] == frame["neuron_a"] + offset[a]).all()
        assert (frame["neuron_id_b"] == frame["neuron_b"] + offset[b]).all()
    top = warehouse.query_frame(storage, f"select neuron_a, neuron_b, count from coactivation("
                                         f"'{RUN}', 1, 2) order by count desc, neuron_a, neuron_b "
                                         "limit 20")
    ma, mb = masks[1][kept, :width[1]], masks[2][kept, :width[2]]
    c = ma.T.astype(np.int64) @ mb.astype(np.int64)
    ranked = sorted(((-c[i, j], i, j) for i in range(c.shape[0]) for j in range(c.shape[1])))[:20]
    assert top.rows() == [(i, j, -n) for n, i, j in ranked]


def test_coactivation_of_an_uncounted_pair_is_one_line(built, capsys):
    code = main(["sql", f"select * from coactivation('{RUN}', 0, 2)", "--storage", str(built)])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "nwh coactivation --run 123 --pairs 0:2" in err


def test_catalog_lists_no_array_macros(built):
    """The catalog holds plain SQL only: macros that need nwh's Python functions stay out."""
    con = duckdb.connect(str(built / "warehouse.duckdb"), read_only=True)
    try:
        names = {r[0] for r in con.sql("select function_name from duckdb_functions() "
                                       "where database_name = 'warehouse'").fetchall()}
    finally:
        con.close()
    assert {"revision_step", "moment_var"} <= names
    assert not names & {"coactivation", "neuron_values", "layer_values"}
