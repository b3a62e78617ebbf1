"""Stage `universal`: neurons that correlate across models trained with different seeds.

    nwh universal --models zoo-s0 zoo-s1 zoo-s2
    nwh universal --models zoo-s0 zoo-s1 --baseline permutation --rule per-model --threshold 0.3
    nwh universal --models gpt2-a gpt2-b --cache none --block-memory 16
    nwh universal --models zoo-s0 zoo-s1 zoo-s2 --ray        # on a local Ray cluster

Universal neurons as Gurnee et al. (2024, github.com/wesg52/universal-neurons) define them. The
same token windows go through every model (their tokenizers must agree); the rows of --exclude
(default pad,newline-token: the reference drops the pad token and the token of "\\n" alone; a
tokenizer without a pad token pads with EOS) and of --skip-positions are left out. For every
other model B, every neuron of the reference (the first model) gets its max Pearson
correlation over B's neurons of all layers, the argmax neuron, and the max over the neurons of a
baseline of B:
  rotation     B's activations mixed by a Gaussian matrix with unit-norm rows (the reference's
               `rotation`, one matrix per model and layer)
  orthogonal   mixed by a Haar-random orthogonal matrix (one per model and layer)
  gaussian     B replaced by gelu of standard normals (the reference's `gaussian`)
  permutation  B's token rows shuffled within each batch of --baseline-batch windows, the same
               shuffle for every layer (as the reference shuffles each batch)
Every model and layer has its own seed, derived from --seed. The flag (`universal_neurons`):
  paper      excess = mean over models of max_corr - mean of baseline_max > --threshold (0.5)
  per-model  max_corr - baseline_max > --threshold in at least --min-models models

Out of core: the correlations of a layer pair (a of the reference, b of B) come from float64
sums about per-neuron shifts whose cross term is a matrix product over token batches
(pipeline.kernels.correlation); only the blocks of one pass, at most --block-memory GB with the
batch activations, are in memory. --cache float16 (default) or float32 first writes every
model's activations of the included rows to a cache in the arrays folder (2 bytes per neuron
and token in float16), read once per pass and deleted at the end; --cache none recomputes the
forwards of the reference and B in every pass instead, so disk stays bounded by the blocks.
Either way each pass reads or computes every layer it needs once per batch, and builds each
baseline matrix of its layers once (passes go by B's layer, so a layer's baseline is in one
pass or few). Each pair's block is written to corr/m<i>/L<a>_L<b> (float32; not with
--no-save-blocks) and folded into the per-neuron maxima at once.

On Ray (--ray [ADDRESS]): the cache is built by one task per model, then every pass is a task
(one GPU each where the cluster has GPUs, and Ray `memory` of --block-memory, so a node runs
only as many passes at once as its memory holds); with a cache, passes are split further until
there are as many as the cluster runs at once (their pairs and order unchanged, so the result
is too). Without a cache a pass recomputes the forwards of its two models and loads them in
its task, so passes are not split. The tasks read and write the result's arrays folder, so
every worker must reach the storage root. The driver folds the passes' maxima in one order.

The reference's weight and activation properties go to `neuron_properties` under the result
name, their means per group to `universal_properties`. The arrays folder appears whole (written
under a temporary name); a rerun with the same config reads the stored result
(runs/<name>/stages/universal.json).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.core import arrays, tables
from pipeline.core.config import (
    ModelOptions,
    Progress,
    RowFilter,
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

BASELINES = ("rotation", "orthogonal", "gaussian", "permutation")
RULES = ("paper", "per-model")
CACHES = ("float16", "float32", "none")
FLOAT16_MAX = 65504.0
GB = 1 << 30
PROPERTY_COLUMNS = ("w_in_norm", "w_out_norm", "input_bias", "in_out_sim", "l2_penalty",
                    "vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt", "act_mean", "act_var",
                    "sparsity")


@dataclass(kw_only=True)
class UniversalConfig(ModelOptions, WindowOptions, RowFilter, Progress):
    models: list[str] = opt(help="two or more models (the first is the reference), e.g. zoo-s0 "
                            "zoo-s1 zoo-s2")
    baseline: str = opt("rotation", help="rotation (Gaussian mixing, unit-norm rows), orthogonal "
                        "(Haar rotation), gaussian (gelu of normals) or permutation (of token "
                        "rows within each batch)")
    rule: str = opt("paper", help="paper: universal iff mean over models of max correlation minus "
                    "mean of baseline max > --threshold; per-model: max - baseline > --threshold "
                    "in at least --min-models models")
    threshold: float = opt(0.5, help="threshold of the rule (the paper's is 0.5)")
    min_models: int | None = opt(None, help="--rule per-model: models where max - baseline must "
                                 "pass --threshold (default: all others)")
    seed: int = opt(0, help="seed of the baselines (each model and layer derives its own)")
    exclude: str | None = opt("pad,newline-token", help="token classes left out of the "
                              "correlations: bos,eos,pad,newline (any token holding a newline), "
                              "newline-token (the token of '\\n' alone) or none; the reference "
                              "drops pad and newline-token")
    cache: str = opt("float16", help="activation cache: float16, float32 (2 or 4 bytes per neuron "
                     "and token and model on disk) or none (recompute the forwards in every pass; "
                     "disk bounded by the correlation blocks)")
    block_memory: float = opt(4.0, help="GB of correlation sums and batch activations per pass; "
                              "more passes recompute (cache none) or re-read (cache) the "
                              "activations", hash=False)
    baseline_batch: int = opt(32, help="windows per batch: the permutation baseline shuffles "
                              "token rows within each batch (the reference's batches hold 32)")
    save_blocks: bool = opt(True, help="write every layer pair's correlation block to "
                            "corr/m<i>/L<a>_L<b> (float32)")
    name: str | None = opt(None, help="result name (default: slug of the models)")
    overwrite: bool = opt(False, help="recompute a finished result", hash=False)
    ray: str | None = opt(None, const="local", metavar="ADDRESS", hash=False,
                          help="build the cache (one task per model) and run the passes (one "
                          "task each, one GPU each where the cluster has GPUs) as Ray tasks: "
                          "--ray alone starts a local cluster, --ray ADDRESS joins one; "
                          "--block-memory is then per task")
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
        for flag, value, known in (("--baseline", self.baseline, BASELINES),
                                   ("--rule", self.rule, RULES), ("--cache", self.cache, CACHES)):
            if value not in known:
                raise UserError(f"{flag} {value!r} is unknown: use {', '.join(known)}")
        others = len(self.models) - 1
        if self.rule == "paper":
            if self.min_models is not None:
                raise UserError(f"--min-models {self.min_models} counts models under --rule "
                                "per-model only: drop it, or pass --rule per-model")
        else:
            if self.min_models is None:
                self.min_models = others
            if not 1 <= self.min_models <= others:
                raise UserError(f"--min-models {self.min_models} is out of range: use 1..{others} "
                                f"(the number of models besides the reference)")
        if not self.block_memory > 0:
            raise UserError(f"--block-memory must be more than 0 GB, got {self.block_memory}")
        if self.baseline_batch < 1:
            raise UserError(f"--baseline-batch must be at least 1, got {self.baseline_batch}")
        self.model = self.models[0]
        self.check_windows()
        self.check_rows()

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
    info: dict = field(default_factory=dict)  # tokens, passes, cache bytes (from the marker)


# -- baselines: one transform per model and layer, a seed of their own


def baseline_rng(seed: int, kind: str, *keys: int) -> np.random.Generator:
    """The generator of one part of a baseline: (model, layer) for a matrix, (model, layer,
    batch) for Gaussian activations, (model, batch) for a permutation. Distinct keys give
    independent streams (NumPy SeedSequence)."""
    return np.random.default_rng([seed, BASELINES.index(kind), *keys])


def baseline_matrix(kind: str, d: int, *, seed: int, model: int, layer: int) -> np.ndarray | None:
    """[d, d] float64 mixing M of one layer of model B: baseline neuron m = sum_n M[m, n] b_n
    (acts @ M.T). rotation: Gaussian with unit-norm rows (the reference's, not orthogonal);
    orthogonal: Haar-random; None for the gaussian and permutation baselines."""
    if kind not in ("rotation", "orthogonal"):
        return None
    g = baseline_rng(seed, kind, model, layer).standard_normal((d, d))
    if kind == "rotation":
        return g / np.linalg.norm(g, axis=1, keepdims=True)
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diag(r))  # signs fixed so Q is Haar-distributed


def token_permutation(rows: int, *, seed: int, model: int, batch: int) -> np.ndarray:
    """The row order of one batch of the permutation baseline (every layer of the model)."""
    return baseline_rng(seed, "permutation", model, batch).permutation(rows)


def gaussian_block(rows: int, d: int, *, seed: int, model: int, layer: int, batch: int):
    """gelu (tanh form, TransformerLens' gelu_fast) of standard normals [rows, d], float32."""
    import torch

    x = baseline_rng(seed, "gaussian", model, layer, batch).standard_normal(
        (rows, d), dtype=np.float32)
    return torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh")


def baseline_acts(kind: str, b: dict, *, seed: int, model: int, batch: int,
                  mixers: dict) -> dict:
    """The baseline of one batch of model B's layers (dict layer -> [rows, d] tensor)."""
    if kind in ("rotation", "orthogonal"):
        return {l: x @ mixers[l].T for l, x in b.items()}
    if kind == "gaussian":
        return {l: gaussian_block(x.shape[0], x.shape[1], seed=seed, model=model, layer=l,
                                  batch=batch).to(x.device) for l, x in b.items()}
    if not b:
        return {}
    import torch

    rows = next(iter(b.values())).shape[0]
    perm = torch.from_numpy(token_permutation(rows, seed=seed, model=model, batch=batch))
    return {l: x[perm.to(x.device)] for l, x in b.items()}


# -- the stage


def run(config: UniversalConfig, storage: Storage) -> UniversalResult:
    from pipeline.models.loading import dtype_name

    name = config.result_name
    # on Ray the dtype is the one the tasks resolve where they run (bfloat16 on a GPU worker
    # led by a driver without one)
    dtype = dtype_name(config.device, config.dtype) if config.ray is None else \
        _resolve_on_workers(config, dtype_name, config.device, config.dtype)
    key = config_hash(config, dtype=dtype, corpus_file=input_fingerprint(config.corpus))
    marker = storage.marker(name, "universal")
    if not config.overwrite and marker.done(key):
        return stored_result(storage, name)
    storage.ensure_writable()
    models = Models(_driver_config(config), storage)
    windows, batches = token_batches(config, models.get(0))
    with atomic_path(storage.arrays(name)) as tmp:
        group = arrays.open_group(tmp, mode="w")
        if config.ray is not None:
            summary, passes, moments, cache_bytes = correlate_on_ray(
                config, storage, group, tmp, models, windows, batches)
        else:
            if config.cache == "none":
                source = Forwards(config, models, windows, batches)
            else:
                source = Cache(config, models, windows, batches, group)
            summary, passes = correlate(config, group, source, models.info)
            moments, cache_bytes = source.moments, source.nbytes
        shutil.rmtree(tmp / "cache", ignore_errors=True)  # the cache is spent
    neurons = universal_neurons(summary, config.threshold, config.rule, config.min_models)
    # the result carries its name and the reference model beside the partition, as gradients do
    origin = [pl.lit(name).alias("name"), pl.lit(config.models[0]).alias("model"),
              pl.lit(config.revision, dtype=pl.String).alias("revision")]
    summary = summary.with_columns(origin).select(tables.schema("correlation_summary").names)
    neurons = neurons.with_columns(origin).select(tables.schema("universal_neurons").names)
    properties = models.weights.join(
        activation_properties(moments, models.info[0]["offsets"]),
        on="neuron_id").sort("neuron_id")
    tables.write_part(storage, "correlation_summary", name, summary.to_arrow())
    tables.write_part(storage, "universal_neurons", name, neurons.to_arrow())
    tables.write_part(storage, "neuron_properties", name,
                      properties.select(tables.schema("neuron_properties").names).to_arrow())
    info = {"tokens": batches.rows, "passes": passes, "cache_bytes": cache_bytes,
            "rule": config.rule, "threshold": config.threshold}
    result = _result(name, summary, neurons, properties, reused=False, info=info)
    tables.write_part(storage, "universal_properties", name, result.comparison.with_columns(
        origin).select(tables.schema("universal_properties").names).to_arrow())
    marker.write(to_dict(config), key, neurons=neurons.height,
                 universal=int(neurons["universal"].sum()), **info)
    return result


def _resolve_on_workers(config: UniversalConfig, fn, *args):
    from pipeline.core import cluster

    return cluster.resolve_on_workers(fn, *args, address=config.ray, device=config.device)


def _driver_config(config: UniversalConfig) -> UniversalConfig:
    """The config of the driver's own loads (tokenizer checks, widths, weight properties): on
    Ray a driver without the GPU that --device names loads on the CPU, its tasks on theirs."""
    if config.ray is None or config.device in ("auto", "cpu"):
        return config
    import torch

    return config if torch.cuda.is_available() else dataclasses.replace(config, device="cpu")


def _result(name: str, summary: pl.DataFrame, neurons: pl.DataFrame, properties: pl.DataFrame,
            *, reused: bool, info: dict) -> UniversalResult:
    flagged = properties.join(neurons.select("neuron_id", "universal"), on="neuron_id")
    comparison = flagged.group_by("universal").agg(
        pl.len().cast(pl.Int64).alias("neurons"),
        *[pl.col(c).mean().alias(c) for c in PROPERTY_COLUMNS]).sort("universal")
    return UniversalResult(name, summary, neurons, flagged, comparison, reused, info)


def stored_result(storage: Storage, name: str) -> UniversalResult:
    """A finished result, read back from its tables."""
    from pipeline.core.storage import read_json

    def read(table: str) -> pl.DataFrame:
        return pl.from_arrow(tables.read_partition(storage, table, name))

    marker = read_json(storage.marker(name, "universal").path)
    info = {k: marker[k] for k in ("tokens", "passes", "cache_bytes", "rule", "threshold")
            if k in marker}
    return _result(name, read("correlation_summary"), read("universal_neurons"),
                   read("neuron_properties"), reused=True, info=info)


# -- models and tokens


class Models:
    """The models of --models, loaded on demand: the reference stays, at most one other is held.
    Every tokenizer is checked against the reference's before any forward."""

    def __init__(self, config: UniversalConfig, storage: Storage, info: list[dict] | None = None):
        """`info` (of a driver's Models): a Ray task's holder, which loads only what it uses."""
        from pipeline.models.weights import weight_properties

        self.config, self.storage = config, storage
        self.loaded: dict = {}
        self.info: list[dict] = info or []
        if info is not None:
            return
        for index, name in enumerate(config.models):
            loaded = self.get(index)
            if any(getattr(s, "expert", None) is not None for s in loaded.sites):
                raise UserError(f"model {name!r} has mixture-of-experts layers: a neuron is routed "
                                "to some tokens only, so its correlation over every token is "
                                "not defined; compare dense models")
            if index:
                _same_tokenizer(self.get(0), loaded)
            self.info.append({"index": index, "key": f"m{index}", "name": name,
                              "widths": loaded.widths, "offsets": loaded.layer_offsets})
        self.weights = weight_properties(self.get(0))

    def get(self, index: int):
        from pipeline.models.loading import load_model

        if index not in self.loaded:
            dropped = [i for i in self.loaded if i != 0]
            for held in dropped:
                del self.loaded[held]
            if dropped:
                gc.collect()  # free its weights before the next loads
            self.loaded[index] = load_model(self.config.models[index], self.config.revision,
                                            storage=self.storage, for_generation=False,
                                            **self.config.model_kwargs())
        return self.loaded[index]

    def release(self) -> None:
        """Drop every loaded model (the driver of Ray tasks, which load their own)."""
        self.loaded.clear()
        gc.collect()


def _same_tokenizer(ref, other) -> None:
    a, b = ref.tokenizer, other.tokenizer
    same = a.get_vocab() == b.get_vocab() and all(
        getattr(a, k, None) == getattr(b, k, None)
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"))
    if not same:
        raise UserError(f"model {other.name!r} has another tokenizer than {ref.name!r}: the same "
                        "tokens cannot go through both; compare models that share a tokenizer "
                        "(one family trained with different seeds)")


@dataclass
class Batches:
    """The included rows of each batch of --baseline-batch windows."""

    windows: int                 # windows per batch
    keep: np.ndarray             # bool [n_windows * length]: the row is included
    starts: np.ndarray           # int64 [n_batches + 1]: first included row of each batch
    length: int                  # tokens per window

    @property
    def count(self) -> int:
        return len(self.starts) - 1

    @property
    def rows(self) -> int:
        return int(self.starts[-1])

    @property
    def max_rows(self) -> int:
        return int(np.diff(self.starts).max(initial=0))

    def window_range(self, k: int) -> tuple[int, int]:
        return k * self.windows, (k + 1) * self.windows

    def kept(self, k: int) -> np.ndarray:
        s, e = self.window_range(k)
        return self.keep[s * self.length:e * self.length]


def token_batches(config: UniversalConfig, loaded) -> tuple[np.ndarray, Batches]:
    """The windows (int32 [n, length]) and which of their rows enter the correlations."""
    from pipeline.core.inputs import TokenClasses

    # int32 blocks as they stream in: 4 bytes per token, not a Python list of every id
    stream = corpus_windows(config, loaded.tokenizer, causal=loaded.is_causal)
    blocks = []
    while block := list(itertools.islice(stream, 4096)):
        blocks.append(np.array(block, dtype=np.int32))
    windows = np.concatenate(blocks)
    # load_model pads with EOS when the tokenizer has no pad token, as TransformerLens (the
    # reference's loader) does, so `pad` drops EOS there too
    keep = TokenClasses(loaded.tokenizer).included(windows, config.excluded_classes,
                                                   config.skip_positions)
    if keep.sum() < 2:
        raise UserError(f"{int(keep.sum())} of {keep.size} tokens remain after --exclude "
                        f"{config.exclude} and --skip-positions {config.skip_positions}: a "
                        "correlation needs at least 2; exclude less or give more windows")
    per_window = keep.reshape(len(windows), -1).sum(1)
    g = config.baseline_batch
    per_batch = np.add.reduceat(per_window, np.arange(0, len(windows), g))
    starts = np.concatenate([[0], np.cumsum(per_batch)]).astype(np.int64)
    return windows, Batches(g, keep, starts, windows.shape[1])


def forward_batch(loaded, ids: np.ndarray, keep: np.ndarray, layers, batch_size: int) -> dict:
    """{layer: float32 [included rows, width]} of the windows `ids` on the model's device."""
    import torch

    from pipeline.models.hooks import capture_neurons

    base = loaded.adapter.base_model(loaded.model)
    parts: dict[int, list] = {l: [] for l in layers}
    length = ids.shape[1]
    with torch.inference_mode(), capture_neurons(loaded.sites, list(layers)) as captured:
        for s in range(0, len(ids), batch_size):
            x = torch.as_tensor(ids[s:s + batch_size], dtype=torch.long, device=loaded.device)
            rows = torch.as_tensor(keep[s * length:(s + len(x)) * length], device=loaded.device)
            base(input_ids=x)
            for l in layers:
                parts[l].append(captured[l].reshape(rows.shape[0], -1)[rows].float())
    return {l: torch.cat(p) for l, p in parts.items()}


# -- where a pass gets its activations: the cache, or the forwards again


class _Source:
    """acts(model, batch, layers) -> {layer: float32 tensor [rows, width]}; also keeps the
    reference's NeuronMoments over the included rows."""

    def __init__(self, config: UniversalConfig, models: Models, windows, batches: Batches):
        from pipeline.kernels.accumulators import NeuronMoments

        self.config, self.models, self.windows, self.batches = config, models, windows, batches
        self.moments = {l: NeuronMoments(w) for l, w in enumerate(models.info[0]["widths"])}
        self.nbytes = 0

    def forward(self, index: int, k: int, layers) -> dict:
        s, e = self.batches.window_range(k)
        return forward_batch(self.models.get(index), self.windows[s:e], self.batches.kept(k),
                             layers, self.config.batch_size)

    def end_pass(self, index: int, la_layers) -> None:
        pass


class Forwards(_Source):
    """--cache none: every pass runs the forwards of its two models again. The reference's
    moments are taken the first time each layer goes by."""

    def __init__(self, *args, fresh=None):
        super().__init__(*args)
        # a Ray task takes the moments of the layers whose first pass it runs
        self._fresh = set(self.moments) if fresh is None else set(fresh)

    def acts(self, index: int, k: int, layers) -> dict:
        out = self.forward(index, k, layers)
        if index == 0:
            for l in self._fresh.intersection(layers):
                self.moments[l].update(out[l])
        return out

    def end_pass(self, index: int, la_layers) -> None:
        self._fresh -= set(la_layers)


class Cache(_Source):
    """--cache float16/float32: every model's activations of the included rows, written once to
    cache/m<i>/L<l> [rows, width] (uncompressed: activations compress ~1.1x) and read per pass."""

    def __init__(self, config, models, windows, batches, group, build: bool = True):
        """`build=False`: a reader of a cache that Ray tasks build (`build(index)` each)."""
        super().__init__(config, models, windows, batches)
        self.group = group
        if build:
            for index in [0, *range(len(models.info) - 1, 0, -1)]:  # the model held last first
                self.build(index)

    def build(self, index: int) -> None:
        """Write the cache of model `index` (the reference's moments too, for model 0)."""
        from tqdm.auto import tqdm

        config, batches, group = self.config, self.batches, self.group
        rows = max(batches.rows, 1)
        info = self.models.info[index]
        # overwrite: a Ray task retried after its worker died writes its arrays anew
        arrs = {l: group.create_array(name=f"cache/{info['key']}/L{l}", shape=(rows, w),
                                      dtype=config.cache, chunks=(min(CHUNK_ROWS, rows), w),
                                      compressors=None, overwrite=True)
                for l, w in enumerate(info["widths"])}
        for k in tqdm(range(batches.count), disable=config.quiet,
                      desc=f"activations {info['name']}"):
            start, stop = batches.starts[k], batches.starts[k + 1]
            if stop == start:
                continue
            out = self.forward(index, k, list(arrs))
            for l, arr in arrs.items():
                if index == 0:
                    self.moments[l].update(out[l])
                block = out[l]
                if config.cache == "float16":
                    top = float(block.abs().max())
                    if top > FLOAT16_MAX:
                        raise UserError(f"model {info['name']!r} layer {l} has activations "
                                        f"beyond the float16 range (|a| up to {top:.4g}): "
                                        "use --cache float32 or --cache none")
                arr[start:stop] = block.cpu().numpy().astype(config.cache)
        self.nbytes += sum(a.nbytes for a in arrs.values())

    def acts(self, index: int, k: int, layers) -> dict:
        import torch

        from pipeline.models.loading import resolve_device

        device = resolve_device(self.config.device)
        start, stop = self.batches.starts[k], self.batches.starts[k + 1]
        key = self.models.info[index]["key"]
        return {l: torch.from_numpy(self.group[f"cache/{key}/L{l}"][start:stop]).to(
            device=device, dtype=torch.float32) for l in layers}


# -- passes over layer pairs


def plan_passes(widths_a: list[int], widths_b: list[int], *, budget: float, max_rows: int,
                mixing: bool) -> list[list[tuple[int, int]]]:
    """Layer pairs (a, b) of one model B in passes of at most `budget` bytes: two [d_a, d_b]
    float64 sums per pair (real and baseline), a float32 baseline matrix per layer of B, and a
    batch of float32 activations per layer (B's twice: itself and its baseline). A pass holds
    at least one pair. Pairs go by B's layer first, so each layer's baseline is built and
    applied in one pass (or few), not in every pass."""
    passes, current, la_set, lb_set, cost = [], [], set(), set(), 0.0
    for lb, db in enumerate(widths_b):
        for la, da in enumerate(widths_a):
            add = 2 * 8 * da * db
            add += 0 if la in la_set else 4 * max_rows * da
            add += 0 if lb in lb_set else 4 * (2 * max_rows * db + (db * db if mixing else 0))
            if current and cost + add > budget:
                passes.append(current)
                current, la_set, lb_set, cost = [], set(), set(), 0.0
                add = (2 * 8 * da * db + 4 * max_rows * da
                       + 4 * (2 * max_rows * db + (db * db if mixing else 0)))
            current.append((la, lb))
            la_set.add(la)
            lb_set.add(lb)
            cost += add
    if current:
        passes.append(current)
    return passes


def plans_of(config: UniversalConfig, models: list[dict], max_rows: int,
             budget: float | None = None) -> dict[int, list[list[tuple[int, int]]]]:
    """The passes of every other model (by model index), at most `budget` bytes each."""
    ref = models[0]
    mixing = config.baseline in ("rotation", "orthogonal")
    budget = config.block_memory * GB if budget is None else budget
    return {m["index"]: plan_passes(ref["widths"], m["widths"], budget=budget,
                                    max_rows=max_rows, mixing=mixing) for m in models[1:]}


def correlate(config: UniversalConfig, group, source: _Source,
              models: list[dict]) -> tuple[pl.DataFrame, int]:
    """correlation_summary (per reference neuron and other model: its best match and the
    baseline's best) and the number of passes; each pair's block goes to corr/<key>/L<a>_L<b>."""
    import torch
    from tqdm.auto import tqdm

    ref, others = models[0], models[1:]
    plans = plans_of(config, models, source.batches.max_rows)
    n_passes = sum(len(p) for p in plans.values())
    bar = tqdm(total=n_passes * source.batches.rows, disable=config.quiet, desc="correlations",
               unit="tok", unit_scale=True)
    frames = {}
    for m in reversed(others):  # the model held last goes first
        best = new_best(sum(ref["widths"]))
        for pairs in plans[m["index"]]:
            fold(best, ref, pass_blocks(config, group, source, m, pairs, bar))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        frames[m["index"]] = best
    bar.close()
    return summary_frame(ref, others, frames), n_passes


def pass_blocks(config: UniversalConfig, group, source: _Source, m: dict, pairs,
                bar=None) -> list[tuple]:
    """One pass: per pair (la, lb) its block written to corr/<key>/L<a>_L<b> (unless
    --no-save-blocks) and, per reference neuron of la, the max correlation over lb's neurons,
    its argmax and the baseline's max: (la, lb, top, argmax, base_max)."""
    real, base = run_pass(config, source, m, pairs, bar)
    out = []
    for (la, lb) in pairs:
        corr = real.pop((la, lb)).correlation(spend=True)
        base_max = base.pop((la, lb)).correlation(spend=True).max(1)
        if config.save_blocks:
            # uncompressed: correlations compress ~1.1x and zstd costs more than the pair's
            # finalisation; overwrite: a retried Ray task writes its blocks anew
            group.create_array(name=f"corr/{m['key']}/L{la}_L{lb}", shape=corr.shape,
                               dtype="float32", chunks=corr.shape, compressors=None,
                               overwrite=True)[:] = corr.astype(np.float32)
        out.append((la, lb, corr.max(1), corr.argmax(1), base_max))
    return out


def new_best(total: int) -> dict[str, np.ndarray]:
    return {"max": np.full(total, -np.inf), "layer": np.zeros(total, np.int32),
            "neuron": np.zeros(total, np.int32), "base": np.full(total, -np.inf)}


def fold(best: dict, ref: dict, blocks: list[tuple]) -> None:
    """Fold a pass's per-pair maxima into one model's per-neuron best (in pass order: a tie
    keeps the earlier pair, as one loop over the pairs would)."""
    for la, lb, top, argmax, base_max in blocks:
        sl = slice(ref["offsets"][la], ref["offsets"][la] + ref["widths"][la])
        better = top > best["max"][sl]
        best["max"][sl] = np.where(better, top, best["max"][sl])
        best["layer"][sl] = np.where(better, lb, best["layer"][sl])
        best["neuron"][sl] = np.where(better, argmax, best["neuron"][sl])
        best["base"][sl] = np.maximum(best["base"][sl], base_max)


def summary_frame(ref: dict, others: list[dict], frames: dict) -> pl.DataFrame:
    total = sum(ref["widths"])
    layer = np.repeat(np.arange(len(ref["widths"]), dtype=np.int32), ref["widths"])
    neuron = np.concatenate([np.arange(w, dtype=np.int32) for w in ref["widths"]])
    return pl.concat([pl.DataFrame({
        "neuron_id": np.arange(total, dtype=np.int64), "layer": layer, "neuron": neuron,
        "model_b": m["name"], "max_corr": frames[m["index"]]["max"],
        "argmax_layer": frames[m["index"]]["layer"], "argmax_neuron": frames[m["index"]]["neuron"],
        "baseline_max": frames[m["index"]]["base"],
        "excess": frames[m["index"]]["max"] - frames[m["index"]]["base"]}) for m in others])


# -- on Ray: the cache as one task per model, the passes as one task each


def correlate_on_ray(config: UniversalConfig, storage: Storage, group, tmp, models: Models,
                     windows, batches: Batches) -> tuple[pl.DataFrame, int, dict, int]:
    """(summary, passes, the reference's moments, cache bytes), computed by Ray tasks that
    read and write the result's arrays folder `tmp` (a storage root every worker reaches);
    the driver folds the passes' maxima in the order of one process, so the result is the
    same whatever runs where."""
    from pipeline.core import cluster

    ray = cluster.connect(config.ray)
    info, ref, others = models.info, models.info[0], models.info[1:]
    models.release()  # the tasks load their own
    windows_ref, batches_ref = ray.put(windows), ray.put(batches)
    gpu = config.device != "cpu"
    slots = cluster.slots(ray, config.device)
    plans = ray_plans(config, info, batches.max_rows, slots)
    cache_bytes, moments = 0, {}
    common = (config, cluster.task_root(storage.root), cluster.task_root(tmp), info)
    if config.cache != "none":
        for m in info:
            group.require_group(f"cache/{m['key']}")  # parents made once, not raced
        built = cluster.run_tasks(
            universal_cache_task, [((*common, m["index"], windows_ref, batches_ref), {})
                                   for m in info],
            address=config.ray, device="auto" if gpu else "cpu", desc="activations",
            progress=False)
        cache_bytes, moments = sum(b[0] for b in built), built[0][1]
    order = [(m, pairs) for m in reversed(others) for pairs in plans[m["index"]]]
    fresh, seen = [], set()
    for _, pairs in order:  # the pass that reads a reference layer first takes its moments
        layers = sorted({la for la, _ in pairs} - seen) if config.cache == "none" else []
        fresh.append(layers)
        seen.update(layers)
    for m in others:
        group.require_group(f"corr/{m['key']}")
    rows = batches.rows

    def poll() -> list[tuple[int, int]]:  # a pass commits its blocks one by one
        if not config.save_blocks:
            return [(0, rows) for _ in order]
        current = arrays.open_group(tmp, mode="r")
        return [(rows * sum(f"corr/{m['key']}/L{la}_L{lb}" in current for la, lb in pairs)
                 // len(pairs), rows) for m, pairs in order]

    # a pass's sums and batches; never more than the cluster has, or no node could run it
    memory = int(min(config.block_memory * GB, ray.cluster_resources().get("memory", np.inf)))
    outs = cluster.run_tasks(
        universal_pass_task, [((*common, m["index"], pairs, windows_ref, batches_ref, layers), {})
                              for (m, pairs), layers in zip(order, fresh)],
        address=config.ray, device="auto" if gpu else "cpu", desc="passes", poll=poll,
        progress=not config.quiet, resources={"memory": memory})
    frames = {m["index"]: new_best(sum(ref["widths"])) for m in others}
    for (m, _), (blocks, taken) in zip(order, outs):
        fold(frames[m["index"]], ref, blocks)
        moments.update(taken)
    return summary_frame(ref, others, frames), len(order), dict(sorted(moments.items())), \
        cache_bytes


def ray_plans(config: UniversalConfig, models: list[dict], max_rows: int,
              slots: int) -> dict[int, list[list[tuple[int, int]]]]:
    """The passes of --block-memory, split further (halving the budget) until there are at
    least as many as the cluster runs at once or each holds one pair. Only with a cache: a
    pass without one recomputes both models' forwards, so more passes cost more forwards.
    The result does not depend on the split: each pair's sums are its own and the driver
    folds the pairs in one order."""
    budget = config.block_memory * GB
    plans = plans_of(config, models, max_rows, budget)
    if config.cache == "none":
        return plans
    pairs = sum(len(p) for plan in plans.values() for p in plan)
    while sum(len(p) for p in plans.values()) < min(slots, pairs):
        budget /= 2
        plans = plans_of(config, models, max_rows, budget)
    return plans


def _task_source(config: UniversalConfig, root: str, group, info: list[dict], windows,
                 batches: Batches, fresh=None) -> _Source:
    models = Models(config, Storage(root), info=info)
    if config.cache == "none":
        return Forwards(config, models, windows, batches, fresh=fresh)
    return Cache(config, models, windows, batches, group, build=False)


def _synced(moments: dict, layers) -> dict:
    """The moments of `layers`, their device partial sums folded in (they travel to the
    driver)."""
    for l in layers:
        moments[l]._sync()
    return {l: moments[l] for l in layers}


def universal_cache_task(config: UniversalConfig, root: str, tmp: str, info: list[dict],
                         index: int, windows, batches: Batches) -> tuple[int, dict]:
    """A Ray task: the cache of model `index`; (bytes, the reference's moments for model 0)."""
    source = _task_source(dataclasses.replace(config, quiet=True), root,
                          arrays.open_group(Path(tmp)), info, windows, batches)
    source.build(index)
    return source.nbytes, _synced(source.moments, source.moments) if index == 0 else {}


def universal_pass_task(config: UniversalConfig, root: str, tmp: str, info: list[dict],
                        index: int, pairs, windows, batches: Batches,
                        fresh: list[int]) -> tuple[list[tuple], dict]:
    """A Ray task: one pass of model `index` against the reference (pass_blocks); with
    --cache none also the reference's moments of the layers in `fresh`."""
    group = arrays.open_group(Path(tmp))
    source = _task_source(config, root, group, info, windows, batches, fresh)
    return pass_blocks(config, group, source, info[index], pairs), _synced(source.moments, fresh)


def run_pass(config: UniversalConfig, source: _Source, m: dict, pairs,
             bar=None) -> tuple[dict, dict]:
    """The real and baseline sums of `pairs` (layer of the reference, layer of model m) over
    every batch: each layer is read or computed once per batch, each matrix built once."""
    import torch

    ref_widths = source.models.info[0]["widths"]
    la_layers = sorted({la for la, _ in pairs})
    lb_layers = sorted({lb for _, lb in pairs})
    real = {(la, lb): PairCorrelation(ref_widths[la], m["widths"][lb]) for la, lb in pairs}
    base = {(la, lb): PairCorrelation(ref_widths[la], m["widths"][lb]) for la, lb in pairs}
    mixers = {}
    for lb in lb_layers:
        mat = baseline_matrix(config.baseline, m["widths"][lb], seed=config.seed,
                              model=m["index"], layer=lb)
        if mat is not None:
            mixers[lb] = torch.from_numpy(mat.astype(np.float32))
    for k in range(source.batches.count):
        rows = int(source.batches.starts[k + 1] - source.batches.starts[k])
        if bar is not None:
            bar.update(rows)
        if rows == 0:
            continue
        a = source.acts(0, k, la_layers)
        b = source.acts(m["index"], k, lb_layers)
        mixers = {l: x.to(next(iter(b.values())).device) for l, x in mixers.items()}
        bb = baseline_acts(config.baseline, b, seed=config.seed, model=m["index"], batch=k,
                           mixers=mixers)
        for la, lb in pairs:
            real[(la, lb)].update(a[la], b[lb])
            base[(la, lb)].update(a[la], bb[lb])
        del a, b, bb
    source.end_pass(m["index"], la_layers)
    return real, base


# -- the flag


def universal_neurons(summary: pl.DataFrame, threshold: float, rule: str,
                      min_models: int | None) -> pl.DataFrame:
    """Per reference neuron: models where max - baseline > threshold, the means over models of
    max and baseline max, their difference (excess), and the flag of the rule."""
    out = summary.group_by("neuron_id", "layer", "neuron").agg(
        (pl.col("excess") > threshold).sum().cast(pl.Int64).alias("matches"),
        pl.col("max_corr").mean().alias("mean_corr"),
        pl.col("baseline_max").mean().alias("mean_baseline"),
    ).sort("neuron_id").with_columns((pl.col("mean_corr") - pl.col("mean_baseline"))
                                     .alias("excess"))
    flag = pl.col("excess") > threshold if rule == "paper" else pl.col("matches") >= min_models
    return out.with_columns(flag.alias("universal"))


def activation_properties(moments: dict, offsets: list[int]) -> pl.DataFrame:
    """act_mean, act_var, act_skew, act_kurt and sparsity of the reference's neurons over the
    included rows (NeuronMoments.summary, the one definition of moments from sums)."""
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
    ref = result.summary["model_b"].unique(maintain_order=True).to_list()
    rule = result.info.get("rule", "paper")
    lines = [f"{result.name}: {int(n['universal'].sum())} of {n.height} reference neurons are "
             f"universal (rule {rule}, threshold {result.info.get('threshold')}; against "
             f"{', '.join(ref)}; {result.info.get('tokens')} tokens, "
             f"{result.info.get('passes')} passes)"]
    if result.reused:
        lines.append("finished earlier with this config (--overwrite recomputes it)")
    with pl.Config(tbl_rows=15, tbl_cols=-1, tbl_width_chars=160):
        lines += [str(n.sort("excess", descending=True).head(15)), str(result.comparison)]
    return "\n".join(lines)


STAGES = [Stage(
    "universal", "Neurons that correlate across models trained with different seeds.",
    "  nwh universal --models zoo-s0 zoo-s1 zoo-s2\n"
    "  nwh universal --models zoo-s0 zoo-s1 --baseline permutation --rule per-model "
    "--threshold 0.3\n"
    "  nwh universal --models zoo-s0 zoo-s1 --cache none --block-memory 1\n"
    "  nwh universal --models zoo-s0 zoo-s1 zoo-s2 --ray\n"
    "  nwh sql \"select * from universal_neurons where universal order by excess desc\"\n",
    UniversalConfig, run, show, figures="pipeline.report.universal:draw")]
