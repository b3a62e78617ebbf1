"""Universal neurons against activations captured here by independent hooks and np.corrcoef."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import mlp_inputs
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.core import arrays, tables
from pipeline.core.errors import UserError
from pipeline.core.inputs import iter_documents, iter_windows
from pipeline.core.storage import Storage
from pipeline.kernels.correlation import PairCorrelation
from pipeline.models.micro import save_random_gpt2
from pipeline.stages.universal import (
    UniversalConfig,
    baseline_blocks,
    baseline_matrix,
    run,
    token_permutation,
)

PLANTED = 7
WIDTH, LAYERS = 40, 3
SAMPLES, LENGTH, THRESHOLD = 24, 16, 0.6


@given(st.integers(3, 60), st.integers(1, 59), st.integers(0, 1000))
@settings(max_examples=30, deadline=None)
def test_pair_correlation_equals_corrcoef_after_merge(n, split, seed):
    split = min(split, n - 1)
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, 4))
    b = a[:, :3] * 0.5 + rng.normal(size=(n, 3))
    one, first, second = PairCorrelation(4, 3), PairCorrelation(4, 3), PairCorrelation(4, 3)
    one.update(a, b)
    first.update(a[:split], b[:split])
    second.update(a[split:], b[split:])
    expect = np.corrcoef(a.T, b.T)[:4, 4:]
    np.testing.assert_allclose(one.correlation(), expect, atol=1e-9)
    np.testing.assert_allclose(first.merge(second).correlation(), expect, atol=1e-9)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Model B = model A with every MLP re-randomised except neuron 7 of layer 0."""
    root = tmp_path_factory.mktemp("uni")
    save_random_gpt2(root / "a", seed=0, d_mlp=WIDTH)
    model_b, _ = save_random_gpt2(root / "b", seed=0, d_mlp=WIDTH)
    torch.manual_seed(123)
    with torch.no_grad():
        for layer, block in enumerate(model_b.transformer.h):
            for p in block.mlp.parameters():
                fresh = torch.randn_like(p) * p.std()
                if layer == 0 and p.dim() == 2 and p.shape[1] == WIDTH:   # c_fc weight [d, 40]
                    fresh[:, PLANTED] = p[:, PLANTED]
                elif layer == 0 and p.dim() == 1 and p.shape[0] == WIDTH:  # c_fc bias
                    fresh[PLANTED] = p[PLANTED]
                p.copy_(fresh)
    model_b.save_pretrained(root / "b", safe_serialization=True)
    corpus = root / "c.txt"
    rng = np.random.default_rng(0)
    words = "the value of a list returns an object raise error none file path".split()
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, 30)) for _ in range(60)))
    storage = Storage(root / "s")
    out = run(universal_config(root, corpus, baseline="permutation", name="u"), storage)
    return out, root, corpus


def universal_config(root, corpus, **kw) -> UniversalConfig:
    values = dict(models=[str(root / "a"), str(root / "b")], corpus=str(corpus), device="cpu",
                  num_samples=SAMPLES, max_length=LENGTH, threshold=THRESHOLD, quiet=True)
    return UniversalConfig(**{**values, **kw})


