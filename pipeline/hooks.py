"""Hooks at the neuron site (the input of each MLP output projection), for capture and editing.

Hooks only ever live inside these context managers, whose `finally` removes them, so an
exception (or Ctrl-C) never leaves a model with a stray hook. They are forward pre-hooks on the
output projection: capturing reads its input and returns nothing (the forward is unchanged);
editing returns a replacement input. They are device- and dtype-agnostic (CPU/CUDA,
float32/bfloat16/float16) and keep autograd working.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch

from pipeline.adapters import NeuronSite
from pipeline.errors import UserError

Edit = Callable[[torch.Tensor], torch.Tensor]


def _select(sites: Sequence[NeuronSite], layers) -> list[NeuronSite]:
    table = {s.layer: s for s in sites}
    if layers is None:
        return list(sites)
    missing = [l for l in layers if l not in table]
    if missing:
        raise UserError(f"layer(s) {missing} do not exist: the model has layers "
                        f"0-{len(sites) - 1}")
    return [table[l] for l in layers]


def _first(args: tuple, kwargs: dict, key: str | None = None) -> torch.Tensor:
    if args:
        return args[0]
    return kwargs[key] if key in kwargs else next(iter(kwargs.values()))


def _hook_site(site: NeuronSite, fn: Callable[[torch.Tensor], torch.Tensor | None],
               handles: list) -> None:
    """Register `fn` on the site input seen as [batch, seq, d_mlp]; it returns None (read only)
    or a replacement of the same shape. Handles are appended to `handles` as they are made."""
    lead: list = [None]
    if site.block is not None:  # the family flattens [batch, seq]: the block's input has them
        def block_hook(module, args, kwargs):
            lead[0] = tuple(_first(args, kwargs, "hidden_states").shape[:-1])
        handles.append(site.block.register_forward_pre_hook(block_hook, with_kwargs=True))

    def hook(module, args, kwargs):
        x = _first(args, kwargs)
        flat_shape = x.shape
        if x.dim() == 2 and lead[0] is not None and math.prod(lead[0]) == flat_shape[0]:
            x = x.reshape(*lead[0], flat_shape[-1])
        y = fn(x)
        if y is None:
            return None
        if y.shape != x.shape:
            raise ValueError(f"the edit of layer {site.layer} changed the neuron vector's shape "
                             f"from {tuple(x.shape)} to {tuple(y.shape)}")
        y = y.reshape(flat_shape)
        if args:
            return (y, *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: y}

    handles.append(site.module.register_forward_pre_hook(hook, with_kwargs=True))


@contextmanager
def capture_neurons(
    sites: Sequence[NeuronSite], layers: Sequence[int] | None = None,
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
) -> Iterator[dict[int, torch.Tensor]]:
    """Capture the neuron vectors [batch, seq, d_mlp] of the selected layers on every forward.

    Yields a dict layer -> last captured tensor (detached, overwritten by each forward), or,
    with `on_batch`, calls `on_batch(layer, tensor)` as each layer is reached instead (so a
    caller can reduce and drop it). The model's outputs are unchanged.
    """
    captured: dict[int, torch.Tensor] = {}
    handles: list = []

    def make(layer: int):
        def read(x: torch.Tensor) -> None:
            x = x.detach()
            if on_batch is not None:
                on_batch(layer, x)
            else:
                captured[layer] = x
        return read

    try:
        for site in _select(sites, layers):
            _hook_site(site, make(site.layer), handles)
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_neurons(sites: Sequence[NeuronSite], edits: Mapping[int, Edit]) -> Iterator[None]:
    """Replace the neuron vector x [batch, seq, d_mlp] of layer l with `edits[l](x)` on every
    forward.

    The edit receives the live tensor (gradients flow through it) and must return a tensor of
    the same shape; it should not modify x in place.
    """
    handles: list = []
    try:
        for site in _select(sites, list(edits)):  # unknown layers fail before any hook
            _hook_site(site, edits[site.layer], handles)
        yield
    finally:
        for h in handles:
            h.remove()


def ablation_edit(indices: torch.Tensor, width: int, values: torch.Tensor | None = None) -> Edit:
    """An edit that sets neurons `indices` to zero, or to `values` (one per index, e.g. means)."""
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= width):
        raise UserError(f"neuron indices {idx.tolist()[:8]} are out of range for a layer of "
                        f"{width} neurons")
    vals = None
    if values is not None:
        vals = torch.as_tensor(values).reshape(-1)
        if vals.numel() != idx.numel():
            raise UserError(f"ablation got {vals.numel()} values for {idx.numel()} neurons: "
                            "give one value per ablated neuron")
    cache: dict = {}

    def edit(x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = (idx.to(x.device), None if vals is None else vals.to(x.device, x.dtype))
        i, v = cache[key]
        if v is None:
            return x.index_fill(-1, i, 0)
        return x.index_copy(-1, i, v.expand(*x.shape[:-1], -1))
    return edit


@contextmanager
def ablate_neurons(
    sites: Sequence[NeuronSite], indices_by_layer: Mapping[int, torch.Tensor],
    values_by_layer: Mapping[int, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Zero ablation (values None) or mean ablation (values: one value per ablated neuron)."""
    table = {s.layer: s for s in _select(sites, list(indices_by_layer))}
    edits = {}
    for layer, idx in indices_by_layer.items():
        if len(idx) == 0:
            continue
        values = None
        if values_by_layer is not None:
            if layer not in values_by_layer:
                raise UserError(f"mean ablation has no values for layer {layer}")
            values = values_by_layer[layer]
        edits[layer] = ablation_edit(idx, table[layer].width, values)
    with edit_neurons(sites, edits):
        yield
