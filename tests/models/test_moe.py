"""Mixture-of-experts neurons on random micro Mixtral, Qwen2-MoE and Qwen3-MoE models.

The truth is a plain per-token loop written here from the transformers source of each family:
the router's softmax over E experts, its top k (renormalised where the family does), and each
chosen expert's act(g) * u with the expert's rows sliced out of the fused gate_up_proj
[E, 2I, H] and down_proj [E, H, I]; Qwen2-MoE adds a shared gated MLP scaled by
sigmoid(shared_expert_gate(x)). Neuron layout: [shared (S), expert 0 (I), ..., expert E-1 (I)].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from test_architectures import one_thread
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.activations import ACT2FN

from pipeline.core.errors import UserError
from pipeline.models.adapters import Adapter, adapter_for, family_spec
from pipeline.models.hooks import capture_blocks

pytestmark = pytest.mark.usefixtures(one_thread.__name__)  # the fixture, active in this module

H, V, E, K = 32, 64, 4, 2  # hidden, vocab, experts, experts per token
_BASE = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=V, max_position_embeddings=64, num_experts_per_tok=K,
             pad_token_id=0, bos_token_id=0, eos_token_id=0)


@dataclass(frozen=True)
class Case:
    model_type: str
    config: dict
    I: int                    # neurons per expert
    S: int = 0                # shared-expert neurons
    renormalise: bool = True  # top-k weights divided by their sum
    dense: tuple[int, ...] = ()  # dense layers
    d_dense: int = 0          # their width


CASES = {
    "mixtral": Case("mixtral", dict(intermediate_size=24, num_local_experts=E,
                                    hidden_act="gelu_new"), I=24),
    # a shared expert, and layer 0 dense (mlp_only_layers); top-k weights not renormalised
    "qwen2_moe": Case("qwen2_moe", dict(intermediate_size=40, moe_intermediate_size=16,
                                        shared_expert_intermediate_size=24, num_experts=E,
                                        mlp_only_layers=[0], norm_topk_prob=False),
                      I=16, S=24, renormalise=False, dense=(0,), d_dense=40),
    "qwen3_moe": Case("qwen3_moe", dict(intermediate_size=48, moe_intermediate_size=20,
                                        num_experts=E, norm_topk_prob=True), I=20),
}


def config_of(case: Case):
    return AutoConfig.for_model(case.model_type, **_BASE, **case.config)


def build(name: str, experts_implementation: str | None = None):
    """A random micro model; the router is scaled up so that the top k are clear-cut (its
    initial weights are tiny or zero, which makes ties)."""
    case = CASES[name]
    torch.manual_seed(0)
    kwargs = {} if experts_implementation is None else dict(
        experts_implementation=experts_implementation)
    model = AutoModelForCausalLM.from_config(config_of(case), **kwargs).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for pname, p in layer.mlp.named_parameters():
                std = 1.0 if pname in ("gate.weight", "shared_expert_gate.weight") else 0.3
                p.normal_(0, std)
    return model


def mlp_io(model, layer: int, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of a layer's MLP block, [tokens, H], by hooks written here."""
    mlp = model.model.layers[layer].mlp
    seen = {}
    h = mlp.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), y=o.detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        h.remove()
    return seen["x"].reshape(-1, H), seen["y"].reshape(-1, H)


