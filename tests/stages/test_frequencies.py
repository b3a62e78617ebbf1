"""Frequency, moments, top-token and histogram queries against brute force over the arrays."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core import arrays, tables
from pipeline.core.errors import UserError
from pipeline.stages.extract import ExtractConfig, extract
from pipeline.stages.frequencies import layer_histogram, neuron_frequency, neuron_summary, top_tokens
from pipeline.core.storage import Storage


@pytest.fixture(scope="module")
def run(tmp_path_factory, micro_model_dir, corpus_file):
    storage = Storage(tmp_path_factory.mktemp("freq"))
    extract(ExtractConfig(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=8,
                          max_length=16, store_acts=True, acts_layers="1-2", run="f"),
            storage, progress=False)
    # a second run in the same warehouse: every query below must see run f's rows only
    extract(ExtractConfig(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=12,
                          max_length=16, store_acts=True, active_threshold=-0.05, run="g"),
            storage, progress=False)
    group = arrays.open_group(storage.arrays("f"), mode="r")
    masks = {l: arrays.unpack_mask(group[f"active/L{l}"][:], 40) for l in range(3)}
    acts = {l: group[f"acts/L{l}"][:] for l in (1, 2)}
    tokens = tables.read_partition(storage, "tokens", "f").to_pydict()
    return storage, masks, acts, tokens


def test_frequency_equals_mask_counts(run):
    storage, masks, _, _ = run
    freq = neuron_frequency(storage, "f").to_dict(as_series=False)
    assert list(freq) == ["neuron_id", "layer", "dimension", "activation_count",
                          "activation_frequency"]
    for k, (i, l, d) in enumerate(zip(freq["neuron_id"], freq["layer"], freq["dimension"])):
        assert i == l * 40 + d
        column = [bool(x) for x in masks[l][:, d]]
        assert freq["activation_count"][k] == sum(column)
        assert freq["activation_frequency"][k] == pytest.approx(sum(column) / len(column))


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


def test_top_tokens_brute_force(run):
    storage, _, acts, tokens = run
    top = top_tokens(storage, "f", 2, 3, k=5, context=3).to_dict(as_series=False)
    values = acts[2][:, 3].astype(np.float64)
    order = sorted(range(len(values)), key=lambda r: (-values[r], r))[:5]
    assert top["row"] == order and top["rank"] == [1, 2, 3, 4, 5]
    assert top["value"] == [values[r] for r in order]
    for r, ctx, tok in zip(top["row"], top["context"], top["token"]):
        s, p = tokens["sample"][r], tokens["position"][r]
        expect = "".join(tokens["token"][q] for q in range(len(tokens["row"]))
                         if tokens["sample"][q] == s and p - 3 <= tokens["position"][q] < p)
        assert ctx == expect and tok == tokens["token"][r]


def test_histogram_equals_numpy(run):
    storage, _, acts, _ = run
    hist = layer_histogram(storage, "f", 1, bins=7, block_rows=50)
    edges = np.array(hist["bin_start"].to_list() + [hist["bin_end"][-1]])
    # fp16 storage may round a value just past the float32 min/max: it counts in the end bins
    x = np.clip(acts[1].astype(np.float64).ravel(), edges[0], edges[-1])
    counts, _ = np.histogram(x, bins=edges)
    assert hist["count"].to_list() == counts.tolist() and counts.sum() == x.size


def test_missing_dense_layer_is_one_line(run):
    storage, *_ = run
    with pytest.raises(UserError, match="--store-acts"):
        top_tokens(storage, "f", 0, 1)
    with pytest.raises(UserError, match="out of range"):
        top_tokens(storage, "f", 1, 99)
