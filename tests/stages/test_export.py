"""Reference exports against the Zarr masks unpacked with np.unpackbits in the test and the
prompts tokenized (and every token decoded) by an independent tokenizer call."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from transformers import AutoTokenizer

from pipeline.cli import main
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage
from pipeline.stages.export import ExportConfig, run

PROMPTS = Path(__file__).resolve().parents[2] / "examples" / "prompts.csv"
WIDTH, LAYERS = 40, 3
FILES = ("activation_dataset.csv", "neuron_activations.json", "neuron_attributes.csv",
         "neuron_edges.el", "neuron_frequency.csv", "activation_matrix.npz")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, micro_model_dir):
    storage = Storage(tmp_path_factory.mktemp("ex"))
    assert main(["extract", "--storage", str(storage.root), "--model", str(micro_model_dir),
                 "--prompts", str(PROMPTS), "--active-threshold", "0.15", "--run", "e",
                 "--quiet"]) == 0
    out = storage.root / "out"
    result = run(ExportConfig(run="e", out_dir=str(out), prefix="gpt2"), storage)
    group = zarr.open_group(str(storage.arrays("e")), mode="r")
    masks = np.concatenate([np.unpackbits(np.asarray(group[f"active/L{l}"][:]), axis=1,
                                          bitorder="little")[:, :WIDTH] for l in range(LAYERS)],
                           axis=1).astype(np.int64)
    return storage, out, result.paths, masks


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_files(exported):
    _, out, paths, _ = exported
    assert [p.name for p in paths] == [f"gpt2_{n}" for n in FILES]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"gpt2_{n}" for n in FILES]
                                                           + [".gpt2_export.json"])


def test_rerun_is_skipped_until_the_files_or_the_run_change(exported, tmp_path):
    storage, out, paths, _ = exported
    stamps = [p.stat().st_mtime_ns for p in paths]
    again = run(ExportConfig(run="e", out_dir=str(out), prefix="gpt2"), storage)
    assert again.skipped and again.paths == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    other = tmp_path / "other"  # another folder is another export
    assert not run(ExportConfig(run="e", out_dir=str(other), prefix="gpt2"), storage).skipped
    (other / "gpt2_neuron_frequency.csv").unlink()  # a file removed by hand is written again
    redo = run(ExportConfig(run="e", out_dir=str(other), prefix="gpt2"), storage)
    assert not redo.skipped and (other / "gpt2_neuron_frequency.csv").exists()


def test_dataset_rows_equal_masks_and_tokenizer(exported, micro_model_dir):
    _, out, _, masks = exported
    with open(out / "gpt2_activation_dataset.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header == ["sample_id", "prompt_sample_idx", "token_position", "input_text", "output",
                      "output_id", "number_of_active_neurons", "layer_0_num_active_neurons",
                      "layer_1_num_active_neurons", "layer_2_num_active_neurons"]
    assert len(rows) == len(masks)
    for r, row in enumerate(rows):
        assert int(row[0]) == r
        assert int(row[6]) == masks[r].sum()
        assert [int(v) for v in row[7:]] == [masks[r, l * WIDTH:(l + 1) * WIDTH].sum()
                                             for l in range(LAYERS)]
    tokenizer = AutoTokenizer.from_pretrained(micro_model_dir)
    assert [r[4] for r in rows] == [tokenizer.decode([int(r[5])]) for r in rows]
    # sequences in prompt-major order, each starting with its prompt's tokens
    samples = [[]]
    for row in rows:
        if int(row[2]) == 0 and samples[-1]:
            samples.append([])
        samples[-1].append(row)
    prompts = read_csv(PROMPTS)
    expected = [(p, s) for p in prompts for s in range(int(p["num_samples"]))]
    assert len(samples) == len(expected)
    for sample, (prompt, index) in zip(samples, expected):
        ids = tokenizer(prompt["prompts"])["input_ids"]
        assert [int(r[2]) for r in sample] == list(range(len(sample)))
        assert {int(r[1]) for r in sample} == {index}
        assert {r[3] for r in sample} == {prompt["prompts"]}
        assert [int(r[5]) for r in sample[:len(ids)]] == ids
        assert len(ids) < len(sample) <= len(ids) + int(prompt["number_of_new_tokens"])


def test_activations_json_equals_masks(exported):
    _, out, _, masks = exported
    active = json.loads((out / "gpt2_neuron_activations.json").read_text())
    assert active == {str(r): [n for n in range(LAYERS * WIDTH) if masks[r, n]]
                      for r in range(len(masks))}


def test_attributes_and_edges(exported):
    _, out, _, _ = exported
    assert [(int(r["node_id"]), int(r["layer"]), int(r["dimension"]))
            for r in read_csv(out / "gpt2_neuron_attributes.csv")] == [
        (n, n // WIDTH, n % WIDTH) for n in range(LAYERS * WIDTH)]
    lines = (out / "gpt2_neuron_edges.el").read_text().splitlines()
    want = [(u, v) for l in range(LAYERS - 1) for u in range(l * WIDTH, (l + 1) * WIDTH)
            for v in range((l + 1) * WIDTH, (l + 2) * WIDTH)]
    assert [tuple(map(int, line.split())) for line in lines] == want


def test_frequency_equals_mask_counts(exported):
    _, out, _, masks = exported
    rows = read_csv(out / "gpt2_neuron_frequency.csv")
    assert list(rows[0]) == ["neuron_id", "layer", "dimension", "activation_count",
                             "activation_frequency"]
    counts = masks.sum(0)
    assert [(int(r["neuron_id"]), int(r["layer"]), int(r["dimension"]), int(r["activation_count"]))
            for r in rows] == [(n, n // WIDTH, n % WIDTH, counts[n]) for n in range(LAYERS * WIDTH)]
    assert [float(r["activation_frequency"]) for r in rows] == pytest.approx(
        (counts / len(masks)).tolist(), rel=1e-12)


def test_matrix_equals_masks(exported):
    _, out, _, masks = exported
    npz = np.load(out / "gpt2_activation_matrix.npz", allow_pickle=True)
    ever = [n for n in range(LAYERS * WIDTH) if masks[:, n].any()]
    assert 0 < len(ever) < LAYERS * WIDTH  # at threshold 0.15 some neurons never fire
    assert npz["matrix"].dtype == np.int32 and np.array_equal(npz["matrix"], masks[:, ever])
    assert npz["neuron_ids"].tolist() == ever
    assert npz["neuron_map"].item() == {n: k for k, n in enumerate(ever)}  # as the reference reads it


def test_reference_reader_counts_edges_exactly(exported):
    """The reference weighted-graph step: node weights by `neuron_id` -> `activation_count`,
    attributes by `node_id`, edge weight = int(np.dot) of two matrix columns via neuron_map."""
    _, out, _, masks = exported
    weights = {int(r["neuron_id"]): int(r["activation_count"])
               for r in read_csv(out / "gpt2_neuron_frequency.csv")}
    assert [int(r["node_id"]) for r in read_csv(out / "gpt2_neuron_attributes.csv")] == sorted(weights)
    npz = np.load(out / "gpt2_activation_matrix.npz", allow_pickle=True)
    matrix, neuron_map = npz["matrix"], npz["neuron_map"].item()
    for line in (out / "gpt2_neuron_edges.el").read_text().splitlines()[::37]:
        u, v = map(int, line.split())
        count = (int(np.dot(matrix[:, neuron_map[u]], matrix[:, neuron_map[v]]))
                 if u in neuron_map and v in neuron_map else 0)
        assert count == sum(int(a and b) for a, b in zip(masks[:, u], masks[:, v]))
        assert weights[u] == sum(int(a) for a in masks[:, u])


def test_cli_default_prefix_no_edges(exported, micro_model_dir, tmp_path, capsys):
    storage = exported[0]
    out = tmp_path / "cli"
    assert main(["export", "--storage", str(storage.root), "--run", "e", "--out-dir", str(out),
                 "--no-edges"]) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(p.name for p in out.iterdir() if p.name != f".{micro_model_dir.name}_export.json")
    assert names == sorted(f"{micro_model_dir.name}_{n}" for n in FILES if n != "neuron_edges.el")
    assert sorted(Path(p).name for p in printed) == names  # nothing temporary left either


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_out_dir_that_is_a_file_is_refused(exported, tmp_path, capsys, where):
    blocker = tmp_path / "taken"
    blocker.write_text("keep me")
    out = blocker if where == "file" else blocker / "sub"
    assert main(["export", "--storage", str(exported[0].root), "--run", "e",
                 "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out-dir") and "is a file" in err and err.count("\n") == 1
    assert blocker.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [blocker]


def test_bad_config(tmp_path):
    with pytest.raises(UserError, match="prefix"):
        ExportConfig(run="e", out_dir=str(tmp_path), prefix="a/b")
    with pytest.raises(UserError):
        ExportConfig(run="../e", out_dir=str(tmp_path))
