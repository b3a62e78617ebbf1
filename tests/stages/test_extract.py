"""Extraction end to end on a micro GPT-2: read back and compare with an independent forward pass."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.core import arrays, tables
from pipeline.core.errors import UserError
from pipeline.stages.extract import ExtractConfig, extract
from pipeline.core.storage import Storage, read_json

THRESHOLD = 0.05


def independent_acts(model_dir: Path, windows: np.ndarray, batch_size: int) -> dict[int, np.ndarray]:
    """fp32 input of every mlp.c_proj, hooked directly (not through the pipeline's hooks)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out: dict[int, list] = {i: [] for i in range(len(model.transformer.h))}
    handles = [
        block.mlp.c_proj.register_forward_pre_hook(
            lambda mod, args, i=i: out[i].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for i, block in enumerate(model.transformer.h)
    ]
    try:
        with torch.no_grad():
            for s in range(0, len(windows), batch_size):
                model.transformer(input_ids=torch.from_numpy(windows[s:s + batch_size]).long())
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v).numpy() for i, v in out.items()}


def token_windows(storage: Storage, run: str) -> np.ndarray:
    t = tables.read_partition(storage, "tokens", run).to_pydict()
    n_samples = max(t["sample"]) + 1
    length = max(t["position"]) + 1
    windows = np.zeros((n_samples, length), np.int64)
    for s, p, tok in zip(t["sample"], t["position"], t["token_id"]):
        windows[s, p] = tok
    assert t["row"] == list(range(len(t["row"])))
    return windows


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, micro_model_dir, corpus_file):
    storage = Storage(tmp_path_factory.mktemp("wh"))
    config = ExtractConfig(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=20, device="cpu",
                           max_length=24, batch_size=4, store_acts=True,
                           active_threshold=THRESHOLD, chunk_tokens=150, commit_seconds=0, run="r1")
    manifest = extract(config, storage, progress=False)
    return storage, config, manifest


def test_manifest(corpus_run):
    storage, config, manifest = corpus_run
    m = read_json(storage.run_manifest("r1"))
    assert m["status"] == "finished" and m["rows"] == 20 * 24 and m["samples"] == 20
    assert m["config"]["num_samples"] == 20 and m["versions"]["torch"] == torch.__version__
    assert m["model"]["widths"] == [40, 40, 40]
    assert not (storage.run_dir("r1") / "state").exists()


def test_dense_acts_match_independent_forward(corpus_run, micro_model_dir):
    storage, config, _ = corpus_run
    windows = token_windows(storage, "r1")
    ref = independent_acts(micro_model_dir, windows, config.batch_size)
    group = arrays.open_group(storage.arrays("r1"), mode="r")
    for layer, acts in ref.items():
        stored = group[f"acts/L{layer}"][:]
        assert stored.dtype == np.float16 and stored.shape == acts.shape
        np.testing.assert_allclose(stored.astype(np.float32), acts, rtol=2e-3, atol=2e-3)


def test_masks_are_exactly_acts_above_threshold(corpus_run, micro_model_dir):
    storage, config, _ = corpus_run
    ref = independent_acts(micro_model_dir, token_windows(storage, "r1"), config.batch_size)
    group = arrays.open_group(storage.arrays("r1"), mode="r")
    num_active = np.zeros(len(ref[0]), np.int64)
    for layer, acts in ref.items():
        mask = arrays.unpack_mask(group[f"active/L{layer}"][:], acts.shape[1])
        assert np.array_equal(mask, acts > THRESHOLD)
        num_active += mask.sum(1)
    assert np.array_equal(tables.read_partition(storage, "tokens", "r1")["num_active"].to_numpy(),
                          num_active)


