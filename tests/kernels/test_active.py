"""Active rules against their definitions written out, and the sign-combination accumulator
against plain loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.errors import UserError
from pipeline.kernels.accumulators import COMBINATIONS, SignStats, load_states, save_states
from pipeline.kernels.active import ActiveRule


def _data(seed=0, n=23, w=11):
    rng = np.random.default_rng(seed)
    return (torch.from_numpy(rng.normal(size=(n, w)).astype(np.float32)),
            torch.from_numpy(rng.normal(size=(n, w)).astype(np.float32)))


def test_each_rule_is_its_definition():
    a, g = _data()
    t = 0.3
    assert torch.equal(ActiveRule("value", t).mask(a, g), a > t)
    assert torch.equal(ActiveRule("gate", t).mask(a, g), g > t)
    assert torch.equal(ActiveRule("abs", t).mask(a, g), a.abs() > t)
    top = ActiveRule("topk", 0.0, 3).mask(a, g)
    for r in range(a.shape[0]):
        ranked = sorted(range(a.shape[1]), key=lambda j: -abs(float(a[r, j])))
        assert set(np.flatnonzero(top[r].numpy())) == set(ranked[:3])


@pytest.mark.parametrize("kwargs, match", [
    (dict(rule="gate", threshold=0.0, topk=None, gated=False), "no gate"),
    (dict(rule="value", threshold=float("nan"), topk=None, gated=False), "finite"),
    (dict(rule="value", threshold=float("inf"), topk=None, gated=True), "finite"),
    (dict(rule="topk", threshold=0.0, topk=0, gated=False), "between 1 and"),
    (dict(rule="topk", threshold=0.0, topk=41, gated=False), r"width \(40\)"),
    (dict(rule="value", threshold=0.0, topk=3, gated=False), "only with"),
    (dict(rule="max", threshold=0.0, topk=None, gated=False), "not one of"),
])
def test_bad_rules_are_one_line_errors(kwargs, match):
    with pytest.raises(UserError, match=match) as e:
        ActiveRule.resolve(**kwargs, widths=[40, 48])
    assert "\n" not in str(e.value)


def test_defaults_follow_the_mlp():
    assert ActiveRule.resolve(None, 0.0, None, gated=True, widths=[8]).rule == "gate"
    assert ActiveRule.resolve(None, 0.0, None, gated=False, widths=[8]).rule == "value"


def _loop_signs(a, g, u, rows, k):
    n, w = a.shape
    count = np.zeros((4, w), np.int64)
    sums = np.zeros((4, w))
    entries = {(c, j): [] for c in range(4) for j in range(w)}
    for r in range(n):
        if not rows[r]:
            continue
        for j in range(w):
            name = ("g+" if g[r, j] > 0 else "g-") + ("u+" if u[r, j] > 0 else "u-")
            c = COMBINATIONS.index(name)
            count[c, j] += 1
            sums[c, j] += abs(float(a[r, j]))
            entries[c, j].append((-abs(float(a[r, j])), r, float(a[r, j])))
    top = {key: sorted(v)[:k] for key, v in entries.items()}
    return count, sums, top


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 30), st.lists(st.integers(1, 12), min_size=1, max_size=4),
       st.integers(0, 6), st.integers(0, 2 ** 16))
def test_sign_stats_match_loops_for_any_blocking(n, cuts, k, seed):
    a, g = _data(seed, n, 7)
    u = torch.from_numpy(np.random.default_rng(seed + 1).normal(size=(n, 7)).astype(np.float32))
    rows = np.random.default_rng(seed + 2).random(n) > 0.25
    stats = SignStats(7, examples=k)
    start = 0
    for size in cuts + [n]:
        stop = min(n, start + size)
        stats.update(a[start:stop], g[start:stop], u[start:stop], start,
                     rows=torch.from_numpy(rows[start:stop]))
        start = stop
    count, sums, top = _loop_signs(a.numpy(), g.numpy(), u.numpy(), rows, k)
    assert np.array_equal(stats.count, count)
    np.testing.assert_allclose(stats.sum_abs, sums, rtol=1e-6)
    table, examples = stats.tables()
    got = {}
    for c, rank, j, row, value in zip(examples["combination"], examples["rank"],
                                      examples["neuron"], examples["row"], examples["value"]):
        got.setdefault((COMBINATIONS.index(c), j), []).append((rank, row, value))
    for key, want in top.items():
        have = sorted(got.get(key, []))
        assert [r for _, r, _ in have] == [r for _, r, _ in want]
        assert [v for _, _, v in have] == pytest.approx([v for _, _, v in want])
    mean = np.where(count > 0, sums / np.maximum(count, 1), np.nan).reshape(-1)
    np.testing.assert_allclose(table["mean_abs"], mean, rtol=1e-6)


def test_sign_state_round_trips(tmp_path):
    a, g = _data(4)
    s = SignStats(11, examples=3)
    s.update(a, g, -a, 100)
    from pipeline.kernels.accumulators import NeuronMoments

    save_states(tmp_path / "s.npz", {0: NeuronMoments(11)}, {0: s})
    _, signs = load_states(tmp_path / "s.npz", [0], signs=True)
    for name in ("count", "sum_abs", "top_abs", "top_value", "top_row"):
        assert np.array_equal(getattr(signs[0], name), getattr(s, name)), name
