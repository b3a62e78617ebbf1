"""Extraction end to end on a micro GPT-2: read back and compare with an independent forward pass;
interruptions at fixed points (an exception, a real kill -9) resume to the uninterrupted result."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from reference import files_of, mlp_inputs, text_file_windows
from transformers import AutoModelForCausalLM

import pipeline.stages.extract as ex
from pipeline.cli import main
from pipeline.core import arrays, tables
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, marker_path, read_json
from pipeline.stages.extract import ExtractConfig
from pipeline.stages.extract import run as extract

THRESHOLD = 0.05


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
    config = ExtractConfig(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=20,
                           device="cpu", max_length=24, batch_size=4, store_acts=True,
                           active_threshold=THRESHOLD, chunk_tokens=150, commit_seconds=0,
                           run="r1", quiet=True)
    result = extract(config, storage)
    return storage, config, result


@pytest.fixture(scope="module")
def reference_acts(corpus_run, micro_model_dir):
    storage, config, _ = corpus_run
    return mlp_inputs(micro_model_dir, token_windows(storage, "r1"), batch_size=config.batch_size)


def test_windows_are_the_corpus_cut_by_hand(corpus_run, micro_model_dir, corpus_file):
    """The stage's input, from the file itself: the references above read the tokens table."""
    storage, config, _ = corpus_run
    expect = text_file_windows(micro_model_dir, corpus_file, length=config.max_length,
                               count=config.num_samples)
    assert np.array_equal(token_windows(storage, "r1"), expect)


def test_manifest_and_marker(corpus_run):
    storage, config, result = corpus_run
    m = read_json(storage.run_manifest("r1"))
    assert m["status"] == "finished" and m["rows"] == 20 * 24 and m["samples"] == 20
    assert m["config"]["num_samples"] == 20 and m["versions"]["torch"] == torch.__version__
    assert m["model"]["widths"] == [40, 40, 40]
    assert m["resolved"] == {"dtype": "float32", "device_type": "cpu",
                             "input_fingerprint": m["resolved"]["input_fingerprint"]}
    assert m["threads"]["torch"] >= 1 and m["threads"]["numba"] >= 1
    assert not (storage.run_dir("r1") / "state").exists()
    marker = read_json(marker_path(storage, "r1", "extract"))
    assert marker["config_hash"] == m["config_hash"] and marker["rows"] == 480
    assert not result.skipped and result.manifest["rows"] == 480


def test_dense_acts_match_independent_forward(corpus_run, reference_acts):
    storage, _, _ = corpus_run
    group = arrays.open_group(storage.arrays("r1"), mode="r")
    for layer, acts in reference_acts.items():
        stored = group[f"acts/L{layer}"][:]
        assert stored.dtype == np.float16 and stored.shape == acts.shape
        # fp16 storage: half an ulp of fp16 (2^-11 = 4.9e-4 relative) plus the subnormal step
        np.testing.assert_allclose(stored.astype(np.float32), acts, rtol=5e-4, atol=6e-8)


def test_masks_are_exactly_acts_above_threshold(corpus_run, reference_acts):
    storage, _, _ = corpus_run
    group = arrays.open_group(storage.arrays("r1"), mode="r")
    num_active = np.zeros(len(reference_acts[0]), np.int64)
    for layer, acts in reference_acts.items():
        mask = arrays.unpack_mask(group[f"active/L{layer}"][:], acts.shape[1])
        assert np.array_equal(mask, acts > THRESHOLD)
        num_active += mask.sum(1)
    assert np.array_equal(tables.read_partition(storage, "tokens", "r1")["num_active"].to_numpy(),
                          num_active)


def test_neuron_stats_match_dense_numpy(corpus_run, reference_acts):
    """Raw sums, and the power sums about the stored per-neuron shift, against dense NumPy."""
    storage, _, _ = corpus_run
    stats = tables.read_partition(storage, "neuron_stats", "r1").to_pydict()
    for layer, acts in reference_acts.items():
        x = acts.astype(np.float64)
        sel = np.array(stats["layer"]) == layer
        col = {k: np.array(v)[sel] for k, v in stats.items()}
        assert (col["count"] == x.shape[0]).all()
        assert np.array_equal(col["neuron_id"], layer * 40 + np.arange(40))
        shift = col["shift"]
        assert np.isfinite(shift).all() and (shift >= x.min(0)).all() and (shift <= x.max(0)).all()
        d = x - shift
        for name, expect in [("sum", x.sum(0)), ("sum_abs", np.abs(x).sum(0)),
                             ("shifted_sum", d.sum(0)), ("shifted_sum_sq", (d ** 2).sum(0)),
                             ("shifted_sum_cube", (d ** 3).sum(0)),
                             ("shifted_sum_quad", (d ** 4).sum(0)),
                             ("min", x.min(0)), ("max", x.max(0))]:
            np.testing.assert_allclose(col[name], expect, rtol=1e-5, atol=1e-6, err_msg=name)
        assert np.array_equal(col["active_count"], (x > THRESHOLD).sum(0))


