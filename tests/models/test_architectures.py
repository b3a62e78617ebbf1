"""Every architecture family on a random micro config: the neuron site and weights are right.

The truth is read off the model's own modules, named here from the transformers source of each
family (not from pipeline.models.adapters): the neuron vector is act(W_in x + b) (* W_up x for
gated MLPs) of the MLP input x, hooked independently at the MLP module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from operator import attrgetter

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM
from transformers.activations import ACT2FN

from pipeline.core.errors import UserError
from pipeline.models.adapters import adapter_for, infer_family
from pipeline.models.hooks import capture_neurons

H, I, V = 32, 48, 64  # hidden, intermediate, vocab
_IDS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)
_DEC = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=V, max_position_embeddings=64, **_IDS)
_ENC = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=V, max_position_embeddings=64, pad_token_id=0)
_HEADS = {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM, "base": AutoModel}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Micro matmuls gain nothing from a thread pool, whose spinning against the other test
    workers made this module 4x slower on 2 shared cores (46 s against 12 s with -n 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Case:
    model_type: str
    config: dict
    layers: str               # the layer list of the built model
    w_out: str                # output projection, relative to a layer
    w_in: str                 # projection feeding the nonlinearity, relative to a layer
    mlp: str                  # module (relative to a layer) whose forward input is the MLP input
    act: str                  # config attribute naming the nonlinearity
    w_up: str | None = None   # ungated branch
    head: str = "causal"
    conv1d: bool = False      # weight stored [in, out]
    fused: bool = False       # one projection: gate = first d_mlp outputs, up = the rest
    causal: bool = True


_GATED = dict(layers="model.layers", w_out="mlp.down_proj", w_in="mlp.gate_proj",
              w_up="mlp.up_proj", mlp="mlp", act="hidden_act")
_GPT2 = dict(n_layer=2, n_embd=H, n_head=4, n_inner=I, vocab_size=V, n_positions=64, **_IDS)
_BERT = dict(w_out="output.dense", w_in="intermediate.dense", mlp="intermediate",
             act="hidden_act", head="masked", causal=False)

CASES = {
    "gpt2": Case("gpt2", _GPT2, "transformer.h", "mlp.c_proj", "mlp.c_fc", "mlp",
                 "activation_function", conv1d=True),
    "gpt2-base": Case("gpt2", _GPT2, "h", "mlp.c_proj", "mlp.c_fc", "mlp", "activation_function",
                      conv1d=True, head="base"),
    "gpt_neo": Case("gpt_neo", dict(hidden_size=H, num_layers=2, num_heads=4, intermediate_size=I,
                                    vocab_size=V, max_position_embeddings=64, window_size=4,
                                    attention_types=[[["global", "local"], 1]], **_IDS),
                    "transformer.h", "mlp.c_proj", "mlp.c_fc", "mlp", "activation_function"),
    "gptj": Case("gptj", dict(n_embd=H, n_layer=2, n_head=4, n_inner=I, vocab_size=V,
                              n_positions=64, rotary_dim=4, **_IDS),
                 "transformer.h", "mlp.fc_out", "mlp.fc_in", "mlp", "activation_function"),
    "falcon": Case("falcon", dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=V, ffn_hidden_size=I, bias=True, **_IDS),
                   "transformer.h", "mlp.dense_4h_to_h", "mlp.dense_h_to_4h", "mlp", "activation"),
    "gpt_neox": Case("gpt_neox", {**_DEC, "num_key_value_heads": 4}, "gpt_neox.layers",
                     "mlp.dense_4h_to_h", "mlp.dense_h_to_4h", "mlp", "hidden_act"),
    "llama": Case("llama", _DEC, **_GATED),
    "llama-base": Case("llama", _DEC, **{**_GATED, "layers": "layers"}, head="base"),
    "qwen2": Case("qwen2", _DEC, **_GATED),
    "qwen3": Case("qwen3", {**_DEC, "head_dim": 8}, **_GATED),
    "mistral": Case("mistral", _DEC, **_GATED),
    "gemma": Case("gemma", {**_DEC, "head_dim": 8}, **_GATED),
    "gemma2": Case("gemma2", {**_DEC, "head_dim": 8}, **{**_GATED, "act": "hidden_activation"}),
    "gemma3_text": Case("gemma3_text", {**_DEC, "head_dim": 8},
                        **{**_GATED, "act": "hidden_activation"}),
    "gemma3": Case("gemma3", dict(text_config={**_DEC, "head_dim": 8}, mm_tokens_per_image=4,
                                  vision_config=dict(hidden_size=16, intermediate_size=32,
                                                     num_hidden_layers=1, num_attention_heads=2,
                                                     image_size=28, patch_size=14)),
                   **{**_GATED, "layers": "model.language_model.layers",
                      "act": "text_config.hidden_activation"}),
    "olmo": Case("olmo", _DEC, **_GATED),
    "olmo2": Case("olmo2", _DEC, **_GATED),
    "stablelm": Case("stablelm", _DEC, **_GATED),
    "phi3": Case("phi3", _DEC, "model.layers", "mlp.down_proj", "mlp.gate_up_proj", "mlp",
                 "hidden_act", w_up="mlp.gate_up_proj", fused=True),
    "phi": Case("phi", _DEC, "model.layers", "mlp.fc2", "mlp.fc1", "mlp", "hidden_act"),
    "starcoder2": Case("starcoder2", _DEC, "model.layers", "mlp.c_proj", "mlp.c_fc", "mlp",
                       "hidden_act"),
    "opt": Case("opt", dict(hidden_size=H, ffn_dim=I, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=V, max_position_embeddings=64, word_embed_proj_dim=H,
                            **_IDS),
                "model.decoder.layers", "fc2", "fc1", "fc1", "activation_function"),
    "bert": Case("bert", _ENC, "bert.encoder.layer", **_BERT),
    "bert-base": Case("bert", _ENC, "encoder.layer", **{**_BERT, "head": "base"}),
    "roberta": Case("roberta", _ENC, "roberta.encoder.layer", **_BERT),
    "electra": Case("electra", {**_ENC, "embedding_size": H}, "electra.encoder.layer", **_BERT),
    "distilbert": Case("distilbert", dict(dim=H, hidden_dim=I, n_layers=2, n_heads=4, vocab_size=V,
                                          max_position_embeddings=64, pad_token_id=0),
                       "distilbert.transformer.layer", "ffn.lin2", "ffn.lin1", "ffn", "activation",
                       head="masked", causal=False),
}


def randomise_biases(model):
    with torch.no_grad():  # non-zero biases so a wrong bias would show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def build(case: str | Case):
    case = CASES[case] if isinstance(case, str) else case
    config = AutoConfig.for_model(case.model_type, **case.config)
    torch.manual_seed(0)
    return randomise_biases(_HEADS[case.head].from_config(config).eval())


def as_in_out(module, conv1d: bool) -> torch.Tensor:
    return module.weight.detach() if conv1d else module.weight.detach().T


def expected_weights(model, case: Case, layer: int):
    """(W_in [d_model, d_mlp], b_in or None, W_up or None, W_out [d_mlp, d_model]) read off the
    modules the transformers source names for this family."""
    block = model.get_submodule(f"{case.layers}.{layer}")
    w_in = as_in_out(block.get_submodule(case.w_in), case.conv1d)
    b_in = block.get_submodule(case.w_in).bias
    b_in = None if b_in is None else b_in.detach()
    w_up = None if case.w_up is None else as_in_out(block.get_submodule(case.w_up), case.conv1d)
    if case.fused:  # Phi3MLP.forward: gate, up = gate_up_proj(x).chunk(2, dim=-1)
        w_in, w_up = w_in[:, :I], w_up[:, I:]
    return w_in, b_in, w_up, as_in_out(block.get_submodule(case.w_out), case.conv1d)


def mlp_input(model, case: Case, layer: int, ids) -> torch.Tensor:
    """The input of a layer's MLP, by a hook written here."""
    module = model.get_submodule(f"{case.layers}.{layer}.{case.mlp}")
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return seen[0]


