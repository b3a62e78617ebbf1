"""Reference exports match the warehouse."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from pipeline.core import arrays, tables
from pipeline.stages.export import export_run
from pipeline.stages.extract import ExtractConfig, extract
from pipeline.core.storage import Storage


@pytest.fixture(scope="module")
def exported(tmp_path_factory, micro_model_dir):
    storage = Storage(tmp_path_factory.mktemp("ex"))
    csv_path = storage.root / "p.csv"
    csv_path.write_text('prompts,number_of_new_tokens,num_samples\n"the value of",4,2\n')
    extract(ExtractConfig(model=str(micro_model_dir), prompts=str(csv_path), run="e",
                          active_threshold=0.05), storage,
            progress=False)
    out = storage.root / "out"
    paths = export_run(storage, "e", out, "gpt2")
    return storage, out, paths


def test_files_and_dataset_header(exported):
    storage, out, paths = exported
    assert sorted(p.name for p in paths) == sorted(
        f"gpt2_{n}" for n in ("activation_dataset.csv", "neuron_activations.json",
                              "neuron_attributes.csv", "neuron_edges.el", "neuron_frequency.csv",
                              "activation_matrix.npz"))
    with open(out / "gpt2_activation_dataset.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["sample_id", "prompt_sample_idx", "token_position", "input_text", "output",
                       "output_id", "number_of_active_neurons", "layer_0_num_active_neurons",
                       "layer_1_num_active_neurons", "layer_2_num_active_neurons"]
    tokens = tables.read_partition(storage, "tokens", "e").to_pydict()
    assert len(rows) - 1 == len(tokens["row"])
    assert [int(r[6]) for r in rows[1:]] == tokens["num_active"]
    assert {r[3] for r in rows[1:]} == {"the value of"}


def test_edges_line_count(exported):
    _, out, _ = exported
    lines = (out / "gpt2_neuron_edges.el").read_text().splitlines()
    assert len(lines) == 40 * 40 * 2
    assert lines[0] == "0 40" and lines[-1] == "79 119"


def test_matrix_and_json_equal_masks(exported):
    storage, out, _ = exported
    group = arrays.open_group(storage.arrays("e"), mode="r")
    masks = np.concatenate([arrays.unpack_mask(group[f"active/L{l}"][:], 40) for l in range(3)], axis=1)
    npz = np.load(out / "gpt2_activation_matrix.npz", allow_pickle=True)
    ever = np.flatnonzero(masks.any(0))
    assert 0 < ever.size < 120  # at threshold 0.05 some neurons never fire on 2 short samples
    assert npz["matrix"].dtype == np.int32 and np.array_equal(npz["matrix"], masks[:, ever])
    assert npz["neuron_ids"].tolist() == ever.tolist()
    neuron_map = npz["neuron_map"].item()  # as the reference script reads it
    assert neuron_map == {int(n): k for k, n in enumerate(ever)}
    active = json.loads((out / "gpt2_neuron_activations.json").read_text())
    assert active["3"] == np.flatnonzero(masks[3]).tolist()


def test_frequency_matches_stats(exported):
    storage, out, _ = exported
    stats = tables.read_partition(storage, "neuron_stats", "e").to_pydict()
    with open(out / "gpt2_neuron_frequency.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["activation_count"]) for r in rows] == stats["active_count"]
    assert list(rows[0]) == ["neuron_id", "layer", "dimension", "activation_count",
                             "activation_frequency"]


def test_reference_reader_counts_edges_exactly(exported):
    """The reference weighted-graph step: node weights by `neuron_id` -> `activation_count`,
    attributes by `node_id`, edge weight = int(np.dot) of two matrix columns via neuron_map."""
    storage, out, _ = exported
    with open(out / "gpt2_neuron_frequency.csv") as f:
        weights = {int(r["neuron_id"]): int(r["activation_count"]) for r in csv.DictReader(f)}
    with open(out / "gpt2_neuron_attributes.csv") as f:
        attributes = list(csv.DictReader(f))
    assert [int(r["node_id"]) for r in attributes] == sorted(weights)
    npz = np.load(out / "gpt2_activation_matrix.npz", allow_pickle=True)
    matrix, neuron_map = npz["matrix"], npz["neuron_map"].item()
    group = arrays.open_group(storage.arrays("e"), mode="r")
    masks = [arrays.unpack_mask(group[f"active/L{l}"][:], 40).astype(np.int64) for l in range(3)]
    for line in (out / "gpt2_neuron_edges.el").read_text().splitlines()[::37]:
        u, v = map(int, line.split())
        count = (int(np.dot(matrix[:, neuron_map[u]], matrix[:, neuron_map[v]]))
                 if u in neuron_map and v in neuron_map else 0)
        assert count == int(masks[u // 40][:, u % 40] @ masks[v // 40][:, v % 40])
        assert weights[u] == int(masks[u // 40][:, u % 40].sum())
