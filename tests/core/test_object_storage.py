"""The warehouse on object storage: an s3:// root on a local S3-compatible server (moto, on
127.0.0.1). Tables and Zarr arrays round-trip; `nwh sql`, coactivation and graph on an S3 root
equal the same stages on a local copy of the run, and NumPy over its masks; objects beyond a
run's committed rows change nothing readers return; errors of the endpoint are one line."""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent


def load_helpers(path: Path):
    """A sibling test module, for its helpers (the tests are not a package)."""
    spec = importlib.util.spec_from_file_location(f"{path.stem}_helpers", path)
    spec.loader.exec_module(module := importlib.util.module_from_spec(spec))
    return module


servers = load_helpers(HERE.parent / "s3_server.py")
if servers.missing_packages():
    pytest.skip(f"object storage needs {', '.join(servers.missing_packages())} "
                "(pip install 'moto[server]' s3fs universal-pathlib)", allow_module_level=True)

from pipeline.cli import main  # noqa: E402
from pipeline.core import arrays, coact, tables, warehouse  # noqa: E402
from pipeline.core.errors import UserError  # noqa: E402
from pipeline.core.storage import (  # noqa: E402
    Storage,
    atomic_path,
    read_json,
    remove_file,
    remove_tree,
    write_json,
)
from pipeline.stages import coactivation, graph  # noqa: E402

coact_tests = load_helpers(HERE.parent / "stages" / "test_coactivation.py")
RUN = "s3run"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    cache = tmp_path_factory.mktemp("nwh-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NWH_CACHE", str(cache))  # locks, models, staging of remote roots
        mp.delenv("NWH_STORAGE_OPTIONS", raising=False)
        with servers.s3_server() as url:
            yield url


@pytest.fixture()
def s3_url(endpoint) -> str:
    """A fresh prefix of the bucket: an empty root."""
    return f"s3://{servers.BUCKET}/{uuid.uuid4().hex[:10]}"


def s3fs_of(storage: Storage):
    return storage.root.fs


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, micro_model_dir, corpus_file) -> Path:
    """A local extraction of the micro model (extract writes locally; copied up by the tests)."""
    root = tmp_path_factory.mktemp("local") / "storage"
    coact_tests.extract_run(root, micro_model_dir, corpus_file, RUN)
    return root


def upload(local_root: Path, url: str) -> Storage:
    """The run's folder and table partitions copied to an S3 root, file by file."""
    storage = Storage(url)
    fs, key = storage.root.fs, storage.root.path
    files = [p for p in local_root.rglob("*") if p.is_file()
             and p.relative_to(local_root).parts[0] in ("runs", "tables")
             and ".locks" not in p.parts]
    fs.put([str(p) for p in files], [f"{key}/{p.relative_to(local_root).as_posix()}" for p in files])
    return storage


@pytest.fixture(scope="module")
def pair(extracted, endpoint, tmp_path_factory):
    """(local storage, S3 storage) of the same extraction, each counted and graphed by its own
    stages; and the masks read from the local Zarr arrays."""
    import shutil

    local_root = tmp_path_factory.mktemp("pair") / "storage"
    shutil.copytree(extracted, local_root)
    remote = upload(extracted, f"s3://{servers.BUCKET}/pair")
    local = Storage(local_root)
    for storage in (local, remote):
        coactivation.run(coactivation.CoactivationConfig(run=RUN, quiet=True), storage)
        graph.run(graph.GraphConfig(run=RUN, threshold=0.3, quiet=True), storage)
    return local, remote, coact_tests.stored_masks(local, RUN)


# -- the storage module


def test_remote_root_paths_and_local_folders(s3_url, tmp_path):
    storage = Storage(s3_url + "/")
    assert not storage.is_local and storage.url == s3_url
    assert str(storage.run_manifest("r")) == f"{s3_url}/runs/r/run.json"
    cache = storage.local_dir()
    assert cache.is_absolute() and cache.exists() is False
    for local in (storage.models_dir(), storage.cache_dir(), storage.lock_path("r")):
        assert isinstance(local, Path) and local.is_relative_to(cache)
    assert Storage(s3_url).local_dir() == cache != Storage(s3_url + "x").local_dir()
    assert Storage(tmp_path).is_local and Storage(f"file://{tmp_path}").root == tmp_path


