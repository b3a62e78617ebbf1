"""Dormancy against NumPy on dense activations; the reference CSV log; the checkpoint sweep."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pipeline import arrays, tables
from pipeline.cli import main
from pipeline.dormancy import (
    LOG_COLUMNS,
    DormancyConfig,
    SweepConfig,
    dormancy,
    dormancy_sweep,
    dormant_neurons,
    parse_step,
    read_log,
    sweep_revisions,
)
from pipeline.errors import UserError
from pipeline.extract import ExtractConfig, extract
from pipeline.micro import save_random_gpt2
from pipeline.storage import Storage, write_json
from pipeline.warehouse import connect


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
    sites = tables.read_partition(storage, "neurons", "d").to_pydict()
    rows, _ = dormancy(DormancyConfig(run="d", threshold=0.5, log_file=str(tmp_path / "l.csv")),
                       storage)
    assert rows["layer_index"].to_list() == [0, 1, 2]
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
        site = {s for s, l in zip(sites["site"], sites["layer"]) if l == layer}
        assert {row["layer_name"]} == site and row["layer_name"].endswith(f"h.{layer}.mlp.c_proj")


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
        assert clear.sum() >= 30  # the comparison is not vacuous


def test_other_definitions_on_dense_activations(run):
    storage, acts = run
    never = dormant_neurons(storage, "d", definition="never_active")
    eps = 0.05
    small = dormant_neurons(storage, "d", definition="max_abs", epsilon=eps)
    for layer, a in acts.items():
        x = a.astype(np.float64)
        sel = pl.col("layer") == layer
        assert never.filter(sel)["dormant"].to_list() == (~(x > 0).any(0)).tolist()
        max_abs = np.abs(x).max(0)
        clear = np.abs(max_abs - eps) > 1e-3
        assert np.array_equal(small.filter(sel)["dormant"].to_numpy()[clear], (max_abs <= eps)[clear])


def _synthetic(storage: Storage, mean_abs: list[float], run: str = "syn", *,
               revision: str | None = "step7", mins: list[float] | None = None) -> None:
    """A finished run of one layer whose neuron i has mean |a| = mean_abs[i] (count 8, exact)."""
    n, count = len(mean_abs), 8
    m = np.array(mean_abs, dtype=np.float64)
    cols = {"neuron_id": np.arange(n), "layer": np.zeros(n), "neuron": np.arange(n),
            "count": np.full(n, count), "sum": m * count, "sum_sq": np.zeros(n),
            "sum_abs": m * count, "sum_cube": np.zeros(n), "sum_quad": np.zeros(n),
            "min": np.array(mins) if mins is not None else np.zeros(n), "max": m,
            "active_count": (m > 0).astype(int)}
    tables.write_part(storage, "neuron_stats", run, cols)
    tables.write_part(storage, "neurons", run, {
        "neuron_id": np.arange(n), "layer": np.zeros(n), "neuron": np.arange(n),
        "layer_offset": np.zeros(n), "layer_width": np.full(n, n), "site": ["h.0.mlp.c_proj"] * n})
    write_json(storage.run_manifest(run), {
        "status": "finished", "rows": count, "config": {"active_threshold": 0.0},
        "model": {"name": "org/syn", "revision": revision, "layers": [0], "widths": [n]}})


def test_boundary_is_inclusive(tmp_path):
    storage = Storage(tmp_path)
    d = 2.0 ** -40  # exact in binary: the layer mean of mean|a| is exactly 1.0
    _synthetic(storage, [0.25, 0.25 + d, 1.0, 2.5 - d])
    tau = 0.25 / (1.0 + 1e-9)  # neuron 0's score, bit for bit
    flags = dormant_neurons(storage, "syn", threshold=tau)
    assert flags["score"][0] == tau and flags["score"][1] > tau
    assert flags["dormant"].to_list() == [True, False, False, False]
    below = dormant_neurons(storage, "syn", threshold=float(np.nextafter(tau, 0)))
    assert below["dormant"].to_list() == [False] * 4
    assert dormant_neurons(storage, "syn", definition="never_active")["dormant"].to_list() == [False] * 4


def test_never_active_and_max_abs_boundaries(tmp_path):
    storage = Storage(tmp_path)
    # max |a| = greatest(|min|, |max|): neuron 2 has a large negative min
    _synthetic(storage, [0.0, 1e-6, 1e-6, 1.0], mins=[0.0, 0.0, -0.5, 0.0])
    assert dormant_neurons(storage, "syn", definition="never_active")["dormant"].to_list() == \
        [True, False, False, False]
    assert dormant_neurons(storage, "syn", definition="max_abs", epsilon=1e-6)["dormant"].to_list() == \
        [True, True, False, False]
    assert dormant_neurons(storage, "syn", definition="max_abs", epsilon=0.0)["dormant"].to_list() == \
        [True, False, False, False]


def test_warehouse_table_per_definition(tmp_path):
    storage = Storage(tmp_path)
    _synthetic(storage, [0.1, 1.0, 2.0])
    log = str(tmp_path / "l.csv")
    for definition in ("tau", "never_active", "max_abs", "tau"):
        dormancy(DormancyConfig(run="syn", definition=definition, log_file=log), storage)
    con = connect(storage)
    got = con.sql("select definition, threshold, num_dormant, run_id from dormancy "
                  "order by definition").fetchall()
    assert got == [("max_abs", 1e-6, 0, "syn"), ("never_active", 0.0, 0, "syn"),
                   ("tau", 0.1, 1, "syn")]  # a rerun replaces its own part


def test_log_header_append_and_write(tmp_path):
    storage = Storage(tmp_path)
    _synthetic(storage, [0.1, 1.0, 2.0])
    log = tmp_path / "log.csv"
    for _ in range(2):
        dormancy(DormancyConfig(run="syn", log_file=str(log)), storage)
    lines = log.read_text().splitlines()
    assert lines[0] == ("timestamp,model,revision,step,threshold,layer_name,layer_index,"
                        "num_neurons,num_dormant,pct_dormant,avg_activation,max_activation")
    assert lines[0] == ",".join(LOG_COLUMNS) and len(lines) == 3
    fields = lines[1].split(",")
    assert fields[1:10] == ["org/syn", "step7", "7", "0.1", "h.0.mlp.c_proj", "0", "3", "1",
                            "33.3333"]
    assert fields[10:] == ["1.033333", "2.000000"]  # 6 decimals
    dormancy(DormancyConfig(run="syn", log_file=str(log), log_mode="write"), storage)
    assert len(log.read_text().splitlines()) == 2
    assert read_log(log)["step"].to_list() == [7]
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="another header"):
        dormancy(DormancyConfig(run="syn", log_file=str(other)), storage)
    assert other.read_text() == "a,b\n1,2\n"  # nothing lost


def test_unknown_revision_and_step_override(tmp_path):
    storage = Storage(tmp_path)
    _synthetic(storage, [0.5, 1.0], revision=None)
    log = tmp_path / "na.csv"
    rows, _ = dormancy(DormancyConfig(run="syn", log_file=str(log)), storage)
    assert rows["revision"].to_list() == ["N/A"] and rows["step"].to_list() == [None]
    assert log.read_text().splitlines()[1].split(",")[2:4] == ["N/A", "N/A"]
    rows, _ = dormancy(DormancyConfig(run="syn", log_file=str(log), revision="step3000"), storage)
    assert rows["step"].to_list() == [3000]
    rows, _ = dormancy(DormancyConfig(run="syn", log_file=str(log), revision="main", step=12),
                       storage)
    assert rows["revision"].to_list() == ["main"] and rows["step"].to_list() == [12]
    assert read_log(log)["step"].to_list() == [None, 3000, 12]


def test_auto_log_name(tmp_path, monkeypatch):
    storage = Storage(tmp_path / "s")
    _synthetic(storage, [0.1, 1.0])
    monkeypatch.chdir(tmp_path)
    _, path = dormancy(DormancyConfig(run="syn"), storage)
    assert path.name.startswith("dormancy_results_org_syn_") and path.suffix == ".csv"
    assert len(path.stem.removeprefix("dormancy_results_org_syn_")) == len("20250101_120000")
    assert path.exists()


def test_parse_step():
    assert parse_step("step1000") == 1000 and parse_step("step0") == 0
    assert parse_step("step143000") == 143000
    assert parse_step("main") is None and parse_step(None) is None and parse_step("step") is None


@pytest.mark.parametrize("kw, match", [
    (dict(threshold=-0.1), "--threshold"), (dict(threshold=float("nan")), "--threshold"),
    (dict(definition="sleepy"), "--definition"), (dict(log_mode="replace"), "--log-mode"),
    (dict(epsilon=-1.0), "--epsilon"), (dict(run="../x"), "run id"),
])
def test_bad_config(kw, match):
    with pytest.raises(UserError, match=match) as err:
        DormancyConfig(**{"run": "x", **kw})
    assert "\n" not in str(err.value)


def test_unknown_run(tmp_path):
    with pytest.raises(UserError, match="does not exist") as err:
        dormancy(DormancyConfig(run="nope"), Storage(tmp_path))
    assert "\n" not in str(err.value)


def test_cli(tmp_path, capsys):
    storage = Storage(tmp_path / "s")
    _synthetic(storage, [0.1, 1.0, 2.0])
    log, neurons = tmp_path / "cli.csv", tmp_path / "n.csv"
    assert main(["dormancy", "--storage", str(storage.root), "--run", "syn", "--log-file",
                 str(log), "--neurons-out", str(neurons)]) == 0
    assert "logged 1 rows" in capsys.readouterr().out
    assert pl.read_csv(neurons)["dormant"].to_list() == [True, False, False]
    for argv in (["--run", "nope"], ["--run", "syn", "--definition", "sleepy"],
                 ["--run", "syn", "--log-mode", "replace"], ["--run", "syn", "--threshold", "-1"]):
        assert main(["dormancy", "--storage", str(storage.root), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    assert len(log.read_text().splitlines()) == 2


def test_sweep_over_local_revisions(tmp_path, corpus_file):
    root = tmp_path / "model"
    for seed, rev in ((0, "step0"), (1, "step1")):
        save_random_gpt2(root / rev, seed=seed, n_layer=2, d_mlp=24)
    assert sweep_revisions(Storage(tmp_path / "s"), str(root), None) == ["step0", "step1"]
    log = tmp_path / "sweep.csv"
    log.write_text(",".join(LOG_COLUMNS) + "\n")  # append to an existing log: no second header
    config = SweepConfig(model=str(root), corpus=str(corpus_file), num_samples=4, max_length=16,
                         log_file=str(log))
    storage = Storage(tmp_path / "s")
    rows = dormancy_sweep(config, storage, progress=False)
    assert isinstance(rows, pl.DataFrame)
    assert rows["step"].to_list() == [0, 0, 1, 1]
    assert rows["revision"].to_list() == ["step0", "step0", "step1", "step1"]
    logged = read_log(log)
    assert logged.height == 4 and logged["step"].to_list() == [0, 0, 1, 1]
    assert log.read_text().count("timestamp,") == 1
    assert storage.list_runs() == [config.run_id("step0"), config.run_id("step1")]
    # a second sweep reuses the finished runs (nothing re-extracted) and appends again
    runs_before = {r: storage.run_manifest(r).stat().st_mtime_ns for r in storage.list_runs()}
    again = dormancy_sweep(config, storage, progress=False)
    assert again["num_dormant"].to_list() == rows["num_dormant"].to_list()
    assert runs_before == {r: storage.run_manifest(r).stat().st_mtime_ns for r in storage.list_runs()}
    assert read_log(log).height == 8


def test_sweep_bad_input(tmp_path):
    with pytest.raises(UserError, match="--revisions"):
        SweepConfig(model="zoo-s0", revisions="  ")
    with pytest.raises(UserError, match="no local checkpoints"):
        sweep_revisions(Storage(tmp_path), str(tmp_path), None)
    with pytest.raises(UserError, match="--definition"):
        SweepConfig(model="zoo-s0", definition="sleepy")
