"""Co-activation engines agree exactly with a dense integer matrix product; weights with NumPy."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core import arrays, tables
from pipeline.stages import coactivation as coactivation_module
from pipeline.stages.coactivation import (
    CoactivationConfig,
    active_counts,
    coactivation,
    coactivation_counts,
    edge_weights,
    iter_pair_edges,
    max_count,
    neuron_bitsets,
    pair_edges,
    read_counts,
)
from pipeline.core.errors import UserError
from pipeline.stages.extract import ExtractConfig, extract
from pipeline.core.storage import Storage

CUDA = torch.cuda.is_available()
ENGINES = ["popcount", "matmul", "sql"] + (["cuda"] if CUDA else [])


def pack(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask, axis=1, bitorder="little")


def dense(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.T.astype(np.int64) @ b.astype(np.int64)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("tokens,wa,wb,density", [
    (1, 1, 1, 0.5), (7, 13, 70, 0.3), (65, 64, 63, 0.5), (130, 9, 17, 0.0),  # empty masks
    (50, 12, 5, 1.0),  # all ones
    (0, 5, 3, 0.5),  # no tokens
    (8193, 24, 31, 0.2),  # crosses a token block boundary
    (200, 131, 66, 0.3),  # a's rows not a multiple of the 3-row tile, b's not of 8
    (1100, 200, 137, 0.5),  # adder tree over 16-word blocks + 2 tail words; 3 row tiles, 18 lane groups
    (2048, 97, 129, 0.95),  # dense: every bit plane of the adder tree carries
])
def test_engines_equal_dense_product(engine, tokens, wa, wb, density):
    rng = np.random.default_rng(tokens * 1000 + wa)
    a = rng.random((tokens, wa)) < density
    b = rng.random((tokens, wb)) < density
    got = coactivation_counts(pack(a), pack(b), wa, wb, engine=engine)
    assert got.dtype == np.int64 and got.shape == (wa, wb)
    np.testing.assert_array_equal(got, dense(a, b))


def test_all_ones_over_two_blocks_reach_token_count():
    t = 8192 + 77
    ones = np.ones((t, 10), bool)
    for engine in ENGINES:
        assert (coactivation_counts(pack(ones), pack(ones), 10, 10, engine=engine) == t).all()


@pytest.mark.parametrize("half", [False, True])
def test_torch_counter_flushes_fp32_sums_exactly(monkeypatch, half):
    """The chunked product: fp16 inputs (on the CPU, the fp16-output fallback of old torch) and
    fp32 sums flushed into int64 before they could exceed the exact range (made tiny here)."""
    monkeypatch.setattr(coactivation_module, "FP32_EXACT", 3000)
    rng = np.random.default_rng(8)
    a, b = rng.random((9000, 11)) < 0.9, rng.random((9000, 21)) < 0.9
    counter = coactivation_module.TorchCounter(11, 21, "cpu", half=half)
    for s in range(0, 9000, 1000):
        counter.add(pack(a[s:s + 1000]), pack(b[s:s + 1000]))
        assert counter.pending < 3000
    np.testing.assert_array_equal(counter.result(), dense(a, b))


def test_neuron_bitsets_layout():
    rng = np.random.default_rng(3)
    mask = rng.random((130, 19)) < 0.4
    bits = neuron_bitsets(pack(mask), 19)
    assert bits.shape == (19, 3) and bits.dtype == np.uint64
    for n in range(19):
        for r in range(130):
            assert bool((int(bits[n, r // 64]) >> (r % 64)) & 1) == mask[r, n]
    lanes = neuron_bitsets(pack(mask), 19, interleave=True)
    assert lanes.shape == (3, 3, 8)
    for n in range(24):  # neurons 19..23 pad the last byte column with zeros
        for r in range(130):
            bit = (int(lanes[n // 8, r // 64, n % 8]) >> (r % 64)) & 1
            assert bool(bit) == (n < 19 and mask[r, n])


@given(st.integers(0, 200), st.integers(0, 200), st.integers(1, 20), st.integers(1, 20),
       st.floats(0, 1), st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_halves_sum_to_one_pass(n1, n2, wa, wb, density, seed):
    rng = np.random.default_rng(seed)
    ma, mb = rng.random((n1 + n2, wa)) < density, rng.random((n1 + n2, wb)) < density
    a, b = pack(ma), pack(mb)
    whole = coactivation_counts(a, b, wa, wb)
    halves = coactivation_counts(a[:n1], b[:n1], wa, wb) + coactivation_counts(a[n1:], b[n1:], wa, wb)
    np.testing.assert_array_equal(whole, halves)
    np.testing.assert_array_equal(whole, dense(ma, mb))


def test_kernel_input_checks():
    with pytest.raises(ValueError, match="shape"):
        coactivation_counts(np.zeros((4, 2), np.uint8), np.zeros((4, 1), np.uint8), 9, 9)
    with pytest.raises(ValueError, match="same token rows"):
        coactivation_counts(np.zeros((4, 1), np.uint8), np.zeros((5, 1), np.uint8), 8, 8)
    from pipeline.kernels.bitkernels import and_popcount

    with pytest.raises(ValueError, match="C-contiguous"):  # the kernel reads raw pointers
        and_popcount(np.zeros((3, 8), np.uint64)[:, ::2], np.zeros((1, 4, 8), np.uint64),
                     np.zeros((3, 8), np.int64))
    if not CUDA:
        with pytest.raises(UserError, match="CUDA"):
            coactivation_counts(np.zeros((4, 1), np.uint8), np.zeros((4, 1), np.uint8), 8, 8,
                                engine="cuda")


# -- weights in SQL against NumPy formulas


def numpy_weights(c, n_a, n_b, t, mc):
    c = c.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_ab, p_a, p_b = c / t, n_a / t, n_b / t
        npmi = np.log(p_ab / (p_a * p_b)) / -np.log(p_ab)
        jaccard = c / (n_a + n_b - c)
    npmi = np.where(c == 0, -1.0, np.where(c == t, 1.0, npmi))
    return c / mc, np.where(c == 0, 0.0, jaccard), npmi


def test_edge_weights_sql_equals_numpy():
    rng = np.random.default_rng(5)
    t = 64
    a = rng.random((t, 6)) < 0.5
    b = rng.random((t, 7)) < 0.5
    a[:, 0] = b[:, 0] = True  # p_ab = 1 for the pair (0, 0)
    a[:, 1] = False  # count 0 for every pair of neuron 1 of a
    c = dense(a, b)
    n_a, n_b = a.sum(0), b.sum(0)
    i, j = np.indices(c.shape).reshape(2, -1)
    edges = pa.table({"layer_a": np.full(len(i), 2, np.int32), "neuron_a": i.astype(np.int32),
                      "layer_b": np.full(len(i), 3, np.int32), "neuron_b": j.astype(np.int32),
                      "count": c[i, j]})
    active = pa.table({"layer": np.repeat(np.int32([2, 3]), [6, 7]),
                       "neuron": np.int32(list(range(6)) + list(range(7))),
                       "active_count": np.concatenate([n_a, n_b]).astype(np.int64)})
    with duckdb.connect() as con:
        got = edge_weights(con, edges, active, tokens=t, max_count_value=100).to_pydict()
    assert got["neuron_a"] == i.tolist() and got["neuron_b"] == j.tolist()
    normalized, jaccard, npmi = numpy_weights(c[i, j], n_a[i], n_b[j], t, 100)
    np.testing.assert_allclose(got["normalized"], normalized, rtol=1e-12)
    np.testing.assert_allclose(got["jaccard"], jaccard, rtol=1e-12)
    np.testing.assert_allclose(got["npmi"], npmi, rtol=1e-9, atol=1e-12)
    assert got["npmi"][0] == 1.0 and got["jaccard"][0] == 1.0  # (0, 0): always together
    assert all(v == -1.0 for v, ia in zip(got["npmi"], i) if ia == 1)
    assert all(-1.0 <= v <= 1.0 + 1e-12 for v in got["npmi"])


# -- the stage on a real extraction of the micro model


@pytest.fixture(scope="module")
def counted(tmp_path_factory, micro_model_dir, corpus_file):
    storage = Storage(tmp_path_factory.mktemp("coact"))
    extract(ExtractConfig(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=12,
                          max_length=32, run="c"), storage, progress=False)
    coactivation(CoactivationConfig(run="c", chunk_tokens=100, device="cpu"), storage, progress=False)
    return storage


@pytest.fixture(scope="module")
def masks(counted):
    group = arrays.open_group(counted.arrays("c"), mode="r")
    return {l: arrays.unpack_mask(group[f"active/L{l}"][:], 40) for l in range(3)}


def test_stage_counts_equal_product_of_stored_masks(counted, masks):
    for a, b in ((0, 1), (1, 2)):
        np.testing.assert_array_equal(read_counts(counted, "c", a, b), dense(masks[a], masks[b]))
    pairs = tables.read_partition(counted, "coactivation_pairs", "c").to_pydict()
    assert pairs["layer_a"] == [0, 1] and pairs["layer_b"] == [1, 2]
    assert pairs["tokens"] == [384, 384] and pairs["engine"] == ["popcount"] * 2
    for k, (a, b) in enumerate(((0, 1), (1, 2))):
        c = dense(masks[a], masks[b])
        assert pairs["max_count"][k] == c.max() and pairs["nonzero"][k] == np.count_nonzero(c)
        assert pairs["total"][k] == c.sum()
    assert max_count(counted, "c") == max(pairs["max_count"])
    for l in range(3):  # neuron_stats.active_count equals the popcount of the stored masks
        np.testing.assert_array_equal(active_counts(counted, "c")[l], masks[l].sum(0))


def test_rerun_skips_overwrite_recounts_and_engines_agree(counted, masks):
    group = arrays.open_group(counted.arrays("c"))
    group["coact/L0_L1"].attrs["seconds"] = 123.0  # a skipped pair keeps its attributes
    coactivation(CoactivationConfig(run="c", engine="sql", pairs="0:1,0:2"), counted, progress=False)
    group = arrays.open_group(counted.arrays("c"), mode="r")
    assert group["coact/L0_L1"].attrs["seconds"] == 123.0
    assert group["coact/L0_L1"].attrs["engine"] == "popcount"
    assert group["coact/L0_L2"].attrs["engine"] == "sql"
    np.testing.assert_array_equal(read_counts(counted, "c", 0, 2), dense(masks[0], masks[2]))
    for engine in ("matmul", "sql"):
        coactivation(CoactivationConfig(run="c", engine=engine, pairs="0:1"), counted,
                     overwrite=True, progress=False)
        group = arrays.open_group(counted.arrays("c"), mode="r")
        assert group["coact/L0_L1"].attrs["engine"] == engine
        np.testing.assert_array_equal(read_counts(counted, "c", 0, 1), dense(masks[0], masks[1]))


def test_unfinished_pair_is_recounted(counted, masks):
    group = arrays.open_group(counted.arrays("c"))
    group["coact/L1_L2"][:] = 0  # as if the write had stopped before the marker
    group["coact/L1_L2"].attrs["complete"] = False
    with pytest.raises(UserError, match="no co-activation counts for layers 1:2"):
        read_counts(counted, "c", 1, 2)
    coactivation(CoactivationConfig(run="c", device="cpu"), counted, progress=False)
    np.testing.assert_array_equal(read_counts(counted, "c", 1, 2), dense(masks[1], masks[2]))


def test_pair_edges_weights_match_numpy(counted, masks):
    t = masks[0].shape[0]
    mc = max_count(counted, "c")
    seen = []
    for (a, b), edges in iter_pair_edges(counted, "c"):
        seen.append((a, b))
        e = edges.to_pydict()
        c = dense(masks[a], masks[b])
        i, j = np.nonzero(c)  # count > 0 only, sorted by (neuron_a, neuron_b)
        assert e["neuron_a"] == i.tolist() and e["neuron_b"] == j.tolist()
        assert set(e["layer_a"]) == {a} and set(e["layer_b"]) == {b}
        np.testing.assert_array_equal(e["count"], c[i, j])
        normalized, jaccard, npmi = numpy_weights(c[i, j], masks[a].sum(0)[i], masks[b].sum(0)[j], t, mc)
        np.testing.assert_allclose(e["normalized"], normalized, rtol=1e-12)
        np.testing.assert_allclose(e["jaccard"], jaccard, rtol=1e-12)
        np.testing.assert_allclose(e["npmi"], npmi, rtol=1e-9, atol=1e-12)
    assert seen == sorted(seen) and {(0, 1), (1, 2)} <= set(seen)
    assert pair_edges(counted, "c", 1, 2).equals(dict(iter_pair_edges(counted, "c"))[(1, 2)])


@pytest.mark.parametrize("kw,needle", [
    (dict(run="nope"), "does not exist"), (dict(run="c", pairs="0-1"), "malformed"),
    (dict(run="c", pairs="0:7"), "did not record"),
    (dict(run="c", engine="cuda", device="cpu"), "needs a CUDA device"),
])
def test_bad_input(counted, kw, needle):
    with pytest.raises(UserError, match=needle):
        coactivation(CoactivationConfig(**kw), counted, progress=False)


@pytest.mark.parametrize("kw", [dict(engine="gpu"), dict(chunk_tokens=0), dict(chunk_tokens=9000)])
def test_bad_config(kw):
    with pytest.raises(UserError):
        CoactivationConfig(run="c", **kw)
