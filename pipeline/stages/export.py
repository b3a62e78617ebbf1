"""Reference exports: the files of the reference activation-dataset scripts, from a run.

    nwh export --run demo-prompts --out-dir exports/ --prefix gpt2

Writes <prefix>_activation_dataset.csv, _neuron_activations.json, _neuron_attributes.csv,
_neuron_edges.el (the implicit full bipartite graph between adjacent layers, streamed line by
line), _neuron_frequency.csv and _activation_matrix.npz (matrix: samples x neurons ever active,
int32; neuron_ids: the column's neuron id; neuron_map: dict neuron id -> column, read with
allow_pickle as the reference does). Column names are those the reference readers look up
(`node_id`, `neuron_id`, `activation_count`, `sample_id`, `input_text`, `output`).
Every file is written to a temporary name and renamed; an --out-dir that is a file is refused.
The files are streamed in blocks of token rows (tokens, masks and matrix rows alike), so memory
stays bounded by a block, not by the run's rows.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.core import arrays, tables
from pipeline.core.config import Stage, config_hash, opt, to_dict
from pipeline.core.errors import UserError
from pipeline.core.storage import Marker, Storage, atomic_path, validate_run_id

log = logging.getLogger(__name__)

EDGE_WARNING = 10_000_000
BLOCK_BYTES = 64 << 20  # unpacked masks + int32 matrix rows held per block
TOKEN_COLUMNS = ("row", "sample", "prompt_sample", "position", "token", "token_id", "generated")


def _active_rows(group, layers, widths, start, stop) -> np.ndarray:
    """Binary [rows, all recorded neurons] of a row block (layer-major columns)."""
    return np.concatenate([arrays.unpack_mask(group[f"active/L{l}"][start:stop], widths[l])
                           for l in layers], axis=1)


def block_rows_for(neurons: int, budget: int = BLOCK_BYTES) -> int:
    """Token rows per block: ~10 B per neuron and row are live at once (unpacked bits, their
    bools, the layer-major concatenation, the int32 matrix rows)."""
    return max(1, min(8192, budget // max(1, 10 * neurons)))


@dataclass(kw_only=True)
class ExportConfig:
    run: str = opt(help="an extraction run")
    out_dir: str = opt(help="folder for the files (created if missing)")
    prefix: str | None = opt(None, help="file name prefix (default: the run's model name)")
    edges: bool = opt(True, help="write the full edge list (large for big models)")
    overwrite: bool = opt(False, help="write the files again even if this export is finished",
                          hash=False)
    block_rows: int | None = opt(None, help="token rows per block (default: ~64 MiB of masks)",
                                 cli=False, hash=False)

    def __post_init__(self) -> None:
        validate_run_id(self.run)
        out = Path(self.out_dir)
        for folder in (out, *out.parents):
            if os.path.lexists(folder):
                where = "" if folder == out else f": its parent {str(folder)!r}"
                if folder.is_symlink() and not folder.exists():
                    raise UserError(f"--out-dir {self.out_dir!r}{where} is a link to a missing "
                                    "path: give a folder")
                if not folder.is_dir():
                    raise UserError(f"--out-dir {self.out_dir!r}{where} is a file: give a folder")
                break
        if self.block_rows is not None and self.block_rows < 1:
            raise UserError(f"block_rows must be at least 1, got {self.block_rows}")
        if self.prefix is not None and (not self.prefix or "/" in self.prefix
                                        or self.prefix.startswith(".")):
            raise UserError(f"--prefix {self.prefix!r} must be a plain file name prefix")


@dataclass
class ExportResult:
    paths: list[Path]
    skipped: bool = False   # finished before with this configuration


def run(config: ExportConfig, storage: Storage) -> ExportResult:
    """The reference scripts' files of a run, each written to a temporary name and renamed."""
    manifest = storage.finished_run(config.run)
    prefix = config.prefix or Path(manifest["model"]["name"]).name
    out_dir = Path(config.out_dir)
    # the marker lies beside the files; the hash sees the extraction it was made from
    marker = Marker(out_dir / f".{prefix}_export.json")
    digest = config_hash(config, extraction=manifest.get("config_hash"), rows=manifest["rows"])
    done = None if config.overwrite else marker.done(digest)
    if done is not None and all(Path(p).exists() for p in done["paths"]):
        return ExportResult([Path(p) for p in done["paths"]], skipped=True)
    names = ["activation_dataset.csv", "neuron_activations.json", "neuron_attributes.csv",
             *(["neuron_edges.el"] if config.edges else []), "neuron_frequency.csv",
             "activation_matrix.npz"]
    dataset, acts_json, attributes, *edges, frequency, matrix = [
        out_dir / f"{prefix}_{n}" for n in names]
    for path in (dataset, acts_json, attributes, *edges, frequency, matrix):
        if path.is_dir():  # checked before any file is written: a rename onto it would fail late
            raise UserError(f"{str(path)!r} is a folder: move it away or pick another --prefix")
    out_dir.mkdir(parents=True, exist_ok=True)
    neurons = tables.read_partition(storage, "neurons", config.run)
    frequency_table = _neuron_frequency(storage, config.run)
    count_of = dict(zip(frequency_table["neuron_id"].to_list(),
                        frequency_table["activation_count"].to_list()))
    ids = neurons["neuron_id"].to_numpy()
    ever = np.flatnonzero([count_of[n] > 0 for n in ids.tolist()])  # columns of the masks
    block = config.block_rows or block_rows_for(len(ids))
    write_token_files(storage, config.run, manifest, dataset, acts_json, matrix, ids, ever, block)
    write_attributes(attributes, neurons)
    if edges:
        write_edge_list(edges[0], neurons)
    with atomic_path(frequency) as tmp:
        frequency_table.write_csv(tmp)
    paths = [dataset, acts_json, attributes, *edges, frequency, matrix]
    marker.write(to_dict(config), digest, paths=[str(p) for p in paths])
    return ExportResult(paths)


