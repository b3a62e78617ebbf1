"""The CUDA paths of every model stage against the CPU ones, on the micro model.

Skipped where torch sees no CUDA device. In float32 the device results must equal the CPU
results up to the rounding of a different summation order. Masks are checked exactly against
the activations they were computed from: the CPU run's against an independent fp32 forward;
each device run's against its own activations (stored as fp16, which holds a bfloat16 value
exactly and a float32 one to half an fp16 ulp), so only values within that rounding of the
threshold may differ.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import mlp_inputs

from pipeline.core import arrays, coact, tables
from pipeline.core.storage import Storage
from pipeline.kernels.accumulators import NeuronMoments
from pipeline.stages import ablation, coactivation, gradients, trace
from pipeline.stages.extract import ExtractConfig
from pipeline.stages.extract import run as extract

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

THRESHOLD = 0.05
STATS = ("shift", "sum", "sum_abs", "shifted_sum", "shifted_sum_sq", "shifted_sum_cube",
         "shifted_sum_quad", "min", "max")
FP16_HALF_ULP = 2.0 ** -11  # relative rounding of a float32 value stored as fp16 (normal range)


def test_device_accumulators_equal_fused_cpu_pass():
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(300, 77)).astype(np.float32))
    gpu, cpu = NeuronMoments(77, 0.1), NeuronMoments(77, 0.1)
    for block in (x, x[:100]):
        pg, rg = gpu.update_and_pack(block.cuda())
        pc, rc = cpu.update_and_pack(block)
        assert np.array_equal(pg, pc) and np.array_equal(rg, rc)
    state = gpu.state("L0")  # folds the device sums; a later update starts new device sums
    gpu.update_and_pack(x.cuda())
    cpu.update_and_pack(x)
    assert state["L0/meta"][1] == 400
    for k, v in cpu.columns().items():
        np.testing.assert_allclose(gpu.columns()[k], v, rtol=1e-12, atol=1e-12, err_msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, micro_model_dir, corpus_file):
    storage = Storage(tmp_path_factory.mktemp("cuda"))
    base = dict(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=12, max_length=32,
                batch_size=4, active_threshold=THRESHOLD, store_acts=True, quiet=True)
    for run, device, dtype in (("cpu", "cpu", "float32"), ("gpu32", "cuda", "float32"),
                               ("gpu", "cuda", "auto")):
        extract(ExtractConfig(**base, device=device, dtype=dtype, run=run), storage)
    return storage


@pytest.fixture(scope="module")
def cpu_acts(runs, micro_model_dir) -> dict[int, np.ndarray]:
    """fp32 CPU input of every mlp.c_proj over the runs' windows, hooked on a fresh HF model."""
    t = tables.read_partition(runs, "tokens", "cpu").to_pydict()
    windows = torch.tensor(t["token_id"], dtype=torch.long).reshape(12, 32)
    return mlp_inputs(micro_model_dir, windows, batch_size=4)


def _masks(storage, run):
    group = arrays.open_group(storage.arrays(run), mode="r")
    return {l: arrays.unpack_mask(group[f"active/L{l}"][:], 40) for l in range(3)}


def _acts(storage, run):
    group = arrays.open_group(storage.arrays(run), mode="r")
    return {l: group[f"acts/L{l}"][:].astype(np.float32) for l in range(3)}


def _stats(storage, run):
    return tables.read_partition(storage, "neuron_stats", run).to_pydict()


def test_float32_extraction_on_cuda_equals_cpu(runs, cpu_acts):
    cpu, gpu = _stats(runs, "cpu"), _stats(runs, "gpu32")
    assert gpu["neuron_id"] == cpu["neuron_id"] and gpu["count"] == cpu["count"]
    for name in STATS:
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=1e-4, atol=1e-4, err_msg=name)
    cpu_masks, gpu_masks, gpu_acts = _masks(runs, "cpu"), _masks(runs, "gpu32"), _acts(runs, "gpu32")
    for l, a in cpu_acts.items():
        assert np.array_equal(cpu_masks[l], a > THRESHOLD)  # the same fp32 activations: exact
        # the device mask is its own fp32 activations > threshold; fp16 storage blurs only
        # values within half an fp16 ulp of the threshold
        stored = gpu_acts[l]
        clear = np.abs(stored - THRESHOLD) > FP16_HALF_ULP * THRESHOLD
        assert np.array_equal(gpu_masks[l][clear], (stored > THRESHOLD)[clear])
        # between devices only activations within the summation-order noise (the tolerance
        # of the sums above) of the threshold may flip
        flips = gpu_masks[l] != cpu_masks[l]
        assert (np.abs(a[flips] - THRESHOLD) <= 1e-4).all(), l


