"""Hooks at the neuron site (the input of each MLP output projection), for capture and editing,
and at the input of a transformer block (the residual stream, for SAEs spliced there).

Hooks only ever live inside these context managers, whose `finally` removes them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from pipeline.core.errors import UserError
from pipeline.models.adapters import Adapter, NeuronSite


@dataclass
class NeuronBlock:
    """What one forward gives at a layer's neurons, [batch, seq, width] each.

    a is the neuron vector (the input of the output projection). Gated MLPs (a = act(g) * u) also
    give the gate pre-activation g and the up value u. Mixture-of-experts layers give `routed`:
    whether the token reached each neuron's expert (a is 0 where it did not), and the routing."""

    a: torch.Tensor
    g: torch.Tensor | None = None
    u: torch.Tensor | None = None
    routed: torch.Tensor | None = None          # bool, like a (MoE)
    experts: torch.Tensor | None = None         # int64 [batch, seq, top_k] chosen experts (MoE)
    expert_weights: torch.Tensor | None = None  # [batch, seq, top_k] their routing weights (MoE)


def _selected(sites: Sequence[NeuronSite], layers: Sequence[int] | None) -> list[NeuronSite]:
    return list(sites) if layers is None else [sites[i] for i in layers]


def _dense(sites: Sequence[NeuronSite]) -> None:
    """The module of a mixture-of-experts site reads the experts' input, not the neurons: only
    capture_blocks computes those; a hook that takes the input for the neurons is refused."""
    moe = [s.layer for s in sites if getattr(s, "expert", None) is not None]
    if moe:
        raise UserError(f"layers {moe} are mixture-of-experts layers, whose neurons live inside "
                        "fused expert weights: this stage supports dense layers only")


@contextmanager
def capture_neurons(
    sites: Sequence[NeuronSite], layers: Sequence[int] | None = None,
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
) -> Iterator[dict[int, torch.Tensor]]:
    """Capture the neuron vectors [batch, seq, d_mlp] of the selected layers on every forward.

    Yields a dict layer -> last captured tensor (overwritten by each forward), or, with
    `on_batch`, calls it as each layer is reached (so a caller can reduce and drop it).
    """
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def make(layer: int):
        def hook(module, args):
            x = args[0].detach()
            if on_batch is not None:
                on_batch(layer, x)
            else:
                captured[layer] = x
        return hook

    _dense(_selected(sites, layers))
    try:
        for site in _selected(sites, layers):
            handles.append(site.module.register_forward_pre_hook(make(site.layer)))
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_blocks(
    adapter: Adapter, model: torch.nn.Module, sites: Sequence[NeuronSite],
    layers: Sequence[int] | None, on_block: Callable[[int, NeuronBlock], None],
) -> Iterator[None]:
    """Call on_block(layer, NeuronBlock) once per forward at each selected layer.

    A gated MLP's g and u are the outputs of its gate and up projections (the halves of a fused
    one), read by forward hooks that run before the output projection's pre-hook hands over the
    block; nothing is recomputed. A mixture-of-experts layer is hooked by pipeline.models.moe."""
    handles = []
    pending: dict[int, dict[str, torch.Tensor]] = {}

    def keep(layer: int, name: str, half: int | None):
        def hook(module, args, output):
            out = output.detach()
            if half is None:
                pending.setdefault(layer, {})[name] = out
            else:  # fused gate_up projection: gate first, up second
                gate, up = out.chunk(2, dim=-1)
                pending.setdefault(layer, {}).update(g=gate, u=up)
        return hook

    def hand_over(layer: int):
        def hook(module, args):
            parts = pending.pop(layer, {})
            on_block(layer, NeuronBlock(args[0].detach(), parts.get("g"), parts.get("u")))
        return hook

    try:
        for site in _selected(sites, layers):
            if site.expert is not None:  # mixture of experts: no module's input is the neurons
                from pipeline.models import moe  # moe builds on this module's NeuronBlock

                handles.extend(moe.hook_layer(adapter, model, site.layer, on_block))
                continue
            if adapter.gated:
                gate, up = adapter.gate_modules(model, site.layer)
                if gate is up:
                    handles.append(gate.register_forward_hook(keep(site.layer, "gu", 0)))
                else:
                    handles.append(gate.register_forward_hook(keep(site.layer, "g", None)))
                    handles.append(up.register_forward_hook(keep(site.layer, "u", None)))
            handles.append(site.module.register_forward_pre_hook(hand_over(site.layer)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_neurons(
    sites: Sequence[NeuronSite], edits: dict[int, Callable[[torch.Tensor], torch.Tensor]],
) -> Iterator[None]:
    """Replace the neuron vector x of layer l with edits[l](x) on every forward."""
    _dense([sites[l] for l in edits])
    handles = []

    def make(edit):
        def hook(module, args):
            return (edit(args[0]),) + tuple(args[1:])
        return hook

    try:
        for layer, edit in edits.items():
            handles.append(sites[layer].module.register_forward_pre_hook(make(edit)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_block_inputs(
    blocks: dict[int, torch.nn.Module], edits: dict[int, Callable[[torch.Tensor], torch.Tensor]],
) -> Iterator[None]:
    """Replace the residual stream x entering block l (its hidden_states, passed positionally
    or by keyword depending on the family) with edits[l](x) on every forward."""
    handles = []

    def make(edit):
        def hook(module, args, kwargs):
            if args:
                return (edit(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}
        return hook

    try:
        for layer, edit in edits.items():
            handles.append(blocks[layer].register_forward_pre_hook(make(edit), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def ablate_neurons(
    sites: Sequence[NeuronSite], indices_by_layer: dict[int, torch.Tensor],
    values_by_layer: dict[int, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Set the given neurons to zero (zero ablation) or to fixed values (e.g. their means)."""

    def make(layer: int):
        idx = torch.as_tensor(indices_by_layer[layer], dtype=torch.long)
        vals = None if values_by_layer is None else torch.as_tensor(values_by_layer[layer])

        def edit(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            i = idx.to(x.device)
            x[..., i] = 0 if vals is None else vals.to(x.device, x.dtype)
            return x
        return edit

    with edit_neurons(sites, {l: make(l) for l in indices_by_layer if len(indices_by_layer[l])}):
        yield


def _first_output(output) -> torch.Tensor:
    """The hidden states of a module's output: the tensor itself, or the first element of the
    tuple some blocks return (GPT-Neo and Falcon return (hidden_states, ...))."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def edit_module_outputs(
    modules: dict[int, torch.nn.Module],
    edits: dict[int, Callable[[torch.Tensor], torch.Tensor]],
) -> Iterator[None]:
    """Replace the output x of modules[l] (or the first element of a tuple output) with
    edits[l](x) on every forward: the MLP output (hook_mlp_out) at the output projection, the
    residual stream leaving block l (hook_resid_post) at the block."""
    handles = []

    def make(edit):
        def hook(module, args, output):
            x = _first_output(output)
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{type(module).__name__} returns {type(output).__name__}, "
                                "not a tensor or a tuple starting with one")
            new = edit(x)
            if isinstance(output, tuple):
                return (new, *output[1:])
            return [new, *output[1:]] if isinstance(output, list) else new
        return hook

    try:
        for layer, edit in edits.items():
            handles.append(modules[layer].register_forward_hook(make(edit)))
        yield
    finally:
        for h in handles:
            h.remove()
