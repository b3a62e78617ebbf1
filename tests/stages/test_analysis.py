"""Every analysis table against brute force: plain loops over masks unpacked with np.unpackbits
from the Zarr chunks, the dense activations and the tokens of the extraction."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from pipeline.cli import main
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage
from pipeline.stages.analysis import AnalysisConfig, run

PROMPTS = Path(__file__).resolve().parents[2] / "examples" / "prompts.csv"
WIDTH, LAYERS = 40, 3
SETTINGS = dict(min_token_count=2, min_ratio=1.5, top=100000, min_share=0.6, clusters=3)


def extract(storage: Storage, model_dir, run_id: str, *source: str) -> None:
    assert main(["extract", "--storage", str(storage.root), "--model", str(model_dir), *source,
                 "--store-acts", "--run", run_id, "--quiet"]) == 0


def masks_of(storage: Storage, run_id: str) -> list[np.ndarray]:
    group = zarr.open_group(str(storage.arrays(run_id)), mode="r")
    return [np.unpackbits(np.asarray(group[f"active/L{l}"][:]), axis=1,
                          bitorder="little")[:, :WIDTH].astype(bool) for l in range(LAYERS)]


def acts_of(storage: Storage, run_id: str) -> list[np.ndarray]:
    group = zarr.open_group(str(storage.arrays(run_id)), mode="r")
    return [np.asarray(group[f"acts/L{l}"][:], dtype=np.float64) for l in range(LAYERS)]


def tokens_of(storage: Storage, run_id: str) -> dict:
    """The extraction's tokens table, read from its Parquet parts."""
    parts = sorted(storage.table_partition("tokens", run_id).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]).to_pydict()


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, micro_model_dir):
    storage = Storage(tmp_path_factory.mktemp("an"))
    extract(storage, micro_model_dir, "a", "--prompts", str(PROMPTS))
    result = run(AnalysisConfig(run="a", **SETTINGS), storage)
    return storage, result, masks_of(storage, "a"), tokens_of(storage, "a")


# -- brute force


def brute_important(masks, acts):
    """{rank_by: [(neuron_id, value)] in rank order}: frequency exactly, mean from float16 acts."""
    count = {l * WIDTH + j: int(sum(bool(v) for v in masks[l][:, j]))
             for l in range(LAYERS) for j in range(WIDTH)}
    rows = len(masks[0])
    by_frequency = sorted(count, key=lambda n: (-count[n], n))
    mean = {l * WIDTH + j: float(acts[l][:, j].mean()) for l in range(LAYERS) for j in range(WIDTH)}
    return {"frequency": [(n, count[n] / rows) for n in by_frequency], "mean": mean}


def brute_specific(masks, keys, rows, min_count):
    """{(key, layer, neuron): (hits, key_count, exact ratio, exact P(active))} over the rows."""
    key_count = defaultdict(int)
    active = defaultdict(int)
    hits = defaultdict(int)
    for r in rows:
        key_count[keys[r]] += 1
        for l in range(LAYERS):
            for j in np.flatnonzero(masks[l][r]).tolist():
                active[(l, j)] += 1
                hits[(keys[r], l, j)] += 1
    out = {}
    for (key, l, j), h in hits.items():
        if key_count[key] >= min_count:
            p_active = Fraction(active[(l, j)], len(rows))
            out[(key, l, j)] = (h, key_count[key], Fraction(h, key_count[key]) / p_active, p_active)
    return out


def check_specific(frame, kind, expect, min_ratio):
    got = frame.filter(frame["kind"] == kind)
    pairs = {(k, l, n): (h, c, r, p) for k, l, n, h, c, r, p in zip(
        got["key"], got["layer"], got["neuron"], got["hits"], got["key_count"], got["ratio"],
        got["p_active"])}
    above = {k for k, v in expect.items() if v[2] > Fraction(min_ratio)}
    boundary = {k for k, v in expect.items() if v[2] == Fraction(min_ratio)}
    assert above <= pairs.keys() <= above | boundary
    assert above, f"no {kind}-specific neurons: the test data does not exercise the query"
    for key, (h, c, r, p) in pairs.items():
        assert (h, c) == expect[key][:2]
        assert r == pytest.approx(float(expect[key][2]), rel=1e-12)
        assert p == pytest.approx(float(expect[key][3]), rel=1e-12)
    return pairs


