"""Subsets of influential neurons by graph centrality on a thresholded co-activation graph.

    nwh subset --run demo-corpus --threshold 0.5 --ratio 0.01 --method degree
    nwh subset-grid --run demo-corpus --thresholds 0.3 0.5 --ratios 0.005 0.01 --methods degree pagerank

Keep the edges with weight > threshold (weights by sql/edge_weights.sql, pipeline/core/coact.py),
rank every node of the base graph by a centrality (pipeline/kernels/graphs.py; ties: lower
neuron_id first), take k = int(n * ratio) nodes (at least 1, at most n), n being the number of
nodes of the base graph, as in the reference. The grid builds each threshold's graph once.
Outputs per subset: the `subsets` table part <name>, the reference's .npy of neuron ids under
runs/<run>/subsets/ (read back by `pipeline.core.coact.read_subset`), then the completion marker
runs/<run>/stages/subset-<name>.json: a rerun skips subsets already selected from the same counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.core import coact, tables
from pipeline.core.coact import WEIGHTS, check_threshold
from pipeline.core.config import Progress, Stage, config_hash, opt, to_dict
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, atomic_path
from pipeline.kernels.graphs import METHODS, build_graph, centrality, top_k

log = logging.getLogger(__name__)

def check_ratio(ratio: float) -> None:
    if not 0 < ratio <= 1:
        raise UserError(f"ratio {ratio} is outside (0, 1]: give the share of nodes to keep, e.g. 0.01")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"method {method!r} is unknown: use one of {', '.join(METHODS)}")


def subset_size(n: int, ratio: float) -> int:
    return max(1, min(n, int(n * ratio)))


def subset_name(method: str, threshold: float, ratio: float, weight: str = "normalized") -> str:
    w = "" if weight == "normalized" else f"{weight}_"
    return f"{w}{method}_t{threshold!r}_r{ratio!r}"  # exact, as the graph parts are


@dataclass(kw_only=True)
class SubsetConfig(Progress):
    run: str = opt(help="a run with co-activation counts")
    threshold: float = opt(0.5, help="keep edges with weight > threshold")
    ratio: float = opt(0.01, help="share of the base graph's nodes to select, in (0, 1]")
    method: str = opt("degree", help="degree (the reference), strength, pagerank, eigenvector, "
                      "betweenness, harmonic or coreness", choices=METHODS)
    weight: str = opt("normalized", help="edge weight: normalized, jaccard or npmi", choices=WEIGHTS)
    betweenness_cutoff: int = opt(4, help="path length cutoff of betweenness (0 = exact)")
    name: str | None = opt(None, help="subset name (default: method_t<threshold>_r<ratio>)")
    overwrite: bool = opt(False, help="select a subset already selected again", hash=False)

    def __post_init__(self) -> None:
        check_threshold(self.weight, self.threshold)
        check_ratio(self.ratio)
        check_method(self.method)
        if self.betweenness_cutoff < 0:
            raise UserError("--betweenness-cutoff must be >= 0 (0 = exact)")
        if self.name is not None:
            coact.check_subset_name(self.name)

    @property
    def subset(self) -> str:
        return self.name or subset_name(self.method, self.threshold, self.ratio, self.weight)


@dataclass(kw_only=True)
class SubsetGridConfig(Progress):
    run: str = opt(help="a run with co-activation counts")
    thresholds: list[float] = opt([0.5], help="keep edges with weight > each threshold")
    ratios: list[float] = opt([0.01], help="shares of the base graph's nodes, in (0, 1]")
    methods: list[str] = opt(["degree"], help="centralities", choices=METHODS)
    weight: str = opt("normalized", help="edge weight: normalized, jaccard or npmi", choices=WEIGHTS)
    betweenness_cutoff: int = opt(4, help="path length cutoff of betweenness (0 = exact)")
    overwrite: bool = opt(False, help="select subsets already selected again", hash=False)

    def __post_init__(self) -> None:
        # every cell is a SubsetConfig: building them validates the grid
        self.cells()

    def cells(self) -> list[SubsetConfig]:
        return [SubsetConfig(run=self.run, threshold=t, ratio=r, method=m, weight=self.weight,
                             betweenness_cutoff=self.betweenness_cutoff, overwrite=self.overwrite,
                             quiet=self.quiet)
                for t in dict.fromkeys(self.thresholds) for m in dict.fromkeys(self.methods)
                for r in dict.fromkeys(self.ratios)]


@dataclass
class SubsetResult:
    run: str
    subsets: pl.DataFrame                           # one row per chosen neuron (the table's rows)
    skipped: list[str] = field(default_factory=list)  # subsets already selected
    table: Path | None = None                       # the run's partition of the subsets table
    files: dict[str, Path] = field(default_factory=dict)  # subset name -> its .npy of neuron ids


def run(config: SubsetConfig, storage: Storage) -> SubsetResult:
    """One subset: the top k nodes of a centrality of the thresholded graph."""
    return _select(storage, config.run, [config])


def run_grid(config: SubsetGridConfig, storage: Storage) -> SubsetResult:
    """Every threshold x ratio x method subset; each threshold's graph is built once."""
    g = coact.load_run_graph(storage, config.run)
    digest = config_hash(config, counts=g.fingerprint)
    marker = storage.marker(config.run, "subset-grid")  # the cells have their own markers
    result = _select(storage, config.run, config.cells(), g)
    marker.write(to_dict(config), digest, subsets=result.subsets["subset"].unique(
        maintain_order=True).to_list())
    return result


