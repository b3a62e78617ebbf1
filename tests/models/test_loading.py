"""load_model: local folders and their revisions, the hub offline, and the adapter resolved from
the config before any weights load."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time

import huggingface_hub
import pytest
import torch
import transformers as tf
from huggingface_hub import constants as hub_constants
from test_architectures import (
    CASES,
    TinyConfig,
    TinyForCausalLM,
    build,
    expected_weights,
    one_thread,
)
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.core.errors import UserError
from pipeline.core.storage import Storage
from pipeline.models import loading
from pipeline.models.loading import load_model, resolve_device, resolve_dtype
from pipeline.models.micro import make_tokenizer

pytestmark = pytest.mark.usefixtures(one_thread.__name__)  # the fixture, active in this module
AutoConfig.register(TinyConfig.model_type, TinyConfig, exist_ok=True)
AutoModelForCausalLM.register(TinyConfig, TinyForCausalLM, exist_ok=True)


class RenamedQwen2Config(tf.Qwen2Config):
    model_type = "renamed-qwen2"  # a family without a FAMILIES entry, saved and loaded by name


class RenamedQwen2ForCausalLM(tf.Qwen2ForCausalLM):
    config_class = RenamedQwen2Config


AutoConfig.register(RenamedQwen2Config.model_type, RenamedQwen2Config, exist_ok=True)
AutoModelForCausalLM.register(RenamedQwen2Config, RenamedQwen2ForCausalLM, exist_ok=True)


def save_with_tokenizer(model, directory):
    make_tokenizer(directory)
    model.save_pretrained(directory)
    return directory


def test_load_local_folder(micro_model_dir, tmp_path):
    loaded = load_model(str(micro_model_dir), storage=Storage(tmp_path))
    assert loaded.source == "local" and loaded.adapter.family == "gpt2" and loaded.revision is None
    assert loaded.widths == [40, 40, 40] and loaded.layer_offsets == [0, 40, 80]
    # device auto: the GPU where there is one, in bfloat16 (float16 where bf16 is unsupported)
    if torch.cuda.is_available():
        half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert loaded.device.type == "cuda" and loaded.dtype == half
    else:
        assert loaded.device.type == "cpu" and loaded.dtype == torch.float32
    assert loaded.is_causal


@pytest.mark.parametrize("case, head, causal", [
    ("phi3", tf.Phi3ForCausalLM, True), ("distilbert", tf.DistilBertForMaskedLM, False),
    ("electra", tf.ElectraForMaskedLM, False), ("gpt_neo", tf.GPTNeoForCausalLM, True)])
def test_new_families_load_from_a_folder(case, head, causal, tmp_path):
    spec = CASES[case]
    vocab = len(make_tokenizer(tmp_path / "tok"))
    saved = build(dataclasses.replace(spec, config={**spec.config, "vocab_size": vocab}))
    folder = save_with_tokenizer(saved, tmp_path / case)
    loaded = load_model(str(folder), storage=Storage(tmp_path), device="cpu", dtype="float32")
    assert type(loaded.model) is head and loaded.is_causal is causal
    assert loaded.adapter.family == spec.model_type and loaded.widths == [48, 48]
    for layer in range(2):  # the weights that loaded are the ones saved, read the test's way
        w_in, _, w_up, w_out = expected_weights(saved, spec, layer)
        assert torch.equal(loaded.adapter.w_in(loaded.model, layer), w_in)
        assert torch.equal(loaded.adapter.w_out(loaded.model, layer), w_out)
        if w_up is not None:
            assert torch.equal(loaded.adapter.w_up(loaded.model, layer), w_up)


def test_family_without_entry_loads_and_logs_the_module_it_picked(tmp_path, caplog):
    torch.manual_seed(0)
    model = RenamedQwen2ForCausalLM(RenamedQwen2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, pad_token_id=0, bos_token_id=0, eos_token_id=0))
    folder = save_with_tokenizer(model, tmp_path / "renamed")
    with caplog.at_level(logging.INFO, logger="pipeline.models.adapters"):
        loaded = load_model(str(folder), storage=Storage(tmp_path), device="cpu")
    picked = [r.getMessage() for r in caplog.records if r.name == "pipeline.models.adapters"]
    assert len(picked) == 1 and "model.layers.<layer>.mlp.down_proj" in picked[0]
    assert "'renamed-qwen2'" in picked[0] and "mlp.up_proj" in picked[0]
    assert loaded.adapter.family == "renamed-qwen2" and loaded.is_causal and loaded.adapter.gated
    assert [s.module for s in loaded.sites] == [b.mlp.down_proj for b in loaded.model.model.layers]


@pytest.fixture()
def no_weights_load(monkeypatch):
    """Every from_pretrained of a model class records its call and raises."""
    calls = []

    def refuse(cls, *args, **kwargs):
        calls.append(cls.__name__)
        raise RuntimeError("weights were loaded")

    monkeypatch.setattr(tf.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(tf.models.auto.auto_factory._BaseAutoModelClass, "from_pretrained",
                        classmethod(refuse))
    return calls


@pytest.mark.parametrize("config, message", [
    (AutoConfig.for_model("olmoe", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_experts=4),
     "'olmoe' is a mixture of experts"),
    (TinyConfig(names=["proj_out", "proj_in", None]), "FAMILIES['tiny-ffn'] = Family("),
    (AutoConfig.for_model("t5", d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8),
     "'t5' is an encoder-decoder"),
])
def test_unsupported_family_is_refused_before_the_weights_load(config, message, no_weights_load,
                                                                tmp_path):
    config.save_pretrained(tmp_path / "model")  # a config alone: there are no weights to load
    with pytest.raises(UserError) as e:
        load_model(str(tmp_path / "model"), storage=Storage(tmp_path))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert no_weights_load == []


def test_supported_family_reaches_the_weights(no_weights_load, micro_model_dir, tmp_path):
    # the guard above is live: a supported family does call from_pretrained
    with pytest.raises(UserError, match="weights were loaded"):
        load_model(str(micro_model_dir), storage=Storage(tmp_path))
    assert no_weights_load  # the auto class or GPT2LMHeadModel itself


def test_revision_of_a_folder_without_revisions_is_refused(micro_model_dir, tmp_path):
    with pytest.raises(UserError) as e:
        load_model(str(micro_model_dir), "step1000", storage=Storage(tmp_path))
    message = str(e.value)
    assert str(micro_model_dir) in message and "no revision 'step1000'" in message
    assert "holds no revisions" in message and "\n" not in message


def test_revisions_of_a_folder(micro_model_dir, tmp_path):
    root = tmp_path / "checkpoints"
    for step in ("step1", "step2"):
        shutil.copytree(micro_model_dir, root / step)
    loaded = load_model(str(root), "step2", storage=Storage(tmp_path))
    assert loaded.revision == "step2" and loaded.path == root / "step2"
    with pytest.raises(UserError, match=r"no revision 'step3': available are \['step1', 'step2'\]"):
        load_model(str(root), "step3", storage=Storage(tmp_path))
    with pytest.raises(UserError, match="holds revisions .* pass --revision"):
        load_model(str(root), storage=Storage(tmp_path))
    shutil.copy(micro_model_dir / "config.json", root / "config.json")  # final weights on top too
    with pytest.raises(UserError, match=r"no revision 'step3': available are \['step1', 'step2'\]"):
        load_model(str(root), "step3", storage=Storage(tmp_path))


def test_device_and_dtype_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UserError):
        resolve_device("tpu")
    with pytest.raises(UserError):
        resolve_dtype("float8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            resolve_device("cuda")


# ---- hub ids without the hub


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache of this test, and a fresh reachability probe."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    loading._hub_unreachable.cache_clear()
    yield cache
    loading._hub_unreachable.cache_clear()


class DeadSession:
    """A hub session whose every request fails as a dead network does; counts requests."""

    def __init__(self):
        self.requests = 0

    def head(self, *args, **kwargs):
        self.requests += 1
        raise OSError("[Errno -2] Name or service not known")


def cache_snapshot(cache, repo_id, source, files):
    """The hub cache layout: refs/main names a snapshot folder holding the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in files:
        shutil.copy(source / f, repo / "snapshots" / commit / f)


