"""Universal neurons against a port of the reference (Gurnee et al. 2024) written here from the
paper's formulas, on activations captured by independent hooks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import files_of, mlp_inputs, text_file_windows
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.cli import main
from pipeline.core import arrays, tables
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage
from pipeline.kernels.correlation import PairCorrelation
from pipeline.models.micro import make_tokenizer, save_random_gpt2
from pipeline.stages import universal
from pipeline.stages.universal import (
    UniversalConfig,
    baseline_acts,
    baseline_matrix,
    gaussian_block,
    plan_passes,
    run,
    token_permutation,
)

PLANTED = 7
WIDTH, LAYERS, D_MODEL = 128, 3, 128
SAMPLES, LENGTH = 24, 16


# -- the accumulator


@given(st.integers(3, 60), st.integers(1, 59), st.integers(0, 1000), st.sampled_from([0.0, 1e4]))
@settings(max_examples=30, deadline=None)
def test_pair_correlation_equals_corrcoef_after_merge(n, split, seed, offset):
    split = min(split, n - 1)
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, 4))
    b = a[:, :3] * 0.5 + rng.normal(size=(n, 3))
    b[split:] += 3.0  # the halves have other means, so their shifts differ
    a, b = (a + offset).astype(np.float32), (b - offset).astype(np.float32)
    one, first, second = PairCorrelation(4, 3), PairCorrelation(4, 3), PairCorrelation(4, 3)
    one.update(a, b)
    first.update(a[:split], b[:split])
    second.update(a[split:], b[split:])
    x, y = a.astype(np.float64), b.astype(np.float64)
    expect = np.corrcoef(x.T, y.T)[:4, 4:]
    np.testing.assert_allclose(one.correlation(), expect, atol=1e-9)
    np.testing.assert_allclose(first.merge(second).correlation(), expect, atol=1e-9)
    np.testing.assert_allclose(one.correlation(spend=True), expect, atol=1e-9)  # in its block


def test_shifted_sums_keep_the_digits_of_a_large_mean():
    rng = np.random.default_rng(1)
    a = (3e4 + rng.normal(size=(5000, 2)) * 1e-2).astype(np.float32)
    b = a[:, ::-1] * 0.5 + rng.normal(size=(5000, 2)).astype(np.float32) * 1e-2
    acc = PairCorrelation(2, 2)
    for s in range(0, 5000, 700):
        acc.update(a[s:s + 700], b[s:s + 700])
    x, y = a.astype(np.float64), b.astype(np.float64)
    expect = np.corrcoef((x - x.mean(0)).T, (y - y.mean(0)).T)[:2, 2:]
    np.testing.assert_allclose(acc.correlation(), expect, atol=1e-9)
    const = PairCorrelation(1, 2)
    const.update(np.full((10, 1), 2.5, np.float32), b[:10])
    assert (const.correlation() == 0).all()  # a constant neuron correlates with nothing


# -- three micro models: B and C are A with every MLP re-randomised but neuron 7 of layer 0


def _plant(model_dir: Path, seed: int) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer, block in enumerate(model.transformer.h):
            for name, p in block.mlp.named_parameters():
                fresh = torch.randn_like(p) * p.std()
                if layer == 0 and name == "c_fc.weight":   # [d_model, d_mlp]
                    fresh[:, PLANTED] = p[:, PLANTED]
                elif layer == 0 and name == "c_fc.bias":
                    fresh[PLANTED] = p[PLANTED]
                p.copy_(fresh)
    model.save_pretrained(model_dir, safe_serialization=True)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("uni")
    model, _ = save_random_gpt2(root / "a", seed=0, d_model=D_MODEL, d_mlp=WIDTH)
    # input weights x10: nonlinear neurons as in trained models; at the init scale every neuron
    # is nearly linear in the residual stream, and random mixtures of them all correlate
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.weight.mul_(10)
    model.save_pretrained(root / "a", safe_serialization=True)
    for name, seed in (("b", 123), ("c", 321)):
        shutil.copytree(root / "a", root / name)
        _plant(root / name, seed)
    corpus = root / "c.txt"
    rng = np.random.default_rng(0)
    words = "the value of a list returns an object raise error none file path".split()
    # newlines inside paragraphs: the reference drops those tokens (and pad = EOS here)
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, 12)) + "\n" +
                                  " ".join(rng.choice(words, 14)) for _ in range(60)))
    return root, corpus


def universal_config(root, corpus, **kw) -> UniversalConfig:
    values = dict(models=[str(root / m) for m in "abc"], corpus=str(corpus), device="cpu",
                  num_samples=SAMPLES, max_length=LENGTH, quiet=True, cache="float32",
                  baseline_batch=5)
    return UniversalConfig(**{**values, **kw})


@pytest.fixture(scope="module")
def planted(zoo, tmp_path_factory):
    root, corpus = zoo
    storage = Storage(tmp_path_factory.mktemp("s"))
    return run(universal_config(root, corpus, name="u"), storage), storage


@pytest.fixture(scope="module")
def hooked(zoo):
    """The windows cut by hand and every model's activations by hooks written here."""
    root, corpus = zoo
    ids = text_file_windows(root / "a", corpus, length=LENGTH, count=SAMPLES)
    acts = {m: np.concatenate([v for _, v in sorted(mlp_inputs(root / m, ids).items())], 1)
            .astype(np.float64) for m in "abc"}
    return ids, acts