def brute_consistent(masks, tokens, rows, min_share):
    active_in, samples = defaultdict(set), defaultdict(set)
    for r in rows:
        if not tokens["generated"][r]:
            continue
        p, s = tokens["prompt"][r], tokens["prompt_sample"][r]
        samples[p].add(s)
        for l in range(LAYERS):
            for j in np.flatnonzero(masks[l][r]).tolist():
                active_in[(p, l, j)].add(s)
    return {k: (len(v), len(samples[k[0]])) for k, v in active_in.items()
            if Fraction(len(v), len(samples[k[0]])) >= Fraction(min_share)}


def dense_patterns(masks, rows):
    return np.concatenate([m[rows] for m in masks], axis=1).astype(np.float64)


def check_clusters(clusters, masks, tokens, rows, k):
    assert clusters["row"].to_list() == list(rows)
    assert clusters["token"].to_list() == [tokens["token"][r] for r in rows]
    x = dense_patterns(masks, rows)
    labels = clusters["cluster"].to_numpy()
    assert set(labels.tolist()) <= set(range(k)) and len(set(labels.tolist())) > 1
    # a k-means fixed point: every row is nearest to the mean of its own cluster
    centres = {c: x[labels == c].mean(0) for c in set(labels.tolist())}
    for i, c in enumerate(labels):
        own = ((x[i] - centres[c]) ** 2).sum()
        assert all(own <= ((x[i] - centre) ** 2).sum() + 1e-9 for centre in centres.values())
    # PCA by a dense SVD of the centred patterns, up to the sign of each component
    u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    assert s[1] - s[2] > 1e-3 * s[0], "second component not well defined on this data"
    for i, column in enumerate(("pc1", "pc2")):
        want, got = u[:, i] * s[i], clusters[column].to_numpy()
        sign = np.sign(want @ got)
        np.testing.assert_allclose(sign * got, want, atol=1e-6 * s[0])


# -- the tables