def test_json_atomic_writes_and_remove_tree(s3_url):
    storage = Storage(s3_url)
    storage.ensure_writable()
    fs = s3fs_of(storage)
    assert fs.find(storage.root.path) == []  # the probe object is gone
    write_json(storage.run_manifest("run1"), {"status": "running", "rows": 3})
    assert read_json(storage.run_manifest("run1")) == {"status": "running", "rows": 3}
    # a block that fails uploads nothing, and the object before it stays
    with pytest.raises(RuntimeError):
        with atomic_path(storage.run_manifest("run1")) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("killed")
    assert read_json(storage.run_manifest("run1"))["rows"] == 3
    # a folder is replaced whole: new objects in, stale ones out
    folder = storage.run_dir("run1") / "subsets"
    with atomic_path(folder) as tmp:
        (tmp / "a").mkdir(parents=True)
        (tmp / "a" / "x.txt").write_text("1")
        (tmp / "y.txt").write_text("2")
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "y.txt").write_text("3")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(folder.path)) == ["y.txt"]
    assert (folder / "y.txt").read_text() == "3"
    write_json(storage.run_manifest("run10"), {"status": "finished"})
    assert storage.list_runs() == ["run1", "run10"]
    remove_tree(storage.run_dir("run1"))  # not run10, whose name starts alike
    assert storage.list_runs() == ["run10"]
    assert not storage.run_dir("run1").exists()
    remove_tree(storage.run_dir("run1"))  # absent is fine
    remove_file(storage.run_manifest("run10"))
    remove_file(storage.run_manifest("run10"))
    assert storage.list_runs() == []


def neurons(layers: int, width: int) -> dict:
    """Rows of the `neurons` table of a dense model."""
    n = layers * width
    return {"neuron_id": np.arange(n, dtype=np.int64),
            "layer": np.repeat(np.arange(layers, dtype=np.int32), width),
            "neuron": np.tile(np.arange(width, dtype=np.int32), layers),
            "layer_offset": np.repeat(np.arange(layers, dtype=np.int64) * width, width),
            "layer_width": np.full(n, width, np.int32), "expert": np.full(n, -1, np.int16),
            "site": [f"h.{l}.mlp.c_proj" for l in range(layers) for _ in range(width)]}


def test_tables_round_trip(s3_url):
    storage = Storage(s3_url)
    rng = np.random.default_rng(0)
    data = neurons(2, 5)
    tables.write_part(storage, "neurons", "r", data, part="part-1")
    tables.write_part(storage, "neurons", "r", {k: v[:3] for k, v in data.items()},
                      part="part-0")
    got = tables.read_partition(storage, "neurons", "r")  # part-0 then part-1
    assert got.schema == tables.schema("neurons")
    assert got["neuron_id"].to_pylist() == [0, 1, 2] + list(range(10))
    assert tables.read_part(storage, "neurons", "r", "part-1")["layer"].to_pylist() == \
        data["layer"].tolist()
    assert tables.read_part(storage, "neurons", "r", "nope") is None
    tables.drop_partition_parts(storage, "neurons", "r", "part-0")
    assert tables.read_partition(storage, "neurons", "r").num_rows == 10
    tables.drop_partition(storage, "neurons", "r")
    assert tables.read_partition(storage, "neurons", "r").num_rows == 0
    # a result written to an object store URL (--out)
    import polars as pl

    frame = pl.DataFrame({"x": rng.integers(0, 9, 4), "y": ["a", "b", "c", "d"]})
    out = tables.write_frame(frame, f"{s3_url}/out/frame.parquet")
    with out.open("rb") as f:
        assert pl.read_parquet(f).equals(frame)


@pytest.mark.parametrize("block", [None, 8])
def test_zarr_arrays_round_trip_and_resize(s3_url, block):
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 256, (70, 20), dtype=np.uint8)
    group = arrays.open_group(Storage(s3_url).arrays("r"))
    array = arrays.ensure_rows_array(group, "active/L0", width=20, dtype="uint8", chunk_rows=16,
                                     compress=True, block=block)
    arrays.write_rows(array, 0, rows[:30])
    arrays.write_rows(array, 30, rows[30:])
    back = arrays.open_group(Storage(s3_url).arrays("r"), mode="r")
    np.testing.assert_array_equal(back["active/L0"][:], rows)
    np.testing.assert_array_equal(back["active/L0"][:, 11], rows[:, 11])
    arrays.truncate_rows(group, 40)
    again = arrays.open_group(Storage(s3_url).arrays("r"), mode="r")
    assert again["active/L0"].shape == (40, 20)
    np.testing.assert_array_equal(again["active/L0"][:], rows[:40])
    with pytest.raises(ValueError):  # a read-only group refuses writes
        again["active/L0"][0] = 0


