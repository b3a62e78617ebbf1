"""Reference exports match the warehouse."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from pipeline import arrays, tables
from pipeline.export import export_run
from pipeline.extract import ExtractConfig, extract
from pipeline.storage import Storage


@pytest.fixture(scope="module")
def exported(tmp_path_factory, micro_model_dir):
    storage = Storage(tmp_path_factory.mktemp("ex"))
    csv_path = storage.root / "p.csv"
    csv_path.write_text('prompts,number_of_new_tokens,num_samples\n"the value of",4,2\n')
    extract(ExtractConfig(model=str(micro_model_dir), prompts=str(csv_path), run="e"), storage,
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
    npz = np.load(out / "gpt2_activation_matrix.npz")
    assert np.array_equal(npz["matrix"], masks.astype(np.uint8))
    assert npz["neuron_ids"].tolist() == list(range(120))
    assert npz["neuron_map"][45].tolist() == [1, 5]
    active = json.loads((out / "gpt2_neuron_activations.json").read_text())
    assert active["3"] == np.flatnonzero(masks[3]).tolist()


def test_frequency_matches_stats(exported):
    storage, out, _ = exported
    stats = tables.read_partition(storage, "neuron_stats", "e").to_pydict()
    with open(out / "gpt2_neuron_frequency.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["count"]) for r in rows] == stats["active_count"]
    assert list(rows[0]) == ["id", "layer", "dimension", "count", "frequency"]
