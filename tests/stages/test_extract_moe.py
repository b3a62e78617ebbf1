"""Extraction of mixture-of-experts models (micro Mixtral and Qwen2-MoE saved to folders):
neurons, routing, masks and statistics over routed tokens against the per-token loop of
tests/models/test_moe.py, and co-activation of expert neurons against NumPy."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.core import arrays, tables
from pipeline.core.coact import read_counts
from pipeline.core.storage import Storage, read_json
from pipeline.models.micro import make_tokenizer
from pipeline.stages.coactivation import CoactivationConfig
from pipeline.stages.coactivation import run as coactivate
from pipeline.stages.extract import ExtractConfig
from pipeline.stages.extract import run as extract

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_moe import _BASE, CASES, E, K, mlp_io, truth  # noqa: E402

LENGTH, SAMPLES = 12, 6


def save_moe(directory: Path, name: str) -> None:
    """A micro MoE model with the small tokenizer; routers scaled up so the top k are clear."""
    tok = make_tokenizer(directory)
    case = CASES[name]
    config = AutoConfig.for_model(case.model_type, **{**_BASE, "vocab_size": len(tok)},
                                  **case.config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for pname, p in layer.mlp.named_parameters():
                p.normal_(0, 1.0 if pname in ("gate.weight", "shared_expert_gate.weight") else 0.3)
    model.save_pretrained(directory, safe_serialization=True)


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def moe_run(request, tmp_path_factory, corpus_file):
    name = request.param
    directory = tmp_path_factory.mktemp(name)
    save_moe(directory, name)
    storage = Storage(tmp_path_factory.mktemp("wh"))
    extract(ExtractConfig(model=str(directory), corpus=str(corpus_file), num_samples=SAMPLES,
                          max_length=LENGTH, batch_size=3, device="cpu", store_acts=True,
                          run="m", quiet=True, chunk_tokens=24, commit_seconds=0), storage)
    t = tables.read_partition(storage, "tokens", "m").sort_by("row").to_pydict()
    ids = torch.tensor(t["token_id"]).view(SAMPLES, LENGTH)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ref = {}
    for layer in range(2):
        x, _ = mlp_io(model, layer, ids)
        ref[layer] = None if layer in CASES[name].dense else truth(model, CASES[name], layer, x)
    return name, storage, ref, directory


def test_neurons_are_layer_expert_index(moe_run):
    name, storage, _, _ = moe_run
    case = CASES[name]
    neurons = tables.read_partition(storage, "neurons", "m").sort_by("neuron_id").to_pydict()
    for layer in range(2):
        experts = np.array(neurons["expert"])[np.array(neurons["layer"]) == layer]
        if layer in case.dense:
            assert (experts == -1).all() and len(experts) == case.d_dense
        else:
            assert experts.tolist() == [-1] * case.S + np.repeat(np.arange(E), case.I).tolist()


def test_routing_masks_and_statistics_follow_the_routed_tokens(moe_run):
    name, storage, ref, _ = moe_run
    manifest = read_json(storage.run_manifest("m"))
    assert manifest["active"]["rule"] == "gate" and manifest["model"]["gated"]
    group = arrays.open_group(storage.arrays("m"), mode="r")
    stats = tables.read_partition(storage, "neuron_stats", "m").sort_by("neuron_id").to_pydict()
    signs = tables.read_partition(storage, "sign_stats", "m").to_pydict()
    for layer, t in ref.items():
        rows = np.array(stats["layer"]) == layer
        count = np.array(stats["count"])[rows]
        if t is None:  # a dense layer: every row
            assert (count == SAMPLES * LENGTH).all() and f"experts/L{layer}" not in group
            continue
        routed, g, u, a = (t[k].numpy() for k in ("routed", "g", "u", "a"))
        assert np.array_equal(group[f"experts/L{layer}"][:], t["experts"].numpy())
        np.testing.assert_allclose(group[f"expert_weights/L{layer}"][:], t["weights"].numpy(),
                                   rtol=1e-3, atol=1e-3)  # fp16
        width = a.shape[1]
        active = arrays.unpack_mask(group[f"active/L{layer}"][:], width)
        assert np.array_equal(active, (g > 0) & routed)
        np.testing.assert_allclose(group[f"acts/L{layer}"][:], a, rtol=1e-3, atol=1e-3)
        assert np.array_equal(count, routed.sum(0))  # per neuron: its expert's tokens
        assert np.array_equal(np.array(stats["active_count"])[rows], ((g > 0) & routed).sum(0))
        np.testing.assert_allclose(np.array(stats["sum"])[rows], (a * routed).sum(0),
                                   rtol=1e-5, atol=1e-6)
        routed_max = np.where(routed, a, -np.inf).max(0)
        np.testing.assert_allclose(np.array(stats["max"])[rows], routed_max, rtol=1e-5)
        open_up = {n: c for l, n, k, c in zip(signs["layer"], signs["neuron"],
                                               signs["combination"], signs["count"])
                   if l == layer and k == "g+u+"}
        want = ((g > 0) & (u > 0) & routed).sum(0)
        assert [open_up[n] for n in range(width)] == want.tolist()
        assert (routed.sum(1) == CASES[name].S + K * CASES[name].I).all()


def test_coactivation_of_expert_neurons(moe_run):
    name, storage, ref, _ = moe_run
    coactivate(CoactivationConfig(run="m", quiet=True), storage)
    group = arrays.open_group(storage.arrays("m"), mode="r")
    widths = read_json(storage.run_manifest("m"))["model"]["widths"]
    masks = [arrays.unpack_mask(group[f"active/L{l}"][:], widths[l]).astype(np.int64)
             for l in range(2)]
    assert np.array_equal(read_counts(storage, "m", 0, 1), masks[0].T @ masks[1])


def test_ablation_and_gradients_refuse_a_mixture_of_experts_in_one_line(moe_run, tmp_path,
                                                                        corpus_file, capsys):
    from reference import files_of

    from pipeline.cli import main

    _, storage, _, directory = moe_run
    subset = tmp_path / "s.npy"
    np.save(subset, np.array([0, 1], np.int64))
    before = files_of(storage.root)
    for argv in (["ablate", "--run", "m", "--subset-files", str(subset), "--corpus",
                  str(corpus_file), "--num-samples", "2", "--max-length", "8"],
                 ["gradients", "--model", str(directory), "--corpus", str(corpus_file),
                  "--num-samples", "2", "--max-length", "8"],
                 ["universal", "--models", str(directory), str(directory), "--corpus",
                  str(corpus_file), "--num-samples", "2", "--max-length", "8"]):
        code = main([argv[0], "--storage", str(storage.root), "--quiet", *argv[1:]])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert re.search("mixture.of.experts", err), err
    assert files_of(storage.root) == before
