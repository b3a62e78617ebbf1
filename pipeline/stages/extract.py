"""Extraction: stream a corpus or generated prompts through a model into the warehouse.

    nwh extract --model zoo-s0 --corpus stdlib --num-samples 256
    nwh extract --model zoo-s0 --prompts prompts.csv --temperature 0.8 --top-k 50 --store-acts
    nwh extract --model gpt2 --num-samples 4096 --store-acts --dry-run   # sizes, disk, resume point
    nwh extract --model Qwen/Qwen2.5-0.5B --skip-positions 1   # gated: active = gate open (g > 0)

Per run it writes, in bounded memory:
    tables/tokens/run_id=<run>/part-<first row>.parquet   one row per token
    runs/<run>/arrays.zarr/active/L<l>                      bit-packed active masks (always)
    runs/<run>/arrays.zarr/gate/L<l>, up/L<l>               g > 0 and u > 0 masks (gated MLPs)
    runs/<run>/arrays.zarr/experts/L<l>, expert_weights/L<l> routing (mixture-of-experts layers)
    runs/<run>/arrays.zarr/included                         rows that enter the accumulators
    runs/<run>/arrays.zarr/acts/L<l>                        float16 activations (--store-acts)
    tables/neuron_stats, neurons, runs (+ sign_stats, sign_examples of gated MLPs) at the end
    runs/<run>/stages/extract.json                          completion marker, last
Work is committed every few thousand tokens (run.json records the committed rows and the
accumulator state), so a killed run resumes on the same command and ends with exactly the
tables and arrays of an uninterrupted run. A resume must see the same resolved dtype, device
type and input file; otherwise it is refused (--overwrite starts the run again).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.core import arrays, tables
from pipeline.core.cluster import LOCAL, Shard, split_units, split_weighted
from pipeline.core.config import (
    ModelOptions,
    Progress,
    RowFilter,
    Stage,
    WindowOptions,
    at_least,
    config_hash,
    opt,
    to_dict,
)
from pipeline.core.errors import UserError
from pipeline.core.layers import parse_layers
from pipeline.core.storage import (
    Storage,
    clean_temporaries,
    read_json,
    remove_file,
    remove_tree,
    slug,
    validate_run_id,
    write_json,
)
from pipeline.kernels.accumulators import NeuronMoments, SignStats, load_states, save_states
from pipeline.kernels.active import RULES, ActiveRule, check_threshold, run_rule

log = logging.getLogger(__name__)

COMMIT_BYTES = 256 << 20  # buffered masks + activations that force a commit
TOKEN_ROW_BYTES = 40  # a tokens row before compression: 8 int/bool columns + a short token text
RESOLVED = ("dtype", "device_type", "input_fingerprint")  # hashed beside the config fields


@dataclass(kw_only=True)
class ExtractConfig(ModelOptions, WindowOptions, RowFilter, Progress):
    corpus: str | None = opt(None, help="stdlib, stdlib:heldout, a .txt/.jsonl/.parquet/.csv "
                             "file, or a datasets hub name (default stdlib unless --prompts)")
    # hashed here: a resume counts its work in batches, and batch shapes change the float sums
    batch_size: int = opt(8, help="sequences per forward pass (a resume needs the same)")
    prompts: str | None = opt(None, help="prompts CSV with header prompts,number_of_new_tokens,num_samples")
    seed: int = opt(42, help="sampling seed of generation")
    temperature: float = opt(0.8, help="sampling temperature of generation; 0 = greedy")
    top_k: int = opt(0, help="sample among the k most likely tokens; 0 = all")
    layers: str | None = opt(None, help="layers to record: '0-3', '0,2,5' or all (default)")
    active_rule: str | None = opt(None, choices=RULES, help="when a neuron is active: value "
                                  "(a > t), gate (g > t, gated MLPs), abs (|a| > t), topk (the "
                                  "--topk largest |a| of a token in a layer); default gate for "
                                  "gated MLPs, value otherwise")
    active_threshold: float = opt(0.0, help="t of the active rule")
    topk: int | None = opt(None, help="K of --active-rule topk")
    sign_examples: int = opt(5, help="top-|a| examples kept per neuron and sign combination "
                             "of g and u (gated MLPs; 0 = none)")
    store_acts: bool = opt(False, help="also store dense float16 activations")
    acts_layers: str | None = opt(None, help="layers whose dense activations are stored "
                                  "(with --store-acts; default all recorded layers)")
    chunk_tokens: int = opt(2048, help="token rows per Zarr shard, one file per array (and "
                            "the smallest commit)")
    commit_seconds: float = opt(1.0, help="commit a resumable checkpoint at most this often "
                                "(also once 256 MiB are buffered); 0 = every --chunk-tokens rows",
                                hash=False)
    run: str | None = opt(None, help="run name (default: a slug of model, revision and input)",
                          hash=False)
    overwrite: bool = opt(False, help="replace a run of this name (finished, unfinished or of "
                          "another configuration) instead of resuming or skipping it", hash=False)
    dry_run: bool = opt(False, help="print the plan (sizes, disk needed, resume point) and exit "
                        "without writing anything", hash=False)
    shard: str | None = opt(None, metavar="I/N", help="extract only shard I of N (0-based): a "
                            "deterministic split of the input, resumable on its own; the shard "
                            "that finishes last finishes the run", hash=False)
    ray: str | None = opt(None, const=LOCAL, metavar="ADDRESS", help="run --shards N shards as "
                          "Ray tasks (one GPU each where the cluster has GPUs): alone, on a "
                          "local cluster; or join one (auto, ray://host:10001)", hash=False)
    shards: int | None = opt(None, help="number of shards of --ray", hash=False)

    def __post_init__(self) -> None:
        if self.corpus and self.prompts:
            raise UserError("give either --corpus or --prompts, not both")
        if not self.corpus and not self.prompts:
            self.corpus = "stdlib"
        self.check_windows()
        self.check_rows()
        check_threshold(self.active_threshold)
        at_least(self, 1, "chunk_tokens")
        at_least(self, 0, "sign_examples")
        if self.commit_seconds < 0:
            raise UserError("--commit-seconds must be >= 0 (0 = commit every --chunk-tokens rows)")
        if self.temperature < 0:
            raise UserError("--temperature must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise UserError("--top-k must be >= 0 (0 = no top-k filter)")
        if self.run is not None:
            validate_run_id(self.run)
        if self.shard is not None:
            if self.ray is not None:
                raise UserError("give --shard I/N (one shard) or --ray --shards N (all of them), "
                                "not both")
            if self.overwrite:
                raise UserError("--overwrite with --shard would delete the other shards' work: "
                                "start the run again with --ray --shards N --overwrite, or "
                                "--overwrite without --shard")
            self.shard_spec  # noqa: B018 (parsed here: a bad value fails before the model loads)
        if self.ray is not None and not self.shards:
            raise UserError("--ray needs --shards N: the number of shards (one per GPU, say)")
        if self.shards is not None and self.ray is None:
            raise UserError(f"--shards {self.shards} needs --ray, or run each shard with "
                            f"--shard I/{self.shards}")
        if self.shards is not None:
            at_least(self, 1, "shards")
        if self.acts_layers is not None and not self.store_acts:
            raise UserError(f"--acts-layers {self.acts_layers!r} has no effect without "
                            "--store-acts: add --store-acts (or drop --acts-layers)")

    @property
    def shard_spec(self) -> Shard | None:
        return Shard.parse(self.shard) if self.shard is not None else None

    @property
    def input_kind(self) -> str:
        return "prompts" if self.prompts else "corpus"

    @property
    def input_file(self) -> str | None:
        """The local file the input is read from (its content is part of the run), if any."""
        path = self.prompts or self.corpus
        return path if path and Path(path).is_file() else None

    @property
    def run_id(self) -> str:
        if self.run:
            return self.run
        return slug(Path(self.model).name, self.revision or "", self.source_name)

    @property
    def source_name(self) -> str:
        """The input in a run id: the prompts file's stem, or the corpus with its split
        (stdlib and stdlib:heldout are two inputs)."""
        if self.prompts:
            return Path(self.prompts).stem
        name = Path(self.corpus).name
        return name.split(":")[0] + ("-" + name.split(":")[1] if ":" in name and
                                     name.split(":")[1] != "train" else "")


def library_versions() -> dict[str, str]:
    import duckdb
    import pyarrow
    import torch
    import transformers
    import zarr

    import pipeline

    return {
        "python": platform.python_version(), "pipeline": pipeline.__version__,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "zarr": zarr.__version__, "pyarrow": pyarrow.__version__,
        "duckdb": duckdb.__version__, "numpy": np.__version__,
    }


def remove_run(storage: Storage, run_id: str) -> None:
    """Delete a run's folder and every table partition of it."""
    remove_tree(storage.run_dir(run_id))
    for table in tables.table_names():
        tables.drop_partition(storage, table, run_id)


