"""Co-activation, gradients and universal as Ray tasks (and gradients as --shard i/n processes)
against the single-process stage and against truths computed here: a dense integer product
of the stored masks, and autograd through the output bias. One test kills a worker mid-task
and checks that Ray's retry gives the single-process result.

One local cluster (2 CPUs) serves the whole module."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import zarr
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.cli import main
from pipeline.core import cluster, tables
from pipeline.core.errors import UserError
from pipeline.core.inputs import iter_documents, iter_windows
from pipeline.core.storage import Storage
from pipeline.models.micro import save_random_gpt2
from pipeline.stages import coactivation, gradients, universal

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")

WIDTH = 40  # neurons per layer of the micro model
# n shards add the same per-batch float64 sums in another grouping: the difference is rounding
# of at most a few ulps of the summed |terms| (mean_abs), far below this bound
SHARD_TOLERANCE = 1e-12


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    if ray.is_initialized():  # another module's cluster: start ours with 2 CPUs
        ray.shutdown()
    cluster.connect(cluster.LOCAL, num_cpus=2)
    yield
    ray.shutdown()


# -- co-activation: one task per layer pair


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, micro_model_dir, corpus_file) -> Path:
    root = tmp_path_factory.mktemp("ray-coact") / "storage"
    assert main(["extract", "--storage", str(root), "--model", str(micro_model_dir), "--corpus",
                 str(corpus_file), "--num-samples", "16", "--max-length", "32", "--run", "r",
                 "--device", "cpu", "--quiet", "--exclude", "bos,newline"]) == 0
    return root


def dense_counts(root: Path, a: int, b: int) -> np.ndarray:
    """B_a^T B_b over the included rows, unpacked and multiplied as integers."""
    group = zarr.open_group(str(Storage(root).arrays("r")), mode="r")
    keep = group["included"][:, 0].astype(bool) if "included" in group else slice(None)
    ma, mb = (np.unpackbits(group[f"active/L{l}"][:], axis=1, count=WIDTH,
                            bitorder="little")[keep].astype(np.int64) for l in (a, b))
    return ma.T @ mb


def copy_of(root: Path, tmp_path: Path) -> Storage:
    shutil.copytree(root, tmp_path / "storage")
    return Storage(tmp_path / "storage")


def test_coactivation_on_ray_equals_one_process_and_dense_product(extracted, tmp_path):
    here = copy_of(extracted, tmp_path / "here")
    there = copy_of(extracted, tmp_path / "there")
    pairs = "0:1,1:2,0:2"
    coactivation.run(coactivation.CoactivationConfig(
        run="r", pairs=pairs, quiet=True, engine="popcount", chunk_tokens=100), here)
    remote = coactivation.run(coactivation.CoactivationConfig(
        run="r", pairs=pairs, quiet=True, ray="local", chunk_tokens=100), there)
    assert remote.counted == [(0, 1), (1, 2), (0, 2)] and remote.skipped == []
    for a, b in remote.counted:
        got = zarr.open_group(str(there.arrays("r")), mode="r")[f"coact/L{a}_L{b}"][:]
        np.testing.assert_array_equal(got, dense_counts(extracted, a, b))
        np.testing.assert_array_equal(
            got, zarr.open_group(str(here.arrays("r")), mode="r")[f"coact/L{a}_L{b}"][:])
    # the driver wrote the pairs table once all tasks were done: the same rows as one process
    cols = ["layer_a", "layer_b", "tokens", "max_count", "nonzero", "total"]
    table = pl.from_arrow(tables.read_partition(there, "coactivation_pairs", "r"))
    assert table.select(cols).sort(cols[:2]).equals(pl.from_arrow(
        tables.read_partition(here, "coactivation_pairs", "r")).select(cols).sort(cols[:2]))
    assert table.height == 3


def test_coactivation_on_ray_counts_only_unfinished_pairs(extracted, tmp_path):
    storage = copy_of(extracted, tmp_path)
    config = coactivation.CoactivationConfig(run="r", pairs="0:1,1:2", quiet=True, ray="local")
    coactivation.run(config, storage)
    group = zarr.open_group(str(storage.arrays("r")))
    group["coact/L1_L2"].attrs["complete"] = False  # as an interrupted count leaves it
    group["coact/L1_L2"][:] = -1
    again = coactivation.run(config, storage)
    assert again.counted == [(1, 2)] and again.skipped == [(0, 1)]
    np.testing.assert_array_equal(group["coact/L1_L2"][:], dense_counts(extracted, 1, 2))


def test_task_user_error_is_one_line(extracted, tmp_path):
    storage = copy_of(extracted, tmp_path)
    if torch.cuda.is_available():
        pytest.skip("the cuda engine works here")
    with pytest.raises(UserError) as e:
        coactivation.run(coactivation.CoactivationConfig(
            run="r", pairs="0:1", quiet=True, ray="local", engine="cuda"), storage)
    assert "\n" not in str(e.value) and "needs a CUDA device" in str(e.value)


# -- gradients: shards of windows


def gradient_config(model_dir, corpus, **kw) -> gradients.GradientConfig:
    values = dict(model=str(model_dir), corpus=str(corpus), device="cpu", num_samples=14,
                  batch_size=2, max_length=12, quiet=True, aggregation_mode="both", name="g")
    return gradients.GradientConfig(**{**values, **kw})


@pytest.fixture(scope="module")
def unsharded(micro_model_dir, corpus_file, tmp_path_factory):
    storage = Storage(tmp_path_factory.mktemp("grad-one"))
    return gradients.run(gradient_config(micro_model_dir, corpus_file), storage)


def assert_same_gradients(got, want) -> None:
    assert list(got.layers) == list(want.layers)
    for l in want.layers:
        scale = np.abs(want.layers[l]["mean_abs"]).max()
        for mode in ("mean", "mean_abs"):
            np.testing.assert_allclose(got.layers[l][mode], want.layers[l][mode], rtol=0,
                                       atol=SHARD_TOLERANCE * scale)


def test_bias_route_truth_of_the_unsharded_run(unsharded, micro_model_dir, corpus_file):
    """sum_t dL/da[t, n] = W_out[n] . dL/d(c_proj bias), by autograd without any hook: the
    single-process result that the shards are compared with is itself right."""
    tok = AutoTokenizer.from_pretrained(micro_model_dir)
    ids = torch.tensor(list(iter_windows(iter_documents(str(corpus_file)), tok, max_length=12,
                                         num_samples=14)))
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    logits = model(ids).logits[:, :-1].double()
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      ids[:, 1:].reshape(-1), reduction="sum").backward()
    for layer in range(3):
        c_proj = model.transformer.h[layer].mlp.c_proj
        expect = (c_proj.weight.detach().double() @ c_proj.bias.grad.double()) / ids[:, :-1].numel()
        np.testing.assert_allclose(unsharded.layers[layer]["mean"], expect.numpy(), rtol=1e-4,
                                   atol=1e-8)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_shards_equal_one_process(count, unsharded, micro_model_dir, corpus_file, tmp_path):
    storage = Storage(tmp_path)
    # 7 batches of 2 windows: shards of 7, 4+3 and 2+3+2 batches; the last one run writes it
    for index in [*range(1, count), 0]:
        res = gradients.run(gradient_config(micro_model_dir, corpus_file,
                                            shard=f"{index}/{count}"), storage)
        if index:
            assert res.layers == {} and index not in res.waiting and 0 in res.waiting
            assert "the last shard to finish writes the result" in gradients.show(res)
    assert res.waiting == [] and not res.reused
    assert_same_gradients(res, unsharded)
    whole = gradient_config(micro_model_dir, corpus_file)
    marker = storage.marker("g", "gradients").done(gradients.result_key(whole))
    assert marker["positions"] == 14 * 11 and marker["shards"] == count
    # the table and the saved arrays are the result's, and the shards' sums are cleared away
    frame = pl.from_arrow(tables.read_partition(storage, "neuron_gradients", "g"))
    assert frame.height == 3 * WIDTH
    assert not (storage.run_dir("g") / "shards").exists()
    saved = gradients.load_gradient_results(storage.reports("g"))
    assert np.array_equal(saved["arrays"]["layer_2_mean"], res.layers[2]["mean"])
    # finished: a shard asked again reads the stored result, and so does the unsharded run
    again = gradients.run(gradient_config(micro_model_dir, corpus_file, shard="0/2"), storage)
    assert again.reused and gradients.run(whole, storage).reused


def test_more_shards_than_batches(micro_model_dir, corpus_file, tmp_path):
    """4 windows in 2 batches over 3 shards: one shard is empty and adds nothing."""
    want = gradients.run(gradient_config(micro_model_dir, corpus_file, num_samples=4, name="e"),
                         Storage(tmp_path / "one"))
    storage = Storage(tmp_path / "shards")
    for index in (0, 1, 2):
        got = gradients.run(gradient_config(micro_model_dir, corpus_file, num_samples=4,
                                            name="e", shard=f"{index}/3"), storage)
    assert_same_gradients(got, want)


def test_saved_shard_is_not_recomputed(micro_model_dir, corpus_file, tmp_path, monkeypatch):
    storage = Storage(tmp_path)
    first = gradients.run(gradient_config(micro_model_dir, corpus_file, shard="1/2"), storage)
    assert first.waiting == [0]
    calls = []
    real = gradients.compute_sums
    monkeypatch.setattr(gradients, "compute_sums",
                        lambda config, storage, shard=None: calls.append(str(shard)) or
                        real(config, storage, shard))
    assert gradients.run(gradient_config(micro_model_dir, corpus_file, shard="1/2"),
                         storage).waiting == [0]
    assert calls == []  # its sums are saved: not redone
    done = gradients.run(gradient_config(micro_model_dir, corpus_file, shard="0/2"), storage)
    assert calls == ["0/2"] and done.waiting == [] and len(done.layers) == 3


def test_gradients_on_ray_equal_one_process_and_skip_saved_shards(unsharded, micro_model_dir,
                                                                  corpus_file, tmp_path):
    storage = Storage(tmp_path)
    # shard 1 of 3 ran earlier as its own process: the Ray run computes only shards 0 and 2
    early = gradients.run(gradient_config(micro_model_dir, corpus_file, shard="1/3"), storage)
    assert early.waiting == [0, 2]
    saved = next((storage.run_dir("g") / "shards").rglob("shard-1-of-3.npz"))
    before = gradients.load_shard(saved).meta["timings"]
    res = gradients.run(gradient_config(micro_model_dir, corpus_file, ray="local", shards=3),
                        storage)
    assert_same_gradients(res, unsharded)
    marker = storage.marker("g", "gradients").done(gradients.result_key(
        gradient_config(micro_model_dir, corpus_file)))
    assert marker["shards"] == 3 and marker["timings"]["shards"][1] == before


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def kill_mid_task(title: bytes, uncommitted, killed: list, seconds: float = 120.0) -> None:
    """SIGKILL the first worker of this process's cluster (a child of the raylet this process
    started) whose title is `title` (Ray names a worker after the task it runs), at a moment
    when `uncommitted()` holds: its task has not committed yet."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and not killed:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if not f.read().startswith(title):
                        continue
                ours = parent_pid(parent_pid(int(entry.name))) == os.getpid()
            except (OSError, ValueError, IndexError):
                continue
            if ours and uncommitted():
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
                return
        time.sleep(0.01)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_killed_worker_is_retried_and_equals_one_process(micro_model_dir, corpus_file,
                                                         tmp_path):
    # shards long enough (~0.3 s of gradients each) to be killed in the middle
    config = gradient_config(micro_model_dir, corpus_file, num_samples=96, name="k")
    want = gradients.run(config, Storage(tmp_path / "one"))
    storage = Storage(tmp_path / "ray")
    shards = storage.run_dir("k") / "shards"
    killed: list[int] = []
    # no shard has saved its sums when the kill comes: the killed one must be run again
    watcher = threading.Thread(target=kill_mid_task, daemon=True, args=(
        b"ray::gradient_shard_task", lambda: not list(shards.rglob("*.npz")), killed))
    watcher.start()
    got = gradients.run(gradient_config(micro_model_dir, corpus_file, num_samples=96, name="k",
                                        ray="local", shards=2), storage)
    watcher.join(timeout=1)
    assert killed, "no task was seen running before a shard committed"
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)
    assert_same_gradients(got, want)


