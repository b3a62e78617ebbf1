"""Every architecture family on a random micro config: the neuron site, weights and hooks are right.

Each check compares the adapter against an independent computation: the MLP input is read by a
separate hook on the MLP block (BERT: the intermediate layer), the nonlinearity comes from the
config through ACT2FN, and the projection's output is read by a separate forward hook.
"""

from __future__ import annotations

import argparse
import shutil
import time

import pytest
import torch
import transformers as tf
from transformers.activations import ACT2FN

from pipeline.adapters import SUPPORTED_FAMILIES, adapter_for
from pipeline.config import add_arguments, from_args
from pipeline.errors import UserError
from pipeline.hooks import ablate_neurons, capture_neurons, edit_neurons
from pipeline.models import ModelOptions, load_model, resolve_device, resolve_dtype
from pipeline.storage import Storage

H, I, V = 32, 48, 64  # hidden, intermediate (neurons per layer), vocab
_DEC = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=V, max_position_embeddings=64,
            bos_token_id=0, eos_token_id=1, pad_token_id=2)
_ENC = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=V, max_position_embeddings=64, pad_token_id=0)
_GPT2 = dict(n_layer=2, n_embd=H, n_head=4, n_inner=I, vocab_size=V, n_positions=64,
             bos_token_id=0, eos_token_id=1)
_OPT = dict(hidden_size=H, ffn_dim=I, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
            max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)

# case -> (model class, config, path of the module whose input is the MLP input x)
CASES = {
    "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(**_GPT2), "transformer.h.{}.mlp"),
    "gpt2-base": (tf.GPT2Model, tf.GPT2Config(**_GPT2), "h.{}.mlp"),
    "gpt_neo": (tf.GPTNeoForCausalLM,
                tf.GPTNeoConfig(num_layers=2, hidden_size=H, num_heads=4, intermediate_size=I,
                                vocab_size=V, max_position_embeddings=64,
                                attention_types=[[["global", "local"], 1]], bos_token_id=0,
                                eos_token_id=1), "transformer.h.{}.mlp"),
    "gptj": (tf.GPTJForCausalLM, tf.GPTJConfig(**_GPT2, rotary_dim=4), "transformer.h.{}.mlp"),
    "gpt_neox": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**{**_DEC, "num_key_value_heads": 4}),
                 "gpt_neox.layers.{}.mlp"),
    "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(**_DEC), "model.layers.{}.mlp"),
    "llama-base": (tf.LlamaModel, tf.LlamaConfig(**_DEC), "layers.{}.mlp"),
    "mistral": (tf.MistralForCausalLM, tf.MistralConfig(**_DEC), "model.layers.{}.mlp"),
    "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**_DEC), "model.layers.{}.mlp"),
    "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config(**_DEC, head_dim=8), "model.layers.{}.mlp"),
    "gemma": (tf.GemmaForCausalLM, tf.GemmaConfig(**_DEC, head_dim=8), "model.layers.{}.mlp"),
    "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config(**_DEC, head_dim=8), "model.layers.{}.mlp"),
    "gemma3_text": (tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(**_DEC, head_dim=8),
                    "model.layers.{}.mlp"),
    "olmo": (tf.OlmoForCausalLM, tf.OlmoConfig(**{**_DEC, "num_key_value_heads": 4}),
             "model.layers.{}.mlp"),
    "opt": (tf.OPTForCausalLM, tf.OPTConfig(**_OPT, word_embed_proj_dim=H),
            "model.decoder.layers.{}.fc1"),
    "opt-proj": (tf.OPTForCausalLM, tf.OPTConfig(**_OPT, word_embed_proj_dim=16),
                 "model.decoder.layers.{}.fc1"),
    "bert": (tf.BertForMaskedLM, tf.BertConfig(**_ENC), "bert.encoder.layer.{}.intermediate"),
    "bert-base": (tf.BertModel, tf.BertConfig(**_ENC), "encoder.layer.{}.intermediate"),
    "roberta": (tf.RobertaForMaskedLM, tf.RobertaConfig(**_ENC),
                "roberta.encoder.layer.{}.intermediate"),
    "xlm-roberta": (tf.XLMRobertaForMaskedLM, tf.XLMRobertaConfig(**_ENC),
                    "roberta.encoder.layer.{}.intermediate"),
    "distilbert": (tf.DistilBertForMaskedLM,
                   tf.DistilBertConfig(dim=H, hidden_dim=I, n_layers=2, n_heads=4, vocab_size=V,
                                       max_position_embeddings=64, pad_token_id=0),
                   "distilbert.transformer.layer.{}.ffn"),
}


