"""Stage `neuron-stats`: weight, vocabulary and activation properties of every neuron of a run.

    nwh neuron-stats --run demo-corpus              # the run's model, plus its activation moments
    nwh sql "select layer, avg(vocab_kurt) from neuron_properties group by layer"

Weight and vocabulary statistics come from the model's weights (pipeline.models.weights:
norms, input bias, cos(W_in, W_out), moments over the vocabulary of cos(W_out[n], W_U[:, v]));
activation statistics from the run's neuron_stats through sql/neuron_summary.sql (mean,
variance, skew, kurtosis E[z^4], sparsity = share of rows above the run's threshold). One
`neuron_properties` partition per run; runs/<run>/stages/neuron-stats.json marks it finished.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import polars as pl

from pipeline.core import tables, warehouse
from pipeline.core.config import ModelOptions, Progress, Stage, config_hash, opt, to_dict
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class NeuronStatsConfig(ModelOptions, Progress):
    run: str = opt(help="a finished extraction run (its model and activation moments)")
    overwrite: bool = opt(False, help="recompute finished properties", hash=False)
    # ModelOptions with the run's model as default; weight statistics are float64 either way
    model: str | None = opt(None, help="model to load instead of the run's (same layer widths)")
    revision: str | None = opt(None, help="revision of --model")
    device: str = opt("cpu", help="cpu, cuda or cuda:N (where the float64 weight statistics "
                      "are computed), or auto", hash=False)

    def __post_init__(self) -> None:
        if self.revision and not self.model:
            raise UserError("--revision applies to --model: the run's own model is loaded at "
                            "its revision; give --model too")


@dataclass
class NeuronStatsResult:
    run: str
    frame: pl.DataFrame   # the neuron_properties rows of the run
    reused: bool          # finished earlier with the same config


def activation_summary(storage: Storage, run_id: str) -> pl.DataFrame:
    """act_mean, act_var, act_skew, act_kurt and sparsity per neuron_id, from neuron_stats."""
    summary = warehouse.run_query(storage, "neuron_summary", run_id=run_id)
    return summary.select(
        "neuron_id", pl.col("mean").alias("act_mean"), pl.col("variance").alias("act_var"),
        pl.col("skew").alias("act_skew"), pl.col("kurtosis").alias("act_kurt"), "sparsity")


def run(config: NeuronStatsConfig, storage: Storage) -> NeuronStatsResult:
    from tqdm.auto import tqdm

    from pipeline.models.loading import dtype_name, load_model
    from pipeline.models.weights import weight_properties

    manifest = storage.finished_run(config.run)
    key = config_hash(config, dtype=dtype_name(config.device, config.dtype),
                      run_finished=manifest.get("timings", {}).get("finished"))
    marker = storage.marker(config.run, "neuron-stats")
    if not config.overwrite and marker.done(key):
        frame = pl.from_arrow(tables.read_partition(storage, "neuron_properties", config.run))
        return NeuronStatsResult(config.run, frame, reused=True)
    name = config.model or manifest["model"]["name"]
    revision = config.revision if config.model else manifest["model"].get("revision")
    loaded = load_model(name, revision, storage=storage, for_generation=False,
                        **config.model_kwargs())
    if loaded.widths != manifest["model"]["widths"]:
        raise UserError(f"model {name!r} has layer widths {loaded.widths}, not those of run "
                        f"{config.run!r} (changed since extraction?): pass the run's model or "
                        "re-extract")
    layers = tqdm(range(loaded.n_layers), disable=config.quiet, desc="weight statistics")
    weights = weight_properties(loaded, layers)
    out = weights.join(activation_summary(storage, config.run), on="neuron_id",
                       how="inner").sort("neuron_id")
    tables.write_part(storage, "neuron_properties", config.run,
                      out.select(tables.schema("neuron_properties").names).to_arrow())
    marker.write(to_dict(config), key, neurons=out.height)
    return NeuronStatsResult(config.run, out, reused=False)


def show(result: NeuronStatsResult) -> str:
    summary = result.frame.group_by("layer").agg(
        pl.len().alias("neurons"), pl.exclude("neuron_id", "neuron", "layer").mean()).sort("layer")
    head = f"neuron properties of run {result.run}"
    if result.reused:
        head += ": finished earlier with this config (--overwrite recomputes them)"
    with pl.Config(tbl_rows=50, tbl_cols=-1, tbl_width_chars=220):
        return f"{head}\n{summary}"


STAGES = [Stage(
    "neuron-stats", "Weight, vocabulary and activation properties of every neuron.",
    "  nwh neuron-stats --run demo-corpus\n"
    "  nwh sql \"select layer, avg(vocab_kurt) from neuron_properties group by layer\"\n",
    NeuronStatsConfig, run, show)]