# -- the plan: everything resolved and checked before anything is written


@dataclass
class Unit:
    """A work unit: a batch of corpus windows, or all samples of one prompt."""

    index: int
    input_ids: Any  # torch.LongTensor [sequences, length] (prompts: filled by generation)
    prompt: int | None = None
    prompt_len: int = 0


@dataclass
class ExtractPlan:
    """A resolved extraction: what it reads, what it writes, where it resumes."""

    run_id: str
    config_hash: str
    resolved: dict[str, Any]       # dtype, device_type, input_fingerprint (hashed too)
    device: str                    # resolved, e.g. cpu or cuda:0
    status: str                    # new, resume, finished or overwrite
    existing: dict | None          # manifest on disk (resume, finished, overwrite)
    model: dict[str, Any]          # name, revision, source, family, n_layers, widths
    layers: list[int]
    dense_layers: list[int]
    total_rows: int                # a corpus may end sooner: an upper bound
    chunk_rows: int
    committed_rows: int
    input: str
    rule: ActiveRule
    framing: dict = field(default_factory=dict)  # the windows' fixed tokens, resolved
    loaded: Any = field(default=None, repr=False)      # LoadedModel (None when finished)
    units: Iterator[Unit] | None = field(default=None, repr=False)
    prompts: list | None = field(default=None, repr=False)
    encoded: list[list[int]] | None = field(default=None, repr=False)
    span: ShardSpan | None = None  # the shard this process extracts (--shard)

    @property
    def widths(self) -> dict[int, int]:
        return {l: self.model["widths"][l] for l in self.layers}

    @property
    def gated(self) -> bool:
        return bool(self.model.get("gated"))

    @property
    def top_k(self) -> dict[int, int]:
        """Experts per token of each recorded mixture-of-experts layer."""
        per_layer = self.model.get("top_k") or [0] * self.model["n_layers"]
        return {l: per_layer[l] for l in self.layers if per_layer[l]}

    @property
    def mask_bytes_per_token(self) -> int:
        masks = 3 if self.gated else 1  # active, and g > 0, u > 0 of gated MLPs
        return masks * sum(arrays.packed_width(w) for w in self.widths.values()) + 1

    @property
    def dense_bytes_per_token(self) -> int:
        return sum(2 * self.model["widths"][l] for l in self.dense_layers)

    @property
    def bytes_per_token(self) -> int:
        """Masks + fp16 activations + a tokens row, before compression."""
        return self.mask_bytes_per_token + self.dense_bytes_per_token + TOKEN_ROW_BYTES

    @property
    def disk_needed(self) -> int:
        """Bytes still to write (uncompressed: masks compress ~1.5x, fp16 ~1.1x)."""
        stop = self.span.rows[1] if self.span else self.total_rows
        return max(0, stop - self.committed_rows) * self.bytes_per_token

    def __str__(self) -> str:
        m = self.model
        neurons = sum(self.widths.values())
        resume = {"new": "new run",
                  "resume": f"resume after {self.committed_rows:,} committed rows",
                  "finished": "finished with this configuration: nothing to do",
                  "overwrite": "--overwrite: the existing run is deleted and started again",
                  }[self.status]
        return "\n".join([
            f"extract plan for run {self.run_id} (config {self.config_hash})",
            f"  model        {m['name']} ({m['source']}, {m['family']}), revision "
            f"{m['revision'] or 'default'}",
            f"  device       {self.device}, {self.resolved['dtype']}",
            f"  active       {self.rule.describe()} ({self.rule.rule} rule)"
            + ("; g > 0 and u > 0 masks kept" if self.gated else ""),
            f"  input        {self.input}",
            f"  framing      {self._framing()}",
            f"  rows         {self.total_rows:,} token rows (at most), chunks of {self.chunk_rows:,}",
            f"  layers       {_spans(self.layers)} of {m['n_layers']} ({neurons:,} neurons); "
            f"dense fp16: {_spans(self.dense_layers) or 'none'}",
            f"  per token    {self.mask_bytes_per_token:,} B masks + {self.dense_bytes_per_token:,}"
            f" B dense + ~{TOKEN_ROW_BYTES} B tokens row = {self.bytes_per_token:,} B",
            f"  disk needed  {_size(self.disk_needed)} (uncompressed upper bound)",
            f"  status       {resume}",
            *([f"  shard        {self.span}"] if self.span else []),
        ])


    def _framing(self) -> str:
        f = self.framing
        if not f:
            return "as recorded"
        ends = (f"prefix {f['prefix']}" if f["prefix"] else "no prefix") + (
            f", suffix {f['suffix']}" if f["suffix"] else "")
        return f"{ends}; windows {f['window_mode']}"


def _spans(layers: list[int]) -> str:
    """'0-3,5' of [0, 1, 2, 3, 5]."""
    out, start = [], None
    for i, l in enumerate(layers):
        start = l if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != l + 1:
            out.append(str(l) if start == l else f"{start}-{l}")
            start = None
    return ",".join(out)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def resolve(config: ExtractConfig) -> tuple[str, dict[str, Any]]:
    """(resolved device, values hashed beside the config): the dtype after 'auto', the device
    type and the fingerprint of a local input file, so a resume sees them change."""
    from pipeline.core.inputs import input_fingerprint
    from pipeline.models.loading import resolve_device, resolve_dtype

    device = resolve_device(config.device)
    dtype = str(resolve_dtype(config.dtype, device)).removeprefix("torch.")
    return str(device), {"dtype": dtype, "device_type": device.type,
                         "input_fingerprint": input_fingerprint(config.input_file)}


def existing_status(storage: Storage, config: ExtractConfig, key: str,
                    resolved: dict[str, Any]) -> tuple[str, dict | None]:
    """new, resume, finished or overwrite, with the manifest on disk; refuses a clash."""
    path = storage.run_manifest(config.run_id)
    if not path.exists():
        return "new", None
    manifest = read_json(path)
    if config.overwrite:
        return "overwrite", manifest
    if manifest.get("config_hash") == key:
        return ("finished" if manifest.get("status") == "finished" else "resume"), manifest
    changed = _changes(manifest, config, resolved)
    if manifest.get("status") != "finished" and changed and set(changed) <= set(RESOLVED):
        raise UserError(_resume_refusal(config, manifest["resolved"], resolved, changed))
    raise UserError(
        f"run {config.run_id!r} already exists with a different configuration "
        f"({_names(changed) or 'written by another version'}): pass --overwrite to replace it, "
        "or --run with a new name")


def _names(changed: list[str], most: int = 6) -> str:
    return ", ".join(changed[:most]) + (", ..." if len(changed) > most else "")


def _changes(manifest: dict, config: ExtractConfig, resolved: dict[str, Any]) -> list[str]:
    """Names of the hashed fields and resolved values that differ from a manifest's."""
    old, new = manifest.get("config", {}), to_dict(config)
    names = [f.name for f in dataclasses.fields(config)
             if f.metadata.get("hash", True) and old.get(f.name) != new[f.name]]
    if "resolved" in manifest:
        names += [k for k in RESOLVED if manifest["resolved"].get(k) != resolved[k]]
    return names


def _resume_refusal(config: ExtractConfig, old: dict, new: dict, changed: list[str]) -> str:
    why = []
    if "dtype" in changed:
        why.append(f"it was started in {old['dtype']}, now {new['dtype']} (pass --dtype "
                   f"{old['dtype']} to resume)")
    if "device_type" in changed:
        why.append(f"it was started on {old['device_type']}, now {new['device_type']} (pass "
                   f"--device {old['device_type']} to resume)")
    if "input_fingerprint" in changed:
        why.append(f"{config.input_kind} file {config.input_file or config.prompts or config.corpus!r} "
                   "changed since it started (restore it to resume)")
    return (f"run {config.run_id!r} cannot resume: {'; '.join(why)}; or pass --overwrite to "
            "start it again")


