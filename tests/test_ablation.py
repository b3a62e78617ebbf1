"""Ablation: hooks edit exactly the chosen neurons, `none` replays extraction, effects match torch.

References are computed another way: neuron values read back through forward pre-hooks
registered directly with torch; zero ablation replayed by zeroing rows of a copy of W_out (a
neuron at zero contributes nothing), mean ablation by zeroing the row and adding mean * row
to the bias; means read from the neuron_stats Parquet with pyarrow; summary statistics with
NumPy over the effects table.
"""

from __future__ import annotations

import copy
import csv
import json
from contextlib import contextmanager

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import tables
from pipeline.ablation import (
    AblationConfig,
    ablate,
    ablation_context,
    control_subsets,
    neuron_locations,
    neuron_means,
)
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.extract import ExtractConfig, extract
from pipeline.inputs import iter_documents, iter_windows
from pipeline.models import load_model
from pipeline.storage import Storage

PROMPTS = 'prompts,number_of_new_tokens,num_samples\n"the value of",6,2\n"raise error",5,1\n'
D = 40  # neurons per layer of the micro model


@pytest.fixture(scope="module")
def run(tmp_path_factory, micro_model_dir):
    storage = Storage(tmp_path_factory.mktemp("abl"))
    prompts = storage.root / "p.csv"
    prompts.write_text(PROMPTS)
    extract(ExtractConfig(model=str(micro_model_dir), prompts=str(prompts), seed=3,
                          temperature=0.9, top_k=30, run="a"), storage, progress=False)
    return storage, prompts


@pytest.fixture(scope="module")
def loaded(run, micro_model_dir):
    return load_model(str(micro_model_dir), storage=run[0], device="cpu")


