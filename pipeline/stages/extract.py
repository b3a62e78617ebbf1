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
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.core import arrays, tables
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
        if self.acts_layers is not None and not self.store_acts:
            raise UserError(f"--acts-layers {self.acts_layers!r} has no effect without "
                            "--store-acts: add --store-acts (or drop --acts-layers)")

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
    shutil.rmtree(storage.run_dir(run_id), ignore_errors=True)
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
        return max(0, self.total_rows - self.committed_rows) * self.bytes_per_token

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
    return ExtractPlan(
        run_id=config.run_id, config_hash=key, resolved=resolved, device=device, status=status,
        existing=existing, model=model, layers=layers, dense_layers=dense_layers,
        total_rows=total, chunk_rows=chunk_rows, committed_rows=committed,
        input=_describe_input(config), rule=rule, framing=framing, loaded=loaded, units=units, prompts=prompts,
        encoded=encoded)


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


class _Writer:
    """Buffers one commit's rows, then writes the row arrays, tokens, state and manifest."""

    def __init__(self, storage: Storage, run_id: str, manifest: dict, group, specs: dict,
                 chunk_rows: int, moments: dict[int, NeuronMoments], signs: dict[int, SignStats],
                 write_threads: int = 1):
        self.storage, self.run_id, self.manifest, self.group = storage, run_id, manifest, group
        self.moments, self.signs = moments, signs
        self.arrays = {name: arrays.ensure_rows_array(group, name, chunk_rows=chunk_rows, **spec)
                       for name, spec in specs.items()}
        self.next_row = manifest["committed"]["rows"]
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pool = ThreadPoolExecutor(max_workers=write_threads, thread_name_prefix="nwh-write")
        self._reset()

    def _reset(self) -> None:
        self.blocks: dict[str, list[np.ndarray]] = {name: [] for name in self.arrays}
        self.token_cols: list[dict[str, np.ndarray]] = []
        self.rows = 0
        self.nbytes = 0
        self.started = time.perf_counter()

    def add(self, blocks: dict[str, np.ndarray], token_cols: dict[str, Any]) -> None:
        for name, block in blocks.items():
            self.blocks[name].append(block)
            self.nbytes += block.nbytes
        self.token_cols.append(token_cols)
        self.rows += len(token_cols["row"])

    def due(self, chunk_rows: int, commit_seconds: float) -> bool:
        """A commit is due once a chunk is buffered and either commit_seconds have passed since
        the last one or the buffer is large: few commits where forward passes are fast (each
        costs a few writes), bounded memory and bounded lost work where they are slow."""
        return self.rows >= chunk_rows and (
            time.perf_counter() - self.started >= commit_seconds or self.nbytes >= COMMIT_BYTES)

    def commit(self, units_done: int, samples: int) -> None:
        """Hand the buffered rows to a background writer (I/O overlaps the next forward passes).

        Commits stay in order: each waits for the previous one, and within one commit the
        manifest is written last, so a crash leaves the last complete commit on record.
        """
        self.wait()
        start = self.next_row
        job = dict(start=start, rows=self.rows, units=units_done, samples=samples,
                   blocks={n: np.concatenate(b) for n, b in self.blocks.items() if b},
                   tokens={k: np.concatenate([c[k] for c in self.token_cols])
                           for k in self.token_cols[0]} if self.token_cols else None,
                   moments={l: m.copy() for l, m in self.moments.items()},
                   signs={l: copy.deepcopy(s) for l, s in self.signs.items()})
        self.next_row = start + self.rows
        self._reset()
        self._thread = threading.Thread(target=self._write, args=(job,), daemon=True)
        self._thread.start()

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

    def _write(self, job: dict) -> None:
        try:
            start = job["start"]
            writes = [(self.arrays[name], block) for name, block in job["blocks"].items()]
            # one array per thread where the forward runs on an accelerator: compression and
            # file writes release the GIL, and these writes, not the forward, bound the rate
            list(self._pool.map(lambda w: arrays.write_rows(w[0], start, w[1]), writes))
            if job["tokens"] is not None:
                tables.write_part(self.storage, "tokens", self.run_id, job["tokens"],
                                  part=f"part-{start:012d}")
            committed = self.manifest["committed"]
            state_dir = self.storage.run_dir(self.run_id) / "state"
            state_name = f"moments-{start + job['rows']:012d}.npz"
            save_states(state_dir / state_name, job["moments"], job["signs"])
            old_state = committed.get("state")
            committed.update(rows=start + job["rows"], units=job["units"],
                             samples=job["samples"], state=state_name)
            write_json(self.storage.run_manifest(self.run_id), self.manifest)
            if old_state and old_state != state_name:
                (state_dir / old_state).unlink(missing_ok=True)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by wait()
            self._error = e


