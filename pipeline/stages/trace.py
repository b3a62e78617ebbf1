"""Trace one text: the neuron activation vector at its last position.

    nwh trace --model zoo-s0 --text "Return the absolute value of the argument."

Writes the `trace` table (one row per neuron) and the reference outputs beside run.json:
    runs/<run>/active_neurons.txt    ids of the active neurons, space-separated
    runs/<run>/activation_vector.npy flat binary vector over all neurons (uint8)
    runs/<run>/activation_values.npy flat float32 activations
    runs/<run>/stages/trace.json     completion marker, last
A run id that holds anything but a trace of the same configuration is refused (an extraction
is never replaced; another trace only with --overwrite).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import tables
from pipeline.core.config import ModelOptions, Stage, config_hash, opt, to_dict
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, atomic_path, read_json, slug, validate_run_id, write_json
from pipeline.kernels.active import RULES, ActiveRule, check_threshold

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TraceConfig(ModelOptions):
    text: str = opt(help="the text to trace")
    active_rule: str | None = opt(None, choices=RULES, help="value (a > t), gate (g > t, gated "
                                  "MLPs), abs (|a| > t) or topk (the --topk largest |a| of a "
                                  "layer); default gate for gated MLPs, value otherwise")
    active_threshold: float = opt(0.0, help="t of the active rule")
    topk: int | None = opt(None, help="K of --active-rule topk")
    run: str | None = opt(None, help="run name (default: slug of model, revision and text hash)",
                          hash=False)
    overwrite: bool = opt(False, help="replace a trace of another configuration under this run "
                          "name (an extraction is never replaced)", hash=False)

    def __post_init__(self) -> None:
        if not self.text:
            raise UserError("--text is empty: give the text to trace")
        check_threshold(self.active_threshold)
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
    path: Path           # the run's folder
    skipped: bool = False


def resolved_hash(config: TraceConfig) -> str:
    """Config hash with the dtype after 'auto' (a float32 and a bfloat16 trace differ)."""
    from pipeline.models.loading import dtype_name

    return config_hash(config, dtype=dtype_name(config.device, config.dtype))


def check_run_id(storage: Storage, config: TraceConfig, key: str) -> bool:
    """True when the run id already holds this trace; refuses anything else there."""
    path = storage.run_manifest(config.run_id)
    if not path.exists():
        return False
    manifest = read_json(path)
    if manifest.get("kind") != "trace":
        raise UserError(f"run {config.run_id!r} exists and is not a trace (an extraction): pass "
                        "another --run")
    if storage.marker(config.run_id, "trace").done(key) is not None:
        return True
    if not config.overwrite:
        raise UserError(f"run {config.run_id!r} holds a trace of another configuration: pass "
                        "--overwrite to replace it, or another --run")
    return False


def run(config: TraceConfig, storage: Storage) -> TraceResult:
    import torch

    from pipeline.models.hooks import capture_blocks
    from pipeline.models.loading import load_model

    storage.ensure_writable()
    key = resolved_hash(config)
    if check_run_id(storage, config, key):
        log.info("run %s already holds this trace: nothing to do", config.run_id)
        return stored(storage, config.run_id)
    loaded = load_model(config.model, config.revision, storage=storage, for_generation=False,
                        **config.model_kwargs())
    rule = ActiveRule.resolve(config.active_rule, config.active_threshold, config.topk,
                              gated=loaded.adapter.gated, widths=loaded.widths)
    ids = loaded.tokenizer(config.text, return_tensors="pt")["input_ids"].to(loaded.device)
    if ids.shape[1] == 0:
        raise UserError("--text gives no tokens: give a longer text")
    blocks: dict = {}
    with torch.inference_mode(), capture_blocks(loaded.adapter, loaded.model, loaded.sites, None,
                                                lambda l, b: blocks.__setitem__(l, b)):
        loaded.adapter.base_model(loaded.model)(input_ids=ids)
    last = [blocks[l] for l in range(loaded.n_layers)]
    values = np.concatenate([b.a[0, -1].float().cpu().numpy() for b in last]).astype(np.float32)
    active = np.concatenate([_last_active(rule, b) for b in last])
    layer = np.repeat(np.arange(loaded.n_layers, dtype=np.int32), loaded.widths)
    write_outputs(storage, config.run_id, values, active, layer, loaded.widths)
    write_json(storage.run_manifest(config.run_id), {
        "run_id": config.run_id, "status": "finished", "kind": "trace", "config": to_dict(config),
        "config_hash": key, "model": _model_record(config, loaded), "active": rule.record(),
        "num_tokens": int(ids.shape[1]), "num_active": int(active.sum()),
    })
    storage.marker(config.run_id, "trace").write(to_dict(config), key,
                 num_active=int(active.sum()))
    return TraceResult(config.run_id, values, active, layer, storage.run_dir(config.run_id))


def _last_active(rule: ActiveRule, block) -> np.ndarray:
    """The rule's mask at the last position (a neuron off its token's experts is inactive)."""
    g = None if block.g is None else block.g[0, -1:].float()
    on = rule.mask(block.a[0, -1:].float(), g)[0].cpu().numpy()
    return on if block.routed is None else on & block.routed[0, -1].cpu().numpy()


def _model_record(config: TraceConfig, loaded) -> dict:
    return {"name": config.model, "revision": loaded.revision, "source": loaded.source,
            "family": loaded.adapter.family, "n_layers": loaded.n_layers, "widths": loaded.widths}


def write_outputs(storage: Storage, run_id: str, values: np.ndarray, active: np.ndarray,
                  layer: np.ndarray, widths: list[int]) -> None:
    """The trace table and the reference files, each written atomically."""
    tables.write_part(storage, "trace", run_id, {
        "neuron_id": np.arange(values.size, dtype=np.int64), "layer": layer,
        "neuron": np.concatenate([np.arange(w, dtype=np.int32) for w in widths]),
        "value": values, "active": active,
    })
    run_dir = storage.run_dir(run_id)
    with atomic_path(run_dir / "active_neurons.txt") as tmp:
        tmp.write_text(" ".join(map(str, np.flatnonzero(active).tolist())) + "\n")
    for name, array in (("activation_vector.npy", active.astype(np.uint8)),
                        ("activation_values.npy", values)):
        with atomic_path(run_dir / name) as tmp, open(tmp, "wb") as f:
            np.save(f, array)


def stored(storage: Storage, run_id: str) -> TraceResult:
    """The result of a finished trace, read back from its table."""
    t = tables.read_partition(storage, "trace", run_id)
    return TraceResult(run_id, t["value"].to_numpy(), t["active"].to_numpy(zero_copy_only=False),
                       t["layer"].to_numpy(), storage.run_dir(run_id), skipped=True)


def show(result: TraceResult) -> str:
    per_layer = np.bincount(result.layer, weights=result.active).astype(int)
    head = (f"run {result.run_id} already holds this trace: nothing to do\n"
            if result.skipped else "")
    return (f"{head}run {result.run_id}: {int(result.active.sum())} of {result.active.size} "
            f"neurons active at the last token; per layer: {per_layer.tolist()}\n"
            f"wrote {result.path}/active_neurons.txt and activation_vector.npy")


STAGES = [Stage(
    "trace", "Activation vector of the last position of one text.",
    '  nwh trace --model zoo-s0 --text "Return the absolute value of the argument."\n'
    '  nwh trace --model gpt2 --text "Hello, how are you?" --run hello\n',
    TraceConfig, run, show)]