def test_shard_options_are_checked(micro_model_dir, corpus_file):
    for kw, needle in ((dict(shard="2/2"), "0..n-1"), (dict(shard="x"), "is not i/n"),
                       (dict(shards=2), "needs --ray"),
                       (dict(shard="0/2", ray="local"), "--shard and --ray")):
        with pytest.raises(UserError, match=needle):
            gradient_config(micro_model_dir, corpus_file, **kw)


def test_cli_ray_option_takes_an_optional_address():
    """--ray alone is a local cluster; --ray ADDRESS joins one; absent, no Ray at all."""
    from pipeline.cli import build_parser

    base = ["--model", "m", "--quiet"]
    for extra, want in (([], None), (["--ray"], "local"), (["--ray", "auto"], "auto"),
                        (["--ray", "--shards", "3"], "local")):
        args = build_parser().parse_args(["gradients", *base, *extra])
        assert args.ray == want
    args = build_parser().parse_args(["coactivation", "--run", "r", "--ray", "10.0.0.1:6379"])
    assert args.ray == "10.0.0.1:6379"
    args = build_parser().parse_args(["universal", "--models", "a", "b", "--ray"])
    assert args.ray == "local"


# -- universal: the cache per model and the passes as tasks


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-uni")
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        save_random_gpt2(root / name, seed=seed)
    return root