# -- the stage


@dataclass
class ExtractResult:
    run_id: str
    path: Path                       # the run's folder
    manifest: dict | None            # run.json (None for a dry run of a new run)
    skipped: bool = False            # already finished with this configuration
    plan: ExtractPlan | None = None  # set by a dry run

    @property
    def dry_run(self) -> bool:
        return self.plan is not None


def run(config: ExtractConfig, storage: Storage) -> ExtractResult:
    """Run (or resume) an extraction; a dry run only plans it."""
    if config.dry_run:
        p = plan(config, storage)
        return ExtractResult(p.run_id, storage.run_dir(p.run_id), p.existing, plan=p)
    storage.ensure_writable()
    p = plan(config, storage)
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

    @classmethod
    def empty(cls, p: ExtractPlan, config: ExtractConfig) -> Accumulators:
        return cls({l: NeuronMoments(w, p.rule.key_threshold) for l, w in p.widths.items()},
                   {l: SignStats(w, config.sign_examples) for l, w in p.widths.items()}
                   if p.gated else {})


def open_manifest(p: ExtractPlan, config: ExtractConfig, storage: Storage,
                  threads: dict) -> tuple[dict, Accumulators]:
    """A new run's manifest and empty accumulators, or a resumed run's committed state (rows
    written after the last commit are dropped)."""
    if p.status != "resume":
        remove_run(storage, p.run_id)  # --overwrite, or debris
        manifest = {
            "run_id": p.run_id, "status": "running", "config": to_dict(config),
            "config_hash": p.config_hash, "resolved": p.resolved, "threads": threads,
            "versions": library_versions(), "model": p.model, "active": p.rule.record(),
            "framing": p.framing,
            "committed": {"rows": 0, "units": 0, "samples": 0, "state": None},
            "timings": {"started": _now(), "seconds": 0.0},
        }
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
                  acc: Accumulators) -> tuple[int, int]:
    """The forward loop over the units not yet committed; returns (rows, samples) in the end."""
    import torch
    from tqdm.auto import tqdm

    from pipeline.core.inputs import TokenClasses
    from pipeline.models.hooks import capture_blocks

    loaded = p.loaded
    writer = _open_writer(p, storage, manifest, acc)
    if loaded.device.type == "cpu":
        import pipeline.kernels.bitkernels  # noqa: F401  (import numba, load the compiled kernels before the clock starts)
    token_text = _TokenText(loaded.tokenizer)
    classes = TokenClasses(loaded.tokenizer)
    base = loaded.adapter.base_model(loaded.model)
    committed = manifest["committed"]
    done_units, row, sample = committed["units"], committed["rows"], committed["samples"]
    t0 = time.perf_counter()
    bar = tqdm(total=p.total_rows, initial=row, unit="tok", unit_scale=True,
               disable=not config.progress, desc=f"extract {p.run_id}", smoothing=0.1)
    captured: dict[int, Any] = {}
    try:
        with torch.inference_mode(), capture_blocks(
            loaded.adapter, loaded.model, loaded.sites, p.layers,
            on_block=lambda l, b: captured.__setitem__(l, b)
        ):
            for unit in p.units:
                if unit.index < done_units:
                    continue  # committed before an interruption
                ids = _unit_ids(p, config, unit)
                included = classes.included(ids.numpy(), config.excluded_classes,
                                            config.skip_positions)
                captured.clear()
                base(input_ids=ids.to(loaded.device))
                blocks, num_active = _reduce(p, captured, acc, ids.numel(), row, included)
                writer.add(blocks, token_columns(p, unit, ids, row, sample, num_active,
                                                 token_text, included))
                row, sample = row + ids.numel(), sample + ids.shape[0]
                bar.update(ids.numel())
                if writer.due(p.chunk_rows, config.commit_seconds):
                    writer.commit(unit.index + 1, sample)
                done_units = unit.index + 1
        writer.commit(done_units, sample)
        writer.wait()
    finally:
        bar.close()
        writer.drain()  # an interrupted run still finishes the commit in flight
    manifest["timings"]["seconds"] += time.perf_counter() - t0
    return row, sample


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


