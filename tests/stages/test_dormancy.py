"""Dormancy against the formula on activations captured by an independent forward hook; the
reference CSV log and where it goes; exact table parts; the checkpoint sweep (a flow)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from reference import mlp_inputs

from pipeline import flows
from pipeline.core import tables
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, read_json, write_json
from pipeline.models.micro import save_random_gpt2
from pipeline.stages.dormancy import (
    LOG_COLUMNS,
    DormancyConfig,
    dormant_neurons,
    parse_step,
    read_log,
    show,
)
from pipeline.stages.dormancy import run as dormancy
from pipeline.stages.extract import ExtractConfig
from pipeline.stages.extract import run as extract

BATCH = 4


def hooked_acts(model_dir: Path, windows: np.ndarray) -> dict[int, np.ndarray]:
    """fp32 input of transformer.h.L.mlp.c_proj for every token, hooked on a fresh HF model."""
    return {l: a.astype(np.float64) for l, a in
            mlp_inputs(model_dir, windows, batch_size=BATCH).items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, micro_model_dir, corpus_file):
    """A finished run and its activations from an independent forward (never mutated)."""
    storage = Storage(tmp_path_factory.mktemp("dorm"))
    extract(ExtractConfig(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=10,
                          max_length=16, batch_size=BATCH, run="d", quiet=True), storage)
    t = tables.read_partition(storage, "tokens", "d").to_pydict()
    windows = np.array(t["token_id"], np.int64).reshape(10, 16)  # rows are sample-major
    assert t["position"] == list(range(16)) * 10
    return storage, hooked_acts(micro_model_dir, windows)


@pytest.fixture()
def fresh(run, tmp_path):
    """A copy of the module's warehouse for tests that write to it."""
    storage, acts = run
    shutil.copytree(storage.root, tmp_path / "wh")
    return Storage(tmp_path / "wh"), acts


