"""Linear probes on extractions of the micro model: a neuron planted to copy the target is found
(high score, the largest weight), a shuffled target falls to the majority baseline, the
baselines and the exact ridge equal plain computations, bad input is a one-line error."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import pipeline.cli as cli
from pipeline.core import arrays, tables
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage
from pipeline.report.probe import draw, plot_scores
from pipeline.stages import probe
from pipeline.stages.probe import ProbeConfig, run

WIDTH = 40
PLANTED = 7      # neuron of layer 1 (or 2) that copies the target
SOURCE = (0, 3)  # the target neuron neuron:0/3


def extract(root: Path, model_dir: Path, corpus: Path, run_id: str, *extra: str) -> Storage:
    assert cli.main(["extract", "--storage", str(root), "--model", str(model_dir), "--corpus",
                     str(corpus), "--num-samples", "40", "--max-length", "32", "--run", run_id,
                     "--device", "cpu", "--quiet", "--store-acts", "--skip-positions", "1",
                     *extra]) == 0
    return Storage(root)


@pytest.fixture(scope="module")
def base_root(tmp_path_factory, micro_model_dir, corpus_file) -> Path:
    root = tmp_path_factory.mktemp("probe") / "storage"
    extract(root, micro_model_dir, corpus_file, "p")
    return root


@pytest.fixture()
def storage(base_root, tmp_path) -> Storage:
    shutil.copytree(base_root, tmp_path / "storage")
    return Storage(tmp_path / "storage")


def tokens_of(storage: Storage, run_id: str = "p") -> dict:
    return tables.read_partition(storage, "tokens", run_id).to_pydict()


def plant_mask(storage: Storage, layer: int, neuron: int, bits: np.ndarray) -> None:
    """Overwrite one neuron's bits of a stored mask (a run where that neuron encodes `bits`)."""
    group = arrays.open_group(storage.arrays("p"))
    packed = group[f"active/L{layer}"][:]
    mask = arrays.unpack_mask(packed, WIDTH)
    mask[:, neuron] = bits
    group[f"active/L{layer}"][:] = np.packbits(mask, axis=1, bitorder="little")


def stored_mask(storage: Storage, layer: int) -> np.ndarray:
    group = arrays.open_group(storage.arrays("p"), mode="r")
    return arrays.unpack_mask(group[f"active/L{layer}"][:], WIDTH)


def stored_acts(storage: Storage, layer: int) -> np.ndarray:
    group = arrays.open_group(storage.arrays("p"), mode="r")
    return group[f"acts/L{layer}"][:].astype(np.float64)


def drop_acts(storage: Storage, *layers: int) -> None:
    """A run without dense activations of these layers (as if extracted without them)."""
    folder = storage.arrays("p") / "acts"
    for l in layers:
        shutil.rmtree(folder / f"L{l}")
    if not any(folder.glob("L*")):
        shutil.rmtree(folder)


