"""Stage `gradients`: loss-gradient importance of neurons and of SAE features.

    nwh gradients --model zoo-s0 --layers 0-3 --aggregation-mode both
    nwh gradients --model zoo-s0 --site resid_post --loss mean
    nwh gradients --model zoo-s0 --sae ./my-sae --num-samples 128 --normalize-gradients
    nwh gradients --model zoo-s0 --num-samples 4096 --shard 2/8     # one shard, any scheduler
    nwh gradients --model zoo-s0 --num-samples 4096 --ray --shards 8

For every unit of the chosen layers: the mean and the mean |.| over token positions (those with
a next token) of dL/dx. L is the next-token cross-entropy summed over every predicted token of
a batch (`--loss sum`, the default: a position's gradient is its own effect, not diluted by
the batch size) or averaged over all predicted tokens of all windows (`--loss mean`: the sum's
gradients divided by their number). x is the site (`--site`): `neurons` (the MLP neurons, the
input of the output projection), `mlp_out` (the output of that projection, d_model wide) or
`resid_post` (the output of the transformer block, the residual stream leaving layer L; the
"layer activations" of the gradient-analysis reference). With --sae DIR (SAELens layout:
cfg.json + sae_weights.safetensors with W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in],
b_dec) the SAE is spliced at its hook point with the error term kept,
x' = x_hat + (x - x_hat).detach(), so the forward pass is unchanged, and dL/df of its features
is aggregated the same way. Hook points (SAELens names): `blocks.L.hook_mlp_post` /
`blocks.L.mlp.hook_post` (the neuron site), `blocks.L.hook_mlp_out` (the output of the MLP
output projection, before any post-MLP norm such as Gemma 2's), `blocks.L.hook_resid_pre` (the
input of block L) and `blocks.L.hook_resid_post` (its output).

Outputs under storage/reports/<name>/: layer_<L>_<mode>.npy, consolidated_results.npz,
metadata.json (configuration, dimensions, per-layer statistics, timings), timing.json; the
`neuron_gradients` table, partitioned by the result name (not an extraction run), its rows
carrying that `name` and the `model` and `revision` they came from (to join `runs` on);
runs/<name>/stages/gradients.json marks them finished. Figures: pipeline.report.gradients.

Shards: --shard i/n splits the batches of --batch-size windows into n contiguous, deterministic
slices (cluster.split_units); the shard sums dL/dx and |dL/dx| over its windows in float64 and
saves them to runs/<name>/shards/gradients-<key>/shard-i-of-n.npz (a saved shard is not
recomputed). The last shard to find every shard's sums there writes the result: the sums
added in shard order, positions added, then the means as above, so n shards equal one process
up to float64 rounding. --ray [ADDRESS] --shards N runs the shards as Ray tasks (one GPU each
where the cluster has GPUs; a task whose worker died is retried and redoes its shard) and
writes the result in the driver.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.core import cluster, tables
from pipeline.core.cluster import Shard
from pipeline.core.config import (
    ModelOptions,
    Progress,
    Stage,
    WindowOptions,
    at_least,
    config_hash,
    opt,
    to_dict,
)
from pipeline.core.errors import UserError
from pipeline.core.inputs import corpus_windows, input_fingerprint
from pipeline.core.storage import (
    Storage,
    atomic_path,
    finished_marker,
    marker_path,
    remove_file,
    remove_tree,
    slug,
    write_json,
)

log = logging.getLogger(__name__)

MODES = ("mean", "mean_abs", "both")
SITES = ("neurons", "mlp_out", "resid_post")
LOSSES = ("sum", "mean")
SAE_HOOK = re.compile(r"blocks\.(\d+)\.(hook_mlp_post|mlp\.hook_post|hook_mlp_out|hook_resid_pre|"
                      r"hook_resid_post)")
SAE_SITES = {"hook_mlp_post": "neurons", "mlp.hook_post": "neurons", "hook_mlp_out": "mlp_out",
             "hook_resid_pre": "resid_pre", "hook_resid_post": "resid_post"}
# the `kind` of a neuron_gradients row: which tensor its gradient is of
KINDS = {"neurons": "neuron", "mlp_out": "mlp_out", "resid_post": "resid_post"}
FINISH_WAIT_SECONDS = 600  # a shard refused the result's lock waits this long for its writer


@dataclass(kw_only=True)
class GradientConfig(ModelOptions, WindowOptions, Progress):
    layers: str | None = opt(None, help="layers: '0-3', '0,2' or all")
    site: str = opt("neurons", help="the tensor differentiated at each layer: neurons (the MLP "
                    "neurons, input of the output projection), mlp_out (output of the MLP output "
                    "projection, d_model wide) or resid_post (output of the transformer block, "
                    "d_model wide); the rows' kind says which", choices=SITES)
    loss: str = opt("sum", help="L, the next-token cross-entropy: sum = summed over every "
                    "predicted token of a batch; mean = averaged over all predicted tokens of "
                    "all windows", choices=LOSSES)
    aggregation_mode: str = opt("mean_abs", help="which aggregates are saved as .npy: mean, "
                                "mean_abs or both", choices=MODES)
    normalize_gradients: bool = opt(False, help="scale each layer's result so sum |g| = its "
                                    "width")
    sae: str | None = opt(None, help="folder of an SAE in SAELens's format; its features are "
                          "analysed instead of the neurons")
    name: str | None = opt(None, help="output name (default: slug of model, revision, layers)")
    overwrite: bool = opt(False, help="recompute a finished result", hash=False)
    batch_size: int = opt(4, help="windows per forward/backward pass", hash=False)
    # sharding never changes the result (the sum of the shards' sums), so it is not hashed
    shard: str | None = opt(None, metavar="I/N", hash=False,
                            help="compute shard I of N of the windows (0-based; whole batches) "
                            "and save its sums; the last shard to finish writes the result")
    ray: str | None = opt(None, const=cluster.LOCAL, metavar="ADDRESS", hash=False,
                          help="run the shards as Ray tasks (one GPU each where the cluster has "
                          "GPUs) and write the result: --ray alone starts a local cluster, "
                          "--ray ADDRESS joins one (auto, host:port, ray://host:10001)")
    shards: int | None = opt(None, hash=False, help="shards of --ray (default: one per GPU of "
                             "the cluster, else one per CPU)")

    min_window = 2  # the next-token loss needs 2 tokens

    def __post_init__(self) -> None:
        if self.aggregation_mode not in MODES:
            raise UserError(f"--aggregation-mode {self.aggregation_mode!r} is unknown: use "
                            "mean, mean_abs or both")
        if self.site not in SITES:
            raise UserError(f"--site {self.site!r} is unknown: use neurons, mlp_out or resid_post")
        if self.loss not in LOSSES:
            raise UserError(f"--loss {self.loss!r} is unknown: use sum or mean")
        self.check_windows()
        if self.shard is not None:
            Shard.parse(self.shard, "--shard")
            if self.ray is not None:
                raise UserError("--shard and --ray: --ray runs every shard itself; drop "
                                "--shard (or run one shard without --ray)")
        if self.shards is not None:
            if self.ray is None:
                raise UserError(f"--shards {self.shards} needs --ray; to run one shard of "
                                f"{self.shards} in this process pass --shard i/{self.shards}")
            at_least(self, 1, "shards")
        if self.sae:
            sae_hook(self.sae)
            if self.site != "neurons":
                raise UserError(f"--site {self.site} with --sae: the SAE's hook point names its "
                                "site; drop --site")

    @property
    def output_name(self) -> str:
        kind = "sae" if self.sae else self.site
        return self.name or slug("gradients", kind, Path(self.model).name, self.revision or "",
                                 (self.layers or "all").replace(",", "_"))

    @property
    def modes(self) -> list[str]:
        return ["mean", "mean_abs"] if self.aggregation_mode == "both" else [self.aggregation_mode]


@dataclass
class GradientResult:
    name: str
    kind: str                         # neuron, mlp_out, resid_post or sae_feature
    layers: dict[int, dict]           # layer -> {"mean": array, "mean_abs": array}
    frame: pl.DataFrame               # the neuron_gradients rows
    modes: list[str]
    reused: bool                      # finished earlier with the same config
    shard: str | None = None          # --shard i/n: the shard this process computed
    waiting: list[int] = field(default_factory=list)  # shards whose sums are not there yet


@dataclass
class ShardSums:
    """What a shard contributes: per layer the [2, dim] float64 sums over its scored positions
    of dL/dx and |dL/dx|, its number of positions, and what the result needs of the model."""

    sums: dict[int, np.ndarray]
    positions: int
    meta: dict        # kind, site, sae_hook, revision, offsets, layers, timings


@dataclass
class SAE:
    w_enc: object   # torch [d_in, d_sae]
    b_enc: object
    w_dec: object   # torch [d_sae, d_in]
    b_dec: object
    hook_name: str
    layer: int
    site: str       # neurons, mlp_out, resid_pre or resid_post

    def encode(self, x):
        import torch

        return torch.relu((x - self.b_dec) @ self.w_enc + self.b_enc)

    def decode(self, f):
        return f @ self.w_dec + self.b_dec


def sae_hook(directory: str | Path) -> tuple[str, int, str]:
    """(hook name, layer, site) of an SAE folder in SAELens's format, or a one-line UserError."""
    directory = Path(directory)
    cfg_path, weights_path = directory / "cfg.json", directory / "sae_weights.safetensors"
    if not cfg_path.exists() or not weights_path.exists():
        raise UserError(f"--sae {str(directory)!r} needs cfg.json and sae_weights.safetensors "
                        "(SAELens's format)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--sae {str(directory)!r}: cfg.json cannot be read ({e})") from None
    hook = cfg.get("hook_name") or cfg.get("hook_point") or ""
    m = SAE_HOOK.fullmatch(hook)
    if not m:
        raise UserError(f"SAE hook point {hook!r} is not supported: use blocks.L.mlp.hook_post "
                        "(the neuron site), blocks.L.hook_mlp_out, blocks.L.hook_resid_pre or "
                        "blocks.L.hook_resid_post")
    return hook, int(m.group(1)), SAE_SITES[m.group(2)]


