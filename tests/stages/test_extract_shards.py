"""Sharded extraction (--shard i/n): n shards, run one after another or interrupted and resumed,
give the tables, arrays and statistics of one unsharded run (the unsharded run is checked
against independent hooks in test_extract.py); refusals of mixed shardings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.core import arrays, tables
from pipeline.core.cluster import Shard, split_units, split_weighted
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, read_json
from pipeline.models.micro import save_random_llama
from pipeline.stages import extract as ex
from pipeline.stages.extract import ExtractConfig
from pipeline.stages.extract import run as extract

PROMPTS = ('prompts,number_of_new_tokens,num_samples\n"the value of",6,2\n"raise error",4,3\n'
           '"return a list",5,1\n"for x in",7,2\n"import os",3,2\n')
FLOAT_RTOL = 1e-12  # merged float64 sums differ from one pass only by summation order


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("micro-llama")
    save_random_llama(directory)
    return directory


def _corpus_config(model_dir, corpus, **kw):
    return ExtractConfig(**{**dict(model=str(model_dir), corpus=str(corpus), num_samples=22,
                                   max_length=16, batch_size=2, chunk_tokens=64,
                                   commit_seconds=0, store_acts=True, run="r", quiet=True), **kw})


def _prompt_config(model_dir, csv, **kw):
    return ExtractConfig(**{**dict(model=str(model_dir), prompts=str(csv), seed=3, top_k=20,
                                   chunk_tokens=8, commit_seconds=0, store_acts=True, run="r",
                                   quiet=True), **kw})


def _read(storage: Storage, table: str) -> dict:
    parts = sorted(storage.table_partition(table, "r").glob("*.parquet"))
    return pq.read_table(parts, schema=tables.schema(table)).to_pydict() if parts else {}


def _row_arrays(storage: Storage) -> dict[str, np.ndarray]:
    group = arrays.open_group(storage.arrays("r"), mode="r")
    out = {arrays.INCLUDED: group[arrays.INCLUDED][:]}
    for kind in arrays.ROW_KINDS:
        if kind in group:
            out.update({f"{kind}/{name}": a[:] for name, a in group[kind].arrays()})
    return out


def _assert_same_run(storage: Storage, ref: Storage) -> None:
    tokens, ref_tokens = _read(storage, "tokens"), _read(ref, "tokens")
    assert tokens == ref_tokens
    got, want = _row_arrays(storage), _row_arrays(ref)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert np.array_equal(got[name], want[name]), name
    for table in ("neuron_stats", "sign_stats", "sign_examples", "neurons"):
        a, b = _read(storage, table), _read(ref, table)
        assert a.keys() == b.keys(), table
        for column in b:
            x, y = np.asarray(a[column]), np.asarray(b[column])
            if x.dtype.kind == "f":
                np.testing.assert_allclose(x, y, rtol=FLOAT_RTOL, atol=1e-300,
                                           err_msg=f"{table}.{column}")
            else:
                assert np.array_equal(x, y), f"{table}.{column}"
    run, ref_run = _read(storage, "runs"), _read(ref, "runs")
    for column in ("num_rows", "num_samples", "num_neurons", "num_included"):
        assert run[column] == ref_run[column], column
    manifest = read_json(storage.run_manifest("r"))
    assert manifest["status"] == "finished"
    assert manifest["rows"] == read_json(ref.run_manifest("r"))["rows"]
    leftovers = [p for p in storage.run_dir("r").rglob("*")
                 if p.name.startswith(".") or p.parent.name in ("state", "edges")]
    assert not leftovers, leftovers


def _run_shards(config: ExtractConfig, storage: Storage, n: int, order=None) -> list:
    results = []
    for i in order or range(n):
        results.append(extract(dataclasses.replace(config, shard=f"{i}/{n}"), storage))
    return results


def test_split_units_is_even_aligned_and_covers_everything():
    for units in range(0, 40):
        for count in range(1, 6):
            for align in (1, 3, 4):
                slices = split_units(units, count, align)
                assert slices[0][0] == 0 and slices[-1][1] == units
                assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
                assert all(stop % align == 0 for _, stop in slices[:-1])
                groups = [-(-(b - a) // align) for a, b in slices]
                assert max(groups) - min(groups) <= 1


def test_split_weighted_balances_rows():
    weights = [5, 1, 1, 9, 2, 2, 2, 8]
    for count in range(1, 10):
        slices = split_weighted(weights, count)
        assert slices[0][0] == 0 and slices[-1][1] == len(weights)
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        sums = [sum(weights[a:b]) for a, b in slices]
        assert max(sums) <= sum(weights) / count + max(weights)


@pytest.mark.parametrize("text", ["2/2", "1", "a/3", "-1/3", "0/0"])
def test_bad_shard_is_refused(text, micro_model_dir, corpus_file):
    with pytest.raises(UserError, match="--shard"):
        _corpus_config(micro_model_dir, corpus_file, shard=text)
    assert Shard.parse("2/3") == Shard(2, 3)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_corpus_shards_equal_one_run(tmp_path, micro_model_dir, corpus_file, n):
    ref = Storage(tmp_path / "ref")
    extract(_corpus_config(micro_model_dir, corpus_file), ref)
    storage = Storage(tmp_path / f"n{n}")
    # shards in any order: the last one to finish finishes the run
    results = _run_shards(_corpus_config(micro_model_dir, corpus_file), storage, n,
                          order=list(reversed(range(n))))
    assert all(r.waiting for r in results[:-1]) and not results[-1].waiting
    spans = read_json(storage.run_manifest("r"))["timings"]["shards"]
    assert sum(s["rows"] for s in spans) == 22 * 16
    _assert_same_run(storage, ref)
    # a finished run is skipped, sharded or not
    again = extract(_corpus_config(micro_model_dir, corpus_file), storage)
    assert again.skipped


def test_corpus_shorter_than_the_planned_windows(tmp_path, micro_model_dir, corpus_file):
    # far more windows asked than the corpus holds: later shards find nothing
    config = _corpus_config(micro_model_dir, corpus_file, num_samples=4000, max_length=64,
                            store_acts=False, chunk_tokens=256)
    ref = Storage(tmp_path / "ref")
    extract(config, ref)
    rows = read_json(ref.run_manifest("r"))["rows"]
    assert rows < 4000 * 64
    storage = Storage(tmp_path / "sharded")
    _run_shards(config, storage, 3)
    _assert_same_run(storage, ref)


@pytest.mark.parametrize("n", [2, 3])
def test_prompt_shards_of_a_gated_model_equal_one_run(tmp_path, llama_dir, n):
    # prompts split by rows, not at chunk boundaries: shared chunks go through edge files;
    # a gated model also merges sign statistics and their examples
    csv = tmp_path / "p.csv"
    csv.write_text(PROMPTS)
    ref = Storage(tmp_path / "ref")
    extract(_prompt_config(llama_dir, csv, sign_examples=3), ref)
    storage = Storage(tmp_path / "sharded")
    _run_shards(_prompt_config(llama_dir, csv, sign_examples=3), storage, n)
    _assert_same_run(storage, ref)


class Interrupted(Exception):
    pass


def test_interrupted_shard_resumes_to_the_same_run(tmp_path, micro_model_dir, corpus_file,
                                                   monkeypatch):
    config = _corpus_config(micro_model_dir, corpus_file)
    ref = Storage(tmp_path / "ref")
    extract(config, ref)
    storage = Storage(tmp_path / "crash")
    extract(dataclasses.replace(config, shard="0/2"), storage)
    real_write_part = tables.write_part
    calls = {"n": 0}

    def failing(storage_, table, run_id, data, part="part-0"):
        real_write_part(storage_, table, run_id, data, part)  # rows written, manifest not
        if table == "tokens":
            calls["n"] += 1
            if calls["n"] == 2:
                raise Interrupted

    monkeypatch.setattr(ex.tables, "write_part", failing)
    with pytest.raises(Interrupted):
        extract(dataclasses.replace(config, shard="1/2"), storage)
    monkeypatch.setattr(ex.tables, "write_part", real_write_part)
    shard = read_json(ex.shard_dir(storage, "r", Shard(1, 2)) / "shard.json")
    assert shard["status"] == "running" and shard["committed"]["rows"] == shard["rows"][0] + 64
    # a plain run names the shards left to do
    with pytest.raises(UserError, match="shards 1 are not finished"):
        extract(config, storage)
    result = extract(dataclasses.replace(config, shard="1/2"), storage)
    assert not result.waiting
    _assert_same_run(storage, ref)


def test_mixed_shardings_are_refused(tmp_path, micro_model_dir, corpus_file):
    config = _corpus_config(micro_model_dir, corpus_file)
    storage = Storage(tmp_path / "s")
    extract(dataclasses.replace(config, shard="0/3"), storage)
    with pytest.raises(UserError, match="split into 3 shards: --shard I/3"):
        extract(dataclasses.replace(config, shard="0/2"), storage)
    with pytest.raises(UserError, match="--overwrite with --shard"):
        dataclasses.replace(config, shard="1/3", overwrite=True)
    with pytest.raises(UserError, match="--ray needs --shards"):
        dataclasses.replace(config, ray="local")
    with pytest.raises(UserError, match="needs --ray"):
        dataclasses.replace(config, shards=2)
    # --overwrite without --shard starts the run again, unsharded
    extract(dataclasses.replace(config, overwrite=True), storage)
    assert "shards" not in read_json(storage.run_manifest("r"))


def test_cli_shard_dry_run_and_messages(tmp_path, micro_model_dir, corpus_file, capsys):
    args = ["extract", "--model", str(micro_model_dir), "--corpus", str(corpus_file),
            "--num-samples", "8", "--max-length", "16", "--batch-size", "2", "--chunk-tokens",
            "32", "--run", "r", "--quiet", "--storage", str(tmp_path / "s")]
    assert main([*args, "--shard", "1/2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "shard        1/2: units 2..3, rows 64..127" in out
    assert main([*args, "--shard", "0/2"]) == 0
    assert "finished by the last of shards 1" in capsys.readouterr().out
    assert main([*args, "--shard", "1/2"]) == 0
    assert "128 token rows" in capsys.readouterr().out
    assert main([*args, "--shard", "3/2"]) == 2