def check_family(model, case: Case):
    """The adapter of `model` matches `case` at every layer (sites, weights, block, unembed)."""
    adapter = adapter_for(model)
    assert adapter.causal is case.causal and adapter.gated is (case.w_up is not None)
    sites = adapter.sites(model)
    assert [s.layer for s in sites] == [0, 1] and all(s.width == I for s in sites)
    ids = torch.randint(V, (2, 7))
    with torch.no_grad():
        reference = model(input_ids=ids)[0]
    with torch.no_grad(), capture_neurons(sites) as captured:
        assert torch.equal(model(input_ids=ids)[0], reference)  # capturing changes nothing
    act = ACT2FN[attrgetter(case.act)(model.config)]
    for layer in range(2):
        name = f"{case.layers}.{layer}.{case.w_out}"
        assert sites[layer].name == name and sites[layer].module is model.get_submodule(name)
        assert adapter.block(model, layer) is model.get_submodule(f"{case.layers}.{layer}")
        w_in, b_in, w_up, w_out = expected_weights(model, case, layer)
        torch.testing.assert_close(adapter.w_in(model, layer), w_in, rtol=0, atol=0)
        torch.testing.assert_close(adapter.w_out(model, layer), w_out, rtol=0, atol=0)
        if w_up is None:
            assert adapter.w_up(model, layer) is None
        else:
            torch.testing.assert_close(adapter.w_up(model, layer), w_up, rtol=0, atol=0)
        if b_in is None:
            assert adapter.b_in(model, layer) is None
        else:
            torch.testing.assert_close(adapter.b_in(model, layer), b_in, rtol=0, atol=0)
        x = mlp_input(model, case, layer, ids)
        expect = act(x @ w_in + (0 if b_in is None else b_in))
        if w_up is not None:
            expect = expect * (x @ w_up)
        torch.testing.assert_close(captured[layer], expect, rtol=1e-4, atol=1e-5)
        site = sites[layer].module  # its output is the neuron vector times W_out (+ bias)
        with torch.no_grad():
            torch.testing.assert_close(site(captured[layer]), F.linear(
                captured[layer], w_out.T, getattr(site, "bias", None)), rtol=1e-4, atol=1e-5)
    head = model.get_output_embeddings() or model.get_input_embeddings()
    assert adapter.unembed(model).shape == (H, V)
    torch.testing.assert_close(adapter.unembed(model), head.weight.detach().T, rtol=0, atol=0)
    return adapter


