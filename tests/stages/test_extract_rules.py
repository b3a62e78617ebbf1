"""Active rules, gated neurons and excluded rows, end to end on micro Llama and GPT-2 models,
against hooks written in tests/reference.py and plain NumPy."""

from __future__ import annotations

import numpy as np
import pytest
from reference import files_of, gated_mlp_parts, mlp_inputs

from pipeline.cli import main
from pipeline.core import arrays, tables
from pipeline.core.coact import load_run_graph, read_counts
from pipeline.core.storage import Storage, read_json
from pipeline.kernels.accumulators import COMBINATIONS
from pipeline.models.micro import save_random_llama
from pipeline.stages.analysis import AnalysisConfig
from pipeline.stages.analysis import run as analyze
from pipeline.stages.coactivation import CoactivationConfig
from pipeline.stages.coactivation import run as coactivate
from pipeline.stages.extract import ExtractConfig
from pipeline.stages.extract import run as extract

LENGTH, SAMPLES = 16, 12


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("micro-llama")
    save_random_llama(directory)
    return directory


def _extract(storage, model_dir, corpus_file, run, **kw):
    config = ExtractConfig(model=str(model_dir), corpus=str(corpus_file), num_samples=SAMPLES,
                           device="cpu", max_length=LENGTH, batch_size=4, chunk_tokens=64,
                           commit_seconds=0, run=run, quiet=True, store_acts=True, **kw)
    extract(config, storage)
    return read_json(storage.run_manifest(run))


def _tokens(storage, run):
    t = tables.read_partition(storage, "tokens", run).sort_by("row").to_pydict()
    return {k: np.array(v) for k, v in t.items()}


def _mask(storage, run, kind, layer, width):
    group = arrays.open_group(storage.arrays(run), mode="r")
    return arrays.unpack_mask(group[f"{kind}/L{layer}"][:], width)


def _stats(storage, run):
    return tables.read_partition(storage, "neuron_stats", run).sort_by("neuron_id").to_pydict()


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory, llama_dir, corpus_file):
    storage = Storage(tmp_path_factory.mktemp("wh"))
    manifest = _extract(storage, llama_dir, corpus_file, "gated", sign_examples=3)
    ids = _tokens(storage, "gated")["token_id"].reshape(SAMPLES, LENGTH)
    return storage, manifest, gated_mlp_parts(llama_dir, ids)


def test_gated_default_rule_is_the_gate_and_both_masks_are_kept(gated_run):
    storage, manifest, ref = gated_run
    assert manifest["active"] == {"rule": "gate", "threshold": 0.0, "topk": 0}
    runs = tables.read_partition(storage, "runs", "gated").to_pydict()
    assert runs["active_rule"] == ["gate"] and runs["topk"] == [0]
    stats = _stats(storage, "gated")
    for layer, parts in ref.items():
        width = parts["a"].shape[1]
        assert np.array_equal(_mask(storage, "gated", "active", layer, width), parts["g"] > 0)
        assert np.array_equal(_mask(storage, "gated", "gate", layer, width), parts["g"] > 0)
        assert np.array_equal(_mask(storage, "gated", "up", layer, width), parts["u"] > 0)
        rows = np.array(stats["layer"]) == layer
        assert np.array_equal(np.array(stats["active_count"])[rows], (parts["g"] > 0).sum(0))
        acts = arrays.open_group(storage.arrays("gated"), mode="r")[f"acts/L{layer}"][:]
        np.testing.assert_allclose(acts, parts["a"], rtol=1e-3, atol=1e-3)  # fp16


