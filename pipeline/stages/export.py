"""Reference exports: the files of the reference activation-dataset scripts, from a run.

    nwh export --run demo-prompts --out-dir exports/ --prefix gpt2

Writes <prefix>_activation_dataset.csv, _neuron_activations.json, _neuron_attributes.csv,
_neuron_edges.el (the implicit full bipartite graph between adjacent layers, streamed line by
line), _neuron_frequency.csv and _activation_matrix.npz (matrix: samples x neurons ever active,
int32; neuron_ids: the column's neuron id; neuron_map: dict neuron id -> column, read with
allow_pickle as the reference does). Column names are those the reference readers look up
(`node_id`, `neuron_id`, `activation_count`, `sample_id`, `input_text`, `output`).
Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

import numpy as np

from pipeline.core import arrays, tables
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, atomic_path

log = logging.getLogger(__name__)

EDGE_WARNING = 10_000_000
BLOCK = 8192


def _active_rows(group, layers, widths, start, stop) -> np.ndarray:
    """Binary [rows, all recorded neurons] of a row block (layer-major columns)."""
    return np.concatenate([arrays.unpack_mask(group[f"active/L{l}"][start:stop], widths[l])
                           for l in layers], axis=1)


def export_run(storage: Storage, run: str, out_dir: Path, prefix: str, *,
               edges: bool = True) -> list[Path]:
    from pipeline.stages.frequencies import neuron_frequency

    manifest = storage.finished_run(run)
    layers, widths = manifest["model"]["layers"], manifest["model"]["widths"]
    neurons = tables.read_partition(storage, "neurons", run)
    ids = neurons["neuron_id"].to_numpy()
    group = arrays.open_group(storage.arrays(run), mode="r")
    tokens = tables.read_partition(storage, "tokens", run).to_pydict()
    rows = manifest["rows"]
    frequency_table = neuron_frequency(storage, run)
    count = dict(zip(frequency_table["neuron_id"].to_list(),
                     frequency_table["activation_count"].to_list()))
    ever = np.array([k for k, n in enumerate(ids.tolist()) if count[n] > 0], np.int64)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    matrix_blocks = []  # the activation matrix's columns of each row block, from the same read

    # token-level dataset and active ids per row, streamed over row blocks
    dataset = out_dir / f"{prefix}_activation_dataset.csv"
    acts_json = out_dir / f"{prefix}_neuron_activations.json"
    prompts = _prompt_texts(manifest, tokens)
    with atomic_path(dataset) as tmp_csv, atomic_path(acts_json) as tmp_json:
        with open(tmp_csv, "w", newline="") as fc, open(tmp_json, "w") as fj:
            writer = csv.writer(fc)
            writer.writerow(["sample_id", "prompt_sample_idx", "token_position", "input_text",
                             "output", "output_id", "number_of_active_neurons"]
                            + [f"layer_{l}_num_active_neurons" for l in layers])
            fj.write("{")
            offsets = np.concatenate([[0], np.cumsum([widths[l] for l in layers])])
            for start in range(0, rows, BLOCK):
                stop = min(start + BLOCK, rows)
                block = _active_rows(group, layers, widths, start, stop)
                matrix_blocks.append(block[:, ever].astype(np.int32))
                for k, r in enumerate(range(start, stop)):
                    per_layer = [int(block[k, offsets[i]:offsets[i + 1]].sum())
                                 for i in range(len(layers))]
                    writer.writerow([r, tokens["prompt_sample"][r], tokens["position"][r],
                                     prompts[tokens["sample"][r]], tokens["token"][r],
                                     tokens["token_id"][r], sum(per_layer), *per_layer])
                    active = ids[np.flatnonzero(block[k])].tolist()
                    fj.write(("," if r else "") + f'"{r}":' + json.dumps(active))
            fj.write("}")
    paths += [dataset, acts_json]

    attributes = out_dir / f"{prefix}_neuron_attributes.csv"
    with atomic_path(attributes) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["node_id", "layer", "dimension"])
        w.writerows(zip(ids.tolist(), neurons["layer"].to_pylist(), neurons["neuron"].to_pylist()))
    paths.append(attributes)

    if edges:
        paths.append(write_edge_list(out_dir / f"{prefix}_neuron_edges.el", neurons))

    frequency = out_dir / f"{prefix}_neuron_frequency.csv"
    with atomic_path(frequency) as tmp:
        frequency_table.write_csv(tmp)
    paths.append(frequency)

    # samples x neurons that were ever active, as the reference builds it; int32 so that its
    # per-edge np.dot of two columns counts exactly (a uint8 dot wraps at 256)
    matrix_path = out_dir / f"{prefix}_activation_matrix.npz"
    matrix = (np.concatenate(matrix_blocks) if matrix_blocks
              else np.zeros((0, len(ever)), np.int32))
    neuron_ids = ids[ever]
    # the reference reads neuron_map with allow_pickle and .item(): a dict neuron id -> column
    neuron_map = np.array({int(n): k for k, n in enumerate(neuron_ids.tolist())}, dtype=object)
    with atomic_path(matrix_path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, matrix=matrix, neuron_ids=neuron_ids, neuron_map=neuron_map)
    paths.append(matrix_path)
    return paths


def _prompt_texts(manifest: dict, tokens: dict) -> dict[int, str]:
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


def register(sub) -> None:
    from pipeline.cli import add_stage_parser

    parser = add_stage_parser(
        sub, "export", "Write a run as the reference scripts' files (CSV, JSON, .el, .npz).",
        "  nwh export --run demo-prompts --out-dir exports --prefix gpt2\n"
        "  nwh export --run demo-corpus --out-dir exports --no-edges\n")
    parser.add_argument("--run", required=True, help="an extraction run")
    parser.add_argument("--out-dir", required=True, help="folder for the files")
    parser.add_argument("--prefix", help="file name prefix (default: the run's model name)")
    parser.add_argument("--edges", action=argparse.BooleanOptionalAction,
                        default=True, help="write the full edge list (large for big models)")
    parser.set_defaults(handler=_cli)


def _cli(args) -> int:
    from pipeline.cli import echo
    from pipeline.core.storage import read_json

    storage = Storage(args.storage)
    if not storage.run_manifest(args.run).exists():
        raise UserError(f"run {args.run!r} does not exist in {storage.root}: extract it first")
    prefix = args.prefix or Path(read_json(storage.run_manifest(args.run))["model"]["name"]).name
    for p in export_run(storage, args.run, Path(args.out_dir), prefix, edges=args.edges):
        echo(p)
    return 0
