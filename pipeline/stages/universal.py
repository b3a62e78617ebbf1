"""Stage `universal`: neurons that correlate across models trained with different seeds.

    nwh universal --models zoo-s0 zoo-s1 zoo-s2
    nwh universal --models zoo-s0 zoo-s1 --baseline permutation --threshold 0.3 --min-models 1

The same token windows go through every model (their tokenizers must agree). Out of core:
  1. each model's activations of every layer are cached in runs/<name>/arrays.zarr
     (acts/m<i>/L<l>, float32 [T, d]), with streaming moments of the reference (the first);
  2. for every other model B and every layer pair (a of the reference, b of B), the Pearson
     correlations come from float64 sums whose cross term is a matrix product over token chunks
     (pipeline.kernels.correlation); only that pair's [d_a, d_b] block is in memory; it is
     written to corr/m<i>/L<a>_L<b> and folded into the per-neuron maxima at once;
  3. the same for a baseline of B: a fixed-seed random rotation (orthogonal), a Gaussian mixing
     with unit-norm rows, or a fixed permutation of the token rows.
Per reference neuron and model B (`correlation_summary`): max correlation, its argmax neuron,
the baseline max; excess = max - baseline. Universal iff excess > --threshold for at least
--min-models models (`universal_neurons`). The reference's weight and activation properties
go to `neuron_properties` under the result name, their means per group to
`universal_properties`. The arrays folder appears whole (written under a temporary name); a
rerun with the same config reads the stored result (runs/<name>/stages/universal.json).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import polars as pl

from pipeline.core import arrays, tables
from pipeline.core.config import (
    ModelOptions,
    Progress,
    Stage,
    WindowOptions,
    config_hash,
    opt,
    to_dict,
)
from pipeline.core.errors import UserError
from pipeline.core.inputs import corpus_windows, input_fingerprint
from pipeline.core.storage import Storage, atomic_path, slug
from pipeline.kernels.correlation import CHUNK_ROWS, PairCorrelation

log = logging.getLogger(__name__)

BASELINES = ("rotation", "gaussian", "permutation")
PROPERTY_COLUMNS = ("w_in_norm", "w_out_norm", "input_bias", "in_out_sim", "l2_penalty",
                    "vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt", "act_mean", "act_var",
                    "sparsity")


@dataclass(kw_only=True)
class UniversalConfig(ModelOptions, WindowOptions, Progress):
    models: list[str] = opt(help="two or more models (the first is the reference), e.g. zoo-s0 "
                            "zoo-s1 zoo-s2")
    baseline: str = opt("rotation", help="rotation (orthogonal), gaussian (unit-norm rows) "
                        "or permutation (of token rows)", choices=BASELINES)
    threshold: float = opt(0.5, help="universal iff max - baseline correlation > this")
    min_models: int | None = opt(None, help="...for at least this many models (default: all "
                                 "others)")
    seed: int = opt(0, help="seed of the baseline")
    name: str | None = opt(None, help="result name (default: slug of the models)")
    overwrite: bool = opt(False, help="recompute a finished result", hash=False)
    # ModelOptions with other meanings here: every model of --models loads at --revision
    model: str | None = opt(None, help="the reference model (the first of --models)", cli=False)
    revision: str | None = opt(None, help="checkpoint of every model: zoo subfolder (step256) "
                               "or hub git revision; default the final one")
    corpus: str = opt("stdlib:heldout", help="corpus whose windows go through every model: "
                      "stdlib:heldout, a .txt/.jsonl/.parquet/.csv file or a datasets hub name")

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise UserError(f"--models needs at least two models, got {self.models}: add the "
                            "models to compare with the first")
        if self.baseline not in BASELINES:
            raise UserError(f"--baseline {self.baseline!r} is unknown: use {', '.join(BASELINES)}")
        others = len(self.models) - 1
        if self.min_models is None:
            self.min_models = others
        if not 1 <= self.min_models <= others:
            raise UserError(f"--min-models {self.min_models} is out of range: use 1..{others} "
                            f"(the number of models besides the reference)")
        self.model = self.models[0]
        self.check_windows()

    @property
    def result_name(self) -> str:
        return self.name or slug("universal", *[m.split("/")[-1] for m in self.models])


@dataclass
class UniversalResult:
    name: str
    summary: pl.DataFrame      # correlation_summary: per reference neuron and other model
    neurons: pl.DataFrame      # universal_neurons
    properties: pl.DataFrame   # the reference's neuron_properties with the universal flag
    comparison: pl.DataFrame   # universal_properties: group means
    reused: bool               # finished earlier with the same config


# -- baselines


def baseline_matrix(kind: str, d: int, seed: int, layer: int) -> np.ndarray | None:
    """[d, d] mixing of a layer of model B: a random orthogonal matrix (rotation) or a Gaussian
    with unit-norm rows (gaussian); None for the permutation baseline."""
    rng = np.random.default_rng([seed, layer])
    if kind == "rotation":
        q, r = np.linalg.qr(rng.normal(size=(d, d)))
        return q * np.sign(np.diag(r))  # signs fixed so Q is Haar-distributed
    if kind == "gaussian":
        g = rng.normal(size=(d, d))
        return g / np.linalg.norm(g, axis=1, keepdims=True)
    return None


def token_permutation(rows: int, seed: int) -> np.ndarray:
    """The row order of the permutation baseline (one for every layer and model)."""
    return np.random.default_rng(seed).permutation(rows)


def baseline_blocks(kind: str, b_arr, *, seed: int, layer: int,
                    chunk: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    """The baseline stream of one layer of B, in the row chunks of the reference."""
    rows = b_arr.shape[0]
    matrix = baseline_matrix(kind, b_arr.shape[1], seed, layer)
    perm = token_permutation(rows, seed) if matrix is None else None
    for s in range(0, rows, chunk):
        if matrix is not None:
            yield b_arr[s:s + chunk].astype(np.float64) @ matrix
            continue
        wanted = perm[s:s + chunk]
        order = np.argsort(wanted)  # Zarr reads sorted rows; put them back in the wanted order
        block = b_arr.get_orthogonal_selection((wanted[order], slice(None)))
        out = np.empty_like(block)
        out[order] = block
        yield out


# -- the stage


def run(config: UniversalConfig, storage: Storage) -> UniversalResult:
    from pipeline.models.loading import dtype_name

    name = config.result_name
    key = config_hash(config, dtype=dtype_name(config.device, config.dtype),
                      corpus_file=input_fingerprint(config.corpus))
    marker = storage.marker(name, "universal")
    if not config.overwrite and marker.done(key):
        return stored_result(storage, name)
    storage.ensure_writable()
    with atomic_path(storage.arrays(name)) as tmp:
        group = arrays.open_group(tmp, mode="w")
        models, weights, moments = cache_activations(config, storage, group)
        summary = correlate(config, group, models)
    neurons = universal_neurons(summary, config.threshold, config.min_models)
    properties = weights.join(activation_properties(moments, models[0]["offsets"]),
                              on="neuron_id").sort("neuron_id")
    tables.write_part(storage, "correlation_summary", name,
                      summary.select(tables.schema("correlation_summary").names).to_arrow())
    tables.write_part(storage, "universal_neurons", name,
                      neurons.select(tables.schema("universal_neurons").names).to_arrow())
    tables.write_part(storage, "neuron_properties", name,
                      properties.select(tables.schema("neuron_properties").names).to_arrow())
    result = _result(name, summary, neurons, properties, reused=False)
    tables.write_part(storage, "universal_properties", name, result.comparison.select(
        tables.schema("universal_properties").names).to_arrow())
    marker.write(to_dict(config), key, neurons=neurons.height,
                 universal=int(neurons["universal"].sum()))
    return result


def _result(name: str, summary: pl.DataFrame, neurons: pl.DataFrame, properties: pl.DataFrame,
            *, reused: bool) -> UniversalResult:
    flagged = properties.join(neurons.select("neuron_id", "universal"), on="neuron_id")
    comparison = flagged.group_by("universal").agg(
        pl.len().cast(pl.Int64).alias("neurons"),
        *[pl.col(c).mean().alias(c) for c in PROPERTY_COLUMNS]).sort("universal")
    return UniversalResult(name, summary, neurons, flagged, comparison, reused)


def stored_result(storage: Storage, name: str) -> UniversalResult:
    """A finished result, read back from its tables."""
    def read(table: str) -> pl.DataFrame:
        return pl.from_arrow(tables.read_partition(storage, table, name))

    return _result(name, read("correlation_summary"), read("universal_neurons"),
                   read("neuron_properties"), reused=True)


def cache_activations(config: UniversalConfig, storage: Storage, group):
    """Every model's activations of the same windows into acts/m<i>/L<l>; returns the models
    ({key, name, widths, offsets}), the reference's weight properties and its NeuronMoments."""
    from pipeline.kernels.accumulators import NeuronMoments
    from pipeline.models.loading import load_model
    from pipeline.models.weights import weight_properties

    models, windows, vocab, weights, moments = [], None, None, None, None
    for index, name in enumerate(config.models):
        loaded = load_model(name, config.revision, storage=storage, for_generation=False,
                            **config.model_kwargs())
        if vocab is None:
            vocab = loaded.tokenizer.get_vocab()
            windows = list(corpus_windows(config, loaded.tokenizer))
            weights = weight_properties(loaded)
            moments = {l: NeuronMoments(w) for l, w in enumerate(loaded.widths)}
        elif loaded.tokenizer.get_vocab() != vocab:
            raise UserError(f"model {name!r} has another tokenizer than {config.models[0]!r}: the "
                            "same tokens must go through every model")
        key = f"m{index}"
        _forward_to_zarr(config, loaded, windows, group, key, moments if index == 0 else None)
        models.append({"key": key, "name": name, "widths": loaded.widths,
                       "offsets": loaded.layer_offsets})
        del loaded
    return models, weights, moments