def _open_writer(p: ExtractPlan, storage: Storage, manifest: dict, acc: Accumulators) -> _Writer:
    # on the CPU the forward needs every core: one writer thread; on a GPU several
    write_threads = 1 if p.loaded.device.type == "cpu" else min(8, os.cpu_count() or 1)
    return _Writer(storage, p.run_id, manifest, arrays.open_group(storage.arrays(p.run_id)),
                   row_arrays(p), p.chunk_rows, acc.moments, acc.signs, write_threads)


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


def _reduce(p: ExtractPlan, captured: dict, acc: Accumulators, n: int, row: int,
            included: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Accumulate one forward's neurons; (row-array blocks, active count per row)."""
    import torch

    from pipeline.core.arrays import pack_mask

    blocks = {arrays.INCLUDED: included.astype(np.uint8).reshape(n, 1)}
    num_active = np.zeros(n, np.int32)
    rows = None if included.all() else torch.from_numpy(included)
    for l in p.layers:
        b, width = captured[l], p.widths[l]
        a = b.a.reshape(n, width)
        g = None if b.g is None else b.g.reshape(n, width)
        u = None if b.u is None else b.u.reshape(n, width)
        routed = None if b.routed is None else b.routed.reshape(n, width)
        key = None if p.rule.rule == "value" else p.rule.key(a, g)
        if rows is not None and rows.device != a.device:
            rows = rows.to(a.device)
        blocks[f"active/L{l}"], per_row = acc.moments[l].update_and_pack(a, key, rows, routed)
        num_active += per_row
        if p.gated:
            blocks[f"gate/L{l}"] = pack_mask(g > 0)
            blocks[f"up/L{l}"] = pack_mask(u > 0)
            acc.signs[l].update(a, g, u, row, rows=rows, routed=routed)
        if l in p.top_k:
            blocks[f"experts/L{l}"] = b.experts.reshape(n, -1).to(torch.int16).cpu().numpy()
            blocks[f"expert_weights/L{l}"] = (b.expert_weights.reshape(n, -1)
                                              .to(torch.float16).cpu().numpy())
        if l in p.dense_layers:
            blocks[f"acts/L{l}"] = a.to(torch.float16).cpu().numpy()
    return blocks, num_active


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
        shutil.rmtree(storage.run_dir(p.run_id) / "state", ignore_errors=True)


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
    if result.skipped:
        return (f"run {result.run_id} is already finished with this configuration: nothing to "
                f"do ({result.path})")
    m, t = result.manifest, result.manifest["timings"]
    return (f"run {result.run_id}: {m['rows']} token rows, {m['samples']} sequences, "
            f"{t['tokens_per_s']:.0f} tok/s -> {result.path}")


STAGES = [Stage(
    "extract", "Stream neuron activations of a model into the warehouse.",
    "  nwh extract --model zoo-s0 --corpus stdlib --num-samples 256\n"
    "  nwh extract --model zoo-s0 --revision step64 --layers 0-1 --store-acts\n"
    "  nwh extract --model zoo-s1 --prompts prompts.csv --temperature 0.8 --top-k 50\n"
    "  nwh extract --model gpt2 --corpus wikitext --dataset-config wikitext-2-raw-v1\n"
    "  nwh extract --model gpt2 --num-samples 4096 --store-acts --dry-run\n"
    "  nwh extract --model storage/models/smollm2-135m --active-rule gate --skip-positions 1\n"
    "  nwh extract --model Qwen/Qwen2.5-0.5B --active-rule topk --topk 64 --exclude bos,pad\n"
    "  nwh extract --model gpt2 --window-mode document --prepend-bos\n",
    ExtractConfig, run, show)]
