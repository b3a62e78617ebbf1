"""Weight and vocabulary properties of every neuron of a loaded model (no activations needed).

For neuron n of a layer (W_in[:, n] its input weights, W_out[n] its output weights):
    w_in_norm, w_out_norm, input_bias (0 without a bias), in_out_sim = cos(W_in[:, n], W_out[n]),
    l2_penalty = w_in_norm^2 + w_out_norm^2;
    vocabulary composition: mean, variance, skew and kurtosis (E[z^4], 3 for a normal) over the
    vocabulary of cos(W_out[n], W_U[:, v]) with W_U normalised per column. Power sums are
    accumulated over vocabulary blocks, so gpt2-xl's 6,400 x 50,257 never sits in memory at
    once, and turned into moments by the one definition (pipeline.core.warehouse.central_moments).
Computed in float64 on the device of the weights.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import polars as pl
import torch

from pipeline.core.warehouse import central_moments

VOCAB_BLOCK = 8192  # vocabulary columns per block: 6,400 neurons x 8,192 in float64 is 420 MB
WEIGHT_COLUMNS = ("w_in_norm", "w_out_norm", "input_bias", "in_out_sim", "l2_penalty",
                  "vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt")


def moments_over_columns(block_cols: Callable[[int, int], torch.Tensor], n_cols: int,
                         *, block: int = VOCAB_BLOCK) -> dict[str, np.ndarray]:
    """Mean, var, skew, kurt (E[z^4]) of each row over all columns.

    `block_cols(start, stop)` returns the float64 block [rows, stop - start]. The power sums
    are taken about each row's mean over the first block (no digits lost to a large mean)."""
    shift = sums = None
    for start in range(0, n_cols, block):
        x = block_cols(start, min(start + block, n_cols))
        if shift is None:
            shift = x.mean(1, keepdim=True)
            sums = torch.zeros((4, x.shape[0]), dtype=torch.float64, device=x.device)
        z = x - shift
        z2 = z * z
        sums += torch.stack([z.sum(1), z2.sum(1), (z2 * z).sum(1), (z2 * z2).sum(1)])
    s = sums.cpu().numpy()
    return central_moments(n_cols, shift[:, 0].cpu().numpy(), *s)


def _unit_columns(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=0, keepdim=True).clamp_min(1e-12)


def layer_properties(loaded, layer: int, unembed: torch.Tensor) -> pl.DataFrame:
    """Weight and vocabulary statistics of one layer's neurons; `unembed` is W_U [d_model,
    vocab] in float64 with unit columns."""
    adapter, model = loaded.adapter, loaded.model
    w_in = adapter.w_in(model, layer).double()          # [d_model, d_mlp]
    w_out = adapter.w_out(model, layer).double()        # [d_mlp, d_model]
    b_in = adapter.b_in(model, layer)
    width = w_out.shape[0]
    in_norm, out_norm = w_in.norm(dim=0), w_out.norm(dim=1)
    sim = (w_in.T * w_out).sum(1) / (in_norm * out_norm).clamp_min(1e-12)
    direction = w_out / out_norm[:, None].clamp_min(1e-12)
    vocab = moments_over_columns(lambda a, b: direction @ unembed[:, a:b], unembed.shape[1])
    cpu = {k: v.cpu().numpy() for k, v in
           {"w_in_norm": in_norm, "w_out_norm": out_norm, "in_out_sim": sim,
            "l2_penalty": in_norm ** 2 + out_norm ** 2}.items()}
    return pl.DataFrame({
        "neuron_id": loaded.layer_offsets[layer] + np.arange(width, dtype=np.int64),
        "layer": np.full(width, layer, np.int32), "neuron": np.arange(width, dtype=np.int32),
        "w_in_norm": cpu["w_in_norm"], "w_out_norm": cpu["w_out_norm"],
        "input_bias": np.zeros(width) if b_in is None else b_in.double().cpu().numpy(),
        "in_out_sim": cpu["in_out_sim"], "l2_penalty": cpu["l2_penalty"],
        **{f"vocab_{k}": vocab[k] for k in ("mean", "var", "skew", "kurt")}})


@torch.no_grad()
def weight_properties(loaded, layers: Iterable[int] | None = None) -> pl.DataFrame:
    """Weight and vocabulary statistics of the neurons of `layers` (default all; a progress bar
    over them works too) of a loaded model, by neuron_id."""
    unembed = _unit_columns(loaded.adapter.unembed(loaded.model).double())
    layers = range(loaded.n_layers) if layers is None else layers
    return pl.concat([layer_properties(loaded, layer, unembed) for layer in layers])