@contextmanager
def _read_sites(model, layers):
    """Forward pre-hooks registered directly with torch on each c_proj: the input it gets.

    Registered last, they run after any ablation hook, so they see what c_proj computes with.
    """
    seen, handles = {}, []
    for l in layers:
        def hook(module, args, l=l):
            seen[l] = args[0].detach().clone()
        handles.append(model.transformer.h[l].mlp.c_proj.register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _ids(seq_len=12):
    return torch.tensor([[(7 * i + 3 * j) % 200 for i in range(seq_len)] for j in range(2)])


def test_zero_ablation_zeroes_those_neurons_and_nothing_else(loaded):
    model, ids = loaded.model, _ids()
    with torch.no_grad():
        with _read_sites(model, [0, 1, 2]) as base:
            base_logits = model(ids).logits
        with ablation_context(loaded.sites, {1: np.array([2, 9, 33])}), \
                _read_sites(model, [0, 1, 2]) as ablated:
            model(ids)
        with ablation_context(loaded.sites, {0: np.array([0]), 2: np.array([5, 39])}), \
                _read_sites(model, [0, 1, 2]) as two:
            model(ids)
        after = model(ids).logits
    assert torch.equal(ablated[0], base[0])  # upstream of the edit: untouched
    keep = np.setdiff1d(np.arange(D), [2, 9, 33])
    assert torch.equal(ablated[1][..., keep], base[1][..., keep])  # the rest: bit-identical
    assert (ablated[1][..., [2, 9, 33]] == 0).all() and (base[1][..., [2, 9, 33]] != 0).any()
    assert (two[0][..., 0] == 0).all() and (two[2][..., [5, 39]] == 0).all()
    assert torch.equal(two[0][..., 1:], base[0][..., 1:])
    assert (two[2][..., :5] != 0).any()
    # the context removed its hooks: the model is the unablated one again, bit for bit
    assert torch.equal(after, base_logits)
    assert all(not s.module._forward_pre_hooks for s in loaded.sites)


def test_mean_ablation_sets_the_run_means(run, loaded):
    storage, _ = run
    part = pq.read_table(next(storage.table_partition("neuron_stats", "a").glob("*.parquet")))
    stats = part.to_pydict()
    expect = {(l, n): s / c for l, n, s, c in zip(stats["layer"], stats["neuron"], stats["sum"],
                                                   stats["count"])}
    means = neuron_means(storage, "a")
    for (l, n), m in expect.items():
        assert means[l][n] == pytest.approx(m, rel=1e-12)
    chosen = {0: np.array([4, 17]), 2: np.array([0, 21, 38])}
    with torch.no_grad(), ablation_context(loaded.sites, chosen, means), \
            _read_sites(loaded.model, [0, 2]) as seen:
        loaded.model(_ids())
    for l, idx in chosen.items():
        for n in idx.tolist():
            assert (seen[l][..., n] == torch.tensor(expect[(l, n)], dtype=torch.float32)).all()


def test_controls_keep_per_layer_counts_and_draw_from_the_whole_layer():
    loc = neuron_locations(np.array([3, 7, 45, 90, 119, 80, 7]), [0, 40, 80], [40, 40, 40])
    assert {l: v.tolist() for l, v in loc.items()} == {0: [3, 7], 1: [5], 2: [0, 10, 39]}
    controls = control_subsets(loc, [40, 40, 40], 300, seed=1)
    seen = {0: set(), 1: set(), 2: set()}
    for c in controls:
        assert sorted(c) == [0, 1, 2]
        assert {l: len(v) for l, v in c.items()} == {0: 2, 1: 1, 2: 3}
        for l, v in c.items():
            assert len(set(v.tolist())) == len(v) and 0 <= v.min() and v.max() < 40
            seen[l] |= set(v.tolist())
    # every neuron of a touched layer can be drawn, the subset's own included
    assert all(s == set(range(40)) for s in seen.values())
    # control c depends on (seed, c) and the counts only
    again = control_subsets({2: np.array([1, 2, 3]), 0: np.array([8, 9]), 1: np.array([0])},
                            [40, 40, 40], 3, seed=1)
    assert all(np.array_equal(a[l], b[l]) for a, b in zip(again, controls) for l in a)
    other = control_subsets(loc, [40, 40, 40], 3, seed=2)
    assert any(not np.array_equal(a[2], b[2]) for a, b in zip(other, controls))


def test_none_reproduces_the_extraction_text(run):
    storage, prompts = run
    out = ablate(AblationConfig(run="a", subsets=["none"]), storage, progress=False)  # the run's sampling
    gen = out["ablation_generations"]
    tokens = tables.read_partition(storage, "tokens", "a").to_pydict()
    assert gen.height == 3 and set(gen["subset"]) == {"none"}
    for row in gen.iter_rows(named=True):
        expect = [t for t, p, s in zip(tokens["token_id"], tokens["prompt"], tokens["prompt_sample"])
                  if p == row["prompt"] and s == row["sample_index"]]
        assert row["token_ids"] == expect
        assert (row["seed"], row["temperature"], row["top_k"]) == (3, 0.9, 30)
    with open(storage.reports("a") / "ablation" / "zero" / "none.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["prompt", "sample_index", "generated_text", "perturbation_subset"]
    assert [r[0] for r in rows[1:]] == ["the value of"] * 2 + ["raise error"]
    assert [r[3] for r in rows[1:]] == ["none"] * 3
    assert [r[2] for r in rows[1:]] == gen["generated_text"].to_list()
    # the same seed given explicitly reproduces it too; another seed samples other text
    same = ablate(AblationConfig(run="a", prompts=str(prompts), seed=3, temperature=0.9, top_k=30),
                  storage, progress=False)["ablation_generations"]
    assert same["token_ids"].to_list() == gen["token_ids"].to_list()


def _w_out_copy(model, ids, means=None):
    """The model with neurons `ids` ablated by editing a copy of W_out (and the bias, for means)."""
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for gid in ids:
            proj = edited.transformer.h[gid // D].mlp.c_proj  # Conv1D: weight [d_mlp, d_model]
            if means is not None:
                proj.bias += means[gid // D][gid % D] * proj.weight[gid % D]
            proj.weight[gid % D] = 0
    return edited


def _effects(model, edited, windows):
    with torch.no_grad():
        base = torch.log_softmax(model(windows).logits[:, :-1].double(), -1)
        abl = torch.log_softmax(edited(windows).logits[:, :-1].double(), -1)
    t = windows[:, 1:, None]
    return {"delta_loss": float((-abl.gather(-1, t)).mean() - (-base.gather(-1, t)).mean()),
            "kl": float((base.exp() * (base - abl)).sum(-1).mean()),
            "top1_agreement": float((abl.argmax(-1) == base.argmax(-1)).double().mean()),
            "baseline_loss": float((-base.gather(-1, t)).mean())}


def test_effects_match_plain_torch(run, micro_model_dir, corpus_file, tmp_path):
    storage, _ = run
    ids = np.array([3, 7, 45, 90, 119, 100, 101, 102])
    np.save(tmp_path / "gpt2_degree_t0.5_r0.05.npy", ids)
    out = ablate(AblationConfig(run="a", subset_files=[str(tmp_path / "gpt2_degree_t0.5_r0.05.npy")],
                                ablation=["zero", "mean"], controls=3, control_seed=5,
                                corpus=str(corpus_file), num_samples=5, max_length=9, batch_size=2),
                 storage, progress=False)
    effects = out["ablation_effects"]
    assert effects.height == 2 * (1 + 3)
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(micro_model_dir)
    windows = torch.tensor(list(iter_windows(iter_documents(str(corpus_file)), tok, max_length=9,
                                             num_samples=5)))
    assert windows.shape == (5, 9)
    means = neuron_means(storage, "a")
    loc = neuron_locations(ids, [0, D, 2 * D], [D] * 3)
    controls = control_subsets(loc, [D] * 3, 3, seed=5)
    for ablation in ("zero", "mean"):
        for c, chosen in [(-1, ids)] + [(i, np.concatenate([l * D + v for l, v in ctrl.items()]))
                                        for i, ctrl in enumerate(controls)]:
            row = effects.filter((effects["ablation"] == ablation)
                                 & (effects["control_index"] == c)).row(0, named=True)
            ref = _effects(model, _w_out_copy(model, chosen.tolist(),
                                              means if ablation == "mean" else None), windows)
            assert row["size"] == 8 and row["layer_counts"] == "0:2,1:1,2:5"
            assert row["kind"] == ("subset" if c < 0 else "control")
            assert row["tokens"] == 5 * 8
            assert row["baseline_loss"] == pytest.approx(ref["baseline_loss"], rel=1e-5)
            assert row["delta_loss"] == pytest.approx(ref["delta_loss"], abs=2e-5)
            assert row["kl"] == pytest.approx(ref["kl"], rel=1e-3, abs=1e-6)
            assert row["top1_agreement"] == pytest.approx(ref["top1_agreement"])
    subset = effects.filter(effects["kind"] == "subset").row(0, named=True)
    assert (subset["method"], subset["threshold"], subset["ratio"]) == ("degree", 0.5, 0.05)
    assert subset["kl"] > 0

    # the summary against NumPy over the effects rows
    summary = out["ablation_summary"]
    assert summary.height == 2 * 3
    for row in summary.iter_rows(named=True):
        sel = effects.filter(effects["ablation"] == row["ablation"])
        value = sel.filter(sel["kind"] == "subset")[row["metric"]][0]
        ctrl = sel.filter(sel["kind"] == "control")[row["metric"]].to_numpy()
        sign = -1 if row["metric"] == "top1_agreement" else 1
        assert row["value"] == value and row["controls"] == 3
        assert row["control_mean"] == pytest.approx(np.mean(ctrl))
        assert row["control_std"] == pytest.approx(np.std(ctrl, ddof=1))
        assert row["rank"] == 1 + sum(sign * x > sign * value for x in ctrl)
        assert row["p_value"] == pytest.approx((1 + sum(sign * x >= sign * value for x in ctrl)) / 4)

    # warehouse tables, reference CSVs, plots, resolved config
    stored = tables.read_partition(storage, "ablation_effects", "a")
    assert stored.num_rows >= 8 and "gpt2_degree_t0.5_r0.05" in stored["subset"].to_pylist()
    assert tables.read_partition(storage, "ablation_summary", "a").num_rows >= 6
    for ablation in ("zero", "mean"):
        assert (storage.reports("a") / f"ablation_{ablation}.png").stat().st_size > 1000
        with open(storage.reports("a") / "ablation" / ablation / "gpt2_degree_t0.5_r0.05.csv") as f:
            rows = list(csv.reader(f))
        assert len(rows) == 4 and {r[3] for r in rows[1:]} == {"gpt2_degree_t0.5_r0.05.npy"}
    saved = json.loads((storage.reports("a") / "ablation" / "ablation.json").read_text())
    assert saved["config"]["seed"] == 3 and saved["config"]["ablation"] == ["zero", "mean"]


def test_subsets_by_name_from_the_table_and_npy(run, corpus_file):
    storage, _ = run
    tables.write_part(storage, "subsets", "a", {
        "subset": ["pagerank_t0.2_r0.02"] * 2, "method": ["pagerank"] * 2,
        "weight": ["normalized"] * 2, "threshold": [0.2] * 2, "ratio": [0.02] * 2,
        "neuron_id": [41, 12], "layer": [1, 0], "neuron": [1, 12], "score": [0.5, 0.4],
        "rank": [1, 2]}, part="pagerank_t0.2_r0.02")
    (storage.run_dir("a") / "subsets").mkdir(exist_ok=True)
    np.save(storage.run_dir("a") / "subsets" / "mine.npy", np.array([80, 81]))
    out = ablate(AblationConfig(run="a", subsets=["pagerank_t0.2_r0.02", "mine"], controls=1,
                                corpus=str(corpus_file), num_samples=2, max_length=6),
                 storage, progress=False)
    sub = out["ablation_effects"].filter(out["ablation_effects"]["kind"] == "subset")
    assert sub["subset"].to_list() == ["pagerank_t0.2_r0.02", "mine"]
    assert sub["method"].to_list() == ["pagerank", "file"]
    assert sub["layer_counts"].to_list() == ["0:1,1:1", "2:2"]
    gen = out["ablation_generations"]
    assert gen.filter(gen["subset"] == "mine")["ablation"].unique().to_list() == ["zero"]


def test_bad_subsets(run, tmp_path):
    storage, _ = run

    def fails(match, **kw):
        with pytest.raises(UserError, match=match) as e:
            ablate(AblationConfig(run="a", num_samples=2, max_length=6, **kw), storage,
                   progress=False)
        assert "\n" not in str(e.value)

    np.save(tmp_path / "big.npy", np.array([5, 120]))
    fails("names neuron ids \\[120\\] that the model does not have", subset_files=[str(tmp_path / "big.npy")])
    np.save(tmp_path / "neg.npy", np.array([-1]))
    fails("does not have", subset_files=[str(tmp_path / "neg.npy")])
    np.save(tmp_path / "frac.npy", np.array([1.5]))
    fails("not integer neuron ids", subset_files=[str(tmp_path / "frac.npy")])
    np.save(tmp_path / "empty.npy", np.array([], dtype=np.int64))
    fails("is empty", subset_files=[str(tmp_path / "empty.npy")])
    (tmp_path / "text.npy").write_text("1,2,3")
    fails("not a NumPy", subset_files=[str(tmp_path / "text.npy")])
    np.save(tmp_path / "none.npy", np.array([1]))
    fails("baseline's name", subset_files=[str(tmp_path / "none.npy")])
    fails("does not exist", subset_files=[str(tmp_path / "missing.npy")])
    fails("has no subset 'nope'", subsets=["nope"])
    with pytest.raises(UserError, match="nothing to ablate"):
        _no_prompts_run(storage)
    for kw in ({"ablation": ["half"]}, {"controls": -1}, {"max_length": 1}, {"batch_size": 0},
               {"temperature": -1.0}, {"revision": "step1"}, {"run": "../x"}):
        with pytest.raises(UserError):
            AblationConfig(**{"run": "a", **kw})


def _no_prompts_run(storage):
    """A corpus run has no prompts of its own: with no subsets there is nothing to do."""
    import shutil

    other = Storage(storage.root.parent / (storage.root.name + "-c"))
    shutil.copytree(storage.run_dir("a"), other.run_dir("c"))
    manifest = json.loads(other.run_manifest("c").read_text())
    manifest["run_id"], manifest["config"]["prompts"] = "c", None
    other.run_manifest("c").write_text(json.dumps(manifest))
    ablate(AblationConfig(run="c"), other, progress=False)


def test_mean_ablation_needs_recorded_layers(micro_model_dir, corpus_file, storage, tmp_path):
    extract(ExtractConfig(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=2,
                          max_length=8, layers="0,1", run="l01"), storage, progress=False)
    np.save(tmp_path / "s.npy", np.array([1, 85]))
    with pytest.raises(UserError, match="layers \\[2\\]"):
        ablate(AblationConfig(run="l01", subset_files=[str(tmp_path / "s.npy")], ablation=["mean"],
                              corpus=str(corpus_file), num_samples=2, max_length=6),
               storage, progress=False)


def test_unavailable_model_is_one_line_exit_2(run, tmp_path, capsys):
    storage, _ = run
    other = Storage(tmp_path / "st")
    for name in ("zoo-s0", str(tmp_path / "deleted-model")):
        manifest = json.loads(storage.run_manifest("a").read_text())
        manifest["model"].update(name=name, source="zoo", path=None)
        other.run_dir("a").mkdir(parents=True, exist_ok=True)
        other.run_manifest("a").write_text(json.dumps(manifest))
        code = main(["ablate", "--storage", str(other.root), "--run", "a", "--subsets", "none",
                     "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: run 'a': its model is not available")
        assert "\n" not in err
        assert not (other.root / "tables").exists() and not (other.root / "reports").exists()
    assert main(["ablate", "--storage", str(other.root), "--run", "zz", "--subsets", "x"]) == 2
