"""What the graph stages read of a run: co-activation counts, active counts, weighted edges, subsets.

    g = load_run_graph(storage, "demo-corpus")        # nodes, counted pairs, T, max count
    counts = read_counts(storage, "demo-corpus", 0, 1)  # int64 [d_0, d_1] of a finished pair
    for (a, b), edges in iter_pair_edges(storage, g, weight="jaccard", threshold=0.2): ...

Edge weights are defined once, in sql/edge_weights.sql: DuckDB computes them pair by pair over
the pair's counts handed over as Arrow, and the threshold filter runs inside the query, so only
the kept edges come back. Memory: one pair's counts and its kept edges at a time.

Nodes of the base graph are the recorded neurons (the `neurons` table), numbered 0..n-1
layer-major: node = offsets[layer] + neuron. Node numbers are not neuron ids (global ids count
every layer of the model, recorded or not): `RunGraph.node_ids` maps one to the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import arrays, tables
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, slug

WEIGHTS = ("normalized", "jaccard", "npmi")
MASK_BLOCK = 8192  # token rows unpacked at a time when active counts come from the masks


def check_threshold(weight: str, threshold: float) -> None:
    if weight not in WEIGHTS:
        raise UserError(f"--weight {weight!r} is unknown: use one of {', '.join(WEIGHTS)}")
    lo = -1.0 if weight == "npmi" else 0.0
    if not lo <= threshold <= 1.0:
        raise UserError(f"threshold {threshold} is outside [{lo:g}, 1] for weight {weight}"
                        + (" (npmi lies in [-1, 1])" if weight == "npmi" else ""))


# -- counts


def layer_widths(manifest: dict) -> dict[int, int]:
    """Recorded layer -> width (model.widths lists every layer of the model)."""
    return {int(l): int(manifest["model"]["widths"][l]) for l in manifest["model"]["layers"]}


def _counts_group(storage: Storage, run: str):
    path = storage.arrays(run)
    return arrays.open_group(path, mode="r") if path.exists() else None


def completed_pairs(group) -> list[tuple[int, int]]:
    """(a, b) of every pair of a run's Zarr group that carries the completion marker."""
    if group is None or "coact" not in group:
        return []
    return sorted(arrays.parse_pair_key(key) for key, array in group["coact"].arrays()
                  if array.attrs.get("complete"))


def read_counts(storage: Storage, run: str, a: int, b: int) -> np.ndarray:
    """The finished int64 counts [d_a, d_b] of a pair of a run."""
    group, name = _counts_group(storage, run), arrays.pair_name(a, b)
    if group is None or name not in group or not group[name].attrs.get("complete"):
        raise UserError(f"run {run!r} has no co-activation counts for layers {a}:{b}: "
                        f"run `nwh coactivation --run {run} --pairs {a}:{b}`")
    return group[name][:]


def _no_counts(run: str) -> UserError:
    return UserError(f"run {run!r} has no co-activation counts: run `nwh coactivation --run {run}`")


def counts_fingerprint(storage: Storage, run: str) -> list[list[int]]:
    """[a, b, tokens, max count, nonzero, total] of every counted pair (a, b) of the run: what a
    result computed from the counts depends on (part of the graph and subset config hashes)."""
    group = _counts_group(storage, run)
    out = []
    for a, b in completed_pairs(group):
        attrs = group[arrays.pair_name(a, b)].attrs
        out.append([a, b] + [int(attrs.get(k, -1)) for k in ("tokens", "max_count", "nonzero", "total")])
    return out



def active_counts(storage: Storage, run: str) -> dict[int, np.ndarray]:
    """Per recorded layer, the number of token rows where each neuron is active
    (neuron_stats.active_count; counted from the masks for a layer that table lacks)."""
    manifest = storage.finished_run(run)
    stats = tables.read_partition(storage, "neuron_stats", run)
    layer = stats["layer"].to_numpy()
    count = stats["active_count"].to_numpy()
    neuron = stats["neuron"].to_numpy()
    out = {}
    for l, width in layer_widths(manifest).items():
        sel = layer == l
        if sel.sum() == width:
            arr = np.zeros(width, np.int64)
            arr[neuron[sel]] = count[sel]
        else:
            arr = _mask_active_counts(storage, run, l, width, int(manifest["rows"]))
        out[l] = arr
    return out


