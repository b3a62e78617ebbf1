"""Ablation: reproduces the baseline, controls keep per-layer sizes, effects match plain torch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.core import tables
from pipeline.stages.ablation import AblationConfig, ablate, control_subsets, neuron_locations
from pipeline.core.errors import UserError
from pipeline.stages.extract import ExtractConfig, extract
from pipeline.core.inputs import iter_windows
from pipeline.core.storage import Storage

PROMPTS = 'prompts,number_of_new_tokens,num_samples\n"the value of",6,2\n"raise error",5,1\n'


@pytest.fixture(scope="module")
def run(tmp_path_factory, micro_model_dir):
    storage = Storage(tmp_path_factory.mktemp("abl"))
    csv = storage.root / "p.csv"
    csv.write_text(PROMPTS)
    extract(ExtractConfig(model=str(micro_model_dir), prompts=str(csv), seed=3, temperature=0.9,
                          top_k=30, run="a"), storage, progress=False)
    return storage, csv


def test_none_reproduces_extraction_text(run):
    storage, csv = run
    out = ablate(AblationConfig(run="a", prompts=str(csv), seed=3, temperature=0.9, top_k=30),
                 storage, progress=False)
    gen = out["ablation_generations"]
    tokens = tables.read_partition(storage, "tokens", "a").to_pydict()
    for row in gen.iter_rows(named=True):
        expect = [t for t, p, s in zip(tokens["token_id"], tokens["prompt"], tokens["prompt_sample"])
                  if p == row["prompt"] and s == row["sample_index"]]
        assert row["token_ids"] == expect
    header = (storage.reports("a") / "ablation" / "none_generations.csv").read_text().splitlines()[0]
    assert header == "prompt,sample_index,generated_text,perturbation_subset"


def test_zero_ablation_effects_match_w_out_rows_zeroed(run, micro_model_dir, corpus_file, tmp_path):
    storage, _ = run
    ids = np.array([3, 7, 45, 90, 119])
    np.save(tmp_path / "five.npy", ids)
    out = ablate(AblationConfig(run="a", subset_files=[str(tmp_path / "five.npy")], controls=3,
                                corpus=str(corpus_file), num_samples=4, max_length=8, batch_size=3,
                                device="cpu"),
                 storage, progress=False)
    eff = out["ablation_effects"].filter(out["ablation_effects"]["kind"] == "subset").row(0, named=True)
    # independent route: a neuron that is zero contributes nothing, so zeroing its W_out row
    # (and nothing else) must give the same logits
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir).eval()
    ablated = copy.deepcopy(model)
    with torch.no_grad():
        for gid in ids.tolist():
            ablated.transformer.h[gid // 40].mlp.c_proj.weight[gid % 40] = 0
    from transformers import AutoTokenizer

    from pipeline.core.inputs import iter_documents

    tok = AutoTokenizer.from_pretrained(micro_model_dir)
    windows = torch.tensor(list(iter_windows(iter_documents(str(corpus_file)), tok, max_length=8,
                                             num_samples=4)))
    with torch.no_grad():
        base = torch.log_softmax(model(windows).logits[:, :-1].double(), -1)
        abl = torch.log_softmax(ablated(windows).logits[:, :-1].double(), -1)
    t = windows[:, 1:, None]
    delta = (-abl.gather(-1, t)).mean() - (-base.gather(-1, t)).mean()
    kl = (base.exp() * (base - abl)).sum(-1).mean()
    agree = (abl.argmax(-1) == base.argmax(-1)).double().mean()
    assert eff["size"] == 5 and eff["layers"] == "0,1,2"
    assert eff["delta_loss"] == pytest.approx(float(delta), abs=1e-5)
    assert eff["kl"] == pytest.approx(float(kl), abs=1e-6)
    assert eff["top1_agreement"] == pytest.approx(float(agree))
    assert out["summary"].height == 1 and 0 < out["summary"]["kl_p_value"][0] <= 1


def test_controls_keep_per_layer_counts():
    loc = neuron_locations(np.array([3, 7, 45, 90, 119, 80]), [0, 40, 80], [40, 40, 40])
    assert {l: v.tolist() for l, v in loc.items()} == {0: [3, 7], 1: [5], 2: [0, 10, 39]}
    controls = control_subsets(loc, [40, 40, 40], 20, seed=1)
    assert len(controls) == 20
    for c in controls:
        assert {l: len(v) for l, v in c.items()} == {0: 2, 1: 1, 2: 3}
        assert all(len(set(v.tolist())) == len(v) and v.max() < 40 for v in c.values())
    assert any(not np.array_equal(c[2], loc[2]) for c in controls)


def test_unknown_neurons_refused():
    with pytest.raises(UserError, match="does not have"):
        neuron_locations(np.array([5, 500]), [0, 40, 80], [40, 40, 40])


def test_bad_config():
    with pytest.raises(UserError):
        AblationConfig(run="a", mode="half")
    with pytest.raises(UserError):
        AblationConfig(run="a", controls=-1)
