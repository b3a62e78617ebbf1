"""Trace: values equal an independent forward hook; a run id holding anything else is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from reference import files_of, mlp_inputs
from transformers import AutoTokenizer

from pipeline.core import tables
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, marker_path, read_json
from pipeline.stages.extract import ExtractConfig
from pipeline.stages.extract import run as extract
from pipeline.stages.trace import TraceConfig, show
from pipeline.stages.trace import run as trace

TEXT = "the value of a list returns"


def last_position_acts(model_dir: Path, text: str) -> np.ndarray:
    """Input of every transformer.h.L.mlp.c_proj at the last token, layer-major, hooked here."""
    ids = AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]
    acts = mlp_inputs(model_dir, ids)
    return np.concatenate([acts[l][-1] for l in sorted(acts)])


def _config(model_dir, **kw) -> TraceConfig:
    return TraceConfig(**{**dict(model=str(model_dir), text=TEXT, run="t", device="cpu"), **kw})


def test_trace_values_equal_an_independent_hook(tmp_path, micro_model_dir):
    storage = Storage(tmp_path)
    result = trace(_config(micro_model_dir, active_threshold=0.02), storage)
    expect = last_position_acts(micro_model_dir, TEXT)
    np.testing.assert_allclose(result.values, expect, rtol=1e-6, atol=1e-7)
    assert np.array_equal(result.active, expect > 0.02)
    assert np.array_equal(result.layer, np.repeat([0, 1, 2], 40))
    table = tables.read_partition(storage, "trace", "t")
    np.testing.assert_allclose(table["value"].to_numpy(), expect, rtol=1e-6, atol=1e-7)
    assert table["neuron_id"].to_pylist() == list(range(120))
    run_dir = storage.run_dir("t")
    ids = [int(x) for x in (run_dir / "active_neurons.txt").read_text().split()]
    assert ids == np.flatnonzero(expect > 0.02).tolist()
    assert np.array_equal(np.load(run_dir / "activation_vector.npy"), (expect > 0.02).astype(np.uint8))
    manifest = read_json(storage.run_manifest("t"))
    assert manifest["kind"] == "trace" and manifest["num_active"] == len(ids)
    assert read_json(marker_path(storage, "t", "trace"))["config_hash"] == manifest["config_hash"]


def test_rerun_is_skipped_with_the_stored_values(tmp_path, micro_model_dir):
    storage = Storage(tmp_path)
    first = trace(_config(micro_model_dir), storage)
    before = files_of(tmp_path)
    again = trace(_config(micro_model_dir), storage)
    assert again.skipped and "nothing to do" in show(again)
    assert np.array_equal(again.values, first.values) and np.array_equal(again.active, first.active)
    assert files_of(tmp_path) == before


def test_trace_on_an_extraction_run_id_is_refused(tmp_path, micro_model_dir, corpus_file):
    storage = Storage(tmp_path)
    extract(ExtractConfig(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=2,
                          max_length=8, run="t", quiet=True), storage)
    before = files_of(tmp_path)
    for overwrite in (False, True):  # an extraction is never replaced by a trace
        with pytest.raises(UserError, match="not a trace"):
            trace(_config(micro_model_dir, overwrite=overwrite), storage)
    assert files_of(tmp_path) == before
    assert read_json(storage.run_manifest("t"))["status"] == "finished"


def test_trace_of_another_text_needs_overwrite(tmp_path, micro_model_dir):
    storage = Storage(tmp_path)
    trace(_config(micro_model_dir), storage)
    before = files_of(tmp_path)
    with pytest.raises(UserError, match="another configuration.*--overwrite"):
        trace(_config(micro_model_dir, text="raise error"), storage)
    assert files_of(tmp_path) == before
    result = trace(_config(micro_model_dir, text="raise error", overwrite=True), storage)
    np.testing.assert_allclose(result.values, last_position_acts(micro_model_dir, "raise error"),
                               rtol=1e-6, atol=1e-7)
    assert read_json(storage.run_manifest("t"))["config"]["text"] == "raise error"


def test_empty_text_is_refused():
    with pytest.raises(UserError, match="--text is empty"):
        TraceConfig(model="m", text="")


def test_trace_of_a_gated_model_uses_the_gate_rule(tmp_path):
    from reference import gated_mlp_parts

    from pipeline.models.micro import save_random_llama

    model_dir = tmp_path / "llama"
    save_random_llama(model_dir)
    ids = AutoTokenizer.from_pretrained(model_dir)(TEXT)["input_ids"]
    parts = gated_mlp_parts(model_dir, ids)
    g = np.concatenate([parts[l]["g"][-1] for l in sorted(parts)])
    a = np.concatenate([parts[l]["a"][-1] for l in sorted(parts)])
    storage = Storage(tmp_path / "wh")
    result = trace(_config(model_dir, run="g"), storage)
    np.testing.assert_allclose(result.values, a, rtol=1e-5, atol=1e-6)
    assert np.array_equal(result.active, g > 0)
    assert read_json(storage.run_manifest("g"))["active"]["rule"] == "gate"
    topk = trace(_config(model_dir, run="k", active_rule="topk", topk=4), storage)
    for l in sorted(parts):
        on = topk.active[topk.layer == l]
        assert set(np.flatnonzero(on)) == set(np.argsort(-np.abs(parts[l]["a"][-1]))[:4])
