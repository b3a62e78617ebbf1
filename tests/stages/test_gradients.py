"""Gradients against autograd through an independent route; the SAE splice."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from pipeline.core.errors import UserError
from pipeline.stages.gradients import GradientConfig, gradients, load_gradient_results
from pipeline.core.inputs import iter_documents, iter_windows
from pipeline.models.loading import load_model
from pipeline.core.storage import Storage


def windows(model_dir, corpus, n=4, length=12):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return torch.tensor(list(iter_windows(iter_documents(str(corpus)), tok, max_length=length,
                                          num_samples=n)))


def summed_loss(model, ids):
    logits = model(ids).logits[:, :-1].double()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1), reduction="sum")


def test_mean_gradient_equals_output_bias_route(tmp_path, micro_model_dir, corpus_file):
    """sum_t dL/da[t, n] = W_out[n] . dL/d(c_proj bias): autograd without any hook."""
    storage = Storage(tmp_path)
    res = gradients(GradientConfig(model=str(micro_model_dir), corpus=str(corpus_file), device="cpu",
                                   num_samples=4, batch_size=4, max_length=12,
                                   aggregation_mode="both", name="g"), storage, progress=False)
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    ids = windows(micro_model_dir, corpus_file)
    # only positions with a target count: the last position's activation changes no loss term,
    # so adding to the bias at every position equals adding at the scored ones
    summed_loss(model, ids).backward()
    positions = ids[:, :-1].numel()
    for layer in range(3):
        c_proj = model.transformer.h[layer].mlp.c_proj
        expect = (c_proj.weight.detach().double() @ c_proj.bias.grad.double()) / positions
        np.testing.assert_allclose(res[layer]["mean"], expect.numpy(), rtol=1e-4, atol=1e-8)
        assert (res[layer]["mean_abs"] >= np.abs(res[layer]["mean"]) - 1e-12).all()
    saved = load_gradient_results(storage.reports("g"))
    assert np.array_equal(saved["arrays"]["layer_1_mean"], res[1]["mean"])
    assert saved["metadata"]["dimensions"] == {"0": 40, "1": 40, "2": 40}


def test_normalized_sum_equals_width(tmp_path, micro_model_dir, corpus_file):
    res = gradients(GradientConfig(model=str(micro_model_dir), corpus=str(corpus_file), device="cpu",
                                   num_samples=2, max_length=12, layers="1",
                                   normalize_gradients=True, name="n"), Storage(tmp_path),
                    progress=False)
    assert list(res) == [1]
    assert np.abs(res[1]["mean_abs"]).sum() == pytest.approx(40)


def make_sae(path, d_in=40, d_sae=16, layer=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.3, "b_enc": torch.randn(d_sae, generator=g) * 0.1,
         "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.3, "b_dec": torch.randn(d_in, generator=g) * 0.1}
    path.mkdir()
    save_file(w, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"d_in": d_in, "d_sae": d_sae,
                                               "hook_name": f"blocks.{layer}.mlp.hook_post"}))
    return w


def test_sae_splice_keeps_loss_and_matches_finite_differences(tmp_path, micro_model_dir, corpus_file):
    w = make_sae(tmp_path / "sae")
    storage = Storage(tmp_path / "s")
    res = gradients(GradientConfig(model=str(micro_model_dir), corpus=str(corpus_file), device="cpu",
                                   num_samples=4, batch_size=4, max_length=12,
                                   sae=str(tmp_path / "sae"), aggregation_mode="both",
                                   name="sae"), storage, progress=False)
    assert list(res) == [1] and res[1]["mean"].shape == (16,)
    # the splice leaves the loss unchanged
    from pipeline.stages.gradients import load_sae
    from pipeline.models.hooks import edit_neurons

    loaded = load_model(str(micro_model_dir), storage=storage, device="cpu")
    sae = load_sae(tmp_path / "sae", loaded.device, loaded.dtype)
    ids = windows(micro_model_dir, corpus_file)

    def splice(x):
        f = sae.encode(x)
        x_hat = sae.decode(f)
        return x_hat + (x - x_hat).detach()

    with torch.no_grad():
        base = summed_loss(loaded.model, ids)
        with edit_neurons(loaded.sites, {1: splice}):
            spliced = summed_loss(loaded.model, ids)
    assert float(spliced) == pytest.approx(float(base), rel=1e-6)
    # finite differences: raising feature k by eps at every position adds eps * W_dec[k] to the
    # neuron vector there, i.e. eps * W_dec[k] @ W_out to the c_proj output: a bias shift
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir).double()
    c_proj = model.transformer.h[1].mlp.c_proj
    positions = ids[:, :-1].numel()
    for k in (0, 5, 11):
        shift = (w["W_dec"][k].double() @ c_proj.weight.detach())
        eps = 1e-4
        losses = []
        for sign in (1, -1):
            with torch.no_grad():
                c_proj.bias += sign * eps * shift
                losses.append(float(summed_loss(model, ids)))
                c_proj.bias -= sign * eps * shift
        fd = (losses[0] - losses[1]) / (2 * eps) / positions
        # the last position's shift changes no loss term, so the finite difference matches
        assert res[1]["mean"][k] == pytest.approx(fd, rel=2e-3, abs=1e-7)


def test_bad_sae_and_mode(tmp_path, micro_model_dir):
    with pytest.raises(UserError):
        GradientConfig(model="x", aggregation_mode="median")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cfg.json"):
        gradients(GradientConfig(model=str(micro_model_dir), sae=str(tmp_path / "empty")),
                  Storage(tmp_path / "s"), progress=False)