@pytest.mark.parametrize("case", list(CASES))
def test_family_sites_and_weights(case):
    model = build(case)
    assert adapter_for(model).family == CASES[case].model_type
    check_family(model, CASES[case])


def block_input_reader(block, seen: list):
    """An independent reader of a block's hidden_states (positional or keyword)."""
    return block.register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).detach().clone()),
        with_kwargs=True)


@pytest.mark.parametrize("case", list(CASES))
def test_block_input_is_the_residual_stream(case):
    model = build(case)
    adapter = adapter_for(model)
    ids = torch.randint(V, (2, 7))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in range(2):
        seen: list = []
        handle = block_input_reader(adapter.block(model, layer), seen)
        try:
            with torch.no_grad():
                model(input_ids=ids)
        finally:
            handle.remove()
        torch.testing.assert_close(seen[0], hidden[layer])  # the stream entering the layer
    with pytest.raises(UserError, match="out of range"):
        adapter.block(model, 2)


def test_electra_with_a_narrow_embedding_has_no_unembedding():
    # ELECTRA-small: the MLM head maps the 32-wide stream to 16-wide embeddings first
    model = build(Case("electra", {**_ENC, "embedding_size": 16}, "electra.encoder.layer", **_BERT))
    adapter = adapter_for(model)
    assert model.get_output_embeddings().weight.shape == (V, 16)
    assert [s.width for s in adapter.sites(model)] == [I, I]
    with pytest.raises(UserError, match="16-wide embeddings, not the 32-wide") as e:
        adapter.unembed(model)
    assert "\n" not in str(e.value)


