"""The embedded zoo: deterministic, cached, loadable, and better than a unigram model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.core.errors import UserError
from pipeline.models.loading import load_model
from pipeline.core.stdlib_corpus import collect_documents, is_heldout, split_documents
from pipeline.core.storage import Storage
from pipeline.models.zoo import ZooSpec as ZooConfig, build_zoo, zoo_revision_dir, zoo_revisions

TINY = dict(names=["zoo-s0", "zoo-s1"], n_layer=2, d_model=32, n_head=2, d_mlp=64, n_ctx=32,
            vocab_size=512, steps=12, batch_size=4, checkpoints=[0, 4], heldout_tokens=2048)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    storage = Storage(tmp_path_factory.mktemp("zoo"))
    manifest = build_zoo(ZooConfig(**TINY), storage, progress=False)
    return storage, manifest


def weights(storage, name, rev):
    return load_file(str(zoo_revision_dir(storage, name, rev) / "model.safetensors"))


def test_revisions_load_with_auto_classes(tiny_zoo):
    storage, manifest = tiny_zoo
    assert zoo_revisions(storage, "zoo-s0") == ["step0", "step4", "step12"]
    for rev in ("step0", "step4", "step12"):
        path = zoo_revision_dir(storage, "zoo-s1", rev)
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert model.config.n_layer == 2 and model.config.n_inner == 64
        assert tok.decode(tok("def f(x): return x")["input_ids"]) == "def f(x): return x"
    assert zoo_revision_dir(storage, "zoo-s0", None).name == "step12"


def test_same_seed_same_weights_other_seed_differs(tiny_zoo, tmp_path):
    storage, _ = tiny_zoo
    again = Storage(tmp_path)
    build_zoo(ZooConfig(**{**TINY, "names": ["zoo-s0"]}), again, progress=False)
    a, b = weights(storage, "zoo-s0", "step12"), weights(again, "zoo-s0", "step12")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    c = weights(storage, "zoo-s1", "step12")
    assert not np.array_equal(a["transformer.h.0.mlp.c_fc.weight"],
                              c["transformer.h.0.mlp.c_fc.weight"])


def test_manifest_losses_match_recomputation(tiny_zoo):
    storage, manifest = tiny_zoo
    path = zoo_revision_dir(storage, "zoo-s0", "step12")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = []
    for doc in split_documents("heldout"):
        ids += tok(doc)["input_ids"] + [tok.eos_token_id]
    n = manifest["tokens"]["heldout_evaluated"] // 32
    windows = torch.tensor(ids[: n * 32]).view(n, 32)
    with torch.no_grad():
        logp = torch.log_softmax(model(windows).logits[:, :-1].double(), -1)
    nll = -logp.gather(-1, windows[:, 1:, None]).mean().item()
    assert nll == pytest.approx(manifest["models"]["zoo-s0"]["heldout_loss"]["step12"], abs=2e-4)
    losses = manifest["models"]["zoo-s0"]["heldout_loss"]
    assert losses["step12"] < losses["step0"]


def test_second_build_is_noop(tiny_zoo):
    storage, manifest = tiny_zoo
    files = {p: p.stat().st_mtime_ns for p in storage.models_dir().rglob("*") if p.is_file()}
    assert build_zoo(ZooConfig(**TINY), storage, progress=False) == manifest
    assert {p: p.stat().st_mtime_ns for p in storage.models_dir().rglob("*") if p.is_file()} == files


def test_load_model_by_zoo_name(tiny_zoo):
    storage, _ = tiny_zoo
    loaded = load_model("zoo-s1", "step4", storage=storage)
    assert loaded.source == "zoo" and loaded.revision == "step4" and loaded.widths == [64, 64]
    with pytest.raises(UserError, match="step999"):
        load_model("zoo-s1", "step999", storage=storage)
    with pytest.raises(UserError, match="does not exist"):
        load_model("zoo-s9", None, storage=storage)


def test_stdlib_split_is_disjoint_and_deterministic():
    docs = collect_documents()
    assert len(docs) > 1000 and docs == collect_documents()
    held = {rel for rel, _ in docs if is_heldout(rel)}
    train = {rel for rel, _ in docs if not is_heldout(rel)}
    assert held and train and not held & train
    assert 0.01 < len(held) / len(held | train) < 0.12
    with pytest.raises(UserError):
        split_documents("validation")


@pytest.mark.parametrize("bad", [dict(names=["model-a"]), dict(steps=0), dict(d_model=31),
                                 dict(checkpoints=[0, 99])])
def test_bad_config(bad):
    with pytest.raises(UserError):
        ZooConfig(**{**TINY, **bad})