def test_every_family_has_a_case():
    families = {CASES[c][1].model_type for c in CASES}
    assert families == set(SUPPORTED_FAMILIES)


def build(case, dtype=torch.float32):
    cls, config, mlp_path = CASES[case]
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # visible biases and norm weights, so a forgotten term would show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.to(dtype), mlp_path


def act_fn(config):
    name = (getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
            or getattr(config, "activation_function", None) or getattr(config, "activation", None))
    return ACT2FN[name]


def ids_for(case, shape=(2, 7)):
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, V, shape, generator=g)


def run_with_probes(model, mlp_path, sites, ids):
    """One forward with independent hooks: {layer: {"x": mlp input, "site": site input,
    "out": site output}}, each as [batch, seq, width] (OPT runs its MLP on [batch * seq, d])."""
    seen: dict[int, dict] = {l: {} for l in range(len(sites))}
    handles = []

    def keep(layer, key, x):
        seen[layer][key] = x.detach().clone().reshape(*ids.shape, x.shape[-1])

    def pre(layer, key):
        def hook(module, args, kwargs):
            keep(layer, key, args[0] if args else next(iter(kwargs.values())))
        return hook

    def post(layer):
        def hook(module, args, output):
            keep(layer, "out", output)
        return hook

    try:
        for l, site in enumerate(sites):
            mlp = model.get_submodule(mlp_path.format(l))
            handles.append(mlp.register_forward_pre_hook(pre(l, "x"), with_kwargs=True))
            handles.append(site.module.register_forward_pre_hook(pre(l, "site"), with_kwargs=True))
            handles.append(site.module.register_forward_hook(post(l)))
        with torch.no_grad():
            outputs = model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return outputs[0], seen


@pytest.mark.parametrize("case", list(CASES))
def test_site_weights_and_capture(case):
    model, mlp_path = build(case)
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    assert [s.layer for s in sites] == [0, 1] and all(s.width == I for s in sites)
    assert all(model.get_submodule(s.name) is s.module for s in sites)
    ids = ids_for(case)
    reference, seen = run_with_probes(model, mlp_path, sites, ids)

    with torch.no_grad(), capture_neurons(sites) as captured:
        output = model(input_ids=ids)[0]
    assert torch.equal(output, reference)  # (d) capturing changes nothing, bit for bit

    act = act_fn(model.config)
    for layer in range(2):
        x = seen[layer]["x"]
        neurons = captured[layer]
        assert neurons.shape == (2, 7, I) and not neurons.requires_grad
        assert torch.equal(neurons, seen[layer]["site"])
        # (a) the site input is the nonlinearity of W_in x (+ b_in), times W_up x if gated
        w_in, b_in = adapter.w_in(model, layer), adapter.b_in(model, layer)
        assert w_in.shape == (H, I)
        pre = x @ w_in + (b_in if b_in is not None else 0)
        expect = act(pre)
        if adapter.gated:
            w_up = adapter.w_up(model, layer)
            assert w_up.shape == (H, I)
            expect = expect * (x @ w_up)
        else:
            assert adapter.w_up(model, layer) is None
        torch.testing.assert_close(neurons, expect, rtol=1e-4, atol=1e-5)
        # (b) the site output is the neuron vector times W_out (+ bias)
        w_out = adapter.w_out(model, layer)
        assert w_out.shape == (I, H)
        bias = getattr(sites[layer].module, "bias", None)
        out = neurons @ w_out + (bias if bias is not None else 0)
        torch.testing.assert_close(seen[layer]["out"], out, rtol=1e-4, atol=1e-5)

    # (c) the unembedding is [d_model, vocab] and is the LM head transposed
    unembed = adapter.unembed(model)
    assert unembed.shape == (H, V) and not unembed.requires_grad
    head = model.get_output_embeddings()
    if head is None:  # a base model: the (tied) input embeddings
        head = model.get_input_embeddings()
    expected = head.weight.T
    if case == "opt-proj":  # hidden -> project_out -> lm_head
        expected = model.model.decoder.project_out.weight.T @ expected
    torch.testing.assert_close(unembed, expected)

    # the trunk shares the sites and reaches them without the head
    base = adapter.base_model(model)
    with torch.no_grad(), capture_neurons(sites, [1]) as from_base:
        base(input_ids=ids)
    assert list(from_base) == [1] and torch.equal(from_base[1], captured[1])