def dense_activations(model_dir, corpus) -> np.ndarray:
    """[tokens, 3 x 40] neuron vectors (the input of each c_proj), by a hook written here."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = np.array(list(iter_windows(iter_documents(str(corpus)), tok, max_length=LENGTH,
                                     num_samples=SAMPLES)))
    acts = mlp_inputs(model_dir, ids, batch_size=len(ids))
    return np.concatenate([acts[l] for l in range(LAYERS)], 1).astype(np.float64)


@pytest.fixture(scope="module")
def truth(planted):
    _, root, corpus = planted
    a, b = dense_activations(root / "a", corpus), dense_activations(root / "b", corpus)
    n = a.shape[1]
    corr = np.nan_to_num(np.corrcoef(a.T, b.T)[:n, n:])
    perm = token_permutation(len(b), seed=0)
    base = np.nan_to_num(np.corrcoef(a.T, b[perm].T)[:n, n:])
    return {"a": a, "b": b, "corr": corr, "max": corr.max(1), "arg": corr.argmax(1),
            "base": base.max(1)}


def test_correlations_equal_corrcoef_of_hooked_activations(planted, truth):
    out, root, _ = planted
    s = out.summary.sort("neuron_id")
    assert s.height == LAYERS * WIDTH and set(s["model_b"]) == {str(root / "b")}
    np.testing.assert_allclose(s["max_corr"].to_numpy(), truth["max"], atol=1e-6)
    np.testing.assert_allclose(s["baseline_max"].to_numpy(), truth["base"], atol=1e-6)
    np.testing.assert_allclose(s["excess"].to_numpy(), truth["max"] - truth["base"], atol=1e-6)
    # argmax where the best match is clear of the second best
    top2 = np.sort(truth["corr"], 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    got = s["argmax_layer"].to_numpy() * WIDTH + s["argmax_neuron"].to_numpy()
    assert clear.sum() > 100 and (got[clear] == truth["arg"][clear]).all()
    group = arrays.open_group(Storage(root / "s").arrays("u"), mode="r")
    np.testing.assert_allclose(group["corr/m1/L1_L2"][:], truth["corr"][40:80, 80:120], atol=1e-6)


def test_universal_flag_by_the_rule(planted, truth):
    out, _, _ = planted
    excess = truth["max"] - truth["base"]
    expect = excess > THRESHOLD  # one other model, min_models defaults to it
    decided = np.abs(excess - THRESHOLD) > 1e-5
    n = out.neurons.sort("neuron_id")
    assert (n["universal"].to_numpy()[decided] == expect[decided]).all()
    assert n["matches"].to_list() == n["universal"].cast(int).to_list()
    # the planted twin: same input weights, so the same activations
    assert truth["max"][PLANTED] == pytest.approx(1.0, abs=1e-6) and truth["arg"][PLANTED] == PLANTED
    assert expect[PLANTED] and n.filter(n["neuron_id"] == PLANTED)["universal"][0]
    assert expect.sum() <= 3  # other neurons have no twin


def test_properties_equal_numpy(planted, truth):
    out, root, _ = planted
    a = truth["a"]
    props = out.properties.sort("neuron_id")
    np.testing.assert_allclose(props["act_mean"].to_numpy(), a.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(props["act_var"].to_numpy(), a.var(0), rtol=1e-6, atol=1e-12)
    z = (a - a.mean(0)) / a.std(0)
    np.testing.assert_allclose(props["act_kurt"].to_numpy(), (z ** 4).mean(0), rtol=1e-6)
    np.testing.assert_allclose(props["sparsity"].to_numpy(), (a > 0).mean(0))
    model = AutoModelForCausalLM.from_pretrained(root / "a")
    norms = np.concatenate([np.linalg.norm(b.mlp.c_fc.weight.detach().double().numpy(), axis=0)
                            for b in model.transformer.h])
    np.testing.assert_allclose(props["w_in_norm"].to_numpy(), norms, rtol=1e-6)
    flags = out.neurons.sort("neuron_id")["universal"].to_numpy()
    table = tables.read_partition(Storage(root / "s"), "universal_properties", "u").to_pydict()
    assert table["universal"] == [False, True] and table["neurons"] == [(~flags).sum(), flags.sum()]
    assert table["w_in_norm"][1] == pytest.approx(norms[flags].mean())
    assert table["act_mean"][0] == pytest.approx(a.mean(0)[~flags].mean(), rel=1e-6)


def test_rotation_baseline_equals_corrcoef_with_rotated_activations(planted, truth, tmp_path):
    _, root, corpus = planted
    out = run(universal_config(root, corpus, baseline="rotation", seed=5, name="rot"),
              Storage(tmp_path))
    a, b = truth["a"], truth["b"]
    per_layer = []
    for l in range(LAYERS):
        rotated = b[:, l * WIDTH:(l + 1) * WIDTH] @ baseline_matrix("rotation", WIDTH, 5, l)
        per_layer.append(np.nan_to_num(np.corrcoef(a.T, rotated.T)[:a.shape[1], a.shape[1]:]).max(1))
    np.testing.assert_allclose(out.summary.sort("neuron_id")["baseline_max"].to_numpy(),
                               np.max(per_layer, 0), atol=1e-6)


# -- the baselines by their construction


def test_rotation_is_orthogonal_and_gaussian_rows_have_unit_norm():
    q = baseline_matrix("rotation", 33, seed=1, layer=2)
    np.testing.assert_allclose(q.T @ q, np.eye(33), atol=1e-12)
    assert not np.allclose(q, baseline_matrix("rotation", 33, seed=1, layer=3))
    np.testing.assert_array_equal(q, baseline_matrix("rotation", 33, seed=1, layer=2))
    g = baseline_matrix("gaussian", 33, seed=1, layer=2)
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), np.ones(33), atol=1e-12)
    assert not np.allclose(g.T @ g, np.eye(33), atol=0.1)  # a mixing, not a rotation
    assert baseline_matrix("permutation", 33, seed=1, layer=2) is None


def test_baseline_blocks(tmp_path):
    b = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    arr = zarr.create_array(store=str(tmp_path / "b.zarr"), shape=b.shape, dtype="float32",
                            chunks=(16, 6))
    arr[:] = b
    permuted = np.concatenate(list(baseline_blocks("permutation", arr, seed=4, layer=0, chunk=7)))
    np.testing.assert_array_equal(np.sort(permuted, 0), np.sort(b, 0))  # the same values per column
    assert not np.array_equal(permuted, b)
    np.testing.assert_array_equal(permuted, b[token_permutation(50, 4)])
    rotated = np.concatenate(list(baseline_blocks("rotation", arr, seed=4, layer=1, chunk=7)))
    np.testing.assert_allclose(rotated, b.astype(np.float64) @ baseline_matrix("rotation", 6, 4, 1))


# -- finished work, model options, bad input


def test_rerun_with_the_same_config_does_nothing(planted, monkeypatch):
    out, root, corpus = planted
    storage = Storage(root / "s")
    zarr_json = storage.arrays("u") / "zarr.json"
    before = zarr_json.stat().st_mtime_ns
    from pipeline.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded again"))
    again = run(universal_config(root, corpus, baseline="permutation", name="u"), storage)
    assert again.reused and zarr_json.stat().st_mtime_ns == before
    assert again.neurons.equals(out.neurons)
    assert again.summary.sort("neuron_id").equals(out.summary.sort("neuron_id"))
    assert again.comparison["neurons"].to_list() == out.comparison["neurons"].to_list()


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
    ({"models": ["a", "b"], "min_models": 2}, "--min-models"),
    ({"models": ["a", "b"], "baseline": "shuffle"}, "--baseline"),
    ({"models": ["a", "b"], "num_samples": 0}, "--num-samples"),
])
def test_bad_config(kw, match):
    with pytest.raises(UserError, match=match):
        UniversalConfig(**kw)