def test_neuron_stats_match_dense_numpy(corpus_run, micro_model_dir):
    storage, config, _ = corpus_run
    ref = independent_acts(micro_model_dir, token_windows(storage, "r1"), config.batch_size)
    stats = tables.read_partition(storage, "neuron_stats", "r1").to_pydict()
    for layer, acts in ref.items():
        x = acts.astype(np.float64)
        sel = np.array(stats["layer"]) == layer
        col = {k: np.array(v)[sel] for k, v in stats.items()}
        assert (col["count"] == x.shape[0]).all()
        assert np.array_equal(col["neuron_id"], layer * 40 + np.arange(40))
        for name, expect in [("sum", x.sum(0)), ("sum_sq", (x ** 2).sum(0)),
                             ("sum_abs", np.abs(x).sum(0)), ("sum_cube", (x ** 3).sum(0)),
                             ("sum_quad", (x ** 4).sum(0)), ("min", x.min(0)), ("max", x.max(0))]:
            np.testing.assert_allclose(col[name], expect, rtol=1e-5, atol=1e-6, err_msg=name)
        assert np.array_equal(col["active_count"], (x > THRESHOLD).sum(0))


def test_rerun_finished_is_noop(corpus_run):
    storage, config, _ = corpus_run
    part = next(storage.table_partition("tokens", "r1").glob("*.parquet"))
    before = part.stat().st_mtime_ns
    extract(config, storage, progress=False)
    assert part.stat().st_mtime_ns == before


def test_name_clash_refused_then_overwrite(tmp_path, micro_model_dir, corpus_file):
    storage = Storage(tmp_path)
    base = dict(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=4, max_length=16,
                run="clash")
    extract(ExtractConfig(**base), storage, progress=False)
    snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="--overwrite"):
        extract(ExtractConfig(**{**base, "num_samples": 6}), storage, progress=False)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == snapshot
    m = extract(ExtractConfig(**{**base, "num_samples": 6}), storage, overwrite=True,
                progress=False)
    assert m["samples"] == 6
    assert tables.read_partition(storage, "tokens", "clash").num_rows == 6 * 16


def test_layer_subset_and_dense_subset(tmp_path, micro_model_dir, corpus_file):
    storage = Storage(tmp_path)
    extract(ExtractConfig(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=3,
                          max_length=8, layers="1-2", store_acts=True, acts_layers="2", run="sub"),
            storage, progress=False)
    group = arrays.open_group(storage.arrays("sub"), mode="r")
    assert sorted(k for k, _ in group["active"].arrays()) == ["L1", "L2"]
    assert sorted(k for k, _ in group["acts"].arrays()) == ["L2"]
    ids = tables.read_partition(storage, "neurons", "sub")["neuron_id"].to_numpy()
    assert ids.min() == 40 and ids.max() == 119  # global ids keep the offsets of all layers


def _snapshot(storage: Storage, run: str) -> dict:
    """Every table and array of a run, as comparable bytes/arrays."""
    out = {}
    for table in ("tokens", "neuron_stats", "neurons"):
        parts = sorted(storage.table_partition(table, run).glob("*.parquet"))
        out[table] = [(p.name, pq.read_table(p).to_pydict()) for p in parts]
    group = arrays.open_group(storage.arrays(run), mode="r")
    for kind in ("active", "acts"):
        if kind in group:
            for name, a in group[kind].arrays():
                out[f"{kind}/{name}"] = a[:].tobytes()
    return out


def _config(model_dir, corpus, run, **kw):
    return ExtractConfig(model=str(model_dir), corpus=str(corpus), num_samples=16, max_length=16,
                         batch_size=2, chunk_tokens=32, commit_seconds=0, store_acts=True, run=run, **kw)


