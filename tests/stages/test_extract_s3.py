"""Extraction on an s3:// root (a local moto server on 127.0.0.1): a kill -9 mid-commit resumes
to the run of a local root, --overwrite leaves no object of the old run, shards run one after
another and as Ray tasks (with a killed worker) give the local unsharded run."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"{path.stem}_helpers", path)
    spec.loader.exec_module(module := importlib.util.module_from_spec(spec))
    return module


servers = _load(HERE.parent / "s3_server.py")
if servers.missing_packages():
    pytest.skip(f"object storage needs {', '.join(servers.missing_packages())}",
                allow_module_level=True)

from pipeline.core import arrays, tables  # noqa: E402
from pipeline.core.cluster import Shard  # noqa: E402
from pipeline.core.storage import Storage, read_json  # noqa: E402
from pipeline.stages import extract as ex  # noqa: E402
from pipeline.stages.extract import ExtractConfig  # noqa: E402
from pipeline.stages.extract import run as extract  # noqa: E402

shards_tests = _load(HERE / "test_extract_shards.py")
extract_tests = _load(HERE / "test_extract.py")


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    cache = tmp_path_factory.mktemp("nwh-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NWH_CACHE", str(cache))
        mp.delenv("NWH_STORAGE_OPTIONS", raising=False)
        with servers.s3_server() as url:
            yield url


@pytest.fixture()
def s3_url(endpoint) -> str:
    return f"s3://{servers.BUCKET}/{uuid.uuid4().hex[:10]}"


def _same(remote: Storage, local: Storage, run: str) -> None:
    """Every table row and array byte of a run on both roots."""
    for table in ("tokens", "neuron_stats", "neurons"):
        key = "row" if table == "tokens" else "neuron_id"
        got = tables.read_partition(remote, table, run).sort_by(key)
        want = tables.read_partition(local, table, run).sort_by(key)
        if table == "neuron_stats":
            for name in want.column_names:
                np.testing.assert_allclose(got[name].to_numpy(), want[name].to_numpy(),
                                           rtol=shards_tests.FLOAT_RTOL, err_msg=name)
        else:
            assert got.equals(want) and want.num_rows, table
    a = arrays.open_group(remote.arrays(run), mode="r")
    b = arrays.open_group(local.arrays(run), mode="r")
    for kind in ("active", "acts"):
        if kind in b:
            for name, array in b[kind].arrays():
                assert np.array_equal(a[f"{kind}/{name}"][:], array[:]), f"{kind}/{name}"
    assert read_json(remote.run_manifest(run))["status"] == "finished"


def test_kill_9_mid_commit_on_s3_resumes_exactly(tmp_path, s3_url, micro_model_dir,
                                                 corpus_file):
    args = ["extract", "--model", str(micro_model_dir), "--corpus", str(corpus_file),
            "--num-samples", "12", "--max-length", "16", "--batch-size", "1",
            "--chunk-tokens", "16", "--commit-seconds", "0", "--run", "k", "--quiet",
            "--store-acts"]
    local = Storage(tmp_path / "ref")
    subprocess.run([sys.executable, "-m", "pipeline", *args, "--storage", str(local.root)],
                   check=True, capture_output=True)
    script = tmp_path / "kill_at_commit.py"
    script.write_text(extract_tests.KILL_AT_COMMIT)
    env = {**os.environ, "KILL_AT": "4"}
    proc = subprocess.run([sys.executable, str(script), *args, "--storage", s3_url], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    remote = Storage(s3_url)
    m = read_json(remote.run_manifest("k"))
    assert m["status"] == "running" and m["committed"]["rows"] == 3 * 16
    out = subprocess.run([sys.executable, "-m", "pipeline", *args, "--storage", s3_url],
                         check=True, capture_output=True, text=True)
    assert "12 sequences" in out.stdout
    _same(remote, local, "k")


def test_overwrite_on_s3_leaves_nothing_of_the_old_run(s3_url, micro_model_dir, corpus_file):
    config = ExtractConfig(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=8,
                           max_length=16, batch_size=2, store_acts=True, run="o", quiet=True)
    remote = Storage(s3_url)
    extract(config, remote)
    extract(dataclasses.replace(config, store_acts=False, overwrite=True), remote)
    group = arrays.open_group(remote.arrays("o"), mode="r")
    assert "acts" not in group
    assert not list(remote.arrays("o").glob("acts/**"))
    assert not list((remote.run_dir("o") / "state").glob("*"))


def test_shards_on_s3_equal_one_local_run(tmp_path, s3_url, micro_model_dir, corpus_file):
    config = shards_tests._corpus_config(micro_model_dir, corpus_file)
    local = Storage(tmp_path / "ref")
    extract(config, local)
    remote = Storage(s3_url)
    for i in (1, 0, 2):
        extract(dataclasses.replace(config, shard=f"{i}/3"), remote)
    _same(remote, local, "r")
    assert not list((remote.run_dir("r") / "shards").glob("*/state/*"))


def test_ray_shards_to_s3_with_a_killed_worker(tmp_path, s3_url, micro_model_dir, corpus_file):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
    config = shards_tests._corpus_config(micro_model_dir, corpus_file, num_samples=64,
                                         store_acts=False, chunk_tokens=64)
    local = Storage(tmp_path / "ref")
    extract(config, local)
    remote = Storage(s3_url)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # workers inherit the driver's environment: the endpoint and the local cache
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outcome: dict = {}
        driver = threading.Thread(target=lambda: outcome.update(
            result=extract(dataclasses.replace(config, ray="local", shards=2), remote)))
        driver.start()
        shard_manifest = ex.shard_dir(remote, "r", Shard(0, 2)) / "shard.json"
        killed, deadline = None, time.monotonic() + 120
        while killed is None and driver.is_alive() and time.monotonic() < deadline:
            try:
                s = read_json(shard_manifest)
            except (OSError, ValueError):
                time.sleep(0.02)
                continue
            if s["status"] == "running" and 0 < s["committed"]["rows"] < s["rows"][1]:
                killed = s["pid"]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.02)
        driver.join(300)
    finally:
        ray.shutdown()
    assert killed is not None, "the shard finished before it could be killed"
    assert "result" in outcome
    assert read_json(shard_manifest)["pid"] != killed
    _same(remote, local, "r")