def load_sae(directory: str | Path, device, dtype) -> SAE:
    """An SAE saved in SAELens's on-disk format (safetensors only, never pickle); missing or
    inconsistently shaped weights are a one-line UserError."""
    from safetensors.torch import load_file

    hook, layer, site = sae_hook(directory)
    w = load_file(str(Path(directory) / "sae_weights.safetensors"))
    names = ("W_enc", "b_enc", "W_dec", "b_dec")
    missing = [k for k in names if k not in w]
    if missing:
        raise UserError(f"--sae {str(directory)!r}: sae_weights.safetensors lacks {missing} "
                        "(SAELens's format has W_enc, b_enc, W_dec, b_dec)")
    d_in, d_sae = w["W_enc"].shape if w["W_enc"].ndim == 2 else (-1, -1)
    expect = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    bad = [f"{k} {tuple(w[k].shape)}" for k in names if tuple(w[k].shape) != expect[k]]
    if d_in < 0 or bad:
        raise UserError(f"--sae {str(directory)!r}: the weights' shapes do not fit "
                        f"({', '.join(bad) or 'W_enc is not 2-D'}); expected W_enc [d_in, d_sae], "
                        "b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]")
    t = {k: w[k].to(device=device, dtype=dtype) for k in names}
    return SAE(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], hook, layer, site)


