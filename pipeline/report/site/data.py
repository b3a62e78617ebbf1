"""What the site reads of a warehouse: tables through sql/site_*.sql, arrays through Zarr.

Tables come from one DuckDB connection (`Warehouse`); the few columns that other parts of the
project are renaming are read through views that accept both names (`dormancy_rows`: the
dormancy table's layer_index or layer as `layer`; `gradient_rows`: neuron_gradients' index or
neuron as `neuron`). Arrays (dense activations, masks, co-activation counts, correlation
blocks) are read block by block: memory holds one block of one layer at a time, plus what the
pages keep (top-k examples, histograms, counts per token of the indexed tokens).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.core import arrays, coact
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, read_json
from pipeline.core.warehouse import connect, load_sql

log = logging.getLogger(__name__)

BLOCK_ROWS = 8192          # token rows read at a time from a Zarr array
MASK_EXAMPLE_CAP = 20_000  # active rows remembered per neuron when examples come from masks
RIGHT_CONTEXT = 4          # tokens after an example's token (the left context is --context)
COMBINATIONS = ("g+u+", "g+u-", "g-u+", "g-u-")
STEP = re.compile(r"step[-_]?(\d+)$")


# -- tables


class Warehouse:
    """One DuckDB connection over the warehouse, with the renaming views the site reads."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.con = connect(storage)
        alias_view(self.con, "dormancy_rows", "dormancy",
                   {"layer_index": "layer", "layer_name": "site"})
        alias_view(self.con, "gradient_rows", "neuron_gradients", {"index": "neuron"})

    def frame(self, sql: str, /, **params: Any) -> pl.DataFrame:
        """sql/<name>.sql with bound parameters, as a polars DataFrame."""
        return self.con.sql(load_sql(sql), params=params).pl()

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Warehouse:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def alias_view(con, view: str, table: str, renames: dict[str, str]) -> None:
    """A temporary view of `table` whose columns named as keys of `renames` are renamed to
    the values (when the table still has the old name), so queries read one name."""
    columns = con.sql(f"select * from {table} limit 0").columns  # table: a constant, not input
    pairs = [f'"{old}" as "{new}"' for old, new in renames.items()
             if old in columns and new not in columns]
    select = f"select * rename ({', '.join(pairs)}) from {table}" if pairs else \
        f"select * from {table}"
    con.execute(f"create or replace temp view {view} as {select}")


def step_of(revision: str | None) -> int | None:
    """The training step a revision names (step1000, step-8), or None."""
    m = STEP.search(revision or "")
    return int(m.group(1)) if m else None


# -- runs


@dataclass
class RunInfo:
    """A finished extraction run as the site needs it."""

    run_id: str
    manifest: dict
    row: dict                               # its row of sql/site_runs.sql
    pairs: list[tuple[int, int]] = field(default_factory=list)  # counted layer pairs

    @property
    def model(self) -> str:
        return self.row["model"]

    @property
    def revision(self) -> str | None:
        return self.row["revision"]

    @property
    def asked_revision(self) -> str | None:
        """The revision the extraction was asked for (None: the model's default one)."""
        return self.manifest.get("config", {}).get("revision")

    @property
    def layers(self) -> list[int]:
        return [int(l) for l in self.manifest["model"]["layers"]]

    @property
    def widths(self) -> dict[int, int]:
        return coact.layer_widths(self.manifest)

    @property
    def all_widths(self) -> list[int]:
        return [int(w) for w in self.manifest["model"]["widths"]]

    @property
    def dense(self) -> set[int]:
        return {int(l) for l in self.manifest["model"].get("dense_layers", [])}

    @property
    def gated(self) -> bool:
        return bool(self.manifest["model"].get("gated"))

    @property
    def rule(self) -> str:
        return self.manifest.get("active", {}).get("rule", self.row.get("active_rule", "value"))

    def neuron_id(self, layer: int, neuron: int) -> int:
        """Global id: the widths of every layer before `layer`, plus the index (layer-major)."""
        return int(sum(self.all_widths[:layer]) + neuron)

    def locate(self, neuron_id: int) -> tuple[int, int]:
        offsets = np.cumsum([0] + self.all_widths)
        layer = int(np.searchsorted(offsets, neuron_id, side="right") - 1)
        return layer, int(neuron_id - offsets[layer])


