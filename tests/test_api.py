"""The Python API against truth read another way: the Zarr arrays opened with zarr and unpacked
with np.unpackbits, statistics of an independent forward pass in dense NumPy, top tokens by a
plain loop over the tokens table."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from reference import mlp_inputs

from pipeline.api import Neuron, Warehouse, stages
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage
from pipeline.stages import extract

THRESHOLD, SKIP, WIDTH, LENGTH, SAMPLES = 0.02, 2, 40, 16, 6


@pytest.fixture(scope="module")
def wh(tmp_path_factory, micro_model_dir, corpus_file) -> Warehouse:
    """Two runs of a micro GPT-2: 'dense' (acts stored, first SKIP positions left out of the
    accumulators) through Warehouse.run, 'masks' (masks only) through the stage function."""
    root = tmp_path_factory.mktemp("api")
    wh = Warehouse(root)
    common = dict(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=SAMPLES,
                  max_length=LENGTH, batch_size=3, device="cpu", active_threshold=THRESHOLD,
                  chunk_tokens=40, quiet=True)
    wh.run("extract", **common, store_acts=True, skip_positions=SKIP, run="dense")
    extract.run(extract.ExtractConfig(**common, run="masks"), Storage(root))
    return wh


def tokens_of(wh: Warehouse, run: str) -> dict:
    """The tokens partition's files read with pyarrow, sorted by row."""
    parts = sorted(wh.storage.table_partition("tokens", run).glob("*.parquet"))
    t = pa.concat_tables([pq.read_table(p) for p in parts]).sort_by("row").to_pydict()
    assert t["row"] == list(range(SAMPLES * LENGTH))
    return t


@pytest.fixture(scope="module")
def reference(wh, micro_model_dir) -> dict[int, np.ndarray]:
    """float64 [rows, width] activations of an independent forward pass on the run's tokens."""
    t = tokens_of(wh, "dense")
    ids = np.array(t["token_id"]).reshape(SAMPLES, LENGTH)
    return {l: a.astype(np.float64) for l, a in mlp_inputs(micro_model_dir, ids).items()}


def zarr_array(wh: Warehouse, run: str, name: str) -> np.ndarray:
    return zarr.open_group(str(wh.root / "runs" / run / "arrays.zarr"), mode="r")[name][:]


def unpacked(wh: Warehouse, run: str, layer: int) -> np.ndarray:
    packed = zarr_array(wh, run, f"active/L{layer}")
    return np.unpackbits(packed, axis=1, bitorder="little")[:, :WIDTH].astype(bool)


# -- arrays


@pytest.mark.parametrize("run", ["dense", "masks"])
def test_masks_are_the_unpacked_bits(wh, run):
    for layer in range(3):
        got = wh.masks(run, layer)
        assert got.dtype == bool and got.shape == (SAMPLES * LENGTH, WIDTH)
        assert np.array_equal(got, unpacked(wh, run, layer))


def test_masks_are_acts_above_the_threshold(wh, reference):
    for layer, a in reference.items():
        clear = np.abs(a - THRESHOLD) > 1e-5  # entries far from the threshold decide exactly
        assert np.array_equal(wh.masks("dense", layer)[clear], (a > THRESHOLD)[clear])


def test_acts_are_the_stored_float16(wh, reference):
    for layer, a in reference.items():
        got = wh.acts("dense", layer)
        stored = zarr_array(wh, "dense", f"acts/L{layer}")
        assert got.dtype == np.float32 and np.array_equal(got, stored.astype(np.float32))
        np.testing.assert_allclose(got, a, rtol=5e-4, atol=6e-8)


@pytest.mark.parametrize("rows, expect", [
    (slice(3, 9), list(range(3, 9))),
    (range(10, 30, 7), [10, 17, 24]),
    (slice(None, None, 25), [0, 25, 50, 75]),
    ([40, 2, 40, 95], [40, 2, 40, 95]),   # any order, repeats kept
    (np.array([-1, 0]), [95, 0]),          # negative rows count from the end
    (7, [7]),
    (slice(90, 200), list(range(90, 96))),  # a slice is clipped, as in Python
    ([], []),
])
def test_row_selections(wh, rows, expect):
    acts = zarr_array(wh, "dense", "acts/L1").astype(np.float32)
    masks = unpacked(wh, "dense", 1)
    got = wh.acts("dense", 1, rows)
    assert got.shape == (len(expect), WIDTH) and np.array_equal(got, acts[expect])
    assert np.array_equal(wh.masks("dense", 1, rows), masks[expect])


# -- one neuron


@pytest.mark.parametrize("layer, n", [(0, 0), (1, 7), (2, 39)])
def test_neuron_stats_match_numpy(wh, reference, layer, n):
    t = tokens_of(wh, "dense")
    included = np.array(t["position"]) >= SKIP
    x = reference[layer][included, n]
    got = wh.neuron("dense", layer, n)
    assert isinstance(got, Neuron) and got.neuron_id == layer * WIDTH + n
    s = got.stats
    assert (s["layer"], s["neuron"], s["neuron_id"]) == (layer, n, layer * WIDTH + n)
    assert s["count"] == included.sum() == SAMPLES * (LENGTH - SKIP)
    mu, sd = x.mean(), x.std()
    for name, expect in [("sum", x.sum()), ("sum_abs", np.abs(x).sum()), ("min", x.min()),
                         ("max", x.max()), ("mean", mu), ("var", x.var()),
                         ("skew", ((x - mu) ** 3).mean() / sd ** 3),
                         ("kurt", ((x - mu) ** 4).mean() / sd ** 4)]:
        assert s[name] == pytest.approx(expect, rel=1e-4, abs=1e-7), name
    bits = unpacked(wh, "dense", layer)[included, n]
    assert s["active_count"] == bits.sum() and s["frequency"] == pytest.approx(bits.mean())