def test_resume_after_crash_equals_uninterrupted(tmp_path, micro_model_dir, corpus_file,
                                                 monkeypatch):
    ref_storage = Storage(tmp_path / "ref")
    extract(_config(micro_model_dir, corpus_file, "r"), ref_storage, progress=False)

    storage = Storage(tmp_path / "crash")
    import pipeline.stages.extract as ex

    real_write_parts = tables.write_part
    calls = {"n": 0}

    def failing_write_part(storage_, table, run_id, data, part="part-0"):
        # crash on the 3rd commit after its Zarr rows are written, before the manifest is
        real_write_parts(storage_, table, run_id, data, part)
        if table == "tokens":
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("simulated crash")

    monkeypatch.setattr(ex.tables, "write_part", failing_write_part)
    with pytest.raises(RuntimeError):
        extract(_config(micro_model_dir, corpus_file, "r"), storage, progress=False)
    monkeypatch.setattr(ex.tables, "write_part", real_write_parts)
    m = read_json(storage.run_manifest("r"))
    assert m["status"] == "running" and 0 < m["committed"]["rows"] < 16 * 16
    extract(_config(micro_model_dir, corpus_file, "r"), storage, progress=False)
    assert _snapshot(storage, "r") == _snapshot(ref_storage, "r")


def test_kill_9_resumes_exactly(tmp_path, micro_model_dir):
    corpus = tmp_path / "big.txt"
    rng = np.random.default_rng(0)
    words = np.array("alpha beta gamma delta value list return none error".split())
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, 40)) for _ in range(800)))
    args = ["extract", "--model", str(micro_model_dir), "--corpus", str(corpus),
            "--num-samples", "600", "--max-length", "16", "--batch-size", "1",
            "--chunk-tokens", "16", "--commit-seconds", "0", "--run", "k", "--quiet"]
    ref = Storage(tmp_path / "ref")
    subprocess.run([sys.executable, "-m", "pipeline", *args, "--storage", str(ref.root)],
                   check=True, capture_output=True)
    storage = Storage(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--storage",
                             str(storage.root)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    manifest = storage.run_manifest("k")
    deadline = time.time() + 120
    while time.time() < deadline:
        if manifest.exists():
            try:
                if read_json(manifest)["committed"]["rows"] >= 160:
                    break
            except (ValueError, KeyError):
                pass
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    m = read_json(manifest)
    assert m["status"] == "running", "the run finished before it could be killed"
    out = subprocess.run([sys.executable, "-m", "pipeline", *args, "--storage",
                          str(storage.root)], check=True, capture_output=True, text=True)
    assert "600 sequences" in out.stdout
    assert _snapshot(storage, "k") == _snapshot(ref, "k")


def test_prompts_run_greedy_matches_hf_generate(tmp_path, micro_model_dir):
    csv = tmp_path / "p.csv"
    csv.write_text('prompts,number_of_new_tokens,num_samples\n"the value of",6,2\n"raise error",4,1\n')
    storage = Storage(tmp_path / "s")
    extract(ExtractConfig(model=str(micro_model_dir), prompts=str(csv), temperature=0, run="g"),
            storage, progress=False)
    t = tables.read_partition(storage, "tokens", "g").to_pydict()
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro_model_dir)
    for prompt, text, new in ((0, "the value of", 6), (1, "raise error", 4)):
        ids = tok(text, return_tensors="pt")["input_ids"]
        expect = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                pad_token_id=tok.eos_token_id)[0].tolist()
        rows = [i for i, p in enumerate(t["prompt"]) if p == prompt and t["prompt_sample"][i] == 0]
        assert [t["token_id"][i] for i in rows] == expect
        assert [t["generated"][i] for i in rows] == [False] * ids.shape[1] + [True] * new
    assert sorted(set(zip(t["prompt"], t["prompt_sample"]))) == [(0, 0), (0, 1), (1, 0)]


def test_prompts_sampling_is_seeded(tmp_path, micro_model_dir):
    csv = tmp_path / "p.csv"
    csv.write_text('prompts,number_of_new_tokens,num_samples\n"the value of",8,3\n')

    def run(seed, name):
        storage = Storage(tmp_path / name)
        extract(ExtractConfig(model=str(micro_model_dir), prompts=str(csv), seed=seed, top_k=20,
                              temperature=1.0, run="s"), storage, progress=False)
        return tables.read_partition(storage, "tokens", "s")["token_id"].to_pylist()

    assert run(1, "a") == run(1, "b")
    assert run(1, "a") != run(2, "c")