def site_width(loaded, site: str, layer: int) -> int:
    """The width of the differentiated tensor: d_mlp at the neuron site, d_model elsewhere."""
    if site == "neurons":
        return loaded.sites[layer].width
    return int(loaded.adapter.w_out(loaded.model, layer).shape[1])


def run(config: GradientConfig, storage: Storage) -> GradientResult:
    """Aggregated gradients per layer (+ files, table, marker); with --shard one shard's sums
    (and the result, when this shard is the last to finish); with --ray every shard."""
    key = result_key(config)
    if config.ray is not None:
        return _run_on_ray(config, storage, key)
    if config.shard is not None:
        return _run_shard(config, storage, key, Shard.parse(config.shard, "--shard"))
    marker = storage.marker(config.output_name, "gradients")
    if not config.overwrite and marker.done(key):
        return stored_result(storage, config)
    return _finish(config, storage, marker, key, [compute_sums(config, storage)])


def result_key(config: GradientConfig) -> str:
    from pipeline.models.loading import dtype_name

    # on Ray the dtype is the one the tasks resolve where they run (bfloat16 on a GPU worker
    # led by a driver without one)
    dtype = dtype_name(config.device, config.dtype) if config.ray is None else \
        cluster.resolve_on_workers(dtype_name, config.device, config.dtype, address=config.ray,
                                   device=config.device)
    return config_hash(config, dtype=dtype,
                       corpus_file=input_fingerprint(config.corpus),
                       sae_files=[input_fingerprint(Path(config.sae) / f) for f in
                                  ("cfg.json", "sae_weights.safetensors")] if config.sae else None)


