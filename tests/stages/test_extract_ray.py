"""nwh extract --ray --shards N on a local Ray cluster: the merged run equals an unsharded one,
also when a worker is killed mid-shard (Ray retries the task, which resumes its last commit)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from pipeline.core.cluster import Shard
from pipeline.core.storage import Storage, read_json
from pipeline.models.micro import WORDS
from pipeline.stages import extract as ex
from pipeline.stages.extract import ExtractConfig
from pipeline.stages.extract import run as extract

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")

from test_extract_shards import _assert_same_run  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    rng = random.Random(7)
    path = tmp_path_factory.mktemp("big-corpus") / "docs.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))
                                for _ in range(900)))
    return path


def _config(model_dir, corpus, **kw):
    return ExtractConfig(**{**dict(model=str(model_dir), corpus=str(corpus), num_samples=200,
                                   max_length=32, batch_size=2, chunk_tokens=64,
                                   commit_seconds=0, run="r", quiet=True), **kw})


def test_ray_shards_equal_one_run(tmp_path, cluster, micro_model_dir, big_corpus):
    ref = Storage(tmp_path / "ref")
    extract(_config(micro_model_dir, big_corpus, num_samples=64, store_acts=True), ref)
    storage = Storage(tmp_path / "ray")
    result = extract(_config(micro_model_dir, big_corpus, num_samples=64, store_acts=True,
                             ray="local", shards=3), storage)
    assert result.manifest["shards"] == 3
    hosts = {s["shard"]: s for s in result.manifest["timings"]["shards"]}
    assert sorted(hosts) == [0, 1, 2]
    _assert_same_run(storage, ref)
    assert "3 shards" in ex.show(result)


def test_killed_worker_is_retried_and_resumes(tmp_path, cluster, micro_model_dir, big_corpus):
    ref = Storage(tmp_path / "ref")
    extract(_config(micro_model_dir, big_corpus), ref)
    storage = Storage(tmp_path / "killed")
    config = _config(micro_model_dir, big_corpus, ray="local", shards=2)
    outcome: dict = {}

    def drive():
        try:
            outcome["result"] = extract(config, storage)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = e

    driver = threading.Thread(target=drive)
    driver.start()
    manifest = ex.shard_dir(storage, "r", Shard(1, 2)) / "shard.json"
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and driver.is_alive():
        try:
            shard = read_json(manifest)
        except (OSError, ValueError):
            time.sleep(0.01)
            continue
        done = shard["committed"]["rows"] - shard["rows"][0]
        if 0 < done < shard["rows"][1] - shard["rows"][0] and shard["status"] == "running":
            killed = (shard["pid"], done)
            os.kill(shard["pid"], signal.SIGKILL)  # mid-shard, after a commit
        time.sleep(0.01)
    driver.join(300)
    assert killed is not None, "the shard finished before it could be killed"
    assert "error" not in outcome, outcome.get("error")
    final = read_json(manifest)
    assert final["status"] == "finished" and final["pid"] != killed[0]  # a new worker finished
    _assert_same_run(storage, ref)