def split(storage: Storage, result) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(included, held-out row) masks and the sample of each row, from the tokens table."""
    t = tokens_of(storage)
    sample = np.array(t["sample"])
    return np.array(t["included"]), np.isin(sample, result.info["test_samples"]), sample


def weights_of(result, layer: int):
    return result.weights.filter(result.weights["layer"] == layer).sort("rank")


# -- planted targets are found


def test_planted_neuron_bit_is_found(storage):
    """neuron:0/3 on a run without acts of layer 0 is a two-class target; neuron 7 of layer 1
    copies its bits: accuracy 1 from layer 1, and 7 has the largest weight."""
    drop_acts(storage, 0)
    bits = stored_mask(storage, 0)[:, SOURCE[1]]
    assert 0.2 < bits.mean() < 0.8  # both classes are common
    plant_mask(storage, 1, PLANTED, bits)
    result = run(ProbeConfig(run="p", target="neuron:0/3", layers="0-2", quiet=True), storage)
    s = result.scores.sort("layer")
    assert s["metric"].to_list() == ["accuracy"] * 3 and s["classes"].to_list() == [2] * 3
    assert s["neurons"].to_list() == [WIDTH - 1, WIDTH, WIDTH]  # 0/3 left out of layer 0
    planted = s.row(1, named=True)
    assert planted["score"] == 1.0 and planted["train_score"] == 1.0
    assert planted["top_neuron"] == PLANTED and planted["solver"] == "exact"
    w = weights_of(result, 1)
    assert w["neuron"][0] == PLANTED and w["label"][0] == 1 and w["label_text"][0] == "active"
    assert w["weight"][0] > 0 and abs(w["weight"][0]) > 3 * abs(w["weight"][1])
    assert w["neuron_id"][0] == WIDTH + PLANTED
    # the other layers know less than the copy
    assert s["score"][0] < 1.0 and s["score"][2] < 1.0
    assert 3 not in weights_of(result, 0)["neuron"].to_list()


def test_shuffled_target_falls_to_the_majority_baseline(storage):
    drop_acts(storage, 0)
    plant_mask(storage, 1, PLANTED, stored_mask(storage, 0)[:, SOURCE[1]])
    result = run(ProbeConfig(run="p", target="neuron:0/3", layers="1", shuffle=True,
                             quiet=True), storage)
    row = result.scores.row(0, named=True)
    assert row["score"] < 0.85  # the planted copy no longer matches the permuted target
    assert abs(row["score"] - row["baseline_majority"]) < 0.1
    assert result.part == "neuron-0-3_masks_shuffled"
    assert row["shuffled"] and result.weights["shuffled"].all()


def test_planted_activation_is_found_by_ridge_and_sgd(storage, monkeypatch):
    """neuron:0/3 with dense acts is real-valued (R^2); acts of neuron 7 of layer 1 are a copy."""
    group = arrays.open_group(storage.arrays("p"))
    acts = group["acts/L1"][:]
    acts[:, PLANTED] = group["acts/L0"][:, SOURCE[1]] * 2 + 1
    group["acts/L1"][:] = acts
    real = probe.read_block
    for solver, extra in (("exact", {}), ("sgd", {"max_rows": 100, "block_rows": 64})):
        sizes: list[int] = []
        monkeypatch.setattr(probe, "read_block",
                            lambda a, s, e, sizes=sizes: sizes.append(e - s) or real(a, s, e))
        result = run(ProbeConfig(run="p", target="neuron:0/3", features="acts", layers="1",
                                 quiet=True, overwrite=True, **extra), storage)
        row = result.scores.row(0, named=True)
        assert row["metric"] == "r2" and row["solver"] == solver and row["classes"] == 0
        assert row["score"] > (0.999 if solver == "exact" else 0.95), row
        assert row["top_neuron"] == PLANTED
        w = weights_of(result, 1)
        assert w["neuron"][0] == PLANTED and w["label"][0] is None and w["label_text"][0] == "value"
        assert w["weight"][0] > 3 * abs(w["weight"][1])
        if solver == "exact":  # in standard deviations of the target
            assert w["weight"][0] == pytest.approx(1.0, abs=0.05)
        if solver == "sgd":  # out of core: blocks of --block-rows rows, never the whole run
            assert max(sizes) <= 64 and len(sizes) > 20


def test_planted_token_class_is_found(storage):
    """--target token --classes 1: the most frequent training token against <other>; a neuron
    of layer 2 planted to fire on exactly that token finds it."""
    first = run(ProbeConfig(run="p", target="token", classes=1, layers="2", quiet=True), storage)
    included, held, _ = split(storage, first)
    t = tokens_of(storage)
    train_tokens = Counter(tok for tok, inc, h in zip(t["token_id"], included, held)
                           if inc and not h)
    top = train_tokens.most_common(1)[0][0]
    w = weights_of(first, 2)
    assert set(w["label"].to_list()) == {-1}  # two classes: the vector of the second, <other>
    assert first.scores["classes"][0] == 2
    plant_mask(storage, 2, PLANTED, np.array(t["token_id"]) == top)
    result = run(ProbeConfig(run="p", target="token", classes=1, layers="2", quiet=True,
                             overwrite=True), storage)
    row = result.scores.row(0, named=True)
    assert row["score"] == 1.0 and row["top_neuron"] == PLANTED
    assert weights_of(result, 2)["weight"][0] < 0  # firing means: not <other>


# -- against plain computations


def test_split_and_baselines_equal_plain_loops(storage):
    result = run(ProbeConfig(run="p", target="next-token", layers="0", classes=10, quiet=True),
                 storage)
    included, held, sample = split(storage, result)
    t = tokens_of(storage)
    # next-token rows: included, with a next row in the same sample
    rows = [r for r in range(len(sample) - 1) if included[r] and sample[r + 1] == sample[r]]
    train = [r for r in rows if not held[r]]
    test = [r for r in rows if held[r]]
    row = result.scores.row(0, named=True)
    assert (row["train_rows"], row["test_rows"]) == (len(train), len(test))
    n_samples = len(set(sample[rows]))
    assert len(result.info["test_samples"]) == round(0.2 * n_samples)
    nxt = {r: t["token_id"][r + 1] for r in rows}
    counts = Counter(nxt[r] for r in train)
    kept = [tok for tok, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:10]
    label = {r: nxt[r] if nxt[r] in kept else -1 for r in rows}
    assert row["classes"] == len(kept) + (any(label[r] == -1 for r in rows))
    classes = Counter(label[r] for r in train)
    order = kept + [-1]  # class indices: the kept tokens by frequency, then <other>
    majority = max(classes, key=lambda k: (classes[k], -order.index(k)))
    assert row["baseline_majority"] == pytest.approx(np.mean([label[r] == majority for r in test]))
    by_token: dict = {}
    for r in train:
        by_token.setdefault(t["token_id"][r], Counter())[label[r]] += 1

    def guess(r):
        c = by_token.get(t["token_id"][r])
        if not c:
            return majority
        best = max(c.values())  # ties: the class of the more frequent training token
        return min((k for k, v in c.items() if v == best), key=order.index)

    assert row["baseline_unigram"] == pytest.approx(np.mean([label[r] == guess(r) for r in test]))


def test_exact_ridge_equals_numpy_closed_form(storage):
    """--target position from acts of layer 2: ridge on standardised features and target."""
    alpha = 0.01
    result = run(ProbeConfig(run="p", target="position", features="acts", layers="2",
                             alpha=alpha, quiet=True), storage)
    included, held, _ = split(storage, result)
    y = np.array(tokens_of(storage)["position"], np.float64)
    x = stored_acts(storage, 2).astype(np.float32).astype(np.float64)
    tr, te = included & ~held, included & held
    mu, sd = x[tr].mean(0), x[tr].std(0)
    sd[sd < 1e-12] = 1
    z = (x - mu) / sd
    ym, ys = y[tr].mean(), y[tr].std()
    n = tr.sum()
    w = np.linalg.solve(z[tr].T @ z[tr] + alpha * n * np.eye(WIDTH), z[tr].T @ ((y[tr] - ym) / ys))
    pred = z @ w * ys + ym
    r2 = 1 - ((y[te] - pred[te]) ** 2).sum() / ((y[te] - y[te].mean()) ** 2).sum()
    row = result.scores.row(0, named=True)
    assert row["metric"] == "r2" and row["score"] == pytest.approx(r2, abs=1e-4)
    r2_train = 1 - ((y[tr] - pred[tr]) ** 2).sum() / ((y[tr] - ym) ** 2).sum()
    assert row["train_score"] == pytest.approx(r2_train, abs=1e-4)
    assert row["baseline_majority"] == pytest.approx(
        1 - ((y[te] - ym) ** 2).sum() / ((y[te] - y[te].mean()) ** 2).sum())
    got = weights_of(result, 2)
    np.testing.assert_allclose(got.sort("neuron")["weight"].to_numpy(), w, atol=2e-3)


# -- tables, reruns, figures


def test_tables_parts_rerun_and_figure(storage):
    a = run(ProbeConfig(run="p", target="position", layers="0,1", quiet=True), storage)
    b = run(ProbeConfig(run="p", target="token", layers="1", weights=5, classes=8, quiet=True,
                        name="probes-p"), storage)
    assert not a.reused and a.part == "position_masks"
    again = run(ProbeConfig(run="p", target="position", layers="0,1", quiet=True), storage)
    assert again.reused and again.scores.equals(a.scores) and "finished earlier" in probe.show(again)
    scores = probe.probe_scores(storage, "p")
    assert scores["layer"].to_list() == [0, 1] and set(scores["target"]) == {"position"}
    assert probe.probe_scores(storage, "probes-p")["run"].to_list() == ["p"]
    w = probe.probe_weights(storage, "probes-p", target="token", layer=1)
    assert w.group_by("label").len()["len"].max() == 5  # --weights 5 per class
    assert w["rank"].min() == 1
    t = tokens_of(storage)
    text = dict(zip(t["token_id"], t["token"]))
    for label, label_text in w.select("label", "label_text").unique().rows():
        assert label_text == ("<other>" if label == -1 else text[label])
    paths = draw(b, None, storage)
    assert paths == [storage.reports("probes-p") / "probe_token_masks.png"]
    assert paths[0].read_bytes()[:4] == b"\x89PNG"
    both = plot_scores(scores.vstack(b.scores), storage.root / "all.png")
    assert both.exists()


# -- bad input


@pytest.mark.parametrize("kw,needle", [
    (dict(target="colour"), "--target 'colour' is unknown"),
    (dict(target="neuron:7"), "neuron:layer/index"),
    (dict(target="token", features="bits"), "--features"),
    (dict(target="token", test_fraction=1.0), "--test-fraction"),
    (dict(target="token", solver="newton"), "--solver"),
])
def test_bad_config(kw, needle):
    with pytest.raises(UserError, match=needle):
        ProbeConfig(run="p", **kw)


def _cli_stage(monkeypatch):
    if "pipeline.stages.probe" not in cli.STAGE_MODULES:
        monkeypatch.setattr(cli, "STAGE_MODULES", [*cli.STAGE_MODULES, "pipeline.stages.probe"])


def test_bad_input_one_line_exit_2(storage, monkeypatch, capsys):
    _cli_stage(monkeypatch)
    base = ["probe", "--storage", str(storage.root), "--quiet"]
    cases = [
        (["--run", "p", "--target", "lemma"], "--target 'lemma' is unknown"),
        (["--run", "p", "--target", "neuron:0/99"], "out of range"),
        (["--run", "p", "--target", "neuron:9/0"], "has no layer 9"),
        (["--run", "p", "--target", "token", "--layers", "7"], "--layers"),
        (["--run", "nope", "--target", "token"], "does not exist"),
    ]
    for argv, needle in cases:
        assert cli.main([*base, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    drop_acts(storage, 1)
    assert cli.main([*base, "--run", "p", "--target", "token", "--features", "acts",
                     "--layers", "1"]) == 2
    err = capsys.readouterr().err
    assert "no dense activations of layer(s) [1]" in err and "--store-acts" in err
    drop_acts(storage, 0, 2)
    assert cli.main([*base, "--run", "p", "--target", "token", "--features", "acts"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "re-extract with --store-acts" in err
    assert not list(storage.table_dir("probe_scores").glob("*/*.parquet"))


def test_cli_prints_the_scores_and_the_figure(storage, monkeypatch, capsys):
    _cli_stage(monkeypatch)
    assert cli.main(["probe", "--storage", str(storage.root), "--quiet", "--run", "p",
                     "--target", "next-token", "--layers", "2", "--classes", "5"]) == 0
    out = capsys.readouterr().out
    assert "figure: " in out and "probe_next-token_masks.png" in out
    assert "baseline_unigram" in out and "held-out accuracy" in out