# -- a port of the reference: correlations_fast.py, analysis/correlations.py, neuron_df


def reference_filter(tok, ids: np.ndarray) -> np.ndarray:
    """correlations_fast.get_activations: drop pad (TransformerLens pads with EOS when the
    tokenizer has no pad token) and the newline token."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    return ~np.isin(ids.reshape(-1), [pad, newline[0]])


def reference_correlation(x: np.ndarray, y: np.ndarray, batches: list[slice]) -> np.ndarray:
    """StreamingPearsonComputer: raw float64 sums over batches, then r; NaN (a constant neuron)
    set to 0 as make_correlation_result_df does."""
    s1, s1q, s2, s2q = (np.zeros(x.shape[1]), np.zeros(x.shape[1]), np.zeros(y.shape[1]),
                        np.zeros(y.shape[1]))
    s12, n = np.zeros((x.shape[1], y.shape[1])), 0
    for sl in batches:
        a, b = x[sl], y[sl]
        s12 += a.T @ b
        s1 += a.sum(0)
        s1q += (a ** 2).sum(0)
        s2 += b.sum(0)
        s2q += (b ** 2).sum(0)
        n += len(a)
    num = s12 - np.outer(s1, s2) / n
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / np.outer(np.sqrt(s1q - s1 ** 2 / n), np.sqrt(s2q - s2 ** 2 / n))
    return np.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)


def reference_rotation(acts_b: np.ndarray, seed: int) -> np.ndarray:
    """The reference's `rotation`: per layer a Gaussian matrix with unit-norm rows, neuron m of
    the baseline = sum_n R[m, n] b_n (its own torch seed)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn((LAYERS, WIDTH, WIDTH), generator=g, dtype=torch.float64)
    r /= r.norm(dim=-1, keepdim=True)
    return np.concatenate([acts_b[:, l * WIDTH:(l + 1) * WIDTH] @ r[l].numpy().T
                           for l in range(LAYERS)], 1)


def reference_summary(acts, ids, tok, *, windows_per_batch, seed, threshold=0.5):
    keep = reference_filter(tok, ids)
    per_window = keep.reshape(len(ids), -1).sum(1)
    ends = np.cumsum([per_window[s:s + windows_per_batch].sum()
                      for s in range(0, len(ids), windows_per_batch)])
    batches = [slice(s, e) for s, e in zip(np.r_[0, ends[:-1]], ends)]
    a = acts["a"][keep]
    out = {"keep": keep, "max": [], "arg": [], "base": [], "corr": []}
    for i, m in enumerate("bc"):
        b = acts[m][keep]
        corr = reference_correlation(a, b, batches)
        base = reference_correlation(a, reference_rotation(b, seed + i), batches)
        out["corr"].append(corr)
        out["max"].append(corr.max(1))
        out["arg"].append(corr.argmax(1))
        out["base"].append(base.max(1))
    # neuron_df.make_corr_compare_df and the notebook: excess = mean_corr - mean_baseline > 0.5
    out["excess"] = np.mean(out["max"], 0) - np.mean(out["base"], 0)
    out["universal"] = set(np.flatnonzero(out["excess"] > threshold))
    return out