def _forward_to_zarr(config: UniversalConfig, loaded, windows: list[list[int]], group, key: str,
                     moments) -> None:
    import torch
    from tqdm.auto import tqdm

    from pipeline.models.hooks import capture_neurons

    rows = len(windows) * config.max_length
    arrs = {l: group.create_array(name=f"acts/{key}/L{l}", shape=(rows, w), dtype="float32",
                                  chunks=(min(CHUNK_ROWS, rows), w))
            for l, w in enumerate(loaded.widths)}
    row = 0
    base = loaded.adapter.base_model(loaded.model)
    with torch.inference_mode(), capture_neurons(loaded.sites) as captured:
        for s in tqdm(range(0, len(windows), config.batch_size), disable=config.quiet,
                      desc=f"activations {loaded.name}"):
            ids = torch.tensor(windows[s:s + config.batch_size], device=loaded.device)
            base(input_ids=ids)
            n = ids.numel()
            for l, arr in arrs.items():
                block = captured[l].reshape(n, -1).float().cpu().numpy()
                arr[row:row + n] = block
                if moments is not None:
                    moments[l].update(block)
            row += n


def correlate(config: UniversalConfig, group, models: list[dict]) -> pl.DataFrame:
    """correlation_summary: per reference neuron and other model, its best match and the
    baseline's best; each pair's correlation block is written to corr/<key>/L<a>_L<b>."""
    from tqdm.auto import tqdm

    ref, others = models[0], models[1:]
    total = sum(ref["widths"])
    pairs = [(m, la, lb) for m in others for la in range(len(ref["widths"]))
             for lb in range(len(m["widths"]))]
    best = {m["key"]: {"max": np.full(total, -np.inf), "layer": np.zeros(total, np.int32),
                       "neuron": np.zeros(total, np.int32), "base": np.full(total, -np.inf)}
            for m in others}
    for m, la, lb in tqdm(pairs, disable=config.quiet, desc="correlations"):
        corr, base_max = pair_correlation(group, ref["key"], m["key"], la, lb, config)
        group.create_array(name=f"corr/{m['key']}/L{la}_L{lb}", shape=corr.shape,
                           dtype="float32", chunks=corr.shape)[:] = corr.astype(np.float32)
        b = best[m["key"]]
        sl = slice(ref["offsets"][la], ref["offsets"][la] + ref["widths"][la])
        better = corr.max(1) > b["max"][sl]
        b["max"][sl] = np.where(better, corr.max(1), b["max"][sl])
        b["layer"][sl] = np.where(better, lb, b["layer"][sl])
        b["neuron"][sl] = np.where(better, corr.argmax(1), b["neuron"][sl])
        b["base"][sl] = np.maximum(b["base"][sl], base_max)
    layer = np.repeat(np.arange(len(ref["widths"]), dtype=np.int32), ref["widths"])
    neuron = np.concatenate([np.arange(w, dtype=np.int32) for w in ref["widths"]])
    return pl.concat([pl.DataFrame({
        "neuron_id": np.arange(total, dtype=np.int64), "layer": layer, "neuron": neuron,
        "model_b": m["name"], "max_corr": best[m["key"]]["max"],
        "argmax_layer": best[m["key"]]["layer"], "argmax_neuron": best[m["key"]]["neuron"],
        "baseline_max": best[m["key"]]["base"],
        "excess": best[m["key"]]["max"] - best[m["key"]]["base"]}) for m in others])