# ---- families without a FAMILIES entry: found by the common names, or refused in one line


class RenamedLlamaConfig(tf.LlamaConfig):
    model_type = "renamed-llama"


class RenamedLlamaForCausalLM(tf.LlamaForCausalLM):
    config_class = RenamedLlamaConfig


class TinyConfig(tf.PretrainedConfig):
    """A family transformers does not know: configurable names of the layer list and the MLP."""

    model_type = "tiny-ffn"

    def __init__(self, layer_list="transformer.blocks", names=("w2", "w1", "w3"), hidden_act="silu",
                 hidden_size=H, intermediate_size=I, num_hidden_layers=2, vocab_size=V, **kw):
        self.layer_list, self.names, self.hidden_act = layer_list, list(names), hidden_act
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_hidden_layers, self.vocab_size = num_hidden_layers, vocab_size
        super().__init__(**kw)


class TinyBlock(torch.nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        out_name, in_name, up_name = c.names
        self.norm, self.ffn, self.act = torch.nn.LayerNorm(H), torch.nn.Module(), ACT2FN[c.hidden_act]
        self.names = c.names
        self.ffn.add_module(in_name, torch.nn.Linear(H, I))
        self.ffn.add_module(out_name, torch.nn.Linear(I, H))
        if up_name:
            self.ffn.add_module(up_name, torch.nn.Linear(H, I, bias=False))

    def forward(self, hidden_states):
        out_name, in_name, up_name = self.names
        x = self.norm(hidden_states)
        a = self.act(getattr(self.ffn, in_name)(x))
        if up_name:
            a = a * getattr(self.ffn, up_name)(x)
        return hidden_states + getattr(self.ffn, out_name)(a)


class TinyForCausalLM(tf.PreTrainedModel):
    config_class = TinyConfig
    base_model_prefix = "transformer"

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.transformer = torch.nn.Module()
        self.transformer.embed = torch.nn.Embedding(V, H)
        blocks = torch.nn.ModuleList(TinyBlock(config) for _ in range(config.num_hidden_layers))
        owner = self.transformer if config.layer_list.startswith("transformer.") else self
        owner.add_module(config.layer_list.removeprefix("transformer."), blocks)
        self.lm_head = torch.nn.Linear(H, V, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.embed

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, output_hidden_states=False, **kwargs):
        x = self.transformer.embed(input_ids)
        hidden = [x]
        for block in self.get_submodule(self.config.layer_list):
            x = block(x)
            hidden.append(x)
        return tf.modeling_outputs.CausalLMOutput(logits=self.lm_head(x),
                                                  hidden_states=tuple(hidden))


def tiny(**kw) -> TinyForCausalLM:
    torch.manual_seed(0)
    return randomise_biases(TinyForCausalLM(TinyConfig(**kw)).eval())


def renamed_llama() -> RenamedLlamaForCausalLM:
    torch.manual_seed(0)
    return RenamedLlamaForCausalLM(RenamedLlamaConfig(**_DEC)).eval()


FALLBACK_CASES = {
    # Llama's modules under a model_type without an entry: gate_proj / up_proj / down_proj
    "renamed-llama": (renamed_llama, Case("renamed-llama", _DEC, **_GATED)),
    # the original Llama names (w1 gate, w3 up, w2 down) in a family transformers does not know
    "tiny-w123": (tiny, Case("tiny-ffn", {}, "transformer.blocks", "ffn.w2", "ffn.w1", "ffn.w1",
                             "hidden_act", w_up="ffn.w3")),
    # GPT-J's names, not gated, with the layer list at the top of the model
    "tiny-fc": (lambda: tiny(layer_list="blocks", names=("fc_out", "fc_in", None),
                             hidden_act="gelu"),
                Case("tiny-ffn", {}, "blocks", "ffn.fc_out", "ffn.fc_in", "ffn.fc_in", "hidden_act")),
}


@pytest.mark.parametrize("case", list(FALLBACK_CASES))
def test_family_without_entry_is_found_by_common_names(case, caplog):
    make, expected = FALLBACK_CASES[case]
    model = make()
    with caplog.at_level(logging.INFO, logger="pipeline.models.adapters"):
        adapter = check_family(model, expected)
    assert adapter.family == expected.model_type
    picked = [r.getMessage() for r in caplog.records if r.name == "pipeline.models.adapters"]
    assert picked and all(f"{expected.layers}.<layer>.{expected.w_out}" in m for m in picked)
    assert f"{expected.model_type!r}" in picked[0]


@pytest.mark.parametrize("case", list(CASES))
def test_common_names_find_each_family_as_its_source_names_it(case):
    # the fallback on every layout of the table: phi3's fused gate_up_proj and gemma3's nested
    # text layers are not guessed (their entries are needed), rather than guessed wrong
    model, expected = build(case), CASES[case]
    if case in ("phi3", "gemma3"):
        with pytest.raises(UserError, match="FAMILIES"):
            infer_family(model)
        return
    spec = infer_family(model)
    assert (spec.layers[0], spec.w_out, spec.w_in, spec.w_up, spec.conv1d, spec.causal) == (
        expected.layers, expected.w_out, expected.w_in, expected.w_up, expected.conv1d,
        expected.causal)


def test_family_without_entry_and_unknown_mlp_names_is_refused_in_one_line():
    model = tiny(names=("proj_out", "proj_in", None))
    with pytest.raises(UserError) as e:
        adapter_for(model)
    message = str(e.value)
    assert "\n" not in message and "'tiny-ffn'" in message
    assert "FAMILIES['tiny-ffn'] = Family(('transformer.blocks',)" in message
    assert "pipeline/models/adapters.py" in message


def test_family_without_entry_and_two_mlps_a_layer_is_refused_in_one_line():
    model = renamed_llama()
    for block in model.model.layers:  # a shared expert beside the MLP: which one is the neuron?
        block.add_module("shared_expert", tf.models.llama.modeling_llama.LlamaMLP(model.config))
    with pytest.raises(UserError) as e:
        adapter_for(model)
    message = str(e.value)
    assert "\n" not in message and "(mlp.down_proj, shared_expert.down_proj)" in message
    assert "FAMILIES['renamed-llama'] = Family(('model.layers',)" in message


def test_family_without_entry_and_unknown_layer_list_is_refused_in_one_line():
    model = tiny(layer_list="stack")
    with pytest.raises(UserError) as e:
        adapter_for(model)
    message = str(e.value)
    assert "\n" not in message and "no layer list" in message
    assert "FAMILIES['tiny-ffn'] = Family((<layer list>,)" in message


@pytest.mark.parametrize("model_type, config", [
    ("t5", dict(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=V, d_kv=8)),
    ("bart", dict(d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_layers=1,
                  decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                  vocab_size=V, max_position_embeddings=32)),
])
def test_encoder_decoder_is_refused_in_one_line(model_type, config):
    model = AutoModel.from_config(AutoConfig.for_model(model_type, **config))
    with pytest.raises(UserError) as e:
        adapter_for(model)
    message = str(e.value)
    assert "\n" not in message and f"{model_type!r} is an encoder-decoder" in message
    assert "llama" in message  # the supported families are named


def test_mixture_of_experts_without_an_entry_is_refused_in_one_line():
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("olmoe", **_DEC, num_experts=4))
    with pytest.raises(UserError) as e:
        adapter_for(model)
    assert "\n" not in str(e.value) and "'olmoe' is a mixture of experts (4 experts" in str(e.value)
    assert "mixtral, qwen2_moe, qwen3_moe" in str(e.value)