def _mask_active_counts(storage: Storage, run: str, layer: int, width: int, rows: int) -> np.ndarray:
    group = arrays.open_group(storage.arrays(run), mode="r")
    mask = group[f"active/L{layer}"]
    out = np.zeros(width, np.int64)
    for s in range(0, rows, MASK_BLOCK):
        stop = min(s + MASK_BLOCK, rows)
        bits = arrays.unpack_mask(mask[s:stop], width)
        kept = arrays.included_rows(group, s, stop)
        out += (bits if kept is None else bits[kept]).sum(axis=0)
    return out


def counted_rows(storage: Storage, run: str, rows: int) -> int:
    """Token rows that entered a run's accumulators (T of the edge weights): its included rows."""
    group = arrays.open_group(storage.arrays(run), mode="r")
    if arrays.INCLUDED not in group:
        return rows
    return int(group[arrays.INCLUDED][:rows].sum())


# -- the base graph of a run


@dataclass
class RunGraph:
    """What the graph stages need of a run: nodes, counted pairs, active counts, T, max count."""

    run: str
    offsets: dict[int, int]         # layer -> node number of its neuron 0
    node_ids: np.ndarray            # node -> global neuron_id
    node_layers: np.ndarray         # node -> layer
    node_neurons: np.ndarray        # node -> index within its layer
    active: dict[int, np.ndarray]   # layer -> active counts of its neurons (token rows)
    pairs: list[tuple[int, int]]
    tokens: int
    max_count: int
    fingerprint: list[list[int]]

    @property
    def n_nodes(self) -> int:
        return len(self.node_ids)

    def node_of(self, layer: int, neuron: np.ndarray) -> np.ndarray:
        return self.offsets[layer] + np.asarray(neuron, np.int64)


def load_run_graph(storage: Storage, run: str) -> RunGraph:
    manifest = storage.finished_run(run)
    fingerprint = counts_fingerprint(storage, run)
    if not fingerprint:
        raise _no_counts(run)
    neurons = tables.read_partition(storage, "neurons", run)
    layer = neurons["layer"].to_numpy().astype(np.int32)
    neuron = neurons["neuron"].to_numpy().astype(np.int32)
    order = np.lexsort((neuron, layer))
    layer, neuron = layer[order], neuron[order]
    ids = neurons["neuron_id"].to_numpy().astype(np.int64)[order]
    offsets = {int(l): int(np.searchsorted(layer, l)) for l in np.unique(layer)}
    for l, width in layer_widths(manifest).items():
        if l not in offsets or not np.array_equal(neuron[layer == l], np.arange(width)):
            raise UserError(f"run {run!r}: the neurons table does not list neurons 0..{width - 1} "
                            f"of layer {l}: extract the run again")
    return RunGraph(run, offsets, ids, layer, neuron, active_counts(storage, run),
                    [(a, b) for a, b, *_ in fingerprint],
                    counted_rows(storage, run, int(manifest["rows"])),
                    max(pair[3] for pair in fingerprint), fingerprint)


# -- weighted edges (sql/edge_weights.sql)


def weighted_edges(con, counts: np.ndarray, active_a: np.ndarray, active_b: np.ndarray, *,
                   tokens: int, max_count: int, weight: str, threshold: float = -math.inf,
                   index: tuple[pa.Array, pa.Array] | None = None) -> pa.Table:
    """The edges (count > 0) of one pair with `weight` > threshold, computed by
    sql/edge_weights.sql on a DuckDB connection: Arrow table (neuron_a, neuron_b, count, weight)
    sorted by (neuron_a, neuron_b). `index`: pair_index(*counts.shape), when already made."""
    from pipeline.core.warehouse import load_sql

    d_a, d_b = counts.shape
    neuron_a, neuron_b = index or pair_index(d_a, d_b)
    # the counts go in as they lie in memory (zero copy), with the indices and active counts of
    # both neurons beside them: the query keeps this order (no join, no sort), so the edges come
    # back sorted, and runs faster than the same formulas in NumPy
    pair_counts = pa.table({
        "neuron_a": neuron_a, "neuron_b": neuron_b,
        "count": np.ascontiguousarray(counts, np.int64).reshape(-1),
        "n_a": np.repeat(np.asarray(active_a, np.int64), d_b),
        "n_b": np.tile(np.asarray(active_b, np.int64), d_a)})
    con.register("pair_counts", pair_counts)
    try:
        return con.sql(load_sql("edge_weights"), params={
            "tokens": int(tokens), "max_count": int(max_count), "weight": weight,
            "threshold": float(threshold)}).to_arrow_table()
    finally:
        con.unregister("pair_counts")


