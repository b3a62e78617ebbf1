"""Dormancy against NumPy on dense activations; the reference CSV log; the checkpoint sweep."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pipeline.core import arrays, tables
from pipeline.stages.dormancy import (
    LOG_COLUMNS,
    DormancyConfig,
    SweepConfig,
    dormancy,
    dormancy_sweep,
    dormant_neurons,
    parse_step,
    read_log,
)
from pipeline.core.errors import UserError
from pipeline.stages.extract import ExtractConfig, extract
from pipeline.models.micro import save_random_gpt2
from pipeline.core.storage import Storage, write_json


@pytest.fixture(scope="module")
def run(tmp_path_factory, micro_model_dir, corpus_file):
    storage = Storage(tmp_path_factory.mktemp("dorm"))
    extract(ExtractConfig(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=10,
                          max_length=16, store_acts=True, run="d"), storage, progress=False)
    acts = arrays.open_group(storage.arrays("d"), mode="r")
    return storage, {l: acts[f"acts/L{l}"][:] for l in range(3)}


def test_tau_dormancy_equals_numpy(run, tmp_path):
    storage, _ = run
    stats = tables.read_partition(storage, "neuron_stats", "d").to_pydict()
    rows, _ = dormancy(DormancyConfig(run="d", threshold=0.5, log_file=str(tmp_path / "l.csv")),
                       storage)
    for layer in range(3):
        sel = np.array(stats["layer"]) == layer
        mean_abs = np.array(stats["sum_abs"])[sel] / np.array(stats["count"])[sel]
        score = mean_abs / (mean_abs.mean() + 1e-9)
        row = rows.filter(pl.col("layer_index") == layer).row(0, named=True)
        assert row["num_dormant"] == int((score <= 0.5).sum())
        assert row["num_neurons"] == 40
        assert row["pct_dormant"] == pytest.approx(100 * (score <= 0.5).mean())
        total = np.array(stats["sum"])[sel].sum() / np.array(stats["count"])[sel].sum()
        assert row["avg_activation"] == pytest.approx(total)
        assert row["max_activation"] == pytest.approx(np.array(stats["max"])[sel].max())


def test_tau_on_dense_fp16_activations(run):
    """The formula on the stored dense activations agrees with the SQL flags (score margins)."""
    storage, acts = run
    flags = dormant_neurons(storage, "d", threshold=0.8)
    for layer, a in acts.items():
        mean_abs = np.abs(a.astype(np.float64)).mean(0)
        score = mean_abs / (mean_abs.mean() + 1e-9)
        sql = flags.filter(pl.col("layer") == layer)
        np.testing.assert_allclose(sql["score"].to_numpy(), score, rtol=5e-3)
        clear = np.abs(score - 0.8) > 0.01  # fp16 storage can flip neurons within a hair of tau
        assert np.array_equal(sql["dormant"].to_numpy()[clear], (score <= 0.8)[clear])


def _synthetic(storage: Storage, mean_abs: list[float], run: str = "syn") -> None:
    n = len(mean_abs)
    count = 10
    cols = {"neuron_id": np.arange(n), "layer": np.zeros(n), "neuron": np.arange(n),
            "count": np.full(n, count), "sum": np.array(mean_abs) * count,
            "sum_sq": np.zeros(n), "sum_abs": np.array(mean_abs) * count,
            "sum_cube": np.zeros(n), "sum_quad": np.zeros(n), "min": np.zeros(n),
            "max": np.array(mean_abs), "active_count": (np.array(mean_abs) > 0).astype(int)}
    tables.write_part(storage, "neuron_stats", run, cols)
    tables.write_part(storage, "neurons", run, {
        "neuron_id": np.arange(n), "layer": np.zeros(n), "neuron": np.arange(n),
        "layer_offset": np.zeros(n), "layer_width": np.full(n, n), "site": ["h.0.mlp.c_proj"] * n})
    write_json(storage.run_manifest(run), {"status": "finished", "rows": count, "model": {
        "name": "syn", "revision": "step7", "layers": [0], "widths": [n]}})


def test_boundary_is_inclusive(tmp_path):
    storage = Storage(tmp_path)
    # layer mean of mean|a| is 1.0 (+1e-9): neuron 0 scores 0.25 - tiny, neuron 1 just above
    _synthetic(storage, [0.25, 0.2500001, 1.0, 2.4999999])
    flags = dormant_neurons(storage, "syn", threshold=0.25)["dormant"].to_list()
    assert flags == [True, False, False, False]
    flags = dormant_neurons(storage, "syn", definition="never_active")["dormant"].to_list()
    assert flags == [False] * 4
    _synthetic(storage, [0.0, 1e-7, 1.0], run="syn2")
    assert dormant_neurons(storage, "syn2", definition="never_active")["dormant"].to_list() == [True, False, False]
    assert dormant_neurons(storage, "syn2", definition="max_abs", epsilon=1e-6)["dormant"].to_list() == [True, True, False]


def test_log_header_append_and_write(tmp_path):
    storage = Storage(tmp_path)
    _synthetic(storage, [0.1, 1.0, 2.0])
    log = tmp_path / "log.csv"
    for _ in range(2):
        dormancy(DormancyConfig(run="syn", log_file=str(log)), storage)
    lines = log.read_text().splitlines()
    assert lines[0] == ",".join(LOG_COLUMNS) and len(lines) == 3
    assert lines[1].split(",")[1:5] == ["syn", "step7", "7", "0.1"]
    assert lines[1].split(",")[9] == "33.3333"  # pct with 4 decimals
    dormancy(DormancyConfig(run="syn", log_file=str(log), log_mode="write"), storage)
    assert len(log.read_text().splitlines()) == 2
    assert read_log(log)["step"].to_list() == [7]


def test_auto_log_name(tmp_path, monkeypatch):
    storage = Storage(tmp_path / "s")
    _synthetic(storage, [0.1, 1.0])
    monkeypatch.chdir(tmp_path)
    _, path = dormancy(DormancyConfig(run="syn"), storage)
    assert path.name.startswith("dormancy_results_syn_") and path.exists()


def test_parse_step():
    assert parse_step("step1000") == 1000 and parse_step("main") is None and parse_step(None) is None


@pytest.mark.parametrize("kw", [dict(threshold=-0.1), dict(definition="sleepy"),
                                dict(log_mode="replace")])
def test_bad_config(kw):
    with pytest.raises(UserError):
        DormancyConfig(run="x", **kw)


def test_unknown_run(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        dormancy(DormancyConfig(run="nope"), Storage(tmp_path))


def test_sweep_over_local_revisions(tmp_path, corpus_file):
    root = tmp_path / "model"
    for seed, rev in ((0, "step0"), (1, "step5")):
        save_random_gpt2(root / rev, seed=seed, n_layer=2, d_mlp=24)
    log = tmp_path / "sweep.csv"
    rows, _ = dormancy_sweep(SweepConfig(model=str(root), corpus=str(corpus_file), num_samples=4,
                                         max_length=16, log_file=str(log)),
                             Storage(tmp_path / "s"), progress=False)
    assert rows["step"].to_list() == [0, 0, 5, 5]
    logged = read_log(log)
    assert logged.height == 4 and logged["revision"].to_list() == ["step0"] * 2 + ["step5"] * 2
