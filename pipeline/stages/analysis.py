"""Activation analysis of a run: important, token-specific, position-specific and consistent
neurons, and clusters of tokens by their activation patterns.

    nwh analyze --run demo-corpus
    nwh analyze --run demo-prompts --min-token-count 3 --clusters 6

Mask-level questions use a sparse table of active events (row, layer, neuron) built from the
Zarr masks block by block over at most --max-rows rows (a seeded sample of rows when the run is
larger), registered on a DuckDB connection; the queries are in sql/.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.core import arrays, tables
from pipeline.core.config import add_arguments, from_args, opt
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class AnalysisConfig:
    run: str = opt(help="an extraction run")
    top: int = opt(50, help="rows kept per ranking")
    min_token_count: int = opt(5, help="tokens (positions) seen fewer times are not analysed")
    min_ratio: float = opt(2.0, help="specific iff P(active | key) / P(active) >= this")
    min_share: float = opt(1.0, help="consistent iff active in at least this share of a prompt's samples")
    clusters: int = opt(8, help="k-means clusters of token rows")
    max_rows: int = opt(50_000, help="token rows analysed (a seeded sample beyond this)")
    seed: int = opt(0, help="seed of the row sample and k-means")

    def __post_init__(self) -> None:
        for name in ("top", "min_token_count", "clusters", "max_rows"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.min_ratio <= 0:
            raise UserError("--min-ratio must be positive")
        if not 0 < self.min_share <= 1:
            raise UserError("--min-share must be in (0, 1]")


def sample_rows(total: int, max_rows: int, seed: int) -> np.ndarray:
    if total <= max_rows:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, max_rows, replace=False))


def active_events(storage: Storage, run: str, rows: np.ndarray, layers: list[int],
                  widths: list[int], block: int = 8192) -> pa.Table:
    """(row, layer, neuron) of every active bit of the given rows, read block by block."""
    group = arrays.open_group(storage.arrays(run), mode="r")
    pieces = []
    for l in layers:
        array = group[f"active/L{l}"]
        for s in range(0, len(rows), block):
            chunk = rows[s:s + block]
            packed = array.get_orthogonal_selection((chunk, slice(None)))
            r, n = np.nonzero(arrays.unpack_mask(packed, widths[l]))
            pieces.append(pa.table({"row": chunk[r].astype(np.int64),
                                    "layer": np.full(len(r), l, np.int32),
                                    "neuron": n.astype(np.int32)}))
    return pa.concat_tables(pieces) if pieces else pa.table(
        {"row": pa.array([], pa.int64()), "layer": pa.array([], pa.int32()),
         "neuron": pa.array([], pa.int32())})


def analyze(config: AnalysisConfig, storage: Storage) -> dict[str, pl.DataFrame]:
    """Compute every analysis table of a run, write them to the warehouse, draw the plots."""
    from pipeline.core.warehouse import connect, load_sql

    manifest = storage.finished_run(config.run)
    layers, widths = manifest["model"]["layers"], manifest["model"]["widths"]
    rows = sample_rows(manifest["rows"], config.max_rows, config.seed)
    tokens = tables.read_partition(storage, "tokens", config.run)
    token_id = tokens["token_id"].to_numpy()[rows]
    token_text = np.asarray(tokens["token"].to_pylist(), dtype=object)[rows]
    position = tokens["position"].to_numpy()[rows]
    events = active_events(storage, config.run, rows, layers, widths)
    out: dict[str, pl.DataFrame] = {}
    con = connect(storage)
    try:
        con.register("active_events", events)
        out["important_neurons"] = con.sql(load_sql("important_neurons"), params={
            "run_id": config.run, "top": config.top}).pl()
        specific = []
        for kind, key, text in (("token", token_id, token_text),
                                ("position", position, position.astype(str))):
            con.register("analysed_rows", pa.table({"row": rows.astype(np.int64),
                                                    "key": key.astype(np.int64),
                                                    "key_text": pa.array(list(text), pa.string())}))
            frame = con.sql(load_sql("specific_neurons"), params={
                "min_count": config.min_token_count, "min_ratio": config.min_ratio,
                "top": config.top}).pl()
            specific.append(frame.with_columns(pl.lit(kind).alias("kind")))
            con.unregister("analysed_rows")
        out["specific_neurons"] = pl.concat(specific)
        if manifest["config"].get("prompts"):
            out["consistent_neurons"] = con.sql(load_sql("consistent_neurons"), params={
                "run_id": config.run, "min_share": config.min_share}).pl()
    finally:
        con.close()
    out["token_clusters"] = token_clusters(events, rows, token_text, layers, widths,
                                           k=config.clusters, seed=config.seed)
    for table, frame in out.items():
        arrow = frame.select(tables.schema(table).names).to_arrow()
        tables.write_part(storage, table, config.run, arrow)
    plot_analysis(out, storage.reports(config.run))
    return out


def token_clusters(events: pa.Table, rows: np.ndarray, token_text: np.ndarray,
                   layers: list[int], widths: list[int], *, k: int, seed: int,
                   max_points: int = 5000) -> pl.DataFrame:
    """k-means of token rows on their binary patterns (all recorded neurons), plus 2-D PCA."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    keep = sample_rows(len(rows), max_points, seed)
    position = {int(r): i for i, r in enumerate(rows[keep])}
    offsets = np.concatenate([[0], np.cumsum([widths[l] for l in layers])])
    column = {l: offsets[i] for i, l in enumerate(layers)}
    x = np.zeros((len(keep), offsets[-1]), np.float32)
    ev_row = events["row"].to_numpy()
    ev_layer = events["layer"].to_numpy()
    ev_neuron = events["neuron"].to_numpy()
    sel = np.isin(ev_row, rows[keep])
    for r, l, n in zip(ev_row[sel], ev_layer[sel], ev_neuron[sel]):
        x[position[int(r)], column[int(l)] + n] = 1.0
    k = min(k, len(keep))
    labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x) if k > 1 \
        else np.zeros(len(keep), int)
    coords = PCA(n_components=2, random_state=seed).fit_transform(x) if len(keep) > 2 \
        else np.zeros((len(keep), 2))
    return pl.DataFrame({"row": rows[keep].astype(np.int64), "token": list(token_text[keep]),
                         "cluster": labels.astype(np.int32), "pc1": coords[:, 0].astype(float),
                         "pc2": coords[:, 1].astype(float)})