def run_infos(storage: Storage, runs: pl.DataFrame) -> dict[str, RunInfo]:
    """RunInfo of every run of the runs frame that is a finished extraction on disk."""
    out = {}
    for row in runs.iter_rows(named=True):
        path = storage.run_manifest(row["run_id"])
        if not path.exists():
            continue
        manifest = read_json(path)
        if manifest.get("status") != "finished" or "layers" not in manifest.get("model", {}):
            continue
        group = coact._counts_group(storage, row["run_id"])
        out[row["run_id"]] = RunInfo(row["run_id"], manifest, row, coact.completed_pairs(group))
    return out


@dataclass
class Tokens:
    """A run's token rows, with the order that finds an example's context."""

    frame: pl.DataFrame

    def __post_init__(self) -> None:
        f = self.frame
        self.sample = f["sample"].to_numpy()
        self.position = f["position"].to_numpy()
        self.text = f["token"].to_list()
        self.token_id = f["token_id"].to_numpy()
        self.included = f["included"].to_numpy().astype(bool)
        self.order = np.lexsort((self.position, self.sample))
        self.rank = np.empty_like(self.order)
        self.rank[self.order] = np.arange(len(self.order))

    @property
    def rows(self) -> int:
        return self.frame.height

    def window(self, row: int, left: int, right: int = RIGHT_CONTEXT) -> np.ndarray:
        """Rows of the same sequence from `left` tokens before `row` to `right` after it."""
        k = int(self.rank[row])
        around = self.order[max(0, k - left):k + right + 1]
        return around[self.sample[around] == self.sample[row]]

    def text_before(self, row: int, n: int = 40) -> str:
        return "".join(self.text[r] for r in self.window(row, n, 0))


def run_tokens(wh: Warehouse, run: str) -> Tokens:
    return Tokens(wh.frame("site_tokens", run_id=run))


# -- results matched to runs: universal neurons, gradients


@dataclass
class UniversalResult:
    name: str
    models: list[str]
    revision: str | None
    threshold: float
    rule: str
    baseline: str = "rotation"

    def matches(self, info: RunInfo) -> bool:
        """The run is of this result's reference model, at the revision it was compared at."""
        if not self.models or self.models[0] != info.model:
            return False
        return (info.asked_revision is None) if self.revision is None \
            else self.revision in (info.revision, info.asked_revision)


def universal_results(storage: Storage, summary: pl.DataFrame) -> list[UniversalResult]:
    out = []
    for name in summary["name"].to_list():
        marker = storage.marker(name, "universal").path
        config = read_json(marker).get("config", {}) if marker.exists() else {}
        out.append(UniversalResult(name, list(config.get("models", [])), config.get("revision"),
                                   float(config.get("threshold", 0.5)),
                                   str(config.get("rule", "paper")),
                                   str(config.get("baseline", "rotation"))))
    return out


def gradient_result_for(results: pl.DataFrame, info: RunInfo) -> str | None:
    """The neuron gradient result of the run's model and revision (the first by name)."""
    hit = results.filter((pl.col("model") == info.model)
                         & pl.col("revision").eq_missing(info.revision))
    return hit["name"][0] if hit.height else None


# -- neuron examples from the arrays


@dataclass
class Example:
    row: int
    value: float | None                 # None: only known to be active (masks only)
    context: list[tuple[int, str, float | None]]  # (row, token text, value or None)


@dataclass
class NeuronArrays:
    """What the arrays tell about one neuron."""

    source: str                          # acts, sign (gated top-|a| rows) or mask
    examples: list[Example] = field(default_factory=list)
    hist_edges: np.ndarray | None = None
    hist_counts: np.ndarray | None = None
    sign_examples: dict[str, list[Example]] = field(default_factory=dict)