@pytest.mark.parametrize("case", list(CASES))
def test_zero_ablation_zeroes_only_those_neurons(case):
    model, mlp_path = build(case)
    sites = adapter_for(model).sites(model)
    ids = ids_for(case, (2, 5))
    _, clean = run_with_probes(model, mlp_path, sites, ids)
    # the probes are registered after the ablation hook, so they read the edited input
    with ablate_neurons(sites, {0: torch.tensor([1, 3])}):
        _, edited = run_with_probes(model, mlp_path, sites, ids)
    site0 = edited[0]["site"]
    assert (site0[..., [1, 3]] == 0).all()
    keep = [i for i in range(I) if i not in (1, 3)]
    assert torch.equal(site0[..., keep], clean[0]["site"][..., keep])
    assert not torch.equal(edited[1]["site"], clean[1]["site"])  # the edit reaches layer 1
    assert all(not s.module._forward_pre_hooks for s in sites)


def test_mean_ablation_sets_values_and_edits_compose():
    model, mlp_path = build("llama")
    sites = adapter_for(model).sites(model)
    ids = ids_for("llama")
    _, clean = run_with_probes(model, mlp_path, sites, ids)
    values = torch.tensor([0.5, -2.0])
    with ablate_neurons(sites, {1: torch.tensor([4, 0])}, {1: values}):
        _, edited = run_with_probes(model, mlp_path, sites, ids)
    site1 = edited[1]["site"]
    assert (site1[..., 4] == 0.5).all() and (site1[..., 0] == -2.0).all()
    keep = [i for i in range(I) if i not in (0, 4)]
    assert torch.equal(site1[..., keep], clean[1]["site"][..., keep])
    assert torch.equal(edited[0]["site"], clean[0]["site"])  # layer 0 untouched
    # an arbitrary edit: doubling layer 0 doubles the site input the probe sees
    with edit_neurons(sites, {0: lambda x: 2 * x}):
        _, doubled = run_with_probes(model, mlp_path, sites, ids)
    assert torch.equal(doubled[0]["site"], 2 * clean[0]["site"])


def test_ablation_rejects_bad_input():
    model, _ = build("gpt2")
    sites = adapter_for(model).sites(model)
    with pytest.raises(UserError, match="out of range"):
        with ablate_neurons(sites, {0: torch.tensor([I])}):
            pass
    with pytest.raises(UserError, match="values"):
        with ablate_neurons(sites, {0: torch.tensor([1, 2])}, {0: torch.tensor([0.0])}):
            pass
    with pytest.raises(UserError, match="layer"):
        with capture_neurons(sites, [5]):
            pass
    assert all(not s.module._forward_pre_hooks for s in sites)


