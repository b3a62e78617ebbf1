"""Thresholded graphs, the one-pass threshold analysis and subsets, against brute force."""

from __future__ import annotations

import igraph as ig
import numpy as np
import pytest

from pipeline.stages.coactivation import CoactivationConfig, coactivation, iter_pair_edges, read_counts
from pipeline.core.errors import UserError
from pipeline.stages.extract import ExtractConfig, extract
from pipeline.stages.graph import (
    GraphConfig,
    graph_stage,
    load_run_graph,
    pair_weights,
    threshold_analysis,
    thresholded_edges,
)
from pipeline.core.storage import Storage
from pipeline.stages.subsets import SubsetConfig, centrality, read_subset, select_subsets, subset_size


@pytest.fixture(scope="module")
def counted(tmp_path_factory, micro_model_dir, corpus_file):
    storage = Storage(tmp_path_factory.mktemp("graph"))
    extract(ExtractConfig(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=12,
                          max_length=32, run="g"), storage, progress=False)
    coactivation(CoactivationConfig(run="g"), storage, progress=False)
    return storage


@pytest.mark.parametrize("weight", ["normalized", "jaccard", "npmi"])
def test_numpy_weights_equal_sql(counted, weight):
    g = load_run_graph(counted, "g")
    for (a, b), edges in iter_pair_edges(counted, "g"):
        e = edges.to_pydict()
        w = pair_weights(read_counts(counted, "g", a, b), g.active[a], g.active[b], g.tokens,
                         g.max_count, weight)
        np.testing.assert_allclose(w[e["neuron_a"], e["neuron_b"]], e[weight], rtol=1e-12)
        assert (w[read_counts(counted, "g", a, b) == 0] == -np.inf).all()


def test_thresholded_edges_dense(counted):
    g = load_run_graph(counted, "g")
    edges, counts, weights = thresholded_edges(g, counted, "normalized", 0.5)
    expect = set()
    for a, b in g.pairs:
        c = read_counts(counted, "g", a, b)
        for i, j in zip(*np.nonzero(c / g.max_count > 0.5)):
            expect.add((a * 40 + i, b * 40 + j))
    assert set(map(tuple, edges.tolist())) == expect
    assert (weights > 0.5).all() and len(counts) == len(expect)


def reference_analysis(n, edges, weights, t):
    graph = ig.Graph(n=n, edges=edges[weights > t].tolist())
    sizes = np.array(graph.connected_components().sizes())
    return [int((np.array(graph.degree()) > 0).sum()), int((weights > t).sum()), len(sizes),
            int(sizes.min()), int(sizes.max()), n / len(sizes), int((sizes > 1).sum())]


@pytest.mark.parametrize("seed", range(5))
def test_threshold_analysis_equals_igraph_per_threshold(seed):
    rng = np.random.default_rng(seed)
    n, m = 60, 120
    edges = rng.integers(0, n, size=(m, 2))
    weights = np.round(rng.random(m), 2)  # ties on purpose
    thresholds = [0.0, 0.1, 0.25, 0.5, 0.9, 0.99]
    got = threshold_analysis(n, edges, weights, thresholds)
    for row in got.iter_rows(named=True):
        ref = reference_analysis(n, edges, weights, row["threshold"])
        assert [row["nodes_with_edge"], row["edges"], row["components"], row["min_component"],
                row["max_component"]] == ref[:5]
        assert row["mean_component"] == pytest.approx(ref[5])
        assert row["nontrivial_components"] == ref[6]


def test_graph_stage_tables(counted):
    summary = graph_stage(GraphConfig(run="g", threshold=0.3, thresholds=[0.1, 0.3, 0.6]), counted)
    assert summary["nodes"] == 120 and summary["edges"] > 0
    assert summary["analysis"]["threshold"].to_list() == [0.1, 0.3, 0.6]
    assert (counted.reports("g") / "threshold_analysis_normalized.png").exists()


def test_subsets_brute_force(counted):
    g = load_run_graph(counted, "g")
    edges, _, weights = thresholded_edges(g, counted, "normalized", 0.3)
    out = select_subsets(counted, "g", thresholds=[0.3], ratios=[0.1],
                         methods=["degree", "strength", "pagerank"])
    degree = [0] * 120
    strength = [0.0] * 120
    for (u, v), w in zip(edges.tolist(), weights.tolist()):
        degree[u] += 1
        degree[v] += 1
        strength[u] += w
        strength[v] += w
    graph = ig.Graph(n=120, edges=edges.tolist())
    pagerank = graph.pagerank()
    for method, scores in (("degree", degree), ("strength", strength), ("pagerank", pagerank)):
        expect = sorted(range(120), key=lambda i: (-scores[i], i))[:12]
        got = out.filter(out["method"] == method)
        assert got["neuron_id"].to_list() == expect
        np.testing.assert_allclose(got["score"].to_numpy(), [scores[i] for i in expect])
    assert read_subset(counted, "g", "degree_t0.3_r0.1").tolist() == \
        out.filter(out["method"] == "degree")["neuron_id"].to_list()


def test_every_method_runs(counted):
    g = load_run_graph(counted, "g")
    edges, _, weights = thresholded_edges(g, counted, "normalized", 0.3)
    for method in ("eigenvector", "betweenness", "harmonic", "coreness"):
        scores = centrality(method, g.n_nodes, edges, weights)
        assert scores.shape == (120,) and np.isfinite(scores).all()


def test_k_rounding():
    assert subset_size(120, 1e-9) == 1 and subset_size(120, 1.0) == 120
    assert subset_size(307200, 0.01) == 3072 and subset_size(7, 0.5) == 3


@pytest.mark.parametrize("kw,needle", [
    (dict(threshold=1.5), "outside"), (dict(ratio=0.0), "outside"), (dict(ratio=1.2), "outside"),
    (dict(method="closeness2"), "unknown"), (dict(weight="npmi", threshold=-2), "outside"),
])
def test_bad_config(kw, needle):
    with pytest.raises(UserError, match=needle):
        SubsetConfig(run="g", **kw)


def test_no_edge_above_threshold_names_a_threshold(counted):
    with pytest.raises(UserError, match="largest normalized weight is 1"):
        select_subsets(counted, "g", thresholds=[1.0], ratios=[0.1], methods=["degree"])


def test_streaming_analysis_is_order_free():
    from pipeline.stages.graph import ThresholdAnalysis

    rng = np.random.default_rng(7)
    edges = rng.integers(0, 50, size=(300, 2))
    weights = rng.random(300)
    whole = threshold_analysis(50, edges, weights, [0.2, 0.5, 0.8])
    streamed = ThresholdAnalysis(50, [0.8, 0.2, 0.5])
    order = rng.permutation(300)
    for chunk in np.array_split(order, 7):
        streamed.add(edges[chunk, 0], edges[chunk, 1], weights[chunk])
    assert streamed.result().equals(whole)
