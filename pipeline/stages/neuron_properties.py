"""Per-neuron properties: weight statistics, vocabulary composition, activation statistics.

    nwh neuron-stats --run demo-corpus              # the run's model, plus its activation moments

For neuron n of a layer (W_in[:, n] its input weights, W_out[n] its output weights):
    w_in_norm, w_out_norm, input_bias, in_out_sim = cos(W_in[:, n], W_out[n]),
    l2_penalty = w_in_norm^2 + w_out_norm^2;
    vocabulary composition: mean, variance, skew and kurtosis (E[z^4], 3 for a normal) over the
    vocabulary of cos(W_out[n], W_U[:, v]) with W_U normalised per column, accumulated over
    vocabulary blocks so gpt2-xl's 6,400 x 50,257 never sits in memory at once;
    activation statistics of the run (sql/neuron_summary.sql): mean, variance, skew, kurtosis,
    sparsity (share of activations above the run's threshold).
"""

from __future__ import annotations

import logging

import numpy as np
import polars as pl

from pipeline.core import tables
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage

log = logging.getLogger(__name__)

VOCAB_BLOCK = 8192


def moments_over_columns(rows, block_cols, n_cols: int) -> dict[str, np.ndarray]:
    """Mean, variance, skew and kurtosis (E[z^4]) of each row over all columns, blockwise.

    `block_cols(start, stop)` returns the float64 block [rows, stop - start].
    """
    s = np.zeros((4, rows))
    for start in range(0, n_cols, VOCAB_BLOCK):
        x = block_cols(start, min(start + VOCAB_BLOCK, n_cols))
        x2 = x * x
        s += [x.sum(1), x2.sum(1), (x2 * x).sum(1), (x2 * x2).sum(1)]
    m1, m2, m3, m4 = s / n_cols
    var = np.maximum(m2 - m1 ** 2, 0)
    c3 = m3 - 3 * m1 * m2 + 2 * m1 ** 3
    c4 = m4 - 4 * m1 * m3 + 6 * m1 ** 2 * m2 - 3 * m1 ** 4
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"mean": m1, "var": var, "skew": np.where(var > 0, c3 / var ** 1.5, np.nan),
                "kurt": np.where(var > 0, c4 / var ** 2, np.nan)}


def weight_properties(loaded) -> pl.DataFrame:
    """Weight and vocabulary statistics of every neuron of a loaded model."""
    adapter, model = loaded.adapter, loaded.model
    unembed = adapter.unembed(model).double().cpu()              # [d_model, vocab]
    unembed = unembed / unembed.norm(dim=0, keepdim=True).clamp_min(1e-12)
    frames = []
    for layer in range(loaded.n_layers):
        w_in = adapter.w_in(model, layer).double().cpu()          # [d_model, d_mlp]
        w_out = adapter.w_out(model, layer).double().cpu()        # [d_mlp, d_model]
        b_in = adapter.b_in(model, layer)
        in_norm, out_norm = w_in.norm(dim=0), w_out.norm(dim=1)
        sim = (w_in.T * w_out).sum(1) / (in_norm * out_norm).clamp_min(1e-12)
        direction = w_out / out_norm[:, None].clamp_min(1e-12)
        vocab = moments_over_columns(
            w_out.shape[0], lambda a, b, d=direction: (d @ unembed[:, a:b]).numpy(), unembed.shape[1])
        width = w_out.shape[0]
        frames.append(pl.DataFrame({
            "neuron_id": loaded.layer_offsets[layer] + np.arange(width, dtype=np.int64),
            "layer": np.full(width, layer, np.int32), "neuron": np.arange(width, dtype=np.int32),
            "w_in_norm": in_norm.numpy(), "w_out_norm": out_norm.numpy(),
            "input_bias": (b_in.double().cpu().numpy() if b_in is not None
                           else np.zeros(width)),
            "in_out_sim": sim.numpy(), "l2_penalty": (in_norm ** 2 + out_norm ** 2).numpy(),
            "vocab_mean": vocab["mean"], "vocab_var": vocab["var"],
            "vocab_skew": vocab["skew"], "vocab_kurt": vocab["kurt"]}))
    return pl.concat(frames)


def neuron_properties(storage: Storage, run: str) -> pl.DataFrame:
    """Weight, vocabulary and activation properties of the neurons of a run's model."""
    from pipeline.stages.frequencies import neuron_summary
    from pipeline.models.loading import load_model

    manifest = storage.finished_run(run)
    loaded = load_model(manifest["model"]["name"], manifest["model"].get("revision"),
                        storage=storage, device="cpu", for_generation=False)
    if loaded.widths != manifest["model"]["widths"]:
        raise UserError(f"the model of run {run!r} changed since extraction: re-extract it")
    weights = weight_properties(loaded)
    acts = neuron_summary(storage, run).select(
        "neuron_id", pl.col("mean").alias("act_mean"), pl.col("variance").alias("act_var"),
        pl.col("skew").alias("act_skew"), pl.col("kurtosis").alias("act_kurt"), "sparsity")
    out = weights.join(acts, on="neuron_id", how="inner").sort("neuron_id")
    tables.write_part(storage, "neuron_properties", run,
                      out.select(tables.schema("neuron_properties").names).to_arrow())
    return out


def register(sub) -> None:
    from pipeline.cli import add_stage_parser

    parser = add_stage_parser(
        sub, "neuron-stats", "Weight, vocabulary and activation properties of every neuron.",
        "  nwh neuron-stats --run demo-corpus\n"
        "  nwh sql \"select layer, avg(vocab_kurt) from neuron_properties group by layer\"\n")
    parser.add_argument("--run", required=True, help="an extraction run (its model and moments)")
    parser.set_defaults(handler=_cli)


def _cli(args) -> int:
    from pipeline.cli import echo

    out = neuron_properties(Storage(args.storage), args.run)
    summary = out.group_by("layer").agg(pl.len().alias("neurons"),
                                        pl.exclude("neuron_id", "neuron", "layer").mean()).sort("layer")
    with pl.Config(tbl_rows=50, tbl_cols=-1, tbl_width_chars=220):
        echo(summary)
    return 0