def test_agrees_with_the_reference_port(planted, hooked, zoo):
    out, _ = planted
    ids, acts = hooked
    tok = AutoTokenizer.from_pretrained(zoo[0] / "a")
    ref = reference_summary(acts, ids, tok, windows_per_batch=5, seed=0)
    keep = ref["keep"]
    # the same token filter: pad (= EOS) and newline rows left out, and only those
    assert 0 < keep.sum() < keep.size and out.info["tokens"] == keep.sum()
    for i, m in enumerate(["b", "c"]):
        s = out.summary.filter(out.summary["model_b"] == str(zoo[0] / m)).sort("neuron_id")
        np.testing.assert_allclose(s["max_corr"].to_numpy(), ref["max"][i], atol=1e-9)
        top2 = np.sort(ref["corr"][i], 1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-6
        got = s["argmax_layer"].to_numpy() * WIDTH + s["argmax_neuron"].to_numpy()
        assert clear.sum() > 100 and (got[clear] == ref["arg"][i][clear]).all()
    # the planted neuron's twin is found in both models
    assert ref["max"][0][PLANTED] == pytest.approx(1.0, abs=1e-9)
    assert ref["arg"][0][PLANTED] == PLANTED and ref["arg"][1][PLANTED] == PLANTED
    # the same universal set at the paper's rule (the baselines' seeds differ, the set does not)
    n = out.neurons.sort("neuron_id")
    assert ref["universal"] == {PLANTED}
    assert set(np.flatnonzero(n["universal"].to_numpy())) == {PLANTED}
    # and the block of a layer pair as written
    group = arrays.open_group(planted[1].arrays("u"), mode="r")
    np.testing.assert_allclose(group["corr/m2/L1_L2"][:],
                               ref["corr"][1][WIDTH:2 * WIDTH, 2 * WIDTH:],
                               atol=1e-6)


def test_flag_by_each_rule(planted, hooked, zoo, tmp_path):
    out, _ = planted
    s = out.summary
    per = {m: s.filter(s["model_b"] == str(zoo[0] / m)).sort("neuron_id") for m in "bc"}
    maxes = np.stack([per[m]["max_corr"].to_numpy() for m in "bc"])
    bases = np.stack([per[m]["baseline_max"].to_numpy() for m in "bc"])
    n = out.neurons.sort("neuron_id")
    np.testing.assert_allclose(n["excess"].to_numpy(), maxes.mean(0) - bases.mean(0), atol=1e-12)
    np.testing.assert_allclose(n["mean_baseline"].to_numpy(), bases.mean(0), atol=1e-12)
    assert (n["universal"].to_numpy() == (maxes.mean(0) - bases.mean(0) > 0.5)).all()
    # per-model: max - baseline > 0.2 in at least one of the two models
    loose = run(universal_config(*zoo, name="u", rule="per-model", threshold=0.2, min_models=1),
                Storage(tmp_path))
    expect = ((maxes - bases) > 0.2).sum(0)
    got = loose.neurons.sort("neuron_id")
    assert got["matches"].to_list() == expect.tolist()
    assert (got["universal"].to_numpy() == (expect >= 1)).all() and expect.sum() > 1


def test_properties_over_the_included_rows(planted, hooked, zoo):
    out, storage = planted
    ids, acts = hooked
    tok = AutoTokenizer.from_pretrained(zoo[0] / "a")
    a = acts["a"][reference_filter(tok, ids)]
    props = out.properties.sort("neuron_id")
    np.testing.assert_allclose(props["act_mean"].to_numpy(), a.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(props["act_var"].to_numpy(), a.var(0), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(props["sparsity"].to_numpy(), (a > 0).mean(0))
    model = AutoModelForCausalLM.from_pretrained(zoo[0] / "a")
    norms = np.concatenate([np.linalg.norm(b.mlp.c_fc.weight.detach().double().numpy(), axis=0)
                            for b in model.transformer.h])
    np.testing.assert_allclose(props["w_in_norm"].to_numpy(), norms, rtol=1e-6)
    flags = out.neurons.sort("neuron_id")["universal"].to_numpy()
    table = tables.read_partition(storage, "universal_properties", "u").to_pydict()
    assert table["universal"] == [False, True] and table["neurons"] == [(~flags).sum(), flags.sum()]
    assert table["w_in_norm"][1] == pytest.approx(norms[flags].mean())


# -- each baseline by its construction


def test_rotation_rows_have_unit_norm_and_orthogonal_is_orthogonal():
    r = baseline_matrix("rotation", 33, seed=1, model=1, layer=2)
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), np.ones(33), atol=1e-12)
    assert not np.allclose(r @ r.T, np.eye(33), atol=0.1)  # a mixing, not a rotation
    q = baseline_matrix("orthogonal", 33, seed=1, model=1, layer=2)
    np.testing.assert_allclose(q.T @ q, np.eye(33), atol=1e-12)
    np.testing.assert_allclose(q @ q.T, np.eye(33), atol=1e-12)
    for kind in ("rotation", "orthogonal"):
        m = baseline_matrix(kind, 33, seed=1, model=1, layer=2)
        np.testing.assert_array_equal(m, baseline_matrix(kind, 33, seed=1, model=1, layer=2))
        # independent per model and per layer
        assert not np.allclose(m, baseline_matrix(kind, 33, seed=1, model=2, layer=2))
        assert not np.allclose(m, baseline_matrix(kind, 33, seed=1, model=1, layer=3))
        assert not np.allclose(m, baseline_matrix(kind, 33, seed=2, model=1, layer=2))
    assert baseline_matrix("permutation", 33, seed=1, model=1, layer=2) is None
    assert baseline_matrix("gaussian", 33, seed=1, model=1, layer=2) is None
    b = {0: torch.randn(9, 33)}
    mixed = baseline_acts("rotation", b, seed=1, model=1, batch=0,
                          mixers={0: torch.from_numpy(r).float()})
    np.testing.assert_allclose(mixed[0].numpy(), b[0].double().numpy() @ r.T, atol=1e-5)


def test_gaussian_is_gelu_of_normals_whatever_b():
    got = gaussian_block(50, 6, seed=3, model=1, layer=2, batch=4).double().numpy()
    x = np.random.default_rng([3, 2, 1, 2, 4]).standard_normal((50, 6), dtype=np.float32)
    x = x.astype(np.float64)
    gelu = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(got, gelu, atol=1e-6)
    b1, b2 = {2: torch.zeros(50, 6)}, {2: torch.randn(50, 6)}
    one = baseline_acts("gaussian", b1, seed=3, model=1, batch=4, mixers={})[2]
    two = baseline_acts("gaussian", b2, seed=3, model=1, batch=4, mixers={})[2]
    assert torch.equal(one, two) and np.allclose(one.numpy(), gelu, atol=1e-6)
    other = baseline_acts("gaussian", b1, seed=3, model=1, batch=5, mixers={})[2]
    assert not torch.equal(one, other)  # a fresh draw per batch


def test_permutation_keeps_the_multiset_of_each_batch():
    b = {0: torch.randn(30, 4), 1: torch.randn(30, 5)}
    out = baseline_acts("permutation", b, seed=2, model=1, batch=3, mixers={})
    perm = None
    for l, x in b.items():
        y = out[l]
        assert not torch.equal(x, y)
        rows = {tuple(r) for r in x.tolist()}
        assert {tuple(r) for r in y.tolist()} == rows and len(rows) == 30
        # the same shuffle for every layer of the batch
        found = [next(i for i in range(30) if torch.equal(x[i], y[j])) for j in range(30)]
        assert perm is None or found == perm
        perm = found
    assert perm == token_permutation(30, seed=2, model=1, batch=3).tolist()
    assert perm != token_permutation(30, seed=2, model=1, batch=4).tolist()


def test_permutation_baseline_shuffles_within_batches(zoo, hooked, tmp_path):
    ids, acts = hooked
    out = run(universal_config(*zoo, name="p", baseline="permutation", seed=4,
                               models=[str(zoo[0] / "a"), str(zoo[0] / "b")]), Storage(tmp_path))
    tok = AutoTokenizer.from_pretrained(zoo[0] / "a")
    keep = reference_filter(tok, ids)
    a, b = acts["a"][keep], acts["b"][keep]
    per_window = keep.reshape(len(ids), -1).sum(1)
    ends = np.cumsum([per_window[s:s + 5].sum() for s in range(0, len(ids), 5)])
    shuffled = np.concatenate([b[s:e][token_permutation(e - s, seed=4, model=1, batch=k)]
                               for k, (s, e) in enumerate(zip(np.r_[0, ends[:-1]], ends))])
    n = a.shape[1]
    expect = np.nan_to_num(np.corrcoef(a.T, shuffled.T)[:n, n:]).max(1)
    np.testing.assert_allclose(out.summary.sort("neuron_id")["baseline_max"].to_numpy(), expect,
                               atol=1e-9)


# -- the cache modes


def _disk(root: Path) -> int:
    """Bytes of the stage's own output: the run folders and the tables (not the SQL catalog)."""
    return sum(p.stat().st_size for sub in ("runs", "tables")
               for p in (Path(root) / sub).rglob("*") if p.is_file())


def _measured(config, root: Path, monkeypatch):
    """Run with the disk use measured before and after every pass; (result, peak bytes)."""
    sizes = []
    real = universal.run_pass

    def spy(*args, **kwargs):
        sizes.append(_disk(root))
        out = real(*args, **kwargs)
        sizes.append(_disk(root))
        return out

    monkeypatch.setattr(universal, "run_pass", spy)
    out = run(config, Storage(root))
    sizes.append(_disk(root))
    return out, max(sizes), len(sizes)


def test_cache_none_equals_the_cache_with_disk_bounded_by_the_blocks(zoo, tmp_path, monkeypatch):
    models = [str(zoo[0] / m) for m in "ab"]
    blocks = LAYERS * LAYERS * WIDTH * WIDTH * 4  # the float32 corr blocks
    peaks, cache_bytes = {}, {}
    for samples in (SAMPLES, 2 * SAMPLES):
        for cache in ("float32", "none"):
            root = tmp_path / f"{cache}{samples}"
            out, peaks[cache, samples], measured = _measured(universal_config(
                *zoo, models=models, cache=cache, num_samples=samples, block_memory=1e-3,
                name="x"), root, monkeypatch)
            assert out.info["passes"] >= 3 and measured == 2 * out.info["passes"] + 1
            if cache == "float32":
                cached = out
                cache_bytes[samples] = out.info["cache_bytes"]
                assert out.info["cache_bytes"] == 2 * out.info["tokens"] * LAYERS * WIDTH * 4
                assert not (root / "runs" / "x" / "arrays.zarr" / "cache").exists()
            else:
                assert out.info["cache_bytes"] == 0
                for col in ("max_corr", "baseline_max", "argmax_neuron", "argmax_layer"):
                    assert out.summary[col].to_list() == cached.summary[col].to_list()
                assert out.neurons.equals(cached.neurons)
                np.testing.assert_array_equal(out.properties["act_var"].to_numpy(),
                                              cached.properties["act_var"].to_numpy())
    # none: the blocks and the tables, whatever the token count; the cache grows with it
    assert peaks["none", SAMPLES] < blocks + 200_000
    assert abs(peaks["none", 2 * SAMPLES] - peaks["none", SAMPLES]) < 20_000
    for samples in (SAMPLES, 2 * SAMPLES):  # the cache is on disk while the passes run
        assert peaks["float32", samples] > cache_bytes[samples] + blocks / 2
    assert (peaks["float32", 2 * SAMPLES] - peaks["float32", SAMPLES]
            > 0.9 * (cache_bytes[2 * SAMPLES] - cache_bytes[SAMPLES]) > 0)


def test_float16_cache_is_half_the_bytes_and_close(zoo, planted, tmp_path):
    out = run(universal_config(*zoo, name="u", cache="float16"), Storage(tmp_path))
    ref = planted[0]
    assert out.info["cache_bytes"] * 2 == ref.info["cache_bytes"]
    np.testing.assert_allclose(out.summary["max_corr"].to_numpy(),
                               ref.summary["max_corr"].to_numpy(), atol=5e-3)
    assert out.neurons["universal"].to_list() == ref.neurons["universal"].to_list()


def test_plan_passes_covers_every_pair_within_the_budget():
    wa, wb = [30, 50, 20], [40, 10]
    for budget in (1.0, 60_000.0, 200_000.0, 1e12):
        passes = plan_passes(wa, wb, budget=budget, max_rows=100, mixing=True)
        pairs = [p for ps in passes for p in ps]
        assert sorted(pairs) == [(a, b) for a in range(3) for b in range(2)]
        for ps in passes:
            la, lb = {a for a, _ in ps}, {b for _, b in ps}
            cost = (sum(16 * wa[a] * wb[b] for a, b in ps) + sum(400 * wa[a] for a in la)
                    + sum(4 * (200 * wb[b] + wb[b] ** 2) for b in lb))
            assert cost <= budget or len(ps) == 1
    assert len(plan_passes(wa, wb, budget=1e12, max_rows=100, mixing=True)) == 1
    assert len(plan_passes(wa, wb, budget=1.0, max_rows=100, mixing=True)) == 6


# -- finished work, model options, bad input


def test_rerun_with_the_same_config_does_nothing(planted, zoo, monkeypatch):
    out, storage = planted
    zarr_json = storage.arrays("u") / "zarr.json"
    before = zarr_json.stat().st_mtime_ns
    from pipeline.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded again"))
    again = run(universal_config(*zoo, name="u"), storage)
    assert again.reused and zarr_json.stat().st_mtime_ns == before
    assert again.neurons.equals(out.neurons)
    assert again.summary.sort("neuron_id", "model_b").equals(out.summary.sort("neuron_id",
                                                                              "model_b"))
    assert again.info["tokens"] == out.info["tokens"]


def test_model_options_reach_load_model(tmp_path, monkeypatch):
    from pipeline.models import loading

    seen = []

    def fake(name, revision=None, **kwargs):
        seen.append((name, revision, kwargs))
        raise RuntimeError("stop")

    monkeypatch.setattr(loading, "load_model", fake)
    with pytest.raises(RuntimeError, match="stop"):
        run(UniversalConfig(models=["m-a", "m-b"], revision="step2", trust_remote_code=True,
                            device="cpu", dtype="float32"), Storage(tmp_path))
    name, revision, kwargs = seen[0]
    assert (name, revision) == ("m-a", "step2")
    assert kwargs["trust_remote_code"] is True and kwargs["dtype"] == "float32"


@pytest.mark.parametrize("kw, match", [
    ({"models": ["zoo-s0"]}, "at least two"),
    ({"models": ["a", "b", "c"], "rule": "per-model", "min_models": 3}, "--min-models 3 .*1..2"),
    ({"models": ["a", "b"], "min_models": 1}, "--rule per-model"),
    ({"models": ["a", "b"], "baseline": "shuffle"}, "--baseline"),
    ({"models": ["a", "b"], "rule": "majority"}, "--rule"),
    ({"models": ["a", "b"], "cache": "int8"}, "--cache"),
    ({"models": ["a", "b"], "block_memory": 0}, "--block-memory"),
    ({"models": ["a", "b"], "exclude": "pad,tabs"}, "--exclude"),
    ({"models": ["a", "b"], "num_samples": 0}, "--num-samples"),
])
def test_bad_config(kw, match):
    with pytest.raises(UserError, match=match):
        UniversalConfig(**kw)


def test_bad_input_one_line_exit_2(zoo, tmp_path, capsys):
    root, corpus = zoo
    other = tmp_path / "other"
    shutil.copytree(root / "b", other)
    for f in other.glob("*.json"):
        if f.name != "config.json":
            f.unlink()
    (other / "merges.txt").unlink(missing_ok=True)
    (other / "vocab.json").unlink(missing_ok=True)
    make_tokenizer(other, vocab_size=280)  # another vocabulary, same model shape
    storage = tmp_path / "s"
    storage.mkdir()
    (storage / "keep.txt").write_text("x")
    before = files_of(storage)
    common = ["--corpus", str(corpus), "--num-samples", "4", "--max-length", "16", "--device",
              "cpu", "--storage", str(storage), "--quiet"]
    cases = [
        (["--models", str(root / "a")], "at least two"),
        (["--models", str(root / "a"), str(other)], "cannot go through both"),
        (["--models", str(root / "a"), str(root / "b"), "--rule", "per-model", "--min-models",
          "2"], "--min-models"),
        (["--models", str(root / "a"), str(root / "b"), "--baseline", "shuffle"], "--baseline"),
        (["--models", str(root / "a"), str(root / "b"), "--rule", "majority"], "--rule"),
        (["--models", str(root / "a"), str(root / "b"), "--cache", "int8"], "--cache"),
    ]
    for argv, match in cases:
        code = main(["universal", *argv, *common])
        _, err = capsys.readouterr()
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert match in err, err
        assert files_of(storage) == before
    assert os.listdir(storage) == ["keep.txt"]
