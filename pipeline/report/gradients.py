"""Figures of `nwh gradients`, drawn from the neuron_gradients rows of a result.

storage/reports/<name>/layer_<L>_gradients.png (histogram and per-unit values of each saved
aggregate) and combined_gradients.png (their distribution per layer); the units are the rows'
kind: neurons, SAE features, or the dimensions of mlp_out / resid_post.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from pipeline.report.plots import plt, save_png  # plots picks the Agg backend first

COLUMNS = {"mean": "grad_mean", "mean_abs": "grad_mean_abs"}
# row kind -> (the differentiated tensor, one unit of it), for titles and axes
LABELS = {"neuron": ("a", "neuron"), "sae_feature": ("f", "SAE feature"),
          "mlp_out": ("mlp_out", "mlp_out dimension"),
          "resid_post": ("resid_post", "resid_post dimension")}


def draw(result, config, storage) -> list[Path]:
    if result.frame.is_empty():
        return []  # a shard whose result is not written yet
    out = storage.reports(result.name)
    kind = result.frame["kind"][0]
    layers = {l: part.sort("neuron") for (l,), part in
              result.frame.group_by("layer", maintain_order=True)}
    paths = [plot_layer(part, l, result.modes, kind, out / f"layer_{l}_gradients.png")
             for l, part in layers.items()]
    paths.append(plot_combined(layers, result.modes, out / "combined_gradients.png"))
    return paths


def plot_layer(part: pl.DataFrame, layer: int, modes: list[str], kind: str, path: Path) -> Path:
    tensor, unit = LABELS.get(kind, (kind, kind))
    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.6 * len(modes)), squeeze=False)
    for row, mode in enumerate(modes):
        values = part[COLUMNS[mode]].to_numpy()
        axes[row, 0].hist(values, bins=60, color="#3b6ea5")
        axes[row, 0].set(title=f"layer {layer}: {mode} dL/d{tensor}", xlabel=mode,
                         ylabel="count", yscale="log")
        axes[row, 1].scatter(np.arange(len(values)), values, s=3)
        axes[row, 1].set(title=f"layer {layer}: {mode} per {unit}", xlabel=f"{unit} index",
                         ylabel=mode)
    fig.tight_layout()
    return save_png(fig, path)


def plot_combined(layers: dict[int, pl.DataFrame], modes: list[str], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4), squeeze=False)
    for k, mode in enumerate(modes):
        ax = axes[0, k]
        ax.boxplot([part[COLUMNS[mode]].to_numpy() for part in layers.values()], showfliers=False)
        ax.set_xticks(range(1, len(layers) + 1), [str(l) for l in layers])
        ax.set(title=f"{mode} gradient per layer", xlabel="layer", ylabel=mode)
    fig.tight_layout()
    return save_png(fig, path)
