"""Stages frequencies, top-tokens, histogram against truth computed another way: activations
captured by an independent forward hook (dense NumPy moments), the unpacked masks (counts and
sparsity, exactly), brute force over the stored arrays (top tokens, histogram)."""

from __future__ import annotations

import csv

import numpy as np
import polars as pl
import pytest
import torch
from reference import mlp_inputs

from pipeline import cli
from pipeline.core import arrays, tables
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage
from pipeline.core.warehouse import connect, load_sql
from pipeline.kernels.accumulators import NeuronMoments
from pipeline.stages.frequencies import (
    FrequenciesConfig,
    HistogramConfig,
    TopTokensConfig,
    run_frequencies,
    run_histogram,
    run_top_tokens,
)

SAMPLES, LENGTH, WIDTH, LAYERS = 16, 32, 40, 3


def _extract(storage: Storage, model, corpus, run: str, *extra: str) -> None:
    assert cli.main(["extract", "--storage", str(storage.root), "--model", str(model),
                     "--corpus", str(corpus), "--max-length", str(LENGTH), "--store-acts",
                     "--dtype", "float32", "--run", run, "--quiet", *extra]) == 0


def _hooked_activations(model_dir, input_ids: torch.Tensor) -> dict[int, np.ndarray]:
    """Inputs of each block's mlp.c_proj (the neurons), by a forward pre-hook of our own."""
    return {l: a.astype(np.float64) for l, a in mlp_inputs(model_dir, input_ids).items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, micro_model_dir, corpus_file):
    storage = Storage(tmp_path_factory.mktemp("freq"))
    _extract(storage, micro_model_dir, corpus_file, "f", "--num-samples", str(SAMPLES))
    # a second run in the same warehouse: every query of run f must see run f's rows only
    _extract(storage, micro_model_dir, corpus_file, "g", "--num-samples", "12",
             "--active-threshold", "-0.05", "--acts-layers", "1-2")
    group = arrays.open_group(storage.arrays("f"), mode="r")
    masks = {l: arrays.unpack_mask(group[f"active/L{l}"][:], WIDTH) for l in range(LAYERS)}
    dense = {l: group[f"acts/L{l}"][:] for l in range(LAYERS)}
    tokens = tables.read_partition(storage, "tokens", "f").to_pydict()
    order = np.lexsort((tokens["position"], tokens["sample"]))
    assert np.array_equal(order, tokens["row"])  # rows are sample-major: reshape to windows
    ids = torch.tensor(tokens["token_id"], dtype=torch.long).reshape(SAMPLES, LENGTH)
    hooked = _hooked_activations(micro_model_dir, ids)
    return storage, masks, dense, hooked, tokens


def test_frequency_equals_mask_counts(run):
    storage, masks, *_ = run
    freq = run_frequencies(FrequenciesConfig(run="f"), storage).frame.to_dict(as_series=False)
    assert list(freq) == ["neuron_id", "layer", "dimension", "activation_count",
                          "activation_frequency"]
    assert freq["neuron_id"] == list(range(LAYERS * WIDTH))
    for k, (i, l, d) in enumerate(zip(freq["neuron_id"], freq["layer"], freq["dimension"])):
        assert i == l * WIDTH + d
        column = [bool(x) for x in masks[l][:, d]]
        assert freq["activation_count"][k] == sum(column)
        assert freq["activation_frequency"][k] == sum(column) / len(column)


def test_summary_moments_equal_hooked_activations(run):
    storage, masks, _, hooked, _ = run
    summary = run_frequencies(FrequenciesConfig(run="f", summary=True), storage).frame
    for l, x in hooked.items():
        got = summary.filter(pl.col("layer") == l).sort("neuron")
        assert got["count"].to_list() == [len(x)] * WIDTH
        mu = x.mean(0)
        c = x - mu
        var = (c ** 2).mean(0)  # population (ddof=0): n/(n-1) is 0.2% away at 512 rows
        sd = np.sqrt(var)
        rel = 1e-5  # float32 rounding: two forward passes need not reduce in the same order
        np.testing.assert_array_less(np.abs(got["mean"] - mu), rel * sd)
        np.testing.assert_allclose(got["variance"], var, rtol=rel)
        np.testing.assert_allclose(got["mean_abs"], np.abs(x).mean(0), rtol=rel)
        np.testing.assert_allclose(got["skew"], (c ** 3).mean(0) / sd ** 3, rtol=rel, atol=rel)
        np.testing.assert_allclose(got["kurtosis"], (c ** 4).mean(0) / var ** 2, rtol=rel, atol=rel)
        np.testing.assert_array_less(np.abs(got["min"] - x.min(0)), rel * sd)
        np.testing.assert_array_less(np.abs(got["max"] - x.max(0)), rel * sd)
        # sparsity is a count over the masks: exact
        assert got["sparsity"].to_list() == (masks[l].sum(0) / len(masks[l])).tolist()