def test_sign_combinations_and_their_examples_match_numpy(gated_run):
    storage, _, ref = gated_run
    stats = tables.read_partition(storage, "sign_stats", "gated").to_pydict()
    examples = tables.read_partition(storage, "sign_examples", "gated").to_pydict()
    got = {(l, n, c): (k, m) for l, n, c, k, m in zip(stats["layer"], stats["neuron"],
           stats["combination"], stats["count"], stats["mean_abs"])}
    tops: dict = {}
    for l, n, c, rank, row, value in zip(examples["layer"], examples["neuron"],
                                         examples["combination"], examples["rank"],
                                         examples["row"], examples["value"]):
        tops.setdefault((l, n, c), []).append((rank, row, value))
    for layer, parts in ref.items():
        g, u, a = parts["g"], parts["u"], parts["a"]
        for name, here in zip(COMBINATIONS, [(g > 0) & (u > 0), (g > 0) & (u <= 0),
                                             (g <= 0) & (u > 0), (g <= 0) & (u <= 0)]):
            for n in range(a.shape[1]):
                count, mean_abs = got[(layer, n, name)]
                assert count == here[:, n].sum()
                if count:
                    assert mean_abs == pytest.approx(np.abs(a[here[:, n], n]).mean(), rel=1e-5)
                rows = np.flatnonzero(here[:, n])
                want = rows[np.argsort(-np.abs(a[rows, n]), kind="stable")][:3]
                have = sorted(tops.get((layer, n, name), []))
                assert [r for _, r, _ in have] == want.tolist()
                assert [v for _, _, v in have] == pytest.approx(a[want, n].tolist(), rel=1e-5)


@pytest.mark.parametrize("rule, extra, truth", [
    ("value", {"active_threshold": 0.01}, lambda p: p["a"] > 0.01),
    ("abs", {"active_threshold": 0.02}, lambda p: np.abs(p["a"]) > 0.02),
    ("topk", {"topk": 5}, None),
])
def test_other_rules_give_their_masks(tmp_path, llama_dir, corpus_file, gated_run, rule, extra,
                                      truth):
    storage = Storage(tmp_path / "wh")
    manifest = _extract(storage, llama_dir, corpus_file, rule, active_rule=rule,
                        sign_examples=0, **extra)
    assert manifest["active"]["rule"] == rule
    for layer, parts in gated_run[2].items():
        mask = _mask(storage, rule, "active", layer, parts["a"].shape[1])
        if truth is not None:
            assert np.array_equal(mask, truth(parts))
        else:  # the 5 largest |a| of every row (float32 ties are absent here)
            for r, row in enumerate(np.abs(parts["a"])):
                assert set(np.flatnonzero(mask[r])) == set(np.argsort(-row)[:5])


def test_excluded_rows_stay_in_tokens_and_masks_but_leave_every_accumulator(
        tmp_path, micro_model_dir, corpus_file):
    storage = Storage(tmp_path / "wh")
    _extract(storage, micro_model_dir, corpus_file, "all", active_threshold=0.05)
    _extract(storage, micro_model_dir, corpus_file, "some", active_threshold=0.05,
             exclude="eos", skip_positions=2)
    t = _tokens(storage, "some")
    eos = 0  # the micro tokenizer's <|endoftext|>
    want = (t["position"] >= 2) & (t["token_id"] != eos)
    assert (t["token_id"] == eos).any() and np.array_equal(t["included"], want)
    assert _tokens(storage, "all")["included"].all()
    ref = mlp_inputs(micro_model_dir, t["token_id"].reshape(SAMPLES, LENGTH), batch_size=4)
    stats = _stats(storage, "some")
    for layer, acts in ref.items():
        width = acts.shape[1]
        for run in ("all", "some"):  # the masks keep every row
            assert np.array_equal(_mask(storage, run, "active", layer, width), acts > 0.05)
        rows = np.array(stats["layer"]) == layer
        kept = acts[want].astype(np.float64)
        assert (np.array(stats["count"])[rows] == want.sum()).all()
        np.testing.assert_allclose(np.array(stats["sum"])[rows], kept.sum(0), rtol=1e-6,
                                   atol=1e-9)
        assert np.array_equal(np.array(stats["active_count"])[rows], (kept > 0.05).sum(0))
        np.testing.assert_allclose(np.array(stats["max"])[rows], kept.max(0), rtol=1e-6)
    runs = tables.read_partition(storage, "runs", "some").to_pydict()
    assert runs["num_included"] == [int(want.sum())] and runs["num_rows"] == [want.size]
    for engine in ("popcount", "sql"):  # co-activation counts only included rows
        coactivate(CoactivationConfig(run="some", engine=engine, overwrite=True, quiet=True),
                   storage)
        for a in range(len(ref) - 1):
            on_a, on_b = (ref[a] > 0.05)[want], (ref[a + 1] > 0.05)[want]
            expect = on_a.astype(np.int64).T @ on_b.astype(np.int64)
            assert np.array_equal(read_counts(storage, "some", a, a + 1), expect), engine
    assert load_run_graph(storage, "some").tokens == int(want.sum())  # T of the edge weights
    analysed = analyze(AnalysisConfig(run="some", max_rows=1000, clusters=2), storage)
    assert analysed.analysed_rows == int(want.sum())  # every included row, no other