def compute_sums(config: GradientConfig, storage: Storage, shard: Shard | None = None) -> ShardSums:
    """Load the model and sum the gradients over the windows of `shard` (all without one): the
    batches of --batch-size windows are split by cluster.split_units, so every shard has the
    batches, and so the per-batch sums, of the unsharded run."""
    from pipeline.core.layers import parse_layers
    from pipeline.models.generation import check_positions
    from pipeline.models.loading import load_model

    t_start = time.perf_counter()
    loaded = load_model(config.model, config.revision, storage=storage, **config.model_kwargs())
    if not loaded.is_causal:
        raise UserError(f"model {config.model!r} is not a causal LM: the next-token loss needs one")
    loaded.require_head("the next-token loss")
    loaded.require_dense("gradient importance")
    sae = load_sae(config.sae, loaded.device, loaded.dtype) if config.sae else None
    if sae and sae.layer >= loaded.n_layers:
        raise UserError(f"the SAE hooks layer {sae.layer} but the model has {loaded.n_layers} "
                        "layers: pass the SAE's model")
    if sae and sae.w_enc.shape[0] != site_width(loaded, sae.site, sae.layer):
        raise UserError(f"the SAE reads {sae.w_enc.shape[0]}-wide vectors but {sae.hook_name} of "
                        f"this model is {site_width(loaded, sae.site, sae.layer)} wide: pass the "
                        "SAE's model")
    layers = [sae.layer] if sae else parse_layers(config.layers, loaded.n_layers)
    windows = list(corpus_windows(config, loaded.tokenizer))
    check_positions(loaded.model, len(windows[0]), "lower --max-length")
    if shard is not None:
        batches = -(-len(windows) // config.batch_size)
        first, stop = cluster.split_units(batches, shard.count)[shard.index]
        windows = windows[first * config.batch_size:stop * config.batch_size]
    t0 = time.perf_counter()
    sums, positions = accumulate_gradients(config, loaded, sae, layers, windows)
    meta = {"kind": "sae_feature" if sae else KINDS[config.site],
            "site": sae.site if sae else config.site, "sae_hook": sae.hook_name if sae else None,
            "revision": loaded.revision, "offsets": list(loaded.layer_offsets), "layers": layers,
            "windows": len(windows),
            "timings": {"load_and_prepare_s": t0 - t_start,
                        "gradients_s": time.perf_counter() - t0}}
    return ShardSums(sums, positions, meta)


def _finish(config: GradientConfig, storage: Storage, marker, key: str,
            parts: list[ShardSums]) -> GradientResult:
    """The result of the shards' sums (one part when unsharded): summed in shard order,
    positions summed, then aggregated, saved and marked finished."""
    sums: dict[int, np.ndarray] = {}
    for part in parts:
        for l, s in part.sums.items():
            sums[l] = sums[l] + s if l in sums else s
    positions = sum(part.positions for part in parts)
    meta = parts[0].meta
    sums = {l: sums[l] for l in meta["layers"] if l in sums}  # in the order of --layers
    if config.loss == "mean":  # d(sum / N) = d(sum) / N, scaled in float64 after the loop
        sums = {l: s / positions for l, s in sums.items()}
    timings = {k: sum(part.meta["timings"][k] for part in parts)
               for k in ("load_and_prepare_s", "gradients_s")}
    if len(parts) > 1:  # seconds of every shard added up; each shard's own beside them
        timings["shards"] = [part.meta["timings"] for part in parts]
    results = {l: aggregate(s, positions, config.normalize_gradients) for l, s in sums.items()}
    frame = gradient_frame(results, meta["kind"], meta["offsets"], name=config.output_name,
                           model=config.model, revision=meta["revision"])
    _save(config, storage, meta, results, frame, positions, timings)
    marker.write(to_dict(config), key, positions=positions, timings=timings, shards=len(parts))
    return GradientResult(config.output_name, meta["kind"], results, frame, config.modes,
                          reused=False)


# -- shards: sums saved per shard under runs/<name>/shards/gradients-<key>/shard-i-of-n.npz


def shard_dir(storage: Storage, config: GradientConfig, key: str) -> Path:
    """Where the shards' sums of this config go: the batch size splits the windows, so it
    keys them too (the result's hash leaves it out: it does not change the result)."""
    digest = hashlib.sha256(f"{key}/{config.batch_size}".encode()).hexdigest()[:16]
    return storage.run_dir(config.output_name) / "shards" / f"gradients-{digest}"


def _shard_owner(name: str, shard: Shard) -> str:
    """The lock owner of one shard (two processes never compute the same shard); shards of one
    result hold separate locks, so they run side by side."""
    owner = f"{name}.{shard.name}"
    if len(owner) > 128:
        owner = f"{name[:90]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}.{shard.name}"
    return owner


def save_shard(path: Path, part: ShardSums) -> None:
    arrays_ = {f"layer_{l}": s for l, s in part.sums.items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, positions=np.int64(part.positions), meta=np.array(json.dumps(part.meta)),
                 **arrays_)


def load_shard(path: Path) -> ShardSums:
    with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        sums = {int(k.split("_", 1)[1]): z[k] for k in z.files if k.startswith("layer_")}
        return ShardSums(sums, int(z["positions"]), meta)


def gradient_shard_task(config: GradientConfig, root: str, key: str, index: int,
                        count: int) -> int:
    """Compute and save one shard's sums unless they are saved already (a retried task whose
    shard finished, or a resumed run); returns its positions. Run as a Ray task or in-process."""
    storage, shard = Storage(root), Shard(index, count)
    path = shard_dir(storage, config, key) / f"{shard.name}.npz"
    if not path.exists():
        with storage.lock(_shard_owner(config.output_name, shard), f"gradients {shard}"):
            if not path.exists():  # another process may have finished it meanwhile
                save_shard(path, compute_sums(config, storage, shard))
                log.info("gradients %s: shard %s saved its sums", config.output_name, shard)
    return load_shard(path).positions


def _run_shard(config: GradientConfig, storage: Storage, key: str, shard: Shard) -> GradientResult:
    """--shard i/n: this shard's sums (not recomputed when saved, unless --overwrite), then the
    result if every shard's sums are there."""
    name = config.output_name
    if not config.overwrite and finished_marker(marker_path(storage, name, "gradients"), key):
        return stored_result(storage, config)
    storage.ensure_writable()
    path = shard_dir(storage, config, key) / f"{shard.name}.npz"
    if config.overwrite and path.exists():
        remove_file(path)
    elif path.exists():
        log.info("gradients %s: shard %s has its sums already: not recomputed", name, shard)
    gradient_shard_task(config, str(storage.root), key, shard.index, shard.count)
    return _finish_shards(config, storage, key, shard.count, shard)


def _missing(directory: Path, count: int) -> list[int]:
    return [k for k in range(count) if not (directory / f"{Shard(k, count).name}.npz").exists()]


def _pending(config: GradientConfig, shard: Shard, waiting: list[int]) -> GradientResult:
    frame = pl.from_arrow(tables.schema("neuron_gradients").empty_table())
    kind = "sae_feature" if config.sae else KINDS[config.site]
    return GradientResult(config.output_name, kind, {}, frame, config.modes, reused=False,
                          shard=str(shard), waiting=waiting)


def _finish_shards(config: GradientConfig, storage: Storage, key: str, count: int,
                   shard: Shard) -> GradientResult:
    """Write the result when every shard's sums are saved (the last shard to finish does);
    a shard that finds another one writing it waits for that result."""
    name, directory = config.output_name, shard_dir(storage, config, key)
    done = marker_path(storage, name, "gradients")
    if _missing(directory, count):
        waiting = _missing(directory, count)
        log.info("gradients %s: shard %s done; waiting for shard(s) %s", name, shard,
                 ", ".join(map(str, waiting)))
        return _pending(config, shard, waiting)
    try:
        marker = storage.marker(name, "gradients")
    except UserError:  # another shard holds the result's lock: it is writing the result
        if cluster.wait_for(lambda: finished_marker(done, key) is not None, FINISH_WAIT_SECONDS,
                            step=0.5):
            return stored_result(storage, config)
        raise
    waiting = _missing(directory, count)
    if waiting:  # the result was written (and the shards' sums removed) since we looked
        return stored_result(storage, config) if marker.done(key) else \
            _pending(config, shard, waiting)
    if not config.overwrite and marker.done(key):
        return stored_result(storage, config)
    return _finish_from(config, storage, marker, key, directory, count)


def _finish_from(config, storage, marker, key: str, directory: Path, count: int) -> GradientResult:
    parts = [load_shard(directory / f"{Shard(k, count).name}.npz") for k in range(count)]
    result = _finish(config, storage, marker, key, parts)
    remove_tree(directory)  # the result holds them now
    try:
        directory.parent.rmdir()  # shards/ of the result, unless another config's are there
    except OSError:
        pass
    return result


def _run_on_ray(config: GradientConfig, storage: Storage, key: str) -> GradientResult:
    """--ray: the shards whose sums are not saved yet as Ray tasks, then the result here."""
    storage.ensure_writable()
    marker = storage.marker(config.output_name, "gradients")  # held by this driver
    if not config.overwrite and marker.done(key):
        return stored_result(storage, config)
    ray = cluster.connect(config.ray)
    count = config.shards or cluster.slots(ray, config.device)
    directory = shard_dir(storage, config, key)
    if config.overwrite:
        remove_tree(directory)
    todo = _missing(directory, count)
    if len(todo) < count:
        log.info("gradients %s: %d of %d shards have their sums already: not recomputed",
                 config.output_name, count - len(todo), count)
    task_config = dataclasses.replace(config, quiet=True)
    planned = -(-config.num_samples // config.batch_size)
    tokens = [(stop - first) * config.batch_size * config.max_length
              for first, stop in cluster.split_units(planned, count)]

    def poll() -> list[tuple[int, int]]:  # a shard commits once, when its sums are saved
        return [(tokens[k] if (directory / f"{Shard(k, count).name}.npz").exists() else 0,
                 tokens[k]) for k in todo]

    cluster.run_tasks(gradient_shard_task,
                      [((task_config, cluster.task_root(storage.root), key, k, count), {})
                       for k in todo],
                      address=config.ray, device=config.device,
                      desc=f"gradients {config.output_name}", poll=poll,
                      progress=not config.quiet)
    return _finish_from(config, storage, marker, key, directory, count)


def _differentiable(t):
    """t itself, or a leaf copy that requires grad when nothing before it does (frozen
    weights): the gradient with respect to it is then still defined."""
    return t if t.requires_grad else t.detach().requires_grad_(True)


def site_hooks(loaded, site: str, edits: dict):
    """Hooks applying edits[l](x) to the tensor x of `site` at each layer l."""
    from pipeline.models.hooks import edit_block_inputs, edit_module_outputs, edit_neurons

    if site == "neurons":
        return edit_neurons(loaded.sites, edits)
    if site == "mlp_out":
        return edit_module_outputs({l: loaded.sites[l].module for l in edits}, edits)
    blocks = {l: loaded.adapter.block(loaded.model, l) for l in edits}
    if site == "resid_pre":
        return edit_block_inputs(blocks, edits)
    return edit_module_outputs(blocks, edits)


def gradient_hooks(loaded, sae: SAE | None, layers: list[int], captured: dict,
                   site: str = "neurons"):
    """Hooks that put the tensor to differentiate of each layer into `captured` on every
    forward: the site's tensor, or the features f of the SAE spliced at its hook point."""

    def capture(layer: int):
        def edit(x):
            if sae is None:
                x = captured[layer] = _differentiable(x)
                # an output goes on as a copy: an in-place op downstream (Falcon adds the
                # attention output into the MLP's) must not rewrite the captured tensor
                return x if site == "neurons" else x.clone()
            f = captured[layer] = _differentiable(sae.encode(x))
            x_hat = sae.decode(f)
            return x_hat + (x - x_hat).detach()  # the error term keeps the forward unchanged
        return edit

    edits = {l: capture(l) for l in layers}
    return site_hooks(loaded, sae.site if sae is not None else site, edits)


def accumulate_gradients(config: GradientConfig, loaded, sae: SAE | None, layers: list[int],
                         windows: list[list[int]]) -> tuple[dict[int, np.ndarray], int]:
    """{layer: [2, dim] sums over scored positions of dL/dx and |dL/dx|}, and the positions."""
    import torch
    from tqdm.auto import tqdm

    captured: dict[int, torch.Tensor] = {}
    sums: dict[int, torch.Tensor] = {}  # on the device: one transfer after the loop
    positions = 0
    with torch.enable_grad(), gradient_hooks(loaded, sae, layers, captured, config.site):
        for s in tqdm(range(0, len(windows), config.batch_size), disable=config.quiet,
                      desc="gradients"):
            ids = torch.tensor(windows[s:s + config.batch_size], device=loaded.device)
            captured.clear()
            logits = loaded.model(input_ids=ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            grads = torch.autograd.grad(loss, [captured[l] for l in layers])
            for l, g in zip(layers, grads):
                g = g[:, :-1].reshape(-1, g.shape[-1]).double()  # positions with a target
                block = torch.stack([g.sum(0), g.abs().sum(0)])
                sums[l] = sums[l] + block if l in sums else block
            positions += ids[:, :-1].numel()
    return {l: s.cpu().numpy() for l, s in sums.items()}, positions


def aggregate(sums: np.ndarray, positions: int, normalize: bool) -> dict[str, np.ndarray]:
    """Mean and mean |.| per unit; normalised so that sum |g| equals the width, if asked."""
    mean, mean_abs = sums / positions
    if normalize:
        dim = len(mean)
        mean = mean * dim / max(np.abs(mean).sum(), 1e-30)
        mean_abs = mean_abs * dim / max(mean_abs.sum(), 1e-30)
    return {"mean": mean, "mean_abs": mean_abs}


def gradient_frame(results: dict[int, dict], kind: str, offsets: list[int], *, name: str,
                   model: str, revision: str | None) -> pl.DataFrame:
    """The neuron_gradients rows of every layer; only neurons have a global neuron_id. The rows
    carry the result name and the model and revision they came from (a join key to `runs`)."""
    frames = []
    for l, r in results.items():
        dim = len(r["mean"])
        unit = np.arange(dim, dtype=np.int64)
        frames.append(pl.DataFrame({
            "name": [name] * dim, "model": [model] * dim,
            "revision": pl.Series([revision] * dim, dtype=pl.Utf8),
            "kind": [kind] * dim, "layer": np.full(dim, l, np.int32),
            "neuron": unit.astype(np.int32),
            "neuron_id": offsets[l] + unit if kind == "neuron" else np.full(dim, -1),
            "grad_mean": r["mean"], "grad_mean_abs": r["mean_abs"]}))
    return pl.concat(frames)


def stored_result(storage: Storage, config: GradientConfig) -> GradientResult:
    """A finished result, read back from its neuron_gradients partition."""
    frame = pl.from_arrow(tables.read_partition(storage, "neuron_gradients",
                                                config.output_name)).sort("layer", "neuron")
    layers = {l: {"mean": part["grad_mean"].to_numpy(), "mean_abs": part["grad_mean_abs"].to_numpy()}
              for (l,), part in frame.group_by("layer", maintain_order=True)}
    return GradientResult(config.output_name, frame["kind"][0], layers, frame, config.modes,
                          reused=True)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _save(config, storage, meta, results, frame, positions, timings) -> None:
    out = storage.reports(config.output_name)
    consolidated, stats = {}, {}
    for l, r in results.items():
        for mode in config.modes:
            _save_npy(out / f"layer_{l}_{mode}.npy", r[mode])
            consolidated[f"layer_{l}_{mode}"] = r[mode]
            stats[f"layer_{l}_{mode}"] = {"mean": float(r[mode].mean()), "std": float(r[mode].std()),
                                          "max": float(r[mode].max()),
                                          "sum_abs": float(np.abs(r[mode]).sum())}
    with atomic_path(out / "consolidated_results.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **consolidated)
    write_json(out / "metadata.json", {
        "config": to_dict(config), "kind": meta["kind"], "site": meta["site"],
        "loss": config.loss, "sae_hook": meta["sae_hook"],
        "dimensions": {str(l): len(r["mean"]) for l, r in results.items()},
        "positions": positions, "layer_statistics": stats, "timings": timings,
        "model_revision": meta["revision"]})
    write_json(out / "timing.json", timings)
    tables.write_part(storage, "neuron_gradients", config.output_name,
                      frame.select(tables.schema("neuron_gradients").names).to_arrow())


def load_gradient_results(directory: str | Path) -> dict:
    """Saved results: {"metadata": dict, "arrays": {"layer_L_mode": ndarray}}."""
    directory = Path(directory)
    with (directory / "consolidated_results.npz").open("rb") as f, \
            np.load(f, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return {"metadata": json.loads((directory / "metadata.json").read_text()), "arrays": arrays}


UNITS = {"neuron": "a", "sae_feature": "f", "mlp_out": "(mlp_out)", "resid_post": "(resid_post)"}


def show(result: GradientResult) -> str:
    if result.waiting:
        return (f"shard {result.shard} saved its sums; shard(s) "
                f"{', '.join(map(str, result.waiting))} of {result.shard.split('/')[1]} are not "
                "done yet: the last shard to finish writes the result")
    unit = UNITS.get(result.kind, "x")
    lines = [f"layer {l}: mean |dL/d{unit}| {r['mean_abs'].mean():.3g}; top by mean_abs "
             f"{np.argsort(-r['mean_abs'])[:5].tolist()}" for l, r in result.layers.items()]
    if result.reused:
        lines.append("finished earlier with this config (--overwrite recomputes it)")
    lines.append(f"results: neuron_gradients rows with name = {result.name!r}")
    return "\n".join(lines)


STAGES = [Stage(
    "gradients", "Loss-gradient importance of neurons, layer outputs or SAE features "
    "(L: next-token cross-entropy, summed over a batch's predicted tokens or, --loss mean, "
    "averaged over all of them).",
    "  nwh gradients --model zoo-s0 --layers 0-3 --aggregation-mode both\n"
    "  nwh gradients --model zoo-s0 --site resid_post --loss mean\n"
    "  nwh gradients --model zoo-s0 --sae ./sae-l2 --normalize-gradients\n"
    "  nwh gradients --model zoo-s0 --num-samples 4096 --shard 0/4\n"
    "  nwh gradients --model zoo-s0 --num-samples 4096 --ray --shards 4\n"
    "  nwh sql \"select layer, neuron, grad_mean_abs from neuron_gradients order by 3 desc limit 10\"\n",
    GradientConfig, run, show, figures="pipeline.report.gradients:draw")]
