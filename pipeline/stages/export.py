"""Reference exports: the files of the reference activation-dataset scripts, from a run.

    nwh export --run demo-prompts --out-dir exports/ --prefix gpt2

Writes <prefix>_activation_dataset.csv, _neuron_activations.json, _neuron_attributes.csv,
_neuron_edges.el (the implicit full bipartite graph between adjacent layers, streamed line by
line), _neuron_frequency.csv and _activation_matrix.npz (matrix: samples x neurons ever active,
int32; neuron_ids: the column's neuron id; neuron_map: dict neuron id -> column, read with
allow_pickle as the reference does). Column names are those the reference readers look up
(`node_id`, `neuron_id`, `activation_count`, `sample_id`, `input_text`, `output`).
Every file is written to a temporary name and renamed; an --out-dir that is a file is refused.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import arrays, tables
from pipeline.core.config import Stage, config_hash, opt, to_dict
from pipeline.core.errors import UserError
from pipeline.core.storage import Marker, Storage, atomic_path, validate_run_id

log = logging.getLogger(__name__)

EDGE_WARNING = 10_000_000
BLOCK = 8192


def _active_rows(group, layers, widths, start, stop) -> np.ndarray:
    """Binary [rows, all recorded neurons] of a row block (layer-major columns)."""
    return np.concatenate([arrays.unpack_mask(group[f"active/L{l}"][start:stop], widths[l])
                           for l in layers], axis=1)


@dataclass(kw_only=True)
class ExportConfig:
    run: str = opt(help="an extraction run")
    out_dir: str = opt(help="folder for the files (created if missing)")
    prefix: str | None = opt(None, help="file name prefix (default: the run's model name)")
    edges: bool = opt(True, help="write the full edge list (large for big models)")
    overwrite: bool = opt(False, help="write the files again even if this export is finished",
                          hash=False)

    def __post_init__(self) -> None:
        validate_run_id(self.run)
        out = Path(self.out_dir)
        for folder in (out, *out.parents):
            if folder.exists():
                if not folder.is_dir():
                    where = "" if folder == out else f": its parent {str(folder)!r}"
                    raise UserError(f"--out-dir {self.out_dir!r}{where} is a file: give a folder")
                break
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
    out_dir.mkdir(parents=True, exist_ok=True)
    neurons = tables.read_partition(storage, "neurons", config.run)
    frequency_table = _neuron_frequency(storage, config.run)
    count_of = dict(zip(frequency_table["neuron_id"].to_list(),
                        frequency_table["activation_count"].to_list()))
    ids = neurons["neuron_id"].to_numpy()
    ever = np.flatnonzero([count_of[n] > 0 for n in ids.tolist()])  # columns of the masks
    dataset, acts_json = (out_dir / f"{prefix}_activation_dataset.csv",
                          out_dir / f"{prefix}_neuron_activations.json")
    matrix = write_token_files(storage, config.run, manifest, dataset, acts_json, ids, ever)
    paths = [dataset, acts_json, write_attributes(out_dir / f"{prefix}_neuron_attributes.csv",
                                                  neurons)]
    if config.edges:
        paths.append(write_edge_list(out_dir / f"{prefix}_neuron_edges.el", neurons))
    frequency = out_dir / f"{prefix}_neuron_frequency.csv"
    with atomic_path(frequency) as tmp:
        frequency_table.write_csv(tmp)
    paths.append(frequency)
    paths.append(write_matrix(out_dir / f"{prefix}_activation_matrix.npz", matrix,
                              ids[ever]))
    marker.write(to_dict(config), digest, paths=[str(p) for p in paths])
    return ExportResult(paths)


def _neuron_frequency(storage: Storage, run: str):
    """sql/neuron_frequency.sql: the reference neuron_frequency.csv, one row per neuron in
    neuron_id order (the order of the neurons table)."""
    from pipeline.core.warehouse import run_query

    return run_query(storage, "neuron_frequency", run_id=run)


def write_token_files(storage: Storage, run: str, manifest: dict, dataset: Path, acts_json: Path,
                      ids: np.ndarray, ever: np.ndarray) -> np.ndarray:
    """The token-level dataset CSV and the active ids per row (JSON), streamed over row blocks
    from one read of the masks, which also gives the activation matrix's columns `ever`."""
    rows = manifest["rows"]
    layers, widths = manifest["model"]["layers"], manifest["model"]["widths"]
    group = arrays.open_group(storage.arrays(run), mode="r")
    tokens = tables.read_partition(storage, "tokens", run).to_pydict()
    prompts = _prompt_texts(tokens)
    offsets = np.concatenate([[0], np.cumsum([widths[l] for l in layers])])
    matrix_blocks = [np.zeros((0, len(ever)), np.int32)]
    with atomic_path(dataset) as tmp_csv, atomic_path(acts_json) as tmp_json:
        with open(tmp_csv, "w", newline="") as fc, open(tmp_json, "w") as fj:
            writer = csv.writer(fc)
            writer.writerow(["sample_id", "prompt_sample_idx", "token_position", "input_text",
                             "output", "output_id", "number_of_active_neurons"]
                            + [f"layer_{l}_num_active_neurons" for l in layers])
            fj.write("{")
            for start in range(0, rows, BLOCK):
                stop = min(start + BLOCK, rows)
                block = _active_rows(group, layers, widths, start, stop)
                matrix_blocks.append(block[:, ever].astype(np.int32))
                per_layer = np.add.reduceat(block, offsets[:-1], axis=1, dtype=np.int64)
                for k, r in enumerate(range(start, stop)):
                    writer.writerow([r, tokens["prompt_sample"][r], tokens["position"][r],
                                     prompts[tokens["sample"][r]], tokens["token"][r],
                                     tokens["token_id"][r], int(per_layer[k].sum()),
                                     *per_layer[k].tolist()])
                    active = ids[np.flatnonzero(block[k])].tolist()
                    fj.write(("," if r else "") + f'"{r}":' + json.dumps(active))
            fj.write("}")
    # int32: the reference's per-edge np.dot of two columns counts exactly (a uint8 dot wraps)
    return np.concatenate(matrix_blocks)


def write_attributes(path: Path, neurons) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["node_id", "layer", "dimension"])
        w.writerows(zip(neurons["neuron_id"].to_pylist(), neurons["layer"].to_pylist(),
                        neurons["neuron"].to_pylist()))
    return path


def write_matrix(path: Path, matrix: np.ndarray, neuron_ids: np.ndarray) -> Path:
    """samples x neurons that were ever active, as the reference builds it; the reference reads
    neuron_map with allow_pickle and .item(): a dict neuron id -> column."""
    neuron_map = np.array({int(n): k for k, n in enumerate(neuron_ids.tolist())}, dtype=object)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, matrix=matrix, neuron_ids=neuron_ids, neuron_map=neuron_map)
    return path


def _prompt_texts(tokens: dict) -> dict[int, str]:
    """Input text per sample: the prompt for generated samples, the window text for a corpus."""
    texts: dict[int, list[str]] = {}
    for s, tok, generated in zip(tokens["sample"], tokens["token"], tokens["generated"]):
        if not generated:
            texts.setdefault(s, []).append(tok)
    return {s: "".join(parts) for s, parts in texts.items()} | {
        s: "" for s in set(tokens["sample"]) if s not in texts}


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