def plan(config: ExtractConfig, storage: Storage) -> ExtractPlan:
    """Resolve and check everything (model, layers, inputs, resume point) without writing."""
    device, resolved = resolve(config)
    key = config_hash(config, **resolved)
    status, existing = existing_status(storage, config, key, resolved)
    check_sharding(storage, config, status, existing)
    if status == "finished":  # nothing to load: the manifest says what the run holds
        m = existing["model"]
        return ExtractPlan(
            run_id=config.run_id, config_hash=key, resolved=resolved, device=device,
            status=status, existing=existing, model=m, layers=m["layers"],
            dense_layers=m["dense_layers"], total_rows=existing["rows"],
            chunk_rows=config.chunk_tokens, committed_rows=existing["rows"],
            input=_describe_input(config), rule=run_rule(existing),
            framing=existing.get("framing", {}))
    return _plan_work(config, storage, device, resolved, key, status, existing)


def _plan_work(config, storage, device, resolved, key, status, existing) -> ExtractPlan:
    from pipeline.core.inputs import read_prompts
    from pipeline.models.loading import load_model

    prompts = read_prompts(config.prompts) if config.prompts else None  # checked before the model loads
    loaded = load_model(config.model, config.revision, storage=storage,
                        for_generation=prompts is not None, **config.model_kwargs())
    layers = parse_layers(config.layers, loaded.n_layers)
    rule = ActiveRule.resolve(config.active_rule, config.active_threshold, config.topk,
                              gated=loaded.adapter.gated, widths=[loaded.widths[l] for l in layers])
    from pipeline.core.inputs import framing_for

    frame = framing_for(loaded.tokenizer, causal=loaded.is_causal,
                        prepend_bos=config.prepend_bos, window_mode=config.window_mode)
    framing = {"prefix": list(frame.prefix), "suffix": list(frame.suffix),
               "separator": frame.separator, "window_mode": frame.mode}
    limit = context_length(loaded.model.config)
    if prompts is None and limit and config.max_length > limit:
        raise UserError(f"--max-length {config.max_length} is beyond the model's context of "
                        f"{limit} positions: pass --max-length {limit} or less")
    dense_layers = [] if not config.store_acts else (  # default: every recorded layer
        parse_layers(config.acts_layers, loaded.n_layers) if config.acts_layers else layers)
    if set(dense_layers) - set(layers):
        raise UserError(f"--acts-layers {config.acts_layers!r} names layers not in --layers "
                        f"{config.layers!r}: store dense activations only of recorded layers")
    if prompts is None:
        units, encoded = _corpus_units(config, loaded), None
        total = config.num_samples * config.max_length
        rows_per_unit = config.batch_size * config.max_length
        chunk_rows = rows_per_unit * max(1, round(config.chunk_tokens / rows_per_unit))
    else:
        encoded = _encode_prompts(config, loaded, prompts)
        units = (Unit(i, None, prompt=i, prompt_len=len(ids)) for i, ids in enumerate(encoded))
        total = sum(p.num_samples * (len(ids) + p.new_tokens) for p, ids in zip(prompts, encoded))
        chunk_rows = config.chunk_tokens
    model = {"name": config.model, "revision": loaded.revision, "source": loaded.source,
             "path": str(loaded.path) if loaded.path else None, "family": loaded.adapter.family,
             "n_layers": loaded.n_layers, "widths": loaded.widths, "layers": layers,
             "dense_layers": dense_layers, "sites": [loaded.sites[l].name for l in layers],
             "gated": loaded.adapter.gated, "top_k": routing_width(loaded)}
    committed = existing["committed"]["rows"] if status == "resume" else 0
    span = None
    if config.shard_spec is not None:
        span = shard_spans(config, total, chunk_rows, prompts, encoded)[config.shard_spec.index]
        shard_manifest = span.target(storage, config.run_id).manifest
        committed = (read_json(shard_manifest)["committed"]["rows"] if status == "resume"
                     and shard_manifest.exists() else span.rows[0])
    return ExtractPlan(
        run_id=config.run_id, config_hash=key, resolved=resolved, device=device, status=status,
        existing=existing, model=model, layers=layers, dense_layers=dense_layers,
        total_rows=total, chunk_rows=chunk_rows, committed_rows=committed,
        input=_describe_input(config), rule=rule, framing=framing, loaded=loaded, units=units, prompts=prompts,
        encoded=encoded, span=span)


def context_length(model_config) -> int | None:
    """Positions the model can take (None when its config does not say)."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def routing_width(loaded) -> list[int]:
    """Experts chosen per token at each layer (0 for dense layers)."""
    k = int(getattr(loaded.model.config, "num_experts_per_tok", 0) or 0)
    return [k if getattr(site, "expert", None) is not None and k else 0 for site in loaded.sites]


def _describe_input(config: ExtractConfig) -> str:
    if config.prompts:
        return f"prompts {config.prompts} (seed {config.seed}, temperature {config.temperature})"
    return (f"corpus {config.corpus}: {config.num_samples:,} windows x {config.max_length} tokens"
            f", {config.batch_size} per forward")


def _corpus_units(config: ExtractConfig, loaded) -> Iterator[Unit]:
    """Batches of corpus windows; the first window is read at once (a bad corpus fails here)."""
    from pipeline.core.inputs import corpus_windows

    windows = corpus_windows(config, loaded.tokenizer, causal=loaded.is_causal)
    return _batches(windows, config.batch_size)


def _batches(windows: Iterator[list[int]], batch_size: int) -> Iterator[Unit]:
    import torch

    batch: list[list[int]] = []
    index = 0
    for window in windows:
        batch.append(window)
        if len(batch) == batch_size:
            yield Unit(index, torch.tensor(batch, dtype=torch.long))
            batch, index = [], index + 1
    if batch:
        yield Unit(index, torch.tensor(batch, dtype=torch.long))


def _encode_prompts(config: ExtractConfig, loaded, prompts) -> list[list[int]]:
    if not loaded.is_causal:
        raise UserError(f"model {config.model!r} is an encoder and cannot generate: use --corpus")
    from pipeline.core.inputs import framing_for

    # the prompt is framed as the corpus windows are: BOS first where the model was trained so
    prefix = list(framing_for(loaded.tokenizer, causal=True, prepend_bos=config.prepend_bos).prefix)
    encoded = [prefix + loaded.tokenizer(p.text, add_special_tokens=False)["input_ids"]
               for p in prompts]
    limit = context_length(loaded.model.config)
    for i, (p, ids) in enumerate(zip(prompts, encoded)):
        if limit and len(ids) + p.new_tokens > limit:
            raise UserError(f"prompt {i} needs {len(ids) + p.new_tokens} positions but the "
                            f"model has {limit}: lower number_of_new_tokens")
    return encoded


# -- writing: buffered commits in a background thread


class _TokenText:
    """Decoded text of single token ids, cached (decoding one id at a time is slow)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, ids: np.ndarray) -> list[str]:
        out = []
        for i in ids.tolist():
            text = self.cache.get(i)
            if text is None:
                text = self.cache[i] = self.tokenizer.decode([i])
            out.append(text)
        return out


@dataclass(frozen=True)
class CommitTarget:
    """Where a writer's commits go: the manifest that records them, the accumulator states,
    and the rows whose Zarr chunks it owns. A run's one process owns every chunk; a shard owns
    the chunks that lie wholly in its rows, and keeps the rows of chunks it shares with a
    neighbour as edge files, written into the arrays when the run is finished."""

    manifest: Path
    state_dir: Path
    own: tuple[int, int | None] = (0, None)   # [start, stop) of owned rows; None: to the end
    edge_dir: Path | None = None

    def segments(self, start: int, stop: int) -> list[tuple[int, int, bool]]:
        """[(start, stop, owned)] cutting rows start..stop-1 at the owned range's ends."""
        lo, hi = self.own
        hi = stop if hi is None else hi
        cuts = sorted({start, stop, *(c for c in (lo, hi) if start < c < stop)})
        return [(a, b, lo <= a and b <= hi) for a, b in zip(cuts, cuts[1:])]


