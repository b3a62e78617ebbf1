"""Figures of `nwh probe`, drawn from probe_scores: the held-out score of each layer's probe
against the majority and unigram baselines.

storage/reports/<run or --name>/probe_<target>_<features>.png (one probe); plot_scores also draws
several probes of a partition in one figure (one panel per metric, one line per probe).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pipeline.report.plots import plt, save_png  # plots picks the Agg backend first

METRIC_LABELS = {"accuracy": "held-out accuracy", "r2": "held-out R$^2$"}


def draw(result, config, storage) -> list[Path]:
    out = storage.reports(result.owner) / f"probe_{result.part}.png"
    return [plot_scores(result.scores, out, title=f"Linear probe of {result.target} from "
                        f"{result.features}, run {result.run}")]


def _probe_name(row: dict) -> str:
    return f"{row['target']} from {row['features']}" + (" (shuffled)" if row["shuffled"] else "")


def plot_scores(scores: pl.DataFrame, path: Path, *, title: str | None = None) -> Path:
    """Score by layer of every probe in `scores` (probe_scores rows), with the training score
    dotted and the baselines of each probe as dashed (majority) and dash-dotted (unigram)
    lines; one panel per metric."""
    metrics = scores["metric"].unique(maintain_order=True).to_list() or ["accuracy"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(7.5 * len(metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        part = scores.filter(pl.col("metric") == metric)
        groups = part.select("target", "features", "shuffled").unique(maintain_order=True)
        single = groups.height == 1
        for i, key in enumerate(groups.iter_rows(named=True)):
            rows = part.filter((pl.col("target") == key["target"])
                               & (pl.col("features") == key["features"])
                               & (pl.col("shuffled") == key["shuffled"])).sort("layer")
            layers = rows["layer"].to_numpy()
            color = f"C{i % 10}"
            label = "probe" if single else _probe_name(key)
            ax.plot(layers, rows["score"].to_numpy(), marker="o", color=color, label=label)
            ax.plot(layers, rows["train_score"].to_numpy(), ls=":", color=color, alpha=0.7,
                    label="probe, training rows" if single else None)
            for column, ls, name in (("baseline_majority", "--", "majority"),
                                     ("baseline_unigram", "-.", "unigram (current token)")):
                ax.axhline(float(rows[column][0]), ls=ls, color="gray" if single else color,
                           alpha=0.7, label=f"{name} baseline" if single else None)
        ax.set(xlabel="layer", ylabel=METRIC_LABELS.get(metric, metric))
        if part.height:
            ax.set_xticks(sorted(set(part["layer"].to_list())))
        if metric == "accuracy":
            ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
    fig.suptitle(title or "Linear probes by layer")
    fig.tight_layout()
    return save_png(fig, path)
