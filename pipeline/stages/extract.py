"""Extraction: stream a corpus or generated prompts through a model into the warehouse.

    nwh extract --model zoo-s0 --corpus stdlib --num-samples 256
    nwh extract --model zoo-s0 --prompts prompts.csv --temperature 0.8 --top-k 50 --store-acts

Per run it writes, in bounded memory:
    tables/tokens/run_id=<run>/part-<first row>.parquet   one row per token
    runs/<run>/arrays.zarr/active/L<l>                      bit-packed active masks (always)
    runs/<run>/arrays.zarr/acts/L<l>                        float16 activations (--store-acts)
    tables/neuron_stats, tables/neurons, tables/runs       at the end
Work is committed every few thousand tokens (run.json records the committed rows and the
accumulator state), so a killed run resumes on the same command and ends with exactly the
tables and arrays of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import platform
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.core import arrays, tables
from pipeline.kernels.accumulators import NeuronMoments, load_states, save_states
from pipeline.core.config import add_arguments, from_args, opt, to_dict
from pipeline.core.errors import UserError
from pipeline.core.layers import parse_layers
from pipeline.core.storage import Storage, read_json, slug, validate_run_id, write_json

log = logging.getLogger(__name__)

# fields that do not change what a run contains; a resume may change them
_NOT_HASHED = ("device", "commit_seconds")  # settings that do not change the result
COMMIT_BYTES = 256 << 20  # buffered masks + activations that force a commit


@dataclass
class ExtractConfig:
    model: str = opt(help="zoo name (zoo-s0), local folder (./my-model) or hub id (gpt2, "
                     "EleutherAI/pythia-70m-deduped)")
    revision: str | None = opt(None, help="checkpoint: zoo subfolder (step256) or hub git "
                               "revision (step1000); default the final one")
    device: str = opt("auto", help="auto, cpu, cuda or cuda:N")
    dtype: str = opt("auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, float16, bfloat16")
    trust_remote_code: bool = opt(False, help="allow model code from the hub (off unless asked)")
    corpus: str | None = opt(None, help="stdlib, stdlib:heldout, a .txt/.jsonl/.parquet/.csv "
                             "file, or a datasets hub name (default stdlib unless --prompts)")
    prompts: str | None = opt(None, help="prompts CSV with header prompts,number_of_new_tokens,num_samples")
    dataset_config: str | None = opt(None, help="config name of a hub dataset (wikitext-2-raw-v1)")
    split: str = opt("train", help="split of a hub dataset")
    text_column: str = opt("text", help="text column of a file or dataset")
    num_samples: int = opt(64, help="corpus windows to extract")
    max_length: int = opt(128, help="tokens per corpus window")
    batch_size: int = opt(8, help="sequences per forward pass")
    seed: int = opt(42, help="sampling seed of generation")
    temperature: float = opt(0.8, help="sampling temperature of generation; 0 = greedy")
    top_k: int = opt(0, help="sample among the k most likely tokens; 0 = all")
    layers: str | None = opt(None, help="layers to record: '0-3', '0,2,5' or all (default)")
    active_threshold: float = opt(0.0, help="a neuron is active iff its activation > this")
    store_acts: bool = opt(False, help="also store dense float16 activations")
    acts_layers: str | None = opt(None, help="layers whose dense activations are stored "
                                  "(with --store-acts; default all recorded layers)")
    chunk_tokens: int = opt(2048, help="token rows per Zarr chunk (and the smallest commit)")
    commit_seconds: float = opt(1.0, help="commit a resumable checkpoint at most this often "
                                "(also once 256 MiB are buffered); 0 = every --chunk-tokens rows")
    run: str | None = opt(None, help="run name (default: a slug of model, revision and input)")

    def __post_init__(self) -> None:
        if self.corpus and self.prompts:
            raise UserError("give either --corpus or --prompts, not both")
        if not self.corpus and not self.prompts:
            self.corpus = "stdlib"
        for name in ("num_samples", "max_length", "batch_size", "chunk_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.commit_seconds < 0:
            raise UserError("--commit-seconds must be >= 0 (0 = commit every --chunk-tokens rows)")
        if self.temperature < 0:
            raise UserError("--temperature must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise UserError("--top-k must be >= 0 (0 = no top-k filter)")
        if self.run is not None:
            validate_run_id(self.run)

    @property
    def input_kind(self) -> str:
        return "prompts" if self.prompts else "corpus"

    @property
    def run_id(self) -> str:
        if self.run:
            return self.run
        source = Path(self.prompts).stem if self.prompts else Path(self.corpus).name.split(":")[0]
        return slug(Path(self.model).name, self.revision or "", source)

    def config_hash(self) -> str:
        d = {k: v for k, v in to_dict(self).items() if k not in _NOT_HASHED}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


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


def check_existing(storage: Storage, run_id: str, config_hash: str, overwrite: bool) -> dict | None:
    """The existing manifest of a run with this configuration, if any; refuses a clash."""
    path = storage.run_manifest(run_id)
    if not path.exists():
        return None
    manifest = read_json(path)
    if manifest.get("config_hash") == config_hash:
        return manifest
    if not overwrite:
        raise UserError(
            f"run {run_id!r} already exists with a different configuration: pass --overwrite "
            "to replace it, or --run with a new name"
        )
    return None


# -- work units: a batch of corpus windows, or all samples of one prompt


@dataclass
class Unit:
    index: int
    input_ids: Any  # torch.LongTensor [sequences, length] (prompts: filled by generation)
    prompt: int | None = None
    prompt_len: int = 0


def _corpus_units(config: ExtractConfig, tokenizer) -> Iterator[Unit]:
    import torch

    from pipeline.core.inputs import iter_documents, iter_windows

    docs = iter_documents(config.corpus, dataset_config=config.dataset_config,
                          split=config.split, text_column=config.text_column)
    windows = iter_windows(docs, tokenizer, max_length=config.max_length,
                           num_samples=config.num_samples)
    batch: list[list[int]] = []
    index = 0
    for window in windows:
        batch.append(window)
        if len(batch) == config.batch_size:
            yield Unit(index, torch.tensor(batch, dtype=torch.long))
            batch, index = [], index + 1
    if batch:
        yield Unit(index, torch.tensor(batch, dtype=torch.long))


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
    """Buffers one commit's rows, then writes masks, activations, tokens, state and manifest."""

    def __init__(self, storage: Storage, run_id: str, manifest: dict, group, layers: list[int],
                 dense_layers: list[int], widths: dict[int, int], chunk_rows: int,
                 moments: dict[int, NeuronMoments], write_threads: int = 1):
        self.storage, self.run_id, self.manifest, self.group = storage, run_id, manifest, group
        self.layers, self.dense_layers, self.moments = layers, dense_layers, moments
        self.active = {
            l: arrays.ensure_rows_array(group, f"active/L{l}", width=arrays.packed_width(widths[l]),
                                        dtype="uint8", chunk_rows=chunk_rows, compress=True)
            for l in layers
        }
        self.acts = {
            l: arrays.ensure_rows_array(group, f"acts/L{l}", width=widths[l], dtype="float16",
                                        chunk_rows=chunk_rows, compress=False)
            for l in dense_layers
        }
        self.next_row = manifest["committed"]["rows"]
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pool = ThreadPoolExecutor(max_workers=write_threads, thread_name_prefix="nwh-write")
        self._reset()

    def _reset(self) -> None:
        self.packed: dict[int, list[np.ndarray]] = {l: [] for l in self.layers}
        self.dense: dict[int, list[np.ndarray]] = {l: [] for l in self.dense_layers}
        self.token_cols: list[dict[str, np.ndarray]] = []
        self.rows = 0
        self.nbytes = 0
        self.started = time.perf_counter()

    def add(self, packed: dict[int, np.ndarray], dense: dict[int, np.ndarray],
            token_cols: dict[str, Any]) -> None:
        for l, block in packed.items():
            self.packed[l].append(block)
            self.nbytes += block.nbytes
        for l, block in dense.items():
            self.dense[l].append(block)
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
                   packed={l: np.concatenate(b) for l, b in self.packed.items() if b},
                   dense={l: np.concatenate(b) for l, b in self.dense.items() if b},
                   tokens={k: np.concatenate([c[k] for c in self.token_cols])
                           for k in self.token_cols[0]} if self.token_cols else None,
                   moments={l: m.copy() for l, m in self.moments.items()})
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
            writes = [(self.active[l], block) for l, block in job["packed"].items()]
            writes += [(self.acts[l], block) for l, block in job["dense"].items()]
            # one array per thread where the forward runs on an accelerator: compression and
            # file writes release the GIL, and these writes, not the forward, bound the rate
            list(self._pool.map(lambda w: arrays.write_rows(w[0], start, w[1]), writes))
            if job["tokens"] is not None:
                tables.write_part(self.storage, "tokens", self.run_id, job["tokens"],
                                  part=f"part-{start:012d}")
            committed = self.manifest["committed"]
            state_dir = self.storage.run_dir(self.run_id) / "state"
            state_name = f"moments-{start + job['rows']:012d}.npz"
            save_states(state_dir / state_name, job["moments"])
            old_state = committed.get("state")
            committed.update(rows=start + job["rows"], units=job["units"],
                             samples=job["samples"], state=state_name)
            write_json(self.storage.run_manifest(self.run_id), self.manifest)
            if old_state and old_state != state_name:
                (state_dir / old_state).unlink(missing_ok=True)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by wait()
            self._error = e