def pair_correlation(group, ref_key: str, key: str, la: int, lb: int,
                     config: UniversalConfig) -> tuple[np.ndarray, np.ndarray]:
    """Correlations [d_a, d_b] of layer la of the reference with layer lb of model `key`, and
    each reference neuron's max correlation with the baseline of that layer."""
    a_arr, b_arr = group[f"acts/{ref_key}/L{la}"], group[f"acts/{key}/L{lb}"]
    real = PairCorrelation(a_arr.shape[1], b_arr.shape[1])
    base = PairCorrelation(a_arr.shape[1], b_arr.shape[1])
    baseline = baseline_blocks(config.baseline, b_arr, seed=config.seed, layer=lb)
    for s in range(0, a_arr.shape[0], CHUNK_ROWS):
        a = a_arr[s:s + CHUNK_ROWS]
        real.update(a, b_arr[s:s + CHUNK_ROWS])
        base.update(a, next(baseline))
    return real.correlation(), base.correlation().max(1)


def universal_neurons(summary: pl.DataFrame, threshold: float, min_models: int) -> pl.DataFrame:
    """Per reference neuron: models where excess > threshold, mean max and excess, the flag."""
    return summary.group_by("neuron_id", "layer", "neuron").agg(
        (pl.col("excess") > threshold).sum().cast(pl.Int64).alias("matches"),
        pl.col("max_corr").mean().alias("mean_corr"),
        (pl.col("max_corr").mean() - pl.col("baseline_max").mean()).alias("excess"),
    ).sort("neuron_id").with_columns((pl.col("matches") >= min_models).alias("universal"))


