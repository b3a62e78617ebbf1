"""Ablation of neuron subsets, in generation and on held-out text, against random controls.

    nwh ablate --run demo-corpus --subsets degree_t0.5_r0.01 pagerank_t0.5_r0.01 \\
        --prompts examples/prompts.csv --controls 5
    nwh ablate --run demo-corpus --subset-files ids.npy --ablation zero mean --controls 20

A subset is a set of global neuron ids (layer-major: layer_offset + index), named from the
run's `subsets` table (`--subsets`, made by `nwh subset`) or read from reference .npy files
(`--subset-files`). Each is ablated at the neuron site (the input of the MLP output
projection) through pipeline.hooks: zero ablation (the reference) sets the neurons to 0, mean
ablation to their mean over the run (sum / count of neuron_stats).

Generation: every prompt of the prompts CSV, for the baseline `none` and for each subset,
sampled with the per-prompt generators of extraction, so `none` reproduces a prompts run's
text exactly for the same seed, temperature and top-k. Written to `ablation_generations` and,
as in the reference, one CSV per subset (`prompt,sample_index,generated_text,
perturbation_subset`) under storage/reports/<run>/ablation/<ablation>/.

Effects: on held-out windows, per subset and per random control (same number of neurons in
each layer, drawn uniformly from the whole layer): the change in mean next-token loss, the mean
KL(baseline || ablated) of the next-token distributions and the top-1 agreement with the
baseline. The baseline's log-probabilities are computed once per batch and every variant is
compared against them, batch by batch, so memory holds one batch of logits per variant at a
time. Tables `ablation_effects` and `ablation_summary` (the subset against its controls: mean,
std, z, rank, percentile, empirical p-value), and storage/reports/<run>/ablation_<ablation>.png.
"""

from __future__ import annotations

import csv
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl

from pipeline import tables
from pipeline.config import add_arguments, from_args, opt, to_dict
from pipeline.errors import UserError
from pipeline.storage import DEFAULT_ROOT, Storage, atomic_path, slug, validate_run_id, write_json

log = logging.getLogger(__name__)

ABLATIONS = ("zero", "mean")
METRICS = ("delta_loss", "kl", "top1_agreement")
# the direction in which a metric means "more disruptive": +1 larger, -1 smaller
_DISRUPTIVE = {"delta_loss": 1.0, "kl": 1.0, "top1_agreement": -1.0}
_EXTRACT_SAMPLING = {"seed": 42, "temperature": 0.8, "top_k": 0}  # ExtractConfig's defaults