def test_half_precision_masks_are_the_device_activations_above_threshold(runs):
    assert tables.read_partition(runs, "tokens", "gpu").num_rows == 12 * 32
    # the device compares its bfloat16 activations with the threshold, which the comparison
    # may round to bfloat16 first: values between the two readings of it may go either way
    rounded = float(torch.tensor(THRESHOLD, dtype=torch.bfloat16))
    lo, hi = min(THRESHOLD, rounded), max(THRESHOLD, rounded)
    masks, acts = _masks(runs, "gpu"), _acts(runs, "gpu")
    # bfloat16 -> fp16 is exact from 2^-14 to 65504; smaller values stay far below the threshold
    for l, stored in acts.items():
        flips = masks[l] != (stored > THRESHOLD)
        assert not (flips & ((stored < lo) | (stored > hi))).any(), l


def test_cuda_engine_equals_popcount_on_stored_masks(runs):
    coactivation.run(coactivation.CoactivationConfig(run="gpu32", engine="cuda", quiet=True), runs)
    masks = _masks(runs, "gpu32")
    group = arrays.open_group(runs.arrays("gpu32"), mode="r")
    for a, b in ((0, 1), (1, 2)):
        expect = coactivation.coactivation_counts(group[f"active/L{a}"][:],
                                                  group[f"active/L{b}"][:], 40, 40)
        np.testing.assert_array_equal(coact.read_counts(runs, "gpu32", a, b), expect)
        np.testing.assert_array_equal(expect, masks[a].T.astype(np.int64) @ masks[b].astype(np.int64))


def test_trace_on_cuda_matches_cpu(tmp_path, micro_model_dir):
    text = "the value of a list returns"
    got = {d: trace.run(trace.TraceConfig(model=str(micro_model_dir), text=text, run=f"t-{d}",
                                          device=d, dtype="float32"), Storage(tmp_path))
           for d in ("cpu", "cuda")}
    np.testing.assert_allclose(got["cuda"].values, got["cpu"].values, rtol=1e-4, atol=1e-5)


def test_gradients_on_cuda_match_cpu(tmp_path, micro_model_dir, corpus_file):
    res = {d: gradients.run(gradients.GradientConfig(
        model=str(micro_model_dir), corpus=str(corpus_file), num_samples=4, batch_size=4,
        max_length=12, device=d, dtype="float32", aggregation_mode="both", name=f"g-{d}",
        quiet=True), Storage(tmp_path)).layers for d in ("cpu", "cuda")}
    for layer in res["cpu"]:
        for kind in ("mean", "mean_abs"):
            np.testing.assert_allclose(res["cuda"][layer][kind], res["cpu"][layer][kind],
                                       rtol=1e-3, atol=1e-7)


def test_ablation_on_cuda_matches_cpu(runs, tmp_path, corpus_file):
    ids = np.array([3, 7, 45, 90, 119])
    np.save(tmp_path / "five.npy", ids)
    effects = {}
    for d in ("cpu", "cuda"):  # --overwrite: the device is not part of the result's key
        out = ablation.run(ablation.AblationConfig(
            run="cpu", subset_files=[str(tmp_path / "five.npy")], controls=2,
            corpus=str(corpus_file), num_samples=4, max_length=8, batch_size=2, device=d,
            dtype="float32", out_dir=str(tmp_path / d), overwrite=True, quiet=True), runs)
        assert not out.reused
        effects[d] = out.effects.filter(out.effects["kind"] == "subset").row(0, named=True)
    for key in ("delta_loss", "kl", "top1_agreement"):
        assert effects["cuda"][key] == pytest.approx(effects["cpu"][key], rel=1e-3, abs=1e-5)
