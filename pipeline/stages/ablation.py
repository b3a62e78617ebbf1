"""Ablation of neuron subsets during generation and on held-out text, against random controls.

    nwh ablate --run demo-corpus --subsets degree_t0.5_r0.01 pagerank_t0.5_r0.01 \\
        --prompts examples/prompts.csv --controls 5
    nwh ablate --run demo-corpus --subset-files my_subset.npy --mode mean

For every subset (and the baseline `none`): generation from the prompts CSV with the seeds of
extraction (so `none` reproduces an extraction's text exactly), written to the
`ablation_generations` table and the reference CSV `prompt,sample_index,generated_text,
perturbation_subset`; and, on held-out windows, the change in mean loss, KL(baseline ||
ablated) of the next-token distributions and top-1 agreement with the baseline, for the
subset and for --controls random subsets with the same number of neurons per layer.
Zero ablation (the reference) or mean ablation (the neuron's mean from neuron_stats), applied
at the neuron site through pipeline.models.hooks.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.core import tables
from pipeline.core.config import add_arguments, from_args, opt
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, atomic_path

log = logging.getLogger(__name__)

MODES = ("zero", "mean")


@dataclass
class AblationConfig:
    run: str = opt(help="the extraction run whose model, neurons and subsets are used")
    subsets: list[str] = opt([], help="names of subsets stored for the run (nwh subset)")
    subset_files: list[str] = opt([], help=".npy files of global neuron ids (reference format)")
    prompts: str | None = opt(None, help="prompts CSV (default: the run's own prompts, if any)")
    mode: str = opt("zero", help="zero (the reference) or mean ablation", choices=MODES)
    seed: int = opt(42, help="sampling seed (as in extraction)")
    temperature: float = opt(0.8, help="sampling temperature; 0 = greedy")
    top_k: int = opt(0, help="top-k filter of sampling; 0 = none")
    corpus: str = opt("stdlib:heldout", help="held-out corpus of the loss / KL / top-1 effects")
    num_samples: int = opt(32, help="held-out windows")
    max_length: int = opt(64, help="tokens per held-out window")
    batch_size: int = opt(8, help="windows per forward pass")
    controls: int = opt(5, help="random subsets with the same per-layer counts, per subset")
    control_seed: int = opt(0, help="seed of the control subsets")
    model: str | None = opt(None, help="model to load instead of the run's")
    revision: str | None = opt(None, help="revision with --model")
    device: str = opt("auto", help="auto, cpu, cuda")
    dtype: str = opt("auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, float16, bfloat16")
    out_dir: str | None = opt(None, help="folder of the reference CSVs (default storage/reports/<run>/ablation)")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"--mode {self.mode!r} is unknown: use zero or mean")
        if self.controls < 0 or self.num_samples < 1 or self.max_length < 2 or self.batch_size < 1:
            raise UserError("--controls must be >= 0, --num-samples and --batch-size >= 1, "
                            "--max-length >= 2")
        if self.temperature < 0 or self.top_k < 0:
            raise UserError("--temperature and --top-k must be >= 0")


def neuron_locations(ids: np.ndarray, offsets: list[int], widths: list[int]) -> dict[int, np.ndarray]:
    """Global neuron ids -> {layer: sorted indices within the layer}; unknown ids are refused."""
    ids = np.asarray(ids, dtype=np.int64)
    total = offsets[-1] + widths[-1]
    bad = ids[(ids < 0) | (ids >= total)]
    if len(bad):
        raise UserError(f"the subset names neuron ids {bad[:5].tolist()} that the model does not "
                        f"have (ids 0-{total - 1}): check that it was made for this model")
    layer = np.searchsorted(np.asarray(offsets), ids, side="right") - 1
    return {int(l): np.sort(ids[layer == l] - offsets[l]) for l in np.unique(layer)}


def control_subsets(locations: dict[int, np.ndarray], widths: list[int], n: int,
                    seed: int) -> list[dict[int, np.ndarray]]:
    """n random subsets with exactly the per-layer counts of `locations`."""
    rng = np.random.default_rng(seed)
    return [{l: np.sort(rng.choice(widths[l], len(idx), replace=False)) for l, idx in
             locations.items()} for _ in range(n)]


def _load_subsets(config: AblationConfig, storage: Storage) -> dict[str, np.ndarray]:
    from pipeline.stages.subsets import read_subset

    out = {name: read_subset(storage, config.run, name) for name in config.subsets}
    for f in config.subset_files:
        path = Path(f)
        if not path.exists():
            raise UserError(f"subset file {f!r} does not exist")
        try:
            out[path.stem] = np.load(path, allow_pickle=False).astype(np.int64).ravel()
        except ValueError as e:
            raise UserError(f"subset file {f!r} is not a NumPy array of neuron ids ({e})") from None
    return out


def ablate(config: AblationConfig, storage: Storage, *, progress: bool = True) -> dict[str, pl.DataFrame]:
    import torch
    from tqdm.auto import tqdm

    from pipeline.models.hooks import ablate_neurons
    from pipeline.core.inputs import iter_documents, iter_windows, read_prompts
    from pipeline.models.loading import load_model

    manifest = storage.finished_run(config.run)
    subsets = _load_subsets(config, storage)
    prompts_path = config.prompts or manifest["config"].get("prompts")
    prompts = read_prompts(prompts_path) if prompts_path else None
    model_name = config.model or manifest["model"]["name"]
    revision = config.revision if config.model else manifest["model"].get("revision")
    loaded = load_model(model_name, revision, storage=storage, device=config.device, dtype=config.dtype,
                        for_generation=True)
    if loaded.widths != manifest["model"]["widths"]:
        raise UserError(f"model {model_name!r} has layer widths {loaded.widths}, not those of run "
                        f"{config.run!r}: pass the run's model")
    offsets, widths = loaded.layer_offsets, loaded.widths
    locations = {name: neuron_locations(ids, offsets, widths) for name, ids in subsets.items()}
    means = None
    if config.mode == "mean":
        stats = tables.read_partition(storage, "neuron_stats", config.run)
        mean = stats["sum"].to_numpy() / stats["count"].to_numpy()
        layer = stats["layer"].to_numpy()
        neuron = stats["neuron"].to_numpy()
        means = {l: torch.zeros(widths[l]) for l in set(layer.tolist())}
        for l, n, m in zip(layer, neuron, mean):
            means[int(l)][int(n)] = float(m)

    def context(loc: dict[int, np.ndarray]):
        idx = {l: torch.as_tensor(v) for l, v in loc.items()}
        values = None
        if means is not None:
            missing = [l for l in idx if l not in means]
            if missing:
                raise UserError(f"mean ablation needs neuron_stats of layers {missing}: "
                                "the run did not record them")
            values = {l: means[l][idx[l]] for l in idx}
        return ablate_neurons(loaded.sites, idx, values)

    out: dict[str, pl.DataFrame] = {}
    # -- generation
    if prompts is not None:
        from pipeline.models.generation import generate, prompt_generator

        rows = []
        out_dir = Path(config.out_dir) if config.out_dir else storage.reports(config.run) / "ablation"
        for name, loc in [("none", {})] + list(locations.items()):
            texts = []
            with torch.inference_mode(), context(loc):
                for i, p in enumerate(prompts):
                    ids = loaded.tokenizer(p.text)["input_ids"]
                    seqs = generate(loaded.model, ids, new_tokens=p.new_tokens,
                                    num_samples=p.num_samples, temperature=config.temperature,
                                    top_k=config.top_k, generator=prompt_generator(config.seed, i),
                                    device=loaded.device).cpu()
                    for s, seq in enumerate(seqs.tolist()):
                        text = loaded.tokenizer.decode(seq)
                        texts.append((p.text, s, text, name))
                        rows.append({"subset": name, "prompt": i, "sample_index": s,
                                     "generated_text": text, "token_ids": seq})
            path = out_dir / f"{name}_generations.csv"
            with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["prompt", "sample_index", "generated_text", "perturbation_subset"])
                w.writerows(texts)
        out["ablation_generations"] = pl.DataFrame(rows).with_columns(
            pl.lit(config.mode).alias("mode"))
        tables.write_part(storage, "ablation_generations", config.run,
                          out["ablation_generations"].select(
                              tables.schema("ablation_generations").names).to_arrow(),
                          part=config.mode)

    # -- effects on held-out text, against controls
    variants = []  # (subset, kind, control index, locations)
    for name, loc in locations.items():
        variants.append((name, "subset", -1, loc))
        for c, ctrl in enumerate(control_subsets(loc, widths, config.controls,
                                                 config.control_seed + 7919 * len(variants))):
            variants.append((name, "control", c, ctrl))
    sums = {i: np.zeros(4) for i in range(len(variants))}  # loss, kl, top1 agree, base loss
    tokens = 0
    docs = iter_documents(config.corpus)
    windows = list(iter_windows(docs, loaded.tokenizer, max_length=config.max_length,
                                num_samples=config.num_samples))
    if not windows:
        raise UserError(f"corpus {config.corpus!r} gives no window of {config.max_length} tokens")
    bar = tqdm(total=len(windows) * len(variants), disable=not progress, desc="ablation effects")
    with torch.inference_mode():
        for s in range(0, len(windows), config.batch_size):
            ids = torch.tensor(windows[s:s + config.batch_size], device=loaded.device)
            targets = ids[:, 1:]
            base = torch.log_softmax(loaded.model(input_ids=ids).logits[:, :-1].float(), -1)
            base_nll = -base.gather(-1, targets[..., None])[..., 0]
            base_top = base.argmax(-1)
            n = targets.numel()
            tokens += n
            for v, (_, _, _, loc) in enumerate(variants):
                with context(loc):
                    abl = torch.log_softmax(loaded.model(input_ids=ids).logits[:, :-1].float(), -1)
                nll = -abl.gather(-1, targets[..., None])[..., 0]
                kl = (base.exp() * (base - abl)).sum(-1)
                sums[v] += [float(nll.sum()), float(kl.sum()),
                            float((abl.argmax(-1) == base_top).sum()), float(base_nll.sum())]
                bar.update(len(ids))
    bar.close()
    effects = pl.DataFrame([{
        "subset": name, "kind": kind, "control_index": c, "mode": config.mode,
        "size": int(sum(len(x) for x in loc.values())),
        "layers": ",".join(str(l) for l in sorted(loc)),
        "loss": sums[v][0] / tokens, "baseline_loss": sums[v][3] / tokens,
        "delta_loss": (sums[v][0] - sums[v][3]) / tokens, "kl": sums[v][1] / tokens,
        "top1_agreement": sums[v][2] / tokens, "tokens": tokens,
    } for v, (name, kind, c, loc) in enumerate(variants)]) if variants else None
    if effects is not None:
        tables.write_part(storage, "ablation_effects", config.run,
                          effects.select(tables.schema("ablation_effects").names).to_arrow(),
                          part=config.mode)
        out["ablation_effects"] = effects
        out["summary"] = summarize(effects)
        plot_effects(out["summary"], storage.reports(config.run) / f"ablation_{config.mode}.png")
    return out


def summarize(effects: pl.DataFrame) -> pl.DataFrame:
    """Per subset: its effects, the controls' mean and std, and where it stands among them."""
    rows = []
    for name in effects.filter(pl.col("kind") == "subset")["subset"].to_list():
        sub = effects.filter((pl.col("subset") == name) & (pl.col("kind") == "subset")).row(0, named=True)
        ctrl = effects.filter((pl.col("subset") == name) & (pl.col("kind") == "control"))
        row = {"subset": name, "size": sub["size"]}
        for metric in ("delta_loss", "kl", "top1_agreement"):
            values = ctrl[metric].to_numpy()
            row[metric] = sub[metric]
            row[f"{metric}_control_mean"] = float(values.mean()) if len(values) else None
            row[f"{metric}_control_std"] = float(values.std()) if len(values) else None
        values = ctrl["kl"].to_numpy()
        # share of controls at least as disruptive (KL), with the +1 of an empirical p-value
        row["kl_percentile"] = float((values < sub["kl"]).mean()) if len(values) else None
        row["kl_p_value"] = float(((values >= sub["kl"]).sum() + 1) / (len(values) + 1))
        rows.append(row)
    return pl.DataFrame(rows)


