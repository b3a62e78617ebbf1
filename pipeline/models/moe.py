"""Capture of mixture-of-experts neurons: one NeuronBlock per forward of an MoE layer.

A neuron of an MoE layer is (layer, expert, index); the layer's neuron vector, of width S + E*I,
is laid out [shared expert (S, if any), expert 0 (I), ..., expert E-1 (I)] (MoeParts.layout).
transformers 5 fuses the experts into 3-D parameters with no module per expert, so there is no
input of an output projection to hook. Instead a pre-hook on the experts module reads what it is
given (hidden_states [n, H], top_k_index [n, k], top_k_weights [n, k]) and computes each
expert's g, u and a = act(g) * u on the tokens routed to it, with the module's own parameters
and act_fn and the ops of its eager forward; off an expert's tokens a = g = u = 0 and routed is
False. The shared expert is an ordinary gated MLP, hooked like a dense one (routed everywhere).
A forward hook on the sparse block hands the assembled block over once both parts are known.

The layer's output is sum over the token's experts e of top_k_weights[e] * (a_e @ W_out_e),
plus sigmoid(shared_gate(x)) * (a_shared @ W_out_shared) where there is a shared expert.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.models.adapters import Adapter, MoeParts
from pipeline.models.hooks import NeuronBlock


def _experts_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
    """(hidden_states, top_k_index, top_k_weights) of an experts forward, positional or not."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]):]]
    return tuple(v.detach() for v in values)


def routed_neurons(parts: MoeParts, x: torch.Tensor, top_k_index: torch.Tensor):
    """(a, g, u, routed) [n, E*I] of the routed experts on tokens x [n, H].

    Memory: three [n, E*I] float tensors and one bool, dense (Qwen3-30B-A3B: 98,304 neurons a
    layer, 2.4 GB in bf16 for 4,096 tokens), although only k/E of each row is nonzero."""
    n, E, I = x.shape[0], parts.n_experts, parts.d_expert
    gate_up, _ = parts.fused()
    act_fn = parts.experts.act_fn
    g = x.new_zeros(n, E * I)
    u = x.new_zeros(n, E * I)
    a = x.new_zeros(n, E * I)
    hit = torch.zeros(n, E, dtype=torch.bool, device=x.device)
    # the token order of the eager forward (top-k position, then token: torch.where over
    # one_hot(top_k_index).permute(2, 1, 0)[e]) so each matmul sees the same rows
    slots = top_k_index.T
    for e in torch.unique(top_k_index).tolist():
        if not 0 <= e < E:
            continue  # expert parallelism's sentinel for an expert held elsewhere
        _, tokens = torch.where(slots == e)
        gate, up = F.linear(x[tokens], gate_up[e].detach()).chunk(2, dim=-1)
        cols = slice(e * I, (e + 1) * I)
        g[tokens, cols], u[tokens, cols] = gate, up
        a[tokens, cols] = act_fn(gate) * up
        hit[tokens, e] = True
    return a, g, u, hit.repeat_interleave(I, dim=1)


def hook_layer(adapter: Adapter, model: torch.nn.Module, layer: int,
               on_block: Callable[[int, NeuronBlock], None]) -> list:
    """Register the hooks that call on_block(layer, NeuronBlock) once per forward of a
    mixture-of-experts layer; returns their handles (the caller removes them)."""
    parts = adapter.moe_parts(model, layer)
    if parts is None:
        raise ValueError(f"layer {layer} is not a mixture-of-experts layer")
    state: dict[str, torch.Tensor] = {}
    handles = []

    def read_experts(module, args, kwargs):
        x, index, weights = _experts_inputs(args, kwargs)
        state["a"], state["g"], state["u"], state["routed"] = routed_neurons(parts, x, index)
        state["experts"], state["weights"] = index.long(), weights

    def keep(name: str):
        def hook(module, args, output):
            state[f"shared_{name}"] = output.detach()
        return hook

    def keep_input(module, args):
        state["shared_a"] = args[0].detach()

    def hand_over(module, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        lead = tuple(out.shape[:-1])  # [batch, seq]
        if "a" not in state:
            raise RuntimeError(f"the experts of layer {layer} ran no forward inside their block")
        parts_of = {k: [state[k]] for k in ("a", "g", "u")}
        routed = [state["routed"]]
        if parts.shared is not None:
            for k in ("a", "g", "u"):
                parts_of[k].insert(0, state[f"shared_{k}"].reshape(-1, parts.d_shared))
            routed.insert(0, state["routed"].new_ones(routed[0].shape[0], parts.d_shared))
        width = parts.width
        cat = {k: torch.cat(v, dim=-1).reshape(*lead, width) for k, v in parts_of.items()}
        block = NeuronBlock(cat["a"], cat["g"], cat["u"],
                            routed=torch.cat(routed, dim=-1).reshape(*lead, width),
                            experts=state["experts"].reshape(*lead, -1),
                            expert_weights=state["weights"].reshape(*lead, -1))
        state.clear()
        on_block(layer, block)

    try:
        handles.append(parts.experts.register_forward_pre_hook(read_experts, with_kwargs=True))
        if parts.shared is not None:
            handles.append(parts.shared.gate_proj.register_forward_hook(keep("g")))
            handles.append(parts.shared.up_proj.register_forward_hook(keep("u")))
            handles.append(parts.shared.down_proj.register_forward_pre_hook(keep_input))
        handles.append(parts.block.register_forward_hook(hand_over))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return handles
