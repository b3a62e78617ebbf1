"""Neuron properties against plain NumPy: weights of the micro model, activations captured here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import mlp_inputs
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.cli import main
from pipeline.core import tables
from pipeline.core.errors import UserError
from pipeline.core.inputs import iter_documents, iter_windows
from pipeline.core.storage import Storage
from pipeline.models.weights import moments_over_columns
from pipeline.stages.neuron_properties import NeuronStatsConfig, run

SAMPLES, LENGTH, WIDTH = 16, 32, 40


def test_blockwise_moments_equal_dense():
    # a large common offset: power sums about zero would lose the variance's digits
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(5, 50)) ** 3 + 1e4)
    got = moments_over_columns(lambda a, b: x[:, a:b], 50, block=7)
    x = x.numpy()
    z = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    np.testing.assert_allclose(got["mean"], x.mean(1), rtol=1e-14)
    np.testing.assert_allclose(got["var"], x.var(1), rtol=1e-9)
    np.testing.assert_allclose(got["skew"], (z ** 3).mean(1), rtol=1e-8)
    np.testing.assert_allclose(got["kurt"], (z ** 4).mean(1), rtol=1e-8)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, micro_model_dir, corpus_file):
    storage = Storage(tmp_path_factory.mktemp("props"))
    assert main(["extract", "--storage", str(storage.root), "--model", str(micro_model_dir),
                 "--corpus", str(corpus_file), "--num-samples", str(SAMPLES), "--max-length",
                 str(LENGTH), "--run", "n", "--quiet"]) == 0
    return storage, run(NeuronStatsConfig(run="n", quiet=True), storage)


def hooked_activations(model, model_dir, corpus_file) -> np.ndarray:
    """[tokens, 3 x 40]: the input of every c_proj on the run's windows, by a hook written here."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = np.array(list(iter_windows(iter_documents(str(corpus_file)), tok, max_length=LENGTH,
                                     num_samples=SAMPLES)))
    acts = mlp_inputs(model_dir, ids, batch_size=len(ids))
    return np.concatenate([acts[l] for l in range(3)], 1).astype(np.float64)


def test_weight_and_vocabulary_statistics_equal_numpy(extracted, micro_model_dir):
    _, result = extracted
    out = result.frame.sort("neuron_id")
    assert out["neuron_id"].to_list() == list(range(3 * WIDTH))
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    wu = model.lm_head.weight.detach().double().numpy().T          # [d_model, vocab]
    wu = wu / np.linalg.norm(wu, axis=0, keepdims=True)
    for layer in range(3):
        mlp = model.transformer.h[layer].mlp
        w_in = mlp.c_fc.weight.detach().double().numpy()               # Conv1D: [d_model, d_mlp]
        w_out = mlp.c_proj.weight.detach().double().numpy()            # [d_mlp, d_model]
        rows = out.filter(out["layer"] == layer)
        n_in, n_out = np.linalg.norm(w_in, axis=0), np.linalg.norm(w_out, axis=1)
        np.testing.assert_allclose(rows["w_in_norm"], n_in)
        np.testing.assert_allclose(rows["w_out_norm"], n_out)
        np.testing.assert_allclose(rows["input_bias"], mlp.c_fc.bias.detach().double().numpy())
        sims = [w_in[:, n] @ w_out[n] / (n_in[n] * n_out[n]) for n in range(WIDTH)]
        np.testing.assert_allclose(rows["in_out_sim"], sims)
        np.testing.assert_allclose(rows["l2_penalty"], n_in ** 2 + n_out ** 2)
        cos = (w_out / n_out[:, None]) @ wu
        z = (cos - cos.mean(1, keepdims=True)) / cos.std(1, keepdims=True)
        np.testing.assert_allclose(rows["vocab_mean"], cos.mean(1), atol=1e-12)
        np.testing.assert_allclose(rows["vocab_var"], cos.var(1), rtol=1e-10)
        np.testing.assert_allclose(rows["vocab_skew"], (z ** 3).mean(1), rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(rows["vocab_kurt"], (z ** 4).mean(1), rtol=1e-8)


def test_activation_moments_equal_hooked_activations(extracted, micro_model_dir, corpus_file):
    storage, result = extracted
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir).eval()
    a = hooked_activations(model, micro_model_dir, corpus_file)
    assert a.shape == (SAMPLES * LENGTH, 3 * WIDTH)
    out = result.frame.sort("neuron_id")
    z = (a - a.mean(0)) / a.std(0)
    np.testing.assert_allclose(out["act_mean"], a.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(out["act_var"], a.var(0), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(out["act_skew"], (z ** 3).mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(out["act_kurt"], (z ** 4).mean(0), rtol=1e-6)
    np.testing.assert_allclose(out["sparsity"], (a > 0).mean(0))  # the run's threshold is 0
    stored = tables.read_partition(storage, "neuron_properties", "n").to_pydict()
    assert stored["act_mean"] == out["act_mean"].to_list()


def test_rerun_is_skipped(extracted, monkeypatch):
    storage, result = extracted
    from pipeline.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded again"))
    again = run(NeuronStatsConfig(run="n", quiet=True), storage)
    assert again.reused and again.frame.sort("neuron_id").equals(result.frame.sort("neuron_id"))


def test_model_options_reach_load_model(extracted, monkeypatch):
    storage, _ = extracted
    from pipeline.models import loading

    seen = {}

    def fake(name, revision=None, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(loading, "load_model", fake)
    with pytest.raises(RuntimeError, match="stop"):
        run(NeuronStatsConfig(run="n", trust_remote_code=True, overwrite=True), storage)
    assert seen["trust_remote_code"] is True and seen["device"] == "cpu"


def test_bad_input(extracted):
    storage, _ = extracted
    with pytest.raises(UserError, match="--revision"):
        NeuronStatsConfig(run="n", revision="step1")
    with pytest.raises(UserError, match="does not exist"):
        run(NeuronStatsConfig(run="missing"), storage)
