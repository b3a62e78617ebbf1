"""The graph stage on real extractions: the edges and threshold_analysis tables, read back through
the warehouse views, equal a brute-force graph (dense mask products, the reference weight
formulas, BFS components); reruns skip; an interrupted stage leaves the old graph intact."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import coact
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, marker_path, read_json
from pipeline.core.warehouse import connect
from pipeline.report.graph import draw
from pipeline.stages import graph
from pipeline.stages.coactivation import CoactivationConfig
from pipeline.stages.coactivation import run as count
from pipeline.stages.graph import GraphConfig, show


def load_helpers(path: Path):
    """A sibling test module, for its helpers and fixtures (the tests are not a package)."""
    spec = importlib.util.spec_from_file_location(f"{path.stem}_helpers", path)
    spec.loader.exec_module(module := importlib.util.module_from_spec(spec))
    return module


HERE = Path(__file__).resolve().parent
coact_tests = load_helpers(HERE / "test_coactivation.py")  # extraction, masks, weight formulas
graph_refs = load_helpers(HERE.parent / "kernels" / "test_graphs.py")  # BFS components
WIDTH = coact_tests.WIDTH
# npmi goes through ln, which DuckDB and NumPy may round differently in the last bit: an npmi
# weight this close to a threshold may go either way. The other weights are quotients of
# integers, correctly rounded by both, so their ties with a threshold are compared exactly.
EPS = {"normalized": 0.0, "jaccard": 0.0, "npmi": 1e-9}


# -- the brute-force graph


def reference_weights(masks, pairs, weight: str) -> dict:
    """(a, b) -> (counts [40, 40], weights [40, 40]; nan where the count is 0), from the masks."""
    t = next(iter(masks.values())).shape[0]
    counts = {(a, b): coact_tests.dense(masks[a], masks[b]) for a, b in pairs}
    mc = max(c.max() for c in counts.values())
    out = {}
    for (a, b), c in counts.items():
        n_a, n_b = masks[a].sum(0)[:, None], masks[b].sum(0)[None, :]
        w = coact_tests.numpy_weights(c, n_a, n_b, t, mc)[weight]
        out[(a, b)] = c, np.where(c > 0, w, np.nan)
    return out


def reference_edges(weights: dict, threshold: float, margin: float = 0.0) -> dict:
    """{(source, target): (layer_a, layer_b, count, weight)} of the edges with weight >
    threshold + margin; global ids are layer * 40 + neuron (every layer of the micro model is 40 wide)."""
    out = {}
    for (a, b), (c, w) in weights.items():
        for i, j in zip(*np.nonzero(w > threshold + margin)):
            out[(a * WIDTH + int(i), b * WIDTH + int(j))] = (a, b, int(c[i, j]), float(w[i, j]))
    return out


def reference_analysis(weights: dict, layers: list[int], thresholds: list[float],
                       eps: float = 0.0) -> list[dict]:
    nodes = [l * WIDTH + i for l in layers for i in range(WIDTH)]
    index = {v: k for k, v in enumerate(nodes)}
    everything = reference_edges(weights, -np.inf)
    rows = []
    for t in thresholds:
        assert not any(0 < abs(w - t) < eps for *_, w in everything.values()), "ambiguous threshold"
        kept = [(index[s], index[d]) for s, d in reference_edges(weights, t)]
        sizes = graph_refs.ref_components(len(nodes), np.array(kept, np.int64).reshape(-1, 2))
        rows.append({"threshold": t, "nodes_with_edge": len({v for e in kept for v in e}),
                     "edges": len(kept), "components": len(sizes), "min_component": min(sizes),
                     "max_component": max(sizes), "mean_component": len(nodes) / len(sizes),
                     "nontrivial_components": sum(s > 1 for s in sizes)})
    return rows


def view_edges(storage: Storage, run: str, weight: str, threshold: float) -> dict:
    with connect(storage) as con:
        rows = con.sql(
            "select source, target, layer_a, layer_b, count, weight from edges "
            "where run_id = $run and weight_kind = $weight and threshold = $threshold",
            params={"run": run, "weight": weight, "threshold": threshold}).fetchall()
    out = {(s, d): (la, lb, c, w) for s, d, la, lb, c, w in rows}
    assert len(out) == len(rows), "an edge is listed twice"
    return out


def view_analysis(storage: Storage, run: str, weight: str) -> list[dict]:
    with connect(storage) as con:
        frame = con.sql("select * exclude (run_id, weight) from threshold_analysis "
                        "where run_id = $run and weight = $weight order by threshold",
                        params={"run": run, "weight": weight}).pl()
    return frame.to_dicts()


def assert_edges_equal(got: dict, weights: dict, threshold: float, eps: float = 0.0) -> None:
    """The stage's edges are every brute-force edge above the threshold, none else, same values
    (an edge within eps of the threshold may go either way)."""
    sure, maybe = reference_edges(weights, threshold, eps), reference_edges(weights, threshold, -eps)
    assert set(sure) <= set(got) <= set(maybe)
    for key, (la, lb, c, w) in got.items():
        assert (la, lb, c) == maybe[key][:3]
        assert w == pytest.approx(maybe[key][3], rel=1e-12, abs=1e-15)


counted_root, counted, masks = coact_tests.counted_fixtures("g")


CASES = [("normalized", 0.5, [0.3, 0.5, 0.7, 0.9]), ("jaccard", 0.4, [0.2, 0.4, 0.5, 0.6]),
         ("npmi", 0.1, [-0.2, 0.0, 0.1, 0.3])]


@pytest.mark.parametrize("weight,threshold,thresholds", CASES)
def test_graph_tables_equal_brute_force(counted, masks, weight, threshold, thresholds):
    result = graph.run(GraphConfig(run="g", weight=weight, threshold=threshold,
                                   thresholds=thresholds, quiet=True), counted)
    weights = reference_weights(masks, [(0, 1), (1, 2)], weight)
    got = view_edges(counted, "g", weight, threshold)
    assert 0 < len(got) < 2 * WIDTH * WIDTH
    assert_edges_equal(got, weights, threshold, EPS[weight])
    expect = reference_analysis(weights, [0, 1, 2], thresholds, EPS[weight])
    assert view_analysis(counted, "g", weight) == [pytest.approx(row) for row in expect]
    at = reference_analysis(weights, [0, 1, 2], [threshold], EPS[weight])[0]
    assert (result.nodes, result.edges, result.components) == (3 * WIDTH, at["edges"], at["components"])
    assert not result.skipped and result.analysis["threshold"].to_list() == thresholds
    marker = read_json(marker_path(counted, "g", "graph", coact.graph_part(weight, threshold)))
    assert marker["config"]["thresholds"] == thresholds and marker["edges"] == len(got)


def test_rerun_is_skipped_and_overwrite_rebuilds(counted, masks):
    config = GraphConfig(run="g", threshold=0.5, quiet=True)
    first = graph.run(config, counted)
    stamp = first.edges_path.stat().st_mtime_ns
    again = graph.run(config, counted)
    assert again.skipped and "skipped" in show(again) and first.edges_path.stat().st_mtime_ns == stamp
    assert (again.nodes, again.edges, again.components) == (first.nodes, first.edges, first.components)
    assert again.analysis.equals(first.analysis)
    inode = first.edges_path.stat().st_ino
    rebuilt = graph.run(GraphConfig(run="g", threshold=0.5, overwrite=True, quiet=True), counted)
    # rewritten by an atomic rename: a new inode, whatever the clock's resolution
    assert not rebuilt.skipped and first.edges_path.stat().st_ino != inode
    # other analysis thresholds replace the shared analysis part: the first graph is rebuilt
    graph.run(GraphConfig(run="g", threshold=0.7, thresholds=[0.2], quiet=True), counted)
    assert not graph.run(config, counted).skipped
    assert_edges_equal(view_edges(counted, "g", "normalized", 0.5),
                       reference_weights(masks, [(0, 1), (1, 2)], "normalized"), 0.5)
    assert set(view_edges(counted, "g", "normalized", 0.7)) == \
        set(reference_edges(reference_weights(masks, [(0, 1), (1, 2)], "normalized"), 0.7))


def test_new_counts_rebuild_the_graph(counted, masks):
    config = GraphConfig(run="g", threshold=0.5, quiet=True)
    graph.run(config, counted)
    count(CoactivationConfig(run="g", pairs="0:2", quiet=True), counted)
    result = graph.run(config, counted)
    assert not result.skipped
    weights = reference_weights(masks, [(0, 1), (1, 2), (0, 2)], "normalized")
    got = view_edges(counted, "g", "normalized", 0.5)
    assert_edges_equal(got, weights, 0.5)
    assert {(la, lb) for la, lb, *_ in got.values()} == {(0, 1), (1, 2), (0, 2)}


def _failing_second_read(monkeypatch, seen: list):
    """Make the second pair's counts unreadable; the callback records what readers see then."""
    real = coact.read_counts
    calls = []

    def read_counts(storage, run, a, b):
        calls.append((a, b))
        if len(calls) == 2:
            part_dir = storage.table_partition("edges", run)
            seen.append(([p.name for p in part_dir.iterdir()] if part_dir.exists() else [],
                         view_edges(storage, run, "normalized", 0.5)))
            raise OSError("disk gone")
        return real(storage, run, a, b)

    monkeypatch.setattr(coact, "read_counts", read_counts)


