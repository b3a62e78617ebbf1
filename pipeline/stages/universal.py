"""Universal neurons: correlations of neurons across models trained with different seeds.

    nwh universal --models zoo-s0 zoo-s1 zoo-s2
    nwh universal --models zoo-s0 zoo-s1 --baseline permutation --threshold 0.3 --min-models 1

The same token windows go through every model (their tokenizers must agree). Design, out of core:
  1. each model's activations of every layer are cached to Zarr (float32 [T, d]), with
     streaming moments of the reference model (the first one);
  2. for every other model B and every layer pair (a of the reference, b of B), the Pearson
     correlations come from float64 sums (n, sum a, sum a^2, sum b, sum b^2, sum ab) whose cross
     term is a matrix product over token chunks; only that pair's [d_a, d_b] block is in memory,
     it is written to Zarr (corr/<B>/L<a>_L<b>) and folded into the per-neuron maxima at once;
  3. the same for a baseline of B: a fixed-seed random rotation, the reference's row-normalised
     Gaussian mixing, or a fixed token permutation.
Per reference neuron and model B: max correlation, its argmax neuron, the baseline max; excess =
max - baseline. Universal iff excess > --threshold for at least --min-models models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import polars as pl

from pipeline.core import arrays, tables
from pipeline.core.config import add_arguments, from_args, opt
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, slug

log = logging.getLogger(__name__)

BASELINES = ("rotation", "gaussian", "permutation")
PROPERTY_COLUMNS = ("w_in_norm", "w_out_norm", "input_bias", "in_out_sim", "l2_penalty",
                    "vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt", "act_mean", "act_var",
                    "sparsity")
CHUNK = 4096


@dataclass
class UniversalConfig:
    models: list[str] = opt(help="two or more models (the first is the reference), e.g. zoo-s0 zoo-s1 zoo-s2")
    corpus: str = opt("stdlib:heldout", help="corpus whose windows go through every model")
    num_samples: int = opt(64, help="windows")
    max_length: int = opt(128, help="tokens per window")
    batch_size: int = opt(8, help="windows per forward pass")
    baseline: str = opt("rotation", help="rotation (orthogonal), gaussian (the reference's "
                        "row-normalised mixing) or permutation (of tokens)", choices=BASELINES)
    threshold: float = opt(0.5, help="universal iff max - baseline correlation > this")
    min_models: int | None = opt(None, help="...for at least this many models (default: all others)")
    seed: int = opt(0, help="seed of the baseline")
    device: str = opt("auto", help="auto, cpu, cuda")
    dtype: str = opt("auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, float16, bfloat16")
    name: str | None = opt(None, help="result name (default: slug of the models)")

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise UserError("--models needs at least two models")
        if self.baseline not in BASELINES:
            raise UserError(f"--baseline {self.baseline!r} is unknown: use {', '.join(BASELINES)}")
        others = len(self.models) - 1
        if self.min_models is None:
            self.min_models = others
        if not 1 <= self.min_models <= others:
            raise UserError(f"--min-models must be in 1..{others}")
        if self.num_samples < 1 or self.max_length < 2 or self.batch_size < 1:
            raise UserError("--num-samples, --batch-size must be >= 1 and --max-length >= 2")

    @property
    def result_name(self) -> str:
        return self.name or slug("universal", *[m.split("/")[-1] for m in self.models])


class PairCorrelation:
    """Streaming float64 sums of two activation streams -> Pearson correlation matrix."""

    def __init__(self, d_a: int, d_b: int):
        self.n = 0
        self.sa, self.saa = np.zeros(d_a), np.zeros(d_a)
        self.sb, self.sbb = np.zeros(d_b), np.zeros(d_b)
        self.sab = np.zeros((d_a, d_b))

    def update(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = a.astype(np.float64), b.astype(np.float64)
        self.n += len(a)
        self.sa += a.sum(0)
        self.saa += (a * a).sum(0)
        self.sb += b.sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += a.T @ b

    def merge(self, other: PairCorrelation) -> PairCorrelation:
        out = PairCorrelation(len(self.sa), len(self.sb))
        out.n = self.n + other.n
        for k in ("sa", "saa", "sb", "sbb", "sab"):
            setattr(out, k, getattr(self, k) + getattr(other, k))
        return out

    def correlation(self) -> np.ndarray:
        n = self.n
        cov = self.sab - np.outer(self.sa, self.sb) / n
        va = np.maximum(self.saa - self.sa ** 2 / n, 0)
        vb = np.maximum(self.sbb - self.sb ** 2 / n, 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = cov / np.sqrt(np.outer(va, vb))
        return np.nan_to_num(corr, nan=0.0)  # a constant neuron correlates with nothing


def baseline_transform(kind: str, d: int, tokens: int, seed: int):
    """Function (block of B [t, d], row indices) -> transformed block, for the baseline."""
    rng = np.random.default_rng(seed)
    if kind == "rotation":
        q, r = np.linalg.qr(rng.normal(size=(d, d)))
        rot = q * np.sign(np.diag(r))
        return lambda block, rows: block @ rot
    if kind == "gaussian":
        g = rng.normal(size=(d, d))
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        return lambda block, rows: block @ g
    return None  # permutation is a row selection, handled by the reader


def _cache_activations(config: UniversalConfig, storage: Storage, group, progress: bool):
    import torch
    from tqdm.auto import tqdm

    from pipeline.kernels.accumulators import NeuronMoments
    from pipeline.models.hooks import capture_neurons
    from pipeline.core.inputs import iter_documents, iter_windows
    from pipeline.models.loading import load_model

    models, windows, vocab, moments = {}, None, None, None
    for index, name in enumerate(config.models):
        loaded = load_model(name, None, storage=storage, device=config.device, dtype=config.dtype,
                            for_generation=False)
        this_vocab = loaded.tokenizer.get_vocab()
        if vocab is None:
            vocab = this_vocab
            windows = list(iter_windows(iter_documents(config.corpus), loaded.tokenizer,
                                        max_length=config.max_length, num_samples=config.num_samples))
            if not windows:
                raise UserError(f"corpus {config.corpus!r} gives no window of {config.max_length} tokens")
            moments = {l: NeuronMoments(w) for l, w in enumerate(loaded.widths)}
        elif this_vocab != vocab:
            raise UserError(f"model {name!r} has another tokenizer than {config.models[0]!r}: the "
                            "same tokens must go through every model")
        key = f"m{index}"
        rows = len(windows) * config.max_length
        arrs = {l: group.create_array(name=f"acts/{key}/L{l}", shape=(rows, w), dtype="float32",
                                      chunks=(min(CHUNK, rows), w), overwrite=True)
                for l, w in enumerate(loaded.widths)}
        row = 0
        with torch.inference_mode(), capture_neurons(loaded.sites) as captured:
            base = loaded.adapter.base_model(loaded.model)
            for s in tqdm(range(0, len(windows), config.batch_size), disable=not progress,
                          desc=f"activations {name}"):
                ids = torch.tensor(windows[s:s + config.batch_size], device=loaded.device)
                base(input_ids=ids)
                n = ids.numel()
                for l, arr in arrs.items():
                    block = captured[l].reshape(n, -1).float().cpu().numpy()
                    arr[row:row + n] = block
                    if index == 0:
                        moments[l].update(block)
                row += n
        models[key] = {"name": name, "widths": loaded.widths, "loaded": loaded if index == 0 else None}
    return models, moments, len(windows) * config.max_length


def universal(config: UniversalConfig, storage: Storage, *, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    name = config.result_name
    storage.ensure_writable()
    group = arrays.open_group(storage.arrays(name))
    models, moments, rows = _cache_activations(config, storage, group, progress)
    ref = models["m0"]
    offsets = np.concatenate([[0], np.cumsum(ref["widths"])])
    perm = np.random.default_rng(config.seed).permutation(rows)
    summaries = []
    pairs = [(k, la, lb) for k in models if k != "m0" for la in range(len(ref["widths"]))
             for lb in range(len(models[k]["widths"]))]
    best = {k: {"max": np.full(offsets[-1], -np.inf), "arg_layer": np.zeros(offsets[-1], int),
                "arg_neuron": np.zeros(offsets[-1], int), "base": np.full(offsets[-1], -np.inf)}
            for k in models if k != "m0"}
    for key, la, lb in tqdm(pairs, disable=not progress, desc="correlations"):
        a_arr, b_arr = group[f"acts/m0/L{la}"], group[f"acts/{key}/L{lb}"]
        d_a, d_b = a_arr.shape[1], b_arr.shape[1]
        real, base = PairCorrelation(d_a, d_b), PairCorrelation(d_a, d_b)
        transform = baseline_transform(config.baseline, d_b, rows, config.seed + 31 * lb)
        for s in range(0, rows, CHUNK):
            a = a_arr[s:s + CHUNK]
            b = b_arr[s:s + CHUNK]
            real.update(a, b)
            if transform is not None:
                base.update(a, transform(b.astype(np.float64), None))
            else:
                base.update(a, b_arr.get_orthogonal_selection(
                    (np.sort(perm[s:s + CHUNK]), slice(None)))[np.argsort(np.argsort(perm[s:s + CHUNK]))])
        corr = real.correlation()
        group.create_array(name=f"corr/{key}/L{la}_L{lb}", shape=corr.shape, dtype="float32",
                           chunks=corr.shape, overwrite=True)[:] = corr.astype(np.float32)
        sl = slice(offsets[la], offsets[la + 1])
        b_best = best[key]
        m, arg = corr.max(1), corr.argmax(1)
        better = m > b_best["max"][sl]
        b_best["max"][sl] = np.where(better, m, b_best["max"][sl])
        b_best["arg_layer"][sl] = np.where(better, lb, b_best["arg_layer"][sl])
        b_best["arg_neuron"][sl] = np.where(better, arg, b_best["arg_neuron"][sl])
        b_best["base"][sl] = np.maximum(b_best["base"][sl], base.correlation().max(1))
    layer = np.repeat(np.arange(len(ref["widths"])), ref["widths"]).astype(np.int32)
    neuron = np.concatenate([np.arange(w) for w in ref["widths"]]).astype(np.int32)
    for key, b in best.items():
        summaries.append(pl.DataFrame({
            "neuron_id": np.arange(offsets[-1], dtype=np.int64), "layer": layer, "neuron": neuron,
            "model_b": models[key]["name"], "max_corr": b["max"], "argmax_layer": b["arg_layer"].astype(np.int32),
            "argmax_neuron": b["arg_neuron"].astype(np.int32), "baseline_max": b["base"],
            "excess": b["max"] - b["base"]}))
    summary = pl.concat(summaries)
    per_neuron = summary.group_by("neuron_id", "layer", "neuron").agg(
        (pl.col("excess") > config.threshold).sum().cast(pl.Int64).alias("matches"),
        pl.col("max_corr").mean().alias("mean_corr"),
        (pl.col("max_corr").mean() - pl.col("baseline_max").mean()).alias("excess")).sort("neuron_id")
    per_neuron = per_neuron.with_columns((pl.col("matches") >= config.min_models).alias("universal"))
    tables.write_part(storage, "correlation_summary", name,
                      summary.select(tables.schema("correlation_summary").names).to_arrow())
    tables.write_part(storage, "universal_neurons", name,
                      per_neuron.select(tables.schema("universal_neurons").names).to_arrow())
    properties = _compare_properties(ref["loaded"], moments, per_neuron)
    comparison = properties.group_by("universal").agg(
        pl.len().cast(pl.Int64).alias("neurons"),
        *[pl.col(c).mean().alias(c) for c in PROPERTY_COLUMNS]).sort("universal")
    tables.write_part(storage, "universal_properties", name,
                      comparison.select(tables.schema("universal_properties").names).to_arrow())
    _plots(summary, per_neuron, properties, storage.reports(name))
    return {"summary": summary, "neurons": per_neuron, "properties": properties,
            "comparison": comparison}


def _compare_properties(loaded, moments, per_neuron: pl.DataFrame) -> pl.DataFrame:
    """Weight and activation statistics of the reference model's neurons, universal vs other."""
    from pipeline.stages.neuron_properties import weight_properties

    props = weight_properties(loaded)
    act = []
    for l, m in moments.items():
        c = m.columns()
        n = c["count"].astype(np.float64)
        m1, m2 = c["sum"] / n, c["sum_sq"] / n
        act.append(pl.DataFrame({"neuron_id": loaded.layer_offsets[l] + np.arange(m.width),
                                 "act_mean": m1, "act_var": np.maximum(m2 - m1 ** 2, 0),
                                 "sparsity": c["active_count"] / n}))
    props = props.join(pl.concat(act), on="neuron_id").join(
        per_neuron.select("neuron_id", "universal"), on="neuron_id")
    return props


