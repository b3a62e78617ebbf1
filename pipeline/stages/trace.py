"""Trace one text: the neuron activation vector at its last position.

    nwh trace --model zoo-s0 --text "Return the absolute value of the argument."

Writes the `trace` table (one row per neuron) and the reference outputs beside run.json:
    runs/<run>/active_neurons.txt    ids of the active neurons, space-separated
    runs/<run>/activation_vector.npy flat binary vector over all neurons (uint8)
    runs/<run>/activation_values.npy flat float32 activations
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from pipeline.core import tables
from pipeline.core.config import add_arguments, from_args, opt, to_dict
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, atomic_path, slug, validate_run_id, write_json

log = logging.getLogger(__name__)


@dataclass
class TraceConfig:
    model: str = opt(help="zoo name, local folder or hub id")
    text: str = opt(help="the text to trace")
    revision: str | None = opt(None, help="checkpoint / hub revision")
    device: str = opt("auto", help="auto, cpu, cuda or cuda:N")
    dtype: str = opt("auto", help="auto, float32, float16, bfloat16")
    trust_remote_code: bool = opt(False, help="allow model code from the hub")
    active_threshold: float = opt(0.0, help="a neuron is active iff its activation > this")
    run: str | None = opt(None, help="run name (default: slug of model, revision and text hash)")

    def __post_init__(self) -> None:
        if not self.text:
            raise UserError("--text is empty: give the text to trace")
        if self.run is not None:
            validate_run_id(self.run)

    @property
    def run_id(self) -> str:
        digest = hashlib.sha256(self.text.encode()).hexdigest()[:8]
        return self.run or slug(self.model.split("/")[-1], self.revision or "", "trace", digest)


@dataclass
class TraceResult:
    run_id: str
    values: np.ndarray   # float32 [num_neurons] over all layers, layer-major
    active: np.ndarray   # bool [num_neurons]
    layer: np.ndarray    # int32 [num_neurons] layer of each neuron


def trace(config: TraceConfig, storage: Storage) -> TraceResult:
    import torch

    from pipeline.models.hooks import capture_neurons
    from pipeline.models.loading import load_model

    storage.ensure_writable()
    loaded = load_model(config.model, config.revision, storage=storage, device=config.device,
                        dtype=config.dtype, trust_remote_code=config.trust_remote_code,
                        for_generation=False)
    ids = loaded.tokenizer(config.text, return_tensors="pt")["input_ids"].to(loaded.device)
    if ids.shape[1] == 0:
        raise UserError("--text gives no tokens: give a longer text")
    with torch.inference_mode(), capture_neurons(loaded.sites) as captured:
        loaded.adapter.base_model(loaded.model)(input_ids=ids)
        values = np.concatenate([
            captured[l][0, -1].float().cpu().numpy() for l in range(loaded.n_layers)
        ]).astype(np.float32)
    active = values > config.active_threshold
    layer = np.repeat(np.arange(loaded.n_layers, dtype=np.int32), loaded.widths)
    run_id = config.run_id
    tables.write_part(storage, "trace", run_id, {
        "neuron_id": np.arange(values.size, dtype=np.int64), "layer": layer,
        "neuron": np.concatenate([np.arange(w, dtype=np.int32) for w in loaded.widths]),
        "value": values, "active": active,
    })
    run_dir = storage.run_dir(run_id)
    with atomic_path(run_dir / "active_neurons.txt") as tmp:
        tmp.write_text(" ".join(map(str, np.flatnonzero(active).tolist())) + "\n")
    for name, array in (("activation_vector.npy", active.astype(np.uint8)),
                        ("activation_values.npy", values)):
        with atomic_path(run_dir / name) as tmp, open(tmp, "wb") as f:
            np.save(f, array)
    write_json(storage.run_manifest(run_id), {
        "run_id": run_id, "status": "finished", "kind": "trace", "config": to_dict(config),
        "model": {"name": config.model, "revision": loaded.revision, "source": loaded.source,
                  "family": loaded.adapter.family, "n_layers": loaded.n_layers,
                  "widths": loaded.widths},
        "num_tokens": int(ids.shape[1]), "num_active": int(active.sum()),
    })
    return TraceResult(run_id, values, active, layer)


def register(sub) -> None:
    from pipeline.cli import add_stage_parser

    parser = add_stage_parser(
        sub, "trace", "Activation vector of the last position of one text.",
        '  nwh trace --model zoo-s0 --text "Return the absolute value of the argument."\n'
        '  nwh trace --model gpt2 --text "Hello, how are you?" --run hello\n',
    )
    add_arguments(parser, TraceConfig)
    parser.set_defaults(handler=_cli)


def _cli(args) -> int:
    from pipeline.cli import echo

    storage = Storage(args.storage)
    result = trace(from_args(TraceConfig, args), storage)
    per_layer = np.bincount(result.layer, weights=result.active).astype(int)
    echo(f"run {result.run_id}: {int(result.active.sum())} of {result.active.size} neurons "
          f"active at the last token; per layer: {per_layer.tolist()}")
    echo(f"wrote {storage.run_dir(result.run_id)}/active_neurons.txt and activation_vector.npy")
    return 0