def _topk_merge(best_v: np.ndarray, best_r: np.ndarray, v: np.ndarray, r: np.ndarray, k: int):
    """The k largest values of two candidate lists; ties go to the earlier row."""
    vals = np.concatenate([best_v, v])
    rows = np.concatenate([best_r, r])
    order = np.lexsort((rows, -vals))[:k]
    return vals[order], rows[order]


def neuron_arrays(storage: Storage, info: RunInfo, tokens: Tokens, wanted: dict[int, list[int]],
                  stats: pl.DataFrame, signs: pl.DataFrame, *, k: int, context: int,
                  bins: int) -> dict[int, NeuronArrays]:
    """Examples (and histograms where activations are stored) of the wanted neurons
    {layer: [neuron]}, keyed by global id. `stats` holds min/max per neuron_id (the histogram
    range); `signs` the sign_examples rows of these neurons (gated runs)."""
    group = arrays.open_group(storage.arrays(info.run_id), mode="r")
    bounds = {r["neuron_id"]: (r["min"], r["max"]) for r in
              stats.select("neuron_id", "min", "max").iter_rows(named=True)}
    out: dict[int, NeuronArrays] = {}
    for layer, neurons in sorted(wanted.items()):
        cols = np.array(sorted(set(neurons)), dtype=np.int64)
        ids = [info.neuron_id(layer, int(n)) for n in cols]
        dense = layer in info.dense and f"acts/L{layer}" in group
        acts = group[f"acts/L{layer}"] if dense else None
        if dense:
            found = _dense_top(acts, tokens, cols, ids, bounds, k=k, bins=bins)
        elif info.gated and signs.height:
            found = {i: NeuronArrays("sign") for i in ids}
        else:
            found = _mask_rows(group[f"active/L{layer}"], tokens, cols, ids, info.widths[layer], k=k)
        # sign combinations of gated neurons: their top-|a| rows from sign_examples
        for i in ids if signs.height else []:
            part = signs.filter(pl.col("neuron_id") == i)
            for comb in COMBINATIONS:
                rows = part.filter(pl.col("combination") == comb).sort("rank")
                found[i].sign_examples[comb] = [Example(int(r), float(v), [])
                                                for r, v in zip(rows["row"], rows["value"])]
            if found[i].source == "sign":
                top = part.sort(["value", "row"], descending=[True, False]).unique(
                    "row", keep="first", maintain_order=True).head(k)
                found[i].examples = [Example(int(r), float(v), [])
                                     for r, v in zip(top["row"], top["value"])]
        _fill_context(found, acts, tokens, cols, ids, context)
        out.update(found)
    return out


def _dense_top(acts, tokens: Tokens, cols: np.ndarray, ids: list[int], bounds: dict, *, k: int,
               bins: int) -> dict[int, NeuronArrays]:
    """Top-k rows by activation and the histogram of each column, over the included rows."""
    m = len(cols)
    best_v = [np.zeros(0, np.float64) for _ in range(m)]
    best_r = [np.zeros(0, np.int64) for _ in range(m)]
    edges = []
    for i in ids:
        lo, hi = bounds.get(i, (0.0, 0.0))
        lo = 0.0 if lo is None or not np.isfinite(lo) else float(lo)
        hi = lo if hi is None or not np.isfinite(hi) else float(hi)
        edges.append(np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1))
    counts = np.zeros((m, bins), np.int64)
    rows_total = min(acts.shape[0], tokens.rows)
    for start in range(0, rows_total, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, rows_total)
        block = np.asarray(acts[start:stop], dtype=np.float64)[:, cols]
        keep = tokens.included[start:stop]
        rows = np.arange(start, stop)[keep]
        block = block[keep]
        for j in range(m):
            v = block[:, j]
            if len(v) > k:
                part = np.argpartition(-v, k - 1)[:k]
                # every row tied with the k-th value competes, so ties go to the earlier row
                part = np.flatnonzero(v >= v[part].min())
            else:
                part = np.arange(len(v))
            best_v[j], best_r[j] = _topk_merge(best_v[j], best_r[j], v[part], rows[part], k)
            counts[j] += np.histogram(np.clip(v, edges[j][0], edges[j][-1]), edges[j])[0]
    out = {}
    for j, i in enumerate(ids):
        out[i] = NeuronArrays("acts", [Example(int(r), float(v), [])
                                       for v, r in zip(best_v[j], best_r[j])],
                              edges[j], counts[j])
    return out