class _Writer:
    """Buffers one commit's rows, then writes the row arrays, tokens, state and manifest.

    Rows are filled in place (`block`) into one of two preallocated commit buffers: the forward
    loop fills one while the background writer writes the other, so no block is copied to be
    buffered or concatenated to be committed."""

    def __init__(self, storage: Storage, run_id: str, manifest: dict, group, specs: dict,
                 chunk_rows: int, moments: dict[int, NeuronMoments], signs: dict[int, SignStats],
                 write_threads: int = 1, target: CommitTarget | None = None,
                 final_threads: int = 1):
        self.storage, self.run_id, self.manifest, self.group = storage, run_id, manifest, group
        self.moments, self.signs = moments, signs
        self.target = target or CommitTarget(storage.run_manifest(run_id),
                                             storage.run_dir(run_id) / "state")
        self.arrays = {name: arrays.ensure_rows_array(group, name, chunk_rows=chunk_rows, **spec)
                       for name, spec in specs.items()}
        self.chunk_rows = chunk_rows
        self.row_bytes = sum(a.shape[1] * a.dtype.itemsize for a in self.arrays.values())
        self.next_row = manifest["committed"]["rows"]
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pool = ThreadPoolExecutor(max_workers=write_threads, thread_name_prefix="nwh-write")
        self._final_threads = max(final_threads, write_threads)
        self._final = False
        self._buffers: list[dict[str, np.ndarray]] = [{}, {}]  # filled, and being written
        self._reset()

    def _reset(self) -> None:
        self.token_cols: list[dict[str, np.ndarray]] = []
        self.rows = 0
        self.nbytes = 0
        self.started = time.perf_counter()

    def block(self, n: int) -> dict[str, np.ndarray]:
        """Views of the next n rows of every row array's commit buffer, for the caller to fill
        before add(); a buffer grows (doubling) when a commit holds more rows than it had."""
        buffers, need = self._buffers[0], self.rows + n
        for name, array in self.arrays.items():
            old = buffers.get(name)
            if old is None or old.shape[0] < need:
                size = max(need, self.chunk_rows, 0 if old is None else 2 * old.shape[0])
                grown = np.empty((size, array.shape[1]), array.dtype)
                if old is not None:
                    grown[:self.rows] = old[:self.rows]
                buffers[name] = grown
        return {name: b[self.rows:need] for name, b in buffers.items()}

    def add(self, token_cols: dict[str, Any]) -> None:
        """Count the rows of the last block() as buffered, with their tokens table rows."""
        n = len(token_cols["row"])
        self.token_cols.append(token_cols)
        self.rows += n
        self.nbytes += n * self.row_bytes

    def due(self, chunk_rows: int, commit_seconds: float) -> bool:
        """A commit is due once a chunk is buffered and either commit_seconds have passed since
        the last one or the buffer is large: few commits where forward passes are fast (each
        costs a few writes), bounded memory and bounded lost work where they are slow."""
        return self.rows >= chunk_rows and (
            time.perf_counter() - self.started >= commit_seconds or self.nbytes >= COMMIT_BYTES)

    def commit(self, units_done: int, samples: int) -> None:
        """Hand the buffered rows to a background writer (I/O overlaps the next forward passes).

        Commits stay in order: each waits for the previous one, and within one commit the
        manifest is written last, so a crash leaves the last complete commit on record. The
        last commit (finish()) is written at once, on every core: nothing is left to overlap.
        """
        self.wait()
        start = self.next_row
        filled = self._buffers[0]
        job = dict(start=start, rows=self.rows, units=units_done, samples=samples,
                   blocks={n: b[:self.rows] for n, b in filled.items()} if self.rows else {},
                   tokens={k: np.concatenate([c[k] for c in self.token_cols])
                           for k in self.token_cols[0]} if self.token_cols else None,
                   moments={l: m.copy() for l, m in self.moments.items()},
                   signs={l: copy.deepcopy(s) for l, s in self.signs.items()})
        self.next_row = start + self.rows
        self._reset()
        # the buffers of the commit before this one are free again (waited for above)
        self._buffers = [self._buffers[1], filled]
        if self._final:
            with ThreadPoolExecutor(max_workers=self._final_threads,
                                    thread_name_prefix="nwh-write") as pool:
                self._write(job, pool)
            self.wait()  # its error, if any
            return
        self._thread = threading.Thread(target=self._write, args=(job,), daemon=True)
        self._thread.start()

    def finish(self, units_done: int, samples: int) -> None:
        """The last commit, written before this returns."""
        self._final = True
        try:
            self.commit(units_done, samples)
        finally:
            self._final = False
        self.wait()

    def wait(self) -> None:
        """Block until the pending commit is on disk; re-raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def drain(self) -> None:
        """Wait for the commit in flight, keeping its error for a later wait(); end the pool."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._pool.shutdown()

    def _write(self, job: dict, pool: ThreadPoolExecutor | None = None) -> None:
        try:
            start, target = job["start"], self.target
            writes, edges = [], {}
            for a, b, owned in target.segments(start, start + job["rows"]):
                for name, block in job["blocks"].items():
                    if owned:
                        writes.append((self.arrays[name], block[a - start:b - start], a))
                    else:
                        edges.setdefault(a, {})[name] = block[a - start:b - start]
            # one array per thread where the forward runs on an accelerator: compression and
            # file writes release the GIL, and these writes, not the forward, bound the rate
            list((pool or self._pool).map(lambda w: arrays.write_rows(w[0], w[2], w[1]), writes))
            for a, blocks in edges.items():  # rows of chunks shared with a neighbouring shard
                save_edge(target.edge_dir / f"rows-{a:012d}.npz", blocks)
            if job["tokens"] is not None:
                tables.write_part(self.storage, "tokens", self.run_id, job["tokens"],
                                  part=f"part-{start:012d}")
            committed = self.manifest["committed"]
            state_dir = target.state_dir
            state_name = f"moments-{start + job['rows']:012d}.npz"
            save_states(state_dir / state_name, job["moments"], job["signs"])
            old_state = committed.get("state")
            committed.update(rows=start + job["rows"], units=job["units"],
                             samples=job["samples"], state=state_name)
            write_json(target.manifest, self.manifest)
            if old_state and old_state != state_name:
                remove_file(state_dir / old_state)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by wait()
            self._error = e


# -- sharded runs
#
# Shard i of n extracts a contiguous slice of the work units (batches of corpus windows, or
# prompts) into the run's own arrays and tables: rows keep their run-wide numbers, so the
# shards together are exactly one run. Arrays are created at the planned size before any shard
# writes, and a shard writes only the Zarr shards (chunk rows) that lie wholly in its rows;
# corpus shards are cut at chunk boundaries, so that is all of them; the rows of a chunk that
# two prompt shards share are kept as edge files and written when the run is finished.
# runs/<run>/shards/shard-<i>-of-<n>/ holds a shard's manifest (shard.json: committed rows,
# accumulator state, timings), its states and its edges. The shard that finishes last (under
# the run's coordination lock) merges the accumulators and finishes the run.

SHARD_LOCK_WAIT = 120.0  # seconds a shard waits for another's short hold of the coordination lock