def test_interrupted_graph_keeps_the_old_edges(counted, masks, monkeypatch):
    old = graph.run(GraphConfig(run="g", threshold=0.5, thresholds=[0.3], quiet=True), counted)
    marker = marker_path(counted, "g", "graph", "normalized-0.5")
    before = (view_edges(counted, "g", "normalized", 0.5), view_analysis(counted, "g", "normalized"),
              marker.read_text(), sorted(p.name for p in old.edges_path.parent.iterdir()))
    seen = []
    _failing_second_read(monkeypatch, seen)
    config = GraphConfig(run="g", threshold=0.5, thresholds=[0.3, 0.6], quiet=True)
    with pytest.raises(OSError, match="disk gone"):
        graph.run(config, counted)
    names, visible = seen[0]
    assert any(n.startswith(".normalized-0.5.parquet.tmp-") for n in names)  # being written...
    assert visible == before[0]  # ...but not seen by the view
    after = (view_edges(counted, "g", "normalized", 0.5), view_analysis(counted, "g", "normalized"),
             marker.read_text(), sorted(p.name for p in old.edges_path.parent.iterdir()))
    assert after == before  # old edges, analysis and marker intact; the temporary file is gone
    monkeypatch.undo()
    result = graph.run(config, counted)
    assert not result.skipped and result.analysis["threshold"].to_list() == [0.3, 0.6]
    assert_edges_equal(view_edges(counted, "g", "normalized", 0.5),
                       reference_weights(masks, [(0, 1), (1, 2)], "normalized"), 0.5)


