"""Figures of `nwh universal`, drawn from its tables (correlation_summary, universal_neurons and
the reference's neuron_properties with the universal flag): the max and baseline correlations
(with each neuron's means over models against the line of the paper's rule), properties of
universal vs other neurons, and the share of universal neurons per layer.

storage/reports/<name>/universal_correlations.png, universal_properties.png, universal_layers.png.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pipeline.report.plots import plt, save_png  # plots picks the Agg backend first

PROPERTIES = ("w_in_norm", "w_out_norm", "in_out_sim", "vocab_kurt", "act_mean", "sparsity")


def draw(result, config, storage) -> list[Path]:
    out = storage.reports(result.name)
    threshold = result.info.get("threshold", getattr(config, "threshold", 0.5))
    return [plot_correlations(result.summary, out / "universal_correlations.png",
                              neurons=result.neurons, threshold=threshold),
            plot_properties(result.properties, out / "universal_properties.png"),
            plot_layers(result.neurons, out / "universal_layers.png")]


def plot_correlations(summary: pl.DataFrame, path: Path, *, neurons: pl.DataFrame | None = None,
                      threshold: float = 0.5) -> Path:
    """Histograms of max and baseline max correlations; with `neurons`, also each neuron's mean
    baseline max against its mean max over models, the universal ones marked, and the line
    excess = threshold of the paper's rule."""
    fig, axes = plt.subplots(1, 2 if neurons is not None else 1, figsize=(14 if neurons is not
                                                                           None else 8, 4.5))
    ax = axes[0] if neurons is not None else axes
    ax.hist(summary["max_corr"].to_numpy(), bins=50, alpha=0.6, label="max correlation")
    ax.hist(summary["baseline_max"].to_numpy(), bins=50, alpha=0.6, label="baseline max")
    ax.set(title="Max correlation with the other models' neurons", xlabel="Pearson r",
           ylabel="neurons x models")
    ax.legend()
    if neurons is not None and "mean_baseline" in neurons.columns:
        ax = axes[1]
        for flag, label in ((False, "other"), (True, "universal")):
            part = neurons.filter(pl.col("universal") == flag)
            ax.scatter(part["mean_baseline"].to_numpy(), part["mean_corr"].to_numpy(), s=3,
                       alpha=0.4, label=f"{label} ({part.height})")
        ax.plot([0, 1 - threshold], [threshold, 1], ls="--", c="red", alpha=0.6,
                label=f"excess = {threshold:g}")
        ax.set(title="Per neuron, means over models", xlabel="mean baseline max",
               ylabel="mean max correlation", xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def plot_properties(props: pl.DataFrame, path: Path) -> Path:
    """Histograms of properties of universal vs other neurons (props has a `universal` column)."""
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    uni = props.filter(pl.col("universal"))
    rest = props.filter(~pl.col("universal"))
    for ax, col in zip(axes.ravel(), PROPERTIES):
        for group, label in ((rest, "other"), (uni, "universal")):
            values = group[col].drop_nans().drop_nulls().to_numpy()
            if len(values):
                ax.hist(values, bins=40, alpha=0.6, density=True, label=label)
        ax.set(title=col)
        ax.legend(fontsize=8)
    fig.suptitle("Properties of universal vs other neurons (reference model)")
    fig.tight_layout()
    return save_png(fig, path)


def plot_layers(neurons: pl.DataFrame, path: Path) -> Path:
    layers = neurons.group_by("layer").agg(pl.col("universal").mean().alias("share")).sort("layer")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(layers["layer"].to_numpy(), 100 * layers["share"].to_numpy())
    ax.set(title="Universal neurons per layer", xlabel="layer", ylabel="% universal")
    fig.tight_layout()
    return save_png(fig, path)