def truth(model, case: Case, layer: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A plain loop over tokens and their top-k experts of the MoE block of a layer."""
    mlp = model.model.layers[layer].mlp
    act = ACT2FN[model.config.hidden_act]
    gate_up = mlp.experts.gate_up_proj.detach()
    down = mlp.experts.down_proj.detach()
    router = mlp.gate.weight.detach()
    n, I, S = x.shape[0], case.I, case.S
    width = S + E * I
    t = {k: torch.zeros(n, width) for k in ("a", "g", "u")}
    t["routed"] = torch.zeros(n, width, dtype=torch.bool)
    t["experts"] = torch.zeros(n, K, dtype=torch.long)
    t["weights"] = torch.zeros(n, K)
    t["out"] = torch.zeros(n, H)
    for i in range(n):
        probs = torch.softmax(router @ x[i], dim=0)
        top = sorted(range(E), key=lambda e: -float(probs[e]))[:K]
        w = probs[top]
        if case.renormalise:
            w = w / w.sum()
        t["experts"][i], t["weights"][i] = torch.tensor(top), w
        if S:
            shared = mlp.shared_expert
            g = shared.gate_proj.weight.detach() @ x[i]
            u = shared.up_proj.weight.detach() @ x[i]
            t["a"][i, :S], t["g"][i, :S], t["u"][i, :S] = act(g) * u, g, u
            t["routed"][i, :S] = True
            scale = torch.sigmoid(mlp.shared_expert_gate.weight.detach() @ x[i])
            t["out"][i] += scale * (shared.down_proj.weight.detach() @ (act(g) * u))
        for j, e in enumerate(top):
            g, u = gate_up[e, :I] @ x[i], gate_up[e, I:] @ x[i]
            cols = slice(S + e * I, S + (e + 1) * I)
            t["a"][i, cols], t["g"][i, cols], t["u"][i, cols] = act(g) * u, g, u
            t["routed"][i, cols] = True
            t["out"][i] += w[j] * (down[e] @ (act(g) * u))
    return t


def capture(model, ids, layers=None) -> tuple[dict, torch.Tensor, dict[int, int]]:
    """(last block of each layer, logits, on_block calls per layer) of one forward."""
    adapter = adapter_for(model)
    blocks, calls = {}, {}

    def on_block(layer, block):
        blocks[layer] = block
        calls[layer] = calls.get(layer, 0) + 1

    with torch.no_grad(), capture_blocks(adapter, model, adapter.sites(model), layers, on_block):
        logits = model(input_ids=ids).logits
    return blocks, logits, calls


@pytest.mark.parametrize("name", list(CASES))
def test_moe_family_is_resolved_from_the_config(name):
    spec = family_spec(config_of(CASES[name]))  # no weights, no modules
    assert spec is not None and spec.moe is not None
    adapter = Adapter(name, spec)
    assert adapter.moe and adapter.gated and adapter.causal


@pytest.mark.parametrize("name", list(CASES))
def test_sites_widths_and_neuron_layout(name):
    case, model = CASES[name], build(name)
    sites = adapter_for(model).sites(model)
    assert [s.layer for s in sites] == [0, 1]
    for layer, site in enumerate(sites):
        if layer in case.dense:
            assert site.expert is None and site.width == case.d_dense
            assert site.module is model.model.layers[layer].mlp.down_proj
            continue
        assert site.width == case.S + E * case.I
        assert site.name == f"model.layers.{layer}.mlp.experts"
        assert site.module is model.model.layers[layer].mlp.experts
        layout = [-1] * case.S
        for e in range(E):
            layout += [e] * case.I
        assert site.expert.dtype == np.int16 and site.expert.tolist() == layout


@pytest.mark.parametrize("name", list(CASES))
def test_weights_in_the_neuron_layout(name):
    case, model = CASES[name], build(name)
    adapter = adapter_for(model)
    for layer in range(2):
        mlp = model.model.layers[layer].mlp
        w_in, w_up, w_out = (adapter.w_in(model, layer), adapter.w_up(model, layer),
                             adapter.w_out(model, layer))
        assert adapter.b_in(model, layer) is None
        if layer in case.dense:
            assert torch.equal(w_in, mlp.gate_proj.weight.T) and torch.equal(w_up, mlp.up_proj.weight.T)
            assert torch.equal(w_out, mlp.down_proj.weight.T)
            continue
        width = case.S + E * case.I
        assert w_in.shape == w_up.shape == (H, width) and w_out.shape == (width, H)
        for n in range(width):
            if n < case.S:
                shared = mlp.shared_expert
                expect = (shared.gate_proj.weight[n], shared.up_proj.weight[n],
                          shared.down_proj.weight[:, n])
            else:
                e, j = divmod(n - case.S, case.I)
                expect = (mlp.experts.gate_up_proj[e, j], mlp.experts.gate_up_proj[e, case.I + j],
                          mlp.experts.down_proj[e, :, j])
            for got, want in zip((w_in[:, n], w_up[:, n], w_out[n]), expect):
                assert torch.equal(got, want.detach()), (layer, n)
    assert adapter.d_model(model) == H and adapter.unembed(model).shape == (H, V)


@pytest.mark.parametrize("shape", [(2, 7), (1, 1)])  # one token leaves E - K experts unrouted
@pytest.mark.parametrize("name", list(CASES))
def test_capture_matches_a_per_token_loop(name, shape):
    case, model = CASES[name], build(name)
    ids = torch.randint(V, shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    blocks, logits, calls = capture(model, ids)
    assert torch.equal(logits, reference)  # hooking changes nothing
    assert calls == {0: 1, 1: 1}
    for layer in range(2):
        x, _ = mlp_io(model, layer, ids)
        b = blocks[layer]
        if layer in case.dense:
            mlp = model.model.layers[layer].mlp
            g, u = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
            a = ACT2FN[model.config.hidden_act](g) * u
            assert b.routed is None and b.experts is None and b.expert_weights is None
            torch.testing.assert_close(b.a.reshape(-1, case.d_dense), a.detach())
            continue
        t = truth(model, case, layer, x)
        width = case.S + E * case.I
        for k in ("a", "g", "u", "routed"):
            assert getattr(b, k).shape == (*shape, width), k
        assert b.routed.dtype == torch.bool
        assert torch.equal(b.routed.reshape(-1, width), t["routed"])
        assert b.experts.dtype == torch.int64 and b.experts.shape == (*shape, K)
        assert torch.equal(b.experts.reshape(-1, K), t["experts"])
        torch.testing.assert_close(b.expert_weights.reshape(-1, K).float(), t["weights"])
        for k in ("a", "g", "u"):
            torch.testing.assert_close(getattr(b, k).reshape(-1, width), t[k], rtol=1e-5,
                                       atol=1e-6)
        off = ~t["routed"]
        assert not b.a.reshape(-1, width)[off].any() and not b.g.reshape(-1, width)[off].any()
        if shape == (1, 1):  # some experts saw no token: all their neurons are unrouted
            assert (~t["routed"][:, case.S:]).all(0).any()


@pytest.mark.parametrize("name", list(CASES))
def test_layer_output_is_rebuilt_from_the_neurons(name):
    case, model = CASES[name], build(name)
    adapter = adapter_for(model)
    ids = torch.randint(V, (2, 6), generator=torch.Generator().manual_seed(2))
    blocks, _, _ = capture(model, ids)
    for layer in set(range(2)) - set(case.dense):
        x, y = mlp_io(model, layer, ids)
        b = blocks[layer]
        width = case.S + E * case.I
        a = b.a.reshape(-1, width)
        experts, weights = b.experts.reshape(-1, K), b.expert_weights.reshape(-1, K)
        scale = torch.zeros_like(a)  # per token and neuron: how its output is weighted
        for i in range(a.shape[0]):
            if case.S:
                gate = model.model.layers[layer].mlp.shared_expert_gate.weight.detach()
                scale[i, :case.S] = torch.sigmoid(gate @ x[i])
            for e, w in zip(experts[i].tolist(), weights[i].tolist()):
                scale[i, case.S + e * case.I: case.S + (e + 1) * case.I] = w
        rebuilt = (a * scale) @ adapter.w_out(model, layer)
        torch.testing.assert_close(rebuilt, y, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rebuilt, truth(model, case, layer, x)["out"], rtol=1e-4,
                                   atol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_capture_is_the_same_under_every_experts_implementation(implementation):
    case, model = CASES["qwen2_moe"], build("qwen2_moe", implementation)
    assert model.model.layers[1].mlp.experts.config._experts_implementation == implementation
    ids = torch.randint(V, (2, 5), generator=torch.Generator().manual_seed(3))
    blocks, _, _ = capture(model, ids, layers=[1])
    assert list(blocks) == [1]
    x, _ = mlp_io(model, 1, ids)
    t = truth(model, case, 1, x)
    torch.testing.assert_close(blocks[1].a.reshape(x.shape[0], -1), t["a"], rtol=1e-5, atol=1e-6)


def test_every_forward_hands_over_once_and_hooks_are_removed():
    model = build("qwen2_moe")
    adapter = adapter_for(model)
    mlp = model.model.layers[1].mlp
    modules = [mlp, mlp.experts, mlp.shared_expert.gate_proj, mlp.shared_expert.up_proj,
               mlp.shared_expert.down_proj]
    calls = []
    with torch.no_grad(), capture_blocks(adapter, model, adapter.sites(model), [1],
                                         lambda l, b: calls.append((l, b.a.shape))):
        model(input_ids=torch.randint(V, (1, 4)))
        model(input_ids=torch.randint(V, (3, 2)))
    assert calls == [(1, (1, 4, 88)), (1, (3, 2, 88))]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def test_an_moe_layer_has_no_gate_modules():
    model = build("mixtral")
    with pytest.raises(UserError) as e:
        adapter_for(model).gate_modules(model, 0)
    assert "\n" not in str(e.value) and "mixture-of-experts layer" in str(e.value)


def test_an_unread_experts_layout_is_refused_in_one_line():
    model = build("qwen3_moe")
    model.model.layers[1].mlp.experts.has_bias = True  # a layout with biases (e.g. gpt-oss)
    with pytest.raises(UserError) as e:
        adapter_for(model).sites(model)
    assert "\n" not in str(e.value) and "has_bias" in str(e.value)


def test_a_mixture_of_experts_without_an_entry_is_refused_in_one_line():
    config = AutoConfig.for_model("olmoe", **{**_BASE, "num_experts": E, "intermediate_size": 16})
    with pytest.raises(UserError) as e:
        family_spec(config)
    message = str(e.value)
    assert "\n" not in message and "'olmoe' is a mixture of experts (4 experts" in message
    assert "mixtral, qwen2_moe, qwen3_moe" in message


def test_neuron_hooks_other_than_capture_blocks_refuse_moe_layers():
    """capture_neurons and edit_neurons read or replace the input of a site's module, which on
    an MoE layer is the experts' input, not the neurons: refused in one line."""
    from pipeline.models.hooks import capture_neurons, edit_neurons

    model = build("mixtral")
    sites = adapter_for(model).sites(model)
    with pytest.raises(UserError, match="mixture-of-experts layers") as e:
        with capture_neurons(sites):
            pass
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="mixture-of-experts layers"):
        with edit_neurons(sites, {1: lambda x: x}):
            pass
