"""Gradients against autograd through independent routes; SAE splices at both hook points."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.core.errors import UserError
from pipeline.core.inputs import iter_documents, iter_windows
from pipeline.core.storage import Storage
from pipeline.models.micro import make_tokenizer
from pipeline.stages.gradients import GradientConfig, load_gradient_results, run


def config(model_dir, corpus, **kw) -> GradientConfig:
    values = dict(model=str(model_dir), corpus=str(corpus), device="cpu", num_samples=4,
                  batch_size=4, max_length=12, quiet=True)
    return GradientConfig(**{**values, **kw})


def windows(model_dir, corpus, n=4, length=12):
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
    res = run(config(micro_model_dir, corpus_file, aggregation_mode="both", name="g"), storage)
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    ids = windows(micro_model_dir, corpus_file)
    # only positions with a target count: the last position's activation changes no loss term,
    # so adding to the bias at every position equals adding at the scored ones
    summed_loss(model, ids).backward()
    positions = ids[:, :-1].numel()
    for layer in range(3):
        c_proj = model.transformer.h[layer].mlp.c_proj
        expect = (c_proj.weight.detach().double() @ c_proj.bias.grad.double()) / positions
        np.testing.assert_allclose(res.layers[layer]["mean"], expect.numpy(), rtol=1e-4, atol=1e-8)
        assert (res.layers[layer]["mean_abs"] >= np.abs(res.layers[layer]["mean"]) - 1e-12).all()
    saved = load_gradient_results(storage.reports("g"))
    assert np.array_equal(saved["arrays"]["layer_1_mean"], res.layers[1]["mean"])
    assert saved["metadata"]["dimensions"] == {"0": 40, "1": 40, "2": 40}
    assert np.load(storage.reports("g") / "layer_2_mean_abs.npy").tolist() == \
        res.layers[2]["mean_abs"].tolist()


def test_normalized_sum_equals_width(tmp_path, micro_model_dir, corpus_file):
    res = run(config(micro_model_dir, corpus_file, num_samples=2, batch_size=2, layers="1",
                     normalize_gradients=True, name="n"), Storage(tmp_path))
    assert list(res.layers) == [1]
    assert np.abs(res.layers[1]["mean_abs"]).sum() == pytest.approx(40)


def make_sae(path, *, d_in, hook, d_sae=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.3,
         "b_enc": torch.randn(d_sae, generator=g) * 0.1,
         "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.3,
         "b_dec": torch.randn(d_in, generator=g) * 0.1}
    path.mkdir()
    save_file(w, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"d_in": d_in, "d_sae": d_sae, "hook_name": hook}))
    return w


def encode(w, x):
    """SAELens's encoder, written here: relu((x - b_dec) W_enc + b_enc)."""
    return torch.relu((x - w["b_dec"].double()) @ w["W_enc"].double() + w["b_enc"].double())


def test_neuron_site_sae_matches_finite_differences(tmp_path, micro_model_dir, corpus_file):
    w = make_sae(tmp_path / "sae", d_in=40, hook="blocks.1.mlp.hook_post")
    res = run(config(micro_model_dir, corpus_file, sae=str(tmp_path / "sae"),
                     aggregation_mode="both", name="sae"), Storage(tmp_path / "s"))
    assert res.kind == "sae_feature" and list(res.layers) == [1]
    assert res.layers[1]["mean"].shape == (16,)
    # raising feature k by eps at every position adds eps * W_dec[k] to the neuron vector there,
    # i.e. eps * W_dec[k] @ W_out to the c_proj output: a bias shift
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir).double()
    ids = windows(micro_model_dir, corpus_file)
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
        assert res.layers[1]["mean"][k] == pytest.approx(fd, rel=2e-3, abs=1e-7)


# -- hook_resid_pre on two families whose block is not the layer list's parent


D_MODEL = 32


