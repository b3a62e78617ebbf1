"""Stage `probe`: linear probes from one layer's masks or activations to a target, per layer.

    nwh probe --run demo-corpus --target next-token
    nwh probe --run demo-corpus --target token --features acts --layers 0-2
    nwh probe --run demo-corpus --target neuron:2/17 --layers 0,1
    nwh probe --run demo-corpus --target position --shuffle     # control: the baselines' level

Targets, for each included token row:
  token        the row's own token id                    (classes; accuracy)
  next-token   the token id of the next row of the same sequence (its last row has none)
  position     the position in the sequence               (real-valued; R^2)
  neuron:L/n   neuron n of layer L: its activation when the run stored acts of layer L (R^2),
               else whether it is active (two classes; accuracy); on layer L itself the neuron
               is left out of the features
Token targets keep the --classes most frequent tokens of the training rows as classes and map
the rest to one <other> class. --shuffle permutes the target over the rows (seeded): a control
that a probe should not beat the baselines on.

Rows are split by sample (window): --test-fraction of the sequences are held out whole, so a
window's neighbouring tokens never sit on both sides. Baselines on the same held-out rows:
majority (the most frequent training class; the training mean for R^2) and unigram (a lookup
from the current token alone: its most frequent training class, or mean; for next-token this is
a bigram model). Features are standardised over the training rows; the weights
(`probe_weights`) are per standard deviation of each neuron.

Out of core: a layer is read through pipeline.core.arrays in blocks of --block-rows rows. When
the training rows are at most --max-rows they are gathered in memory and fitted exactly (lbfgs
logistic regression, or ridge); else SGD (scikit-learn partial_fit) runs --epochs passes over
the blocks. Scores go to `probe_scores` (one row per layer) and `probe_weights` under the run or
--name, in a part per target and features; a rerun with the same config reads them back.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import polars as pl

from pipeline.core import arrays, coact, tables
from pipeline.core.config import Progress, Stage, at_least, config_hash, opt, to_dict
from pipeline.core.errors import UserError
from pipeline.core.layers import check_neuron, parse_layers
from pipeline.core.storage import Storage, slug, validate_run_id

log = logging.getLogger(__name__)

TARGETS = ("next-token", "token", "position", "neuron:L/n")
FEATURES = ("masks", "acts")
SOLVERS = ("auto", "exact", "sgd")
OTHER = -1  # label of the <other> class
_NEURON_TARGET = re.compile(r"^neuron:\s*L?(\d+)\s*/\s*N?(\d+)\s*$", re.I)


def parse_target(spec: str) -> tuple[str, tuple[int, int] | None]:
    """('token' | 'next-token' | 'position' | 'neuron', (layer, index) of neuron:L/n)."""
    text = str(spec).strip().lower()
    if text in ("token", "next-token", "position"):
        return text, None
    m = _NEURON_TARGET.match(text)
    if m:
        return "neuron", (int(m.group(1)), int(m.group(2)))
    hint = (": write neuron:layer/index, e.g. neuron:2/17" if text.startswith("neuron")
            else f": use {', '.join(TARGETS)}")
    raise UserError(f"--target {spec!r} is unknown{hint}")


@dataclass(kw_only=True)
class ProbeConfig(Progress):
    run: str = opt(help="an extraction run")
    target: str = opt(help="next-token, token, position or neuron:L/n (a neuron's activation, or "
                      "whether it is active when the run has no acts of layer L)",
                      metavar="TARGET")
    features: str = opt("masks", help="masks (active bits) or acts (dense activations: a run "
                        "extracted with --store-acts)")
    layers: str | None = opt(None, help="layers probed: '0-3', '0,2' (default: every recorded "
                             "layer; with --features acts, every layer with stored acts)")
    test_fraction: float = opt(0.2, help="share of the samples (windows) held out")
    classes: int = opt(50, help="token targets: the most frequent training tokens kept as "
                       "classes; the others form one <other> class")
    solver: str = opt("auto", help="auto (exact when the training rows fit in --max-rows, else "
                      "sgd), exact or sgd")
    max_rows: int = opt(50_000, help="training rows the exact solver may hold in memory "
                        "(float32, rows x neurons)")
    epochs: int = opt(5, help="sgd: passes over the training rows")
    alpha: float = opt(1e-3, help="L2 penalty per training row (sgd's alpha; exact: C = "
                       "1/(alpha rows), ridge alpha = alpha rows)")
    weights: int = opt(100, help="weights kept per layer and class, largest |weight| first "
                       "(0: all)")
    shuffle: bool = opt(False, help="control: permute the target over the rows (seeded)")
    seed: int = opt(0, help="seed of the split, the shuffle and sgd")
    block_rows: int = opt(8192, help="token rows read at a time", hash=False)
    name: str | None = opt(None, help="result name the tables go under (default: the run)")
    overwrite: bool = opt(False, help="recompute a finished probe", hash=False)

    def __post_init__(self) -> None:
        validate_run_id(self.run)
        if self.name is not None:
            validate_run_id(self.name)
        self.kind, self.neuron = parse_target(self.target)
        self.target = self.target.strip().lower() if self.kind != "neuron" else \
            f"neuron:{self.neuron[0]}/{self.neuron[1]}"
        if self.features not in FEATURES:
            raise UserError(f"--features {self.features!r} is unknown: use masks or acts")
        if self.solver not in SOLVERS:
            raise UserError(f"--solver {self.solver!r} is unknown: use {', '.join(SOLVERS)}")
        if not 0 < self.test_fraction < 1:
            raise UserError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        at_least(self, 1, "classes", "max_rows", "epochs", "block_rows")
        at_least(self, 0, "weights")
        if not self.alpha > 0:
            raise UserError(f"--alpha must be more than 0, got {self.alpha}")

    @property
    def owner(self) -> str:
        return self.name or self.run

    @property
    def part(self) -> str:
        """Part of the tables (and marker key) of this probe: target, features, control."""
        return slug(self.target.replace(":", "-").replace("/", "-"), self.features,
                    "shuffled" if self.shuffle else "")


@dataclass
class ProbeResult:
    owner: str                   # partition of the tables: the run or --name
    run: str
    target: str
    features: str
    part: str
    scores: pl.DataFrame         # probe_scores rows of this probe
    weights: pl.DataFrame        # probe_weights rows of this probe
    reused: bool = False
    info: dict = field(default_factory=dict)  # rows, samples, test samples


# -- the rows and the target


@dataclass
class Target:
    """What is predicted, for every token row of the run."""

    y: np.ndarray                # [T] class index (int64) or value (float64)
    valid: np.ndarray            # [T] bool: the row has a target and is included
    regression: bool
    labels: np.ndarray | None    # class index -> label (token id, 0/1, OTHER)
    label_text: list[str] | None


def read_tokens(storage: Storage, run: str, columns: list[str]) -> dict[str, np.ndarray]:
    """Columns of the run's tokens table in row order (only these columns are read)."""
    parts = sorted(storage.table_partition("tokens", run).glob("*.parquet"))
    if not parts:
        raise UserError(f"run {run!r} has no tokens table: extract it again")
    import pyarrow as pa

    table = pa.concat_tables([tables.read_parquet(p, columns=["row", *columns]) for p in parts])
    order = np.argsort(table["row"].to_numpy(), kind="stable")
    return {c: table[c].to_numpy(zero_copy_only=False)[order] for c in columns}


