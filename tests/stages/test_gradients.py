"""Gradients against autograd through independent routes; SAE splices at both hook points."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.core import tables
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


# -- --loss and --site against autograd on hooks written here, on GPT-2, Llama, Gemma 2, GPT-Neo


H = 32  # d_model of the micro models below


def save_family(kind: str, directory, *, head: bool = True):
    """A random micro model of a family with the micro tokenizer, saved in HF format; head=False
    saves only the trunk (a base-model folder, no LM head weights)."""
    tok = make_tokenizer(directory)
    special = dict(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.eos_token_id, vocab_size=len(tok))
    dec = dict(hidden_size=H, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, **special)
    torch.manual_seed(3)
    if kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=H, n_head=4, n_inner=48,
                                                 n_positions=64, **special))
    elif kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**dec))
    elif kind == "gemma2":  # a post-MLP norm: dL/d(mlp_out) differs from dL/d(resid_post)
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**dec, head_dim=8))
    else:  # gpt_neo: its blocks return a tuple
        model = tf.GPTNeoForCausalLM(tf.GPTNeoConfig(
            hidden_size=H, num_layers=2, num_heads=4, intermediate_size=48,
            max_position_embeddings=64, window_size=4,
            attention_types=[[["global", "local"], 1]], **special))
    with torch.no_grad():  # non-zero biases and norm weights, so a wrong site would show
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0, 0.3)
    (model if head else model.base_model).save_pretrained(directory, safe_serialization=True)
    return directory


def modules_of(model, kind: str, site: str, layer: int):
    """(module, hooked at its output?) of a site, by the transformers attribute names."""
    if kind in ("gpt2", "gpt_neo"):
        block = model.transformer.h[layer]
        proj = block.mlp.c_proj
    else:
        block = model.model.layers[layer]
        proj = block.mlp.down_proj
    return {"neurons": (proj, False), "mlp_out": (proj, True), "resid_post": (block, True)}[site]


def retained_grads(model, kind: str, site: str, ids, layers=(0, 1), loss="sum"):
    """dL/dx of the site at each layer, by .retain_grad() and .backward() (no autograd.grad)."""
    kept = {}

    def keep(layer):
        def pre(_m, args):
            args[0].retain_grad()
            kept[layer] = args[0]

        def post(_m, _args, out):
            x = out[0] if isinstance(out, tuple) else out
            x.retain_grad()
            kept[layer] = x
        return pre, post

    handles = []
    for l in layers:
        module, at_output = modules_of(model, kind, site, l)
        pre, post = keep(l)
        handles.append(module.register_forward_hook(post) if at_output
                       else module.register_forward_pre_hook(pre))
    try:
        logits = model(ids).logits[:, :-1].double()
        total = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
            reduction="mean" if loss == "mean" else "sum")
        total.backward()
    finally:
        for h in handles:
            h.remove()
    return {l: kept[l].grad[:, :-1].reshape(-1, kept[l].shape[-1]).double() for l in layers}


def assert_matches(res, grads, layers=(0, 1)):
    for l in layers:
        g = grads[l]
        assert g.abs().sum() > 0
        scale = float(g.abs().mean(0).max())
        np.testing.assert_allclose(res.layers[l]["mean"], g.mean(0).numpy(), rtol=1e-4,
                                   atol=1e-6 * scale)
        np.testing.assert_allclose(res.layers[l]["mean_abs"], g.abs().mean(0).numpy(), rtol=1e-4,
                                   atol=1e-6 * scale)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {k: save_family(k, root / k) for k in ("gpt2", "llama", "gemma2", "gpt_neo")}


@pytest.mark.parametrize("loss", ["sum", "mean"])
def test_loss_sum_and_mean_equal_autograd(tmp_path, family_dirs, corpus_file, loss):
    """--loss mean: the cross-entropy averaged over all predicted tokens of all windows; its
    gradients are those of one mean over the whole 4-window batch, though the stage runs
    batches of 3 and 1."""
    model_dir = family_dirs["llama"]
    res = run(config(model_dir, corpus_file, loss=loss, batch_size=3, aggregation_mode="both",
                     prepend_bos=False, name=f"l-{loss}"), Storage(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    ids = windows(model_dir, corpus_file)
    assert_matches(res, retained_grads(model, "llama", "neurons", ids, loss=loss))
    if loss == "mean":
        summed = run(config(model_dir, corpus_file, batch_size=3, prepend_bos=False, name="l-s"),
                     Storage(tmp_path))
        np.testing.assert_allclose(res.layers[1]["mean_abs"] * ids[:, 1:].numel(),
                                   summed.layers[1]["mean_abs"], rtol=1e-5)


@pytest.mark.parametrize("kind, site", [
    ("gpt2", "mlp_out"), ("gpt2", "resid_post"), ("llama", "neurons"), ("llama", "mlp_out"),
    ("llama", "resid_post"), ("gemma2", "mlp_out"), ("gemma2", "resid_post"),
    ("gpt_neo", "resid_post")])
def test_site_gradient_equals_autograd(tmp_path, family_dirs, corpus_file, kind, site):
    model_dir = family_dirs[kind]
    storage = Storage(tmp_path)
    res = run(config(model_dir, corpus_file, site=site, aggregation_mode="both",
                     prepend_bos=False), storage)
    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    ids = windows(model_dir, corpus_file)
    assert_matches(res, retained_grads(model, kind, site, ids))
    width = 48 if site == "neurons" else H
    frame = tables.read_partition(storage, "neuron_gradients", res.name).to_pydict()
    assert set(frame["kind"]) == {"neuron" if site == "neurons" else site}
    assert len(frame["kind"]) == 2 * width
    assert frame["neuron_id"] == ([l * 48 + i for l in (0, 1) for i in range(48)]
                                  if site == "neurons" else [-1] * (2 * width))
    assert frame["layer"] == [l for l in (0, 1) for _ in range(width)]
    assert frame["neuron"] == [i for _ in (0, 1) for i in range(width)]
    assert set(frame["name"]) == {res.name} and set(frame["model"]) == {str(model_dir)}
    assert f"gradients_{site}_" in res.name
    assert load_gradient_results(storage.reports(res.name))["metadata"]["site"] == site


def test_gemma2_mlp_out_and_resid_post_differ(tmp_path, family_dirs, corpus_file):
    """With a post-MLP norm the two sites are different tensors (in pre-norm families like
    GPT-2 or Llama the gradients coincide: resid_post = resid_mid + mlp_out)."""
    got = {site: run(config(family_dirs["gemma2"], corpus_file, site=site, prepend_bos=False),
                     Storage(tmp_path)).layers[0]["mean_abs"] for site in ("mlp_out", "resid_post")}
    assert not np.allclose(got["mlp_out"], got["resid_post"], rtol=1e-3)


def test_frozen_weights_still_give_gradients(tmp_path, family_dirs, corpus_file, monkeypatch):
    """Weights with requires_grad off (nothing before layer 0 needs grad): same result."""
    from pipeline.models import loading

    model_dir = family_dirs["llama"]
    c = dict(site="resid_post", prepend_bos=False, aggregation_mode="both")
    free = run(config(model_dir, corpus_file, name="free", **c), Storage(tmp_path))
    real = loading.load_model

    def frozen(*a, **k):
        loaded = real(*a, **k)
        loaded.model.requires_grad_(False)
        return loaded

    monkeypatch.setattr(loading, "load_model", frozen)
    for site in ("resid_post", "neurons"):
        kept = run(config(model_dir, corpus_file, name=f"frozen-{site}", **{**c, "site": site}),
                   Storage(tmp_path))
        if site == "resid_post":
            np.testing.assert_allclose(kept.layers[0]["mean"], free.layers[0]["mean"], rtol=1e-6)
        assert np.abs(kept.layers[0]["mean_abs"]).sum() > 0


@pytest.mark.parametrize("hook, site", [("blocks.1.hook_mlp_out", "mlp_out"),
                                        ("blocks.1.hook_resid_post", "resid_post")])
def test_output_site_sae_gradient_equals_autograd(tmp_path, family_dirs, corpus_file, hook, site):
    """An SAE spliced at the output of the MLP projection / of block 1 of Gemma 2 (where the two
    differ), against a splice written here by a forward hook, dL/df by .backward()."""
    model_dir = family_dirs["gemma2"]
    w = make_sae(tmp_path / "sae", d_in=H, hook=hook, seed=4)
    res = run(config(model_dir, corpus_file, sae=str(tmp_path / "sae"), prepend_bos=False,
                     name="o"), Storage(tmp_path / "s"))
    assert res.kind == "sae_feature" and list(res.layers) == [1]
    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    ids = windows(model_dir, corpus_file)
    features = []

    def splice(_m, _args, out):
        x = out[0] if isinstance(out, tuple) else out
        f = encode(w, x)
        f.retain_grad()
        features.append(f)
        x_hat = f @ w["W_dec"].double() + w["b_dec"].double()
        new = x_hat + (x - x_hat).detach()
        return (new, *out[1:]) if isinstance(out, tuple) else new

    module, _ = modules_of(model, "gemma2", site, 1)
    handle = module.register_forward_hook(splice)
    try:
        summed_loss(model, ids).backward()
    finally:
        handle.remove()
    g = features[0].grad[:, :-1].reshape(-1, 16)
    assert_matches(res, {1: g}, layers=(1,))


def test_refusals_write_nothing(tmp_path, family_dirs, corpus_file):
    storage = Storage(tmp_path / "s")
    headless = save_family("llama", tmp_path / "base", head=False)
    with pytest.raises(UserError, match="does not ship the weights of its LM head.*lm_head"):
        run(config(headless, corpus_file), storage)
    with pytest.raises(UserError, match="positions are needed but the model has 64"):
        run(config(family_dirs["gpt2"], corpus_file, max_length=80), storage)
    make_sae(tmp_path / "wide", d_in=48, hook="blocks.0.hook_resid_post")
    with pytest.raises(UserError, match="48-wide vectors but blocks.0.hook_resid_post.* 32 wide"):
        run(config(family_dirs["gpt2"], corpus_file, sae=str(tmp_path / "wide")), storage)
    assert not storage.root.exists() or not any(p.is_file() for p in storage.root.rglob("*"))


def test_cli_refuses_a_headless_folder(tmp_path, corpus_file):
    from pipeline.cli import main

    headless = save_family("llama", tmp_path / "base", head=False)
    assert main(["gradients", "--storage", str(tmp_path / "s"), "--model", str(headless),
                 "--corpus", str(corpus_file), "--device", "cpu", "--num-samples", "2",
                 "--max-length", "8", "--quiet"]) == 2
    assert not any(p.is_file() for p in (tmp_path / "s").rglob("*"))


def test_bad_site_and_loss(tmp_path):
    with pytest.raises(UserError, match="--site"):
        GradientConfig(model="x", site="attn_out")
    with pytest.raises(UserError, match="--loss"):
        GradientConfig(model="x", loss="max")
    make_sae(tmp_path / "s", d_in=8, hook="blocks.0.hook_resid_post")
    with pytest.raises(UserError, match="--site mlp_out with --sae"):
        GradientConfig(model="x", sae=str(tmp_path / "s"), site="mlp_out")
    for hook in ("blocks.3.hook_mlp_out", "blocks.0.hook_resid_post", "blocks.2.hook_resid_pre"):
        (tmp_path / "s" / "cfg.json").write_text(json.dumps({"hook_name": hook}))
        GradientConfig(model="x", sae=str(tmp_path / "s"))
    save_file({"W_enc": torch.zeros(8, 4), "b_enc": torch.zeros(4), "W_dec": torch.zeros(4, 9),
               "b_dec": torch.zeros(8)}, str(tmp_path / "s" / "sae_weights.safetensors"))
    from pipeline.stages.gradients import load_sae

    with pytest.raises(UserError, match=r"W_dec \(4, 9\)"):
        load_sae(tmp_path / "s", "cpu", torch.float32)


def test_rows_carry_their_name_and_join_a_run_of_the_model(tmp_path, corpus_file):
    """neuron_gradients is partitioned by the result name; model and revision join it to an
    extraction run of the same checkpoint, neuron_id to that run's neurons."""
    from pipeline.core.warehouse import query_frame
    from pipeline.models.micro import save_random_gpt2
    from pipeline.stages.extract import ExtractConfig
    from pipeline.stages.extract import run as extract

    root = tmp_path / "model"
    save_random_gpt2(root / "step5", n_layer=2, d_mlp=24)
    storage = Storage(tmp_path / "wh")
    extract(ExtractConfig(model=str(root), revision="step5", corpus=str(corpus_file),
                          num_samples=2, max_length=12, device="cpu", run="r", quiet=True),
            storage)
    res = run(config(root, corpus_file, revision="step5", name="g"), storage)
    joined = query_frame(storage, """
        select g.name, g.run_id, r.run_id as run, g.layer, g.neuron, g.neuron_id,
               n.layer as run_layer, n.neuron as run_neuron
        from neuron_gradients g
        join runs r on r.model = g.model and r.revision = g.revision
        join neurons n on n.run_id = r.run_id and n.neuron_id = g.neuron_id
        order by g.neuron_id""")
    assert joined.height == 2 * 24 and res.name == "g"
    assert set(joined["name"]) == {"g"} and set(joined["run_id"]) == {"g"}
    assert set(joined["run"]) == {"r"}
    assert joined["neuron_id"].to_list() == list(range(48))
    assert joined["layer"].to_list() == [i // 24 for i in range(48)] == joined["run_layer"].to_list()
    assert joined["neuron"].to_list() == [i % 24 for i in range(48)] == joined["run_neuron"].to_list()