def test_edits_keep_gradients_flowing():
    model, _ = build("gpt2")
    sites = adapter_for(model).sites(model)
    kept = {}

    def keep(x):
        x.retain_grad()
        kept[0] = x
        return x

    with edit_neurons(sites, {0: keep}), ablate_neurons(sites, {1: torch.tensor([2])}):
        model(input_ids=ids_for("gpt2"))[0].sum().backward()
    assert kept[0].grad is not None and kept[0].grad.shape == (2, 7, I)


def test_hooks_removed_after_exception():
    model, _ = build("gpt2")
    sites = adapter_for(model).sites(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_neurons(sites), ablate_neurons(sites, {1: torch.tensor([0])}), \
                edit_neurons(sites, {0: lambda x: x}):
            assert all(s.module._forward_pre_hooks for s in sites)
            raise RuntimeError("boom")
    assert all(not s.module._forward_pre_hooks for s in sites)
    # an exception inside the forward (raised by the edit) also leaves no hook behind
    with pytest.raises(ValueError, match="shape"):
        with edit_neurons(sites, {0: lambda x: x[..., :3]}):
            model(input_ids=ids_for("gpt2"))
    assert all(not s.module._forward_pre_hooks for s in sites)


def test_on_batch_streams_each_layer():
    model, _ = build("llama")
    sites = adapter_for(model).sites(model)
    got = []
    with torch.no_grad(), capture_neurons(sites, on_batch=lambda l, x: got.append((l, x))) as d:
        model(input_ids=ids_for("llama"))
    assert [l for l, _ in got] == [0, 1] and d == {}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_reduced_precision(case, dtype):
    model, mlp_path = build(case, dtype)
    sites = adapter_for(model).sites(model)
    ids = ids_for(case)
    reference, seen = run_with_probes(model, mlp_path, sites, ids)
    with torch.no_grad(), capture_neurons(sites) as captured:
        out = model(input_ids=ids)[0]
    assert torch.equal(out, reference)
    assert captured[0].dtype == dtype and torch.equal(captured[0], seen[0]["site"])
    with ablate_neurons(sites, {0: torch.tensor([1, 3])}, {0: torch.tensor([0.25, 1.0])}):
        _, edited = run_with_probes(model, mlp_path, sites, ids)
    assert (edited[0]["site"][..., 1] == 0.25).all() and (edited[0]["site"][..., 3] == 1).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_capture_and_ablation():
    model, mlp_path = build("llama", torch.bfloat16)
    model.cuda()
    sites = adapter_for(model).sites(model)
    ids = ids_for("llama").cuda()
    reference, seen = run_with_probes(model, mlp_path, sites, ids)
    with torch.no_grad(), capture_neurons(sites) as captured:
        assert torch.equal(model(input_ids=ids)[0], reference)
    assert captured[0].is_cuda and torch.equal(captured[0], seen[0]["site"])
    with ablate_neurons(sites, {0: torch.tensor([1, 3])}):
        _, edited = run_with_probes(model, mlp_path, sites, ids)
    assert (edited[0]["site"][..., [1, 3]] == 0).all()


def test_unknown_family():
    model = tf.T5ForConditionalGeneration(tf.T5Config(d_model=16, d_ff=32, num_layers=1,
                                                      num_heads=2, vocab_size=V, d_kv=8))
    with pytest.raises(UserError, match="'t5'.*supported.*gpt2"):
        adapter_for(model)


# -- loading


def test_load_local_folder(micro_model_dir, tmp_path):
    loaded = load_model(str(micro_model_dir), storage=Storage(tmp_path), for_generation=False)
    assert loaded.source == "local" and loaded.adapter.family == "gpt2"
    assert loaded.path == micro_model_dir and loaded.revision is None
    assert loaded.n_layers == 3 and loaded.widths == [40, 40, 40]
    assert loaded.layer_offsets == [0, 40, 80]
    assert loaded.is_causal and loaded.device.type == "cpu" and loaded.dtype == torch.float32
    assert not loaded.model.training and loaded.tokenizer.pad_token is not None
    assert loaded.model.config.use_cache is False
    assert [s.name for s in loaded.sites] == [f"transformer.h.{i}.mlp.c_proj" for i in range(3)]
    # the loaded weights are the saved ones
    saved = tf.GPT2LMHeadModel.from_pretrained(micro_model_dir).eval()
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, saved(input_ids=ids).logits)


