"""Correlations against numpy.corrcoef; a planted universal neuron is found, random ones are not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.errors import UserError
from pipeline.models.micro import save_random_gpt2
from pipeline.core.storage import Storage
from pipeline.stages.universal import PairCorrelation, UniversalConfig, universal


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


PLANTED = 7


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Model B = model A with every MLP re-randomised except neuron 7 of layer 0."""
    root = tmp_path_factory.mktemp("uni")
    model_a, _ = save_random_gpt2(root / "a", seed=0, d_mlp=40)
    model_b, _ = save_random_gpt2(root / "b", seed=0, d_mlp=40)
    torch.manual_seed(123)
    with torch.no_grad():
        for layer, block in enumerate(model_b.transformer.h):
            for p in block.mlp.parameters():
                fresh = torch.randn_like(p) * p.std()
                if layer == 0 and p.dim() == 2 and p.shape[1] == 40:   # c_fc weight [d, 40]
                    fresh[:, PLANTED] = p[:, PLANTED]
                elif layer == 0 and p.dim() == 1 and p.shape[0] == 40:  # c_fc bias
                    fresh[PLANTED] = p[PLANTED]
                p.copy_(fresh)
    model_b.save_pretrained(root / "b", safe_serialization=True)
    corpus = root / "c.txt"
    rng = np.random.default_rng(0)
    words = "the value of a list returns an object raise error none file path".split()
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, 30)) for _ in range(60)))
    storage = Storage(root / "s")
    out = universal(UniversalConfig(models=[str(root / "a"), str(root / "b")], corpus=str(corpus),
                                    num_samples=24, max_length=16, baseline="permutation",
                                    threshold=0.6, name="u"), storage, progress=False)
    return out, root


def test_planted_neuron_is_universal_random_ones_are_not(planted):
    out, _ = planted
    summary = out["summary"]
    row = summary.filter(summary["neuron_id"] == PLANTED).row(0, named=True)
    assert row["max_corr"] == pytest.approx(1.0, abs=1e-5)
    assert (row["argmax_layer"], row["argmax_neuron"]) == (0, PLANTED)
    neurons = out["neurons"]
    universal_ids = neurons.filter(neurons["universal"])["neuron_id"].to_list()
    assert PLANTED in universal_ids
    assert len(universal_ids) <= 3  # others have no twin


def test_stored_block_equals_corrcoef(planted):
    from pipeline.core import arrays

    _, root = planted
    group = arrays.open_group(Storage(root / "s").arrays("u"), mode="r")
    a = group["acts/m0/L1"][:].astype(np.float64)
    b = group["acts/m1/L2"][:].astype(np.float64)
    expect = np.nan_to_num(np.corrcoef(a.T, b.T)[:40, 40:])
    np.testing.assert_allclose(group["corr/m1/L1_L2"][:], expect, atol=1e-5)


def test_bad_config():
    with pytest.raises(UserError):
        UniversalConfig(models=["zoo-s0"])
    with pytest.raises(UserError):
        UniversalConfig(models=["a", "b"], min_models=2)


def test_property_comparison_table(planted):
    out, root = planted
    from pipeline.core import tables

    table = tables.read_partition(Storage(root / "s"), "universal_properties", "u").to_pydict()
    assert table["universal"] == [False, True] and sum(table["neurons"]) == 120
    props = out["properties"]
    expect = props.filter(props["universal"])["w_in_norm"].mean()
    assert table["w_in_norm"][1] == pytest.approx(expect)
