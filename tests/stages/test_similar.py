"""Nearest neurons: by co-activation against Jaccard and NPMI computed in NumPy over the stored
masks of a micro-model run; by correlation against np.corrcoef over activations captured by
independent hooks; the SQL macros on a warehouse connection; bad input as one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from reference import files_of, mlp_inputs, text_file_windows

import pipeline.cli as cli
from pipeline.core import arrays, tables
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage
from pipeline.core.warehouse import connect
from pipeline.models.micro import save_random_gpt2
from pipeline.stages import similar
from pipeline.stages.coactivation import CoactivationConfig
from pipeline.stages.coactivation import run as coactivation
from pipeline.stages.similar import SimilarConfig, register, run, similar_neurons
from pipeline.stages.universal import UniversalConfig
from pipeline.stages.universal import run as universal

WIDTH = 40
PAIRS = "0:1,1:2,0:2,1:1"  # adjacent, non-adjacent and a layer with itself


def extract(root: Path, model_dir: Path, corpus: Path, run_id: str, *extra: str) -> Storage:
    assert cli.main(["extract", "--storage", str(root), "--model", str(model_dir), "--corpus",
                     str(corpus), "--num-samples", "16", "--max-length", "32", "--run", run_id,
                     "--device", "cpu", "--quiet", "--skip-positions", "2", *extra]) == 0
    return Storage(root)


@pytest.fixture(scope="module")
def counted_root(tmp_path_factory, micro_model_dir, corpus_file) -> Path:
    root = tmp_path_factory.mktemp("similar") / "storage"
    storage = extract(root, micro_model_dir, corpus_file, "s")
    coactivation(CoactivationConfig(run="s", pairs=PAIRS, quiet=True), storage)
    extract(root, micro_model_dir, corpus_file, "bare")  # no co-activation counts
    return root


@pytest.fixture()
def counted(counted_root, tmp_path) -> Storage:
    shutil.copytree(counted_root, tmp_path / "storage")
    return Storage(tmp_path / "storage")


@pytest.fixture(scope="module")
def masks(counted_root) -> dict[int, np.ndarray]:
    """The stored masks of the included rows, unpacked with NumPy."""
    import zarr

    group = zarr.open_group(str(Storage(counted_root).arrays("s")), mode="r")
    included = np.array(tables.read_partition(Storage(counted_root), "tokens", "s")["included"]
                        .to_pylist())
    assert 0 < included.sum() < len(included)  # --skip-positions 2 leaves rows out
    return {l: np.unpackbits(group[f"active/L{l}"][:], axis=1, count=WIDTH,
                             bitorder="little").astype(bool)[included] for l in range(3)}


def numpy_neighbours(masks, layer: int, neuron: int, metric: str) -> list[tuple]:
    """(layer, neuron, count, weight) of every neuron of a counted partner layer that fired with
    layer/neuron, best first (ties: larger count, then layer, neuron)."""
    partners = {0: [1, 2], 1: [0, 1, 2], 2: [0, 1]}[layer]
    t = len(masks[layer])
    a = masks[layer][:, neuron]
    out = []
    for b in partners:
        for j in range(WIDTH):
            if (b, j) == (layer, neuron):
                continue
            c = int(np.sum(a & masks[b][:, j]))
            if c == 0:
                continue
            n_a, n_b = int(a.sum()), int(masks[b][:, j].sum())
            if metric == "jaccard":
                w = c / (n_a + n_b - c)
            else:
                w = 1.0 if c == t else np.log(c * t / (n_a * n_b)) / -np.log(c / t)
            out.append((b, j, c, w))
    return sorted(out, key=lambda r: (-r[3], -r[2], r[0], r[1]))


@pytest.mark.parametrize("metric", ["jaccard", "npmi"])
@pytest.mark.parametrize("layer,neuron", [(0, 0), (0, 11), (1, 3), (1, 25), (2, 5), (2, 39)])
def test_coactivation_neighbours_equal_numpy(counted_root, masks, metric, layer, neuron):
    storage = Storage(counted_root)
    expect = numpy_neighbours(masks, layer, neuron, metric)
    got = similar_neurons(storage, "s", layer, neuron, metric=metric, k=10_000)
    assert got.height == len(expect) > 0
    assert got["rank"].to_list() == list(range(1, got.height + 1))
    assert list(zip(got["layer"], got["neuron"], got["count"])) == [e[:3] for e in expect]
    np.testing.assert_allclose(got["weight"].to_numpy(), [e[3] for e in expect], rtol=1e-12)
    np.testing.assert_allclose(got[metric].to_numpy(), [e[3] for e in expect], rtol=1e-12)
    assert (got["tokens"] == len(masks[layer])).all()
    assert (got["active_a"] == masks[layer][:, neuron].sum()).all()
    assert got["neuron_id"].to_list() == [l * WIDTH + n for l, n in zip(got["layer"], got["neuron"])]
    top = similar_neurons(storage, "s", layer, neuron, metric=metric, k=5)
    assert top.equals(got.head(5))


def test_macro_on_a_warehouse_connection(counted_root, masks):
    storage = Storage(counted_root)
    con = register(connect(storage), storage)
    try:
        got = con.sql("select layer, neuron, weight from similar_neurons('s', 1, 3, 'npmi', 4)"
                      ).fetchall()
        shared = similar_neurons(storage, "s", 1, 3, metric="npmi", k=4, con=con)
    finally:
        con.close()
    expect = numpy_neighbours(masks, 1, 3, "npmi")[:4]
    assert [(l, n) for l, n, _ in got] == [e[:2] for e in expect]
    np.testing.assert_allclose([w for *_, w in got], [e[3] for e in expect], rtol=1e-12)
    assert shared.select("layer", "neuron", "weight").rows() == got


def test_dormant_neuron_has_no_neighbours(counted):
    group = arrays.open_group(counted.arrays("s"))
    pair = group["coact/L0_L1"]
    counts = pair[:]
    counts[:, 9] = 0  # as if neuron 1/9 never fired
    pair[:] = counts
    for name in ("coact/L1_L1", "coact/L1_L2"):
        c = group[name][:]
        c[9] = 0
        if name == "coact/L1_L1":
            c[:, 9] = 0
        group[name][:] = c
    stats = tables.read_partition(counted, "neuron_stats", "s").to_pydict()
    for i, (l, n) in enumerate(zip(stats["layer"], stats["neuron"])):
        if (l, n) == (1, 9):
            stats["active_count"][i] = 0
    tables.write_part(counted, "neuron_stats", "s", stats)
    result = run(SimilarConfig(run="s", neuron="1/9"), counted)
    assert result.frame.is_empty() and "never active" in similar.show(result)


def test_cli_prints_and_writes_the_table(counted, monkeypatch, capsys, tmp_path):
    _cli_stage(monkeypatch)
    out = tmp_path / "near.csv"
    assert cli.main(["similar", "--storage", str(counted.root), "--run", "s", "--neuron", "L1/N3",
                     "--metric", "npmi", "--top", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "neurons that fire with 1/3 in run s" in text and "by npmi" in text
    assert out.read_text().splitlines()[0].startswith("rank,layer,neuron,neuron_id,count")
    assert len(out.read_text().splitlines()) == 4


# -- by correlation, from a universal result


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, corpus_file):
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("a", 0), ("b", 1)):
        save_random_gpt2(root / name, seed=seed)
    storage = Storage(root / "storage")
    config = dict(models=[str(root / "a"), str(root / "b")], corpus=str(corpus_file),
                  device="cpu", num_samples=12, max_length=16, quiet=True, cache="float32",
                  exclude="none")
    universal(UniversalConfig(name="u", **config), storage)
    universal(UniversalConfig(name="u-noblocks", save_blocks=False, **config), storage)
    ids = text_file_windows(root / "a", corpus_file, length=16, count=12)
    acts = {m: np.concatenate([v for _, v in sorted(mlp_inputs(root / m, ids).items())], 1)
            .astype(np.float64) for m in "ab"}
    return root, storage, acts


@pytest.mark.parametrize("layer,neuron", [(0, 2), (1, 17), (2, 39)])
def test_correlation_neighbours_equal_corrcoef(two_models, layer, neuron):
    root, storage, acts = two_models
    x = acts["a"][:, layer * WIDTH + neuron]
    r = np.corrcoef(np.column_stack([x, acts["b"]]), rowvar=False)[0, 1:]
    r = np.nan_to_num(r, nan=0.0)  # a constant neuron correlates with nothing
    order = np.lexsort((np.arange(r.size), -r))[:8]
    got = similar_neurons(storage, None, layer, neuron, by="correlation", universal="u", k=8)
    assert got["model_b"].to_list() == [str(root / "b")] * 8
    assert got["rank"].to_list() == list(range(1, 9))
    np.testing.assert_allclose(got["corr"].to_numpy(), r[order], atol=1e-5)
    gaps = np.diff(r[np.argsort(-r)][:9])
    clear = np.r_[True, np.abs(gaps[:-1]) > 1e-4] & np.r_[np.abs(gaps) > 1e-4]
    ids = (got["layer"] * WIDTH + got["neuron"]).to_numpy()
    assert (ids[clear] == order[clear]).all()
    summary = tables.read_partition(storage, "correlation_summary", "u").to_pydict()
    i = layer * WIDTH + neuron
    assert summary["neuron_id"][i] == i
    assert got["corr"][0] == pytest.approx(summary["max_corr"][i], abs=1e-6)
    assert (got["baseline_max"] == summary["baseline_max"][i]).all()
    np.testing.assert_allclose(got["excess"].to_numpy(),
                               got["corr"].to_numpy() - summary["baseline_max"][i])


def test_correlation_through_the_stage_and_the_macro(two_models):
    root, storage, acts = two_models
    result = run(SimilarConfig(neuron="1/17", by="correlation", universal="u", top=3), storage)
    assert result.frame.height == 3 and "most correlated" in similar.show(result)
    con = register(register(connect(storage), storage), storage)  # registering twice is fine
    try:
        got = con.sql("select * from correlated_neurons('u', 1, 17, 3)").pl()
    finally:
        con.close()
    assert got.equals(result.frame)


def test_correlation_errors(two_models):
    _, storage, _ = two_models
    with pytest.raises(UserError, match="out of range: layer 1 .* neurons 0..39"):
        run(SimilarConfig(neuron="1/40", by="correlation", universal="u"), storage)
    with pytest.raises(UserError, match="--no-save-blocks.*--save-blocks --overwrite"):
        run(SimilarConfig(neuron="1/4", by="correlation", universal="u-noblocks"), storage)
    with pytest.raises(UserError, match="not a finished `nwh universal` result"):
        run(SimilarConfig(neuron="1/4", by="correlation", universal="nothing"), storage)
    with pytest.raises(UserError, match="needs --universal"):
        SimilarConfig(neuron="1/4", by="correlation")


# -- bad input


def _cli_stage(monkeypatch):
    if "pipeline.stages.similar" not in cli.STAGE_MODULES:
        monkeypatch.setattr(cli, "STAGE_MODULES", [*cli.STAGE_MODULES, "pipeline.stages.similar"])


def test_bad_input_one_line_exit_2(counted, micro_model_dir, corpus_file, monkeypatch, capsys):
    _cli_stage(monkeypatch)
    base = ["similar", "--storage", str(counted.root)]
    # a run whose counts leave layer 2 out
    coactivation(CoactivationConfig(run="bare", pairs="0:1", quiet=True), counted)
    bare_counts = counted.arrays("bare") / "coact"
    shutil.move(bare_counts, counted.root / "coact-aside")
    cases = [
        (["--run", "bare", "--neuron", "1/2"], "has no co-activation counts: run `nwh "
         "coactivation --run bare`"),
        (["--run", "s", "--neuron", "1/40"], "out of range: layer 1 of run 's' has neurons 0..39"),
        (["--run", "s", "--neuron", "5/0"], "has no layer 5"),
        (["--run", "s", "--neuron", "one/two"], "--neuron 'one/two' is malformed"),
        (["--run", "s", "--neuron", "1/2", "--by", "cosine"], "--by 'cosine' is unknown"),
        (["--run", "s", "--neuron", "1/2", "--metric", "pmi"], "--metric 'pmi' is unknown"),
        (["--run", "s", "--neuron", "1/2", "--top", "0"], "--top must be at least 1"),
        (["--neuron", "1/2"], "needs --run"),
        (["--run", "nope", "--neuron", "1/2"], "does not exist"),
        (["--neuron", "1/2", "--by", "correlation"], "needs --universal"),
    ]
    before = files_of(counted.root)
    for argv, needle in cases:
        assert cli.main([*base, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert files_of(counted.root) == before  # a query writes nothing
    shutil.move(counted.root / "coact-aside", bare_counts)
    assert cli.main([*base, "--run", "bare", "--neuron", "2/0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no co-activation counts with layer 2 (counted: 0:1)" in err
    assert "nwh coactivation --run bare --pairs 0:2,1:2" in err