def save_micro(kind: str, directory):
    """A random tiny GPT-2 or OPT with the micro tokenizer, saved in HF format."""
    tok = make_tokenizer(directory)
    ids = dict(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.eos_token_id, vocab_size=len(tok))
    torch.manual_seed(1)
    if kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=D_MODEL, n_head=4, n_inner=48,
                                                 n_positions=64, **ids))
    else:
        model = tf.OPTForCausalLM(tf.OPTConfig(hidden_size=D_MODEL, ffn_dim=48, num_hidden_layers=2,
                                               num_attention_heads=4, max_position_embeddings=64,
                                               word_embed_proj_dim=D_MODEL, **ids))
    model.save_pretrained(directory, safe_serialization=True)


def block_of(model, kind: str, layer: int):
    return model.transformer.h[layer] if kind == "gpt2" else model.model.decoder.layers[layer]


@pytest.mark.parametrize("kind", ["gpt2", "opt"])
def test_resid_pre_sae_gradient_equals_autograd(tmp_path, corpus_file, kind):
    model_dir = tmp_path / kind
    model_dir.mkdir()
    save_micro(kind, model_dir)
    w = make_sae(tmp_path / "sae", d_in=D_MODEL, hook="blocks.1.hook_resid_pre", seed=2)
    res = run(config(model_dir, corpus_file, sae=str(tmp_path / "sae"), name="r"),
              Storage(tmp_path / "s"))
    assert list(res.layers) == [1] and res.layers[1]["mean"].shape == (16,)
    # independently: hook the input of block 1, splice the SAE with the error term, take
    # dL/df by torch.autograd.grad
    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    ids = windows(model_dir, corpus_file)
    features = []

    def splice(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        f = encode(w, x)
        features.append(f)
        x_hat = f @ w["W_dec"].double() + w["b_dec"].double()
        x_new = x_hat + (x - x_hat).detach()
        return ((x_new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x_new})

    handle = block_of(model, kind, 1).register_forward_pre_hook(splice, with_kwargs=True)
    try:
        loss = summed_loss(model, ids)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(loss, features)
    g = grad[:, :-1].reshape(-1, grad.shape[-1])
    assert g.abs().sum() > 0
    np.testing.assert_allclose(res.layers[1]["mean"], g.mean(0).numpy(), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(res.layers[1]["mean_abs"], g.abs().mean(0).numpy(), rtol=1e-4,
                               atol=1e-8)


# -- finished work, model options, bad input


def test_rerun_is_skipped(tmp_path, micro_model_dir, corpus_file, monkeypatch):
    storage = Storage(tmp_path)
    c = config(micro_model_dir, corpus_file, num_samples=2, layers="0,2", name="again")
    first = run(c, storage)
    from pipeline.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded again"))
    again = run(c, storage)
    assert again.reused and not first.reused and list(again.layers) == [0, 2]
    for l in (0, 2):
        assert again.layers[l]["mean_abs"].tolist() == first.layers[l]["mean_abs"].tolist()


def test_model_options_reach_load_model(tmp_path, micro_model_dir, corpus_file, monkeypatch):
    from pipeline.models import loading

    seen = {}

    def fake(name, revision=None, **kwargs):
        seen.update(kwargs, name=name, revision=revision)
        raise RuntimeError("stop")

    monkeypatch.setattr(loading, "load_model", fake)
    with pytest.raises(RuntimeError, match="stop"):
        run(config(micro_model_dir, corpus_file, trust_remote_code=True, revision="step3",
                   dtype="bfloat16"), Storage(tmp_path))
    assert seen["trust_remote_code"] is True and seen["revision"] == "step3"
    assert seen["dtype"] == "bfloat16" and seen["device"] == "cpu"


def test_bad_config(tmp_path):
    with pytest.raises(UserError, match="aggregation-mode"):
        GradientConfig(model="x", aggregation_mode="median")
    with pytest.raises(UserError, match="max-length"):
        GradientConfig(model="x", max_length=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cfg.json"):
        GradientConfig(model="x", sae=str(tmp_path / "empty"))
    make_sae(tmp_path / "odd", d_in=8, hook="blocks.0.attn.hook_z")
    with pytest.raises(UserError, match="not supported"):
        GradientConfig(model="x", sae=str(tmp_path / "odd"))