def test_rerun_finished_is_skipped(corpus_run):
    storage, config, _ = corpus_run
    part = next(storage.table_partition("tokens", "r1").glob("*.parquet"))
    before = part.stat().st_mtime_ns
    result = extract(config, storage)
    assert result.skipped and part.stat().st_mtime_ns == before
    assert "nothing to do" in ex.show(result)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, micro_model_dir, corpus_file,
                                                    capsys):
    root = tmp_path / "wh"
    code = main(["extract", "--model", str(micro_model_dir), "--corpus", str(corpus_file),
                 "--num-samples", "6", "--max-length", "16", "--store-acts", "--acts-layers", "1",
                 "--run", "dry", "--dry-run", "--storage", str(root)])
    out = capsys.readouterr().out
    assert code == 0 and not root.exists()
    # 3 layers of ceil(40 / 8) = 5 mask bytes + 1 byte of the included flag, one dense fp16 layer
    # of 40 x 2 bytes, 40 B tokens
    assert "16 B masks + 80 B dense + ~40 B tokens row = 136 B" in out
    assert f"{96 * 136 / 1024:.1f} KiB" in out and "new run" in out


def test_dry_run_of_a_partial_run_names_the_resume_point(tmp_path, micro_model_dir, corpus_file,
                                                         monkeypatch):
    storage = Storage(tmp_path)
    interrupt_after_commits(monkeypatch, 2)
    with pytest.raises(Interrupted):
        extract(_config(micro_model_dir, corpus_file, "p"), storage)
    monkeypatch.undo()
    before = files_of(tmp_path)
    result = extract(_config(micro_model_dir, corpus_file, "p", dry_run=True), storage)
    assert result.plan.status == "resume" and result.plan.committed_rows == 64
    assert "resume after 64 committed rows" in ex.show(result)
    assert result.plan.disk_needed == (256 - 64) * result.plan.bytes_per_token
    assert files_of(tmp_path) == before


def test_name_clash_refused_then_overwrite(tmp_path, micro_model_dir, corpus_file):
    storage = Storage(tmp_path)
    base = dict(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=4, max_length=16,
                run="clash", quiet=True)
    extract(ExtractConfig(**base), storage)
    snapshot = files_of(tmp_path)
    with pytest.raises(UserError, match=r"num_samples.*--overwrite"):
        extract(ExtractConfig(**{**base, "num_samples": 6}), storage)
    assert files_of(tmp_path) == snapshot
    m = extract(ExtractConfig(**{**base, "num_samples": 6}, overwrite=True), storage).manifest
    assert m["samples"] == 6
    assert tables.read_partition(storage, "tokens", "clash").num_rows == 6 * 16


def test_layer_subset_and_dense_subset(tmp_path, micro_model_dir, corpus_file):
    storage = Storage(tmp_path)
    extract(ExtractConfig(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=3,
                          max_length=8, layers="1-2", store_acts=True, acts_layers="2", run="sub",
                          quiet=True), storage)
    group = arrays.open_group(storage.arrays("sub"), mode="r")
    assert sorted(k for k, _ in group["active"].arrays()) == ["L1", "L2"]
    assert sorted(k for k, _ in group["acts"].arrays()) == ["L2"]
    ids = tables.read_partition(storage, "neurons", "sub")["neuron_id"].to_numpy()
    assert ids.min() == 40 and ids.max() == 119  # global ids keep the offsets of all layers


def test_store_acts_of_a_layer_subset_defaults_to_the_recorded_layers(tmp_path, micro_model_dir,
                                                                      corpus_file):
    storage = Storage(tmp_path)
    extract(ExtractConfig(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=2,
                          max_length=8, layers="0-1", store_acts=True, run="sub", quiet=True),
            storage)
    group = arrays.open_group(storage.arrays("sub"), mode="r")
    assert sorted(k for k, _ in group["acts"].arrays()) == ["L0", "L1"]


@pytest.mark.parametrize("kw", [dict(corpus="x.txt", prompts="p.csv"), dict(chunk_tokens=0),
                                dict(commit_seconds=-1), dict(temperature=-0.1), dict(top_k=-1),
                                dict(num_samples=0), dict(batch_size=0), dict(run="a/b")])
def test_bad_config(kw):
    with pytest.raises(UserError):
        ExtractConfig(model="m", **kw)


# -- interruptions at fixed points, and resumes


class Interrupted(Exception):
    """Raised by the test at a chosen commit, as an interruption would stop the run there."""


