"""Frequency, moments, top-token and histogram queries against brute force over the arrays."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pipeline import arrays, tables
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.extract import ExtractConfig, extract
from pipeline.frequencies import layer_histogram, neuron_frequency, neuron_summary, top_tokens
from pipeline.storage import Storage


@pytest.fixture(scope="module")
def run(tmp_path_factory, micro_model_dir, corpus_file):
    storage = Storage(tmp_path_factory.mktemp("freq"))
    extract(ExtractConfig(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=8,
                          max_length=16, store_acts=True, acts_layers="1-2", run="f"),
            storage, progress=False)
    group = arrays.open_group(storage.arrays("f"), mode="r")
    masks = {l: arrays.unpack_mask(group[f"active/L{l}"][:], 40) for l in range(3)}
    acts = {l: group[f"acts/L{l}"][:] for l in (1, 2)}
    tokens = tables.read_partition(storage, "tokens", "f").to_pydict()
    return storage, masks, acts, tokens


def test_frequency_equals_mask_counts(run):
    storage, masks, _, _ = run
    freq = neuron_frequency(storage, "f").to_dict(as_series=False)
    assert list(freq) == ["id", "layer", "dimension", "count", "frequency"]
    assert len(freq["id"]) == 120
    for k, (i, l, d) in enumerate(zip(freq["id"], freq["layer"], freq["dimension"])):
        assert i == l * 40 + d
        column = [bool(x) for x in masks[l][:, d]]
        assert freq["count"][k] == sum(column)
        assert freq["frequency"][k] == pytest.approx(sum(column) / len(column))


def test_summary_moments_equal_numpy(run):
    storage, _, acts, _ = run
    summary = neuron_summary(storage, "f").to_dict(as_series=False)
    for l, a in acts.items():
        x = a.astype(np.float64)  # fp16 storage: compare loosely with the float64 sums
        mu, sd = x.mean(0), x.std(0)
        z = (x - mu) / sd
        idx = [k for k, layer in enumerate(summary["layer"]) if layer == l]
        np.testing.assert_allclose([summary["mean"][k] for k in idx], mu, rtol=1e-2, atol=1e-3)
        np.testing.assert_allclose([summary["variance"][k] for k in idx], sd ** 2, rtol=2e-2, atol=1e-4)
        np.testing.assert_allclose([summary["skew"][k] for k in idx], (z ** 3).mean(0), rtol=5e-2, atol=5e-2)
        np.testing.assert_allclose([summary["kurtosis"][k] for k in idx], (z ** 4).mean(0), rtol=5e-2, atol=5e-2)
        np.testing.assert_allclose([summary["sparsity"][k] for k in idx], (x > 0).mean(0), atol=0.02)


def _brute_top(values: np.ndarray, tokens: dict, k: int, context: int) -> list[tuple]:
    """(row, token, context, value) of the k largest values, earlier row first on ties."""
    order = sorted(range(len(values)), key=lambda r: (-values[r], r))[:k]
    out = []
    for r in order:
        s, p = tokens["sample"][r], tokens["position"][r]
        ctx = "".join(tokens["token"][q] for q in range(len(tokens["row"]))
                      if tokens["sample"][q] == s and p - context <= tokens["position"][q] < p)
        out.append((r, tokens["token"][r], ctx, float(values[r])))
    return out


def test_top_tokens_brute_force(run):
    storage, _, acts, tokens = run
    top = top_tokens(storage, "f", 2, 3, k=5, context=3)
    assert top.columns == ["layer", "neuron", "rank", "row", "sample", "position", "token",
                           "context", "value"]
    assert top["rank"].to_list() == [1, 2, 3, 4, 5]
    got = list(zip(top["row"], top["token"], top["context"], top["value"]))
    assert got == _brute_top(acts[2][:, 3].astype(np.float64), tokens, 5, 3)
    assert top["position"].to_list() == [tokens["position"][r] for r in top["row"]]


def test_top_tokens_of_every_neuron(run):
    storage, _, acts, tokens = run
    # blocks of 7 rows: candidates of 19 blocks merged into the exact top-k
    top = top_tokens(storage, "f", 1, k=4, context=2, block_rows=7, progress=False)
    assert top.height == 40 * 4 and top["layer"].unique().to_list() == [1]
    for n in range(40):
        mine = top.filter(pl.col("neuron") == n)
        got = list(zip(mine["row"], mine["token"], mine["context"], mine["value"]))
        assert got == _brute_top(acts[1][:, n].astype(np.float64), tokens, 4, 2)
    single = top_tokens(storage, "f", 1, 5, k=4, context=2)
    assert single.to_dicts() == top.filter(pl.col("neuron") == 5).to_dicts()


def test_histogram_equals_numpy(run):
    storage, _, acts, _ = run
    hist = layer_histogram(storage, "f", 1, bins=7, block_rows=50)
    edges = np.array(hist["bin_start"].to_list() + [hist["bin_end"][-1]])
    stats = tables.read_partition(storage, "neuron_stats", "f").to_pydict()
    lo = min(m for m, l in zip(stats["min"], stats["layer"]) if l == 1)
    hi = max(m for m, l in zip(stats["max"], stats["layer"]) if l == 1)
    np.testing.assert_allclose(edges, np.linspace(lo, hi, 8))
    # fp16 storage may round a value just past the float32 min/max: it counts in the end bins
    x = np.clip(acts[1].astype(np.float64).ravel(), edges[0], edges[-1])
    counts, _ = np.histogram(x, bins=edges)
    assert hist["count"].to_list() == counts.tolist() and counts.sum() == acts[1].size
    assert layer_histogram(storage, "f", 1, bins=7)["count"].to_list() == counts.tolist()


def test_missing_dense_layer_is_one_line(run):
    storage, *_ = run
    for call, match in [(lambda: top_tokens(storage, "f", 0, 1), "--store-acts"),
                        (lambda: top_tokens(storage, "f", 0), "--store-acts"),
                        (lambda: layer_histogram(storage, "f", 0), "--store-acts"),
                        (lambda: top_tokens(storage, "f", 1, 99), "out of range"),
                        (lambda: top_tokens(storage, "f", 7, 1), "not recorded"),
                        (lambda: top_tokens(storage, "f", 1, 1, k=0), "--k"),
                        (lambda: layer_histogram(storage, "f", 1, bins=0), "--bins"),
                        (lambda: neuron_frequency(storage, "nope"), "does not exist")]:
        with pytest.raises(UserError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


def test_cli(run, tmp_path, capsys):
    storage, masks, _, _ = run
    root = str(storage.root)
    out = tmp_path / "freq.csv"
    assert main(["frequencies", "--storage", root, "--run", "f", "--out", str(out)]) == 0
    freq = pl.read_csv(out)
    assert freq.columns == ["id", "layer", "dimension", "count", "frequency"]
    assert freq["count"].sum() == sum(int(m.sum()) for m in masks.values())
    assert main(["top-tokens", "--storage", root, "--run", "f", "--layer", "2", "--neuron", "3",
                 "--k", "3", "--context", "2"]) == 0
    assert main(["histogram", "--storage", root, "--run", "f", "--layer", "2", "--bins", "5",
                 "--out", str(tmp_path / "h.csv")]) == 0
    assert pl.read_csv(tmp_path / "h.csv")["count"].sum() == 8 * 16 * 40
    capsys.readouterr()
    assert main(["top-tokens", "--storage", root, "--run", "f", "--layer", "0", "--neuron", "1"]) == 2
    err = capsys.readouterr().err
    assert "--store-acts" in err and err.count("\n") == 1
