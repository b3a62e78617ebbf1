"""The embedded zoo: loadable, deterministic, cached, with honest losses; and its corpus."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import stdlib_corpus
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.stdlib_corpus import (
    collect_documents, documents_with_paths, is_heldout, split_documents,
)
from pipeline.storage import Storage
from pipeline.zoo import (
    ZooConfig, build_zoo, is_zoo_name, read_manifest, zoo_revision_dir, zoo_revisions,
)

TINY = dict(names=["zoo-s0", "zoo-s1"], n_layer=2, d_model=32, n_head=2, d_mlp=64, n_ctx=32,
            vocab_size=512, steps=12, batch_size=4, lr=5e-3, checkpoints=[0, 4],
            heldout_tokens=2048)
REVS = ["step0", "step4", "step12"]


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    storage = Storage(tmp_path_factory.mktemp("zoo"))
    manifest = build_zoo(ZooConfig(**TINY), storage, progress=False)
    return storage, manifest


def weights(storage, name, rev):
    return load_file(str(zoo_revision_dir(storage, name, rev) / "model.safetensors"))


def snapshot(storage):
    return {p: p.stat().st_mtime_ns for p in storage.models_dir().rglob("*")}


# -- the zoo


def test_revisions_load_with_auto_classes(tiny_zoo):
    storage, manifest = tiny_zoo
    for name in TINY["names"]:
        assert zoo_revisions(storage, name) == REVS
        assert manifest["models"][name]["revisions"] == REVS
        assert manifest["models"][name]["final_revision"] == "step12"
        for rev in REVS:
            path = zoo_revision_dir(storage, name, rev)
            assert path == storage.models_dir() / name / rev
            model = AutoModelForCausalLM.from_pretrained(path)
            tok = AutoTokenizer.from_pretrained(path)
            assert model.config.n_layer == 2 and model.config.n_inner == 64
            assert model.config.n_positions == 32 and model.config.vocab_size == len(tok) == 512
            assert tok.eos_token == tok.bos_token == "<|endoftext|>"
            text = "def f(x):\n    return x  # ünïcode"
            assert tok.decode(tok(text)["input_ids"]) == text
    assert zoo_revision_dir(storage, "zoo-s0", None).name == "step12"
    assert not list(storage.models_dir().rglob(".*"))  # no temporary folders left


def test_same_seed_same_weights_other_seed_differs(tiny_zoo, tmp_path):
    storage, manifest = tiny_zoo
    again = Storage(tmp_path)
    other = build_zoo(ZooConfig(**{**TINY, "names": ["zoo-s0"]}), again, progress=False)
    for rev in REVS:
        a, b = weights(storage, "zoo-s0", rev), weights(again, "zoo-s0", rev)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert other["models"]["zoo-s0"]["heldout_loss"] == manifest["models"]["zoo-s0"]["heldout_loss"]
    tok = "zoo-tokenizer/tokenizer.json"
    assert (storage.models_dir() / tok).read_bytes() == (again.models_dir() / tok).read_bytes()
    for rev in ("step0", "step12"):
        a, c = weights(storage, "zoo-s0", rev), weights(storage, "zoo-s1", rev)
        assert not np.array_equal(a["transformer.h.0.mlp.c_fc.weight"],
                                  c["transformer.h.0.mlp.c_fc.weight"])


def test_manifest_losses_match_recomputation(tiny_zoo):
    storage, manifest = tiny_zoo
    n_ctx = TINY["n_ctx"]
    tok = AutoTokenizer.from_pretrained(storage.models_dir() / "zoo-tokenizer")

    def stream(split):
        ids = []
        for doc in split_documents(split):
            ids += tok(doc)["input_ids"] + [tok.eos_token_id]
        return ids

    train, held = stream("train"), stream("heldout")
    corpus = manifest["corpus"]
    assert corpus["tokens"]["train"] == len(train) and corpus["tokens"]["heldout"] == len(held)
    assert corpus["documents"]["heldout"] == len(split_documents("heldout"))
    # evaluated windows: heldout_tokens // n_ctx windows evenly spaced over the held-out stream
    all_windows = np.array(held[: len(held) // n_ctx * n_ctx]).reshape(-1, n_ctx)
    n = TINY["heldout_tokens"] // n_ctx
    pick = [math.floor(i * (len(all_windows) - 1) / (n - 1) + 0.5) for i in range(n)]
    windows = torch.tensor(all_windows[pick])
    assert corpus["tokens"]["heldout_evaluated"] == windows.numel()
    targets = windows[:, 1:]

    counts = np.bincount(train, minlength=len(tok)) + 1.0
    unigram = -np.log(counts / counts.sum())[targets.numpy()].mean()
    assert unigram == pytest.approx(manifest["unigram_heldout_loss"], abs=2e-4)

    for name in TINY["names"]:
        losses = manifest["models"][name]["heldout_loss"]
        for rev in REVS:
            model = AutoModelForCausalLM.from_pretrained(zoo_revision_dir(storage, name, rev))
            with torch.no_grad():
                logp = torch.log_softmax(model(windows.clone()).logits[:, :-1].double(), -1)
            nll = -logp.gather(-1, targets[..., None]).mean().item()
            assert nll == pytest.approx(losses[rev], abs=5e-4), (name, rev)
        assert losses["step12"] < losses["step0"]
        assert losses["step0"] == pytest.approx(math.log(512), abs=0.5)  # near-uniform at init


def test_second_build_is_noop(tiny_zoo, caplog):
    storage, manifest = tiny_zoo
    before = snapshot(storage)
    with caplog.at_level("INFO", logger="pipeline.zoo"):
        assert build_zoo(ZooConfig(**TINY), storage, progress=False) == manifest
    assert "nothing to do" in caplog.text
    assert snapshot(storage) == before
    # a subset of the built models is also a no-op
    assert build_zoo(ZooConfig(**TINY), storage, progress=False) == read_manifest(storage)
    assert snapshot(storage) == before


def test_cli_prints_table_of_cached_zoo(tiny_zoo, capsys):
    storage, manifest = tiny_zoo
    args = ["zoo", "--storage", str(storage.root), "--quiet", "--names", *TINY["names"]]
    for key in ("n_layer", "d_model", "n_head", "d_mlp", "n_ctx", "vocab_size", "steps",
                "batch_size", "lr", "heldout_tokens"):
        args += ["--" + key.replace("_", "-"), str(TINY[key])]
    args += ["--checkpoints", *map(str, TINY["checkpoints"])]
    before = snapshot(storage)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert snapshot(storage) == before
    assert f"{manifest['models']['zoo-s1']['heldout_loss']['step12']:.4f}" in out
    assert "unigram" in out and f"{manifest['unigram_heldout_loss']:.4f}" in out
    assert main(["zoo", "--storage", str(storage.root), "--steps", "0"]) == 2


def test_rebuild_with_other_checkpoints_replaces_folders(tmp_path):
    storage = Storage(tmp_path)
    small = {**TINY, "names": ["zoo-run7"], "steps": 6, "checkpoints": [0, 2]}
    build_zoo(ZooConfig(**small), storage, progress=False)
    assert zoo_revisions(storage, "zoo-run7") == ["step0", "step2", "step6"]
    first = weights(storage, "zoo-run7", "step6")
    manifest = build_zoo(ZooConfig(**{**small, "checkpoints": [0, 3]}), storage, progress=False)
    assert manifest["models"]["zoo-run7"]["seed"] == 7
    assert zoo_revisions(storage, "zoo-run7") == ["step0", "step3", "step6"]
    assert sorted(p.name for p in (storage.models_dir() / "zoo-run7").iterdir()) == \
        ["step0", "step3", "step6"]
    rebuilt = build_zoo(ZooConfig(**{**small, "checkpoints": [0, 3]}), storage, force=True,
                        progress=False)
    assert rebuilt["models"] == manifest["models"] | {
        "zoo-run7": {**manifest["models"]["zoo-run7"],
                     "train_seconds": rebuilt["models"]["zoo-run7"]["train_seconds"],
                     "eval_seconds": rebuilt["models"]["zoo-run7"]["eval_seconds"]}}
    again = weights(storage, "zoo-run7", "step6")
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not list(storage.models_dir().rglob(".*"))


def test_lookup_errors(tiny_zoo, tmp_path):
    storage, _ = tiny_zoo
    with pytest.raises(UserError, match=r"make zoo"):
        zoo_revision_dir(Storage(tmp_path), "zoo-s0", None)
    with pytest.raises(UserError, match=r"zoo-s0 zoo-s1.*make zoo"):
        zoo_revision_dir(storage, "zoo-s9", None)
    with pytest.raises(UserError, match=r"step0 step4 step12.*make zoo"):
        zoo_revision_dir(storage, "zoo-s1", "step999")
    assert is_zoo_name("zoo-s0") and is_zoo_name("zoo-anything")
    assert not is_zoo_name("gpt2") and not is_zoo_name("EleutherAI/pythia-70m")


def test_load_model_by_zoo_name(tiny_zoo):
    from pipeline.models import load_model

    storage, _ = tiny_zoo
    loaded = load_model("zoo-s1", "step4", storage=storage, device="cpu")
    assert loaded.source == "zoo" and loaded.revision == "step4" and loaded.widths == [64, 64]
    with pytest.raises(UserError, match="step999"):
        load_model("zoo-s1", "step999", storage=storage, device="cpu")


@pytest.mark.parametrize("bad", [
    dict(names=["model-a"]), dict(names=["zoo-"]), dict(names=["zoo-s1", "zoo-s1"]),
    dict(names=[]), dict(steps=0), dict(d_model=31), dict(n_ctx=1), dict(vocab_size=100),
    dict(lr=0.0), dict(lr=float("nan")), dict(batch_size=0), dict(checkpoints=[0, 99]),
    dict(checkpoints=[-1]),
])
def test_bad_config(bad):
    with pytest.raises(UserError):
        ZooConfig(**{**TINY, **bad})


def test_config_defaults_and_hash():
    config = ZooConfig()
    assert config.names == ["zoo-s0", "zoo-s1", "zoo-s2"]
    assert [config.seed(n) for n in config.names] == [0, 1, 2]
    assert config.revision_steps[0] == 0 and config.revision_steps[-1] == config.steps
    assert config.config_hash() == ZooConfig().config_hash()
    assert config.config_hash() != ZooConfig(steps=config.steps + 1).config_hash()


# -- the corpus


def test_stdlib_corpus_is_deterministic():
    docs = collect_documents()
    fresh = stdlib_corpus._documents_by_file.__wrapped__()  # bypass the in-process cache
    assert [d for _, ds in fresh for d in ds] == docs
    assert len(docs) > 5000 and all(isinstance(d, str) and len(d) >= 20 for d in docs)
    paths = [rel for rel, _ in fresh]
    assert paths == sorted(paths)
    assert not any(part in ("test", "tests", "idlelib", "site-packages")
                   for rel in paths for part in rel.split("/")[:-1])
    assert split_documents("train") == split_documents("train")


def test_stdlib_split_is_disjoint_and_about_five_percent():
    pairs = documents_with_paths()
    held = {rel for rel, _ in pairs if is_heldout(rel)}
    train = {rel for rel, _ in pairs} - held
    assert held and train
    assert 0.02 < len(held) / (len(held) + len(train)) < 0.10
    train_docs, held_docs = split_documents("train"), split_documents("heldout")
    assert train_docs == [d for rel, d in pairs if rel in train]
    assert held_docs == [d for rel, d in pairs if rel in held]
    assert len(train_docs) + len(held_docs) == len(pairs)
    with pytest.raises(UserError, match="heldout"):
        split_documents("validation")