def _select(storage: Storage, run: str, cells: list[SubsetConfig],
            g: coact.RunGraph | None = None) -> SubsetResult:
    """The subsets of `cells` (one run, one weight): stored ones read back, the others selected."""
    g = g or coact.load_run_graph(storage, run)
    frames: dict[str, pl.DataFrame] = {}
    skipped = []
    todo: dict[float, list[tuple[SubsetConfig, str]]] = {}
    for cell in cells:
        digest = config_hash(cell, counts=g.fingerprint)
        stored = None if cell.overwrite else _stored(storage, cell, digest)
        if stored is not None:
            frames[cell.subset] = stored
            skipped.append(cell.subset)
            log.info("subset %s of run %s is already selected: skipped (--overwrite selects it "
                     "again)", cell.subset, run)
        else:
            todo.setdefault(cell.threshold, []).append((cell, digest))
    for threshold, group in todo.items():
        frames.update(_select_threshold(storage, g, threshold, group))
    return SubsetResult(run, pl.concat([frames[c.subset] for c in cells]), skipped,
                        table=storage.table_partition("subsets", run),
                        files={c.subset: coact.subset_path(storage, run, c.subset) for c in cells})


def _select_threshold(storage: Storage, g: coact.RunGraph, threshold: float,
                      cells: list[tuple[SubsetConfig, str]]) -> dict[str, pl.DataFrame]:
    """Subsets of one threshold's graph: edges and igraph built once, each centrality once."""
    weight = cells[0][0].weight
    edges, _, weights = coact.thresholded_edges(storage, g, weight, threshold)
    if not len(edges):
        raise coact.no_edges_error(storage, g, weight, threshold)
    methods = {c.method for c, _ in cells}
    graph = build_graph(g.n_nodes, edges) if methods - {"degree", "strength"} else None
    scores: dict[str, np.ndarray] = {}
    out = {}
    for cell, digest in cells:
        if cell.method not in scores:
            scores[cell.method] = centrality(cell.method, g.n_nodes, edges, weights, graph=graph,
                                             betweenness_cutoff=cell.betweenness_cutoff or None)
        chosen = top_k(scores[cell.method], g.node_ids, subset_size(g.n_nodes, cell.ratio))
        out[cell.subset] = _write_subset(storage, g, cell, digest, chosen, scores[cell.method])
    return out


def _write_subset(storage: Storage, g: coact.RunGraph, cell: SubsetConfig, digest: str,
                  chosen: np.ndarray, scores: np.ndarray) -> pl.DataFrame:
    """The table part, the .npy, then the marker, of one subset."""
    k = len(chosen)
    table = tables.to_arrow("subsets", {
        "subset": [cell.subset] * k, "method": [cell.method] * k, "weight": [cell.weight] * k,
        "threshold": [cell.threshold] * k, "ratio": [cell.ratio] * k,
        "neuron_id": g.node_ids[chosen], "layer": g.node_layers[chosen],
        "neuron": g.node_neurons[chosen], "score": scores[chosen],
        "rank": np.arange(1, k + 1, dtype=np.int64)})
    tables.write_part(storage, "subsets", cell.run, table, part=cell.subset)
    with atomic_path(coact.subset_path(storage, cell.run, cell.subset)) as tmp, open(tmp, "wb") as f:
        np.save(f, g.node_ids[chosen].astype(np.int64))
    storage.marker(cell.run, "subset", cell.subset).write(to_dict(cell), digest,
                 neurons=k, top_score=float(scores[chosen].max()))
    return pl.from_arrow(table)


def _stored(storage: Storage, cell: SubsetConfig, digest: str) -> pl.DataFrame | None:
    if storage.marker(cell.run, "subset", cell.subset).done(digest) is None:
        return None
    stored = tables.read_part(storage, "subsets", cell.run, cell.subset)
    if stored is None or not coact.subset_path(storage, cell.run, cell.subset).exists():
        return None
    return pl.from_arrow(stored)


def show(result: SubsetResult) -> str:
    summary = result.subsets.group_by("subset", maintain_order=True).agg(
        pl.len().alias("neurons"), pl.col("layer").unique().sort().alias("layers"),
        pl.col("score").max().alias("top_score"))
    with pl.Config(tbl_rows=100, tbl_cols=-1, tbl_width_chars=160, fmt_str_lengths=40):
        text = str(summary)
    if result.skipped:
        text += (f"\nalready selected from the same counts, skipped (--overwrite selects again): "
                 f"{', '.join(result.skipped)}")
    if result.table is not None:
        text += f"\nsubsets table: {result.table}"
    folders = {p.parent for p in result.files.values()}
    if len(folders) == 1:  # one folder for a run: named once, then the files in it
        text += f"\nneuron ids: {folders.pop()}/ ({', '.join(p.name for p in result.files.values())})"
    else:
        text += "".join(f"\nneuron ids: {p}" for p in result.files.values())
    return text


STAGES = [
    Stage("subset", "Select influential neurons by centrality on the thresholded graph.",
          "  nwh subset --run demo-corpus --threshold 0.5 --ratio 0.01 --method degree\n"
          "  nwh subset --run demo-corpus --method pagerank --weight jaccard --threshold 0.2\n",
          SubsetConfig, run, show),
    Stage("subset-grid", "Subsets for every threshold x ratio x method (the reference batch).",
          "  nwh subset-grid --run demo-corpus --thresholds 0.3 0.5 --ratios 0.005 0.01 \\\n"
          "      --methods degree pagerank coreness\n",
          SubsetGridConfig, run_grid, show),
]
