"""Subsets: the chosen neurons are the brute-force top k (score descending, neuron_id ascending)
of a centrality computed independently on the brute-force graph; markers skip reruns."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import coact, tables
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, marker_path, read_json
from pipeline.core.warehouse import connect
from pipeline.kernels.graphs import METHODS
from pipeline.stages.coactivation import CoactivationConfig
from pipeline.stages.coactivation import run as count
from pipeline.stages.subsets import SubsetConfig, SubsetGridConfig, run, run_grid, show, subset_size

spec = importlib.util.spec_from_file_location("test_graph_helpers",
                                              Path(__file__).resolve().with_name("test_graph.py"))
spec.loader.exec_module(graph_tests := importlib.util.module_from_spec(spec))  # not a package
coact_tests, graph_refs, WIDTH = graph_tests.coact_tests, graph_tests.graph_refs, graph_tests.WIDTH
THRESHOLD = 0.7  # a sparse graph (~200 edges of 3200): brute-force betweenness stays cheap


def reference_subset(masks, layers, method: str, threshold: float, ratio: float,
                     cutoff: int | None = 4) -> tuple[list[int], dict[int, float]]:
    """Chosen neuron ids and every node's score, from the brute-force graph and the test's own
    centrality; ties (scores within a relative 1e-9) go to the lower neuron id."""
    pairs = list(zip(layers[:-1], layers[1:]))
    edges = graph_tests.reference_edges(graph_tests.reference_weights(masks, pairs, "normalized"),
                                        threshold)
    ids = [l * WIDTH + i for l in layers for i in range(WIDTH)]
    node = {v: k for k, v in enumerate(ids)}
    pairs_array = np.array([(node[s], node[d]) for s, d in edges], np.int64).reshape(-1, 2)
    weights = np.array([w for *_, w in edges.values()])
    scores = graph_refs.reference(method, len(ids), pairs_array, weights, cutoff)
    k = max(1, min(len(ids), int(len(ids) * ratio)))
    chosen = graph_refs.ranked(scores.tolist(), ids)[:k]
    return [ids[v] for v in chosen], dict(zip(ids, scores.tolist()))


counted_root, counted, masks = coact_tests.counted_fixtures("s")


def subset_rows(storage: Storage, run_id: str, name: str) -> list[tuple]:
    with connect(storage) as con:
        return con.sql("select neuron_id, layer, neuron, rank from subsets "
                       "where run_id = $run and subset = $name order by rank",
                       params={"run": run_id, "name": name}).fetchall()


@pytest.mark.parametrize("method", METHODS)
def test_subset_is_brute_force_top_k(counted, masks, method):
    result = run(SubsetConfig(run="s", threshold=THRESHOLD, ratio=0.1, method=method, quiet=True),
                 counted)
    expect, scores = reference_subset(masks, [0, 1, 2], method, THRESHOLD, 0.1)
    frame = result.subsets
    name = f"{method}_t{THRESHOLD:g}_r0.1"
    assert frame["subset"].unique().to_list() == [name] and result.skipped == []
    assert frame["neuron_id"].to_list() == expect
    np.testing.assert_allclose(frame["score"].to_numpy(), [scores[i] for i in expect], rtol=1e-9,
                               atol=1e-12)
    assert subset_rows(counted, "s", name) == [(i, i // WIDTH, i % WIDTH, r + 1)
                                               for r, i in enumerate(expect)]
    assert coact.read_subset(counted, "s", name).tolist() == expect


def test_markers_skip_reruns(counted):
    config = SubsetConfig(run="s", threshold=THRESHOLD, ratio=0.1, method="pagerank", quiet=True)
    first = run(config, counted)
    name = "pagerank_t0.7_r0.1"
    files = [tables.part_path(counted, "subsets", "s", name), coact.subset_path(counted, "s", name)]
    stamps = [p.stat().st_mtime_ns for p in files]
    marker = read_json(marker_path(counted, "s", "subset", name))
    assert marker["config"]["method"] == "pagerank" and marker["neurons"] == 12
    again = run(config, counted)
    assert again.skipped == [name] and "skipped" in show(again)
    assert again.subsets.equals(first.subsets) and [p.stat().st_mtime_ns for p in files] == stamps
    # the grid finds the same subset done and selects only the others
    grid = run_grid(SubsetGridConfig(run="s", thresholds=[THRESHOLD], ratios=[0.1, 0.2],
                                     methods=["pagerank"], quiet=True), counted)
    assert grid.skipped == [name] and [p.stat().st_mtime_ns for p in files] == stamps
    assert grid.subsets["subset"].unique(maintain_order=True).to_list() == [name, "pagerank_t0.7_r0.2"]
    assert run_grid(SubsetGridConfig(run="s", thresholds=[THRESHOLD], ratios=[0.1, 0.2],
                                     methods=["pagerank"], quiet=True), counted).skipped == \
        [name, "pagerank_t0.7_r0.2"]
    assert (counted.run_dir("s") / "stages" / "subset-grid.json").exists()
    inodes = [p.stat().st_ino for p in files]
    redone = run(SubsetConfig(run="s", threshold=THRESHOLD, ratio=0.1, method="pagerank",
                              overwrite=True, quiet=True), counted)
    assert redone.skipped == [] and redone.subsets.equals(first.subsets)
    assert all(p.stat().st_ino != i for p, i in zip(files, inodes))  # each rewritten (renamed in)


def test_new_counts_select_again(counted, masks):
    config = SubsetConfig(run="s", threshold=THRESHOLD, ratio=0.1, method="degree", quiet=True)
    run(config, counted)
    count(CoactivationConfig(run="s", pairs="0:2", quiet=True), counted)
    result = run(config, counted)
    assert result.skipped == []
    degree = np.zeros(3 * WIDTH)
    weights = graph_tests.reference_weights(masks, [(0, 1), (1, 2), (0, 2)], "normalized")
    for s, d in graph_tests.reference_edges(weights, THRESHOLD):
        degree[[s, d]] += 1
    assert result.subsets["neuron_id"].to_list() == \
        sorted(range(3 * WIDTH), key=lambda v: (-degree[v], v))[:12]


def test_grid_equals_single_subsets(counted, counted_root, tmp_path):
    grid = run_grid(SubsetGridConfig(run="s", thresholds=[0.6, THRESHOLD], ratios=[0.05, 0.1],
                                     methods=["degree", "coreness"], quiet=True), counted)
    names = grid.subsets["subset"].unique(maintain_order=True).to_list()
    assert names == [f"{m}_t{t:g}_r{r:g}" for t in (0.6, THRESHOLD) for m in ("degree", "coreness")
                     for r in (0.05, 0.1)]
    single = Storage(shutil.copytree(counted_root, tmp_path / "single"))
    for t in (0.6, THRESHOLD):
        for m in ("degree", "coreness"):
            for r in (0.05, 0.1):
                one = run(SubsetConfig(run="s", threshold=t, ratio=r, method=m, quiet=True), single)
                assert one.subsets.equals(grid.subsets.filter(
                    grid.subsets["subset"] == f"{m}_t{t:g}_r{r:g}"))


def test_named_subset(counted):
    run(SubsetConfig(run="s", threshold=THRESHOLD, ratio=0.05, name="mine", quiet=True), counted)
    assert len(coact.read_subset(counted, "s", "mine")) == 6
    assert [r[3] for r in subset_rows(counted, "s", "mine")] == list(range(1, 7))
    with pytest.raises(UserError, match="has no subset 'other'"):
        coact.read_subset(counted, "s", "other")
    with pytest.raises(UserError, match="not valid"):
        coact.read_subset(counted, "s", "../s/subsets/mine")


def test_layers_not_starting_at_zero(tmp_path, micro_model_dir, corpus_file):
    storage = coact_tests.extract_run(tmp_path / "storage", micro_model_dir, corpus_file, "late",
                                      "--layers", "1-2")
    count(CoactivationConfig(run="late", quiet=True), storage)
    masks = coact_tests.stored_masks(storage, "late")
    for method in ("degree", "pagerank"):
        result = run(SubsetConfig(run="late", threshold=0.6, ratio=0.1, method=method,
                                  quiet=True), storage)
        expect, _ = reference_subset(masks, [1, 2], method, 0.6, 0.1)
        assert result.subsets["neuron_id"].to_list() == expect and len(expect) == 8
        assert result.subsets["layer"].to_list() == [i // WIDTH for i in expect]
        assert result.subsets["neuron"].to_list() == [i % WIDTH for i in expect]


def test_k_rounding():
    assert subset_size(120, 1e-9) == 1 and subset_size(120, 1.0) == 120
    assert subset_size(307200, 0.01) == 3072 and subset_size(7, 0.5) == 3


@pytest.mark.parametrize("kw,needle", [
    (dict(threshold=1.5), "outside"), (dict(ratio=0.0), "outside"), (dict(ratio=1.2), "outside"),
    (dict(method="closeness2"), "unknown"), (dict(weight="npmi", threshold=-2), "outside"),
    (dict(name="a/b"), "subset name 'a/b' is not valid"), (dict(betweenness_cutoff=-1), "cutoff"),
])
def test_bad_config(kw, needle):
    with pytest.raises(UserError, match=needle):
        SubsetConfig(run="s", **kw)


def test_bad_grid_config():
    with pytest.raises(UserError, match="unknown"):
        SubsetGridConfig(run="s", methods=["degree", "closeness2"])
    with pytest.raises(UserError, match="outside"):
        SubsetGridConfig(run="s", ratios=[0.1, 2.0])


def test_no_edge_above_threshold_names_a_threshold(counted):
    with pytest.raises(UserError, match="largest normalized weight is 1"):
        run(SubsetConfig(run="s", threshold=1.0, ratio=0.1, quiet=True), counted)
    assert not marker_path(counted, "s", "subset", "degree_t1_r0.1").exists()