# -- the stages on an S3 root


def test_coactivation_on_s3_equals_numpy_over_the_masks(pair):
    local, remote, masks = pair
    for a, b in ((0, 1), (1, 2)):
        np.testing.assert_array_equal(coact.read_counts(remote, RUN, a, b),
                                      coact_tests.dense(masks[a], masks[b]))
    pairs = tables.read_partition(remote, "coactivation_pairs", RUN).to_pydict()
    assert pairs["layer_a"] == [0, 1] and pairs["tokens"] == [512, 512]
    assert pairs["total"] == [int(coact_tests.dense(masks[a], masks[b]).sum())
                              for a, b in ((0, 1), (1, 2))]
    active = coact.active_counts(remote, RUN)
    for layer in range(3):
        np.testing.assert_array_equal(active[layer], masks[layer].sum(0))
    # a rerun finds its work done on the S3 root
    again = coactivation.run(coactivation.CoactivationConfig(run=RUN, quiet=True), remote)
    assert again.counted == [] and again.skipped == [(0, 1), (1, 2)]


def test_graph_on_s3_equals_local(pair):
    local, remote, _ = pair
    for table in ("edges", "threshold_analysis"):
        got = tables.read_partition(remote, table, RUN).to_pylist()
        want = tables.read_partition(local, table, RUN).to_pylist()
        assert got == want and len(want) > 0
    stored = graph.run(graph.GraphConfig(run=RUN, threshold=0.3, quiet=True), remote)
    assert stored.skipped and stored.edges == len(tables.read_partition(local, "edges", RUN))


QUERIES = [
    "select run_id, num_rows, num_layers from runs",
    "select layer, count(*) n, sum(active_count) s from neuron_stats group by layer order by layer",
    "select count(*) from tokens",
    "select * from neuron_values('s3run', 'active', 1, 7) order by row",
    "select * from layer_values('s3run', 'active', 0, 5, 9) order by row, neuron",
    "select * from coactivation('s3run', 0, 1) order by neuron_a, neuron_b",
    "select * from edges order by source, target",
    "select * from threshold_analysis order by threshold",
]


def test_sql_on_s3_equals_local(pair):
    local, remote, masks = pair
    # nwh sql's function for one query; one connection each for the rest (a connection binds
    # every view, a second a query over the test server)
    assert warehouse.query_frame(remote, QUERIES[1]).equals(warehouse.query_frame(local, QUERIES[1]))
    con_remote, con_local = warehouse.connect(remote), warehouse.connect(local)
    try:
        for sql in QUERIES:
            got, want = con_remote.sql(sql).pl(), con_local.sql(sql).pl()
            assert got.equals(want) and want.height > 0, sql
        column = con_remote.sql(QUERIES[3]).pl()["value"].to_numpy()
    finally:
        con_remote.close()
        con_local.close()
    np.testing.assert_array_equal(column, masks[1][:, 7])  # and NumPy over the masks


def test_sql_command_on_s3(pair, tmp_path, capsys):
    local, remote, _ = pair
    out = tmp_path / "runs.csv"
    assert main(["sql", "--storage", remote.url, "--out", str(out), QUERIES[0]]) == 0
    assert out.read_text().splitlines()[1].startswith(f"{RUN},512,3")
    capsys.readouterr()
    assert main(["sql", "--storage", remote.url, "--format", "csv",
                 "select count(*) n from neurons"]) == 0
    assert capsys.readouterr().out.split() == ["n", "120"]


def test_sandbox_confines_to_the_root_url(pair):
    import duckdb

    _, remote, _ = pair
    fs = s3fs_of(remote)
    neurons_part = fs.find(f"{remote.root.path}/tables/neurons/")[0]
    for other in (f"{servers.BUCKET}/elsewhere/x.parquet", f"{remote.root.path}x/x.parquet"):
        fs.copy(neurons_part, other)  # readable Parquet, outside the root (pairx beside pair)
    with pytest.raises(UserError, match="refused: .*outside the storage root"):
        warehouse.query_frame(remote, f"select * from read_parquet('s3://{servers.BUCKET}/"
                              "elsewhere/x.parquet')")
    con = warehouse.connect(remote)
    try:
        for sql in (f"select * from read_parquet('{remote.url}x/x.parquet')",
                    "select * from read_csv('/etc/passwd')"):
            with pytest.raises(duckdb.PermissionException):
                con.sql(sql).fetchall()
        own = f"select count(*) from read_parquet('{remote.url}/tables/neurons/*/*.parquet')"
        assert con.sql(own).fetchall() == [(120,)]
        assert warehouse.refusal(con, f"copy (select 1) to '{remote.url}/x.csv'").startswith("COPY")
    finally:
        con.close()