def test_summary_sql_keeps_the_digits_of_large_means(tmp_path):
    """neuron_summary.sql on accumulators of neurons with mean 1e4 and spread 1 or 1e-2."""
    storage = Storage(tmp_path)
    z = np.random.default_rng(3).standard_normal((2048, 2))
    x = (1e4 + np.array([1.0, 1e-2]) * (z + 0.3 * z ** 2)).astype(np.float32)
    m = NeuronMoments(2)
    for block in np.array_split(x, 3):
        m.update_and_pack(torch.from_numpy(block))
    tables.write_part(storage, "neuron_stats", "big", {
        "neuron_id": np.arange(2), "layer": np.zeros(2, np.int32),
        "neuron": np.arange(2, dtype=np.int32), **m.columns()})
    con = connect(storage)
    try:
        got = con.sql(load_sql("neuron_summary"), params={"run_id": "big"}).pl()
    finally:
        con.close()
    x = x.astype(np.float64)
    c = x - x.mean(0)
    var = (c ** 2).mean(0)
    np.testing.assert_allclose(got["variance"], var, rtol=1e-6)
    np.testing.assert_allclose(got["skew"], (c ** 3).mean(0) / var ** 1.5, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["kurtosis"], (c ** 4).mean(0) / var ** 2, rtol=1e-6, atol=1e-6)


def test_top_tokens_brute_force(run):
    storage, _, dense, _, tokens = run
    top = run_top_tokens(TopTokensConfig(run="f", layer=2, neuron=3, k=5, context=3),
                         storage).frame.to_dict(as_series=False)
    values = dense[2][:, 3].astype(np.float64)
    order = sorted(range(len(values)), key=lambda r: (-values[r], r))[:5]
    assert top["row"] == order and top["rank"] == [1, 2, 3, 4, 5]
    assert top["value"] == [values[r] for r in order]
    for r, ctx, tok in zip(top["row"], top["context"], top["token"]):
        s, p = tokens["sample"][r], tokens["position"][r]
        expect = "".join(tokens["token"][q] for q in range(len(tokens["row"]))
                         if tokens["sample"][q] == s and p - 3 <= tokens["position"][q] < p)
        assert ctx == expect and tok == tokens["token"][r]


def test_histogram_equals_numpy(run):
    storage, _, dense, hooked, _ = run
    hist = run_histogram(HistogramConfig(run="f", layer=1, bins=7, block_rows=50, quiet=True),
                         storage).frame
    edges = np.array(hist["bin_start"].to_list() + [hist["bin_end"][-1]])
    # equal bins over the layer's float32 [min, max]
    np.testing.assert_allclose(edges, np.linspace(hooked[1].min(), hooked[1].max(), 8),
                               rtol=0, atol=1e-5 * np.ptp(hooked[1]))
    # fp16 storage may round a value just past the float32 min/max: it counts in the end bins
    x = np.clip(dense[1].astype(np.float64).ravel(), edges[0], edges[-1])
    counts, _ = np.histogram(x, bins=edges)
    assert hist["count"].to_list() == counts.tolist() and counts.sum() == SAMPLES * LENGTH * WIDTH


def test_out_file_from_the_cli(run, tmp_path, capsys):
    storage, masks, *_ = run
    out = tmp_path / "sub" / "freq.csv"
    assert cli.main(["frequencies", "--storage", str(storage.root), "--run", "f",
                     "--out", str(out)]) == 0
    assert f"wrote {LAYERS * WIDTH} rows to {out}" in capsys.readouterr().out
    with open(out) as f:
        rows = list(csv.DictReader(f))
    counts = np.concatenate([masks[l].sum(0) for l in range(LAYERS)])
    assert [int(r["activation_count"]) for r in rows] == counts.tolist()
    assert cli.main(["frequencies", "--storage", str(storage.root), "--run", "f",
                     "--out", str(tmp_path / "freq.xlsx")]) == 2
    assert "--out" in capsys.readouterr().err


def test_bad_input_is_one_line(run, capsys):
    storage, *_ = run
    with pytest.raises(UserError, match="--store-acts"):
        run_top_tokens(TopTokensConfig(run="g", layer=0, neuron=1), storage)
    with pytest.raises(UserError, match="out of range"):
        run_top_tokens(TopTokensConfig(run="f", layer=1, neuron=99), storage)
    with pytest.raises(UserError, match="--store-acts"):
        run_histogram(HistogramConfig(run="g", layer=0), storage)
    with pytest.raises(UserError, match="does not exist"):
        run_frequencies(FrequenciesConfig(run="nope"), storage)
    for argv in (["top-tokens", "--run", "f", "--layer", "1", "--neuron", "0", "--k", "0"],
                 ["histogram", "--run", "f", "--layer", "1", "--bins", "0"]):
        assert cli.main([argv[0], "--storage", str(storage.root), *argv[1:]]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