def test_interrupted_first_graph_leaves_nothing(counted, monkeypatch):
    seen = []
    _failing_second_read(monkeypatch, seen)
    with pytest.raises(OSError, match="disk gone"):
        graph.run(GraphConfig(run="g", threshold=0.5, quiet=True), counted)
    assert seen[0][1] == {}
    assert not counted.table_partition("edges", "g").exists() or \
        list(counted.table_partition("edges", "g").iterdir()) == []
    assert view_analysis(counted, "g", "normalized") == []
    assert not marker_path(counted, "g", "graph", "normalized-0.5").exists()


def test_layers_not_starting_at_zero(tmp_path, micro_model_dir, corpus_file):
    storage = coact_tests.extract_run(tmp_path / "storage", micro_model_dir, corpus_file, "late",
                                      "--layers", "1-2")
    count(CoactivationConfig(run="late", quiet=True), storage)
    result = graph.run(GraphConfig(run="late", threshold=0.5, thresholds=[0.3, 0.5, 0.7],
                                   quiet=True), storage)
    masks = coact_tests.stored_masks(storage, "late")
    weights = reference_weights(masks, [(1, 2)], "normalized")
    got = view_edges(storage, "late", "normalized", 0.5)
    assert_edges_equal(got, weights, 0.5)
    assert all(WIDTH <= s < 2 * WIDTH <= d < 3 * WIDTH for s, d in got)
    assert result.nodes == 2 * WIDTH
    assert view_analysis(storage, "late", "normalized") == \
        [pytest.approx(row) for row in reference_analysis(weights, [1, 2], [0.3, 0.5, 0.7])]


def test_figures_are_drawn_from_the_tables(counted):
    config = GraphConfig(run="g", threshold=0.5, thresholds=[0.3, 0.5], quiet=True)
    result = graph.run(config, counted)
    paths = draw(result, config, counted)
    names = sorted(p.name for p in paths)
    assert names == ["degrees_normalized_0.5.png", "edge_weights_normalized.png",
                     "threshold_analysis_normalized.csv", "threshold_analysis_normalized.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    import polars as pl

    csv = pl.read_csv(counted.reports("g") / "threshold_analysis_normalized.csv")
    assert csv.to_dicts() == view_analysis(counted, "g", "normalized")


def test_no_edge_above_threshold_writes_nothing(counted):
    with pytest.raises(UserError, match="largest normalized weight is 1"):
        graph.run(GraphConfig(run="g", threshold=1.0, quiet=True), counted)
    assert view_edges(counted, "g", "normalized", 1.0) == {}
    assert not marker_path(counted, "g", "graph", "normalized-1").exists()


@pytest.mark.parametrize("kw,needle", [
    (dict(threshold=1.5), "outside"), (dict(weight="npmi", threshold=-2), "outside"),
    (dict(thresholds=[0.1, -0.5]), "outside"), (dict(weight="cosine"), "unknown"),
])
def test_bad_config(kw, needle):
    with pytest.raises(UserError, match=needle):
        GraphConfig(run="g", **kw)


def test_run_without_counts(tmp_path, micro_model_dir, corpus_file):
    storage = coact_tests.extract_run(tmp_path / "storage", micro_model_dir, corpus_file, "bare")
    with pytest.raises(UserError, match="no co-activation counts: run `nwh coactivation"):
        graph.run(GraphConfig(run="bare", quiet=True), storage)
