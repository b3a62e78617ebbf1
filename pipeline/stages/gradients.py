"""Loss-gradient importance of neurons and of SAE features.

    nwh gradients --model zoo-s0 --layers 0-3 --aggregation-mode both
    nwh gradients --model zoo-s0 --sae ./my-sae --num-samples 128 --normalize-gradients

For every neuron of the chosen layers: the mean and the mean |.| over token positions of
dL/da, where L is the summed next-token cross-entropy of a batch (so a position's gradient is
its own effect, not diluted by the batch size). With --sae DIR (SAELens layout: cfg.json +
sae_weights.safetensors with W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec) the SAE is
spliced at its hook point with the error term kept, x' = x_hat + (x - x_hat).detach(), so the
forward pass is unchanged, and dL/df of its features is aggregated the same way.
Hook points: `blocks.L.hook_mlp_post`/`blocks.L.mlp.hook_post` (the neuron site) and
`blocks.L.hook_resid_pre` (the input of block L).

Outputs under storage/reports/<name>/: layer_<L>_<mode>.npy, consolidated_results.npz,
metadata.json (configuration, dimensions, per-layer statistics, timings), timing.json, per-layer
histogram and scatter plots and a combined plot; and the `neuron_gradients` table.
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
from pipeline.core.config import add_arguments, from_args, opt, to_dict
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, atomic_path, slug, write_json

log = logging.getLogger(__name__)

MODES = ("mean", "mean_abs", "both")


@dataclass
class GradientConfig:
    model: str = opt(help="zoo name, local folder or hub id")
    revision: str | None = opt(None, help="checkpoint / hub revision")
    device: str = opt("auto", help="auto, cpu, cuda")
    dtype: str = opt("auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, float16, bfloat16")
    corpus: str = opt("stdlib", help="corpus of the loss (stdlib, a file, or a hub dataset)")
    num_samples: int = opt(64, help="windows")
    batch_size: int = opt(4, help="windows per forward/backward pass")
    max_length: int = opt(128, help="tokens per window")
    layers: str | None = opt(None, help="layers: '0-3', '0,2' or all")
    aggregation_mode: str = opt("mean_abs", help="mean, mean_abs or both", choices=MODES)
    normalize_gradients: bool = opt(False, help="scale each layer's result so sum |g| = its width")
    sae: str | None = opt(None, help="folder of an SAE in SAELens's format; its features are analysed")
    name: str | None = opt(None, help="output name (default: slug of model, revision, layers)")

    def __post_init__(self) -> None:
        if self.aggregation_mode not in MODES:
            raise UserError(f"--aggregation-mode {self.aggregation_mode!r} is unknown: use "
                            "mean, mean_abs or both")
        if min(self.num_samples, self.batch_size) < 1 or self.max_length < 2:
            raise UserError("--num-samples and --batch-size must be >= 1, --max-length >= 2")

    @property
    def output_name(self) -> str:
        kind = "sae" if self.sae else "neurons"
        return self.name or slug("gradients", kind, Path(self.model).name, self.revision or "",
                                 (self.layers or "all").replace(",", "_"))


@dataclass
class SAE:
    w_enc: object   # torch [d_in, d_sae]
    b_enc: object
    w_dec: object   # torch [d_sae, d_in]
    b_dec: object
    hook_name: str
    layer: int
    site: str       # "neurons" or "resid_pre"

    def encode(self, x):
        import torch

        return torch.relu((x - self.b_dec) @ self.w_enc + self.b_enc)

    def decode(self, f):
        return f @ self.w_dec + self.b_dec


def load_sae(directory: str | Path, device, dtype) -> SAE:
    """An SAE saved in SAELens's on-disk format (safetensors only, never pickle)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, weights_path = directory / "cfg.json", directory / "sae_weights.safetensors"
    if not cfg_path.exists() or not weights_path.exists():
        raise UserError(f"--sae {str(directory)!r} needs cfg.json and sae_weights.safetensors "
                        "(SAELens's format)")
    cfg = json.loads(cfg_path.read_text())
    hook = cfg.get("hook_name") or cfg.get("hook_point") or ""
    m = re.fullmatch(r"blocks\.(\d+)\.(hook_mlp_post|mlp\.hook_post|hook_resid_pre)", hook)
    if not m:
        raise UserError(f"SAE hook point {hook!r} is not supported: use blocks.L.mlp.hook_post "
                        "(the neuron site) or blocks.L.hook_resid_pre")
    w = load_file(str(weights_path))
    t = {k: w[k].to(device=device, dtype=dtype) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    return SAE(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], hook, int(m.group(1)),
               "resid_pre" if m.group(2) == "hook_resid_pre" else "neurons")