def plot_analysis(out: dict[str, pl.DataFrame], directory: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    from pipeline.report.plots import save_png

    paths = []
    imp = out["important_neurons"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, by, col in ((axes[0], "frequency", "frequency"), (axes[1], "mean", "mean")):
        sub = imp.filter(pl.col("rank_by") == by).head(20)
        labels = [f"L{l}.{n}" for l, n in zip(sub["layer"], sub["neuron"])]
        ax.barh(labels[::-1], sub[col].to_list()[::-1], color="#3b6ea5")
        ax.set(title=f"Top neurons by {by}", xlabel=col)
    fig.tight_layout()
    paths.append(save_png(fig, directory / "important_neurons.png"))

    clusters = out["token_clusters"]
    fig, ax = plt.subplots(figsize=(7, 6))
    sc = ax.scatter(clusters["pc1"], clusters["pc2"], c=clusters["cluster"], cmap="tab10", s=6)
    ax.set(title="Token rows clustered by activation pattern (PCA)", xlabel="PC 1", ylabel="PC 2")
    fig.colorbar(sc, ax=ax, label="cluster")
    fig.tight_layout()
    paths.append(save_png(fig, directory / "token_clusters.png"))

    spec = out["specific_neurons"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind, color in (("token", "#c0392b"), ("position", "#2874a6")):
        sub = spec.filter(pl.col("kind") == kind)
        if sub.height:
            ax.hist(np.log2(sub["ratio"].to_numpy()), bins=30, alpha=0.6, color=color, label=kind)
    ax.set(title="Specific neurons: P(active | key) / P(active)", xlabel="log2 ratio",
           ylabel="neuron-key pairs")
    ax.legend()
    fig.tight_layout()
    paths.append(save_png(fig, directory / "specific_neurons.png"))
    return paths


def register(sub) -> None:
    from pipeline.cli import add_stage_parser

    parser = add_stage_parser(
        sub, "analyze", "Important, token- and position-specific, consistent neurons; token clusters.",
        "  nwh analyze --run demo-corpus\n"
        "  nwh analyze --run demo-prompts --min-token-count 2 --clusters 5\n"
        "  nwh sql \"select * from specific_neurons where kind = 'token' limit 20\"\n")
    add_arguments(parser, AnalysisConfig)
    parser.set_defaults(handler=_cli)


def _cli(args) -> int:
    from pipeline.cli import echo

    config = from_args(AnalysisConfig, args)
    storage = Storage(args.storage)
    out = analyze(config, storage)
    with pl.Config(tbl_rows=10, tbl_cols=-1, fmt_str_lengths=30, tbl_width_chars=160):
        for name, frame in out.items():
            echo(f"== {name} ({frame.height} rows)")
            echo(frame.head(10))
    echo(f"figures in {storage.reports(config.run)}")
    return 0
