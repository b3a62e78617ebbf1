"""Figures of the graph stage, drawn from the tables it wrote (edges, threshold_analysis).

    nwh graph --run demo-corpus --threshold 0.5    # the CLI calls draw() after the stage

Under reports/<run>/: edge_weights_<weight>.png (kept edge weights), degrees_<weight>_<t>.png
(node degrees of the kept graph, isolated nodes included), threshold_analysis_<weight>.png and
the reference's threshold_analysis_<weight>.csv.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from pipeline.core import coact, tables
from pipeline.core.storage import Storage
from pipeline.report.plots import plot_histogram, save_png


def draw(result, config, storage: Storage) -> list[Path]:
    """Figures of one graph (result of pipeline.stages.graph.run, its GraphConfig)."""
    out_dir = storage.reports(config.run)
    out_dir.mkdir(parents=True, exist_ok=True)
    part = coact.graph_part(config.weight, config.threshold)
    edges = tables.scan_parquet(tables.part_path(storage, "edges", config.run, part))
    weights = edges.select("weight").collect()["weight"].to_numpy()
    label = f"{config.weight} > {config.threshold:g}"
    paths = [plot_histogram(weights, out_dir / f"edge_weights_{config.weight}.png",
                            title=f"{config.run}: edge weights ({label})", xlabel="weight"),
             plot_histogram(_degrees(edges, result.nodes),
                            out_dir / f"degrees_{config.weight}_{config.threshold!r}.png",
                            title=f"{config.run}: node degrees ({label})", xlabel="degree")]
    analysis = pl.from_arrow(tables.read_part(storage, "threshold_analysis", config.run,
                                             config.weight))
    paths.append(plot_threshold_analysis(analysis, out_dir / f"threshold_analysis_{config.weight}.png",
                                         config.weight, run=config.run))
    paths.append(tables.write_frame(analysis.drop("weight"),
                                    out_dir / f"threshold_analysis_{config.weight}.csv"))
    return paths


def _degrees(edges: pl.LazyFrame, n_nodes: int) -> np.ndarray:
    """Degree of every node of the base graph: the edges' endpoints counted, plus a zero for
    each node without an edge."""
    ends = pl.concat([edges.select(pl.col("source").alias("node")),
                      edges.select(pl.col("target").alias("node"))])
    counts = ends.group_by("node").len().collect()["len"].to_numpy()
    return np.concatenate([counts, np.zeros(n_nodes - len(counts), counts.dtype)])


def plot_threshold_analysis(analysis: pl.DataFrame, path: Path, weight: str, *,
                            run: str = "") -> Path:
    """Edges kept, nodes and components, component sizes, per threshold."""
    import matplotlib.pyplot as plt

    analysis = analysis.sort("threshold")
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.5))
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
    if run:
        fig.suptitle(f"{run}: co-activation graph per {weight} threshold")
    fig.tight_layout()
    return save_png(fig, path)


def plot_subset_layers(members: pl.DataFrame, path: Path, *, run: str = "") -> Path:
    """Neurons of each subset per layer (rows: subsets, columns: layers), counts printed."""
    import matplotlib.pyplot as plt

    subsets = sorted(set(members["subset"].to_list()))
    layers = sorted(set(members["layer"].to_list()))
    grid = np.zeros((len(subsets), len(layers)))
    counts = members.group_by("subset", "layer").len()
    for r in counts.iter_rows(named=True):
        grid[subsets.index(r["subset"]), layers.index(r["layer"])] = r["len"]
    fig, ax = plt.subplots(figsize=(max(12, 0.6 * len(layers) + 5), max(4, 0.45 * len(subsets) + 2)))
    im = ax.imshow(grid, aspect="auto", cmap="Blues")
    if grid.size <= 600:
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=10,
                    color="white" if value > grid.max() / 2 else "black")
    ax.set_xticks(range(len(layers)), [str(l) for l in layers])
    ax.set_yticks(range(len(subsets)), subsets)
    ax.set(xlabel="layer", title=f"{run + ': ' if run else ''}neurons of each subset per layer")
    fig.colorbar(im, ax=ax, label="neurons")
    fig.tight_layout()
    return save_png(fig, path)