@dataclass(frozen=True)
class ShardSpan:
    """The slice of a run that one shard extracts."""

    shard: Shard
    units: tuple[int, int]   # [first, stop) work units (corpus batches or prompts)
    rows: tuple[int, int]    # [first, stop) token rows as planned (a corpus may end sooner)
    samples: int             # sequences before the shard's first
    chunk_rows: int

    def __str__(self) -> str:
        return (f"{self.shard}: units {self.units[0]:,}..{self.units[1] - 1:,}, rows "
                f"{self.rows[0]:,}..{self.rows[1] - 1:,}" if self.units[1] > self.units[0]
                else f"{self.shard}: empty (more shards than work units)")

    @property
    def last(self) -> bool:
        return self.shard.index == self.shard.count - 1

    def target(self, storage: Storage, run_id: str) -> CommitTarget:
        c, (lo, hi) = self.chunk_rows, self.rows
        own_lo = -(-lo // c) * c
        own_hi = None if self.last else max(own_lo, hi // c * c)
        folder = shard_dir(storage, run_id, self.shard)
        return CommitTarget(folder / "shard.json", folder / "state", (own_lo, own_hi),
                            folder / "edges")


def shard_dir(storage: Storage, run_id: str, shard: Shard) -> Path:
    return storage.run_dir(run_id) / "shards" / shard.name


def shard_spans(config: ExtractConfig, total_rows: int, chunk_rows: int, prompts, encoded
                ) -> list[ShardSpan]:
    """Every shard's slice: corpus batches cut at chunk boundaries, prompts by their rows."""
    shards = [Shard(i, config.shard_spec.count) for i in range(config.shard_spec.count)]
    if prompts is None:
        per_unit = config.batch_size * config.max_length
        units = -(-config.num_samples // config.batch_size)
        slices = split_units(units, len(shards), align=chunk_rows // per_unit)
        return [ShardSpan(s, (u0, u1), (u0 * per_unit, min(u1 * per_unit, total_rows)),
                          u0 * config.batch_size, chunk_rows)
                for s, (u0, u1) in zip(shards, slices)]
    rows = [pr.num_samples * (len(ids) + pr.new_tokens) for pr, ids in zip(prompts, encoded)]
    row_start = np.concatenate([[0], np.cumsum(rows)]).astype(int).tolist()
    sample_start = np.concatenate([[0], np.cumsum([pr.num_samples for pr in prompts])]
                                  ).astype(int).tolist()
    return [ShardSpan(s, (u0, u1), (row_start[u0], row_start[u1]), sample_start[u0], chunk_rows)
            for s, (u0, u1) in zip(shards, split_weighted(rows, len(shards)))]


def check_sharding(storage: Storage, config: ExtractConfig, status: str,
                   existing: dict | None) -> None:
    """Refuse a shard of a run split otherwise, and a plain resume of a sharded run."""
    if existing is None or status in ("finished", "overwrite"):
        return
    count, shard = existing.get("shards"), config.shard_spec
    left = unfinished_shards(storage, config.run_id, count) if count else []
    if shard is None and left and config.ray is None:
        raise UserError(f"run {config.run_id!r} is split into {count} shards and shards "
                        f"{', '.join(map(str, left))} are not finished: run them with --shard "
                        f"I/{count}, or all with --ray --shards {count}")
    if shard is not None and count != shard.count:
        started = f"split into {count} shards" if count else "started without --shard"
        fix = f"--shard I/{count}" if count else "resume it without --shard"
        raise UserError(f"run {config.run_id!r} was {started}: {fix}, or --overwrite it "
                        "(without --shard)")
    if config.ray is not None and count not in (None, config.shards):
        raise UserError(f"run {config.run_id!r} is split into {count} shards: pass --shards "
                        f"{count}, or --overwrite")


def unfinished_shards(storage: Storage, run_id: str, count: int) -> list[int]:
    out = []
    for i in range(count):
        path = shard_dir(storage, run_id, Shard(i, count)) / "shard.json"
        if not path.exists() or read_json(path).get("status") != "finished":
            out.append(i)
    return out


@contextmanager
def coordination(storage: Storage, run_id: str) -> Iterator[None]:
    """The lock shards of a run take for a moment (creating the run, finishing it). A lock of
    its own, not the run's: the run's lock removes leftovers of interrupted writes, which
    would remove the partial chunks that other shards are writing."""
    end = time.monotonic() + SHARD_LOCK_WAIT
    while True:
        try:
            lease = storage.lock(f"{run_id}.shards", "extract")
            break
        except UserError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)
    try:
        yield
    finally:
        lease.release()


def save_edge(path: Path, blocks: dict[str, np.ndarray]) -> None:
    """Rows of a shard in chunks it shares with a neighbour (written at the run's finish)."""
    from pipeline.core.storage import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{name.replace("/", "."): block for name, block in blocks.items()})


def run_shard(p: ExtractPlan, config: ExtractConfig, storage: Storage,
              finish_run: bool = True) -> ExtractResult:
    """Extract one shard (resuming its last commit), then finish the run if it was the last
    (unless `finish_run` is off: the Ray driver leaves the finish to one task of its own)."""
    from pipeline.kernels.threads import thread_split

    with coordination(storage, p.run_id):
        manifest = open_sharded_run(p, config, storage)
    if manifest.get("status") == "finished":
        return ExtractResult(p.run_id, storage.run_dir(p.run_id), manifest, skipped=True)
    target = p.span.target(storage, p.run_id)
    # refused in one line while another process runs this shard
    with storage.lock(f"{p.run_id}.{p.span.shard.name}", "extract"):
        shard, acc = open_shard(p, config, storage, target)
        if shard["status"] != "finished":
            with thread_split(p.loaded.device.type) as threads:
                shard["threads"] = threads
                extract_units(p, config, storage, shard, acc, target)
            shard.update(status="finished", finished=_now())
            write_json(target.manifest, shard)
            log.info("shard %s of run %s: %d rows in %.1f s", p.span.shard, p.run_id,
                     shard["committed"]["rows"] - p.span.rows[0], shard["timings"]["seconds"])
    if not finish_run:
        return ExtractResult(p.run_id, storage.run_dir(p.run_id), manifest, shard=shard,
                             waiting=unfinished_shards(storage, p.run_id, p.span.shard.count))
    return finish_if_complete(p, config, storage, shard)


def open_sharded_run(p: ExtractPlan, config: ExtractConfig, storage: Storage) -> dict:
    """run.json of the sharded run, created with its arrays at the planned size by the first
    shard to arrive (called under the coordination lock)."""
    path = storage.run_manifest(p.run_id)
    if path.exists():
        manifest = read_json(path)
        if manifest.get("config_hash") != p.config_hash or manifest.get("shards") != \
                p.span.shard.count:
            raise UserError(f"run {p.run_id!r} was started by another shard with a different "
                            "configuration or shard count: give every shard the same options")
        return manifest
    # idempotent: on an object store two shards of different machines may both get here (the
    # lock guards one machine), and both make the same arrays and the same manifest
    group = arrays.open_group(storage.arrays(p.run_id))
    for name, spec in row_arrays(p).items():
        array = arrays.ensure_rows_array(group, name, chunk_rows=p.chunk_rows, **spec)
        if (array.shape[1], str(array.dtype), array.chunks[0]) != (spec["width"], spec["dtype"],
                                                                  p.chunk_rows):
            raise UserError(f"run {p.run_id!r} holds arrays of another configuration without "
                            "a manifest: start it with --overwrite (without --shard)")
        if array.shape[0] != p.total_rows:
            array.resize((p.total_rows, array.shape[1]))
    manifest = new_manifest(p, dataclasses.replace(config, shard=None), None,
                            shards=p.span.shard.count)
    write_json(path, manifest)  # last: the run exists once its arrays do
    log.info("run %s: extracting %s in %d shards", p.run_id, p.input, p.span.shard.count)
    return manifest


def open_shard(p: ExtractPlan, config: ExtractConfig, storage: Storage,
               target: CommitTarget) -> tuple[dict, Accumulators]:
    """The shard's manifest and accumulators: new, or its last commit (what it wrote after
    that commit is removed: tokens parts and edges in its rows)."""
    span = p.span
    if target.manifest.exists():
        shard = read_json(target.manifest)
        committed = shard["committed"]
        state = committed.get("state")
        acc = (Accumulators(*load_states(target.state_dir / state, p.layers, signs=p.gated))
               if state else Accumulators.empty(p, config))
        if shard["status"] != "finished":
            stop = None if span.last else span.rows[1]
            for part in storage.table_partition("tokens", p.run_id).glob("part-*.parquet"):
                first = int(part.stem.split("-")[1])
                if first >= committed["rows"] and (stop is None or first < stop):
                    part.unlink()
            for edge in target.edge_dir.glob("rows-*.npz") if target.edge_dir.is_dir() else ():
                if int(edge.stem.split("-")[1]) >= committed["rows"]:
                    edge.unlink()
            for folder in (target.state_dir, target.edge_dir, target.manifest.parent):
                if folder.is_dir():
                    clean_temporaries(folder)  # this shard's own folders only
            log.info("shard %s of run %s: resuming after row %d", span.shard, p.run_id,
                     committed["rows"])
    else:
        shard = {"run_id": p.run_id, "shard": span.shard.index, "count": span.shard.count,
                 "units": list(span.units), "rows": list(span.rows), "status": "running",
                 "committed": {"rows": span.rows[0], "units": span.units[0],
                               "samples": span.samples, "state": None},
                 "timings": {"started": _now(), "seconds": 0.0}}
        acc = Accumulators.empty(p, config)
    shard.update(host=platform.node(), pid=os.getpid())  # who writes it now (and for a kill)
    write_json(target.manifest, shard)
    return shard, acc


def finish_if_complete(p: ExtractPlan, config: ExtractConfig, storage: Storage,
                       shard: dict | None) -> ExtractResult:
    """Finish the run when every shard is done (the last shard to get here does)."""
    with coordination(storage, p.run_id):
        manifest = read_json(storage.run_manifest(p.run_id))
        if manifest.get("status") != "finished":
            waiting = unfinished_shards(storage, p.run_id, manifest["shards"])
            if waiting:
                return ExtractResult(p.run_id, storage.run_dir(p.run_id), manifest,
                                     shard=shard, waiting=waiting)
            marker = storage.marker(p.run_id, "extract")  # every shard is done: nobody writes
            finish_sharded(p, config, storage, manifest)
            marker.write(to_dict(dataclasses.replace(config, shard=None)), p.config_hash,
                         rows=manifest["rows"], samples=manifest["samples"],
                         shards=manifest["shards"])
            log.info("run %s: %d rows in %d shards", p.run_id, manifest["rows"],
                     manifest["shards"])
    return ExtractResult(p.run_id, storage.run_dir(p.run_id), manifest, shard=shard)


def finish_sharded(p: ExtractPlan, config: ExtractConfig, storage: Storage,
                   manifest: dict) -> None:
    """Merge the shards: accumulators summed in shard order, shared chunks written from the
    edges, arrays cut to the rows written; then the tables of an unsharded run."""
    count = manifest["shards"]
    shards = [read_json(shard_dir(storage, p.run_id, Shard(i, count)) / "shard.json")
              for i in range(count)]
    acc, rows, samples, seconds = Accumulators.empty(p, config), 0, 0, 0.0
    group = arrays.open_group(storage.arrays(p.run_id))
    for s in shards:
        folder = shard_dir(storage, p.run_id, Shard(s["shard"], count))
        committed = s["committed"]
        if committed["rows"] > s["rows"][0]:  # a corpus may end before a shard's slice
            if s["rows"][0] != rows:
                raise RuntimeError(f"shard {s['shard']} starts at row {s['rows'][0]}, the "
                                   f"shards before it end at {rows}")
            rows, samples = committed["rows"], committed["samples"]
        if committed["state"]:
            acc = acc.merge(Accumulators(*load_states(folder / "state" / committed["state"],
                                                      p.layers, signs=p.gated)))
        seconds += s["timings"]["seconds"]
        for edge in sorted((folder / "edges").glob("rows-*.npz")):
            start = int(edge.stem.split("-")[1])
            with edge.open("rb") as f, np.load(f) as blocks:
                for key in blocks.files:
                    arrays.write_rows(group[key.replace(".", "/")], start, blocks[key])
    arrays.truncate_rows(group, rows)
    started = min(datetime.fromisoformat(s["timings"]["started"]) for s in shards)
    manifest["timings"].update(
        seconds=seconds, wall_seconds=(datetime.now(timezone.utc) - started).total_seconds(),
        shards=[{"shard": s["shard"], "rows": s["committed"]["rows"] - s["rows"][0],
                 "seconds": s["timings"]["seconds"], "host": s.get("host")} for s in shards])
    manifest["committed"].update(rows=rows, samples=samples)
    finish(p, config, storage, manifest, acc, rows, samples)
    for s in shards:  # the shard manifests stay (where and how long each ran)
        folder = shard_dir(storage, p.run_id, Shard(s["shard"], count))
        remove_tree(folder / "state")
        remove_tree(folder / "edges")


# -- running the shards on Ray


def run_on_ray(config: ExtractConfig, storage: Storage) -> ExtractResult:
    """Run every shard as a Ray task (a killed worker's task is retried and resumes its last
    commit); the last shard to finish finishes the run."""
    from pipeline.core import cluster

    storage.ensure_writable()
    run_id, count = config.run_id, config.shards
    if config.overwrite:
        with coordination(storage, run_id), storage.lock(run_id, "extract"):
            remove_run(storage, run_id)
    shard_config = dataclasses.replace(config, ray=None, shards=None, overwrite=False, quiet=True)
    calls = [((to_dict(dataclasses.replace(shard_config, shard=f"{i}/{count}")),
               storage.url, os.getcwd()), {}) for i in range(count)]
    results = cluster.run_tasks(
        extract_shard_task, calls, address=config.ray, device=config.device,
        desc=f"extract {run_id} shard", progress=config.progress,
        poll=lambda: shard_progress(storage, run_id, count))
    # one finisher, whatever the storage: the shards of an object store on several machines
    # share no lock
    finish_config = to_dict(dataclasses.replace(shard_config, shard=None))
    cluster.run_tasks(extract_shard_task, [((finish_config, storage.url,
                                             os.getcwd()), {})],
                      address=config.ray, device=config.device, desc="finish", progress=False)
    manifest = read_json(storage.run_manifest(run_id))
    if manifest.get("status") != "finished":
        raise RuntimeError(f"run {run_id}: every shard returned but the run is not finished "
                           f"({results})")
    return ExtractResult(run_id, storage.run_dir(run_id), manifest)


def extract_shard_task(values: dict, root: str, cwd: str) -> dict:
    """A Ray task: one shard of a run, left unfinished, or (no shard) the run's finish;
    relative paths of the command resolve from `cwd`."""
    if os.path.isdir(cwd):
        os.chdir(cwd)
    config, storage = ExtractConfig(**values), Storage(root)
    if config.shard is None:
        result = run(config, storage)
    else:
        p = plan(config, storage)
        result = (run_shard(p, config, storage, finish_run=False) if p.status != "finished"
                  else ExtractResult(p.run_id, storage.run_dir(p.run_id), p.existing))
    return {"shard": values["shard"], "waiting": result.waiting, "pid": os.getpid(),
            "host": platform.node()}


def shard_progress(storage: Storage, run_id: str, count: int) -> list[tuple[int, int]]:
    """(rows committed, rows planned) of every shard, from the shard manifests."""
    out = []
    for i in range(count):
        path = shard_dir(storage, run_id, Shard(i, count)) / "shard.json"
        try:
            s = read_json(path)
        except (OSError, ValueError):
            out.append((0, 0))
            continue
        out.append((s["committed"]["rows"] - s["rows"][0], s["rows"][1] - s["rows"][0]))
    return out


# -- the stage


@dataclass
class ExtractResult:
    run_id: str
    path: Path                       # the run's folder
    manifest: dict | None            # run.json (None for a dry run of a new run)
    skipped: bool = False            # already finished with this configuration
    plan: ExtractPlan | None = None  # set by a dry run
    shard: dict | None = None        # the shard's manifest (--shard)
    waiting: list[int] = field(default_factory=list)  # shards not finished yet (--shard)

    @property
    def dry_run(self) -> bool:
        return self.plan is not None


def run(config: ExtractConfig, storage: Storage) -> ExtractResult:
    """Run (or resume) an extraction, or one shard of it; a dry run only plans it."""
    if config.ray is not None and not config.dry_run:
        return run_on_ray(config, storage)
    if config.dry_run:
        p = plan(config, storage)
        return ExtractResult(p.run_id, storage.run_dir(p.run_id), p.existing, plan=p)
    storage.ensure_writable()
    p = plan(config, storage)
    if p.span is not None and p.status != "finished":
        return run_shard(p, config, storage)
    if p.status == "resume" and p.existing.get("shards"):  # every shard done (check_sharding)
        return finish_if_complete(p, config, storage, None)
    marker = storage.marker(p.run_id, "extract")
    if p.status == "finished":
        log.info("run %s is already finished with this configuration: nothing to do", p.run_id)
        if marker.done(p.config_hash) is None:  # finished before the marker was
            marker.write(to_dict(config), p.config_hash, rows=p.existing["rows"])
        return ExtractResult(p.run_id, storage.run_dir(p.run_id), p.existing, skipped=True)
    from pipeline.kernels.threads import thread_split

    with thread_split(p.loaded.device.type) as threads:
        manifest, acc = open_manifest(p, config, storage, threads)
        rows, samples = extract_units(p, config, storage, manifest, acc)
    finish(p, config, storage, manifest, acc, rows, samples)
    marker.write(to_dict(config), p.config_hash, rows=rows, samples=samples)
    log.info("run %s: %d rows in %.1f s (%.0f tok/s)", p.run_id, rows,
             manifest["timings"]["seconds"], manifest["timings"]["tokens_per_s"])
    return ExtractResult(p.run_id, storage.run_dir(p.run_id), manifest)


@dataclass
class Accumulators:
    """The per-layer sums of a run: moments of every layer, sign combinations of gated ones."""

    moments: dict[int, NeuronMoments]
    signs: dict[int, SignStats]

    def merge(self, other: Accumulators) -> Accumulators:
        """The sums of both (disjoint rows: shards of one run)."""
        return Accumulators({l: m.merge(other.moments[l]) for l, m in self.moments.items()},
                            {l: s.merge(other.signs[l]) for l, s in self.signs.items()})

    @classmethod
    def empty(cls, p: ExtractPlan, config: ExtractConfig) -> Accumulators:
        return cls({l: NeuronMoments(w, p.rule.key_threshold) for l, w in p.widths.items()},
                   {l: SignStats(w, config.sign_examples) for l, w in p.widths.items()}
                   if p.gated else {})


def new_manifest(p: ExtractPlan, config: ExtractConfig, threads: dict | None,
                 shards: int | None = None) -> dict:
    """run.json of a run that starts now (of a sharded one: `shards`, the number of shards)."""
    return {
        "run_id": p.run_id, "status": "running", "config": to_dict(config),
        "config_hash": p.config_hash, "resolved": p.resolved, "threads": threads,
        "versions": library_versions(), "model": p.model, "active": p.rule.record(),
        "framing": p.framing, **({"shards": shards} if shards else {}),
        "committed": {"rows": 0, "units": 0, "samples": 0, "state": None},
        "timings": {"started": _now(), "seconds": 0.0},
    }


def open_manifest(p: ExtractPlan, config: ExtractConfig, storage: Storage,
                  threads: dict) -> tuple[dict, Accumulators]:
    """A new run's manifest and empty accumulators, or a resumed run's committed state (rows
    written after the last commit are dropped)."""
    if p.status != "resume":
        remove_run(storage, p.run_id)  # --overwrite, or debris
        manifest = new_manifest(p, config, threads)
        write_json(storage.run_manifest(p.run_id), manifest)
        acc = Accumulators.empty(p, config)
        log.info("run %s: extracting %s", p.run_id, p.input)
    else:
        manifest = p.existing
        manifest["threads"] = threads
        committed = manifest["committed"]
        state = committed.get("state")
        acc = (Accumulators(*load_states(storage.run_dir(p.run_id) / "state" / state, p.layers,
                                         signs=p.gated))
               if state else Accumulators.empty(p, config))
        for part in storage.table_partition("tokens", p.run_id).glob("part-*.parquet"):
            if int(part.stem.split("-")[1]) >= committed["rows"]:
                part.unlink()  # written after the last commit
        # temporaries of writes a kill interrupted (atomic_path names them .<name>.tmp-*)
        for folder in (storage.table_partition("tokens", p.run_id), storage.run_dir(p.run_id),
                       storage.run_dir(p.run_id) / "state"):
            if folder.is_dir():
                clean_temporaries(folder)
        log.info("run %s: resuming after %d committed rows", p.run_id, committed["rows"])
    arrays.truncate_rows(arrays.open_group(storage.arrays(p.run_id)), manifest["committed"]["rows"])
    return manifest, acc


def extract_units(p: ExtractPlan, config: ExtractConfig, storage: Storage, manifest: dict,
                  acc: Accumulators, target: CommitTarget | None = None) -> tuple[int, int]:
    """The forward loop over the units not yet committed; returns (rows, samples) in the end.

    Each layer's neurons are reduced in the hook that hands them over, while they are still in
    cache, straight into the writer's commit buffers."""
    import torch
    from tqdm.auto import tqdm

    from pipeline.core.inputs import TokenClasses
    from pipeline.models.hooks import capture_blocks

    loaded = p.loaded
    if loaded.device.type == "cpu":  # numba's import and its first call, before the clock starts
        from pipeline.kernels import bitkernels

        bitkernels.warm()
    writer = _open_writer(p, storage, manifest, acc, target)
    token_text = _TokenText(loaded.tokenizer)
    classes = TokenClasses(loaded.tokenizer)
    base = loaded.adapter.base_model(loaded.model)
    forward_kwargs = _forward_kwargs(base)
    committed = manifest["committed"]
    done_units, row, sample = committed["units"], committed["rows"], committed["samples"]
    t0 = time.perf_counter()
    first, stop = p.span.rows if p.span else (0, p.total_rows)
    last_unit = p.span.units[1] if p.span else None
    bar = tqdm(total=stop - first, initial=row - first, unit="tok", unit_scale=True,
               disable=not config.progress, smoothing=0.1,
               desc=f"extract {p.run_id}" + (f" shard {p.span.shard}" if p.span else ""))
    # the forward being recorded: its rows, buffers and counts (empty while a prompt's tokens
    # are generated: those forwards are not recorded)
    step: dict[str, Any] = {}

    def on_block(layer: int, block) -> None:
        if step:
            _reduce(p, layer, block, acc, **step)

    try:
        with torch.inference_mode(), capture_blocks(
            loaded.adapter, loaded.model, loaded.sites, p.layers, on_block=on_block
        ):
            for unit in p.units:
                if unit.index < done_units:
                    continue  # committed before an interruption (or another shard's)
                if last_unit is not None and unit.index >= last_unit:
                    break
                ids = _unit_ids(p, config, unit)
                n = ids.numel()
                included = classes.included(ids.numpy(), config.excluded_classes,
                                            config.skip_positions)
                out = writer.block(n)
                out[arrays.INCLUDED][:, 0] = included
                step.update(out=out, n=n, row=row, num_active=np.zeros(n, np.int32),
                            rows=None if included.all() else torch.from_numpy(included),
                            seen=set())
                base(input_ids=ids.to(loaded.device), **forward_kwargs)
                seen, num_active = step.pop("seen"), step.pop("num_active")
                step.clear()
                if seen != set(p.layers):
                    raise RuntimeError("the forward never reached layer(s) "
                                       f"{sorted(set(p.layers) - seen)}")
                writer.add(token_columns(p, unit, ids, row, sample, num_active, token_text,
                                         included))
                row, sample = row + n, sample + ids.shape[0]
                bar.update(n)
                if writer.due(p.chunk_rows, config.commit_seconds):
                    writer.commit(unit.index + 1, sample)
                done_units = unit.index + 1
        writer.finish(done_units, sample)
    finally:
        bar.close()
        writer.drain()  # an interrupted run still finishes the commit in flight
    manifest["timings"]["seconds"] += time.perf_counter() - t0
    return row, sample


def _forward_kwargs(base) -> dict[str, Any]:
    """use_cache=False where the model's forward takes it: extraction runs each window once,
    and a key/value cache is only copies (torch.cat per layer) nobody reads."""
    import inspect

    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def row_arrays(p: ExtractPlan) -> dict[str, dict]:
    """Name -> (width, dtype, compression, column block) of every row array the run writes;
    dense and mask arrays are neuron-blocked so one neuron reads without its whole layer."""
    packed = dict(dtype="uint8", compress=True)
    specs = {arrays.INCLUDED: dict(width=1, **packed)}
    for l in p.layers:
        width = arrays.packed_width(p.widths[l])
        for kind in ("active", "gate", "up") if p.gated else ("active",):
            specs[f"{kind}/L{l}"] = dict(width=width, block=arrays.MASK_BLOCK, **packed)
        if l in p.top_k:
            specs[f"experts/L{l}"] = dict(width=p.top_k[l], dtype="int16", compress=True)
            specs[f"expert_weights/L{l}"] = dict(width=p.top_k[l], dtype="float16",
                                                 compress=True)
    for l in p.dense_layers:
        specs[f"acts/L{l}"] = dict(width=p.widths[l], dtype="float16", compress=False,
                                   block=arrays.ACTS_BLOCK)
    return specs


def _open_writer(p: ExtractPlan, storage: Storage, manifest: dict, acc: Accumulators,
                 target: CommitTarget | None = None) -> _Writer:
    # on the CPU the forward needs every core: one writer thread; on a GPU several. The last
    # commit has nothing to overlap: every core writes it
    cores = os.cpu_count() or 1
    write_threads = 1 if p.loaded.device.type == "cpu" else min(8, cores)
    return _Writer(storage, p.run_id, manifest, arrays.open_group(storage.arrays(p.run_id)),
                   row_arrays(p), p.chunk_rows, acc.moments, acc.signs, write_threads, target,
                   final_threads=min(8, cores))


def _unit_ids(p: ExtractPlan, config: ExtractConfig, unit: Unit):
    """The token ids [sequences, length] of a unit (prompts: generated now, on the CPU)."""
    if p.prompts is None:
        return unit.input_ids
    from pipeline.models.generation import generate, prompt_generator

    prompt = p.prompts[unit.index]
    return generate(p.loaded.model, p.encoded[unit.index], new_tokens=prompt.new_tokens,
                    num_samples=prompt.num_samples, temperature=config.temperature,
                    top_k=config.top_k, generator=prompt_generator(config.seed, unit.index),
                    device=p.loaded.device).cpu()


def _reduce(p: ExtractPlan, l: int, b, acc: Accumulators, *, out: dict[str, np.ndarray],
            n: int, row: int, num_active: np.ndarray, rows, seen: set) -> None:
    """Accumulate layer l's neurons of one forward (a NeuronBlock); its masks (and dense
    activations) go into the commit buffers `out`, its active counts into num_active."""
    import torch

    from pipeline.core.arrays import pack_mask

    if l not in p.widths:
        return
    seen.add(l)
    width = p.widths[l]
    a = b.a.reshape(n, width)
    g = None if b.g is None else b.g.reshape(n, width)
    u = None if b.u is None else b.u.reshape(n, width)
    routed = None if b.routed is None else b.routed.reshape(n, width)
    key = None if p.rule.rule == "value" else p.rule.key(a, g)
    if rows is not None and rows.device != a.device:
        rows = rows.to(a.device)
    _, per_row = acc.moments[l].update_and_pack(a, key, rows, routed, out=out[f"active/L{l}"])
    num_active += per_row
    if p.gated:
        out[f"gate/L{l}"][...] = pack_mask(g > 0)
        out[f"up/L{l}"][...] = pack_mask(u > 0)
        acc.signs[l].update(a, g, u, row, rows=rows, routed=routed)
    if l in p.top_k:
        out[f"experts/L{l}"][...] = b.experts.reshape(n, -1).to(torch.int16).cpu().numpy()
        out[f"expert_weights/L{l}"][...] = (b.expert_weights.reshape(n, -1)
                                            .to(torch.float16).cpu().numpy())
    if l in p.dense_layers:
        dense = torch.from_numpy(out[f"acts/L{l}"])
        # on the CPU one pass converts into the buffer; from an accelerator half the bytes come
        dense.copy_(a if a.device.type == "cpu" else a.to(torch.float16))


def token_columns(p: ExtractPlan, unit: Unit, ids, row: int, sample: int,
                  num_active: np.ndarray, token_text: _TokenText,
                  included: np.ndarray) -> dict[str, np.ndarray]:
    """The tokens table rows of one unit (schemas/tokens.json)."""
    n_seq, length = ids.shape
    n = n_seq * length
    ids_np = ids.reshape(-1).numpy().astype(np.int32)
    positions = np.tile(np.arange(length, dtype=np.int32), n_seq)
    is_prompt = p.prompts is not None
    return {
        "row": np.arange(row, row + n, dtype=np.int64),
        "sample": np.repeat(np.arange(sample, sample + n_seq, dtype=np.int32), length),
        "prompt": np.full(n, unit.prompt if is_prompt else -1, np.int32),
        "prompt_sample": (np.repeat(np.arange(n_seq, dtype=np.int32), length) if is_prompt
                          else np.full(n, -1, np.int32)),
        "position": positions,
        "token_id": ids_np,
        "token": np.array(token_text(ids_np), dtype=object),
        "generated": positions >= unit.prompt_len if is_prompt else np.zeros(n, bool),
        "num_active": num_active,
        "included": included,
    }


def finish(p: ExtractPlan, config: ExtractConfig, storage: Storage, manifest: dict,
           acc: Accumulators, rows: int, samples: int) -> None:
    """neuron_stats, neurons, sign tables and runs, then the manifest's finished status."""
    stats, neurons = neuron_tables(p, acc.moments)
    tables.write_part(storage, "neuron_stats", p.run_id, stats)
    tables.write_part(storage, "neurons", p.run_id, neurons)
    if p.gated:
        sign_stats, sign_examples = sign_tables(p, acc.signs)
        tables.write_part(storage, "sign_stats", p.run_id, sign_stats)
        tables.write_part(storage, "sign_examples", p.run_id, sign_examples)
    timings = manifest["timings"]
    timings.update(finished=_now(), tokens_per_s=rows / max(timings["seconds"], 1e-9))
    group = arrays.open_group(storage.arrays(p.run_id), mode="r")
    num_included = int(group[arrays.INCLUDED][:].sum()) if rows else 0
    tables.write_part(storage, "runs", p.run_id, {
        "model": [config.model], "revision": [p.model["revision"]], "source": [p.model["source"]],
        "input_kind": [config.input_kind], "input": [config.prompts or config.corpus],
        "num_rows": [rows], "num_samples": [samples], "num_layers": [len(p.layers)],
        "num_neurons": [int(sum(p.widths.values()))], "active_rule": [p.rule.rule],
        "active_threshold": [p.rule.threshold], "topk": [p.rule.topk],
        "num_included": [num_included], "finished_at": [timings["finished"]],
        "seconds": [timings["seconds"]],
    })
    state = manifest["committed"].get("state")
    manifest.update(status="finished", rows=rows, samples=samples)
    manifest["committed"]["state"] = None
    write_json(storage.run_manifest(p.run_id), manifest)
    if state:
        remove_tree(storage.run_dir(p.run_id) / "state")


def _ids(p: ExtractPlan, l: int, width: int) -> dict[str, np.ndarray]:
    return {"neuron_id": p.loaded.layer_offsets[l] + np.arange(width, dtype=np.int64),
            "layer": np.full(width, l, np.int32), "neuron": np.arange(width, dtype=np.int32)}


def neuron_tables(p: ExtractPlan, moments: dict[int, NeuronMoments]) -> tuple[dict, dict]:
    """Columns of neuron_stats (the accumulators) and neurons (ids, offsets, sites, experts)."""
    stats: dict[str, list[np.ndarray]] = {}
    neurons: dict[str, list] = {}
    offsets = p.loaded.layer_offsets
    for l in p.layers:
        width = moments[l].width
        index = _ids(p, l, width)
        for k, v in {**index, **moments[l].columns()}.items():
            stats.setdefault(k, []).append(v)
        site = p.loaded.sites[l]
        expert = getattr(site, "expert", None)
        for k, v in {**index, "layer_offset": np.full(width, offsets[l], np.int64),
                     "layer_width": np.full(width, width, np.int32),
                     "expert": (np.full(width, -1, np.int16) if expert is None
                                else np.asarray(expert, np.int16)),
                     "site": np.full(width, site.name, object)}.items():
            neurons.setdefault(k, []).append(v)
    return ({k: np.concatenate(v) for k, v in stats.items()},
            {k: np.concatenate(v) for k, v in neurons.items()})


def sign_tables(p: ExtractPlan, signs: dict[int, SignStats]) -> tuple[dict, dict]:
    """Columns of sign_stats and sign_examples over the recorded layers."""
    out: tuple[dict[str, list], dict[str, list]] = ({}, {})
    for l in p.layers:
        offset = p.loaded.layer_offsets[l]
        for table, columns in zip(out, signs[l].tables()):
            n = len(columns["neuron"])
            ids = {"neuron_id": offset + columns["neuron"].astype(np.int64),
                   "layer": np.full(n, l, np.int32)}
            for k, v in {**ids, **columns}.items():
                table.setdefault(k, []).append(v)
    return tuple({k: np.concatenate(v) for k, v in t.items()} for t in out)  # type: ignore[return-value]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def show(result: ExtractResult) -> str:
    if result.dry_run:
        return f"{result.plan}\ndry run: nothing written"
    if result.waiting:
        s = result.shard
        done = s["committed"]["rows"] - s["rows"][0]
        return (f"shard {s['shard']}/{s['count']} of run {result.run_id}: {done} token rows; the "
                f"run is finished by the last of shards {', '.join(map(str, result.waiting))} "
                f"-> {result.path}")
    if result.skipped:
        return (f"run {result.run_id} is already finished with this configuration: nothing to "
                f"do ({result.path})")
    m, t = result.manifest, result.manifest["timings"]
    shards = (f" in {m['shards']} shards ({t['tokens_per_s']:.0f} tok/s per shard, "
              f"{m['rows'] / max(t['wall_seconds'], 1e-9):.0f} tok/s wall)"
              if m.get("shards") else f", {t['tokens_per_s']:.0f} tok/s")
    return (f"run {result.run_id}: {m['rows']} token rows, {m['samples']} sequences{shards} "
            f"-> {result.path}")


STAGES = [Stage(
    "extract", "Stream neuron activations of a model into the warehouse.",
    "  nwh extract --model zoo-s0 --corpus stdlib --num-samples 256\n"
    "  nwh extract --model zoo-s0 --revision step64 --layers 0-1 --store-acts\n"
    "  nwh extract --model zoo-s1 --prompts prompts.csv --temperature 0.8 --top-k 50\n"
    "  nwh extract --model gpt2 --corpus wikitext --dataset-config wikitext-2-raw-v1\n"
    "  nwh extract --model gpt2 --num-samples 4096 --store-acts --dry-run\n"
    "  nwh extract --model storage/models/smollm2-135m --active-rule gate --skip-positions 1\n"
    "  nwh extract --model Qwen/Qwen2.5-0.5B --active-rule topk --topk 64 --exclude bos,pad\n"
    "  nwh extract --model gpt2 --window-mode document --prepend-bos\n"
    "  nwh extract --model gpt2 --num-samples 65536 --shard 0/4      # one shard of four\n"
    "  nwh extract --model gpt2 --num-samples 65536 --ray --shards 4 # all four on Ray\n",
    ExtractConfig, run, show)]
