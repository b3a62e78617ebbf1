"""Subsets of influential neurons by graph centrality on a thresholded co-activation graph.

    nwh subset --run demo-corpus --threshold 0.5 --ratio 0.01 --method degree
    nwh subset-grid --run demo-corpus --thresholds 0.3 0.5 --ratios 0.005 0.01 --methods degree pagerank

Keep the edges with weight > threshold, rank every node of the base graph by a centrality
(ties: lower neuron_id first), take k = int(n * ratio) nodes (at least 1, at most n), n being
the number of nodes of the base graph, as in the reference. Degree and strength come straight
from the thresholded edges (np.bincount); the others from igraph.
Outputs: the `subsets` table and the reference .npy of neuron ids under runs/<run>/subsets/.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import polars as pl

from pipeline.core import tables
from pipeline.core.config import add_arguments, from_args, opt
from pipeline.core.errors import UserError
from pipeline.stages.graph import (
    WEIGHTS,
    build_graph,
    check_threshold,
    load_run_graph,
    no_edges_error,
    thresholded_edges,
)
from pipeline.core.storage import Storage, atomic_path

log = logging.getLogger(__name__)

METHODS = ("degree", "strength", "pagerank", "eigenvector", "betweenness", "harmonic", "coreness")


def check_ratio(ratio: float) -> None:
    if not 0 < ratio <= 1:
        raise UserError(f"ratio {ratio} is outside (0, 1]: give the share of nodes to keep, e.g. 0.01")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"method {method!r} is unknown: use one of {', '.join(METHODS)}")


def subset_size(n: int, ratio: float) -> int:
    return max(1, min(n, int(n * ratio)))


def centrality(method: str, n_nodes: int, edges: np.ndarray, weights: np.ndarray, *,
               betweenness_cutoff: int | None = 4, graph=None) -> np.ndarray:
    """Score of every node 0..n-1 under a centrality of the thresholded graph."""
    if method == "degree":
        return np.bincount(edges.ravel(), minlength=n_nodes).astype(np.float64)
    if method == "strength":
        return (np.bincount(edges[:, 0], weights, minlength=n_nodes)
                + np.bincount(edges[:, 1], weights, minlength=n_nodes))
    graph = graph if graph is not None else build_graph(n_nodes, edges)
    if method == "pagerank":
        return np.asarray(graph.pagerank(directed=False))
    if method == "eigenvector":
        return np.asarray(graph.eigenvector_centrality())
    if method == "betweenness":
        return np.asarray(graph.betweenness(directed=False, cutoff=betweenness_cutoff))
    if method == "harmonic":
        return np.asarray(graph.harmonic_centrality(mode="all"))
    if method == "coreness":
        return np.asarray(graph.coreness(), dtype=np.float64)
    check_method(method)
    raise AssertionError


def top_k(scores: np.ndarray, node_ids: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best nodes: score descending, then neuron_id ascending."""
    order = np.lexsort((node_ids, -scores))
    return order[:k]


@dataclass
class SubsetConfig:
    run: str = opt(help="a run with co-activation counts")
    threshold: float = opt(0.5, help="keep edges with weight > threshold")
    ratio: float = opt(0.01, help="share of the base graph's nodes to select, in (0, 1]")
    method: str = opt("degree", help="degree (the reference), strength, pagerank, eigenvector, "
                      "betweenness, harmonic or coreness", choices=METHODS)
    weight: str = opt("normalized", help="edge weight: normalized, jaccard or npmi", choices=WEIGHTS)
    betweenness_cutoff: int = opt(4, help="path length cutoff of betweenness (0 = exact)")
    name: str | None = opt(None, help="subset name (default: method_t<threshold>_r<ratio>)")

    def __post_init__(self) -> None:
        check_threshold(self.weight, self.threshold)
        check_ratio(self.ratio)
        check_method(self.method)


def subset_name(method: str, threshold: float, ratio: float, weight: str = "normalized") -> str:
    w = "" if weight == "normalized" else f"{weight}_"
    return f"{w}{method}_t{threshold:g}_r{ratio:g}"


