"""Hooks at the neuron site (the input of each MLP output projection), for capture and editing,
and at the input of a transformer block (the residual stream, for SAEs spliced there).

Hooks only ever live inside these context managers, whose `finally` removes them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from pipeline.models.adapters import NeuronSite


def _selected(sites: Sequence[NeuronSite], layers: Sequence[int] | None) -> list[NeuronSite]:
    return list(sites) if layers is None else [sites[i] for i in layers]


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

    try:
        for site in _selected(sites, layers):
            handles.append(site.module.register_forward_pre_hook(make(site.layer)))
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_neurons(
    sites: Sequence[NeuronSite], edits: dict[int, Callable[[torch.Tensor], torch.Tensor]],
) -> Iterator[None]:
    """Replace the neuron vector x of layer l with edits[l](x) on every forward."""
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