def test_load_local_revisions_and_dtype(micro_model_dir, tmp_path):
    root = tmp_path / "my-model"
    shutil.copytree(micro_model_dir, root / "step5")
    loaded = load_model(str(root), "step5", storage=Storage(tmp_path), dtype="bfloat16")
    assert loaded.path == root / "step5" and loaded.revision == "step5"
    assert loaded.dtype == torch.bfloat16 and loaded.model.dtype == torch.bfloat16
    with pytest.raises(UserError, match="step9"):
        load_model(str(root), "step9", storage=Storage(tmp_path))
    with pytest.raises(UserError, match="--revision"):
        load_model(str(root), storage=Storage(tmp_path))
    # a plain folder only records the revision
    plain = load_model(str(micro_model_dir), "v1", storage=Storage(tmp_path))
    assert plain.path == micro_model_dir and plain.revision == "v1"


def test_local_folder_without_safetensors_is_refused(micro_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(micro_model_dir, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="safetensors"):
        load_model(str(folder), storage=Storage(tmp_path))


def test_local_folder_of_unsupported_family(tmp_path):
    folder = tmp_path / "t5"
    tf.T5ForConditionalGeneration(tf.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                              vocab_size=V, d_kv=8)).save_pretrained(folder)
    with pytest.raises(UserError, match="supported families"):
        load_model(str(folder), storage=Storage(tmp_path))


def test_encoder_loads_as_masked_lm(tmp_path):
    from pipeline.micro import make_tokenizer

    folder = tmp_path / "bert"
    tok = make_tokenizer(folder)
    tf.BertForMaskedLM(tf.BertConfig(**{**_ENC, "vocab_size": len(tok)})).save_pretrained(folder)
    loaded = load_model(str(folder), storage=Storage(tmp_path))
    assert isinstance(loaded.model, tf.BertForMaskedLM) and not loaded.is_causal
    assert loaded.widths == [I, I] and loaded.sites[0].name == "bert.encoder.layer.0.output.dense"


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    for bad in ("tpu", "cuda:x", "gpu0"):
        with pytest.raises(UserError, match="unknown"):
            resolve_device(bad)
    with pytest.raises(UserError, match="float8"):
        resolve_dtype("float8", torch.device("cpu"))
    if not torch.cuda.is_available():
        for spec in ("cuda", "cuda:0"):
            with pytest.raises(UserError, match="CUDA is not available"):
                resolve_device(spec)
    with pytest.raises(UserError, match="tpu"):
        load_model("zoo-s0", storage=Storage("."), device="tpu")


def test_unknown_hub_id_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        load_model("no-such-org/no-such-model-xyz", storage=Storage(tmp_path))
    message = str(e.value)
    assert time.perf_counter() - t0 < 10
    assert "not cached" in message and "offline" in message and "zoo" in message
    assert "\n" not in message
    with pytest.raises(UserError) as e:
        load_model("no-such-org/no-such-model-xyz", "step1000", storage=Storage(tmp_path))
    assert "step1000" in str(e.value) and "\n" not in str(e.value)


def test_missing_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        load_model(str(tmp_path / "nowhere"), storage=Storage(tmp_path))


def test_model_options_round_trip():
    parser = argparse.ArgumentParser()
    add_arguments(parser, ModelOptions)
    args = parser.parse_args(["--model", "EleutherAI/pythia-70m-deduped", "--revision",
                              "step1000", "--dtype", "bfloat16"])
    options = from_args(ModelOptions, args)
    assert options == ModelOptions("EleutherAI/pythia-70m-deduped", "step1000", "auto",
                                   "bfloat16", False)
    assert "zoo-s0" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --model is required