def _neuron_frequency(storage: Storage, run: str):
    """sql/neuron_frequency.sql: the reference neuron_frequency.csv, one row per neuron in
    neuron_id order (the order of the neurons table)."""
    from pipeline.core.warehouse import run_query

    return run_query(storage, "neuron_frequency", run_id=run)


def write_token_files(storage: Storage, run: str, manifest: dict, dataset: Path, acts_json: Path,
                      matrix: Path, ids: np.ndarray, ever: np.ndarray, block_rows: int) -> None:
    """The token-level dataset CSV, the active ids per row (JSON) and the activation matrix
    (.npz), streamed together over blocks of rows from one read of the tokens and the masks;
    the matrix's columns are the neurons `ever` active."""
    rows = manifest["rows"]
    layers, widths = manifest["model"]["layers"], manifest["model"]["widths"]
    group = arrays.open_group(storage.arrays(run), mode="r")
    offsets = np.concatenate([[0], np.cumsum([widths[l] for l in layers])])
    with atomic_path(dataset) as tmp_csv, atomic_path(acts_json) as tmp_json, \
            atomic_path(matrix) as tmp_npz:
        with open(tmp_csv, "w", newline="") as fc, open(tmp_json, "w") as fj, \
                _MatrixWriter(tmp_npz, rows, len(ever)) as fm:
            writer = csv.writer(fc)
            writer.writerow(["sample_id", "prompt_sample_idx", "token_position", "input_text",
                             "output", "output_id", "number_of_active_neurons"]
                            + [f"layer_{l}_num_active_neurons" for l in layers])
            fj.write("{")
            done = 0
            for tokens, texts in _token_blocks(storage, run, block_rows):
                start = done
                for a in range(0, len(tokens["row"]), block_rows):
                    b = min(a + block_rows, len(tokens["row"]))
                    block = _active_rows(group, layers, widths, start + a, start + b)
                    # int32: the reference's per-edge np.dot of two columns counts exactly
                    fm.write(block[:, ever].astype(np.int32))
                    per_layer = np.add.reduceat(block, offsets[:-1], axis=1, dtype=np.int64)
                    for k in range(b - a):
                        r = tokens["row"][a + k]
                        writer.writerow([r, tokens["prompt_sample"][a + k],
                                         tokens["position"][a + k], texts[tokens["sample"][a + k]],
                                         tokens["token"][a + k], tokens["token_id"][a + k],
                                         int(per_layer[k].sum()), *per_layer[k].tolist()])
                        active = ids[np.flatnonzero(block[k])].tolist()
                        fj.write(("," if r else "") + f'"{r}":' + json.dumps(active))
                done += len(tokens["row"])
            if done != rows:
                raise UserError(f"run {run!r} has {done} token rows but its manifest says {rows}: "
                                "re-extract it (--overwrite)")
            fj.write("}")
            fm.finish(ids[ever])


