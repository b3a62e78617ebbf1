"""The fused moments + bit packing kernel against dense NumPy, and the fused CPU path of the
accumulators against the torch path."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core import arrays
from pipeline.kernels.accumulators import NeuronMoments
from pipeline.kernels.bitkernels import moments_and_pack


@given(st.integers(0, 50), st.integers(1, 150), st.floats(-0.5, 0.5), st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_moments_and_pack_equal_numpy(tokens, width, threshold, seed):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(tokens, width)) * 3 + rng.normal(size=width) * 100).astype(np.float32)
    shift = rng.normal(size=width) * 100  # any float64 shift, not only a mean
    start = rng.normal(size=(6, width))   # the kernel adds to the sums it is given
    sums, lo, hi = start.copy(), np.full(width, 7.0), np.full(width, -7.0)
    act = np.arange(width, dtype=np.int64)
    cnt = np.full(width, 3, np.int64)
    packed = np.empty((tokens, (width + 7) // 8), np.uint8)
    every_row, every_neuron = np.ones(tokens, np.uint8), np.zeros((tokens, 0), np.uint8)
    moments_and_pack(x, x, np.float32(threshold), every_row, every_neuron, shift, sums, lo, hi,
                     act, cnt, packed)
    np.testing.assert_array_equal(cnt, 3 + tokens)

    x64 = x.astype(np.float64)
    c = x64 - shift
    expect = [x64.sum(0), np.abs(x64).sum(0), c.sum(0), (c ** 2).sum(0), (c ** 3).sum(0),
              (c ** 4).sum(0)]
    scale = [np.abs(x64).sum(0), np.abs(x64).sum(0), *(np.sum(np.abs(c) ** p, 0) for p in range(1, 5))]
    for row in range(6):  # odd sums can cancel: compare against the sums of magnitudes
        np.testing.assert_allclose(sums[row] - start[row], expect[row], rtol=0,
                                   atol=1e-12 * (scale[row].max() + 1), err_msg=f"row {row}")
    np.testing.assert_array_equal(lo, np.minimum(7.0, x64.min(0, initial=np.inf)))
    np.testing.assert_array_equal(hi, np.maximum(-7.0, x64.max(0, initial=-np.inf)))
    np.testing.assert_array_equal(act, np.arange(width) + (x > np.float32(threshold)).sum(0))
    np.testing.assert_array_equal(packed, np.packbits(x > np.float32(threshold), axis=1,
                                                      bitorder="little"))


@given(st.integers(1, 50), st.integers(1, 150), st.floats(-0.5, 0.5), st.integers(0, 10_000),
       st.sampled_from([0.0, 1e4]))
@settings(max_examples=40, deadline=None)
def test_fused_path_equals_torch_path(tokens, width, threshold, seed, loc):
    x = torch.from_numpy((loc + np.random.default_rng(seed).normal(size=(tokens, width)))
                         .astype(np.float32))
    fused, plain = NeuronMoments(width, threshold), NeuronMoments(width, threshold)
    packed, per_row = fused.update_and_pack(x)
    fused.update_and_pack(x[: tokens // 2])
    plain.update(x)
    plain.update(x[: tokens // 2])
    assert np.array_equal(packed, np.packbits((x > threshold).numpy(), axis=1, bitorder="little"))
    assert np.array_equal(packed, arrays.pack_mask(x > threshold))
    assert np.array_equal(per_row, (x > threshold).sum(1).numpy())
    got, want = fused.columns(), plain.columns()
    assert np.array_equal(got["shift"], want["shift"])  # the same shift on both paths
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-12, atol=1e-9, err_msg=k)
