"""Co-activation engines agree exactly with a dense integer matrix product."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import arrays, tables
from pipeline.coactivation import (
    CoactivationConfig,
    coactivation,
    coactivation_counts,
    iter_pair_edges,
    max_count,
    read_counts,
)
from pipeline.errors import UserError
from pipeline.extract import ExtractConfig, extract
from pipeline.storage import Storage

ENGINES = ["popcount", "matmul", "sql"] + (["cuda"] if torch.cuda.is_available() else [])


def counts(pa, pb, wa, wb, engine):
    if engine == "cuda":
        return coactivation_counts(pa, pb, wa, wb, engine="matmul", device="cuda")
    return coactivation_counts(pa, pb, wa, wb, engine=engine)


def pack(mask):
    return np.packbits(mask, axis=1, bitorder="little")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("tokens,wa,wb,density", [
    (1, 1, 1, 0.5), (7, 13, 70, 0.3), (65, 64, 63, 0.5), (130, 9, 17, 0.0), (50, 12, 5, 1.0),
    (8193, 24, 31, 0.2),  # crosses a token block boundary
])
def test_engines_equal_dense_product(engine, tokens, wa, wb, density):
    rng = np.random.default_rng(tokens * 1000 + wa)
    a = rng.random((tokens, wa)) < density
    b = rng.random((tokens, wb)) < density
    expect = a.T.astype(np.int64) @ b.astype(np.int64)
    got = counts(pack(a), pack(b), wa, wb, engine)
    assert got.dtype == np.int64 and np.array_equal(got, expect)


@given(st.integers(0, 200), st.integers(0, 200), st.integers(1, 20), st.integers(1, 20),
       st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_halves_sum_to_one_pass(n1, n2, wa, wb, seed):
    rng = np.random.default_rng(seed)
    a = pack(rng.random((n1 + n2, wa)) < 0.4)
    b = pack(rng.random((n1 + n2, wb)) < 0.4)
    whole = coactivation_counts(a, b, wa, wb)
    halves = coactivation_counts(a[:n1], b[:n1], wa, wb) + coactivation_counts(a[n1:], b[n1:], wa, wb)
    assert np.array_equal(whole, halves)


@pytest.fixture(scope="module")
def counted(tmp_path_factory, micro_model_dir, corpus_file):
    storage = Storage(tmp_path_factory.mktemp("coact"))
    extract(ExtractConfig(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=12,
                          max_length=32, run="c"), storage, progress=False)
    coactivation(CoactivationConfig(run="c"), storage, progress=False)
    return storage


def test_stage_counts_equal_product_of_stored_masks(counted):
    group = arrays.open_group(counted.arrays("c"), mode="r")
    masks = {l: arrays.unpack_mask(group[f"active/L{l}"][:], 40).astype(np.int64) for l in range(3)}
    for a, b in ((0, 1), (1, 2)):
        assert np.array_equal(read_counts(counted, "c", a, b), masks[a].T @ masks[b])
    pairs = tables.read_partition(counted, "coactivation_pairs", "c").to_pydict()
    assert pairs["layer_a"] == [0, 1] and pairs["tokens"] == [384, 384]
    assert max_count(counted, "c") == max(pairs["max_count"])


def test_rerun_skips_and_sql_engine_agrees(counted):
    before = read_counts(counted, "c", 0, 1)
    coactivation(CoactivationConfig(run="c", engine="sql", pairs="0:1,0:2"), counted,
                 overwrite=True, progress=False)
    assert np.array_equal(read_counts(counted, "c", 0, 1), before)
    group = arrays.open_group(counted.arrays("c"), mode="r")
    assert group["coact/L0_L2"].attrs["engine"] == "sql"


def test_weights_match_numpy(counted):
    group = arrays.open_group(counted.arrays("c"), mode="r")
    masks = {l: arrays.unpack_mask(group[f"active/L{l}"][:], 40) for l in range(3)}
    t = masks[0].shape[0]
    mc = max_count(counted, "c")
    seen = 0
    for (a, b), edges in iter_pair_edges(counted, "c"):
        e = edges.to_pydict()
        for k in range(0, len(e["count"]), 7):
            i, j, c = e["neuron_a"][k], e["neuron_b"][k], e["count"][k]
            na, nb = int(masks[a][:, i].sum()), int(masks[b][:, j].sum())
            assert c == int((masks[a][:, i] & masks[b][:, j]).sum()) > 0
            assert e["normalized"][k] == pytest.approx(c / mc)
            assert e["jaccard"][k] == pytest.approx(c / (na + nb - c))
            p_ab, p_a, p_b = c / t, na / t, nb / t
            npmi = 1.0 if c == t else math.log(p_ab / (p_a * p_b)) / -math.log(p_ab)
            assert e["npmi"][k] == pytest.approx(npmi)
            seen += 1
    assert seen > 20


@pytest.mark.parametrize("kw,needle", [
    (dict(run="nope"), "does not exist"), (dict(run="c", pairs="0-1"), "malformed"),
    (dict(run="c", pairs="0:7"), "did not record"),
])
def test_bad_input(counted, kw, needle):
    with pytest.raises(UserError, match=needle):
        coactivation(CoactivationConfig(**kw), counted, progress=False)
    with pytest.raises(UserError):
        CoactivationConfig(run="c", engine="gpu")
