"""The embedded zoo: deterministic, cached, rebuilt in place, loadable; its corpus split."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.core.errors import UserError
from pipeline.core.stdlib_corpus import collect_documents, split_documents
from pipeline.core.storage import Storage
from pipeline.models.loading import load_model
from pipeline.models.zoo import ZooSpec, build_zoo, zoo_revision_dir, zoo_revisions
from pipeline.stages import zoo as zoo_stage

TINY = dict(names=["zoo-s0", "zoo-s1"], n_layer=2, d_model=32, n_head=2, d_mlp=64, n_ctx=32,
            vocab_size=512, steps=12, batch_size=4, checkpoints=[0, 4], heldout_tokens=2048)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    storage = Storage(tmp_path_factory.mktemp("zoo"))
    manifest = build_zoo(ZooSpec(**TINY), storage, progress=False)
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
    build_zoo(ZooSpec(**{**TINY, "names": ["zoo-s0"]}), again, progress=False)
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
    assert build_zoo(ZooSpec(**TINY), storage, progress=False) == manifest
    assert {p: p.stat().st_mtime_ns for p in storage.models_dir().rglob("*") if p.is_file()} == files


def test_load_model_by_zoo_name(tiny_zoo):
    storage, _ = tiny_zoo
    loaded = load_model("zoo-s1", "step4", storage=storage)
    assert loaded.source == "zoo" and loaded.revision == "step4" and loaded.widths == [64, 64]
    with pytest.raises(UserError, match="step999"):
        load_model("zoo-s1", "step999", storage=storage)
    with pytest.raises(UserError, match="does not exist"):
        load_model("zoo-s9", None, storage=storage)


def test_stdlib_split_follows_the_crc32_buckets_of_file_paths():
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = collect_documents()
    paths = [rel for rel, _ in docs]
    assert len(docs) > 1000 and paths == sorted(paths)  # files in sorted order
    assert all((root / rel).is_file() for rel in set(paths))
    bucket = {rel: zlib.crc32(rel.encode()) % 100 for rel in set(paths)}
    train = tuple(d for rel, d in docs if bucket[rel] >= 5)
    assert split_documents("train") == train
    seen = set(train)
    heldout = split_documents("heldout")
    assert heldout == tuple(d for rel, d in docs if bucket[rel] < 5 and d not in seen)
    assert not seen.intersection(heldout)  # no held-out text is seen in training
    dropped = [d for rel, d in docs if bucket[rel] < 5 and d in seen]
    assert 0 < len(dropped) < len(heldout) / 10  # copies exist (license blocks), and are few
    held = {rel for rel in bucket if bucket[rel] < 5}
    assert 0.01 < len(held) / len(bucket) < 0.12
    with pytest.raises(UserError):
        split_documents("validation")


DIGEST = ("import hashlib, json; from pipeline.core.stdlib_corpus import collect_documents; "
          "print(hashlib.sha256(json.dumps(collect_documents()).encode()).hexdigest())")


def test_stdlib_corpus_is_the_same_in_fresh_interpreters():
    """Two interpreters with other hash seeds (set and dict orders differ) walk the same corpus."""
    digests = {subprocess.run([sys.executable, "-c", DIGEST], capture_output=True, text=True,
                              check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
               for seed in ("1", "2")}
    assert digests == {hashlib.sha256(json.dumps(collect_documents()).encode()).hexdigest()}


SMALL = dict(names=["zoo-s0"], n_layer=1, d_model=16, n_head=2, d_mlp=16, n_ctx=16,
             vocab_size=300, steps=2, batch_size=2, checkpoints=[0, 1], heldout_tokens=64)


def vocab(directory: Path) -> dict:
    return json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]


def temporaries(storage: Storage) -> list[Path]:
    return [p for pattern in (".*.tmp-*", ".*.old-*") for p in storage.models_dir().rglob(pattern)]


def test_rebuild_with_changed_config_replaces_the_zoo(tmp_path):
    storage = Storage(tmp_path)
    zoo_stage.run(zoo_stage.ZooConfig(**SMALL, quiet=True), storage)
    old_vocab = vocab(storage.models_dir() / "zoo-tokenizer")
    changed = {**SMALL, "d_mlp": 24, "vocab_size": 320, "steps": 3, "checkpoints": [0, 2]}
    manifest = zoo_stage.run(zoo_stage.ZooConfig(**changed, quiet=True), storage)
    model_dir = storage.models_dir() / "zoo-s0"
    assert sorted(p.name for p in model_dir.iterdir()) == ["step0", "step2", "step3"]  # no step1
    assert manifest["models"]["zoo-s0"]["revisions"] == ["step0", "step2", "step3"]
    new_vocab = vocab(storage.models_dir() / "zoo-tokenizer")
    assert new_vocab != old_vocab and len(new_vocab) == 320
    for rev in ("step0", "step2", "step3"):
        assert vocab(model_dir / rev) == new_vocab
        assert weights(storage, "zoo-s0", rev)["transformer.h.0.mlp.c_fc.weight"].shape == (16, 24)
    assert temporaries(storage) == []
    loaded = load_model("zoo-s0", None, storage=storage)
    assert loaded.revision == "step3" and loaded.widths == [24]
    assert len(loaded.tokenizer) == 320


def test_force_rebuilds_in_place(tmp_path):
    storage = Storage(tmp_path)
    first = zoo_stage.run(zoo_stage.ZooConfig(**SMALL, quiet=True), storage)
    checkpoint = storage.models_dir() / "zoo-s0" / "step2" / "model.safetensors"
    before = checkpoint.stat().st_ino
    again = zoo_stage.run(zoo_stage.ZooConfig(**SMALL, quiet=True, force=True), storage)
    assert checkpoint.stat().st_ino != before and temporaries(storage) == []
    assert again["models"]["zoo-s0"]["heldout_loss"] == first["models"]["zoo-s0"]["heldout_loss"]
    assert load_model("zoo-s0", "step1", storage=storage).widths == [16]


@pytest.mark.parametrize("bad", [dict(names=["model-a"]), dict(steps=0), dict(d_model=31),
                                 dict(checkpoints=[0, 99])])
def test_bad_config(bad):
    with pytest.raises(UserError):
        ZooSpec(**{**TINY, **bad})