def test_important_neurons_brute_force(analysed):
    storage, result, masks, _ = analysed
    expect = brute_important(masks, acts_of(storage, "a"))
    imp = result.tables["important_neurons"]
    by_frequency = imp.filter(imp["rank_by"] == "frequency").sort("rank")
    assert by_frequency["rank"].to_list() == list(range(1, LAYERS * WIDTH + 1))
    assert by_frequency["neuron_id"].to_list() == [n for n, _ in expect["frequency"]]
    assert by_frequency["frequency"].to_list() == pytest.approx([f for _, f in expect["frequency"]],
                                                                rel=1e-12)
    by_mean = imp.filter(imp["rank_by"] == "mean").sort("rank")
    ids, means = by_mean["neuron_id"].to_list(), by_mean["mean"].to_list()
    assert sorted(ids) == list(range(LAYERS * WIDTH))
    # the table's means come from the float32 forward, the brute force from float16 copies
    for n, m in zip(ids, means):
        assert m == pytest.approx(expect["mean"][n], rel=2e-3, abs=1e-5)
    assert means == sorted(means, reverse=True)
    assert list(zip(by_mean["layer"], by_mean["neuron"])) == [(n // WIDTH, n % WIDTH) for n in ids]


@pytest.mark.parametrize("kind,column", [("token", "token_id"), ("position", "position")])
def test_specific_neurons_brute_force(analysed, kind, column):
    _, result, masks, tokens = analysed
    rows = range(len(tokens["row"]))
    expect = brute_specific(masks, tokens[column], rows, SETTINGS["min_token_count"])
    pairs = check_specific(result.tables["specific_neurons"], kind, expect, SETTINGS["min_ratio"])
    got = result.tables["specific_neurons"].filter(result.tables["specific_neurons"]["kind"] == kind)
    text = {k: t for k, t in zip(got["key"], got["key_text"])}
    for key, _, _ in pairs:
        want = (tokens["token"][tokens["token_id"].index(key)] if kind == "token" else str(key))
        assert text[key] == want


def test_consistent_neurons_brute_force(analysed):
    _, result, masks, tokens = analysed
    expect = brute_consistent(masks, tokens, range(len(tokens["row"])), SETTINGS["min_share"])
    got = result.tables["consistent_neurons"]
    assert {(p, l, n): (a, s) for p, l, n, a, s in zip(
        got["prompt"], got["layer"], got["neuron"], got["samples_active"],
        got["num_samples"])} == expect
    assert expect and got["share"].to_list() == pytest.approx(
        [a / s for a, s in zip(got["samples_active"], got["num_samples"])])


def test_token_clusters_brute_force(analysed):
    _, result, masks, tokens = analysed
    check_clusters(result.tables["token_clusters"], masks, tokens, range(len(tokens["row"])),
                   SETTINGS["clusters"])


def test_tables_stored_with_marker(analysed):
    storage, result, _, _ = analysed
    for table, frame in result.tables.items():
        parts = sorted(storage.table_partition(table, "a").glob("*.parquet"))
        assert pq.read_table(parts[0]).to_pydict() == frame.to_dict(as_series=False)
    marker = json.loads((storage.run_dir("a") / "stages" / "analyze.json").read_text())
    assert marker["config"]["min_ratio"] == 1.5 and marker["analysed_rows"] == len(masks_of(storage, "a")[0])
    assert set(marker["tables"]) == {"important_neurons", "specific_neurons",
                                     "consistent_neurons", "token_clusters"}


def test_rerun_skips_finished_work(analysed, tmp_path):
    storage = Storage(tmp_path / "copy")
    shutil.copytree(analysed[0].root, storage.root)
    config = AnalysisConfig(run="a", **SETTINGS)
    parts = {p: p.stat().st_mtime_ns for p in (storage.root / "tables").rglob("*.parquet")}
    again = run(config, storage)
    assert again.reused
    assert {p: p.stat().st_mtime_ns for p in parts} == parts
    for table, frame in analysed[1].tables.items():
        assert again.tables[table].equals(frame)
    changed = run(AnalysisConfig(run="a", **{**SETTINGS, "min_ratio": 3.0}), storage)
    assert not changed.reused
    assert changed.tables["specific_neurons"]["ratio"].min() >= 3.0
    assert not run(AnalysisConfig(run="a", **{**SETTINGS, "min_ratio": 3.0}, overwrite=True),
                   storage).reused
    assert run(AnalysisConfig(run="a", **{**SETTINGS, "min_ratio": 3.0}), storage).reused


def test_max_rows_analyses_the_seeded_sample(tmp_path, micro_model_dir, corpus_file, capsys):
    storage = Storage(tmp_path / "s")
    extract(storage, micro_model_dir, "c", "--corpus", str(corpus_file), "--num-samples", "16",
            "--max-length", "32")
    argv = ["analyze", "--storage", str(storage.root), "--run", "c", "--max-rows", "100",
            "--seed", "3", "--min-token-count", "2", "--min-ratio", "1.5", "--top", "100000",
            "--clusters", "3"]
    assert main(argv) == 0
    assert "figure: " in capsys.readouterr().out
    masks, tokens = masks_of(storage, "c"), tokens_of(storage, "c")
    total = len(tokens["row"])
    rows = sorted(np.random.default_rng(3).choice(total, 100, replace=False).tolist())
    assert total == 512 and rows != list(range(100))
    result = run(AnalysisConfig(run="c", max_rows=100, seed=3, min_token_count=2, min_ratio=1.5,
                                top=100000, clusters=3), storage)
    assert result.reused and result.analysed_rows == 100
    for kind, column in (("token", "token_id"), ("position", "position")):
        expect = brute_specific(masks, tokens[column], rows, 2)
        check_specific(result.tables["specific_neurons"], kind, expect, 1.5)
    check_clusters(result.tables["token_clusters"], masks, tokens, rows, 3)
    assert "consistent_neurons" not in result.tables  # a corpus run has no prompts
    # important neurons come from the accumulators: every row, not only the sample
    imp = result.tables["important_neurons"]
    freq = imp.filter(imp["rank_by"] == "frequency")
    want = {l * WIDTH + j: masks[l][:, j].sum() / total for l in range(LAYERS) for j in range(WIDTH)}
    assert all(f == pytest.approx(want[n], rel=1e-12)
               for n, f in zip(freq["neuron_id"], freq["frequency"]))


def test_max_rows_of_a_prompts_run(analysed, tmp_path):
    storage = Storage(tmp_path / "copy")
    shutil.copytree(analysed[0].root, storage.root)
    _, _, masks, tokens = analysed
    total = len(tokens["row"])
    result = run(AnalysisConfig(run="a", **{**SETTINGS, "max_rows": 25, "seed": 5}), storage)
    rows = sorted(np.random.default_rng(5).choice(total, 25, replace=False).tolist())
    # a prompt's samples are those with an analysed generated row: here some are left out
    analysed_samples = {(tokens["prompt"][r], tokens["prompt_sample"][r]) for r in rows
                        if tokens["generated"][r]}
    all_samples = {(p, s) for p, s, g in zip(tokens["prompt"], tokens["prompt_sample"],
                                             tokens["generated"]) if g}
    assert analysed_samples < all_samples
    expect = brute_consistent(masks, tokens, rows, SETTINGS["min_share"])
    assert expect
    got = result.tables["consistent_neurons"]
    assert {(p, l, n): (a, s) for p, l, n, a, s in zip(
        got["prompt"], got["layer"], got["neuron"], got["samples_active"],
        got["num_samples"])} == expect
    check_specific(result.tables["specific_neurons"], "token",
                   brute_specific(masks, tokens["token_id"], rows, 2), 1.5)


def test_top_keeps_the_first_rows_of_each_ranking(analysed, tmp_path):
    storage = Storage(tmp_path / "copy")
    shutil.copytree(analysed[0].root, storage.root)
    full = analysed[1].tables
    result = run(AnalysisConfig(run="a", **{**SETTINGS, "top": 7}), storage)
    for by in ("frequency", "mean"):
        got = result.tables["important_neurons"].filter(
            result.tables["important_neurons"]["rank_by"] == by)
        want = full["important_neurons"].filter(full["important_neurons"]["rank_by"] == by)
        assert got["neuron_id"].to_list() == want.sort("rank")["neuron_id"].to_list()[:7]
    for kind in ("token", "position"):
        got = result.tables["specific_neurons"].filter(result.tables["specific_neurons"]["kind"] == kind)
        ratios = sorted(full["specific_neurons"].filter(
            full["specific_neurons"]["kind"] == kind)["ratio"].to_list(), reverse=True)
        assert got.height == min(7, len(ratios))
        assert got["ratio"].to_list() == pytest.approx(ratios[:got.height])


@pytest.mark.parametrize("bad", [dict(min_share=0), dict(min_share=1.5), dict(clusters=0),
                                 dict(max_rows=0), dict(min_ratio=0), dict(run="a/b")])
def test_bad_config(bad):
    with pytest.raises(UserError):
        AnalysisConfig(**{"run": "a", **bad})


def test_unknown_run_is_one_line(tmp_path, capsys):
    assert main(["analyze", "--storage", str(tmp_path), "--run", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
