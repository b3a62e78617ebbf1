"""Every architecture family on a random micro config: the neuron site and weights are right."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers.activations import ACT2FN

from pipeline.core.errors import UserError
from pipeline.core.storage import Storage
from pipeline.models.adapters import adapter_for
from pipeline.models.hooks import ablate_neurons, capture_neurons, edit_block_inputs
from pipeline.models.loading import load_model, resolve_device, resolve_dtype

H, I, V = 32, 48, 64  # hidden, intermediate, vocab
_DEC = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)

# family -> (model class, config, mlp-input module path, activation name attribute)
CASES = {
    "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(n_layer=2, n_embd=H, n_head=4, n_inner=I,
                                                vocab_size=V, n_positions=64), "transformer.h.{}.mlp"),
    "gpt2-base": (tf.GPT2Model, tf.GPT2Config(n_layer=2, n_embd=H, n_head=4, n_inner=I,
                                               vocab_size=V, n_positions=64), "h.{}.mlp"),
    "gpt_neox": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**{**_DEC, "num_key_value_heads": 4}),
                 "gpt_neox.layers.{}.mlp"),
    "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(**_DEC), "model.layers.{}.mlp"),
    "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**_DEC), "model.layers.{}.mlp"),
    "mistral": (tf.MistralForCausalLM, tf.MistralConfig(**_DEC), "model.layers.{}.mlp"),
    "gemma": (tf.GemmaForCausalLM, tf.GemmaConfig(**_DEC, head_dim=8), "model.layers.{}.mlp"),
    "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config(**_DEC, head_dim=8), "model.layers.{}.mlp"),
    "opt": (tf.OPTForCausalLM, tf.OPTConfig(hidden_size=H, ffn_dim=I, num_hidden_layers=2,
                                             num_attention_heads=4, vocab_size=V,
                                             max_position_embeddings=64, word_embed_proj_dim=H),
            "model.decoder.layers.{}"),
    "bert": (tf.BertForMaskedLM, tf.BertConfig(hidden_size=H, intermediate_size=I,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                vocab_size=V), "bert.encoder.layer.{}"),
    "bert-base": (tf.BertModel, tf.BertConfig(hidden_size=H, intermediate_size=I,
                                               num_hidden_layers=2, num_attention_heads=4,
                                               vocab_size=V), "encoder.layer.{}"),
    "roberta": (tf.RobertaForMaskedLM, tf.RobertaConfig(hidden_size=H, intermediate_size=I,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         vocab_size=V), "roberta.encoder.layer.{}"),
}


def build(case):
    cls, config, mlp_path = CASES[case]
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # non-zero biases so a wrong bias would show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model, mlp_path


def act_fn(model):
    c = model.config
    name = (getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None)
            or getattr(c, "activation_function", None))
    return ACT2FN[name]


def mlp_input(model, mlp_path, layer, ids):
    """The input of the MLP block (or of BERT's intermediate / OPT's fc1), hooked independently."""
    module = model.get_submodule(mlp_path.format(layer))
    if not hasattr(module, "c_fc") and not hasattr(module, "gate_proj") \
            and not hasattr(module, "dense_h_to_4h"):
        module = module.intermediate.dense if hasattr(module, "intermediate") else module.fc1
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("case", list(CASES))
def test_site_input_is_nonlinearity_of_w_in(case):
    model, mlp_path = build(case)
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    assert len(sites) == 2 and all(s.width == I for s in sites)
    ids = torch.randint(V, (2, 7))
    with torch.no_grad():
        reference_logits = model(input_ids=ids)[0]
    with torch.no_grad(), capture_neurons(sites) as captured:
        logits = model(input_ids=ids)[0]
    assert torch.equal(logits, reference_logits)  # capturing changes nothing
    for layer in range(2):
        x = mlp_input(model, mlp_path, layer, ids)
        pre = x @ adapter.w_in(model, layer)
        if adapter.b_in(model, layer) is not None:
            pre = pre + adapter.b_in(model, layer)
        expect = act_fn(model)(pre)
        if adapter.gated:
            expect = expect * (x @ adapter.w_up(model, layer))
        torch.testing.assert_close(captured[layer], expect, rtol=1e-4, atol=1e-5)
        # the site output is the neuron vector times W_out (+ bias)
        site = sites[layer].module
        out = captured[layer] @ adapter.w_out(model, layer)
        if getattr(site, "bias", None) is not None:
            out = out + site.bias
        with torch.no_grad():
            torch.testing.assert_close(site(captured[layer]), out, rtol=1e-4, atol=1e-5)
    unembed = adapter.unembed(model)
    assert unembed.shape == (H, V)
    head = model.get_output_embeddings() or model.get_input_embeddings()
    torch.testing.assert_close(unembed, head.weight.T)


def block_input_reader(block, seen: list):
    """An independent reader of a block's hidden_states (positional or keyword)."""
    return block.register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).detach().clone()),
        with_kwargs=True)