def _mask_rows(mask, tokens: Tokens, cols: np.ndarray, ids: list[int], width: int, *,
               k: int) -> dict[int, NeuronArrays]:
    """Without activations: k included rows where each neuron is active, spread evenly over
    the run (the first MASK_EXAMPLE_CAP active rows)."""
    found: list[list[np.ndarray]] = [[] for _ in cols]
    seen = np.zeros(len(cols), np.int64)
    rows_total = min(mask.shape[0], tokens.rows)
    for start in range(0, rows_total, BLOCK_ROWS):
        if (seen >= MASK_EXAMPLE_CAP).all():
            break
        stop = min(start + BLOCK_ROWS, rows_total)
        bits = arrays.unpack_mask(np.asarray(mask[start:stop]), width)[:, cols]
        bits &= tokens.included[start:stop, None]
        for j in range(len(cols)):
            if seen[j] < MASK_EXAMPLE_CAP:
                hit = start + np.flatnonzero(bits[:, j])
                found[j].append(hit)
                seen[j] += len(hit)
    out = {}
    for j, i in enumerate(ids):
        rows = np.concatenate(found[j]) if found[j] else np.zeros(0, np.int64)
        pick = rows[np.linspace(0, len(rows) - 1, min(k, len(rows))).round().astype(int)] \
            if len(rows) else rows
        out[i] = NeuronArrays("mask", [Example(int(r), None, []) for r in pick])
    return out


def _fill_context(found: dict[int, NeuronArrays], acts, tokens: Tokens, cols: np.ndarray,
                  ids: list[int], context: int) -> None:
    """Each example's context tokens, with their activations where the layer is stored."""
    windows: dict[int, np.ndarray] = {}
    for i in ids:
        for ex in _all_examples(found[i]):
            if ex.row not in windows:
                windows[ex.row] = tokens.window(ex.row, context)
    values: dict[tuple[int, int], float] = {}
    if acts is not None and windows:
        rows = np.unique(np.concatenate(list(windows.values())))
        block = np.asarray(acts.get_orthogonal_selection((rows, cols)), dtype=np.float64)
        for a, r in enumerate(rows):
            for j, i in enumerate(ids):
                values[(int(r), i)] = float(block[a, j])
    for i in ids:
        for ex in _all_examples(found[i]):
            ex.context = [(int(r), tokens.text[r],
                           values.get((int(r), i), ex.value if r == ex.row else None))
                          for r in windows[ex.row]]


def _all_examples(n: NeuronArrays) -> list[Example]:
    return n.examples + [e for exs in n.sign_examples.values() for e in exs]


# -- co-activation neighbours and correlated neurons


@dataclass
class Neighbour:
    layer: int
    neuron: int
    count: int       # token rows where both are active
    jaccard: float   # count / (rows where either is active)


