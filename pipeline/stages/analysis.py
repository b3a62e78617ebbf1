"""Stage `analyze`: important, token-specific, position-specific and consistent neurons of a run,
and clusters of token rows by their activation patterns (tables only; the figures are
pipeline/report/analysis.py).

    nwh analyze --run demo-corpus
    nwh analyze --run demo-prompts --min-token-count 3 --clusters 6

Important neurons come from the run's accumulators (neuron_stats: every row). The mask-level
questions use a sparse table of active events (row, layer, neuron) read from the Zarr masks
block by block over at most --max-rows included rows (a seeded sample when the run has more),
registered on a DuckDB connection with the analysed rows; the queries are in sql/. Finished work
is kept: a rerun with the same configuration returns the stored tables.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.core import arrays, tables
from pipeline.core.config import Stage, at_least, config_hash, opt, to_dict
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, validate_run_id

log = logging.getLogger(__name__)

TABLES = ("important_neurons", "specific_neurons", "consistent_neurons", "token_clusters")
CLUSTER_ROWS = 5000  # rows clustered at most (a seeded sample of the analysed rows)
BLOCK = 8192         # rows of masks unpacked at a time


@dataclass(kw_only=True)
class AnalysisConfig:
    run: str = opt(help="an extraction run")
    top: int = opt(50, help="rows kept per ranking (per kind of specific neuron)")
    min_token_count: int = opt(5, help="tokens (positions) seen fewer times are not analysed")
    min_ratio: float = opt(2.0, help="specific iff P(active | key) / P(active) >= this")
    min_share: float = opt(1.0, help="consistent iff active in at least this share of a "
                           "prompt's samples")
    clusters: int = opt(8, help="k-means clusters of token rows")
    max_rows: int = opt(50_000, help="token rows analysed (a seeded sample beyond this)")
    seed: int = opt(0, help="seed of the row sample and k-means")
    overwrite: bool = opt(False, help="recompute even if analysed with this configuration",
                          hash=False)

    def __post_init__(self) -> None:
        validate_run_id(self.run)
        at_least(self, 1, "top", "min_token_count", "clusters", "max_rows")
        if self.min_ratio <= 0:
            raise UserError(f"--min-ratio must be positive, got {self.min_ratio}")
        if not 0 < self.min_share <= 1:
            raise UserError(f"--min-share must be in (0, 1], got {self.min_share}")


@dataclass
class AnalysisResult:
    run: str
    tables: dict[str, pl.DataFrame]  # by table name, in the declared schemas
    analysed_rows: int               # token rows of the mask-level tables
    total_rows: int                  # token rows of the run
    reused: bool = False             # finished before with this configuration


def sample_rows(total: int, max_rows: int, seed: int) -> np.ndarray:
    """Sorted rows 0..total-1, or a seeded sample of max_rows of them without replacement."""
    if total <= max_rows:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, max_rows, replace=False))


def included_rows(storage: Storage, run: str, total: int) -> np.ndarray:
    """The run's rows that enter its accumulators (tokens.included), sorted."""
    group = arrays.open_group(storage.arrays(run), mode="r")
    kept = arrays.included_rows(group, 0, total)
    return np.arange(total) if kept is None else np.flatnonzero(kept)


def active_events(storage: Storage, run: str, rows: np.ndarray, layers: list[int],
                  widths: list[int]) -> pa.Table:
    """(row, layer, neuron) of every active bit of the given rows, read block by block."""
    group = arrays.open_group(storage.arrays(run), mode="r")
    pieces = [pa.table({"row": pa.array([], pa.int64()), "layer": pa.array([], pa.int32()),
                        "neuron": pa.array([], pa.int32())})]
    for l in layers:
        array = group[f"active/L{l}"]
        for s in range(0, len(rows), BLOCK):
            chunk = rows[s:s + BLOCK]
            packed = array.get_orthogonal_selection((chunk, slice(None)))
            r, n = np.nonzero(arrays.unpack_mask(packed, widths[l]))
            pieces.append(pa.table({"row": chunk[r].astype(np.int64),
                                    "layer": np.full(len(r), l, np.int32),
                                    "neuron": n.astype(np.int32)}))
    return pa.concat_tables(pieces)


def run(config: AnalysisConfig, storage: Storage) -> AnalysisResult:
    """Compute every analysis table of a run and write them to the warehouse (or return the
    stored ones when this configuration is finished)."""
    manifest = storage.finished_run(config.run)
    marker = storage.marker(config.run, "analyze")
    # the extraction's identity too: a re-extracted run of the same name is analysed anew
    chash = config_hash(config, extraction=manifest.get("config_hash"), rows=manifest["rows"])
    done = None if config.overwrite else marker.done(chash)
    if done is not None:
        stored = {t: pl.from_arrow(tables.read_partition(storage, t, config.run))
                  for t in done["tables"]}
        return AnalysisResult(config.run, stored, done["analysed_rows"], manifest["rows"],
                              reused=True)
    marker.path.unlink(missing_ok=True)  # it must not vouch for tables about to be rewritten
    candidates = included_rows(storage, config.run, manifest["rows"])
    rows = candidates[sample_rows(len(candidates), config.max_rows, config.seed)]
    frames = compute_tables(config, storage, manifest, rows)
    for table in TABLES:
        if table in frames:
            tables.write_part(storage, table, config.run, frames[table].to_arrow())
        else:  # e.g. consistent neurons of a run that was re-extracted from a corpus
            tables.drop_partition(storage, table, config.run)
    marker.write(to_dict(config), chash, tables=list(frames), analysed_rows=len(rows),
                 **{f"{t}_rows": f.height for t, f in frames.items()})
    return AnalysisResult(config.run, frames, len(rows), manifest["rows"])