def select_subsets(storage: Storage, run: str, *, thresholds: list[float], ratios: list[float],
                   methods: list[str], weight: str = "normalized", betweenness_cutoff: int = 4,
                   name: str | None = None) -> pl.DataFrame:
    """Every (threshold, ratio, method) subset; each thresholded graph is built once."""
    for t in thresholds:
        check_threshold(weight, t)
    for r in ratios:
        check_ratio(r)
    for m in methods:
        check_method(m)
    g = load_run_graph(storage, run)
    node_ids, node_layers = g.node_ids, g.node_layers
    frames = []
    for t in thresholds:
        edges, _, weights = thresholded_edges(g, storage, weight, t)
        if not len(edges):
            raise no_edges_error(g, storage, weight, t)
        graph = build_graph(g.n_nodes, edges) if set(methods) - {"degree", "strength"} else None
        for m in methods:
            scores = centrality(m, g.n_nodes, edges, weights, graph=graph,
                                betweenness_cutoff=betweenness_cutoff or None)
            for r in ratios:
                k = subset_size(g.n_nodes, r)
                chosen = top_k(scores, node_ids, k)
                label = name if name and len(thresholds) * len(ratios) * len(methods) == 1 \
                    else subset_name(m, t, r, weight)
                frame = pl.DataFrame({
                    "subset": [label] * k, "method": [m] * k, "weight": [weight] * k,
                    "threshold": [t] * k, "ratio": [r] * k,
                    "neuron_id": node_ids[chosen].astype(np.int64),
                    "layer": node_layers[chosen].astype(np.int32),
                    "neuron": (node_ids[chosen] - np.array([g.neuron_ids[l][0] for l in
                                                            node_layers[chosen]])).astype(np.int32)
                    if k else np.zeros(0, np.int32),
                    "score": scores[chosen].astype(np.float64),
                    "rank": np.arange(1, k + 1, dtype=np.int64)})
                frames.append(frame)
                path = storage.run_dir(run) / "subsets" / f"{label}.npy"
                with atomic_path(path) as tmp, open(tmp, "wb") as f:
                    np.save(f, node_ids[chosen].astype(np.int64))
    out = pl.concat(frames)
    for label, part in out.group_by("subset", maintain_order=True):
        tables.write_part(storage, "subsets", run,
                          part.select(tables.schema("subsets").names).to_arrow(),
                          part=str(label[0]))
    return out


def read_subset(storage: Storage, run: str, name: str) -> np.ndarray:
    """Global neuron ids of a stored subset (table first, then the .npy)."""
    path = storage.run_dir(run) / "subsets" / f"{name}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False)
    raise UserError(f"run {run!r} has no subset {name!r}: create it with `nwh subset --run {run}`")


def register(sub) -> None:
    from pipeline.cli import add_stage_parser

    parser = add_stage_parser(
        sub, "subset", "Select influential neurons by centrality on the thresholded graph.",
        "  nwh subset --run demo-corpus --threshold 0.5 --ratio 0.01 --method degree\n"
        "  nwh subset --run demo-corpus --method pagerank --weight jaccard --threshold 0.2\n")
    add_arguments(parser, SubsetConfig)
    parser.set_defaults(handler=_cli)

    parser = add_stage_parser(
        sub, "subset-grid", "Subsets for every threshold x ratio x method (the reference batch).",
        "  nwh subset-grid --run demo-corpus --thresholds 0.3 0.5 --ratios 0.005 0.01 \\\n"
        "      --methods degree pagerank coreness\n")
    parser.add_argument("--run", required=True, help="a run with co-activation counts")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5], help="thresholds")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.01], help="ratios")
    parser.add_argument("--methods", nargs="+", default=["degree"], help=f"of {', '.join(METHODS)}")
    parser.add_argument("--weight", default="normalized", choices=WEIGHTS, help="edge weight")
    parser.set_defaults(handler=_cli_grid)


def _report(out: pl.DataFrame) -> int:
    from pipeline.cli import echo

    summary = out.group_by("subset", maintain_order=True).agg(
        pl.len().alias("neurons"), pl.col("layer").unique().sort().alias("layers"),
        pl.col("score").max().alias("top_score"))
    with pl.Config(tbl_rows=100, tbl_cols=-1, tbl_width_chars=160, fmt_str_lengths=40):
        echo(summary)
    return 0


def _cli(args) -> int:
    c = from_args(SubsetConfig, args)
    return _report(select_subsets(Storage(args.storage), c.run, thresholds=[c.threshold],
                                  ratios=[c.ratio], methods=[c.method], weight=c.weight,
                                  betweenness_cutoff=c.betweenness_cutoff, name=c.name))


def _cli_grid(args) -> int:
    return _report(select_subsets(Storage(args.storage), args.run, thresholds=args.thresholds,
                                  ratios=args.ratios, methods=args.methods, weight=args.weight))
