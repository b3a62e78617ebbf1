"""Thresholded co-activation graphs: edges above a weight threshold, igraph, threshold analysis.

    nwh graph --run demo-corpus --threshold 0.5                  # edges table + summary
    nwh graph --run demo-corpus --weight jaccard --thresholds 0.1 0.2 0.3

The base graph (every neuron of layer l to every neuron of layer l+1) stays implicit: its
nodes are the `neurons` table, its edge weights are computed pair by pair from the Zarr counts.
Thresholding keeps the edges with weight > threshold (as the reference does), writes them to
the `edges` table, and builds an igraph Graph from NumPy arrays (Graph(n) + add_edges, the lean
path). The threshold analysis is one streaming pass over the edges with one union-find per
threshold, so its memory is O(nodes x thresholds) whatever the number of edges.

Weights of an edge (i in layer a, j in layer b), with C the count, n the active counts, T rows:
    normalized = C / max C over the run (the reference), jaccard = C / (n_i + n_j - C),
    npmi = ln(C T / (n_i n_j)) / -ln(C / T)   (1 when C = T). sql/edge_weights.sql is the
    readable definition; `pair_weights` computes the same in NumPy (tested equal) for speed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import polars as pl

from pipeline.core import arrays, tables
from pipeline.core.config import add_arguments, from_args, opt
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage

log = logging.getLogger(__name__)

WEIGHTS = ("normalized", "jaccard", "npmi")
DEFAULT_THRESHOLDS = [round(0.1 * i, 1) for i in range(10)]


def check_threshold(weight: str, threshold: float) -> None:
    if weight not in WEIGHTS:
        raise UserError(f"--weight {weight!r} is unknown: use one of {', '.join(WEIGHTS)}")
    lo = -1.0 if weight == "npmi" else 0.0
    if not lo <= threshold <= 1.0:
        raise UserError(f"threshold {threshold} is outside [{lo:g}, 1] for weight {weight}"
                        + (" (npmi lies in [-1, 1])" if weight == "npmi" else ""))


@dataclass
class RunGraph:
    """What the graph stages need of a run: nodes, counted pairs, active counts, T, max count."""

    run: str
    neuron_ids: dict[int, np.ndarray]   # layer -> global ids of its neurons
    active: dict[int, np.ndarray]       # layer -> active counts
    pairs: list[tuple[int, int]]
    tokens: int
    max_count: int
    n_nodes: int
    offsets: dict[int, int]             # layer -> first node index (nodes are numbered 0..n-1)

    def node_of(self, layer: int, neuron: np.ndarray) -> np.ndarray:
        return self.offsets[layer] + neuron

    @property
    def node_ids(self) -> np.ndarray:
        """Global neuron_id of node index 0..n-1."""
        return np.concatenate([self.neuron_ids[l] for l in sorted(self.neuron_ids)])

    @property
    def node_layers(self) -> np.ndarray:
        return np.concatenate([np.full(len(self.neuron_ids[l]), l, np.int32)
                               for l in sorted(self.neuron_ids)])


def load_run_graph(storage: Storage, run: str) -> RunGraph:
    from pipeline.stages.coactivation import _active_counts, max_count

    manifest = storage.finished_run(run)
    group = arrays.open_group(storage.arrays(run), mode="r")
    if "coact" not in group:
        raise UserError(f"run {run!r} has no co-activation counts: run `nwh coactivation --run {run}`")
    pairs = sorted(tuple(int(x[1:]) for x in key.split("_"))
                   for key, a in group["coact"].arrays() if a.attrs.get("complete"))
    neurons = tables.read_partition(storage, "neurons", run)
    layer = neurons["layer"].to_numpy()
    ids = neurons["neuron_id"].to_numpy()
    neuron_ids = {int(l): ids[layer == l] for l in np.unique(layer)}
    offsets, total = {}, 0
    for l in sorted(neuron_ids):
        offsets[l] = total
        total += len(neuron_ids[l])
    return RunGraph(run, neuron_ids, _active_counts(storage, run), pairs, manifest["rows"],
                    max_count(storage, run), total, offsets)


def pair_weights(counts: np.ndarray, n_a: np.ndarray, n_b: np.ndarray, tokens: int,
                 max_count: int, weight: str) -> np.ndarray:
    """Weight of every edge of a pair [d_a, d_b] (float64); edges with count 0 get -inf."""
    c = counts.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if weight == "normalized":
            w = c / max(max_count, 1)
        elif weight == "jaccard":
            w = c / (n_a[:, None] + n_b[None, :] - c)
        else:
            p_ab = c / tokens
            w = np.log(c * tokens / (n_a[:, None].astype(np.float64) * n_b[None, :])) / -np.log(p_ab)
            w = np.where(counts == tokens, 1.0, w)
    return np.where(counts > 0, w, -np.inf)


def iter_thresholded(g: RunGraph, storage: Storage, weight: str, threshold: float
                     ) -> Iterator[tuple[tuple[int, int], np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per pair: (pair, node_a, node_b, count, weight) of the edges with weight > threshold."""
    from pipeline.stages.coactivation import read_counts

    for a, b in g.pairs:
        counts = read_counts(storage, g.run, a, b)
        w = pair_weights(counts, g.active[a], g.active[b], g.tokens, g.max_count, weight)
        i, j = np.nonzero(w > threshold)  # sorted by (i, j): the fast order for igraph
        yield (a, b), g.node_of(a, i), g.node_of(b, j), counts[i, j], w[i, j]