def test_neuron_values_are_acts_when_stored_else_mask_bits(wh):
    dense, masks = wh.neuron("dense", 1, 13), wh.neuron("masks", 1, 13)
    assert dense.kind == "acts" and dense.values.dtype == np.float32
    assert np.array_equal(dense.values, zarr_array(wh, "dense", "acts/L1")[:, 13].astype(np.float32))
    assert masks.kind == "active" and masks.values.dtype == bool
    assert np.array_equal(masks.values, unpacked(wh, "masks", 1)[:, 13])
    assert masks.top_tokens is None and "no dense acts" in repr(masks)
    assert "neuron_id=53" in repr(dense) and "20 top tokens" in repr(dense)


def test_top_tokens_by_a_plain_loop(wh):
    k, context = 5, 3
    got = wh.neuron("dense", 2, 4, k=k, context=context).top_tokens
    t = tokens_of(wh, "dense")
    values = zarr_array(wh, "dense", "acts/L2")[:, 4].astype(np.float64)
    order = sorted(range(len(values)), key=lambda r: (-values[r], r))[:k]
    expect = []
    for r in order:
        before = [q for q in range(len(values)) if t["sample"][q] == t["sample"][r]
                  and t["position"][r] - context <= t["position"][q] < t["position"][r]]
        expect.append((r, t["token"][r], "".join(t["token"][q] for q in before)))
    assert list(zip(got["row"], got["token"], got["context"])) == expect
    assert got["rank"].to_list() == list(range(1, k + 1))
    np.testing.assert_allclose(got["value"].to_numpy(), values[order])


# -- tables and SQL


def test_runs_and_tokens(wh):
    runs = wh.runs()
    assert runs["run_id"].to_list() == ["dense", "masks"]
    assert runs["num_rows"].to_list() == [SAMPLES * LENGTH] * 2
    tokens = wh.tokens("dense")
    t = tokens_of(wh, "dense")
    assert tokens["row"].to_list() == t["row"] and tokens["token"].to_list() == t["token"]


def test_sql_with_and_without_bound_parameters(wh):
    frame = wh.sql("select layer, count(*) as n, sum(active_count) as active from neuron_stats "
                   "where run_id = $run group by layer order by layer", run="dense")
    assert frame["n"].to_list() == [WIDTH] * 3
    assert frame["active"].to_list() == [int(unpacked(wh, "dense", l)[
        np.array(tokens_of(wh, "dense")["position"]) >= SKIP].sum()) for l in range(3)]
    assert wh.sql("select count(*) as c from tokens")["c"].to_list() == [2 * SAMPLES * LENGTH]
    # a value with a quote is bound, never pasted into the query
    assert wh.sql("select count(*) as c from runs where run_id = $r", r="x' or '1'='1").item() == 0


def test_an_empty_warehouse_has_empty_tables(tmp_path):
    wh = Warehouse(tmp_path / "none")
    assert wh.runs().height == 0 and "run_id" in wh.runs().columns


# -- stages


def test_stages_lists_every_subcommand():
    known = stages()
    assert {"extract", "dormancy", "top-tokens", "gradients", "universal"} <= set(known)
    assert known["extract"].config is extract.ExtractConfig and known["extract"].run is extract.run


def test_run_dispatches_by_name_and_underscores(wh, tmp_path):
    top = wh.run("top_tokens", run="dense", layer=2, neuron=4, k=3)
    values = zarr_array(wh, "dense", "acts/L2")[:, 4]
    assert top.frame["row"].to_list() == sorted(range(len(values)), key=lambda r: (-values[r], r))[:3]
    rows = wh.run("dormancy", run="masks", log_file=str(tmp_path / "log.csv")).rows
    assert rows["layer"].to_list() == [0, 1, 2]


# -- bad input: one line, nothing written


@pytest.mark.parametrize("call, message", [
    (lambda wh: wh.neuron("nope", 0, 0), "does not exist"),
    (lambda wh: wh.masks("nope", 0), "does not exist"),
    (lambda wh: wh.masks("dense", 3), "did not record layer 3"),
    (lambda wh: wh.neuron("dense", -1, 0), "did not record layer -1"),
    (lambda wh: wh.neuron("dense", 0, WIDTH), "out of range"),
    (lambda wh: wh.acts("masks", 1), "no dense activations"),
    (lambda wh: wh.acts("dense", 1, [SAMPLES * LENGTH]), "out of range"),
    (lambda wh: wh.masks("dense", 1, [0.5]), "row numbers"),
    (lambda wh: wh.masks("dense", 1, np.ones(3, bool)), "row numbers"),
    (lambda wh: wh.tokens("nope"), "does not exist"),
    (lambda wh: wh.sql("select * from no_such_table"), "query failed"),
    (lambda wh: wh.sql("select * from runs where run_id = $r", q=1), "query failed"),
    (lambda wh: wh.run("extrakt"), "unknown"),
    (lambda wh: wh.run("dormancy", run="dense", thresh=0.1), "no option"),
    (lambda wh: wh.run("dormancy"), "needs option"),
])
def test_bad_input_is_a_user_error(wh, call, message):
    before = sorted(p for p in wh.root.rglob("*"))
    with pytest.raises(UserError, match=message) as e:
        call(wh)
    assert "\n" not in str(e.value)
    assert sorted(p for p in wh.root.rglob("*")) == before