def tau_reference(acts: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """(score, dormant) of DESIGN/README: score_i = mean|a_i| / (mean_k mean|a_k| + 1e-9)."""
    mean_abs = np.abs(acts).mean(0)
    score = mean_abs / (mean_abs.mean() + 1e-9)
    return score, score <= tau


@pytest.mark.parametrize("tau", [0.75, 0.95])
def test_tau_dormancy_equals_the_formula_on_hooked_activations(fresh, tmp_path, tau):
    storage, acts = fresh
    result = dormancy(DormancyConfig(run="d", threshold=tau, log_file=str(tmp_path / "l.csv")),
                      storage)
    flags = dormant_neurons(storage, "d", threshold=tau)
    for layer, a in acts.items():
        score, dormant = tau_reference(a, tau)
        # no neuron within float rounding of tau, so the flags are exact
        assert np.abs(score - tau).min() > 1e-6
        sql = flags.filter(pl.col("layer") == layer).sort("neuron")
        np.testing.assert_allclose(sql["score"].to_numpy(), score, rtol=1e-6)
        assert np.array_equal(sql["dormant"].to_numpy(), dormant)
        row = result.rows.filter(pl.col("layer") == layer).row(0, named=True)
        assert row["num_dormant"] == int(dormant.sum()) and row["num_neurons"] == 40
        assert row["pct_dormant"] == pytest.approx(100 * dormant.mean())
        assert row["avg_activation"] == pytest.approx(a.mean(), rel=1e-6)
        assert row["max_activation"] == pytest.approx(a.max(), rel=1e-6)
        assert row["site"] == f"transformer.h.{layer}.mlp.c_proj"
    assert 0 < result.rows["num_dormant"].sum() < 120  # the thresholds split the neurons


def test_never_active_and_max_abs_on_hooked_activations(run):
    storage, acts = run
    never = dormant_neurons(storage, "d", definition="never_active")
    eps = dormant_neurons(storage, "d", definition="max_abs", epsilon=0.05)
    for layer, a in acts.items():
        sel = pl.col("layer") == layer
        assert np.array_equal(never.filter(sel).sort("neuron")["dormant"].to_numpy(),
                              (a <= 0).all(0))
        max_abs = np.abs(a).max(0)
        assert np.abs(max_abs - 0.05).min() > 1e-6
        assert np.array_equal(eps.filter(sel).sort("neuron")["dormant"].to_numpy(), max_abs <= 0.05)


def test_thresholds_equal_to_six_digits_get_their_own_parts(fresh, tmp_path):
    storage, _ = fresh
    for tau in (0.1, 0.1000001):
        dormancy(DormancyConfig(run="d", threshold=tau, log_file=str(tmp_path / "l.csv")), storage)
    parts = sorted(p.name for p in storage.table_partition("dormancy", "d").glob("tau-0.1*"))
    assert parts == ["tau-0.1.parquet", "tau-0.1000001.parquet"]
    stored = tables.read_partition(storage, "dormancy", "d").to_pydict()
    assert {0.1, 0.1000001} <= set(stored["threshold"])


def test_rerun_reuses_the_stored_rows(fresh, tmp_path):
    storage, _ = fresh
    config = DormancyConfig(run="d", threshold=0.3, log_file=str(tmp_path / "l.csv"))
    first = dormancy(config, storage)
    part = storage.table_partition("dormancy", "d") / "tau-0.3.parquet"
    mtime = part.stat().st_mtime_ns
    again = dormancy(config, storage)
    assert again.skipped and "stored result" in show(again)
    assert part.stat().st_mtime_ns == mtime and again.rows.equals(first.rows)
    assert again.rows.schema == first.rows.schema  # stored and fresh rows: the declared types
    assert len(read_log(tmp_path / "l.csv")) == 2 * 3  # the log still gets this call's rows


def _synthetic(storage: Storage, mean_abs: list[float], run: str = "syn") -> None:
    """A finished run whose neuron_stats give these mean |a| (count 10, a >= 0)."""
    n = len(mean_abs)
    count = 10
    given = {"neuron_id": np.arange(n), "layer": np.zeros(n), "neuron": np.arange(n),
             "count": np.full(n, count), "sum": np.array(mean_abs) * count,
             "sum_abs": np.array(mean_abs) * count, "min": np.zeros(n),
             "max": np.array(mean_abs), "active_count": (np.array(mean_abs) > 0).astype(int)}
    # the moment columns play no part in dormancy
    cols = {k: given.get(k, np.zeros(n)) for k in tables.schema("neuron_stats").names}
    tables.write_part(storage, "neuron_stats", run, cols)
    tables.write_part(storage, "neurons", run, {
        "neuron_id": np.arange(n), "layer": np.zeros(n), "neuron": np.arange(n),
        "layer_offset": np.zeros(n), "layer_width": np.full(n, n), "expert": np.full(n, -1),
        "site": ["h.0.mlp.c_proj"] * n})
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


def test_a_neuron_no_row_reached_is_dormant_by_every_definition(tmp_path):
    """A mixture-of-experts neuron whose expert no token was routed to has count 0 (and the
    min/max of nothing, +inf/-inf): silent, not undefined."""
    storage = Storage(tmp_path)
    _synthetic(storage, [1.0, 2.0, 3.0])
    stats = tables.read_partition(storage, "neuron_stats", "syn").to_pydict()
    stats.pop("run_id", None)
    stats["count"][0], stats["sum_abs"][0], stats["sum"][0] = 0, 0.0, 0.0
    stats["min"][0], stats["max"][0], stats["active_count"][0] = np.inf, -np.inf, 0
    tables.write_part(storage, "neuron_stats", "syn", stats)
    for kw in ({"threshold": 0.1}, {"definition": "never_active"},
               {"definition": "max_abs", "epsilon": 1e-6}):
        assert dormant_neurons(storage, "syn", **kw)["dormant"].to_list() == [True, False, False]


def test_log_header_append_and_write(tmp_path):
    storage = Storage(tmp_path)
    _synthetic(storage, [0.1, 1.0, 2.0])
    log = tmp_path / "log.csv"
    for _ in range(2):
        dormancy(DormancyConfig(run="syn", log_file=str(log)), storage)
    lines = log.read_text().splitlines()
    assert lines[0] == ",".join(LOG_COLUMNS) and len(lines) == 3
    assert lines[1].split(",")[1:5] == ["syn", "step7", "7", "0.1"]
    # the reference header's layer_name, layer_index hold the table's site and layer
    assert lines[1].split(",")[5:8] == ["h.0.mlp.c_proj", "0", "3"]
    assert lines[1].split(",")[9] == "33.3333"  # pct with 4 decimals
    dormancy(DormancyConfig(run="syn", log_file=str(log), log_mode="write"), storage)
    assert len(log.read_text().splitlines()) == 2
    assert read_log(log)["step"].to_list() == [7]


def test_default_log_goes_under_the_storage_reports(tmp_path, monkeypatch):
    storage = Storage(tmp_path / "s")
    _synthetic(storage, [0.1, 1.0])
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    result = dormancy(DormancyConfig(run="syn"), storage)
    assert os.listdir(cwd) == []
    assert result.log_file.parent == tmp_path / "s" / "reports" / "syn"
    assert result.log_file.name.startswith("dormancy_results_syn_") and result.log_file.exists()
    assert str(result.log_file) in show(result)


def test_parse_step():
    assert parse_step("step1000") == 1000 and parse_step("main") is None and parse_step(None) is None


@pytest.mark.parametrize("kw", [dict(threshold=-0.1), dict(definition="sleepy"),
                                dict(log_mode="replace"), dict(epsilon=-1.0)])
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
    storage = Storage(tmp_path / "s")
    config = flows.SweepConfig(model=str(root), corpus=str(corpus_file), num_samples=4,
                               max_length=16, dtype="float32", log_file=str(log), quiet=True)
    result = flows.run_sweep(config, storage)
    assert result.rows["step"].to_list() == [0, 0, 5, 5]
    logged = read_log(log)
    assert logged.height == 4 and logged["revision"].to_list() == ["step0"] * 2 + ["step5"] * 2
    for run_id, revision in zip(result.runs, ("step0", "step5")):
        manifest = read_json(storage.run_manifest(run_id))
        assert manifest["model"]["revision"] == revision
        assert manifest["config"]["dtype"] == "float32" and manifest["resolved"]["dtype"] == "float32"
    again = flows.run_sweep(config, storage)  # every stage skips its finished work
    assert again.rows.equals(result.rows)


def test_sweep_refuses_an_unknown_revision_before_any_extraction(tmp_path, corpus_file):
    root = tmp_path / "model"
    for seed, rev in ((0, "step0"), (1, "step5")):
        save_random_gpt2(root / rev, seed=seed, n_layer=2, d_mlp=24)
    storage = Storage(tmp_path / "s")
    config = flows.SweepConfig(model=str(root), corpus=str(corpus_file), num_samples=4,
                               max_length=16, revisions="step0 step9", quiet=True)
    with pytest.raises(UserError, match="step9"):
        flows.run_sweep(config, storage)
    assert storage.list_runs() == []  # step0 was not extracted first


def test_sweep_config_validates():
    with pytest.raises(UserError):
        flows.SweepConfig(model="m", definition="sleepy")
    with pytest.raises(UserError):
        flows.SweepConfig(model="m", num_samples=0)
