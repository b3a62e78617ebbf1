"""Thresholded co-activation graphs: the edges above a weight threshold and the threshold analysis.

    nwh graph --run demo-corpus --threshold 0.5                  # edges table + analysis
    nwh graph --run demo-corpus --weight jaccard --thresholds 0.1 0.2 0.3

The base graph (every neuron of layer l to every neuron of layer l+1) stays implicit: its
nodes are the `neurons` table, its edge weights are computed pair by pair from the Zarr counts
by sql/edge_weights.sql (pipeline/core/coact.py). One streaming pass over the pairs:
  * the edges with weight > --threshold go to ONE Parquet part of the `edges` table,
    tables/edges/run_id=<run>/<weight>-<threshold>.parquet, written pair by pair under a
    temporary name and renamed into place when complete (a reader sees the old part or the
    new one, never half of it);
  * every edge above the lowest threshold feeds the threshold analysis (one union-find per
    threshold, memory O(nodes x thresholds)), written to the `threshold_analysis` part <weight>;
  * the completion marker runs/<run>/stages/graph-<weight>-<threshold>.json goes last: a rerun
    of the same configuration on the same counts returns the stored result.
Memory: one pair's counts and edges. Figures: pipeline/report/graph.py.

Weights of an edge (i in layer a, j in layer b), with C the count, n the active counts, T rows:
    normalized = C / max C over the run (the reference), jaccard = C / (n_i + n_j - C),
    npmi = ln(C T / (n_i n_j)) / -ln(C / T)   (1 when C = T).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.core import coact, tables
from pipeline.core.coact import WEIGHTS, check_threshold
from pipeline.core.config import Progress, Stage, config_hash, opt, to_dict
from pipeline.core.storage import Marker, Storage, atomic_path
from pipeline.kernels.graphs import ThresholdAnalysis

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = [round(0.1 * i, 1) for i in range(10)]


@dataclass(kw_only=True)
class GraphConfig(Progress):
    run: str = opt(help="a run with co-activation counts")
    weight: str = opt("normalized", help="edge weight: normalized (count / max, the reference), "
                      "jaccard or npmi", choices=WEIGHTS)
    threshold: float = opt(0.5, help="keep edges with weight > threshold (written to `edges`)")
    thresholds: list[float] = opt(DEFAULT_THRESHOLDS, help="thresholds of the analysis")
    overwrite: bool = opt(False, help="rebuild a graph already built", hash=False)

    def __post_init__(self) -> None:
        check_threshold(self.weight, self.threshold)
        for t in self.thresholds:
            check_threshold(self.weight, t)
        self.thresholds = sorted({float(t) for t in self.thresholds})  # the analysis sorts them


@dataclass
class GraphResult:
    run: str
    weight: str
    threshold: float
    nodes: int
    edges: int              # edges kept (weight > threshold)
    components: int         # connected components of the kept graph, isolated nodes included
    seconds: float
    analysis: pl.DataFrame  # the threshold_analysis rows of this weight
    edges_path: Path
    skipped: bool = False   # already built with this configuration
    analysis_path: Path | None = None  # the threshold_analysis part of this weight


def run(config: GraphConfig, storage: Storage) -> GraphResult:
    """Edges above the threshold and the threshold analysis, streamed pair by pair."""
    g = coact.load_run_graph(storage, config.run)
    part = coact.graph_part(config.weight, config.threshold)
    marker = storage.marker(config.run, "graph", part)
    digest = config_hash(config, counts=g.fingerprint)
    stored = None if config.overwrite else _stored(config, storage, marker, digest)
    if stored is not None:
        return stored
    t0 = time.perf_counter()
    # the analysis also measures --threshold itself: its row is the summary of the kept graph
    analysis = ThresholdAnalysis(g.n_nodes, config.thresholds + [config.threshold])
    edges_path = tables.part_path(storage, "edges", config.run, part)
    with atomic_path(edges_path) as tmp:
        kept = _stream_edges(tmp, g, storage, config, analysis)
        if not kept:  # raised before the rename: the previous part, if any, stays
            raise coact.no_edges_error(storage, g, config.weight, config.threshold)
    tables.drop_partition_parts(storage, "edges", config.run, f"{part}-L")  # the per-pair layout
    levels = analysis.result()
    frame = (levels.filter(pl.col("threshold").is_in(config.thresholds))
             .with_columns(pl.lit(config.weight).alias("weight"))
             .select(tables.schema("threshold_analysis").names))
    tables.write_part(storage, "threshold_analysis", config.run, frame.to_arrow(),
                      part=config.weight)
    at = levels.filter(pl.col("threshold") == config.threshold).row(0, named=True)
    seconds = time.perf_counter() - t0
    marker.write(to_dict(config), digest, nodes=g.n_nodes, edges=at["edges"],
                 components=at["components"], seconds=round(seconds, 3))
    log.info("graph %s (%s > %g): %d nodes, %d edges in %.2f s", config.run, config.weight,
             config.threshold, g.n_nodes, at["edges"], seconds)
    return GraphResult(config.run, config.weight, config.threshold, g.n_nodes, at["edges"],
                       at["components"], seconds, frame, edges_path,
                       analysis_path=tables.part_path(storage, "threshold_analysis", config.run,
                                                      config.weight))


def _stream_edges(path: Path, g: coact.RunGraph, storage: Storage, config: GraphConfig,
                  analysis: ThresholdAnalysis) -> int:
    """Write the edges with weight > threshold to one Parquet file, pair by pair, feeding the
    analysis every edge above its lowest threshold; returns the number of edges written."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    kept = 0
    lowest = min(config.thresholds + [config.threshold])
    pairs = tqdm(coact.iter_pair_edges(storage, g, weight=config.weight, threshold=lowest),
                 total=len(g.pairs), unit="pair", disable=config.quiet, desc=f"graph {config.run}")
    with pq.ParquetWriter(path, tables.schema("edges"), compression="zstd") as writer:
        for (a, b), edges in pairs:
            i = g.node_of(a, edges["neuron_a"].to_numpy())
            j = g.node_of(b, edges["neuron_b"].to_numpy())
            w = edges["weight"].to_numpy()
            analysis.add(i, j, w)
            keep = w > config.threshold
            n = int(keep.sum())
            if not n:
                continue
            writer.write_table(tables.to_arrow("edges", {
                "source": g.node_ids[i[keep]], "target": g.node_ids[j[keep]],
                "layer_a": np.full(n, a, np.int32), "layer_b": np.full(n, b, np.int32),
                "count": edges["count"].to_numpy()[keep], "weight": w[keep],
                "weight_kind": pa.repeat(config.weight, n),
                "threshold": np.full(n, config.threshold),
            }))
            kept += n
    return kept