def interrupt_after_commits(monkeypatch, n: int) -> None:
    """Stop the run right after its n-th commit is on disk."""
    real = ex._Writer.commit
    done = {"n": 0}

    def commit(self, units_done, samples):
        real(self, units_done, samples)
        self.wait()
        done["n"] += 1
        if done["n"] == n:
            raise Interrupted(f"after commit {n}")

    monkeypatch.setattr(ex._Writer, "commit", commit)


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
    return ExtractConfig(**{**dict(model=str(model_dir), corpus=str(corpus), num_samples=16,
                                   max_length=16, batch_size=2, chunk_tokens=32, commit_seconds=0,
                                   store_acts=True, run=run, quiet=True), **kw})


def test_resume_after_crash_equals_uninterrupted(tmp_path, micro_model_dir, corpus_file,
                                                 monkeypatch):
    ref_storage = Storage(tmp_path / "ref")
    extract(_config(micro_model_dir, corpus_file, "r"), ref_storage)

    storage = Storage(tmp_path / "crash")
    real_write_part = tables.write_part
    calls = {"n": 0}

    def failing_write_part(storage_, table, run_id, data, part="part-0"):
        # crash on the 3rd commit after its Zarr rows are written, before the manifest is
        real_write_part(storage_, table, run_id, data, part)
        if table == "tokens":
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("simulated crash")

    monkeypatch.setattr(ex.tables, "write_part", failing_write_part)
    with pytest.raises(RuntimeError):
        extract(_config(micro_model_dir, corpus_file, "r"), storage)
    monkeypatch.setattr(ex.tables, "write_part", real_write_part)
    m = read_json(storage.run_manifest("r"))
    assert m["status"] == "running" and m["committed"]["rows"] == 2 * 32
    assert not marker_path(storage, "r", "extract").exists()
    extract(_config(micro_model_dir, corpus_file, "r"), storage)
    assert _snapshot(storage, "r") == _snapshot(ref_storage, "r")