def test_catalog_on_s3_opens_with_the_root_url(pair, tmp_path):
    import duckdb

    _, remote, _ = pair
    assert remote.catalog().exists()
    local_copy = tmp_path / "warehouse.duckdb"
    s3fs_of(remote).get_file(remote.catalog().path, str(local_copy))
    con = duckdb.connect()
    con.register_filesystem(s3fs_of(remote))  # what httpfs would be in a DuckDB client
    con.execute(f"attach '{local_copy}' as wh (read_only)")
    con.execute("set variable warehouse_root = ?", [remote.url])
    got = con.sql("select count(*) from wh.neuron_stats").fetchall()
    want = warehouse.query_frame(remote, "select count(*) from neuron_stats").rows()
    assert got == want and got[0][0] == 120
    con.close()


def test_objects_beyond_the_committed_rows_change_nothing(pair, s3_url, extracted):
    """A commit cut short: chunk objects (and a longer array) past the manifest's committed
    rows, as a writer leaves them between its Zarr writes and its run.json. Readers return what
    they returned before."""
    local, _, masks = pair
    storage = upload(extracted, s3_url)
    group = arrays.open_group(storage.arrays(RUN))
    for layer in range(3):  # 3 more chunks of garbage, all bits set
        array = group[f"active/L{layer}"]
        arrays.write_rows(array, 512, np.full((300, array.shape[1]), 255, np.uint8))
    arrays.write_rows(group[arrays.INCLUDED], 512, np.ones((300, 1), np.uint8))
    assert arrays.open_group(storage.arrays(RUN), mode="r")["active/L0"].shape[0] == 812
    coactivation.run(coactivation.CoactivationConfig(run=RUN, quiet=True), storage)
    for a, b in ((0, 1), (1, 2)):
        np.testing.assert_array_equal(coact.read_counts(storage, RUN, a, b),
                                      coact_tests.dense(masks[a], masks[b]))
    con = warehouse.connect(storage)
    try:
        column = con.sql(QUERIES[3]).pl()
        block = con.sql("select count(*) from layer_values('s3run', 'active', 0, 500, 700)")
        assert block.fetchall() == [(12 * 40,)]  # rows 500..511 only
    finally:
        con.close()
    assert column.height == 512
    np.testing.assert_array_equal(column["value"].to_numpy(), masks[1][:, 7])
    # and a run whose manifest is not committed as finished is refused, whatever its objects
    manifest = read_json(storage.run_manifest(RUN))
    write_json(storage.run_manifest(RUN), {**manifest, "status": "running"})
    with pytest.raises(UserError, match="not a finished extraction"):
        coactivation.run(coactivation.CoactivationConfig(run=RUN, quiet=True), storage)


# -- errors