def _token_blocks(storage: Storage, run: str, block_rows: int) -> Iterator[tuple[dict, dict]]:
    """The tokens table in row order, in blocks of whole samples of about block_rows rows (one
    sample may make a block longer): (columns, input text of each sample in the block)."""
    import pyarrow.parquet as pq

    parts = sorted(storage.table_partition("tokens", run).glob("*.parquet"))
    pending: dict[str, list] = {c: [] for c in TOKEN_COLUMNS}
    expected = 0
    for part in parts:
        for batch in pq.ParquetFile(part).iter_batches(batch_size=block_rows,
                                                       columns=list(TOKEN_COLUMNS)):
            cols = batch.to_pydict()
            if cols["row"] and cols["row"][0] != expected:
                raise UserError(f"the tokens table of run {run!r} is not in row order at row "
                                f"{expected} ({part.name}): re-extract it (--overwrite)")
            expected += len(cols["row"])
            for c in TOKEN_COLUMNS:
                pending[c] += cols[c]
            if len(pending["row"]) >= block_rows:
                # cut before the last sample: it may go on in the next batch
                samples = pending["sample"]
                cut = len(samples)
                while cut > 0 and samples[cut - 1] == samples[-1]:
                    cut -= 1
                if cut:
                    head = {c: v[:cut] for c, v in pending.items()}
                    pending = {c: v[cut:] for c, v in pending.items()}
                    yield head, _sample_texts(head)
    if pending["row"]:
        yield pending, _sample_texts(pending)


def _sample_texts(tokens: dict) -> dict[int, str]:
    """Input text per sample: the prompt for generated samples, the window text for a corpus
    (every sample of the block is whole)."""
    texts: dict[int, list[str]] = {s: [] for s in tokens["sample"]}
    for s, tok, generated in zip(tokens["sample"], tokens["token"], tokens["generated"]):
        if not generated:
            texts[s].append(tok)
    return {s: "".join(parts) for s, parts in texts.items()}


class _MatrixWriter:
    """The reference's _activation_matrix.npz written row block by row block: a zip (deflated,
    as np.savez_compressed writes it) whose matrix.npy member is streamed after its header."""

    def __init__(self, path: Path, rows: int, columns: int):
        self.path, self.shape, self.written = path, (rows, columns), 0

    def __enter__(self) -> "_MatrixWriter":
        self.zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_DEFLATED,
                                   allowZip64=True)
        self.member = self.zip.open("matrix.npy", "w", force_zip64=True)
        np.lib.format.write_array_header_1_0(self.member, {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)), "fortran_order": False,
            "shape": self.shape})
        return self

    def write(self, block: np.ndarray) -> None:
        # a byte view, not a copy: zipfile takes any buffer and counts its len() in bytes
        self.member.write(np.ascontiguousarray(block, dtype=np.int32).reshape(-1).view(np.uint8))
        self.written += block.shape[0]

    def finish(self, neuron_ids: np.ndarray) -> None:
        """Close the matrix and add neuron_ids and neuron_map; the reference reads neuron_map
        with allow_pickle and .item(): a dict neuron id -> column."""
        assert self.written == self.shape[0], (self.written, self.shape)
        self.member.close()
        neuron_map = np.array({int(n): k for k, n in enumerate(neuron_ids.tolist())},
                              dtype=object)
        for name, value in (("neuron_ids", neuron_ids), ("neuron_map", neuron_map)):
            with self.zip.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=True)

    def __exit__(self, *exc) -> None:
        if not self.member.closed:
            self.member.close()
        self.zip.close()


def write_attributes(path: Path, neurons) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["node_id", "layer", "dimension"])
        w.writerows(zip(neurons["neuron_id"].to_pylist(), neurons["layer"].to_pylist(),
                        neurons["neuron"].to_pylist()))
    return path


def write_edge_list(path: Path, neurons) -> Path:
    """Every neuron of layer l to every neuron of layer l+1, one 'u v' line each, streamed."""
    layer = neurons["layer"].to_numpy()
    ids = neurons["neuron_id"].to_numpy()
    layers = sorted(set(layer.tolist()))
    total = sum(int((layer == a).sum()) * int((layer == b).sum())
                for a, b in zip(layers[:-1], layers[1:]) if b == a + 1)
    if total > EDGE_WARNING:
        log.warning("the full edge list has %d edges (about %.1f GB): it is written line by line",
                    total, total * 14 / 1e9)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for a, b in zip(layers[:-1], layers[1:]):
            if b != a + 1:
                continue
            targets = ids[layer == b]
            tail = "\n".join(map(str, targets.tolist()))
            for u in ids[layer == a].tolist():
                prefix = f"{u} "
                f.write(prefix + tail.replace("\n", "\n" + prefix) + "\n")
    return path


def show(result: ExportResult) -> str:
    head = ["export is finished with this configuration: nothing to do (--overwrite writes it "
            "again)"] if result.skipped else []
    return "\n".join(head + [str(p) for p in result.paths])


STAGES = [Stage(
    "export", "Write a run as the reference scripts' files (CSV, JSON, .el, .npz).",
    "  nwh export --run demo-prompts --out-dir exports --prefix gpt2\n"
    "  nwh export --run demo-corpus --out-dir exports --no-edges\n",
    ExportConfig, run, show)]