KILL_AT_COMMIT = textwrap.dedent("""
    import os, signal, sys
    import pipeline.core.tables as tables
    from pipeline.cli import main

    real, calls = tables.write_part, [0]

    def write_part(storage, table, run_id, data, part="part-0"):
        path = real(storage, table, run_id, data, part)
        if table == "tokens":
            calls[0] += 1
            if calls[0] == int(os.environ["KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)  # mid-commit: rows written, manifest not
        return path

    tables.write_part = write_part
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_9_mid_commit_resumes_exactly(tmp_path, micro_model_dir, corpus_file):
    args = ["extract", "--model", str(micro_model_dir), "--corpus", str(corpus_file),
            "--num-samples", "40", "--max-length", "16", "--batch-size", "1",
            "--chunk-tokens", "16", "--commit-seconds", "0", "--run", "k", "--quiet"]
    ref = Storage(tmp_path / "ref")
    assert main([*args, "--storage", str(ref.root)]) == 0
    storage = Storage(tmp_path / "killed")
    script = tmp_path / "kill_at_commit.py"
    script.write_text(KILL_AT_COMMIT)
    env = {**os.environ, "KILL_AT": "10"}
    proc = subprocess.run([sys.executable, str(script), *args, "--storage", str(storage.root)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    m = read_json(storage.run_manifest("k"))
    assert m["status"] == "running" and m["committed"]["rows"] == 9 * 16
    # what a kill inside atomic writes leaves: temporaries of a tokens part and of the manifest
    debris = [storage.table_partition("tokens", "k") / ".part-000000000144.parquet.tmp-9-9-abcdef",
              storage.run_dir("k") / ".run.json.tmp-9-9-abcdef"]
    for path in debris:
        path.write_bytes(b"half")
    out = subprocess.run([sys.executable, "-m", "pipeline", *args, "--storage",
                          str(storage.root)], check=True, capture_output=True, text=True)
    assert "40 sequences" in out.stdout
    assert not any(path.exists() for path in debris)  # removed on resume
    assert _snapshot(storage, "k") == _snapshot(ref, "k")


PROMPTS = ('prompts,number_of_new_tokens,num_samples\n"the value of",6,2\n"raise error",4,3\n'
           '"return a list",5,1\n')


def test_resume_of_a_prompts_run_equals_uninterrupted(tmp_path, micro_model_dir, monkeypatch):
    csv = tmp_path / "p.csv"
    csv.write_text(PROMPTS)
    config = ExtractConfig(model=str(micro_model_dir), prompts=str(csv), seed=5, top_k=20,
                           temperature=1.0, store_acts=True, chunk_tokens=1, commit_seconds=0,
                           run="pr", quiet=True)
    ref = Storage(tmp_path / "ref")
    extract(config, ref)
    storage = Storage(tmp_path / "int")
    interrupt_after_commits(monkeypatch, 1)
    with pytest.raises(Interrupted):
        extract(config, storage)
    monkeypatch.undo()
    m = read_json(storage.run_manifest("pr"))
    first_prompt_rows = 2 * (len(micro_tokens(micro_model_dir, "the value of")) + 6)
    assert m["status"] == "running" and m["committed"]["units"] == 1
    assert m["committed"]["rows"] == first_prompt_rows
    extract(config, storage)
    assert _snapshot(storage, "pr") == _snapshot(ref, "pr")
    assert _snapshot(storage, "pr")["acts/L0"]  # the comparison covers the dense arrays


def micro_tokens(model_dir, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]


def _interrupted_run(tmp_path, micro_model_dir, corpus, monkeypatch, **kw) -> Storage:
    storage = Storage(tmp_path / "wh")
    interrupt_after_commits(monkeypatch, 1)
    with pytest.raises(Interrupted):
        extract(_config(micro_model_dir, corpus, "x", **kw), storage)
    monkeypatch.undo()
    assert read_json(storage.run_manifest("x"))["committed"]["rows"] == 32
    return storage


def _cli_resume(storage, micro_model_dir, corpus, *extra) -> list[str]:
    return ["extract", "--model", str(micro_model_dir), "--corpus", str(corpus),
            "--num-samples", "16", "--max-length", "16", "--batch-size", "2", "--chunk-tokens",
            "32", "--commit-seconds", "0", "--store-acts", "--run", "x", "--quiet",
            "--storage", str(storage.root), *extra]


def test_resume_with_another_dtype_is_refused(tmp_path, micro_model_dir, corpus_file,
                                              monkeypatch, capsys):
    storage = _interrupted_run(tmp_path, micro_model_dir, corpus_file, monkeypatch,
                               dtype="float32")
    before = files_of(storage.root)
    code = main(_cli_resume(storage, micro_model_dir, corpus_file, "--dtype", "bfloat16"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "float32, now bfloat16" in err and "--dtype float32" in err and "--overwrite" in err
    assert files_of(storage.root) == before
    # 'auto' resolves to float32 on the CPU: the same run, so it resumes
    assert main(_cli_resume(storage, micro_model_dir, corpus_file, "--dtype", "auto")) == 0
    ref = Storage(tmp_path / "ref")
    extract(_config(micro_model_dir, corpus_file, "x"), ref)
    assert _snapshot(storage, "x") == _snapshot(ref, "x")


def test_resume_on_another_device_type_is_refused(tmp_path, micro_model_dir, corpus_file,
                                                  monkeypatch, capsys):
    storage = _interrupted_run(tmp_path, micro_model_dir, corpus_file, monkeypatch,
                               device="cpu", dtype="float32")
    before = files_of(storage.root)
    import pipeline.models.loading as loading

    # a machine where 'cuda' resolves: the refusal comes before any model is loaded there
    monkeypatch.setattr(loading, "resolve_device", lambda spec: torch.device(spec))
    code = main(_cli_resume(storage, micro_model_dir, corpus_file, "--device", "cuda",
                            "--dtype", "float32"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "started on cpu, now cuda" in err and "--device cpu" in err, err
    assert files_of(storage.root) == before


def test_resume_with_a_changed_corpus_file_is_refused(tmp_path, micro_model_dir, corpus_file,
                                                      monkeypatch, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(corpus_file.read_bytes())
    storage = _interrupted_run(tmp_path, micro_model_dir, corpus, monkeypatch)
    before = files_of(storage.root)
    original = corpus.read_bytes()
    corpus.write_bytes(original.replace(b"value", b"values", 1))
    code = main(_cli_resume(storage, micro_model_dir, corpus))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "changed since it started" in err, err
    assert files_of(storage.root) == before
    corpus.write_bytes(original)  # the original file: the run resumes
    assert main(_cli_resume(storage, micro_model_dir, corpus)) == 0
    assert read_json(storage.run_manifest("x"))["status"] == "finished"


def test_prompts_run_greedy_matches_hf_generate(tmp_path, micro_model_dir):
    csv = tmp_path / "p.csv"
    csv.write_text('prompts,number_of_new_tokens,num_samples\n"the value of",6,2\n"raise error",4,1\n')
    storage = Storage(tmp_path / "s")
    extract(ExtractConfig(model=str(micro_model_dir), prompts=str(csv), temperature=0, run="g",
                          quiet=True), storage)
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

    def sampled(seed, name):
        storage = Storage(tmp_path / name)
        extract(ExtractConfig(model=str(micro_model_dir), prompts=str(csv), seed=seed, top_k=20,
                              temperature=1.0, run="s", quiet=True), storage)
        return tables.read_partition(storage, "tokens", "s")["token_id"].to_pylist()

    assert sampled(1, "a") == sampled(1, "b")
    assert sampled(1, "a") != sampled(2, "c")
