"""Stage `ablate`: ablation of neuron subsets in generation and on held-out text, against random
controls.

    nwh ablate --run demo-corpus --subsets degree_t0.5_r0.01 pagerank_t0.5_r0.01 \\
        --prompts examples/prompts.csv --controls 5
    nwh ablate --run demo-corpus --subset-files my_subset.npy --mode mean

For every subset (and the baseline `none`): generation from the prompts CSV with the seeds of
extraction (so `none` reproduces an extraction's text exactly), written to the
`ablation_generations` table and the reference CSV `prompt,sample_index,generated_text,
perturbation_subset`; and, on held-out windows, the change in mean loss, KL(baseline ||
ablated) of the next-token distributions and top-1 agreement with the baseline, for the
subset and for --controls random subsets with the same number of neurons per layer
(`ablation_effects`, one row per subset or control with the neuron ids it ablated).
Encoders (masked LMs) cannot generate, so --prompts is refused for them; their held-out loss
is the masked-LM loss: in each window MASK_FRACTION of the non-special tokens (at least one),
drawn with --seed, are replaced by the tokenizer's mask token, and loss, KL and top-1
agreement are taken at those positions. Both losses need the checkpoint's own LM / masked-LM
head: a folder saved without it (a base model) is refused instead of scored through a random
head.
Zero ablation (the reference) or mean ablation (the neuron's mean over the run, from
neuron_stats), applied at the neuron site through pipeline.models.hooks.
Finished work is kept: runs/<run>/stages/ablate-<mode>.json records the config hash.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.core import tables
from pipeline.core.coact import read_subset
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
from pipeline.core.inputs import corpus_windows, input_fingerprint, read_prompts
from pipeline.core.storage import Storage, atomic_path

log = logging.getLogger(__name__)

MODES = ("zero", "mean")
MASK_FRACTION = 0.15  # BERT's share of masked tokens
METRICS = ("delta_loss", "kl", "top1_agreement")


@dataclass(kw_only=True)
class AblationConfig(ModelOptions, WindowOptions, Progress):
    run: str = opt(help="the extraction run whose model, neurons and subsets are used")
    subsets: list[str] = opt([], help="names of subsets stored for the run (nwh subset)")
    subset_files: list[str] = opt([], help=".npy files of global neuron ids (reference format)")
    prompts: str | None = opt(None, help="prompts CSV (default: the run's own prompts, if any)")
    mode: str = opt("zero", help="zero (the reference) or mean ablation", choices=MODES)
    seed: int = opt(42, help="sampling seed (as in extraction); for an encoder, the seed of "
                    "the masked positions of the held-out windows")
    temperature: float = opt(0.8, help="sampling temperature; 0 = greedy")
    top_k: int = opt(0, help="top-k filter of sampling; 0 = none")
    controls: int = opt(5, help="random subsets with the same per-layer counts, per subset")
    control_seed: int = opt(0, help="seed of the control subsets")
    out_dir: str | None = opt(None, help="folder of the reference CSVs (default "
                              "storage/reports/<run>/ablation)")
    overwrite: bool = opt(False, help="redo a finished ablation of this mode", hash=False)
    # the model and the held-out windows (ModelOptions / WindowOptions, other defaults)
    model: str | None = opt(None, help="model to load instead of the run's (same layer widths)")
    revision: str | None = opt(None, help="revision of --model")
    corpus: str = opt("stdlib:heldout", help="held-out corpus of the loss / KL / top-1 effects: "
                      "stdlib:heldout, a .txt/.jsonl/.parquet/.csv file or a datasets hub name")
    num_samples: int = opt(32, help="held-out windows")
    max_length: int = opt(64, help="tokens per held-out window")

    min_window = 2  # the next-token loss needs 2 tokens

    def __post_init__(self) -> None:
        if not self.subsets and not self.subset_files:
            raise UserError("no subset to ablate: give --subsets NAME... (made by `nwh subset`) "
                            "or --subset-files FILE.npy...")
        if self.mode not in MODES:
            raise UserError(f"--mode {self.mode!r} is unknown: use zero or mean")
        if self.revision and not self.model:
            raise UserError("--revision applies to --model: the run's own model is loaded at "
                            "its revision; give --model too")
        at_least(self, 0, "controls", "temperature", "top_k")
        self.check_windows()


@dataclass
class AblationResult:
    run: str
    mode: str
    effects: pl.DataFrame          # ablation_effects rows of this run and mode
    summary: pl.DataFrame          # per subset: effects vs controls (summarize)
    generations: pl.DataFrame | None
    reused: bool                   # finished earlier with the same config


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


def _subset_file(f: str) -> np.ndarray:
    path = Path(f)
    if not path.exists():
        raise UserError(f"subset file {f!r} does not exist: check the path")
    try:
        return np.load(path, allow_pickle=False).astype(np.int64).ravel()
    except ValueError as e:
        raise UserError(f"subset file {f!r} is not a NumPy array of neuron ids ({e})") from None


def load_subsets(config: AblationConfig, storage: Storage) -> dict[str, np.ndarray]:
    """Subset name -> global neuron ids (stored subsets, then files named by their stem)."""
    out = {name: np.asarray(read_subset(storage, config.run, name), np.int64).ravel()
           for name in config.subsets}
    out.update({Path(f).stem: _subset_file(f) for f in config.subset_files})
    return out


def _result_hash(config: AblationConfig, manifest: dict, subsets: dict[str, np.ndarray],
                 prompts: str | None) -> str:
    from pipeline.models.loading import dtype_name

    return config_hash(
        config, dtype=dtype_name(config.device, config.dtype),
        run_finished=manifest.get("timings", {}).get("finished"),
        subsets={k: hashlib.sha256(v.tobytes()).hexdigest()[:16] for k, v in subsets.items()},
        prompts=[prompts, input_fingerprint(prompts)], corpus_file=input_fingerprint(config.corpus))


def run(config: AblationConfig, storage: Storage) -> AblationResult:
    manifest = storage.finished_run(config.run)
    subsets = load_subsets(config, storage)
    prompts = config.prompts or manifest["config"].get("prompts")
    key = _result_hash(config, manifest, subsets, prompts)
    marker = storage.marker(config.run, "ablate", config.mode)
    if not config.overwrite and marker.done(key):
        return stored_result(storage, config.run, config.mode)
    loaded = _load_run_model(config, manifest, storage)
    if prompts and not loaded.is_causal:
        raise UserError(f"the model of run {config.run!r} is an encoder, which cannot generate: "
                        "drop --prompts (its ablation is measured by the masked-LM loss on "
                        "held-out text)")
    loaded.require_head("the held-out " + ("next-token" if loaded.is_causal else "masked-LM")
                        + " loss")
    batches = scored_batches(config, loaded)  # every input is checked before anything is written
    locations = {name: neuron_locations(ids, loaded.layer_offsets, loaded.widths)
                 for name, ids in subsets.items()}
    values = neuron_means(storage, config.run, loaded.widths) if config.mode == "mean" else None
    generations = None
    if prompts:
        generations = generate_ablated(config, loaded, prompts, locations, values)
        _write_generations(config, storage, generations)
    else:  # no prompts this time: an earlier config's generations are not this result's
        tables.drop_partition_parts(storage, "ablation_generations", config.run, config.mode)
    effects = held_out_effects(config, loaded, variants(config, locations, loaded.widths), values,
                               batches)
    tables.write_part(storage, "ablation_effects", config.run, effects.select(
        tables.schema("ablation_effects").names).to_arrow(), part=config.mode)
    summary = summarize(effects)
    marker.write(to_dict(config), key, subsets=summary.height, rows=effects.height)
    return AblationResult(config.run, config.mode, effects, summary, generations, reused=False)


def stored_result(storage: Storage, run_id: str, mode: str) -> AblationResult:
    """The result of a finished ablation, read back from its tables."""
    def part(table: str) -> pl.DataFrame:
        return pl.from_arrow(tables.read_partition(storage, table, run_id)).filter(
            pl.col("mode") == mode)

    effects, generations = part("ablation_effects"), part("ablation_generations")
    return AblationResult(run_id, mode, effects, summarize(effects),
                          generations if generations.height else None, reused=True)


def _load_run_model(config: AblationConfig, manifest: dict, storage: Storage):
    from pipeline.models.loading import load_model

    name = config.model or manifest["model"]["name"]
    revision = config.revision if config.model else manifest["model"].get("revision")
    loaded = load_model(name, revision, storage=storage, for_generation=True,
                        **config.model_kwargs())
    loaded.require_dense("ablation")
    if loaded.widths != manifest["model"]["widths"]:
        raise UserError(f"model {name!r} has layer widths {loaded.widths}, not those of run "
                        f"{config.run!r}: pass the run's model")
    return loaded


def neuron_means(storage: Storage, run_id: str, widths: list[int]) -> dict[int, np.ndarray]:
    """Mean activation of every recorded neuron over the run: {layer: [width]} (sum / count)."""
    stats = tables.read_partition(storage, "neuron_stats", run_id)
    layer, neuron = stats["layer"].to_numpy(), stats["neuron"].to_numpy()
    mean = stats["sum"].to_numpy() / stats["count"].to_numpy()
    means = {}
    for l in np.unique(layer).tolist():
        sel = layer == l
        means[l] = np.zeros(widths[l])
        means[l][neuron[sel]] = mean[sel]
    return means


def ablation_context(loaded, locations: dict[int, np.ndarray],
                     values: dict[int, np.ndarray] | None):
    """Hooks that zero the located neurons, or set them to `values` (mean ablation)."""
    import torch

    from pipeline.models.hooks import ablate_neurons

    idx = {l: torch.as_tensor(v, dtype=torch.long) for l, v in locations.items()}
    fixed = None
    if values is not None:
        missing = sorted(set(idx) - set(values))
        if missing:
            raise UserError(f"mean ablation needs neuron_stats of layers {missing}: the run did "
                            "not record them; re-extract with those --layers or use --mode zero")
        fixed = {l: torch.as_tensor(values[l][v], dtype=torch.float32) for l, v in locations.items()}
    return ablate_neurons(loaded.sites, idx, fixed)


def generate_ablated(config: AblationConfig, loaded, prompts_path: str,
                     locations: dict[str, dict[int, np.ndarray]],
                     values: dict[int, np.ndarray] | None) -> pl.DataFrame:
    """Generations of every prompt for the baseline `none` and every subset (one row each)."""
    import torch

    from pipeline.models.generation import check_positions, generate, prompt_generator

    prompts = read_prompts(prompts_path)
    encoded = [loaded.tokenizer(p.text)["input_ids"] for p in prompts]
    for i, (p, ids) in enumerate(zip(prompts, encoded)):
        check_positions(loaded.model, len(ids) + p.new_tokens,
                        f"prompt {i} with its number_of_new_tokens is too long; shorten it")
    rows = []
    for name, loc in [("none", {})] + list(locations.items()):
        with torch.inference_mode(), ablation_context(loaded, loc, values):
            for i, p in enumerate(prompts):
                seqs = generate(loaded.model, encoded[i],
                                new_tokens=p.new_tokens, num_samples=p.num_samples,
                                temperature=config.temperature, top_k=config.top_k,
                                generator=prompt_generator(config.seed, i), device=loaded.device)
                for s, seq in enumerate(seqs.cpu().tolist()):
                    rows.append({"subset": name, "mode": config.mode, "prompt": i,
                                 "sample_index": s, "prompt_text": p.text,
                                 "generated_text": loaded.tokenizer.decode(seq), "token_ids": seq})
    return pl.DataFrame(rows)


def _write_generations(config: AblationConfig, storage: Storage, gen: pl.DataFrame) -> None:
    """The table part of this mode and the reference CSV of every subset."""
    out_dir = Path(config.out_dir) if config.out_dir else storage.reports(config.run) / "ablation"
    for (name,), part in gen.group_by("subset", maintain_order=True):
        with atomic_path(out_dir / f"{name}_generations.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prompt", "sample_index", "generated_text", "perturbation_subset"])
            w.writerows(part.select("prompt_text", "sample_index", "generated_text",
                                    "subset").iter_rows())
    tables.write_part(storage, "ablation_generations", config.run, gen.select(
        tables.schema("ablation_generations").names).to_arrow(), part=config.mode)


def variants(config: AblationConfig, locations: dict[str, dict[int, np.ndarray]],
             widths: list[int]) -> list[tuple[str, str, int, dict[int, np.ndarray]]]:
    """(subset, kind, control index, locations) of every subset and its controls."""
    out = []
    for name, loc in locations.items():
        out.append((name, "subset", -1, loc))
        seed = config.control_seed + 7919 * len(out)
        out += [(name, "control", c, ctrl) for c, ctrl in
                enumerate(control_subsets(loc, widths, config.controls, seed))]
    return out


@dataclass
class ScoredBatch:
    """One batch of held-out windows and the positions its loss is taken at."""

    inputs: object          # torch [B, T]: the ids the model reads (masked ones for an encoder)
    targets: object         # torch [M]: the ids to predict at the scored positions
    where: object | None    # torch bool [B, T]: the masked positions; None: every position
                            # with a next token (causal)


def mlm_masks(windows: list[list[int]], special_ids, seed: int) -> np.ndarray:
    """[windows, length] bool: the masked positions of each window, MASK_FRACTION of its
    non-special tokens (at least one, none if it has none), drawn without replacement by a
    generator seeded with (seed, window index), so a window's mask is independent of the
    batch size and of the other windows."""
    ids = np.asarray(windows, dtype=np.int64)
    eligible = ~np.isin(ids, np.asarray(sorted(special_ids), dtype=np.int64))
    masks = np.zeros(ids.shape, dtype=bool)
    for w in range(len(ids)):
        positions = np.flatnonzero(eligible[w])
        if len(positions):
            rng = np.random.default_rng([seed % (1 << 63), w])
            k = max(1, round(MASK_FRACTION * len(positions)))
            masks[w, rng.choice(positions, k, replace=False)] = True
    return masks


def scored_batches(config: AblationConfig, loaded) -> list[ScoredBatch]:
    """The held-out windows in batches: next-token targets for a causal LM, masked tokens
    (mlm_masks) for an encoder; a one-line UserError for windows the model cannot score."""
    import torch

    from pipeline.models.generation import check_positions

    windows = list(corpus_windows(config, loaded.tokenizer, causal=loaded.is_causal))
    check_positions(loaded.model, len(windows[0]), "lower --max-length")
    masks = None
    if not loaded.is_causal:
        mask_id = loaded.tokenizer.mask_token_id
        if mask_id is None:
            raise UserError(f"the tokenizer of model {loaded.name!r} has no mask token, which the "
                            "masked-LM loss needs: use the checkpoint's own tokenizer")
        masks = mlm_masks(windows, loaded.tokenizer.all_special_ids, config.seed)
        if not masks.any():
            raise UserError(f"corpus {config.corpus!r} gives windows of special tokens only, so "
                            "the masked-LM loss has no token to mask: give text")
    out = []
    for s in range(0, len(windows), config.batch_size):
        ids = torch.tensor(windows[s:s + config.batch_size], device=loaded.device)
        if masks is None:
            out.append(ScoredBatch(ids, ids[:, 1:].reshape(-1), None))
            continue
        where = torch.as_tensor(masks[s:s + config.batch_size], device=loaded.device)
        out.append(ScoredBatch(ids.masked_fill(where, mask_id), ids[where], where))
    return out


def _log_probs(model, batch: ScoredBatch):
    """[M, vocab] log-probabilities at the scored positions of a batch."""
    import torch

    logits = model(input_ids=batch.inputs).logits
    logits = logits[:, :-1].reshape(-1, logits.shape[-1]) if batch.where is None \
        else logits[batch.where]
    return torch.log_softmax(logits.float(), -1)


def held_out_effects(config: AblationConfig, loaded, variant_list: list,
                     values: dict[int, np.ndarray] | None,
                     batches: list[ScoredBatch] | None = None) -> pl.DataFrame:
    """Mean loss, KL(baseline || ablated) and top-1 agreement of every variant over the
    scored positions of the held-out windows (one ablation_effects row each)."""
    import torch
    from tqdm.auto import tqdm

    batches = scored_batches(config, loaded) if batches is None else batches
    sums = np.zeros((len(variant_list), 4))  # nll, kl, top-1 agreements, baseline nll
    tokens = 0
    bar = tqdm(total=sum(len(b.inputs) for b in batches) * len(variant_list),
               disable=config.quiet, desc="ablation effects")
    with torch.inference_mode():
        for batch in batches:
            target = batch.targets[:, None]
            base = _log_probs(loaded.model, batch)
            base_nll, base_top = -base.gather(-1, target).sum(), base.argmax(-1)
            tokens += target.numel()
            for v, (_, _, _, loc) in enumerate(variant_list):
                with ablation_context(loaded, loc, values):
                    abl = _log_probs(loaded.model, batch)
                sums[v] += [float(-abl.gather(-1, target).sum()),
                            float((base.exp() * (base - abl)).sum()),
                            float((abl.argmax(-1) == base_top).sum()), float(base_nll)]
                bar.update(len(batch.inputs))
    bar.close()
    return pl.DataFrame([{
        "subset": name, "kind": kind, "control_index": c, "mode": config.mode,
        "size": int(sum(len(x) for x in loc.values())),
        "layers": ",".join(str(l) for l in sorted(loc)),
        "neuron_ids": [loaded.layer_offsets[l] + int(i) for l in sorted(loc) for i in loc[l]],
        "loss": sums[v, 0] / tokens, "baseline_loss": sums[v, 3] / tokens,
        "delta_loss": (sums[v, 0] - sums[v, 3]) / tokens, "kl": sums[v, 1] / tokens,
        "top1_agreement": sums[v, 2] / tokens, "tokens": tokens,
    } for v, (name, kind, c, loc) in enumerate(variant_list)])


def summarize(effects: pl.DataFrame) -> pl.DataFrame:
    """Per subset: its effects, the controls' mean and std, and where it stands among them:
    kl_percentile = share of controls with a smaller KL, kl_p_value = (controls with KL at
    least the subset's + 1) / (controls + 1), the empirical p-value."""
    rows = []
    for sub in effects.filter(pl.col("kind") == "subset").iter_rows(named=True):
        ctrl = effects.filter((pl.col("subset") == sub["subset"]) & (pl.col("kind") == "control"))
        row = {"subset": sub["subset"], "size": sub["size"], "controls": ctrl.height}
        for metric in METRICS:
            values = ctrl[metric].to_numpy()
            row[metric] = sub[metric]
            row[f"{metric}_control_mean"] = float(values.mean()) if len(values) else None
            row[f"{metric}_control_std"] = float(values.std()) if len(values) else None
        kl = ctrl["kl"].to_numpy()
        row["kl_percentile"] = float((kl < sub["kl"]).mean()) if len(kl) else None
        row["kl_p_value"] = float(((kl >= sub["kl"]).sum() + 1) / (len(kl) + 1))
        rows.append(row)
    return pl.DataFrame(rows)


def show(result: AblationResult) -> str:
    head = (f"ablation ({result.mode}) of run {result.run}: finished earlier with this config "
            "(--overwrite redoes it)" if result.reused else
            f"ablation ({result.mode}) of run {result.run}")
    with pl.Config(tbl_rows=50, tbl_cols=-1, tbl_width_chars=200, fmt_str_lengths=40):
        return f"{head}\n{result.summary}"


STAGES = [Stage(
    "ablate", "Ablate neuron subsets in generation and on held-out text, vs controls.",
    "  nwh ablate --run demo-corpus --subsets degree_t0.5_r0.01 --prompts examples/prompts.csv\n"
    "  nwh ablate --run demo-corpus --subset-files ids.npy --mode mean --controls 10\n"
    "  nwh sql \"select subset, kind, kl, delta_loss from ablation_effects order by kl desc\"\n",
    AblationConfig, run, show, figures="pipeline.report.ablation:draw")]