def extract(config: ExtractConfig, storage: Storage, *, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Run (or resume) an extraction; returns the finished run's manifest."""
    import torch
    from tqdm.auto import tqdm

    from pipeline.models.hooks import capture_neurons
    from pipeline.core.inputs import read_prompts
    from pipeline.models.loading import load_model

    run_id = config.run_id
    storage.ensure_writable()
    config_hash = config.config_hash()
    existing = check_existing(storage, run_id, config_hash, overwrite)
    if existing and existing.get("status") == "finished":
        log.info("run %s is already finished with this configuration: nothing to do", run_id)
        return existing

    # validate every input before touching what is on disk
    prompts = read_prompts(config.prompts) if config.prompts else None
    loaded = load_model(config.model, config.revision, storage=storage, device=config.device,
                        dtype=config.dtype, trust_remote_code=config.trust_remote_code,
                        for_generation=prompts is not None)
    layers = parse_layers(config.layers, loaded.n_layers)
    dense_layers = parse_layers(config.acts_layers, loaded.n_layers) if config.store_acts else []
    if set(dense_layers) - set(layers):
        raise UserError(f"--acts-layers {config.acts_layers!r} names layers not in --layers "
                        f"{config.layers!r}: store dense activations only of recorded layers")
    if prompts is not None and not loaded.is_causal:
        raise UserError(f"model {config.model!r} is an encoder and cannot generate: use --corpus")
    widths = {l: loaded.widths[l] for l in layers}
    offsets = loaded.layer_offsets
    tokenizer, device = loaded.tokenizer, loaded.device

    if prompts is None:
        units = _corpus_units(config, tokenizer)
        first = next(units, None)  # reads the corpus now, so a bad one fails before any write
        if first is None:
            raise UserError(f"corpus {config.corpus!r} gives no window of {config.max_length} "
                            "tokens: lower --max-length or give more text")
        units = itertools.chain([first], units)
        total = config.num_samples * config.max_length
    else:
        encoded = [tokenizer(p.text)["input_ids"] for p in prompts]
        limit = getattr(loaded.model.config, "max_position_embeddings", None) or getattr(
            loaded.model.config, "n_positions", None)
        for i, (p, ids) in enumerate(zip(prompts, encoded)):
            if limit and len(ids) + p.new_tokens > limit:
                raise UserError(f"prompt {i} needs {len(ids) + p.new_tokens} positions but the "
                                f"model has {limit}: lower number_of_new_tokens")
        units = (Unit(i, None, prompt=i, prompt_len=len(ids)) for i, ids in enumerate(encoded))
        total = sum(p.num_samples * (len(ids) + p.new_tokens) for p, ids in zip(prompts, encoded))


    if existing is None:
        remove_run(storage, run_id)  # --overwrite of another configuration, or debris
        manifest = {
            "run_id": run_id, "status": "running", "config": to_dict(config),
            "config_hash": config_hash, "versions": library_versions(),
            "model": {"name": config.model, "revision": loaded.revision, "source": loaded.source,
                      "path": str(loaded.path) if loaded.path else None,
                      "family": loaded.adapter.family, "n_layers": loaded.n_layers,
                      "widths": loaded.widths, "layers": layers, "dense_layers": dense_layers,
                      "sites": [loaded.sites[l].name for l in layers]},
            "committed": {"rows": 0, "units": 0, "samples": 0, "state": None},
            "timings": {"started": _now(), "seconds": 0.0},
        }
        write_json(storage.run_manifest(run_id), manifest)
        moments = {l: NeuronMoments(widths[l], config.active_threshold) for l in layers}
        log.info("run %s: extracting %s", run_id, config.prompts or config.corpus)
    else:
        manifest = existing
        committed = manifest["committed"]
        state = committed.get("state")
        state_path = storage.run_dir(run_id) / "state" / str(state)
        moments = (load_states(state_path, layers) if state else
                   {l: NeuronMoments(widths[l], config.active_threshold) for l in layers})
        for part in storage.table_partition("tokens", run_id).glob("part-*.parquet"):
            if int(part.stem.split("-")[1]) >= committed["rows"]:
                part.unlink()  # written after the last commit
        log.info("run %s: resuming after %d committed rows", run_id, committed["rows"])

    group = arrays.open_group(storage.arrays(run_id))
    arrays.truncate_rows(group, manifest["committed"]["rows"])
    rows_per_unit = config.batch_size * config.max_length
    chunk_rows = (rows_per_unit * max(1, round(config.chunk_tokens / rows_per_unit))
                  if prompts is None else config.chunk_tokens)
    # on the CPU the forward needs every core: one writer thread; on a GPU several
    write_threads = 1 if device.type == "cpu" else min(8, os.cpu_count() or 1)
    writer = _Writer(storage, run_id, manifest, group, layers, dense_layers, widths,
                     chunk_rows, moments, write_threads)

    token_text = _TokenText(tokenizer)
    if device.type == "cpu":
        import pipeline.kernels.bitkernels  # noqa: F401  (import numba, load the compiled kernels before the clock starts)
    base = loaded.adapter.base_model(loaded.model)
    done_units = manifest["committed"]["units"]
    row = manifest["committed"]["rows"]
    sample = manifest["committed"]["samples"]
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=row, unit="tok", unit_scale=True, disable=not progress,
               desc=f"extract {run_id}", smoothing=0.1)
    captured: dict[int, Any] = {}
    try:
        with torch.inference_mode(), capture_neurons(
            loaded.sites, layers, on_batch=lambda l, x: captured.__setitem__(l, x)
        ):
            for unit in units:
                if unit.index < done_units:
                    continue  # committed before an interruption
                if prompts is not None:
                    unit.input_ids = _generate_unit(loaded, prompts[unit.index], encoded[unit.index],
                                                    config, unit.index)
                ids = unit.input_ids.to(device)
                captured.clear()
                base(input_ids=ids)
                n_seq, length = ids.shape
                n = n_seq * length
                packed, dense = {}, {}
                num_active = np.zeros(n, np.int32)
                for l in layers:
                    acts = captured[l].reshape(n, widths[l])
                    packed[l], active_per_row = moments[l].update_and_pack(acts)
                    num_active += active_per_row
                    if l in dense_layers:
                        dense[l] = acts.to(torch.float16).cpu().numpy()
                ids_np = unit.input_ids.reshape(-1).numpy().astype(np.int32)
                positions = np.tile(np.arange(length, dtype=np.int32), n_seq)
                is_prompt = prompts is not None
                writer.add(packed, dense, {
                    "row": np.arange(row, row + n, dtype=np.int64),
                    "sample": np.repeat(np.arange(sample, sample + n_seq, dtype=np.int32), length),
                    "prompt": np.full(n, unit.prompt if is_prompt else -1, np.int32),
                    "prompt_sample": np.repeat(np.arange(n_seq, dtype=np.int32), length)
                    if is_prompt else np.full(n, -1, np.int32),
                    "position": positions,
                    "token_id": ids_np,
                    "token": np.array(token_text(ids_np), dtype=object),
                    "generated": positions >= unit.prompt_len if is_prompt else np.zeros(n, bool),
                    "num_active": num_active,
                })
                row, sample = row + n, sample + n_seq
                bar.update(n)
                if writer.due(chunk_rows, config.commit_seconds):
                    writer.commit(unit.index + 1, sample)
                done_units = unit.index + 1
        writer.commit(done_units, sample)
        writer.wait()
    finally:
        bar.close()
        writer.drain()  # an interrupted run still finishes the commit in flight
    seconds = manifest["timings"]["seconds"] + time.perf_counter() - t0
    manifest["timings"]["seconds"] = seconds
    _finish(storage, run_id, manifest, config, loaded, layers, offsets, moments, row, sample)
    log.info("run %s: %d rows in %.1f s (%.0f tok/s)", run_id, row, seconds,
             row / max(seconds, 1e-9))
    return manifest