def _layer_module(loaded, layer: int):
    path = loaded.sites[layer].name.rsplit(".", 2)[0]
    if loaded.adapter.family == "gpt2" or path.endswith(".mlp"):
        path = path.rsplit(".", 1)[0]
    return loaded.model.get_submodule(path)


def gradients(config: GradientConfig, storage: Storage, *, progress: bool = True) -> dict:
    """Aggregated gradients per layer: {layer: {"mean": array, "mean_abs": array}} (+ files)."""
    import torch
    from tqdm.auto import tqdm

    from pipeline.models.hooks import edit_neurons
    from pipeline.core.inputs import iter_documents, iter_windows
    from pipeline.core.layers import parse_layers
    from pipeline.models.loading import load_model

    t_start = time.perf_counter()
    loaded = load_model(config.model, config.revision, storage=storage, device=config.device,
                        dtype=config.dtype)
    if not loaded.is_causal:
        raise UserError(f"model {config.model!r} is not a causal LM: the next-token loss needs one")
    sae = load_sae(config.sae, loaded.device, loaded.dtype) if config.sae else None
    if sae and sae.layer >= loaded.n_layers:
        raise UserError(f"the SAE hooks layer {sae.layer} but the model has {loaded.n_layers}")
    layers = [sae.layer] if sae else parse_layers(config.layers, loaded.n_layers)
    windows = list(iter_windows(iter_documents(config.corpus), loaded.tokenizer,
                                max_length=config.max_length, num_samples=config.num_samples))
    if not windows:
        raise UserError(f"corpus {config.corpus!r} gives no window of {config.max_length} tokens")
    dims = {l: (sae.w_enc.shape[1] if sae else loaded.widths[l]) for l in layers}
    sums = {l: np.zeros((2, dims[l])) for l in layers}
    positions = 0
    captured: dict[int, object] = {}

    def neuron_edit(layer):
        def edit(x):
            if sae is not None:
                f = sae.encode(x)
                f.retain_grad()
                captured[layer] = f
                x_hat = sae.decode(f)
                return x_hat + (x - x_hat).detach()
            x.retain_grad()
            captured[layer] = x
            return x
        return edit

    handles = []
    if sae is not None and sae.site == "resid_pre":
        def resid_hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            x_new = neuron_edit(sae.layer)(x)
            if args:
                return (x_new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x_new}
        handles.append(_layer_module(loaded, sae.layer).register_forward_pre_hook(
            resid_hook, with_kwargs=True))
        edits = {}
    else:
        edits = {l: neuron_edit(l) for l in layers}
    t0 = time.perf_counter()
    try:
        with torch.enable_grad(), edit_neurons(loaded.sites, edits):
            for s in tqdm(range(0, len(windows), config.batch_size), disable=not progress,
                          desc="gradients"):
                ids = torch.tensor(windows[s:s + config.batch_size], device=loaded.device)
                captured.clear()
                logits = loaded.model(input_ids=ids).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
                loss.backward()
                for l in layers:
                    g = captured[l].grad[:, :-1].reshape(-1, dims[l]).double()  # positions with a target
                    sums[l] += [g.sum(0).cpu().numpy(), g.abs().sum(0).cpu().numpy()]
                positions += ids[:, :-1].numel()
                loaded.model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    seconds = time.perf_counter() - t0
    results = {}
    for l in layers:
        mean, mean_abs = sums[l] / positions
        if config.normalize_gradients:
            mean = mean * dims[l] / max(np.abs(mean).sum(), 1e-30)
            mean_abs = mean_abs * dims[l] / max(mean_abs.sum(), 1e-30)
        results[l] = {"mean": mean, "mean_abs": mean_abs}
    _save(config, storage, loaded, sae, results, dims, positions,
          {"load_and_prepare_s": t0 - t_start, "gradients_s": seconds})
    return results


def _modes(config: GradientConfig) -> list[str]:
    return ["mean", "mean_abs"] if config.aggregation_mode == "both" else [config.aggregation_mode]


