"""Neuron properties against direct NumPy on the micro model's weights."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from pipeline.stages.extract import ExtractConfig, extract
from pipeline.stages.frequencies import neuron_summary
from pipeline.stages.neuron_properties import moments_over_columns, neuron_properties
from pipeline.core.storage import Storage


def test_blockwise_moments_equal_dense(monkeypatch):
    import pipeline.stages.neuron_properties as npmod

    monkeypatch.setattr(npmod, "VOCAB_BLOCK", 7)
    x = np.random.default_rng(0).normal(size=(5, 50)) ** 3
    got = moments_over_columns(5, lambda a, b: x[:, a:b], 50)
    z = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    np.testing.assert_allclose(got["mean"], x.mean(1))
    np.testing.assert_allclose(got["var"], x.var(1))
    np.testing.assert_allclose(got["skew"], (z ** 3).mean(1), rtol=1e-8)
    np.testing.assert_allclose(got["kurt"], (z ** 4).mean(1), rtol=1e-8)


def test_properties_equal_numpy(tmp_path, micro_model_dir, corpus_file):
    storage = Storage(tmp_path)
    extract(ExtractConfig(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=4,
                          max_length=16, run="n"), storage, progress=False)
    out = neuron_properties(storage, "n")
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
        sims = [w_in[:, n] @ w_out[n] / (n_in[n] * n_out[n]) for n in range(40)]
        np.testing.assert_allclose(rows["in_out_sim"], sims)
        np.testing.assert_allclose(rows["l2_penalty"], n_in ** 2 + n_out ** 2)
        cos = (w_out / n_out[:, None]) @ wu
        z = (cos - cos.mean(1, keepdims=True)) / cos.std(1, keepdims=True)
        np.testing.assert_allclose(rows["vocab_mean"], cos.mean(1), atol=1e-12)
        np.testing.assert_allclose(rows["vocab_kurt"], (z ** 4).mean(1), rtol=1e-8)
    summary = neuron_summary(storage, "n")
    np.testing.assert_allclose(out["act_mean"], summary["mean"])
    assert out["sparsity"].to_list() == pytest.approx(summary["sparsity"].to_list())