@pytest.mark.parametrize("case", list(CASES))
def test_block_is_the_layer_and_its_input_the_residual_stream(case):
    model, mlp_path = build(case)
    adapter = adapter_for(model)
    ids = torch.randint(V, (2, 7))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in range(2):
        block = adapter.block(model, layer)
        assert block is model.get_submodule(mlp_path.format(layer).removesuffix(".mlp"))
        seen: list = []
        handle = block_input_reader(block, seen)
        try:
            with torch.no_grad():
                model(input_ids=ids)
        finally:
            handle.remove()
        torch.testing.assert_close(seen[0], hidden[layer])  # the stream entering the layer
    with pytest.raises(UserError, match="out of range"):
        adapter.block(model, 2)


@pytest.mark.parametrize("case", ["gpt2", "opt", "llama"])
def test_edit_block_inputs_replaces_the_stream(case):
    model, _ = build(case)
    block = adapter_for(model).block(model, 1)
    ids = torch.randint(V, (2, 5))
    with torch.no_grad():
        clean = model(input_ids=ids)[0]
        with edit_block_inputs({1: block}, {1: lambda x: x}):
            same = model(input_ids=ids)[0]
        seen: list = []
        with edit_block_inputs({1: block}, {1: lambda x: 2 * x}):
            handle = block_input_reader(block, seen)  # registered after: sees the edited input
            try:
                doubled = model(input_ids=ids)[0]
            finally:
                handle.remove()
    assert torch.equal(same, clean) and not torch.allclose(doubled, clean)
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1].detach()
    torch.testing.assert_close(seen[0], 2 * hidden)
    assert not block._forward_pre_hooks


@pytest.mark.parametrize("case", ["gpt2", "llama", "bert"])
def test_zero_ablation_zeroes_only_those_neurons(case):
    model, _ = build(case)
    sites = adapter_for(model).sites(model)
    ids = torch.randint(V, (2, 5))
    seen = {}
    # an independent reader hook, registered after the pipeline's edit hook, sees the edited input
    with torch.no_grad(), capture_neurons(sites) as clean:
        model(input_ids=ids)
        clean = {k: v.clone() for k, v in clean.items()}
    with torch.no_grad(), ablate_neurons(sites, {0: torch.tensor([1, 3])}):
        handle = sites[0].module.register_forward_pre_hook(
            lambda m, a: seen.__setitem__(0, a[0].detach().clone()))
        try:
            model(input_ids=ids)
        finally:
            handle.remove()
    assert (seen[0][..., [1, 3]] == 0).all()
    keep = [i for i in range(I) if i not in (1, 3)]
    assert torch.equal(seen[0][..., keep], clean[0][..., keep])


def test_hooks_removed_after_exception():
    model, _ = build("gpt2")
    sites = adapter_for(model).sites(model)
    with pytest.raises(RuntimeError):
        with capture_neurons(sites), ablate_neurons(sites, {1: torch.tensor([0])}):
            raise RuntimeError("boom")
    assert all(not s.module._forward_pre_hooks for s in sites)


def test_unknown_family():
    model = tf.T5ForConditionalGeneration(tf.T5Config(d_model=16, d_ff=32, num_layers=1,
                                                      num_heads=2, vocab_size=V, d_kv=8))
    with pytest.raises(UserError, match="supported"):
        adapter_for(model)


def test_load_local_folder(micro_model_dir, tmp_path):
    loaded = load_model(str(micro_model_dir), storage=Storage(tmp_path))
    assert loaded.source == "local" and loaded.adapter.family == "gpt2"
    assert loaded.widths == [40, 40, 40] and loaded.layer_offsets == [0, 40, 80]
    # device auto: the GPU where there is one, in bfloat16 (float16 where bf16 is unsupported)
    if torch.cuda.is_available():
        half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert loaded.device.type == "cuda" and loaded.dtype == half
    else:
        assert loaded.device.type == "cpu" and loaded.dtype == torch.float32
    assert loaded.is_causal


def test_device_and_dtype_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UserError):
        resolve_device("tpu")
    with pytest.raises(UserError):
        resolve_dtype("float8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            resolve_device("cuda")


def test_unreachable_hub_id_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        load_model("no-such-org/no-such-model-xyz", storage=Storage(tmp_path))
    assert "not cached" in str(e.value) and "\n" not in str(e.value)