def _generate_unit(loaded, prompt, prompt_ids, config: ExtractConfig, index: int):
    from pipeline.models.generation import generate, prompt_generator

    generator = prompt_generator(config.seed, index)
    return generate(loaded.model, prompt_ids, new_tokens=prompt.new_tokens,
                    num_samples=prompt.num_samples, temperature=config.temperature,
                    top_k=config.top_k, generator=generator, device=loaded.device).cpu()


def _finish(storage, run_id, manifest, config, loaded, layers, offsets, moments, rows, samples):
    stats_cols: dict[str, list[np.ndarray]] = {}
    neuron_cols: dict[str, list] = {k: [] for k in
                                    ("neuron_id", "layer", "neuron", "layer_offset",
                                     "layer_width", "site")}
    for l in layers:
        width = moments[l].width
        ids = offsets[l] + np.arange(width, dtype=np.int64)
        cols = {"neuron_id": ids, "layer": np.full(width, l, np.int32),
                "neuron": np.arange(width, dtype=np.int32), **moments[l].columns()}
        for k, v in cols.items():
            stats_cols.setdefault(k, []).append(v)
        neuron_cols["neuron_id"].append(ids)
        neuron_cols["layer"].append(np.full(width, l, np.int32))
        neuron_cols["neuron"].append(np.arange(width, dtype=np.int32))
        neuron_cols["layer_offset"].append(np.full(width, offsets[l], np.int64))
        neuron_cols["layer_width"].append(np.full(width, width, np.int32))
        neuron_cols["site"].append(np.full(width, loaded.sites[l].name, object))
    tables.write_part(storage, "neuron_stats", run_id,
                      {k: np.concatenate(v) for k, v in stats_cols.items()})
    tables.write_part(storage, "neurons", run_id,
                      {k: np.concatenate(v) for k, v in neuron_cols.items()})
    finished = _now()
    tables.write_part(storage, "runs", run_id, {
        "model": [config.model], "revision": [loaded.revision], "source": [loaded.source],
        "input_kind": [config.input_kind], "input": [config.prompts or config.corpus],
        "num_rows": [rows], "num_samples": [samples], "num_layers": [len(layers)],
        "num_neurons": [int(sum(moments[l].width for l in layers))],
        "active_threshold": [config.active_threshold], "finished_at": [finished],
        "seconds": [manifest["timings"]["seconds"]],
    })
    state = manifest["committed"].get("state")
    manifest.update(status="finished")
    manifest["committed"]["state"] = None
    manifest["timings"]["finished"] = finished
    manifest["timings"]["tokens_per_s"] = rows / max(manifest["timings"]["seconds"], 1e-9)
    manifest["rows"], manifest["samples"] = rows, samples
    write_json(storage.run_manifest(run_id), manifest)
    if state:
        shutil.rmtree(storage.run_dir(run_id) / "state", ignore_errors=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- CLI


def register(sub) -> None:
    from pipeline.cli import add_stage_parser

    parser = add_stage_parser(
        sub, "extract", "Stream neuron activations of a model into the warehouse.",
        "  nwh extract --model zoo-s0 --corpus stdlib --num-samples 256\n"
        "  nwh extract --model zoo-s0 --revision step64 --layers 0-1 --store-acts\n"
        "  nwh extract --model zoo-s1 --prompts prompts.csv --temperature 0.8 --top-k 50\n"
        "  nwh extract --model gpt2 --corpus wikitext --dataset-config wikitext-2-raw-v1\n",
        progress=True,
    )
    add_arguments(parser, ExtractConfig)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run of the same name with a different configuration")
    parser.set_defaults(handler=_cli)


def _cli(args) -> int:
    from pipeline.cli import echo

    config = from_args(ExtractConfig, args)
    storage = Storage(args.storage)
    before = storage.run_manifest(config.run_id)
    was_finished = before.exists() and read_json(before).get("status") == "finished"
    manifest = extract(config, storage, overwrite=args.overwrite, progress=not args.quiet)
    if was_finished and manifest.get("config_hash") == config.config_hash():
        echo(f"run {config.run_id} is already finished with this configuration: nothing to do")
    else:
        t = manifest["timings"]
        echo(f"run {config.run_id}: {manifest['rows']} token rows, {manifest['samples']} "
              f"sequences, {t['tokens_per_s']:.0f} tok/s -> {storage.run_dir(config.run_id)}")
    return 0
