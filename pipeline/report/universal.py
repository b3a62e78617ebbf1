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
                              neurons=result.neurons, threshold=threshold, name=result.name),
            plot_properties(result.properties, out / "universal_properties.png", name=result.name),
            plot_layers(result.neurons, out / "universal_layers.png", threshold=threshold,
                        name=result.name)]


def _titled(name: str, text: str) -> str:
    return f"{name}: {text}" if name else text


def no_universal_note(neurons: pl.DataFrame, threshold: float) -> str | None:
    """The sentence a figure or page shows instead of an empty plot: None when some neuron is
    universal."""
    if neurons.height and neurons["universal"].any():
        return None
    if not neurons.height:
        return "no neuron was compared"
    best = neurons.sort("excess", descending=True, nulls_last=True).row(0, named=True)
    return (f"no universal neuron at {threshold:g}; the largest excess is {best['excess']:.2f} "
            f"(layer {best['layer']}, neuron {best['neuron']})")


def plot_correlations(summary: pl.DataFrame, path: Path, *, neurons: pl.DataFrame | None = None,
                      threshold: float = 0.5, name: str = "") -> Path:
    """Histograms of max and baseline max correlations; with `neurons`, also each neuron's mean
    baseline max against its mean max over models, the universal ones marked, and the line
    excess = threshold of the paper's rule."""
    fig, axes = plt.subplots(1, 2 if neurons is not None else 1, figsize=(14 if neurons is not
                                                                           None else 8, 4.5))
    ax = axes[0] if neurons is not None else axes
    ax.hist(summary["max_corr"].to_numpy(), bins=50, alpha=0.6, label="max correlation")
    ax.hist(summary["baseline_max"].to_numpy(), bins=50, alpha=0.6, label="baseline max")
    ax.set(title=_titled(name, "max correlation with the other models' neurons"),
           xlabel="Pearson r", ylabel="neurons x models")
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


def plot_properties(props: pl.DataFrame, path: Path, *, name: str = "") -> Path:
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
    fig.suptitle(_titled(name, "properties of universal vs other neurons (reference model)"))
    fig.tight_layout()
    return save_png(fig, path)


def plot_layers(neurons: pl.DataFrame, path: Path, *, threshold: float = 0.5,
                name: str = "") -> Path:
    """Per layer: the distribution of excess correlation (boxes) against the threshold, and the
    count of universal neurons above each box; with none universal, the figure says so and
    names the largest excess instead of drawing an empty axis."""
    layers = sorted(set(neurons["layer"].to_list()))
    fig, ax = plt.subplots(figsize=(max(12, 0.5 * len(layers) + 4), 5.5))
    data = [neurons.filter(pl.col("layer") == l)["excess"].drop_nulls().drop_nans().to_numpy()
            for l in layers]
    if layers:
        ax.boxplot(data, positions=range(len(layers)), widths=0.6, showfliers=True,
                   flierprops={"markersize": 2, "alpha": 0.4})
        ax.set_xticks(range(len(layers)), [str(l) for l in layers])
        counts = neurons.group_by("layer").agg(pl.col("universal").sum().alias("n"))
        per_layer = dict(zip(counts["layer"].to_list(), counts["n"].to_list()))
        top = max((float(d.max()) for d in data if len(d)), default=threshold)
        for k, l in enumerate(layers):
            ax.text(k, max(top, threshold) + 0.03, f"{int(per_layer.get(l, 0))}", ha="center",
                    fontsize=10, color="#b03030")
        ax.set_ylim(top=max(top, threshold) + 0.12)
    ax.axhline(threshold, ls="--", c="red", alpha=0.7, label=f"threshold {threshold:g}")
    note = no_universal_note(neurons, threshold)
    if note:
        ax.text(0.5, 0.93, note, transform=ax.transAxes, ha="center", va="top", fontsize=13,
                bbox={"facecolor": "#fff6d5", "edgecolor": "#c9a227"})
    total = int(neurons["universal"].sum()) if neurons.height else 0
    ax.set(title=_titled(name, f"universal neurons per layer: {total} of {neurons.height} "
                         f"(red numbers: per layer, excess > {threshold:g})"),
           xlabel="layer", ylabel="excess correlation (mean max r - baseline)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_png(fig, path)