def coact_neighbours(storage: Storage, info: RunInfo, wanted: dict[int, list[int]], *,
                     k: int) -> dict[tuple[int, int], list[Neighbour]]:
    """The k neighbours by Jaccard weight in every counted layer pair touching each wanted
    neuron's layer, keyed by (layer, neuron); one pair's counts in memory at a time."""
    active = coact.active_counts(storage, info.run_id)
    out: dict[tuple[int, int], list[Neighbour]] = {(l, n): [] for l, ns in wanted.items()
                                                   for n in ns}
    for a, b in info.pairs:
        mine = [(l, side) for l, side in ((a, 0), (b, 1)) if l in wanted]
        if not mine:
            continue
        counts = coact.read_counts(storage, info.run_id, a, b)
        for layer, side in mine:
            other = b if side == 0 else a
            for n in wanted[layer]:
                c = counts[n, :] if side == 0 else counts[:, n]
                union = active[layer][n] + active[other] - c
                with np.errstate(divide="ignore", invalid="ignore"):
                    jac = np.where(c > 0, c / np.maximum(union, 1), 0.0)
                top = np.lexsort((np.arange(len(c)), -jac))[:k]
                out[(layer, n)] += [Neighbour(other, int(t), int(c[t]), float(jac[t]))
                                    for t in top if c[t] > 0]
    return out


@dataclass
class Correlated:
    model: str
    layer: int
    neuron: int
    r: float


def correlated_neurons(storage: Storage, result: UniversalResult, wanted: dict[int, list[int]],
                       *, k: int) -> dict[tuple[int, int], list[Correlated]]:
    """Per wanted neuron of the reference model: its k most correlated neurons of each other
    model, over all their layers, from the stored correlation blocks corr/m<i>/L<a>_L<b>."""
    out: dict[tuple[int, int], list[Correlated]] = {(l, n): [] for l, ns in wanted.items()
                                                    for n in ns}
    path = storage.arrays(result.name)
    if not path.exists():
        return out
    group = arrays.open_group(path, mode="r")
    if "corr" not in group:
        return out
    for i, model in enumerate(result.models[1:], start=1):
        key = f"m{i}"
        if key not in group["corr"]:
            continue
        blocks = {arrays.parse_pair_key(name): arr for name, arr in group["corr"][key].arrays()}
        for layer, neurons in wanted.items():
            mine = sorted((b, arr) for (a, b), arr in blocks.items() if a == layer)
            if not mine:
                continue
            for n in neurons:
                cands = []
                for b, arr in mine:
                    row = np.asarray(arr[n, :], dtype=np.float64)
                    row = np.where(np.isfinite(row), row, -np.inf)
                    top = np.argsort(-row, kind="stable")[:k]
                    cands += [(float(row[t]), b, int(t)) for t in top if np.isfinite(row[t])]
                cands.sort(key=lambda c: (-c[0], c[1], c[2]))
                out[(layer, n)] += [Correlated(model, b, t, r) for r, b, t in cands[:k]]
    return out


# -- the neuron's direct effect on the logits


@dataclass
class LogitEffects:
    top: dict[tuple[int, int], list[tuple[str, float]]] = field(default_factory=dict)
    bottom: dict[tuple[int, int], list[tuple[str, float]]] = field(default_factory=dict)
    reason: str | None = None    # why there are none


def logit_effects(storage: Storage, info: RunInfo, wanted: dict[int, list[int]], *, k: int,
                  device: str = "cpu", cache: dict | None = None) -> LogitEffects:
    """W_out[n] . W_U of each wanted neuron (the final norm left out): its k most promoted and
    most suppressed tokens. Needs the model's weights: the run's model folder, a zoo model, or
    a hub model in the local cache; otherwise `reason` says what is missing."""
    if k <= 0 or not wanted:
        return LogitEffects(reason="not asked for (--logit-tokens 0)")
    cache = {} if cache is None else cache  # runs of one checkpoint share its weights
    key = (info.manifest["model"].get("path"), info.model, info.revision)
    try:
        if key not in cache:
            cache.clear()  # one model's weights in memory at a time
            cache[key] = _load_for_weights(storage, info, device)
        loaded = cache[key]
    except UserError as e:
        cache[key] = e
        return LogitEffects(reason=f"the model's weights are not reachable ({e})")
    if isinstance(loaded, UserError):
        return LogitEffects(reason=f"the model's weights are not reachable ({loaded})")
    import torch

    out = LogitEffects()
    with torch.no_grad():
        unembed = loaded.adapter.unembed(loaded.model).float()        # [d_model, vocab]
        for layer, neurons in wanted.items():
            w_out = loaded.adapter.w_out(loaded.model, layer).float()  # [d_mlp, d_model]
            idx = torch.as_tensor(sorted(set(neurons)), dtype=torch.long, device=w_out.device)
            effect = (w_out[idx] @ unembed.to(w_out.device)).cpu().numpy().astype(np.float64)
            for j, n in enumerate(idx.tolist()):
                row = effect[j]
                order = np.argsort(-row, kind="stable")
                out.top[(layer, n)] = [(_decode(loaded.tokenizer, t), float(row[t]))
                                       for t in order[:k]]
                out.bottom[(layer, n)] = [(_decode(loaded.tokenizer, t), float(row[t]))
                                          for t in order[::-1][:k]]
    return out


