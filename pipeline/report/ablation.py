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
    return [plot_effects(result.summary, storage.reports(result.run) / f"ablation_{result.mode}.png",
                         run=result.run, mode=result.mode)]


def plot_effects(summary: pl.DataFrame, path: Path, *, run: str = "", mode: str = "") -> Path:
    """KL and change in loss against subset size, one line per method (the name before _t),
    with the controls' mean +- 1 sd; each KL point is labelled with its empirical p-value
    against the controls when the summary has one (kl_p_value)."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
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
            if metric == "kl" and "kl_p_value" in sub.columns:
                for xi, yi, p in zip(x, sub[metric].to_numpy(), sub["kl_p_value"].to_list()):
                    if p is not None:
                        ax.annotate(f"p={p:.2g}", (xi, yi), textcoords="offset points",
                                    xytext=(4, 6), fontsize=9)
        ax.set(xlabel="neurons ablated", ylabel=label,
               title=f"Effect vs subset size ({label.split(',')[0]})")
        ax.grid(alpha=0.3)
        ax.legend()
    head = f"{run} ({mode} ablation): " if run else ""
    fig.suptitle(f"{head}subsets (lines) vs random controls of the same per-layer sizes "
                 "(dashed, ±1 sd)")
    fig.tight_layout()
    return save_png(fig, path)