@dataclass
class AblationConfig:
    run: str = opt(help="the extraction run whose model, neurons, neuron_stats and subsets are used")
    subsets: list[str] = opt([], help="subset names of the run's subsets table (nwh subset); "
                             "'none' (the baseline) is always included")
    subset_files: list[str] = opt([], help=".npy files of global neuron ids (the reference format)")
    ablation: list[str] = opt(["zero"], help="zero (the reference) and/or mean ablation",
                              choices=ABLATIONS)
    prompts: str | None = opt(None, help="prompts CSV (prompts,number_of_new_tokens,num_samples); "
                              "default the run's own prompts, if it is a prompts run")
    seed: int | None = opt(None, help="sampling seed (default the run's, else 42)")
    temperature: float | None = opt(None, help="sampling temperature, 0 = greedy (default the "
                                    "run's, else 0.8)")
    top_k: int | None = opt(None, help="top-k filter, 0 = none (default the run's, else 0)")
    corpus: str = opt("stdlib:heldout", help="held-out corpus of the loss / KL / top-1 effects")
    num_samples: int = opt(32, help="held-out windows; 0 = generation only")
    max_length: int = opt(64, help="tokens per held-out window")
    batch_size: int = opt(8, help="windows per forward pass")
    controls: int = opt(10, help="random subsets per subset, with its number of neurons per layer")
    control_seed: int = opt(0, help="seed of the controls (control c of two subsets with the "
                            "same per-layer counts is the same neurons)")
    model: str | None = opt(None, help="model to load instead of the run's (same layer widths)")
    revision: str | None = opt(None, help="revision of --model")
    device: str = opt("auto", help="auto, cpu, cuda or cuda:N")
    dtype: str | None = opt(None, help="float32, float16, bfloat16 or auto (default the run's)")
    out_dir: str | None = opt(None, help="folder of the reference CSVs (default "
                              "storage/reports/<run>/ablation)")

    def __post_init__(self) -> None:
        validate_run_id(self.run)
        if isinstance(self.ablation, str):
            self.ablation = [self.ablation]
        unknown = [a for a in self.ablation if a not in ABLATIONS]
        if unknown or not self.ablation:
            raise UserError(f"--ablation {' '.join(map(str, unknown)) or '(empty)'} is unknown: "
                            "use zero and/or mean")
        self.ablation = list(dict.fromkeys(self.ablation))
        if self.controls < 0:
            raise UserError(f"--controls must be >= 0, got {self.controls}")
        if self.num_samples < 0:
            raise UserError(f"--num-samples must be >= 0 (0 = generation only), got {self.num_samples}")
        if self.max_length < 2:
            raise UserError(f"--max-length must be at least 2 (one next-token target), got {self.max_length}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.temperature is not None and self.temperature < 0:
            raise UserError("--temperature must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 0:
            raise UserError("--top-k must be >= 0 (0 = no top-k filter)")
        if self.revision and not self.model:
            raise UserError("--revision needs --model (the run's own revision is used otherwise)")


# -- subsets and neuron locations


@dataclass
class Subset:
    name: str                 # table name, or the file's stem
    label: str                # the reference CSV's perturbation_subset: the name, or the file name
    method: str               # centrality (degree, pagerank, ...), or file
    threshold: float | None
    ratio: float | None
    ids: np.ndarray           # global neuron ids, sorted, unique


_NAME = re.compile(r"(?:^|_)(?P<method>[a-z]+)_t(?P<t>[0-9.]+)_r(?P<r>[0-9.]+)$")


def _parse_name(stem: str) -> tuple[str, float | None, float | None]:
    """(method, threshold, ratio) of a name in the reference style `[prefix_]method_t0.5_r0.01`."""
    from pipeline.subsets import METHODS

    m = _NAME.search(stem)
    if m and m["method"] in METHODS:
        try:
            return m["method"], float(m["t"]), float(m["r"])
        except ValueError:
            pass
    return "file", None, None


def _ids_of(values: np.ndarray, source: str) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype.kind == "f" and np.all(np.isfinite(values)) and np.all(values == np.round(values)):
        values = values.astype(np.int64)
    if values.dtype.kind not in "iu":
        raise UserError(f"subset {source} holds {values.dtype} values, not integer neuron ids: "
                        "save a 1-D integer array (np.save)")
    ids = np.unique(values.astype(np.int64).ravel())
    if not len(ids):
        raise UserError(f"subset {source} is empty: give at least one neuron id")
    return ids


def load_subsets(storage: Storage, run: str, names: list[str], files: list[str]) -> list[Subset]:
    """Subsets by name from the run's `subsets` table (else its .npy) and from .npy files."""
    out: list[Subset] = []
    names = [n for n in names if n != "none"]  # the baseline is always run
    if names:
        table = pl.from_arrow(tables.read_partition(storage, "subsets", run))
        for name in names:
            rows = table.filter(pl.col("subset") == name)
            npy = storage.run_dir(run) / "subsets" / f"{name}.npy"
            if rows.height:
                first = rows.row(0, named=True)
                out.append(Subset(name, name, first["method"], first["threshold"], first["ratio"],
                                  _ids_of(rows["neuron_id"].to_numpy(), repr(name))))
            elif npy.exists():
                out.append(Subset(name, name, *_parse_name(name),
                                  _ids_of(np.load(npy, allow_pickle=False), repr(name))))
            else:
                known = table["subset"].unique().sort().to_list() if table.height else []
                shown = ", ".join(known[:8]) + (" ..." if len(known) > 8 else "") or "none"
                raise UserError(f"run {run!r} has no subset {name!r} (subsets: {shown}): make it "
                                f"with `nwh subset --run {run}` or pass --subset-files")
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise UserError(f"subset file {f!r} does not exist: check the path")
        try:
            values = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UserError(f"subset file {f!r} is not a NumPy .npy array of neuron ids "
                            f"({' '.join(str(e).split())[:120]}): save one with np.save") from None
        if not isinstance(values, np.ndarray):
            raise UserError(f"subset file {f!r} is an .npz archive, not one array: save the ids "
                            "with np.save")
        out.append(Subset(path.stem, path.name, *_parse_name(path.stem),
                          _ids_of(values, f"file {f!r}")))
    seen: set[str] = set()
    for s in out:
        if s.name == "none":
            raise UserError(f"subset {s.label!r} is named 'none', the baseline's name: rename it")
        if s.name in seen:
            raise UserError(f"two subsets are named {s.name!r}: give each a distinct name")
        seen.add(s.name)
    return out


def neuron_locations(ids: np.ndarray, offsets: list[int], widths: list[int], *,
                     name: str = "subset") -> dict[int, np.ndarray]:
    """Global neuron ids -> {layer: sorted indices within the layer}; unknown ids are refused."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    total = offsets[-1] + widths[-1]
    bad = ids[(ids < 0) | (ids >= total)]
    if len(bad):
        raise UserError(f"{name} names neuron ids {bad[:5].tolist()} that the model does not have "
                        f"(it has ids 0-{total - 1}, {len(widths)} layers): pass a subset made "
                        "for this model")
    layer = np.searchsorted(np.asarray(offsets), ids, side="right") - 1
    return {int(l): ids[layer == l] - offsets[l] for l in np.unique(layer)}


def control_subsets(locations: dict[int, np.ndarray], widths: list[int], n: int,
                    seed: int) -> list[dict[int, np.ndarray]]:
    """n random subsets with exactly the per-layer counts of `locations`.

    Each layer's neurons are drawn uniformly without replacement from the whole layer (the
    subset's own neurons included), so a control is what chance gives for those sizes. Control
    c depends only on (seed, c) and the counts, not on the subset's name or order.
    """
    out = []
    for c in range(n):
        rng = np.random.default_rng([seed, c])
        out.append({l: np.sort(rng.choice(widths[l], len(idx), replace=False))
                    for l, idx in sorted(locations.items())})
    return out


def layer_counts(locations: dict[int, np.ndarray]) -> str:
    return ",".join(f"{l}:{len(v)}" for l, v in sorted(locations.items()))


def neuron_means(storage: Storage, run: str) -> dict[int, np.ndarray]:
    """Mean activation of every recorded neuron (sum / count of neuron_stats), by layer."""
    stats = pl.from_arrow(tables.read_partition(storage, "neuron_stats", run)).sort("neuron_id")
    out = {}
    for (layer,), part in stats.group_by("layer", maintain_order=True):
        mean = part["sum"].to_numpy() / np.maximum(part["count"].to_numpy(), 1)
        values = np.zeros(int(part["neuron"].max()) + 1)
        values[part["neuron"].to_numpy()] = mean
        out[int(layer)] = values
    return out


def ablation_context(sites, locations: dict[int, np.ndarray],
                     means: dict[int, np.ndarray] | None = None):
    """Context manager ablating `locations` at the neuron sites: to zero, or to `means`."""
    import torch

    from pipeline.hooks import ablate_neurons

    idx = {l: torch.as_tensor(v, dtype=torch.long) for l, v in locations.items()}
    values = None
    if means is not None:
        values = {l: torch.as_tensor(means[l][v], dtype=torch.float32) for l, v in locations.items()}
    return ablate_neurons(sites, idx, values)


def _check_mean_layers(means: dict[int, np.ndarray], locations: dict[int, np.ndarray],
                       widths: list[int], run: str, name: str) -> None:
    missing = [l for l in locations if l not in means or len(means[l]) != widths[l]]
    if missing:
        raise UserError(f"mean ablation of {name} needs the means of layers {missing}, which run "
                        f"{run!r} did not record: use --ablation zero, or a run of all layers")


# -- model


def _load_run_model(config: AblationConfig, manifest: dict, storage: Storage, dtype: str):
    from pipeline.models import load_model

    model = manifest["model"]
    if config.model:
        name, revision = config.model, config.revision
    else:
        name, revision = model["name"], model.get("revision")
        if model.get("source") == "local" and model.get("path") and Path(model["path"]).is_dir():
            name = model["path"]
    try:
        loaded = load_model(name, revision, storage=storage, device=config.device, dtype=dtype,
                            for_generation=True)
    except UserError as e:
        raise UserError(f"run {config.run!r}: its model is not available: {e}") from None
    if loaded.widths != model["widths"]:
        raise UserError(f"model {name!r} has layer widths {loaded.widths}, not those of run "
                        f"{config.run!r} ({model['widths']}): pass the run's model with --model")
    if not loaded.is_causal:
        raise UserError(f"model {name!r} is not a causal LM: ablation effects are measured on "
                        "next-token predictions")
    return loaded


def _check_neuron_table(storage: Storage, run: str, offsets: list[int]) -> None:
    """The run's neurons table must place every layer where the model does."""
    neurons = pl.from_arrow(tables.read_partition(storage, "neurons", run))
    if not neurons.height:
        return
    per_layer = neurons.group_by("layer").agg(pl.col("layer_offset").first())
    for layer, offset in per_layer.iter_rows():
        if layer >= len(offsets) or offsets[layer] != offset:
            raise UserError(f"run {run!r}'s neurons table puts layer {layer} at id {offset}, the "
                            "model elsewhere: pass the run's model with --model")


# -- generation


def generate_all(loaded, prompts, encoded: list[list[int]], *, seed: int, temperature: float,
                 top_k: int) -> Iterator[tuple[int, int, list[int]]]:
    """(prompt, sample_index, token ids) of every sample, seeded per prompt as in extraction."""
    import torch

    from pipeline.generation import generate, prompt_generator

    with torch.inference_mode():
        for i, (p, ids) in enumerate(zip(prompts, encoded)):
            seqs = generate(loaded.model, ids, new_tokens=p.new_tokens, num_samples=p.num_samples,
                            temperature=temperature, top_k=top_k,
                            generator=prompt_generator(seed, i), device=loaded.device).cpu()
            for s, seq in enumerate(seqs.tolist()):
                yield i, s, seq


def _encode_prompts(loaded, prompts, path: str) -> list[list[int]]:
    encoded = [loaded.tokenizer(p.text)["input_ids"] for p in prompts]
    limit = getattr(loaded.model.config, "max_position_embeddings", None) or getattr(
        loaded.model.config, "n_positions", None)
    for i, (p, ids) in enumerate(zip(prompts, encoded)):
        if limit and len(ids) + p.new_tokens > limit:
            raise UserError(f"prompts file {path!r}: prompt {i} needs {len(ids) + p.new_tokens} "
                            f"positions but the model has {limit}: lower number_of_new_tokens")
    return encoded


# -- effects on held-out text


@dataclass
class Variant:
    subset: Subset
    ablation: str
    kind: str                       # subset or control
    control_index: int
    locations: dict[int, np.ndarray]
    sums: np.ndarray                # nll, kl, top-1 agreements (float64, over positions)


def _windows(config: AblationConfig, tokenizer) -> Iterator[list[int]]:
    from pipeline.inputs import iter_documents, iter_windows

    docs = iter_documents(config.corpus)
    return iter_windows(docs, tokenizer, max_length=config.max_length,
                        num_samples=config.num_samples)


def _batches(windows: Iterator[list[int]], size: int) -> Iterator[list[list[int]]]:
    batch: list[list[int]] = []
    for w in windows:
        batch.append(w)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def compare_logits(base_logp, logits, targets) -> np.ndarray:
    """Sums over positions of (nll, KL(base || ablated), top-1 agreement), in float64.

    `base_logp` are the baseline's log-probabilities [B, T, V], `logits` the ablated model's
    [B, T, V], `targets` the next tokens [B, T].
    """
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, targets[..., None])[..., 0]
    kl = (base_logp.exp() * (base_logp - logp)).sum(-1)
    agree = logp.argmax(-1) == base_logp.argmax(-1)
    return np.array([nll.double().sum().item(), kl.double().sum().item(),
                     agree.sum().item()], dtype=np.float64)


def measure_effects(loaded, variants: list[Variant], batches: Iterator[list[list[int]]], *,
                    means: dict[int, np.ndarray] | None, progress: bool,
                    total_windows: int) -> tuple[float, int]:
    """Fill every variant's sums; returns (baseline nll sum, positions)."""
    import torch
    from tqdm.auto import tqdm

    contexts = [(v, lambda v=v: ablation_context(loaded.sites, v.locations,
                                                 means if v.ablation == "mean" else None))
                for v in variants]
    base_nll, positions = 0.0, 0
    bar = tqdm(total=total_windows * (1 + len(variants)), unit="seq", disable=not progress,
               desc="ablation effects")
    with torch.inference_mode():
        for batch in batches:
            ids = torch.tensor(batch, dtype=torch.long, device=loaded.device)
            inputs, targets = ids, ids[:, 1:]
            base = torch.log_softmax(
                loaded.model(input_ids=inputs, use_cache=False).logits[:, :-1].float(), dim=-1)
            base_nll += float(-base.gather(-1, targets[..., None]).double().sum())
            positions += targets.numel()
            bar.update(len(batch))
            for v, make in contexts:
                with make():
                    logits = loaded.model(input_ids=inputs, use_cache=False).logits[:, :-1]
                v.sums += compare_logits(base, logits, targets)
                bar.update(len(batch))
            del base
    bar.close()
    return base_nll, positions


def summarize(effects: pl.DataFrame) -> pl.DataFrame:
    """Per subset, ablation and metric: the subset's value against its controls."""
    rows = []
    subsets = effects.filter(pl.col("kind") == "subset")
    for sub in subsets.iter_rows(named=True):
        ctrl = effects.filter((pl.col("subset") == sub["subset"]) & (pl.col("kind") == "control")
                              & (pl.col("ablation") == sub["ablation"]))
        for metric in METRICS:
            value = sub[metric]
            values = ctrl[metric].to_numpy().astype(np.float64)
            n = len(values)
            sign = _DISRUPTIVE[metric]
            more = int(np.sum(sign * values > sign * value))
            ties = int(np.sum(values == value))
            mean = float(values.mean()) if n else None
            std = float(values.std(ddof=1)) if n >= 2 else None
            rows.append({
                "subset": sub["subset"], "method": sub["method"], "threshold": sub["threshold"],
                "ratio": sub["ratio"], "ablation": sub["ablation"], "size": sub["size"],
                "metric": metric, "value": value, "controls": n, "control_mean": mean,
                "control_std": std,
                "z_score": (value - mean) / std if std else None,
                "rank": 1 + more,
                "percentile": 100.0 * (n - more - ties + 0.5 * ties) / n if n else None,
                "p_value": (1 + more + ties) / (n + 1) if n else None,
            })
    return pl.DataFrame(rows, schema=_polars_schema("ablation_summary"))


def _polars_schema(table: str) -> pl.Schema:
    return pl.from_arrow(tables.schema(table).empty_table()).schema


# -- the stage


def ablate(config: AblationConfig, storage: Storage, *, progress: bool = True) -> dict[str, Any]:
    """Run the ablation experiments of `config`; returns the tables written (polars) and paths."""
    from pipeline.inputs import read_prompts

    t0 = time.perf_counter()
    manifest = storage.finished_run(config.run)
    run_config = manifest.get("config", {})
    prompts_path = config.prompts or run_config.get("prompts")
    prompts = read_prompts(prompts_path) if prompts_path else None
    from_run = run_config.get("prompts") is not None
    sampling = {k: getattr(config, k) if getattr(config, k) is not None
                else (run_config.get(k, d) if from_run else d) for k, d in _EXTRACT_SAMPLING.items()}
    subsets = load_subsets(storage, config.run, config.subsets, config.subset_files)
    if not subsets and prompts is None:
        raise UserError("nothing to ablate: give --subsets NAME... or --subset-files FILE.npy... "
                        "(and --prompts CSV for generation)")
    loaded = _load_run_model(config, manifest, storage, config.dtype or run_config.get("dtype", "auto"))
    offsets, widths = loaded.layer_offsets, loaded.widths
    _check_neuron_table(storage, config.run, offsets)
    locations = {s.name: neuron_locations(s.ids, offsets, widths, name=f"subset {s.label!r}")
                 for s in subsets}
    means = neuron_means(storage, config.run) if "mean" in config.ablation else None
    if means is not None:
        for s in subsets:
            _check_mean_layers(means, locations[s.name], widths, config.run, f"subset {s.label!r}")
    encoded = _encode_prompts(loaded, prompts, prompts_path) if prompts is not None else None
    windows = None
    if subsets and config.num_samples:
        windows = _windows(config, loaded.tokenizer)
        first = next(windows, None)  # reads the corpus now, so a bad one fails before any work
        if first is None:
            raise UserError(f"corpus {config.corpus!r} gives no window of {config.max_length} "
                            "tokens: lower --max-length or give more text")
        windows = _chain(first, windows)

    out: dict[str, Any] = {}
    # -- generation: the baseline once, then every subset under every ablation
    if prompts is not None:
        jobs = [(None, "none")] + [(s, a) for a in config.ablation for s in subsets]
        rows = []
        for s, ablation in jobs:
            name = s.name if s else "none"
            log.info("generating with %s (%s)", name, ablation)
            ctx = (ablation_context(loaded.sites, locations[name],
                                    means if ablation == "mean" else None) if s else _null())
            with ctx:
                for i, k, seq in generate_all(loaded, prompts, encoded, **sampling):
                    rows.append({"subset": name, "method": s.method if s else "none",
                                 "ablation": ablation, "prompt": i, "prompt_text": prompts[i].text,
                                 "sample_index": k, "generated_text": loaded.tokenizer.decode(seq),
                                 "token_ids": seq, **sampling,
                                 "_label": s.label if s else "none"})
        out["ablation_generations"] = pl.DataFrame(rows)

    # -- effects on held-out text
    if windows is not None:
        variants = []
        for ablation in config.ablation:
            for s in subsets:
                loc = locations[s.name]
                variants.append(Variant(s, ablation, "subset", -1, loc, np.zeros(3)))
                for c, ctrl in enumerate(control_subsets(loc, widths, config.controls,
                                                         config.control_seed)):
                    variants.append(Variant(s, ablation, "control", c, ctrl, np.zeros(3)))
        base_nll, positions = measure_effects(
            loaded, variants, _batches(windows, config.batch_size), means=means,
            progress=progress, total_windows=config.num_samples)
        baseline_loss = base_nll / positions
        out["ablation_effects"] = pl.DataFrame([{
            "subset": v.subset.name, "method": v.subset.method, "threshold": v.subset.threshold,
            "ratio": v.subset.ratio, "ablation": v.ablation, "kind": v.kind,
            "control_index": v.control_index,
            "size": int(sum(len(x) for x in v.locations.values())),
            "layer_counts": layer_counts(v.locations),
            "loss": v.sums[0] / positions, "baseline_loss": baseline_loss,
            "delta_loss": v.sums[0] / positions - baseline_loss, "kl": v.sums[1] / positions,
            "top1_agreement": v.sums[2] / positions, "tokens": positions,
            "corpus": config.corpus, "control_seed": config.control_seed,
        } for v in variants], schema=_polars_schema("ablation_effects"))
        out["ablation_summary"] = summarize(out["ablation_effects"])

    _write(config, storage, out, sampling, prompts_path)
    log.info("ablation of run %s: %d subsets x %s in %.1f s", config.run, len(subsets),
             "/".join(config.ablation), time.perf_counter() - t0)
    return out


def _chain(first, rest):
    yield first
    yield from rest


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _write(config: AblationConfig, storage: Storage, out: dict[str, Any], sampling: dict,
           prompts_path: str | None) -> None:
    """Tables (one part per ablation and subset), reference CSVs, plots and the config."""
    run = config.run
    gen = out.get("ablation_generations")
    csv_root = Path(config.out_dir) if config.out_dir else storage.reports(run) / "ablation"
    paths: list[Path] = []
    if gen is not None:
        _drop_stale(storage, "ablation_generations", run)
        names = tables.schema("ablation_generations").names
        for (ablation, name), part in gen.group_by("ablation", "subset", maintain_order=True):
            tables.write_part(storage, "ablation_generations", run, part.select(names).to_arrow(),
                              part=slug(f"{ablation}-{name}"))
        baseline = gen.filter(pl.col("subset") == "none")
        for ablation in config.ablation:
            for name in ["none"] + gen.filter(pl.col("ablation") == ablation)["subset"].unique(
                    maintain_order=True).to_list():
                part = baseline if name == "none" else gen.filter(
                    (pl.col("ablation") == ablation) & (pl.col("subset") == name))
                path = csv_root / ablation / f"{name}.csv"
                with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
                    w = csv.writer(f)
                    w.writerow(["prompt", "sample_index", "generated_text", "perturbation_subset"])
                    w.writerows(part.select("prompt_text", "sample_index", "generated_text",
                                            "_label").iter_rows())
                paths.append(path)
        out["ablation_generations"] = gen.drop("_label")
    effects = out.get("ablation_effects")
    if effects is not None:
        for table in ("ablation_effects", "ablation_summary"):
            _drop_stale(storage, table, run)
            names = tables.schema(table).names
            for (ablation, name), part in out[table].group_by("ablation", "subset",
                                                              maintain_order=True):
                tables.write_part(storage, table, run, part.select(names).to_arrow(),
                                  part=slug(f"{ablation}-{name}"))
        for ablation in config.ablation:
            summary = out["ablation_summary"].filter(pl.col("ablation") == ablation)
            paths.append(plot_effects(summary, storage.reports(run) / f"ablation_{ablation}.png",
                                      ablation=ablation))
    resolved = {**to_dict(config), **sampling, "prompts": prompts_path}
    write_json(csv_root / "ablation.json", {"config": resolved, "outputs": [str(p) for p in paths]})
    out["paths"] = paths


def _drop_stale(storage: Storage, table: str, run: str) -> None:
    """Remove parts of a run's partition written with an older schema of the table."""
    import pyarrow.parquet as pq

    names = tables.schema(table).names
    for part in storage.table_partition(table, run).glob("*.parquet"):
        if pq.read_schema(part).names != names:
            log.info("removing %s: written with an older schema of %s", part, table)
            part.unlink()


# -- plot


def plot_effects(summary: pl.DataFrame, path: Path, *, ablation: str) -> Path:
    """Effect vs subset size, one line per centrality method, controls' mean +- std as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"delta_loss": "change in loss (nats/token)",
              "kl": "KL(baseline || ablated) (nats/token)",
              "top1_agreement": "top-1 agreement with baseline"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series = summary.with_columns(pl.when(pl.col("threshold").is_null()).then(pl.col("method"))
                                  .otherwise(pl.format("{} t>{}", pl.col("method"),
                                                       pl.col("threshold"))).alias("series"))
    labels = series["series"].unique().sort().to_list()
    sizes = series["size"].to_numpy()
    for ax, metric in zip(axes, METRICS):
        for i, label in enumerate(labels):
            part = series.filter((pl.col("series") == label) & (pl.col("metric") == metric)).sort("size")
            color = colors[i % len(colors)]
            x = part["size"].to_numpy()
            ax.plot(x, part["value"].to_numpy(), marker="o", color=color, label=label)
            mean = part["control_mean"].to_numpy().astype(float)
            std = np.nan_to_num(part["control_std"].to_numpy().astype(float))
            if np.isfinite(mean).any():
                ax.plot(x, mean, ls="--", lw=1, color=color)
                ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15)
        if len(sizes) and sizes.max() > 10 * max(sizes.min(), 1):
            ax.set_xscale("log")
        ax.set(xlabel="neurons ablated", title=titles[metric])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="subset (solid)")
    fig.suptitle(f"{ablation} ablation: subsets (solid) vs random controls with the same neurons "
                 "per layer (dashed: mean, band: +-1 sd)")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


# -- CLI


def register(sub) -> None:
    from pipeline.cli import add_stage_parser

    parser = add_stage_parser(
        sub, "ablate", "Ablate neuron subsets in generation and on held-out text, vs random controls.",
        "  nwh ablate --run demo-corpus --subsets degree_t0.5_r0.01 --prompts examples/prompts.csv\n"
        "  nwh ablate --run demo-prompts --subsets none          # reproduces the run's text\n"
        "  nwh ablate --run demo-corpus --subset-files ids.npy --ablation zero mean --controls 20\n"
        "  nwh ablate --run demo-corpus --subsets degree_t0.5_r0.01 --num-samples 0 "
        "--prompts p.csv  # text only\n")
    add_arguments(parser, AblationConfig)
    parser.add_argument("--storage", default=str(DEFAULT_ROOT), help="warehouse root (default: storage)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_cli)


def _cli(args) -> int:
    from pipeline.cli import echo

    config = from_args(AblationConfig, args)
    out = ablate(config, Storage(args.storage), progress=not args.quiet)
    if "ablation_summary" in out:
        wide = out["ablation_summary"].pivot(
            on="metric", index=["subset", "ablation", "size", "controls"],
            values=["value", "control_mean", "p_value"])
        with pl.Config(tbl_rows=100, tbl_cols=-1, tbl_width_chars=220, fmt_str_lengths=40,
                       float_precision=4):
            echo(wide)
    for path in out.get("paths", []):
        echo(path)
    return 0