def universal_config(root, corpus, **kw) -> universal.UniversalConfig:
    values = dict(models=[str(root / m) for m in "abc"], corpus=str(corpus), device="cpu",
                  num_samples=12, max_length=16, quiet=True, baseline_batch=4, name="u",
                  cache="float32")
    return universal.UniversalConfig(**{**values, **kw})


def assert_same_universal(got, want) -> None:
    # float32 products of other thread counts (a task has one CPU): equal to rounding
    cols = ["neuron_id", "model_b", "argmax_layer", "argmax_neuron"]
    assert got.summary.select(cols).equals(want.summary.select(cols))
    for c in ("max_corr", "baseline_max"):
        np.testing.assert_allclose(got.summary[c].to_numpy(), want.summary[c].to_numpy(),
                                   rtol=0, atol=1e-6)
    assert got.neurons["universal"].to_list() == want.neurons["universal"].to_list()
    for c in ("act_mean", "act_var", "sparsity"):
        np.testing.assert_allclose(got.properties[c].to_numpy(), want.properties[c].to_numpy(),
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cache,slots", [("float32", 5), ("none", 2)])
def test_universal_on_ray_equals_one_process(seeds, corpus_file, tmp_path, monkeypatch,
                                             cache, slots):
    want = universal.run(universal_config(seeds, corpus_file, cache=cache), Storage(tmp_path / "1"))
    # a cluster that runs `slots` tasks at once: with a cache the passes split to fill it
    monkeypatch.setattr(cluster, "slots", lambda ray, device: slots)
    storage = Storage(tmp_path / "ray")
    got = universal.run(universal_config(seeds, corpus_file, cache=cache, ray="local"), storage)
    assert want.info["passes"] == 2  # one per other model
    assert got.info["passes"] >= 5 if cache == "float32" else got.info["passes"] == 2
    assert_same_universal(got, want)
    group = zarr.open_group(str(storage.arrays("u")), mode="r")
    assert "cache" not in group  # spent
    one = zarr.open_group(str(Storage(tmp_path / "1").arrays("u")), mode="r")
    np.testing.assert_allclose(group["corr/m1/L0_L2"][:], one["corr/m1/L0_L2"][:], atol=1e-6)


def test_ray_plans_split_only_with_a_cache(seeds, corpus_file):
    info = [{"index": i, "widths": [WIDTH] * 3} for i in range(3)]
    one = universal.plans_of(universal_config(seeds, corpus_file), info, 100)
    assert [len(p) for p in one.values()] == [1, 1]
    split = universal.ray_plans(universal_config(seeds, corpus_file), info, 100, slots=7)
    assert sum(len(p) for p in split.values()) >= 7
    for m in (1, 2):  # the same pairs in the same order, only cut into more passes
        assert [pair for p in split[m] for pair in p] == one[m][0]
    assert universal.ray_plans(universal_config(seeds, corpus_file, cache="none"), info, 100,
                               slots=7) == one
    many = universal.ray_plans(universal_config(seeds, corpus_file), info, 100, slots=100)
    assert all(len(p) == 1 for plan in many.values() for p in plan)  # one pair each at most