def activation_properties(moments: dict, offsets: list[int]) -> pl.DataFrame:
    """act_mean, act_var, act_skew, act_kurt and sparsity of the reference's neurons over the
    windows (NeuronMoments.summary, the one definition of moments from sums)."""
    frames = []
    for l, m in moments.items():
        s, c = m.summary(), m.columns()
        frames.append(pl.DataFrame({
            "neuron_id": offsets[l] + np.arange(m.width, dtype=np.int64),
            "act_mean": s["mean"], "act_var": s["var"], "act_skew": s["skew"],
            "act_kurt": s["kurt"], "sparsity": c["active_count"] / c["count"]}))
    return pl.concat(frames)


def show(result: UniversalResult) -> str:
    n = result.neurons
    ref = result.summary["model_b"].unique().to_list()
    lines = [f"{result.name}: {int(n['universal'].sum())} of {n.height} reference neurons are "
             f"universal (against {', '.join(ref)})"]
    if result.reused:
        lines.append("finished earlier with this config (--overwrite recomputes it)")
    with pl.Config(tbl_rows=15, tbl_cols=-1, tbl_width_chars=160):
        lines += [str(n.sort("excess", descending=True).head(15)), str(result.comparison)]
    return "\n".join(lines)


STAGES = [Stage(
    "universal", "Neurons that correlate across models trained with different seeds.",
    "  nwh universal --models zoo-s0 zoo-s1 zoo-s2\n"
    "  nwh universal --models zoo-s0 zoo-s1 --baseline permutation --threshold 0.3\n"
    "  nwh sql \"select * from universal_neurons where universal order by excess desc\"\n",
    UniversalConfig, run, show, figures="pipeline.report.universal:draw")]