def _plots(summary: pl.DataFrame, neurons: pl.DataFrame, props: pl.DataFrame, out) -> None:
    import matplotlib.pyplot as plt

    from pipeline.report.plots import save_png

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(summary["max_corr"].to_numpy(), bins=50, alpha=0.6, label="max correlation")
    ax.hist(summary["baseline_max"].to_numpy(), bins=50, alpha=0.6, label="baseline max")
    ax.set(title="Max correlation with the other models' neurons", xlabel="Pearson r",
           ylabel="neurons x models")
    ax.legend()
    fig.tight_layout()
    save_png(fig, out / "universal_correlations.png")

    cols = ["w_in_norm", "w_out_norm", "in_out_sim", "vocab_kurt", "act_mean", "sparsity"]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    uni = props.filter(pl.col("universal"))
    rest = props.filter(~pl.col("universal"))
    for ax, col in zip(axes.ravel(), cols):
        ax.hist(rest[col].drop_nans().to_numpy(), bins=40, alpha=0.6, density=True, label="other")
        if uni.height:
            ax.hist(uni[col].drop_nans().to_numpy(), bins=40, alpha=0.6, density=True,
                    label="universal")
        ax.set(title=col)
        ax.legend(fontsize=8)
    fig.suptitle("Properties of universal vs other neurons (reference model)")
    fig.tight_layout()
    save_png(fig, out / "universal_properties.png")

    layers = neurons.group_by("layer").agg(pl.col("universal").mean().alias("share")).sort("layer")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(layers["layer"].to_numpy(), 100 * layers["share"].to_numpy())
    ax.set(title="Universal neurons per layer", xlabel="layer", ylabel="% universal")
    fig.tight_layout()
    save_png(fig, out / "universal_layers.png")


def register(sub) -> None:
    from pipeline.cli import add_stage_parser

    parser = add_stage_parser(
        sub, "universal", "Neurons that correlate across models trained with different seeds.",
        "  nwh universal --models zoo-s0 zoo-s1 zoo-s2\n"
        "  nwh universal --models zoo-s0 zoo-s1 --baseline permutation --threshold 0.3\n"
        "  nwh sql \"select * from universal_neurons where universal order by excess desc\"\n",
        progress=True,
    )
    add_arguments(parser, UniversalConfig)
    parser.set_defaults(handler=_cli)


def _cli(args) -> int:
    from pipeline.cli import echo

    config = from_args(UniversalConfig, args)
    out = universal(config, Storage(args.storage), progress=not args.quiet)
    n = out["neurons"]
    echo(f"{int(n['universal'].sum())} of {n.height} neurons of {config.models[0]} are universal "
         f"(excess > {config.threshold} in >= {config.min_models} models)")
    with pl.Config(tbl_rows=15, tbl_cols=-1, tbl_width_chars=160):
        echo(n.sort("excess", descending=True).head(15))
        echo(out["comparison"])
    return 0
