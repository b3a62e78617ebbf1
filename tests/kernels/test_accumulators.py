"""NeuronMoments: shifted power sums against plain loops, merges against one pass, moments of
neurons whose mean is large against their spread against two-pass NumPy, state round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.core import tables
from pipeline.core.errors import UserError
from pipeline.core.warehouse import central_moments
from pipeline.kernels.accumulators import NeuronMoments, load_states, save_states

PATHS = ("torch", "fused")  # update() (any device) and update_and_pack() (the numba CPU kernel)


def _feed(m: NeuronMoments, blocks, path: str) -> NeuronMoments:
    for block in blocks:
        if path == "torch":
            m.update(torch.from_numpy(block))
        else:
            m.update_and_pack(torch.from_numpy(block))
    return m


def _two_pass(x: np.ndarray) -> dict[str, np.ndarray]:
    """Population moments of each column by the textbook two-pass formulas, float64."""
    x = x.astype(np.float64)
    mean = x.mean(0)
    c = x - mean
    var = (c ** 2).mean(0)
    return {"mean": mean, "var": var, "skew": (c ** 3).mean(0) / var ** 1.5,
            "kurt": (c ** 4).mean(0) / var ** 2}


def _moment_errors(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    """Worst error per moment: relative for mean (to the spread) and variance; skew and kurtosis
    are already in units of the spread, so relative where above 1, absolute below."""
    sd = np.sqrt(ref["var"])
    return {
        "mean": float(np.max(np.abs(got["mean"] - ref["mean"]) / sd)),
        "var": float(np.max(np.abs(got["var"] / ref["var"] - 1))),
        **{k: float(np.max(np.abs(got[k] - ref[k]) / np.maximum(1, np.abs(ref[k]))))
           for k in ("skew", "kurt")},
    }


def _assert_moments(got, ref, tol=1e-6):
    errors = _moment_errors(got, ref)
    assert max(errors.values()) < tol, errors


def test_columns_are_the_neuron_stats_table():
    m = NeuronMoments(3)
    m.update(torch.ones(2, 3))
    assert list(m.columns()) == tables.schema("neuron_stats").names[3:]  # after the three ids


@pytest.mark.parametrize("path", PATHS)
def test_sums_equal_loops(path):
    x = (np.random.default_rng(0).normal(size=(300, 7)) * 2 + 5).astype(np.float32)
    m = _feed(NeuronMoments(7, 0.25), [x[:100], x[100:250], x[250:]], path)
    cols = m.columns()
    assert (cols["count"] == 300).all()
    for n in range(7):
        col = [float(v) for v in x[:, n]]
        first = [float(v) for v in x[:100, n]]
        # the shift is the first block's mean (to float32 rounding), the same for every block
        assert abs(cols["shift"][n] - sum(first) / len(first)) <= 1e-6 * abs(cols["shift"][n])
        k = float(cols["shift"][n])
        expect = {
            "sum": sum(col), "sum_abs": sum(abs(v) for v in col),
            "shifted_sum": sum(v - k for v in col),
            "shifted_sum_sq": sum((v - k) ** 2 for v in col),
            "shifted_sum_cube": sum((v - k) ** 3 for v in col),
            "shifted_sum_quad": sum((v - k) ** 4 for v in col),
            "min": min(col), "max": max(col), "active_count": sum(v > 0.25 for v in col),
        }
        # odd powers of a - K can nearly cancel: their error is relative to the sums of |a - K|^p
        scale = {f"shifted_sum{s}": sum(abs(v - k) ** p for v in col)
                 for p, s in enumerate(("", "_sq", "_cube", "_quad"), 1)}
        for name, value in expect.items():
            assert cols[name][n] == pytest.approx(value, rel=1e-12, abs=1e-12 * scale.get(name, 0)), name


# a neuron with mean 1e4 and std 1, one with mean 1e4 and std 1e-2, one ordinary
LARGE_MEANS = np.array([1e4, 1e4, 0.5])
SPREADS = np.array([1.0, 1e-2, 2.0])


def _large_mean_data(rows=4096, seed=0) -> np.ndarray:
    z = np.random.default_rng(seed).standard_normal((rows, 3))
    return (LARGE_MEANS + SPREADS * (z + 0.3 * z ** 2)).astype(np.float32)  # skewed


@pytest.mark.parametrize("path", PATHS)
def test_large_means_keep_their_moments(path):
    x = _large_mean_data()
    ref = _two_pass(x)
    one = _feed(NeuronMoments(3), np.array_split(x, 5), path)
    _assert_moments(one.summary(), ref)
    # after merges of accumulators whose shifts differ (each fixed by its own first block)
    parts = [_feed(NeuronMoments(3), [b], path) for b in np.array_split(x, 7)]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    _assert_moments(merged.summary(), ref)
    assert len({tuple(p.columns()["shift"]) for p in parts}) == len(parts)


def test_raw_power_sums_fail_the_same_check():
    """The unshifted sums of a^k (what the accumulators kept before shifts), in float64, fail
    the check above: the variance of the 1e4 +- 1e-2 neuron, the kurtosis of both large means."""
    x = _large_mean_data().astype(np.float64)
    raw = central_moments(len(x), 0.0, *(np.sum(x ** k, 0) for k in range(1, 5)))
    ref = _two_pass(x)
    pick = lambda d, n: {k: v[n:n + 1] for k, v in d.items()}  # noqa: E731
    assert _moment_errors(pick(raw, 1), pick(ref, 1))["var"] > 1e-6
    for n in (0, 1):
        assert _moment_errors(pick(raw, n), pick(ref, n))["kurt"] > 1e-6
    assert max(_moment_errors(pick(raw, 2), pick(ref, 2)).values()) < 1e-6  # the ordinary one


@given(
    n1=st.integers(1, 60), n2=st.integers(1, 60), width=st.integers(1, 9),
    seed=st.integers(0, 10_000),
    locs=st.tuples(*[st.sampled_from([0.0, 1e4, -3e3, 5e4])] * 2),
    scale=st.sampled_from([1e-2, 1.0, 30.0]),
    jump=st.sampled_from([0.0, 1e4]),
    paths=st.tuples(st.sampled_from(PATHS), st.sampled_from(PATHS)),
)
@settings(max_examples=60, deadline=None)
def test_merge_of_halves_equals_one_pass(n1, n2, width, seed, locs, scale, jump, paths):
    rng = np.random.default_rng(seed)
    x = (np.repeat(locs, [n1, n2])[:, None] + scale * rng.normal(size=(n1 + n2, width)))
    x[0] += jump  # the first halve's first block can sit far from the rest of it
    x = x.astype(np.float32)
    one = _feed(NeuronMoments(width, 0.5), [x], paths[0])
    halves = [x[:n1], x[n1:]]
    a, b = (_feed(NeuronMoments(width, 0.5), [h[:1], h[1:]], p) for h, p in zip(halves, paths))
    merged = a.merge(b)
    cols, one_cols = merged.columns(), one.columns()
    assert (cols["count"] == n1 + n2).all()
    assert np.array_equal(cols["shift"], a.columns()["shift"])  # the first accumulator's shift
    for k in ("sum", "sum_abs", "min", "max", "active_count"):
        np.testing.assert_allclose(cols[k], one_cols[k], rtol=1e-12, atol=1e-12 * np.abs(x).max(),
                                   err_msg=k)
    ref = _two_pass(x)
    assume(np.all(ref["var"] > 0))  # float32 can round a tiny spread at 5e4 away
    _assert_moments(merged.summary(), ref)
    _assert_moments(one.summary(), ref)


def test_merge_with_empty_keeps_the_other_shift():
    x = _large_mean_data(50)
    full = _feed(NeuronMoments(3), [x], "torch")
    for merged in (NeuronMoments(3).merge(full), full.merge(NeuronMoments(3)), full.copy()):
        for k, v in full.columns().items():
            assert np.array_equal(merged.columns()[k], v), k
    assert NeuronMoments(3).merge(NeuronMoments(3)).shift is None


def test_merge_refuses_other_layers():
    with pytest.raises(ValueError):
        NeuronMoments(3).merge(NeuronMoments(4))
    with pytest.raises(ValueError):
        NeuronMoments(3, 0.0).merge(NeuronMoments(3, 0.5))


@pytest.mark.parametrize("path", PATHS)
def test_state_roundtrip_keeps_the_shift(tmp_path, path):
    x = _large_mean_data(60)
    m = _feed(NeuronMoments(3, 0.1), [x[:20]], path)
    save_states(tmp_path / "s.npz", {3: m, 4: NeuronMoments(2)})
    back, _ = load_states(tmp_path / "s.npz", [3, 4])
    for k, v in m.columns().items():
        assert np.array_equal(back[3].columns()[k], v), k
    assert back[3].active_threshold == 0.1 and back[4].shift is None and not back[4].count.any()
    # a resumed accumulator continues about the saved shift: as if never interrupted
    _feed(back[3], [x[20:]], path)
    _feed(m, [x[20:]], path)
    for k, v in m.columns().items():
        assert np.array_equal(back[3].columns()[k], v), k


@pytest.mark.parametrize("missing", ["L0/shift", "L0/count"])
def test_state_of_an_older_version_is_a_user_error(tmp_path, missing):
    m = NeuronMoments(2)
    m.update(torch.ones(3, 2))
    state = {k: v for k, v in m.state("L0").items() if k != missing}
    np.savez(tmp_path / "old.npz", **state)
    with pytest.raises(UserError, match="predate"):
        load_states(tmp_path / "old.npz", [0])


def test_empty_blocks_change_nothing():
    m = NeuronMoments(3)
    m.update(torch.zeros(0, 3))
    m.update_and_pack(torch.zeros(0, 3))
    assert not m.count.any() and m.shift is None
    x = _large_mean_data(10)
    m.update(torch.from_numpy(x))
    assert np.array_equal(m.columns()["shift"], _feed(NeuronMoments(3), [x], "torch").columns()["shift"])


def _loop_stats(x, key, thr, rows, routed):
    """Per-neuron count, sums, min, max and active count of the accumulated entries, by loops."""
    n, d = x.shape
    out = {k: np.zeros(d) for k in ("count", "sum", "sum_abs", "sq", "active")}
    lo, hi = np.full(d, np.inf), np.full(d, -np.inf)
    bits = np.zeros((n, d), bool)
    for r in range(n):
        for j in range(d):
            reached = routed is None or routed[r, j]
            bits[r, j] = reached and key[r, j] > thr
            if rows[r] and reached:
                v = float(x[r, j])
                out["count"][j] += 1
                out["sum"][j] += v
                out["sum_abs"][j] += abs(v)
                out["sq"][j] += v * v
                out["active"][j] += bits[r, j]
                lo[j], hi[j] = min(lo[j], v), max(hi[j], v)
    return out, lo, hi, bits


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("with_routed", [False, True])
def test_key_rows_and_routing_select_what_is_accumulated(path, with_routed):
    """Active entries follow the key (here a gate-like array, not x), excluded rows keep their
    mask bits but add nothing, unrouted entries are inactive and add nothing."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(37, 19)).astype(np.float32)
    key = rng.normal(size=x.shape).astype(np.float32)
    rows = rng.random(37) > 0.3
    routed = rng.random(x.shape) > 0.5 if with_routed else None
    m = NeuronMoments(19, 0.2)
    packed_rows, per_row = [], []
    for s in (slice(0, 10), slice(10, 37)):  # two blocks: the shift is the first block's
        args = (torch.from_numpy(x[s]), torch.from_numpy(key[s]), torch.from_numpy(rows[s]),
                None if routed is None else torch.from_numpy(routed[s]))
        if path == "torch":
            m.update(*args)
        else:
            packed, count = m.update_and_pack(*args)
            packed_rows.append(packed)
            per_row.append(count)
    ref, lo, hi, bits = _loop_stats(x, key, 0.2, rows, routed)
    c = m.columns()
    assert np.array_equal(c["count"], ref["count"]) and np.array_equal(c["active_count"], ref["active"])
    np.testing.assert_allclose(c["sum"], ref["sum"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(c["sum_abs"], ref["sum_abs"], rtol=1e-12, atol=1e-12)
    mean = ref["sum"] / np.maximum(ref["count"], 1)
    var = ref["sq"] / np.maximum(ref["count"], 1) - mean ** 2
    got = m.summary()
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["var"], var, rtol=1e-9, atol=1e-12)
    assert np.array_equal(c["min"], lo) and np.array_equal(c["max"], hi)
    if path == "fused":
        unpacked = np.unpackbits(np.concatenate(packed_rows), axis=1, bitorder="little")[:, :19]
        assert np.array_equal(unpacked.astype(bool), bits)
        assert np.array_equal(np.concatenate(per_row), bits.sum(1))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(0, 40), st.integers(0, 2 ** 16))
def test_merge_of_halves_with_per_neuron_counts_is_one_pass(n, cut, seed):
    rng = np.random.default_rng(seed)
    cut = min(cut, n)
    x = (rng.normal(size=(n, 5)) * 3 + 100).astype(np.float32)
    routed = rng.random((n, 5)) > 0.4
    whole, a, b = NeuronMoments(5), NeuronMoments(5), NeuronMoments(5)
    whole.update(torch.from_numpy(x), routed=torch.from_numpy(routed))
    a.update(torch.from_numpy(x[:cut]), routed=torch.from_numpy(routed[:cut]))
    b.update(torch.from_numpy(x[cut:]), routed=torch.from_numpy(routed[cut:]))
    merged, one = a.merge(b).columns(), whole.columns()
    assert np.array_equal(merged["count"], routed.sum(0))
    assert np.array_equal(merged["active_count"], one["active_count"])
    got, ref = a.merge(b).summary(), whole.summary()
    for k in ("mean", "var"):
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-9, atol=1e-9)
