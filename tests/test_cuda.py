"""The CUDA paths of every model stage against the CPU ones, on the micro model.

Skipped where torch sees no CUDA device. In float32 the device results must equal the CPU
results up to the rounding of a different summation order; in the default half precision
(bfloat16) the stages must run and agree on all but a few near-threshold bits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core import arrays, tables
from pipeline.stages.ablation import AblationConfig, ablate
from pipeline.kernels.accumulators import NeuronMoments
from pipeline.stages.coactivation import CoactivationConfig, coactivation, coactivation_counts, read_counts
from pipeline.stages.extract import ExtractConfig, extract
from pipeline.stages.gradients import GradientConfig, gradients
from pipeline.core.storage import Storage
from pipeline.stages.trace import TraceConfig, trace

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STATS = ("sum", "sum_sq", "sum_abs", "sum_cube", "sum_quad", "min", "max")


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
                batch_size=4)
    for run, device, dtype in (("cpu", "cpu", "float32"), ("gpu32", "cuda", "float32"),
                               ("gpu", "cuda", "auto")):
        extract(ExtractConfig(**base, device=device, dtype=dtype, run=run), storage, progress=False)
    return storage


def _masks(storage, run):
    group = arrays.open_group(storage.arrays(run), mode="r")
    return {l: arrays.unpack_mask(group[f"active/L{l}"][:], 40) for l in range(3)}


def _stats(storage, run):
    return tables.read_partition(storage, "neuron_stats", run).to_pydict()


def test_float32_extraction_on_cuda_equals_cpu(runs):
    cpu, gpu = _stats(runs, "cpu"), _stats(runs, "gpu32")
    assert gpu["neuron_id"] == cpu["neuron_id"] and gpu["count"] == cpu["count"]
    for name in STATS:
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=1e-4, atol=1e-4, err_msg=name)
    for l, mask in _masks(runs, "cpu").items():
        flips = np.count_nonzero(_masks(runs, "gpu32")[l] != mask)
        assert flips <= 0.001 * mask.size  # only activations within rounding of the threshold


def test_half_precision_extraction_on_cuda_runs(runs):
    assert tables.read_partition(runs, "tokens", "gpu").num_rows == 12 * 32
    for l, mask in _masks(runs, "cpu").items():
        assert np.mean(_masks(runs, "gpu")[l] != mask) < 0.05


def test_cuda_engine_equals_popcount_on_stored_masks(runs):
    coactivation(CoactivationConfig(run="gpu32", engine="cuda"), runs, progress=False)
    masks = _masks(runs, "gpu32")
    group = arrays.open_group(runs.arrays("gpu32"), mode="r")
    for a, b in ((0, 1), (1, 2)):
        expect = coactivation_counts(group[f"active/L{a}"][:], group[f"active/L{b}"][:], 40, 40)
        np.testing.assert_array_equal(read_counts(runs, "gpu32", a, b), expect)
        np.testing.assert_array_equal(expect, masks[a].T.astype(np.int64) @ masks[b].astype(np.int64))


def test_trace_on_cuda_matches_cpu(tmp_path, micro_model_dir):
    text = "the value of a list returns"
    got = {d: trace(TraceConfig(model=str(micro_model_dir), text=text, run=f"t-{d}", device=d,
                                dtype="float32"), Storage(tmp_path)) for d in ("cpu", "cuda")}
    np.testing.assert_allclose(got["cuda"].values, got["cpu"].values, rtol=1e-4, atol=1e-5)


def test_gradients_on_cuda_match_cpu(tmp_path, micro_model_dir, corpus_file):
    res = {d: gradients(GradientConfig(model=str(micro_model_dir), corpus=str(corpus_file),
                                       num_samples=4, batch_size=4, max_length=12, device=d,
                                       dtype="float32", aggregation_mode="both", name=f"g-{d}"),
                        Storage(tmp_path), progress=False) for d in ("cpu", "cuda")}
    for layer in res["cpu"]:
        for kind in ("mean", "mean_abs"):
            np.testing.assert_allclose(res["cuda"][layer][kind], res["cpu"][layer][kind],
                                       rtol=1e-3, atol=1e-7)


def test_ablation_on_cuda_matches_cpu(runs, tmp_path, corpus_file):
    ids = np.array([3, 7, 45, 90, 119])
    np.save(tmp_path / "five.npy", ids)
    effects = {}
    for d in ("cpu", "cuda"):
        out = ablate(AblationConfig(run="cpu", subset_files=[str(tmp_path / "five.npy")], controls=2,
                                    corpus=str(corpus_file), num_samples=4, max_length=8,
                                    batch_size=2, device=d, dtype="float32",
                                    out_dir=str(tmp_path / d)), runs, progress=False)
        effects[d] = out["ablation_effects"].filter(
            out["ablation_effects"]["kind"] == "subset").row(0, named=True)
    for key in ("delta_loss", "kl", "top1_agreement"):
        assert effects["cuda"][key] == pytest.approx(effects["cpu"][key], rel=1e-3, abs=1e-5)
