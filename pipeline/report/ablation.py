"""Figure of `nwh ablate`: effect against subset size, subsets vs their random controls.

storage/reports/<run>/ablation_<mode>.png, drawn from the per-subset summary of the effects.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pipeline.report.plots import plt, save_png  # plots picks the Agg backend first


def draw(result, config, storage) -> list[Path]:
    if result.summary.is_empty():
        return []
    return [plot_effects(result.summary, storage.reports(result.run) / f"ablation_{result.mode}.png")]


def plot_effects(summary: pl.DataFrame, path: Path) -> Path:
    """KL and change in loss against subset size, one line per method (the name before _t),
    with the controls' mean +- 1 sd."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = pl.Series([s.split("_t")[0] for s in summary["subset"]])
    for ax, metric, label in ((axes[0], "kl", "KL(baseline || ablated), nats/token"),
                              (axes[1], "delta_loss", "change in loss, nats/token")):
        for method in sorted(set(methods)):
            sub = summary.filter(methods == method).sort("size")
            x = sub["size"].to_numpy()
            ax.plot(x, sub[metric].to_numpy(), marker="o", label=method)
            mean = sub[f"{metric}_control_mean"].to_numpy().astype(float)
            std = sub[f"{metric}_control_std"].to_numpy().astype(float)
            ax.fill_between(x, mean - std, mean + std, alpha=0.15)
            ax.plot(x, mean, ls="--", lw=1, color="grey")
        ax.set(xlabel="neurons ablated", ylabel=label,
               title=f"Effect vs subset size ({label.split(',')[0]})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Subsets (lines) vs random controls of the same per-layer sizes (dashed, ±1 sd)")
    fig.tight_layout()
    return save_png(fig, path)