def compute_tables(config: AnalysisConfig, storage: Storage, manifest: dict,
                   rows: np.ndarray) -> dict[str, pl.DataFrame]:
    """The analysis tables of the given rows, each cast to its declared schema."""
    from pipeline.core.warehouse import connect, query

    layers, widths = manifest["model"]["layers"], manifest["model"]["widths"]
    events = active_events(storage, config.run, rows, layers, widths)
    out: dict[str, pl.DataFrame] = {}
    con = connect(storage)
    try:
        con.register("active_events", events)
        con.register("analysed_rows", pa.table({"row": rows.astype(np.int64)}))
        out["important_neurons"] = query(con, "important_neurons", run_id=config.run,
                                         top=config.top)
        out["specific_neurons"] = query(con, "specific_neurons", run_id=config.run,
                                        min_count=config.min_token_count,
                                        min_ratio=config.min_ratio, top=config.top)
        if manifest["config"].get("prompts"):
            out["consistent_neurons"] = query(con, "consistent_neurons", run_id=config.run,
                                              min_share=config.min_share)
    finally:
        con.close()
    tokens = tables.read_partition(storage, "tokens", config.run)
    token_text = np.asarray(tokens["token"].to_pylist(), dtype=object)
    out["token_clusters"] = token_clusters(events, rows, token_text, layers, widths,
                                           k=config.clusters, seed=config.seed)
    return {t: pl.from_arrow(tables.to_arrow(t, f.to_arrow())) for t, f in out.items()}


def token_clusters(events: pa.Table, rows: np.ndarray, token_text: np.ndarray,
                   layers: list[int], widths: list[int], *, k: int, seed: int,
                   max_points: int = CLUSTER_ROWS) -> pl.DataFrame:
    """k-means of token rows on their binary patterns (all recorded neurons), plus 2-D PCA.

    The patterns are a sparse matrix (memory grows with the active events, not with rows x
    neurons); k-means runs to a fixed point (tol=0: labels stop changing), so every row is
    nearest to the mean of its cluster.
    """
    from scipy import sparse
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    kept = rows[sample_rows(len(rows), max_points, seed)]
    first_column = np.zeros(max(layers) + 1, np.int64)
    first_column[layers] = np.concatenate([[0], np.cumsum([widths[l] for l in layers])[:-1]])
    ev_row = events["row"].to_numpy()
    sel = np.isin(ev_row, kept)
    x = sparse.csr_matrix(
        (np.ones(int(sel.sum()), np.float32),
         (np.searchsorted(kept, ev_row[sel]),
          first_column[events["layer"].to_numpy()[sel]] + events["neuron"].to_numpy()[sel])),
        shape=(len(kept), sum(widths[l] for l in layers)))
    k = min(k, len(kept))
    labels = (KMeans(n_clusters=k, n_init=4, tol=0, random_state=seed).fit_predict(x) if k > 1
              else np.zeros(len(kept), int))
    coords = (PCA(n_components=2, svd_solver="arpack", random_state=seed).fit_transform(x)
              if min(x.shape) > 2 else np.zeros((len(kept), 2)))
    return pl.DataFrame({"row": kept.astype(np.int64), "token": list(token_text[kept]),
                         "cluster": labels.astype(np.int32), "pc1": coords[:, 0].astype(float),
                         "pc2": coords[:, 1].astype(float)})


def show(result: AnalysisResult) -> str:
    head = (f"run {result.run!r} was analysed with this configuration: stored tables "
            "(--overwrite recomputes them)" if result.reused else
            f"analysed {result.analysed_rows} of {result.total_rows} token rows of "
            f"{result.run!r}")
    lines = [head]
    with pl.Config(tbl_rows=10, tbl_cols=-1, fmt_str_lengths=30, tbl_width_chars=160):
        for name, frame in result.tables.items():
            lines += [f"== {name} ({frame.height} rows)", str(frame.head(10))]
    return "\n".join(lines)


STAGES = [Stage(
    "analyze", "Important, token- and position-specific, consistent neurons; token clusters.",
    "  nwh analyze --run demo-corpus\n"
    "  nwh analyze --run demo-prompts --min-token-count 2 --clusters 5\n"
    "  nwh analyze --run demo-corpus --max-rows 20000 --overwrite\n"
    "  nwh sql \"select * from specific_neurons where kind = 'token' limit 20\"\n",
    AnalysisConfig, run, show, figures="pipeline.report.analysis:draw")]
