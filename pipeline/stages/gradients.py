"""Stage `gradients`: loss-gradient importance of neurons and of SAE features.

    nwh gradients --model zoo-s0 --layers 0-3 --aggregation-mode both
    nwh gradients --model zoo-s0 --site resid_post --loss mean
    nwh gradients --model zoo-s0 --sae ./my-sae --num-samples 128 --normalize-gradients

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
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.core import tables
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
from pipeline.core.storage import Storage, atomic_path, slug, write_json

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
    """Aggregated gradients per layer (+ files, table, marker)."""
    from pipeline.core.layers import parse_layers
    from pipeline.models.generation import check_positions
    from pipeline.models.loading import dtype_name, load_model

    key = config_hash(config, dtype=dtype_name(config.device, config.dtype),
                      corpus_file=input_fingerprint(config.corpus),
                      sae_files=[input_fingerprint(Path(config.sae) / f) for f in
                                 ("cfg.json", "sae_weights.safetensors")] if config.sae else None)
    marker = storage.marker(config.output_name, "gradients")
    if not config.overwrite and marker.done(key):
        return stored_result(storage, config)
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
    t0 = time.perf_counter()
    sums, positions = accumulate_gradients(config, loaded, sae, layers, windows)
    if config.loss == "mean":  # d(sum / N) = d(sum) / N, scaled in float64 after the loop
        sums = {l: s / positions for l, s in sums.items()}
    timings = {"load_and_prepare_s": t0 - t_start, "gradients_s": time.perf_counter() - t0}
    results = {l: aggregate(s, positions, config.normalize_gradients) for l, s in sums.items()}
    kind = "sae_feature" if sae else KINDS[config.site]
    frame = gradient_frame(results, kind, loaded.layer_offsets, name=config.output_name,
                           model=config.model, revision=loaded.revision)
    _save(config, storage, loaded, sae, results, frame, positions, timings)
    marker.write(to_dict(config), key, positions=positions, timings=timings)
    return GradientResult(config.output_name, kind, results, frame, config.modes, reused=False)


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


def _save(config, storage, loaded, sae, results, frame, positions, timings) -> None:
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
        "config": to_dict(config), "kind": "sae_feature" if sae else KINDS[config.site],
        "site": sae.site if sae else config.site, "loss": config.loss,
        "sae_hook": sae.hook_name if sae else None,
        "dimensions": {str(l): len(r["mean"]) for l, r in results.items()},
        "positions": positions, "layer_statistics": stats, "timings": timings,
        "model_revision": loaded.revision})
    write_json(out / "timing.json", timings)
    tables.write_part(storage, "neuron_gradients", config.output_name,
                      frame.select(tables.schema("neuron_gradients").names).to_arrow())


def load_gradient_results(directory: str | Path) -> dict:
    """Saved results: {"metadata": dict, "arrays": {"layer_L_mode": ndarray}}."""
    directory = Path(directory)
    with np.load(directory / "consolidated_results.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return {"metadata": json.loads((directory / "metadata.json").read_text()), "arrays": arrays}


UNITS = {"neuron": "a", "sae_feature": "f", "mlp_out": "(mlp_out)", "resid_post": "(resid_post)"}


def show(result: GradientResult) -> str:
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
    "  nwh sql \"select layer, neuron, grad_mean_abs from neuron_gradients order by 3 desc limit 10\"\n",
    GradientConfig, run, show, figures="pipeline.report.gradients:draw")]