def test_offline_hub_id_fails_at_once_in_one_line(hub_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(UserError) as e:
        load_model("nobody/not-cached", storage=Storage(tmp_path))
    elapsed = time.perf_counter() - start
    message = str(e.value)
    assert elapsed < 10, f"{elapsed:.1f} s"  # 27-30 s of retries before
    assert "\n" not in message and "'nobody/not-cached' is not cached" in message
    assert "HF_HUB_OFFLINE" in message and str(hub_cache) in message
    assert "--model ./path" in message and "zoo" in message


def test_unreachable_hub_is_detected_once_and_fails_at_once(hub_cache, monkeypatch, tmp_path):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    session = DeadSession()
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: session)
    start = time.perf_counter()
    for revision in (None, "v1"):
        with pytest.raises(UserError) as e:
            load_model("nobody/not-cached", revision, storage=Storage(tmp_path))
        message = str(e.value)
        assert "\n" not in message and "does not answer" in message
        assert "HF_HUB_OFFLINE" in message and str(hub_cache) in message
    assert "at revision 'v1'" in message
    assert time.perf_counter() - start < 10 and session.requests == 1  # asked once a process


def test_offline_hub_id_in_the_cache_loads_without_the_network(hub_cache, monkeypatch,
                                                               micro_model_dir, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    session = DeadSession()
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: session)
    files = sorted(p.name for p in micro_model_dir.iterdir())
    cache_snapshot(hub_cache, "nobody/cached-micro", micro_model_dir, files)
    cache_snapshot(hub_cache, "nobody/config-only", micro_model_dir, ["config.json"])
    start = time.perf_counter()
    loaded = load_model("nobody/cached-micro", storage=Storage(tmp_path), device="cpu")
    assert loaded.source == "hub" and loaded.widths == [40, 40, 40]
    reference = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    assert torch.equal(loaded.model.transformer.h[1].mlp.c_proj.weight,
                       reference.transformer.h[1].mlp.c_proj.weight)
    # a snapshot without weights: the same one-line offline error, not a hub traceback
    with pytest.raises(UserError) as e:
        load_model("nobody/config-only", storage=Storage(tmp_path))
    message = str(e.value)
    assert "'nobody/config-only' is only partly cached" in message and "\n" not in message
    assert "HF_HUB_OFFLINE" in message and str(hub_cache) in message
    assert time.perf_counter() - start < 10 and session.requests == 0