def _save(config, storage, loaded, sae, results, dims, positions, timings) -> Path:
    out = storage.reports(config.output_name)
    out.mkdir(parents=True, exist_ok=True)
    kind = "sae_feature" if sae else "neuron"
    consolidated, stats, rows = {}, {}, []
    for l, r in results.items():
        for mode in _modes(config):
            with atomic_path(out / f"layer_{l}_{mode}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, r[mode])
            consolidated[f"layer_{l}_{mode}"] = r[mode]
            stats[f"layer_{l}_{mode}"] = {"mean": float(r[mode].mean()), "std": float(r[mode].std()),
                                          "max": float(r[mode].max()),
                                          "sum_abs": float(np.abs(r[mode]).sum())}
        rows.append(pl.DataFrame({
            "kind": [kind] * dims[l], "layer": np.full(dims[l], l, np.int32),
            "index": np.arange(dims[l], dtype=np.int64),
            "neuron_id": (loaded.layer_offsets[l] + np.arange(dims[l])) if not sae
            else np.full(dims[l], -1),
            "grad_mean": r["mean"], "grad_mean_abs": r["mean_abs"]}))
    with atomic_path(out / "consolidated_results.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **consolidated)
    write_json(out / "metadata.json", {
        "config": to_dict(config), "kind": kind, "sae_hook": sae.hook_name if sae else None,
        "dimensions": {str(l): d for l, d in dims.items()}, "positions": positions,
        "layer_statistics": stats, "timings": timings, "model_revision": loaded.revision})
    write_json(out / "timing.json", timings)
    tables.write_part(storage, "neuron_gradients", config.output_name,
                      pl.concat(rows).select(tables.schema("neuron_gradients").names).to_arrow())
    plot_gradients(results, out, _modes(config), kind)
    return out


def load_gradient_results(directory: str | Path) -> dict:
    """Saved results: {"metadata": dict, "arrays": {"layer_L_mode": ndarray}}."""
    directory = Path(directory)
    with np.load(directory / "consolidated_results.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return {"metadata": json.loads((directory / "metadata.json").read_text()), "arrays": arrays}


def plot_gradients(results: dict, out: Path, modes: list[str], kind: str) -> list[Path]:
    import matplotlib.pyplot as plt

    from pipeline.report.plots import save_png

    paths = []
    for l, r in results.items():
        fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.6 * len(modes)), squeeze=False)
        for row, mode in enumerate(modes):
            axes[row, 0].hist(r[mode], bins=60, color="#3b6ea5")
            axes[row, 0].set(title=f"layer {l}: {mode} dL/d{kind}", xlabel=mode, ylabel="count",
                             yscale="log")
            axes[row, 1].scatter(np.arange(len(r[mode])), r[mode], s=3)
            axes[row, 1].set(title=f"layer {l}: {mode} per {kind}", xlabel=f"{kind} index",
                             ylabel=mode)
        fig.tight_layout()
        paths.append(save_png(fig, out / f"layer_{l}_gradients.png"))
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4), squeeze=False)
    for k, mode in enumerate(modes):
        ax = axes[0, k]
        ax.boxplot([results[l][mode] for l in results], showfliers=False)
        ax.set_xticks(range(1, len(results) + 1), [str(l) for l in results])
        ax.set(title=f"{mode} gradient per layer", xlabel="layer", ylabel=mode)
    fig.tight_layout()
    paths.append(save_png(fig, out / "combined_gradients.png"))
    return paths


def register(sub) -> None:
    from pipeline.cli import add_stage_parser

    parser = add_stage_parser(
        sub, "gradients", "Loss-gradient importance of neurons (or of SAE features).",
        "  nwh gradients --model zoo-s0 --layers 0-3 --aggregation-mode both\n"
        "  nwh gradients --model zoo-s0 --sae ./sae-l2 --normalize-gradients\n"
        "  nwh sql \"select layer, index, grad_mean_abs from neuron_gradients order by 3 desc limit 10\"\n",
        progress=True,
    )
    add_arguments(parser, GradientConfig)
    parser.set_defaults(handler=_cli)


def _cli(args) -> int:
    from pipeline.cli import echo

    config = from_args(GradientConfig, args)
    storage = Storage(args.storage)
    results = gradients(config, storage, progress=not args.quiet)
    for l, r in results.items():
        top = np.argsort(-r["mean_abs"])[:5].tolist()
        echo(f"layer {l}: mean |dL/da| {r['mean_abs'].mean():.3g}; top by mean_abs {top}")
    echo(f"results in {storage.reports(config.output_name)}")
    return 0