def read_block(array, start: int, stop: int) -> np.ndarray:
    """Rows start..stop-1 of a Zarr array (the one place rows are read: blocks, never a run)."""
    return array[start:stop]


def blocks(rows: int, size: int) -> Iterator[tuple[int, int]]:
    for s in range(0, rows, size):
        yield s, min(s + size, rows)


def build_target(config: ProbeConfig, storage: Storage, manifest: dict, tokens: dict,
                 included: np.ndarray, train: np.ndarray) -> Target:
    """The target of every row; class targets are encoded on the training rows (`train`)."""
    rows = len(included)
    token_id = tokens["token_id"].astype(np.int64)
    if config.kind == "token":
        return _classes(config, token_id, included.copy(), train, tokens)
    if config.kind == "next-token":
        same = np.zeros(rows, bool)
        same[:-1] = tokens["sample"][1:] == tokens["sample"][:-1]
        nxt = np.zeros(rows, np.int64)
        nxt[:-1] = token_id[1:]
        return _classes(config, nxt, included & same, train, tokens)
    if config.kind == "position":
        return Target(tokens["position"].astype(np.float64), included.copy(), True, None, None)
    layer, n = config.neuron
    widths = coact.layer_widths(manifest)
    check_neuron(widths, layer, n, f"run {config.run!r}", flag="--target neuron:")
    group = arrays.open_group(storage.arrays(config.run), mode="r")
    values = np.zeros(rows, np.float64)
    dense = f"acts/L{layer}" in group
    array = group[f"acts/L{layer}" if dense else f"active/L{layer}"]
    for s, e in blocks(rows, config.block_rows):
        block = read_block(array, s, e)
        values[s:e] = block[:, n] if dense else (block[:, n // 8] >> (n % 8)) & 1
    if dense:
        return Target(values, included.copy(), True, None, None)
    return Target(values.astype(np.int64), included.copy(), False, np.array([0, 1]),
                  ["inactive", "active"])


def _classes(config: ProbeConfig, labels: np.ndarray, valid: np.ndarray, train: np.ndarray,
             tokens: dict) -> Target:
    """Class indices of token labels: the --classes most frequent in the training rows (most
    frequent first, ties by token id), then one <other> class for the rest when there is any."""
    seen, counts = np.unique(labels[valid & train], return_counts=True)
    kept = seen[np.lexsort((seen, -counts))[:config.classes]]
    sorted_kept, where = np.sort(kept), np.argsort(kept)  # kept[where[j]] = sorted_kept[j]
    pos = np.minimum(np.searchsorted(sorted_kept, labels), max(len(kept) - 1, 0))
    hit = sorted_kept[pos] == labels if len(kept) else np.zeros(labels.shape, bool)
    index = np.full(labels.shape, len(kept), np.int64)
    index[hit] = where[pos[hit]]
    other = bool(np.any(valid & ~hit))
    label_ids = np.concatenate([kept, [OTHER]]) if other else kept
    text = _token_texts(tokens, kept) + (["<other>"] if other else [])
    return Target(index, valid, False, label_ids.astype(np.int64), text)


def _token_texts(tokens: dict, ids: np.ndarray) -> list[str]:
    """The decoded text of each token id (from its first row in the tokens table)."""
    seen, first = np.unique(tokens["token_id"].astype(np.int64), return_index=True)
    pos = np.searchsorted(seen, ids)
    return [str(tokens["token"][first[p]]) if p < len(seen) and seen[p] == i else str(i)
            for i, p in zip(ids.tolist(), pos.tolist())]


def split_samples(sample: np.ndarray, valid: np.ndarray, fraction: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(test mask [T], held-out sample ids): a seeded share of the samples with valid rows."""
    samples = np.unique(sample[valid])
    if len(samples) < 2:
        raise UserError(f"the run has {len(samples)} sample(s) with a target: a held-out split "
                        "by sample needs at least 2; extract more windows")
    n_test = min(len(samples) - 1, max(1, int(round(fraction * len(samples)))))
    held = np.sort(np.random.default_rng([seed, 1]).permutation(samples)[:n_test])
    return np.isin(sample, held), held


# -- baselines (the target arrays are in memory: one number per row)


def score(y: np.ndarray, pred: np.ndarray, regression: bool) -> float:
    if len(y) == 0:
        return float("nan")
    if not regression:
        return float(np.mean(y == pred))
    sst = float(np.sum((y - y.mean()) ** 2))
    sse = float(np.sum((y - pred) ** 2))
    return 1.0 - sse / sst if sst > 0 else (1.0 if sse == 0 else 0.0)


def baselines(t: Target, token_id: np.ndarray, train: np.ndarray, test: np.ndarray
              ) -> tuple[float, float]:
    """(majority, unigram) metrics on the test rows, fitted on the training rows."""
    y_tr, y_te, tok_tr, tok_te = t.y[train], t.y[test], token_id[train], token_id[test]
    if t.regression:
        const = float(y_tr.mean())
        toks, inverse = np.unique(tok_tr, return_inverse=True)
        means = np.bincount(inverse, weights=y_tr) / np.bincount(inverse)
    else:
        const = int(np.bincount(y_tr).argmax())  # ties: the smaller class index
        pairs, counts = np.unique(np.stack([tok_tr, y_tr], 1), axis=0, return_counts=True)
        best = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))  # per token: most frequent class
        pairs = pairs[best]
        first = np.r_[True, pairs[1:, 0] != pairs[:-1, 0]]
        toks, means = pairs[first, 0], pairs[first, 1]
    pos = np.searchsorted(toks, tok_te)
    known = (pos < len(toks)) & (toks[np.minimum(pos, len(toks) - 1)] == tok_te)
    uni = np.full(len(y_te), const, dtype=np.float64 if t.regression else np.int64)
    uni[known] = means[pos[known]]
    return (score(y_te, np.full(len(y_te), const), t.regression),
            score(y_te, uni, t.regression))


# -- one layer


class LayerReader:
    """Blocks of one layer's features for the rows of a selection (float32, the target neuron
    left out of its own layer)."""

    def __init__(self, group, features: str, layer: int, width: int, drop: int | None,
                 block_rows: int):
        self.array = group[f"{'acts' if features == 'acts' else 'active'}/L{layer}"]
        self.features, self.width, self.block_rows = features, width, block_rows
        self.keep = None if drop is None else np.delete(np.arange(width), drop)
        self.rows = self.array.shape[0]

    @property
    def neurons(self) -> np.ndarray:
        return np.arange(self.width) if self.keep is None else self.keep

    def __call__(self, select: np.ndarray, order: list[int] | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row indices, features [rows, neurons]) of the selected rows, block by block."""
        spans = list(blocks(self.rows, self.block_rows))
        for k in (order if order is not None else range(len(spans))):
            s, e = spans[k]
            local = np.flatnonzero(select[s:e])
            if not len(local):
                continue
            block = read_block(self.array, s, e)[local]
            if self.features == "masks":
                x = arrays.unpack_mask(block, self.width).astype(np.float32)
            else:
                x = np.asarray(block, np.float32)
            yield s + local, (x if self.keep is None else x[:, self.keep])


@dataclass
class LayerFit:
    train_score: float
    test_score: float
    coef: np.ndarray             # [vectors, neurons]: weights of the standardised features
    classes: list[int | None]    # class index of each vector (None: the regression's one)


def fit_layer(config: ProbeConfig, reader: LayerReader, t: Target, train: np.ndarray,
              test: np.ndarray, solver: str) -> LayerFit:
    """Fit one layer's probe on the training rows and score it on both sides."""
    n_train = int(train.sum())
    d = len(reader.neurons)
    n_classes = 0 if t.regression else len(t.labels)
    # standardisation over the training rows, from float64 sums of one pass (the exact solver
    # gathers the rows in the same pass)
    s1, s2 = np.zeros(d), np.zeros(d)
    gathered_x, gathered_rows = [], []
    for rows, x in reader(train):
        s1 += x.sum(0, dtype=np.float64)
        s2 += np.square(x, dtype=np.float64).sum(0)
        if solver == "exact":
            gathered_x.append(x)
            gathered_rows.append(rows)
    mean = s1 / n_train
    std = np.sqrt(np.maximum(s2 / n_train - mean ** 2, 0.0))
    std[std < 1e-12] = 1.0  # a constant neuron carries nothing; its weight stays 0
    mean32, std32 = mean.astype(np.float32), std.astype(np.float32)
    y_mean = float(t.y[train].mean()) if t.regression else 0.0
    y_std = (float(t.y[train].std()) or 1.0) if t.regression else 1.0

    def prep(x: np.ndarray) -> np.ndarray:
        x -= mean32
        x /= std32
        return x

    def target(rows: np.ndarray) -> np.ndarray:
        return (t.y[rows] - y_mean) / y_std if t.regression else t.y[rows]

    present = None if t.regression else np.unique(t.y[train])
    model = None if present is not None and len(present) < 2 else \
        _model(config, t.regression, n_train, solver)
    if model is not None and solver == "exact":
        x = prep(np.concatenate(gathered_x))
        del gathered_x
        model.fit(x, target(np.concatenate(gathered_rows)))
        del x
    elif model is not None:
        rng = np.random.default_rng([config.seed, 2])
        n_blocks = len(list(blocks(reader.rows, reader.block_rows)))
        for _ in range(config.epochs):
            for rows, x in reader(train, order=list(rng.permutation(n_blocks))):
                perm = rng.permutation(len(rows))
                if t.regression:
                    model.partial_fit(prep(x[perm]), target(rows[perm]))
                else:
                    model.partial_fit(prep(x[perm]), target(rows[perm]),
                                      classes=np.arange(n_classes))
    pred = np.zeros(len(t.y), np.float64 if t.regression else np.int64)
    for rows, x in reader(train | test):
        if model is None:  # one class in the training rows: the probe is that class
            pred[rows] = present[0]
        elif t.regression:
            pred[rows] = model.predict(prep(x)) * y_std + y_mean
        else:
            pred[rows] = model.predict(prep(x))
    if model is None:
        coef, classes = np.zeros((1, d)), [int(present[0])]
    elif t.regression:
        coef, classes = np.atleast_2d(np.asarray(model.coef_, np.float64)), [None]
    else:
        coef = np.atleast_2d(np.asarray(model.coef_, np.float64))
        fitted = [int(c) for c in model.classes_]
        # two classes: one vector, for the second (scikit-learn's convention)
        classes = fitted[1:] if coef.shape[0] == 1 else fitted
    return LayerFit(score(t.y[train], pred[train], t.regression),
                    score(t.y[test], pred[test], t.regression), coef, classes)


def _model(config: ProbeConfig, regression: bool, n_train: int, solver: str):
    from sklearn.linear_model import LogisticRegression, Ridge, SGDClassifier, SGDRegressor

    if solver == "exact":
        if regression:
            return Ridge(alpha=config.alpha * n_train)
        return LogisticRegression(C=1.0 / (config.alpha * n_train), max_iter=1000)
    if regression:
        return SGDRegressor(alpha=config.alpha, random_state=config.seed)
    return SGDClassifier(loss="log_loss", alpha=config.alpha, random_state=config.seed)


def weight_rows(config: ProbeConfig, fit: LayerFit, neurons: np.ndarray, offset: int,
                t: Target) -> dict[str, list]:
    """probe_weights rows of one layer: per class vector, the top --weights |weight|s."""
    cols: dict[str, list] = {k: [] for k in ("label", "label_text", "neuron", "neuron_id",
                                             "weight", "rank")}
    for c, w in zip(fit.classes, fit.coef):
        label, text = (None, "value") if c is None else (int(t.labels[c]), t.label_text[c])
        order = np.argsort(-np.abs(w), kind="stable")
        if config.weights:
            order = order[:config.weights]
        cols["label"] += [label] * len(order)
        cols["label_text"] += [text] * len(order)
        cols["neuron"] += neurons[order].tolist()
        cols["neuron_id"] += (offset + neurons[order]).tolist()
        cols["weight"] += w[order].tolist()
        cols["rank"] += list(range(1, len(order) + 1))
    return cols


# -- the stage


def probe_layers(config: ProbeConfig, storage: Storage, manifest: dict) -> list[int]:
    """The layers probed; --features acts on a run (or layer) without dense acts is an error."""
    widths = coact.layer_widths(manifest)
    recorded = sorted(widths)
    group = arrays.open_group(storage.arrays(config.run), mode="r")
    with_acts = sorted(l for l in recorded if f"acts/L{l}" in group)
    if config.features == "acts" and not with_acts:
        raise UserError(f"run {config.run!r} has no dense activations (--features acts): "
                        "re-extract with --store-acts, or probe --features masks")
    if config.layers is None:
        return with_acts if config.features == "acts" else recorded
    try:
        chosen = parse_layers(config.layers, int(manifest["model"]["n_layers"]))
    except UserError as e:
        raise UserError(f"--layers: {e}") from None
    missing = [l for l in chosen if l not in widths]
    if missing:
        raise UserError(f"--layers {config.layers!r} names layer(s) {missing} that run "
                        f"{config.run!r} did not record (recorded: {recorded})")
    if config.features == "acts":
        no_acts = [l for l in chosen if l not in with_acts]
        if no_acts:
            raise UserError(f"run {config.run!r} has no dense activations of layer(s) {no_acts} "
                            f"(stored: {with_acts}): re-extract with --store-acts (and "
                            "--acts-layers), or probe other layers")
    return chosen


def run(config: ProbeConfig, storage: Storage) -> ProbeResult:
    from tqdm.auto import tqdm

    manifest = storage.finished_run(config.run)
    layers = probe_layers(config, storage, manifest)
    group = arrays.open_group(storage.arrays(config.run), mode="r")
    dense_target = config.kind == "neuron" and f"acts/L{config.neuron[0]}" in group
    key = config_hash(config, extraction=manifest.get("config_hash"), rows=manifest["rows"],
                      layers=layers, dense_target=dense_target)
    marker = storage.marker(config.owner, "probe", config.part)
    done = None if config.overwrite else marker.done(key)
    if done is not None:
        return stored_result(storage, config, done)
    columns = ["sample", "position", "token_id"]
    tokens = read_tokens(storage, config.run, columns + (
        ["token"] if config.kind in ("token", "next-token") else []))
    rows = int(manifest["rows"])
    kept = arrays.included_rows(group, 0, rows)
    included = np.ones(rows, bool) if kept is None else kept
    # the split needs the valid rows, which (next-token) need the samples: a first valid set
    # without class encoding, then the target encoded on the training rows
    base_valid = included.copy()
    if config.kind == "next-token":
        base_valid[-1:] = False
        base_valid[:-1] &= tokens["sample"][1:] == tokens["sample"][:-1]
    test_mask, held = split_samples(tokens["sample"], base_valid, config.test_fraction,
                                    config.seed)
    t = build_target(config, storage, manifest, tokens, included, ~test_mask)
    if config.shuffle:  # the control task: the same values, attached to other rows
        where = np.flatnonzero(t.valid)
        t.y[where] = t.y[where][np.random.default_rng([config.seed, 3]).permutation(len(where))]
    train, test = t.valid & ~test_mask, t.valid & test_mask
    n_train, n_test = int(train.sum()), int(test.sum())
    if n_train == 0 or n_test == 0:
        raise UserError(f"run {config.run!r} leaves {n_train} training and {n_test} held-out "
                        f"rows for --target {config.target}: extract more windows or change "
                        "--test-fraction")
    solver = config.solver if config.solver != "auto" else (
        "exact" if n_train <= config.max_rows else "sgd")
    if solver == "exact" and n_train > config.max_rows:
        raise UserError(f"--solver exact would hold {n_train} training rows, more than "
                        f"--max-rows {config.max_rows}: raise --max-rows or use --solver sgd")
    token_id = tokens["token_id"].astype(np.int64)
    majority, unigram = baselines(t, token_id, train, test)
    widths = coact.layer_widths(manifest)
    offsets = _layer_offsets(storage, config.run)
    score_cols: dict[str, list] = {k: [] for k in tables.schema("probe_scores").names}
    weight_cols: dict[str, list] = {k: [] for k in tables.schema("probe_weights").names}
    for layer in tqdm(layers, disable=config.quiet, desc=f"probe {config.target} ({solver})"):
        drop = config.neuron[1] if config.kind == "neuron" and config.neuron[0] == layer else None
        reader = LayerReader(group, config.features, layer, widths[layer], drop,
                             config.block_rows)
        fit = fit_layer(config, reader, t, train, test, solver)
        neurons, coef = reader.neurons, fit.coef
        top = int(np.abs(coef).max(0).argmax())
        top_row = int(np.abs(coef[:, top]).argmax())
        common = {"run": config.run, "target": config.target, "features": config.features,
                  "shuffled": config.shuffle, "layer": layer}
        for k, v in {**common, "metric": "r2" if t.regression else "accuracy",
                     "score": fit.test_score, "train_score": fit.train_score,
                     "baseline_majority": majority, "baseline_unigram": unigram,
                     "classes": 0 if t.regression else len(t.labels), "neurons": len(neurons),
                     "train_rows": n_train, "test_rows": n_test, "solver": solver,
                     "top_neuron": int(neurons[top]),
                     "top_weight": float(coef[top_row, top])}.items():
            score_cols[k].append(v)
        w = weight_rows(config, fit, neurons, offsets[layer], t)
        n = len(w["neuron"])
        for k, v in common.items():
            weight_cols[k] += [v] * n
        for k, v in w.items():
            weight_cols[k] += v
    marker.path.unlink(missing_ok=True)  # it must not vouch for parts about to be rewritten
    tables.write_part(storage, "probe_scores", config.owner, score_cols, part=config.part)
    tables.write_part(storage, "probe_weights", config.owner, weight_cols, part=config.part)
    info = {"rows": rows, "train_rows": n_train, "test_rows": n_test, "solver": solver,
            "test_samples": held.tolist(), "layers": layers}
    marker.write(to_dict(config), key, part=config.part, **info)
    return ProbeResult(config.owner, config.run, config.target, config.features, config.part,
                       pl.from_arrow(tables.to_arrow("probe_scores", score_cols)),
                       pl.from_arrow(tables.to_arrow("probe_weights", weight_cols)), info=info)


def _layer_offsets(storage: Storage, run: str) -> dict[int, int]:
    neurons = pl.from_arrow(tables.read_partition(storage, "neurons", run).select(
        ["layer", "layer_offset"]))
    return dict(neurons.unique("layer").iter_rows())


def stored_result(storage: Storage, config: ProbeConfig, marker: dict) -> ProbeResult:
    def read(table: str) -> pl.DataFrame:
        part = tables.read_part(storage, table, config.owner, config.part)
        return pl.from_arrow(part if part is not None else tables.schema(table).empty_table())

    info = {k: marker[k] for k in ("rows", "train_rows", "test_rows", "solver", "test_samples",
                                   "layers") if k in marker}
    return ProbeResult(config.owner, config.run, config.target, config.features, config.part,
                       read("probe_scores"), read("probe_weights"), reused=True, info=info)


# -- what the site and the report read


def probe_scores(storage: Storage, owner: str) -> pl.DataFrame:
    """Every probe_scores row of a run (or result name): all targets and features."""
    return pl.from_arrow(tables.read_partition(storage, "probe_scores", owner))


def probe_weights(storage: Storage, owner: str, *, target: str | None = None,
                  layer: int | None = None) -> pl.DataFrame:
    """probe_weights rows of a run (or result name), optionally of one target and layer."""
    frame = pl.from_arrow(tables.read_partition(storage, "probe_weights", owner))
    if target is not None:
        frame = frame.filter(pl.col("target") == target)
    if layer is not None:
        frame = frame.filter(pl.col("layer") == layer)
    return frame


def show(result: ProbeResult) -> str:
    s = result.scores
    metric = s["metric"][0] if s.height else "score"
    lines = [f"probe of {result.target} from {result.features} of run {result.run}"
             f"{' (shuffled control)' if s.height and s['shuffled'][0] else ''}: held-out "
             f"{metric} per layer ({result.info.get('train_rows')} training, "
             f"{result.info.get('test_rows')} held-out rows, {result.info.get('solver')}; "
             f"tables probe_scores, probe_weights under {result.owner})"]
    if result.reused:
        lines.append("finished earlier with this config (--overwrite recomputes it)")
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=160):
        lines.append(str(s.select("layer", "score", "train_score", "baseline_majority",
                                  "baseline_unigram", "classes", "top_neuron", "top_weight")))
    return "\n".join(lines)


STAGES = [Stage(
    "probe", "Linear probes from a layer's masks or activations to the next token, the token, "
    "the position or a neuron, per layer, against baselines.",
    "  nwh probe --run demo-corpus --target next-token\n"
    "  nwh probe --run demo-corpus --target token --features acts --layers 0-2\n"
    "  nwh probe --run demo-corpus --target neuron:2/17 --layers 0,1\n"
    "  nwh probe --run demo-corpus --target position --shuffle\n"
    "  nwh sql \"select layer, score, baseline_majority from probe_scores where target = "
    "'next-token' order by layer\"\n",
    ProbeConfig, run, show, figures="pipeline.report.probe:draw")]
