"""Co-activation engines agree exactly with a dense integer matrix product; edge weights of
sql/edge_weights.sql equal the reference formulas in NumPy; the stage on real extractions."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import duckdb
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.cli import main
from pipeline.core import arrays, coact, tables
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, read_json
from pipeline.stages import coactivation as coactivation_module
from pipeline.stages.coactivation import (
    CoactivationConfig,
    coactivation_counts,
    neuron_bitsets,
    run,
    show,
)

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


# -- edge weights: sql/edge_weights.sql against the reference formulas in NumPy


def numpy_weights(c, n_a, n_b, t, mc) -> dict[str, np.ndarray]:
    """The reference formulas, for edges with count c > 0 (n: active counts, t: token rows)."""
    c = c.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        npmi = np.log(c * t / (n_a * n_b.astype(np.float64))) / -np.log(c / t)
    return {"normalized": c / mc, "jaccard": c / (n_a + n_b - c),
            "npmi": np.where(c == t, 1.0, npmi)}


@pytest.mark.parametrize("weight", coact.WEIGHTS)
@pytest.mark.parametrize("threshold", [-np.inf, 0.0, 0.3])
def test_edge_weights_sql_equals_formulas(weight, threshold):
    rng = np.random.default_rng(5)
    t = 64
    a = rng.random((t, 6)) < 0.5
    b = rng.random((t, 7)) < 0.5
    a[:, 0] = b[:, 0] = True  # p_ab = 1 for the pair (0, 0)
    a[:, 1] = False  # count 0 for every pair of neuron 1 of a: no edges
    c = dense(a, b)
    n_a, n_b = a.sum(0), b.sum(0)
    with duckdb.connect() as con:
        got = coact.weighted_edges(con, c, n_a, n_b, tokens=t, max_count=100, weight=weight,
                                   threshold=threshold)
    assert got.column_names == ["neuron_a", "neuron_b", "count", "weight"]
    i, j = np.nonzero(c)  # sorted by (neuron_a, neuron_b)
    w = numpy_weights(c[i, j], n_a[i], n_b[j], t, 100)[weight]
    keep = w > threshold
    assert got["neuron_a"].to_pylist() == i[keep].tolist()
    assert got["neuron_b"].to_pylist() == j[keep].tolist()
    assert got["count"].to_pylist() == c[i, j][keep].tolist()
    np.testing.assert_allclose(got["weight"].to_numpy(), w[keep], rtol=1e-12)
    assert 1 not in got["neuron_a"].to_pylist()
    if threshold == -np.inf:
        assert got.num_rows == np.count_nonzero(c)
        assert got["weight"][0].as_py() == (0.64 if weight == "normalized" else 1.0)  # (0, 0)
        lo = -1.0 if weight == "npmi" else 0.0
        assert all(lo <= v <= 1.0 + 1e-12 for v in got["weight"].to_pylist())


# -- the stage on real extractions of the micro model

WIDTH = 40  # neurons per layer of the micro model


def extract_run(root: Path, model_dir: Path, corpus: Path, run_id: str, *extra: str) -> Storage:
    """An extraction of 16 windows x 32 tokens through the CLI (its stable interface)."""
    assert main(["extract", "--storage", str(root), "--model", str(model_dir), "--corpus",
                 str(corpus), "--num-samples", "16", "--max-length", "32", "--run", run_id,
                 "--device", "cpu", "--quiet", *extra]) == 0
    return Storage(root)


def stored_masks(storage: Storage, run_id: str) -> Mapping[int, np.ndarray]:
    """Read-only boolean masks [T, 40] of every recorded layer, unpacked from the Zarr arrays."""
    import zarr

    group = zarr.open_group(str(storage.arrays(run_id)), mode="r")
    out = {}
    for key, array in group["active"].arrays():
        mask = np.unpackbits(array[:], axis=1, count=WIDTH, bitorder="little").astype(bool)
        mask.flags.writeable = False
        out[int(key[1:])] = mask
    return MappingProxyType(out)


def counted_fixtures(run_id: str, **count_options):
    """A test module's fixtures: `counted_root` (an extraction of the micro model, counted; read
    only), `counted` (a private copy of it, for a test that writes), `masks` (its stored masks)."""

    @pytest.fixture(scope="module")
    def counted_root(tmp_path_factory, micro_model_dir, corpus_file) -> Path:
        root = tmp_path_factory.mktemp(run_id) / "storage"
        storage = extract_run(root, micro_model_dir, corpus_file, run_id)
        run(CoactivationConfig(run=run_id, quiet=True, **count_options), storage)
        return root

    @pytest.fixture()
    def counted(counted_root, tmp_path) -> Storage:
        shutil.copytree(counted_root, tmp_path / "storage")
        return Storage(tmp_path / "storage")

    @pytest.fixture(scope="module")
    def masks(counted_root) -> Mapping[int, np.ndarray]:
        return stored_masks(Storage(counted_root), run_id)

    return counted_root, counted, masks


counted_root, counted, masks = counted_fixtures("c", chunk_tokens=100, device="cpu")


def test_stage_counts_equal_product_of_stored_masks(counted_root, masks):
    storage = Storage(counted_root)
    assert sorted(masks) == [0, 1, 2] and masks[0].shape == (512, WIDTH)
    for a, b in ((0, 1), (1, 2)):
        np.testing.assert_array_equal(coact.read_counts(storage, "c", a, b), dense(masks[a], masks[b]))
    pairs = tables.read_partition(storage, "coactivation_pairs", "c").to_pydict()
    assert pairs["layer_a"] == [0, 1] and pairs["layer_b"] == [1, 2]
    assert pairs["tokens"] == [512, 512] and pairs["engine"] == ["popcount"] * 2
    for k, (a, b) in enumerate(((0, 1), (1, 2))):
        c = dense(masks[a], masks[b])
        assert pairs["max_count"][k] == c.max() and pairs["nonzero"][k] == np.count_nonzero(c)
        assert pairs["total"][k] == c.sum()
    assert coact.load_run_graph(storage, "c").max_count == max(dense(masks[a], masks[b]).max()
                                                for a, b in ((0, 1), (1, 2)))
    active = coact.active_counts(storage, "c")
    for l in range(3):  # neuron_stats.active_count equals the popcount of the stored masks
        np.testing.assert_array_equal(active[l], masks[l].sum(0))
    marker = read_json(next((storage.run_dir("c") / "stages").glob("coactivation-*.json")))
    assert marker["config"]["run"] == "c" and marker["pairs"] == [[0, 1], [1, 2]]


def test_rerun_skips_overwrite_recounts_and_engines_agree(counted, masks):
    group = arrays.open_group(counted.arrays("c"))
    group["coact/L0_L1"].attrs["seconds"] = 123.0  # a skipped pair keeps its attributes
    result = run(CoactivationConfig(run="c", engine="sql", pairs="0:1,0:2", quiet=True), counted)
    assert result.skipped == [(0, 1)] and result.counted == [(0, 2)]
    assert "L0->L1" in show(result) and "already counted: skipped" in show(result).splitlines()[0]
    group = arrays.open_group(counted.arrays("c"), mode="r")
    assert group["coact/L0_L1"].attrs["seconds"] == 123.0
    assert group["coact/L0_L1"].attrs["engine"] == "popcount"
    assert group["coact/L0_L2"].attrs["engine"] == "sql"
    np.testing.assert_array_equal(coact.read_counts(counted, "c", 0, 2), dense(masks[0], masks[2]))
    assert tables.read_partition(counted, "coactivation_pairs", "c")["layer_b"].to_pylist() == [1, 2, 2]
    for engine in ("matmul", "sql"):
        result = run(CoactivationConfig(run="c", engine=engine, pairs="0:1", overwrite=True,
                                        quiet=True), counted)
        assert result.counted == [(0, 1)] and result.skipped == []
        group = arrays.open_group(counted.arrays("c"), mode="r")
        assert group["coact/L0_L1"].attrs["engine"] == engine
        np.testing.assert_array_equal(coact.read_counts(counted, "c", 0, 1), dense(masks[0], masks[1]))


def test_rerun_of_a_finished_stage_writes_nothing(counted):
    part = tables.part_path(counted, "coactivation_pairs", "c", "part-0")
    before = part.stat().st_mtime_ns, sorted((counted.run_dir("c") / "stages").iterdir())
    result = run(CoactivationConfig(run="c", engine="sql", quiet=True), counted)  # engine: not hashed
    assert result.counted == [] and result.skipped == [(0, 1), (1, 2)]
    assert (part.stat().st_mtime_ns, sorted((counted.run_dir("c") / "stages").iterdir())) == before


def test_unfinished_pair_is_recounted(counted, masks):
    group = arrays.open_group(counted.arrays("c"))
    group["coact/L1_L2"][:] = 0  # as if the write had stopped before the marker
    group["coact/L1_L2"].attrs["complete"] = False
    with pytest.raises(UserError, match="no co-activation counts for layers 1:2"):
        coact.read_counts(counted, "c", 1, 2)
    result = run(CoactivationConfig(run="c", device="cpu", quiet=True), counted)
    assert result.counted == [(1, 2)]
    np.testing.assert_array_equal(coact.read_counts(counted, "c", 1, 2), dense(masks[1], masks[2]))


@pytest.mark.parametrize("weight", coact.WEIGHTS)
def test_pair_edges_weights_match_numpy(counted_root, masks, weight):
    storage = Storage(counted_root)
    g = coact.load_run_graph(storage, "c")
    t = masks[0].shape[0]
    mc = max(dense(masks[a], masks[b]).max() for a, b in ((0, 1), (1, 2)))
    seen = []
    for (a, b), edges in coact.iter_pair_edges(storage, g, weight=weight):
        seen.append((a, b))
        c = dense(masks[a], masks[b])
        i, j = np.nonzero(c)  # count > 0 only, sorted by (neuron_a, neuron_b)
        assert edges["neuron_a"].to_pylist() == i.tolist()
        assert edges["neuron_b"].to_pylist() == j.tolist()
        np.testing.assert_array_equal(edges["count"].to_numpy(), c[i, j])
        expect = numpy_weights(c[i, j], masks[a].sum(0)[i], masks[b].sum(0)[j], t, mc)[weight]
        np.testing.assert_allclose(edges["weight"].to_numpy(), expect, rtol=1e-12)
    assert seen == [(0, 1), (1, 2)]


def test_layers_not_starting_at_zero(tmp_path, micro_model_dir, corpus_file):
    storage = extract_run(tmp_path / "storage", micro_model_dir, corpus_file, "late",
                          "--layers", "1-2")
    masks = stored_masks(storage, "late")
    assert sorted(masks) == [1, 2]
    result = run(CoactivationConfig(run="late", quiet=True), storage)
    assert result.counted == [(1, 2)]
    np.testing.assert_array_equal(coact.read_counts(storage, "late", 1, 2), dense(masks[1], masks[2]))
    pairs = tables.read_partition(storage, "coactivation_pairs", "late").to_pydict()
    assert pairs["layer_a"] == [1] and pairs["layer_b"] == [2]
    g = coact.load_run_graph(storage, "late")
    assert g.pairs == [(1, 2)] and g.offsets == {1: 0, 2: WIDTH} and g.n_nodes == 2 * WIDTH
    np.testing.assert_array_equal(g.node_ids, np.arange(WIDTH, 3 * WIDTH))  # layer-major global ids
    np.testing.assert_array_equal(g.node_layers, np.repeat([1, 2], WIDTH))
    np.testing.assert_array_equal(g.node_neurons, np.tile(np.arange(WIDTH), 2))
    for l in (1, 2):
        np.testing.assert_array_equal(g.active[l], masks[l].sum(0))
    with pytest.raises(UserError, match="did not record"):
        run(CoactivationConfig(run="late", pairs="0:1", quiet=True), storage)


@pytest.mark.parametrize("kw,needle", [
    (dict(run="nope"), "does not exist"), (dict(run="c", pairs="0-1"), "malformed"),
    (dict(run="c", pairs="0:7"), "did not record"),
    (dict(run="c", engine="cuda", device="cpu"), "needs a CUDA device"),
])
def test_bad_input(counted, kw, needle):
    with pytest.raises(UserError, match=needle):
        run(CoactivationConfig(quiet=True, **kw), counted)


@pytest.mark.parametrize("kw", [dict(engine="gpu"), dict(chunk_tokens=0), dict(chunk_tokens=9000)])
def test_bad_config(kw):
    with pytest.raises(UserError):
        CoactivationConfig(run="c", **kw)