@pytest.mark.parametrize("args, match", [
    (["--active-rule", "gate"], "no gate"),
    (["--active-threshold", "nan"], "finite"),
    (["--max-length", "500"], "beyond the model's context of 128"),
    (["--active-rule", "topk", "--topk", "0"], "between 1 and"),
    (["--active-rule", "topk", "--topk", "41"], r"width \(40\)"),
    (["--exclude", "bos,tabs"], "tabs"),
    (["--skip-positions", "-1"], "skip-positions"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, micro_model_dir, corpus_file, capsys,
                                                  args, match):
    import re

    root = tmp_path / "wh"
    common = ["extract", "--storage", str(root), "--model", str(micro_model_dir), "--corpus",
              str(corpus_file), "--num-samples", "2", "--max-length", "16", "--run", "keep",
              "--quiet"]
    assert main(common) == 0
    before = files_of(root)
    code = main(common[:-3] + ["--run", "bad", "--quiet"] + args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and re.search(match, err), err
    assert files_of(root) == before and not (root / "runs" / "bad").exists()


def test_signs_stage_shows_each_combination_with_its_examples_in_context(gated_run, capsys):
    storage, _, ref = gated_run
    code = main(["signs", "--storage", str(storage.root), "--run", "gated", "--layer", "1",
                 "--neuron", "7", "--context", "3", "--out", str(storage.root / "s.csv")])
    assert code == 0
    import polars as pl

    frame = pl.read_csv(storage.root / "s.csv")
    g, u, a = (ref[1][k][:, 7] for k in ("g", "u", "a"))
    t = _tokens(storage, "gated")
    for name, here in zip(COMBINATIONS, [(g > 0) & (u > 0), (g > 0) & (u <= 0),
                                         (g <= 0) & (u > 0), (g <= 0) & (u <= 0)]):
        part = frame.filter(pl.col("combination") == name)
        if not here.any():
            continue
        assert part["count"][0] == here.sum()
        assert part["share"][0] == pytest.approx(here.sum() / len(a))
        rows = np.flatnonzero(here)
        best = rows[np.argsort(-np.abs(a[rows]), kind="stable")][:3]
        assert part["row"].to_list() == best.tolist()
        for row, context in zip(part["row"].to_list(), part["context"].fill_null("").to_list()):
            p = t["position"][row]
            want = "".join(t["token"][row - min(p, 3):row])
            assert context == want


def test_signs_of_a_model_without_gates_is_a_one_line_error(tmp_path, micro_model_dir,
                                                           corpus_file, capsys):
    storage = Storage(tmp_path / "wh")
    _extract(storage, micro_model_dir, corpus_file, "plain")
    code = main(["signs", "--storage", str(storage.root), "--run", "plain", "--layer", "0",
                 "--neuron", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "without gated MLPs" in err and err.count("\n") == 1


def test_a_gguf_that_is_not_gguf_is_one_line_and_writes_nothing(tmp_path, corpus_file, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGML\x00" + bytes(64))
    code = main(["extract", "--storage", str(tmp_path / "wh"), "--model", str(fake), "--corpus",
                 str(corpus_file), "--num-samples", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "GGUF" in err, err
    assert not (tmp_path / "wh" / "runs").exists()