def pair_index(d_a: int, d_b: int) -> tuple[pa.Array, pa.Array]:
    """(neuron_a, neuron_b) of every cell of a [d_a, d_b] count matrix, in row-major order."""
    return (pa.array(np.repeat(np.arange(d_a, dtype=np.int32), d_b)),
            pa.array(np.tile(np.arange(d_b, dtype=np.int32), d_a)))


def iter_pair_edges(storage: Storage, g: RunGraph, *, weight: str, threshold: float = -math.inf,
                    pairs: list[tuple[int, int]] | None = None
                    ) -> Iterator[tuple[tuple[int, int], pa.Table]]:
    """Pair by pair (every counted pair, or `pairs`), the edges with weight > threshold as Arrow
    tables (neuron_a, neuron_b, count, weight) sorted by (neuron_a, neuron_b)."""
    import duckdb

    con = duckdb.connect()
    index: dict[tuple[int, int], tuple[pa.Array, pa.Array]] = {}  # pairs of one shape share it
    try:
        for a, b in (g.pairs if pairs is None else pairs):
            counts = read_counts(storage, g.run, a, b)
            if counts.shape not in index:
                index.clear()
                index[counts.shape] = pair_index(*counts.shape)
            edges = weighted_edges(con, counts, g.active[a], g.active[b], tokens=g.tokens,
                                   max_count=g.max_count, weight=weight, threshold=threshold,
                                   index=index[counts.shape])
            del counts
            yield (a, b), edges
    finally:
        con.close()


def thresholded_edges(storage: Storage, g: RunGraph, weight: str, threshold: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All edges with weight > threshold: (node pairs [m, 2], counts, weights), sorted by layer
    pair then node (the order igraph builds fastest from)."""
    src, dst, cnt, wts = [], [], [], []
    for (a, b), edges in iter_pair_edges(storage, g, weight=weight, threshold=threshold):
        src.append(g.node_of(a, edges["neuron_a"].to_numpy()))
        dst.append(g.node_of(b, edges["neuron_b"].to_numpy()))
        cnt.append(edges["count"].to_numpy())
        wts.append(edges["weight"].to_numpy())
    if not src:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int64), np.zeros(0)
    return (np.stack([np.concatenate(src), np.concatenate(dst)], axis=1), np.concatenate(cnt),
            np.concatenate(wts))


def no_edges_error(storage: Storage, g: RunGraph, weight: str, threshold: float) -> UserError:
    """The error for a threshold that keeps no edge, naming the largest weight there is."""
    best = max((pc.max(edges["weight"]).as_py() for _, edges in
                iter_pair_edges(storage, g, weight=weight) if edges.num_rows), default=None)
    hint = (f"the largest {weight} weight is {best:.4g}: use a threshold below it"
            if best is not None else "no neuron pair ever fired together")
    return UserError(f"no edge has {weight} weight above {threshold}: {hint}")


# -- stored outputs of the graph stages


def graph_part(weight: str, threshold: float) -> str:
    """Part name of the edges of one (weight, threshold) in the `edges` table."""
    return f"{weight}-{threshold!r}"  # exact: 0.5 and 0.5000001 are two graphs


def check_subset_name(name: str) -> str:
    """A subset name names files: letters, digits and . _ - only (no path separators)."""
    if not name or slug(name) != name:
        raise UserError(f"subset name {name!r} is not valid: use letters, digits and . _ -")
    return name


def subset_path(storage: Storage, run: str, name: str) -> Path:
    """runs/<run>/subsets/<name>.npy: the neuron ids of a subset, the reference's file."""
    return storage.run_dir(run) / "subsets" / f"{check_subset_name(name)}.npy"


def read_subset(storage: Storage, run: str, name: str) -> np.ndarray:
    """Global neuron ids of a stored subset (int64, most central first)."""
    path = subset_path(storage, run, name)
    if path.exists():
        with path.open("rb") as f:  # a file object: local or on object storage
            return np.load(f, allow_pickle=False)
    raise UserError(f"run {run!r} has no subset {name!r}: create it with `nwh subset --run {run}`")