def plot_effects(summary: pl.DataFrame, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from pipeline.report.plots import save_png

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = [s.split("_t")[0] for s in summary["subset"]]
    for ax, metric, label in ((axes[0], "kl", "KL(baseline || ablated), nats/token"),
                              (axes[1], "delta_loss", "change in loss, nats/token")):
        for method in sorted(set(methods)):
            sub = summary.filter(pl.Series(methods) == method).sort("size")
            x = sub["size"].to_numpy()
            ax.plot(x, sub[metric].to_numpy(), marker="o", label=method)
            mean = sub[f"{metric}_control_mean"].to_numpy().astype(float)
            std = sub[f"{metric}_control_std"].to_numpy().astype(float)
            ax.fill_between(x, mean - std, mean + std, alpha=0.15)
            ax.plot(x, mean, ls="--", lw=1, color="grey")
        ax.set(xlabel="neurons ablated", ylabel=label, title=f"Effect vs subset size ({label.split(',')[0]})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Subsets (lines) vs random controls of the same per-layer sizes (dashed, ±1 sd)")
    fig.tight_layout()
    return save_png(fig, path)


def register(sub) -> None:
    from pipeline.cli import add_stage_parser

    parser = add_stage_parser(
        sub, "ablate", "Ablate neuron subsets in generation and on held-out text, vs controls.",
        "  nwh ablate --run demo-corpus --subsets degree_t0.5_r0.01 --prompts examples/prompts.csv\n"
        "  nwh ablate --run demo-corpus --subset-files ids.npy --mode mean --controls 10\n",
        progress=True,
    )
    add_arguments(parser, AblationConfig)
    parser.set_defaults(handler=_cli)


def _cli(args) -> int:
    from pipeline.cli import echo

    config = from_args(AblationConfig, args)
    if not config.subsets and not config.subset_files:
        raise UserError("give --subsets NAME... or --subset-files FILE.npy...")
    out = ablate(config, Storage(args.storage), progress=not args.quiet)
    with pl.Config(tbl_rows=50, tbl_cols=-1, tbl_width_chars=200, fmt_str_lengths=40):
        if "summary" in out:
            echo(out["summary"])
    return 0