def _stored(config: GraphConfig, storage: Storage, marker: Marker, digest: str) -> GraphResult | None:
    """The stored result of a finished graph of this configuration, else None.

    The analysis part is shared by every threshold of a weight: a graph built since with other
    analysis thresholds replaced it, and then this graph is built again."""
    done = marker.done(digest)
    edges_path = tables.part_path(storage, "edges", config.run,
                                 coact.graph_part(config.weight, config.threshold))
    stored = tables.read_part(storage, "threshold_analysis", config.run, config.weight)
    if done is None or stored is None or not edges_path.exists():
        return None
    frame = pl.from_arrow(stored)
    if frame["threshold"].to_list() != config.thresholds:
        return None
    log.info("graph %s (%s > %g) is already built: skipped (--overwrite rebuilds)",
             config.run, config.weight, config.threshold)
    return GraphResult(config.run, config.weight, config.threshold, done["nodes"], done["edges"],
                       done["components"], done["seconds"], frame, edges_path, skipped=True,
                       analysis_path=tables.part_path(storage, "threshold_analysis", config.run,
                                                      config.weight))


def show(result: GraphResult) -> str:
    with pl.Config(tbl_rows=20, tbl_cols=-1, tbl_width_chars=160):
        text = str(result.analysis)
    note = " (already built with this configuration: skipped; --overwrite rebuilds)" \
        if result.skipped else ""
    lines = [text, f"graph: {result.nodes} nodes, {result.edges} edges with {result.weight} > "
             f"{result.threshold:g}, {result.components} components ({result.seconds:.2f} s)"
             f"{note}", f"edges: {result.edges_path}"]
    if result.analysis_path is not None:
        lines.append(f"threshold analysis: {result.analysis_path}")
    return "\n".join(lines)


STAGES = [Stage(
    "graph", "Threshold co-activation edges into the edges table and analyse thresholds.",
    "  nwh graph --run demo-corpus --threshold 0.5\n"
    "  nwh graph --run demo-corpus --weight npmi --threshold 0.2 --thresholds -0.2 0 0.2 0.4\n"
    "  nwh sql \"select * from threshold_analysis where run_id = 'demo-corpus'\"\n",
    GraphConfig, run, show, figures="pipeline.report.graph:draw")]