def test_missing_bucket_is_one_line(endpoint, capsys):
    url = "s3://no-such-bucket/w"
    for call in (lambda: Storage(url, must_exist=True), lambda: Storage(url).ensure_writable()):
        with pytest.raises(UserError, match="bucket does not exist") as e:
            call()
        assert "\n" not in str(e.value)
    assert main(["sql", "--storage", url, "select 1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "bucket does not exist" in err and "\n" not in err and "Traceback" not in err


def test_unreachable_endpoint_is_one_line(endpoint, monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NWH_STORAGE_OPTIONS", json.dumps({
        "endpoint_url": f"http://127.0.0.1:{port}",
        "config_kwargs": {"retries": {"max_attempts": 1}}}))  # fail now, not after retries
    url = f"s3://{servers.BUCKET}/w"
    with pytest.raises(UserError, match="cannot be reached") as e:
        Storage(url, must_exist=True)
    assert "\n" not in str(e.value) and "AWS_ENDPOINT_URL" in str(e.value)
    assert main(["sql", "--storage", url, "select 1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot be reached" in err and "\n" not in err


def test_bad_storage_options_are_one_line(endpoint, monkeypatch):
    monkeypatch.setenv("NWH_STORAGE_OPTIONS", "{not json")
    with pytest.raises(UserError, match="NWH_STORAGE_OPTIONS"):
        Storage(f"s3://{servers.BUCKET}/w")


def test_accumulator_state_round_trip(s3_url):
    import torch

    from pipeline.kernels.accumulators import NeuronMoments, load_states, save_states

    x = np.random.default_rng(3).normal(2.0, 1.0, (50, 4)).astype(np.float32)
    m = NeuronMoments(4, 0.5)
    m.update(torch.from_numpy(x))
    path = Storage(s3_url).run_dir("r") / "state" / "moments-000000000050.npz"
    save_states(path, {0: m})
    back, _ = load_states(path, [0])
    for k, v in m.columns().items():
        assert np.array_equal(back[0].columns()[k], v), k
    assert np.array_equal(back[0].columns()["active_count"], (x > 0.5).sum(0))


def test_any_fsspec_url_memory(tmp_path):
    """Another fsspec filesystem than S3 (memory://, synchronous, no listings cache): tables,
    arrays and SQL over its views."""
    storage = Storage(f"memory://wh-{uuid.uuid4().hex[:8]}")
    assert not storage.is_local
    storage.ensure_writable()
    tables.write_part(storage, "neurons", "r", neurons(2, 3))
    group = arrays.open_group(storage.arrays("r"))
    mask = np.arange(12, dtype=np.uint8).reshape(6, 2)
    arrays.write_rows(arrays.ensure_rows_array(group, "active/L0", width=2, dtype="uint8",
                                               chunk_rows=4, compress=False), 0, mask)
    np.testing.assert_array_equal(arrays.open_group(storage.arrays("r"), "r")["active/L0"][:], mask)
    got = warehouse.query_frame(storage, "select layer, count(*) n from neurons group by layer "
                                         "order by layer")
    assert got.rows() == [(0, 3), (1, 3)]
    with pytest.raises(UserError, match="refused"):
        warehouse.query_frame(storage, "select * from read_csv('/etc/passwd')")


def test_parquet_readers_of_other_stages(s3_url):
    """tables.read_parquet (columns) and tables.scan_parquet, for stages and figures that read
    one file: the same rows as written."""
    storage = Storage(s3_url)
    data = neurons(2, 3)
    path = tables.write_part(storage, "neurons", "r", data)
    assert tables.read_parquet(path, columns=["layer"]).column_names == ["layer"]
    frame = tables.scan_parquet(path).filter(pl_col("layer") == 1).collect()
    assert frame["neuron_id"].to_list() == [3, 4, 5]


def pl_col(name: str):
    import polars as pl

    return pl.col(name)


def test_extract_on_s3_equals_local(extracted, s3_url, micro_model_dir, corpus_file):
    """The extraction itself on an S3 root: the same tables and masks as on a local root."""
    remote = coact_tests.extract_run(s3_url, micro_model_dir, corpus_file, RUN)
    local = Storage(extracted)
    order = {"tokens": "row", "neurons": "neuron_id", "neuron_stats": "neuron_id", "runs": "model"}
    for table, key in order.items():
        want = tables.read_partition(local, table, RUN)
        timings = [c for c in ("finished_at", "seconds") if c in want.column_names]
        got = tables.read_partition(remote, table, RUN).drop(timings).sort_by(key)
        assert got.equals(want.drop(timings).sort_by(key)) and got.num_rows > 0, table
    masks = coact_tests.stored_masks(local, RUN)
    group = arrays.open_group(remote.arrays(RUN), mode="r")
    for layer, mask in masks.items():
        np.testing.assert_array_equal(arrays.unpack_mask(group[f"active/L{layer}"][:], 40), mask)
    assert read_json(remote.run_manifest(RUN))["status"] == "finished"


def test_storage_errors_are_told_apart():
    """Which failures are the store's: botocore's by class, S3's by code; another network's
    ConnectionError (a model hub's) and a local PermissionError are not."""
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    from pipeline.core.storage import remote_error_message

    root = "s3://b/p"
    assert "cannot be reached" in remote_error_message(
        EndpointConnectionError(endpoint_url="http://x"), root)
    assert "no credentials" in remote_error_message(NoCredentialsError(), root)
    try:
        try:
            raise FileNotFoundError("The specified bucket does not exist")
        except FileNotFoundError as inner:
            raise RuntimeError("zarr failed") from inner
    except RuntimeError as outer:
        assert "bucket does not exist" in remote_error_message(outer, root)
    assert "refused access" in remote_error_message(PermissionError("Access Denied"), root)
    assert remote_error_message(ConnectionError("huggingface.co unreachable"), root) is None
    assert remote_error_message(PermissionError(13, "Permission denied", "/x"), root) is None