def _load_for_weights(storage: Storage, info: RunInfo, device: str):
    from pipeline.models.loading import load_model

    model = info.manifest["model"]
    path = model.get("path")
    if path and Path(path).is_dir() and (Path(path) / "config.json").exists():
        return load_model(str(path), None, storage=storage, device=device, dtype="float32")
    if path and str(path).lower().endswith(".gguf") and Path(path).is_file():
        return load_model(str(path), None, storage=storage, device=device, dtype="float32")
    return load_model(model["name"], model.get("revision"), storage=storage, device=device,
                      dtype="float32")


def _decode(tokenizer, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


# -- token -> neurons index (search by token)


def token_neurons(storage: Storage, info: RunInfo, tokens: Tokens, frequency: dict[int, np.ndarray],
                  *, top_tokens: int, per_token: int, min_count: int = 3) -> dict[str, list[dict]]:
    """For the `top_tokens` most frequent tokens of a run (at least `min_count` included rows):
    the `per_token` neurons whose activation frequency on that token most exceeds their
    frequency overall (lift = P(active | token) - P(active); at least 2 hits). Read from the
    masks layer by layer: counts [tokens, width] of one layer in memory."""
    if top_tokens <= 0:
        return {}
    ids = tokens.token_id[tokens.included]
    if not len(ids):
        return {}
    uniq, freq = np.unique(ids, return_counts=True)
    order = np.lexsort((uniq, -freq))
    chosen = [(int(uniq[i]), int(freq[i])) for i in order[:top_tokens] if freq[i] >= min_count]
    if not chosen:
        return {}
    code_of = {t: c for c, (t, _) in enumerate(chosen)}
    tok_counts = np.array([n for _, n in chosen], np.float64)
    codes = np.array([code_of.get(int(t), -1) for t in tokens.token_id], np.int64)
    codes[~tokens.included] = -1
    group = arrays.open_group(storage.arrays(info.run_id), mode="r")
    best: list[list[tuple[float, int, int, int]]] = [[] for _ in chosen]  # (lift, layer, n, hits)
    for layer, width in sorted(info.widths.items()):
        mask = group[f"active/L{layer}"]
        hits = np.zeros((len(chosen), width), np.int64)
        rows_total = min(mask.shape[0], tokens.rows)
        for start in range(0, rows_total, BLOCK_ROWS):
            stop = min(start + BLOCK_ROWS, rows_total)
            c = codes[start:stop]
            sel = np.flatnonzero(c >= 0)
            if not len(sel):
                continue
            bits = arrays.unpack_mask(np.asarray(mask[start:stop]), width)[sel]
            cs = c[sel]
            order = np.argsort(cs, kind="stable")
            cs, bits = cs[order], bits[order]
            starts = np.flatnonzero(np.r_[True, cs[1:] != cs[:-1]])
            hits[cs[starts]] += np.add.reduceat(bits.astype(np.int32), starts, axis=0)
        p_tok = hits / tok_counts[:, None]
        lift = p_tok - frequency[layer][None, :]
        lift[hits < 2] = -np.inf
        for t in range(len(chosen)):
            top = np.argsort(-lift[t], kind="stable")[:per_token]
            best[t] += [(float(lift[t, n]), layer, int(n), int(hits[t, n])) for n in top
                        if np.isfinite(lift[t, n]) and lift[t, n] > 0]
    out: dict[str, list[dict]] = {}
    for (token_id, count), cands in zip(chosen, best):
        text = tokens.text[int(np.flatnonzero(tokens.token_id == token_id)[0])]
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        entry = [{"layer": l, "neuron": n, "hits": h, "count": count,
                  "p_token": h / count, "p_all": float(frequency[l][n])}
                 for _, l, n, h in cands[:per_token]]
        if entry and (text not in out or out[text][0]["count"] < count):
            out[text] = entry
    return out


# -- the layered graph of one token row


def graph_of_rows(storage: Storage, info: RunInfo, tokens: Tokens, rows: list[int], *,
                  edges: int) -> list[dict]:
    """For each token row: the active neurons of every recorded layer (with their activation
    where stored) and the `edges` strongest co-activation edges (Jaccard weight of the run's
    counts) between active neurons of counted layer pairs."""
    group = arrays.open_group(storage.arrays(info.run_id), mode="r")
    active_counts = coact.active_counts(storage, info.run_id)
    graphs = []
    actives: list[dict[int, np.ndarray]] = []
    for row in rows:
        layers, act = [], {}
        for layer, width in sorted(info.widths.items()):
            bits = arrays.unpack_mask(np.asarray(group[f"active/L{layer}"][row:row + 1]), width)[0]
            idx = np.flatnonzero(bits)
            act[layer] = idx
            if layer in info.dense and f"acts/L{layer}" in group:
                vals = np.asarray(group[f"acts/L{layer}"][row], dtype=np.float64)[idx]
            else:
                vals = np.ones(len(idx))
            layers.append({"layer": layer, "width": width,
                           "nodes": [[int(n), round(float(v), 4)] for n, v in zip(idx, vals)]})
        actives.append(act)
        graphs.append({"row": int(row), "token": tokens.text[row],
                       "text": tokens.text_before(row, 30), "sample": int(tokens.sample[row]),
                       "position": int(tokens.position[row]), "layers": layers, "edges": []})
    candidates: list[list[tuple]] = [[] for _ in rows]
    for a, b in info.pairs:
        counts = coact.read_counts(storage, info.run_id, a, b)
        for g, act in enumerate(actives):
            A, B = act.get(a, np.zeros(0, int)), act.get(b, np.zeros(0, int))
            if not len(A) or not len(B):
                continue
            sub = counts[np.ix_(A, B)]
            union = active_counts[a][A][:, None] + active_counts[b][B][None, :] - sub
            with np.errstate(divide="ignore", invalid="ignore"):
                jac = np.where(sub > 0, sub / np.maximum(union, 1), 0.0).ravel()
            top = np.argsort(-jac, kind="stable")[:edges]
            for t in top:
                if jac[t] > 0:
                    i, j = divmod(int(t), len(B))
                    candidates[g].append((float(jac[t]), a, int(A[i]), b, int(B[j]),
                                          int(sub[i, j])))
    for g, cands in enumerate(candidates):
        cands.sort(key=lambda c: (-c[0], c[1], c[2], c[4]))
        graphs[g]["edges"] = [[a, na, b, nb, round(w, 5), c] for w, a, na, b, nb, c
                              in cands[:edges]]
    return graphs


def default_graph_rows(tokens: Tokens, count: int = 3) -> list[int]:
    """The middle included token of each of the first `count` sequences."""
    rows = []
    for s in list(dict.fromkeys(tokens.sample[tokens.order].tolist()))[:count]:
        mine = tokens.order[(tokens.sample[tokens.order] == s) & tokens.included[tokens.order]]
        if len(mine):
            rows.append(int(mine[len(mine) // 2]))
    return rows