def thresholded_edges(g: RunGraph, storage: Storage, weight: str, threshold: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All edges above the threshold as (edges [m, 2] node indices, counts, weights)."""
    src, dst, cnt, wts = [], [], [], []
    for _, i, j, c, w in iter_thresholded(g, storage, weight, threshold):
        src.append(i)
        dst.append(j)
        cnt.append(c)
        wts.append(w)
    if not src:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int64), np.zeros(0)
    edges = np.stack([np.concatenate(src), np.concatenate(dst)], axis=1).astype(np.int64)
    return edges, np.concatenate(cnt), np.concatenate(wts)


def no_edges_error(g: RunGraph, storage: Storage, weight: str, threshold: float) -> UserError:
    best = max((float(w.max()) for *_, w in iter_thresholded(g, storage, weight, -np.inf)
                if len(w)), default=None)
    hint = (f"the largest {weight} weight is {best:.4g}: use a threshold below it"
            if best is not None else "no neuron pair ever fired together")
    return UserError(f"no edge has {weight} weight above {threshold}: {hint}")


def build_graph(n_nodes: int, edges: np.ndarray):
    """igraph Graph over nodes 0..n-1 from an int edge array (the lean construction path)."""
    import igraph as ig

    graph = ig.Graph(n=n_nodes, directed=False)
    if len(edges):
        graph.add_edges(edges)
    return graph


# -- threshold analysis: one streaming pass, one union-find per threshold


class ThresholdAnalysis:
    """Graph statistics at many thresholds from one streaming pass over the edges.

    For each threshold t (edges with weight > t): nodes with an edge, edges, connected
    components (isolated nodes count as components of size 1, as in the reference's graph of
    all nodes), min / max / mean component size, components with more than one node. Memory is
    one union-find per threshold (O(n) each); edges can arrive in any order, pair by pair.
    """

    def __init__(self, n_nodes: int, thresholds: list[float]):
        self.n = n_nodes
        self.thresholds = np.array(sorted(set(thresholds)), np.float64)
        k = len(self.thresholds)
        self.parent = np.tile(np.arange(n_nodes, dtype=np.int64), (k, 1))
        self.size = np.ones((k, n_nodes), np.int64)
        self.has_edge = np.zeros((k, n_nodes), np.bool_)
        self.stats = np.zeros((k, 3), np.int64)

    def add(self, src: np.ndarray, dst: np.ndarray, weights: np.ndarray) -> None:
        from pipeline.kernels.unionfind import union_edges  # numba: imported when first needed

        union_edges(self.parent, self.size, self.has_edge, self.stats, src.astype(np.int64),
                    dst.astype(np.int64), weights.astype(np.float64), self.thresholds)

    def result(self) -> pl.DataFrame:
        rows = []
        for t in range(len(self.thresholds)):
            roots = self.parent[t] == np.arange(self.n)
            sizes = self.size[t][roots]
            rows.append({"threshold": float(self.thresholds[t]),
                         "nodes_with_edge": int(self.stats[t, 2]), "edges": int(self.stats[t, 0]),
                         "components": int(len(sizes)), "min_component": int(sizes.min()),
                         "max_component": int(sizes.max()), "mean_component": self.n / len(sizes),
                         "nontrivial_components": int((sizes > 1).sum())})
        return pl.DataFrame(rows)


def threshold_analysis(n_nodes: int, edges: np.ndarray, weights: np.ndarray,
                       thresholds: list[float]) -> pl.DataFrame:
    """ThresholdAnalysis over edges already in memory."""
    analysis = ThresholdAnalysis(n_nodes, thresholds)
    analysis.add(edges[:, 0], edges[:, 1], weights)
    return analysis.result()


# -- stage


@dataclass
class GraphConfig:
    run: str = opt(help="a run with co-activation counts")
    weight: str = opt("normalized", help="edge weight: normalized (count / max, the reference), "
                      "jaccard or npmi", choices=WEIGHTS)
    threshold: float = opt(0.5, help="keep edges with weight > threshold (written to `edges`)")
    thresholds: list[float] = opt(DEFAULT_THRESHOLDS, help="thresholds of the analysis")

    def __post_init__(self) -> None:
        check_threshold(self.weight, self.threshold)
        for t in self.thresholds:
            check_threshold(self.weight, t)


def graph_stage(config: GraphConfig, storage: Storage) -> dict:
    """Edges above the threshold, the threshold analysis, histograms; returns a summary."""
    from pipeline.report.plots import plot_histogram

    g = load_run_graph(storage, config.run)
    t0 = time.perf_counter()
    analysis = ThresholdAnalysis(g.n_nodes, config.thresholds)
    ids, layers = g.node_ids, g.node_layers
    kept = []
    tables.drop_partition_parts(storage, "edges", config.run,
                                f"{config.weight}-{config.threshold:g}-")
    # one pass over the pairs: every edge above the lowest threshold feeds the analysis; those
    # above --threshold are written, pair by pair, and kept for the graph
    for (a, b), i, j, c, w in iter_thresholded(g, storage, config.weight,
                                               min(config.thresholds + [config.threshold])):
        analysis.add(i, j, w)
        keep = w > config.threshold
        if keep.any():
            tables.write_part(storage, "edges", config.run, {
                "source": ids[i[keep]], "target": ids[j[keep]],
                "layer_a": layers[i[keep]], "layer_b": layers[j[keep]],
                "count": c[keep], "weight": w[keep],
                "weight_kind": np.full(int(keep.sum()), config.weight, object),
                "threshold": np.full(int(keep.sum()), config.threshold),
            }, part=f"{config.weight}-{config.threshold:g}-L{a}_L{b}")
            kept.append((i[keep], j[keep], w[keep]))
    result = analysis.result()
    tables.write_part(storage, "threshold_analysis", config.run,
                      result.with_columns(pl.lit(config.weight).alias("weight"))
                      .select(tables.schema("threshold_analysis").names).to_arrow(),
                      part=f"{config.weight}")
    out_dir = storage.reports(config.run)
    out_dir.mkdir(parents=True, exist_ok=True)
    result.write_csv(out_dir / f"threshold_analysis_{config.weight}.csv")  # the reference file
    if not kept:
        raise no_edges_error(g, storage, config.weight, config.threshold)
    edges = np.stack([np.concatenate([k[0] for k in kept]),
                      np.concatenate([k[1] for k in kept])], axis=1)
    weights = np.concatenate([k[2] for k in kept])
    graph = build_graph(g.n_nodes, edges)
    seconds = time.perf_counter() - t0
    degrees = np.asarray(graph.degree())
    plot_histogram(weights, out_dir / f"edge_weights_{config.weight}.png",
                   title=f"Edge weights ({config.weight} > {config.threshold:g})", xlabel="weight")
    plot_histogram(degrees, out_dir / f"degrees_{config.weight}_{config.threshold:g}.png",
                   title=f"Node degrees ({config.weight} > {config.threshold:g})", xlabel="degree")
    plot_threshold_analysis(result, out_dir / f"threshold_analysis_{config.weight}.png",
                            config.weight)
    return {"nodes": g.n_nodes, "edges": len(edges), "components": len(graph.connected_components()),
            "seconds": seconds, "analysis": result}


def plot_threshold_analysis(analysis: pl.DataFrame, path, weight: str):
    import matplotlib.pyplot as plt

    from pipeline.report.plots import save_png

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    t = analysis["threshold"].to_numpy()
    axes[0].plot(t, analysis["edges"], marker="o")
    axes[0].set(yscale="symlog", title="Edges kept", xlabel=f"{weight} threshold", ylabel="edges")
    axes[1].plot(t, analysis["nodes_with_edge"], marker="o", label="nodes with an edge")
    axes[1].plot(t, analysis["nontrivial_components"], marker="s", label="components > 1 node")
    axes[1].set(title="Nodes and components", xlabel=f"{weight} threshold")
    axes[1].legend()
    axes[2].plot(t, analysis["max_component"], marker="o", label="max")
    axes[2].plot(t, analysis["mean_component"], marker="s", label="mean")
    axes[2].set(yscale="log", title="Component size", xlabel=f"{weight} threshold", ylabel="nodes")
    axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def register(sub) -> None:
    from pipeline.cli import add_stage_parser

    parser = add_stage_parser(
        sub, "graph", "Threshold co-activation edges, build the igraph graph, analyse thresholds.",
        "  nwh graph --run demo-corpus --threshold 0.5\n"
        "  nwh graph --run demo-corpus --weight npmi --threshold 0.2 --thresholds -0.2 0 0.2 0.4\n"
        "  nwh sql \"select * from threshold_analysis where run_id = 'demo-corpus'\"\n")
    add_arguments(parser, GraphConfig)
    parser.set_defaults(handler=_cli)


def _cli(args) -> int:
    from pipeline.cli import echo

    summary = graph_stage(from_args(GraphConfig, args), Storage(args.storage))
    with pl.Config(tbl_rows=20, tbl_cols=-1, tbl_width_chars=160):
        echo(summary["analysis"])
    echo(f"graph: {summary['nodes']} nodes, {summary['edges']} edges, {summary['components']} "
         f"components ({summary['seconds']:.2f} s)")
    return 0
