"""Figures of `nwh analyze`, drawn from its tables into storage/reports/<run>/.

    important_neurons.png   the top 20 neurons by activation frequency and by mean activation
    token_clusters.png      token rows in the plane of their first two principal components
    specific_neurons.png    histogram of log2 P(active | key) / P(active), per kind of key
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import polars as pl

from pipeline.core.storage import Storage
from pipeline.report.plots import save_png  # also selects the Agg backend before any drawing

TOP_BARS = 20
RATIO_BINS = 30
KIND_COLORS = (("token", "#c0392b"), ("position", "#2874a6"))


def draw(result, config, storage: Storage) -> list[Path]:
    """The analysis figures of `result` (an analyze result: .run and .tables)."""
    directory = storage.reports(result.run)
    return [plot_important(result.tables["important_neurons"], directory / "important_neurons.png",
                           run=result.run),
            plot_clusters(result.tables["token_clusters"], directory / "token_clusters.png",
                          run=result.run),
            plot_specific(result.tables["specific_neurons"], directory / "specific_neurons.png",
                          run=result.run)]


def _titled(run: str, text: str) -> str:
    return f"{run}: {text}" if run else text


def plot_important(important: pl.DataFrame, path: Path, *, run: str = "") -> Path:
    """Horizontal bars of the first TOP_BARS neurons of each ranking, the first on top."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 7))
    for ax, by in zip(axes, ("frequency", "mean")):
        sub = important.filter(pl.col("rank_by") == by).sort("rank").head(TOP_BARS)
        labels = [f"L{l}.{n}" for l, n in zip(sub["layer"], sub["neuron"])]
        ax.barh(labels[::-1], sub[by].to_list()[::-1], color="#3b6ea5")
        ax.set(title=f"Top neurons by {by}", xlabel=by)
    if run:
        fig.suptitle(_titled(run, "most important neurons"))
    fig.tight_layout()
    return save_png(fig, path)


def plot_clusters(clusters: pl.DataFrame, path: Path, *, run: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(10, 8))
    sc = ax.scatter(clusters["pc1"].to_numpy(), clusters["pc2"].to_numpy(),
                    c=clusters["cluster"].to_numpy(), cmap="tab10", s=6)
    ax.set(title=_titled(run, "token rows clustered by activation pattern (PCA)"),
           xlabel="PC 1", ylabel="PC 2")
    fig.colorbar(sc, ax=ax, label="cluster")
    fig.tight_layout()
    return save_png(fig, path)


def plot_specific(specific: pl.DataFrame, path: Path, *, run: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(12, 5.5))
    for kind, color in KIND_COLORS:
        sub = specific.filter(pl.col("kind") == kind)
        if sub.height:
            ax.hist(np.log2(sub["ratio"].to_numpy()), bins=RATIO_BINS, alpha=0.6, color=color,
                    label=kind)
    ax.set(title=_titled(run, "specific neurons: P(active | key) / P(active)"),
           xlabel="log2 ratio", ylabel="neuron-key pairs")
    if specific.height:
        ax.legend()
    fig.tight_layout()
    return save_png(fig, path)
