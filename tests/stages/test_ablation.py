"""Ablation against independent hooks written here: effects, p-values, mean values, generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.cli import main
from pipeline.core import arrays, tables
from pipeline.core.errors import UserError
from pipeline.core.inputs import iter_documents, iter_windows
from pipeline.core.storage import Storage
from pipeline.stages.ablation import AblationConfig, control_subsets, neuron_locations, run

PROMPTS = 'prompts,number_of_new_tokens,num_samples\n"the value of",6,2\n"raise error",5,1\n'
IDS = np.array([3, 7, 45, 90, 119])  # layers 0, 0, 1, 2, 2 of the 3 x 40 micro model
WIDTH = 40


def extract(storage: Storage, run_id: str, *source: str) -> None:
    assert main(["extract", "--storage", str(storage.root), *source, "--run", run_id,
                 "--quiet"]) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory, micro_model_dir, corpus_file):
    """Run "r" (corpus windows, dense activations) and run "p" (generated from prompts)."""
    storage = Storage(tmp_path_factory.mktemp("abl"))
    csv = storage.root / "p.csv"
    csv.write_text(PROMPTS)
    extract(storage, "r", "--model", str(micro_model_dir), "--corpus", str(corpus_file),
            "--num-samples", "16", "--max-length", "32", "--store-acts")
    extract(storage, "p", "--model", str(micro_model_dir), "--prompts", str(csv), "--seed", "3",
            "--temperature", "0.9", "--top-k", "30")
    np.save(storage.root / "five.npy", IDS)
    return storage, csv


def base(storage, corpus_file, **kw) -> AblationConfig:
    values = dict(run="r", subset_files=[str(storage.root / "five.npy")], corpus=str(corpus_file),
                  num_samples=4, max_length=8, batch_size=3, device="cpu", quiet=True)
    return AblationConfig(**{**values, **kw})


@pytest.fixture(scope="module")
def zero(runs, corpus_file):
    storage, _ = runs
    return run(base(storage, corpus_file, controls=6), storage)


# -- independent references


def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def held_out(model_dir, corpus_file, n=4, length=8):
    tok = AutoTokenizer.from_pretrained(model_dir)
    return torch.tensor(list(iter_windows(iter_documents(str(corpus_file)), tok, max_length=length,
                                          num_samples=n)))


class SetNeurons:
    """A forward pre-hook on every c_proj that sets the given global neuron ids to `values`
    (zero by default): the neuron vector is the input of c_proj."""

    def __init__(self, model, ids, values=None):
        self.handles = []
        for layer, block in enumerate(model.transformer.h):
            local = [int(i) - layer * WIDTH for i in ids if int(i) // WIDTH == layer]
            if not local:
                continue
            fill = None if values is None else torch.tensor([values[layer * WIDTH + i] for i in local])

            def hook(module, args, local=local, fill=fill):
                x = args[0].clone()
                x[..., local] = 0 if fill is None else fill.to(x.dtype)
                return (x,)
            self.handles.append(block.mlp.c_proj.register_forward_pre_hook(hook))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def effects_by_hand(model, windows, ids):
    with torch.no_grad():
        base_lp = torch.log_softmax(model(windows).logits[:, :-1].double(), -1)
        with SetNeurons(model, ids):
            abl = torch.log_softmax(model(windows).logits[:, :-1].double(), -1)
    t = windows[:, 1:, None]
    loss, base_loss = (-abl.gather(-1, t)).mean(), (-base_lp.gather(-1, t)).mean()
    return {"loss": float(loss), "baseline_loss": float(base_loss),
            "delta_loss": float(loss - base_loss),
            "kl": float((base_lp.exp() * (base_lp - abl)).sum(-1).mean()),
            "top1_agreement": float((abl.argmax(-1) == base_lp.argmax(-1)).double().mean())}


# -- effects


def test_every_row_equals_an_independent_zero_ablation_hook(zero, micro_model_dir, corpus_file):
    model, windows = hf_model(micro_model_dir), held_out(micro_model_dir, corpus_file)
    effects = zero.effects
    assert effects.height == 7 and effects["tokens"].to_list() == [windows[:, 1:].numel()] * 7
    for row in effects.iter_rows(named=True):
        expect = effects_by_hand(model, windows, row["neuron_ids"])
        for key, value in expect.items():
            assert row[key] == pytest.approx(value, abs=1e-5), (row["kind"], key)


def test_subset_and_controls_ablate_the_right_neurons(zero):
    effects = zero.effects
    subset = effects.filter(effects["kind"] == "subset").row(0, named=True)
    assert subset["neuron_ids"] == sorted(IDS.tolist()) and subset["size"] == 5
    assert subset["layers"] == "0,1,2"
    per_layer = np.bincount(IDS // WIDTH, minlength=3).tolist()
    controls = effects.filter(effects["kind"] == "control")
    assert controls["control_index"].to_list() == list(range(6))
    draws = set()
    for ids in controls["neuron_ids"].to_list():
        assert np.bincount(np.array(ids) // WIDTH, minlength=3).tolist() == per_layer
        assert len(set(ids)) == len(ids)
        draws.add(tuple(ids))
    assert len(draws) == 6  # distinct random draws


def test_p_value_and_percentile_by_definition(zero):
    effects, summary = zero.effects, zero.summary.row(0, named=True)
    sub = effects.filter(effects["kind"] == "subset")["kl"][0]
    ctrl = effects.filter(effects["kind"] == "control")["kl"].to_list()
    below = sum(1 for c in ctrl if c < sub)
    at_least = sum(1 for c in ctrl if c >= sub)
    assert summary["kl_percentile"] == pytest.approx(below / len(ctrl))
    assert summary["kl_p_value"] == pytest.approx((at_least + 1) / (len(ctrl) + 1))
    assert summary["kl_control_mean"] == pytest.approx(sum(ctrl) / len(ctrl))
    mean = sum(ctrl) / len(ctrl)
    assert summary["kl_control_std"] == pytest.approx((sum((c - mean) ** 2 for c in ctrl)
                                                       / len(ctrl)) ** 0.5)


# -- mean ablation


def test_mean_ablation_sets_neurons_to_their_run_means(runs, corpus_file, monkeypatch, tmp_path):
    storage, _ = runs
    group = arrays.open_group(storage.arrays("r"), mode="r")
    dense = np.concatenate([group[f"acts/L{l}"][:].astype(np.float64) for l in range(3)], 1)
    assert dense.shape == (16 * 32, 3 * WIDTH)
    means = dense.mean(0)
    # per layer the two neurons of largest |mean|, so that a zero ablation would fail the test
    ids = np.concatenate([l * WIDTH + np.argsort(-np.abs(means[l * WIDTH:(l + 1) * WIDTH]))[:2]
                          for l in range(3)])
    assert np.abs(means[ids]).min() > 1e-2
    np.save(tmp_path / "far.npy", ids)

    from pipeline.models import loading

    seen = {l: [] for l in range(3)}
    real = loading.load_model

    def load_and_watch(*args, **kwargs):
        loaded = real(*args, **kwargs)
        for l, site in enumerate(loaded.sites):  # a forward hook sees the edited input
            local = np.sort(ids[ids // WIDTH == l] % WIDTH)
            site.module.register_forward_hook(
                lambda m, a, out, l=l, local=local: seen[l].append(a[0][..., local].double()))
        return loaded

    monkeypatch.setattr(loading, "load_model", load_and_watch)
    result = run(base(storage, corpus_file, subset_files=[str(tmp_path / "far.npy")], mode="mean",
                      controls=0, batch_size=2), storage)
    for l in range(3):
        assert len(seen[l]) == 4  # 2 batches, each a baseline and an ablated forward
        target = torch.tensor(means[np.sort(ids[ids // WIDTH == l])])
        hits = [x for x in seen[l] if torch.allclose(x, target.expand_as(x), atol=1e-3)]
        assert len(hits) == 2
    row = result.effects.row(0, named=True)
    assert row["mode"] == "mean" and row["neuron_ids"] == sorted(ids.tolist())


def test_mean_ablation_effects_equal_independent_hook(runs, micro_model_dir, corpus_file):
    storage, _ = runs
    group = arrays.open_group(storage.arrays("r"), mode="r")
    stats = tables.read_partition(storage, "neuron_stats", "r").to_pydict()
    # the hook sets the run's float64 means (sum / count); checked against dense acts above
    means = {i: s / c for i, s, c in zip(stats["neuron_id"], stats["sum"], stats["count"])}
    assert abs(means[45] - group["acts/L1"][:, 5].astype(np.float64).mean()) < 1e-3
    result = run(base(storage, corpus_file, mode="mean", controls=0), storage)
    model, windows = hf_model(micro_model_dir), held_out(micro_model_dir, corpus_file)
    with torch.no_grad():
        base_lp = torch.log_softmax(model(windows).logits[:, :-1].double(), -1)
        with SetNeurons(model, IDS.tolist(), means):
            abl = torch.log_softmax(model(windows).logits[:, :-1].double(), -1)
    kl = float((base_lp.exp() * (base_lp - abl)).sum(-1).mean())
    assert result.effects["kl"][0] == pytest.approx(kl, abs=1e-6)


# -- generation


def generate_by_hand(model, tok, prompt, new_tokens, samples, *, temperature, top_k, seed, index,
                     ids=None):
    """Full forward per step (no KV cache), ablation by SetNeurons, sampling as extraction
    documents it: per-prompt CPU generator seeded seed * 1_000_003 + prompt index."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    seq = torch.tensor([tok(prompt)["input_ids"]] * samples)
    with torch.no_grad(), SetNeurons(model, ids or []):
        for _ in range(new_tokens):
            logits = model(seq).logits[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
                nxt = torch.multinomial(probs, 1, generator=gen)
            seq = torch.cat([seq, nxt], 1)
    return seq.tolist()


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_ablated_generation_equals_hand_written_hook(runs, micro_model_dir, corpus_file,
                                                     temperature):
    storage, csv = runs
    result = run(base(storage, corpus_file, run="p", prompts=str(csv), seed=3,
                      temperature=temperature, top_k=30, controls=0, num_samples=2), storage)
    model, tok = hf_model(micro_model_dir), AutoTokenizer.from_pretrained(micro_model_dir)
    gen = result.generations
    assert sorted(set(gen["subset"])) == ["five", "none"] and gen.height == 6
    for name, ids in (("none", None), ("five", IDS.tolist())):
        for i, (prompt, new, samples) in enumerate([("the value of", 6, 2), ("raise error", 5, 1)]):
            expect = generate_by_hand(model, tok, prompt, new, samples, temperature=temperature,
                                      top_k=30, seed=3, index=i, ids=ids)
            rows = gen.filter((gen["subset"] == name) & (gen["prompt"] == i)).sort("sample_index")
            assert rows["token_ids"].to_list() == expect, (name, i)
    header = (storage.reports("p") / "ablation" / "five_generations.csv").read_text().splitlines()[0]
    assert header == "prompt,sample_index,generated_text,perturbation_subset"


def test_none_reproduces_extraction_text(runs, corpus_file):
    storage, csv = runs
    result = run(base(storage, corpus_file, run="p", seed=3, temperature=0.9, top_k=30, controls=0,
                      num_samples=2), storage)  # the run's own prompts
    tokens = tables.read_partition(storage, "tokens", "p").to_pydict()
    none = result.generations.filter(result.generations["subset"] == "none")
    assert none.height == 3
    for row in none.iter_rows(named=True):
        expect = [t for t, p, s in zip(tokens["token_id"], tokens["prompt"], tokens["prompt_sample"])
                  if p == row["prompt"] and s == row["sample_index"]]
        assert row["token_ids"] == expect


# -- finished work, stored subsets, the model options


def test_rerun_is_skipped_and_overwrite_redoes(runs, corpus_file, monkeypatch):
    storage, _ = runs
    config = base(storage, corpus_file, controls=1, mode="zero", num_samples=2)
    first = run(config, storage)
    from pipeline.models import loading

    def refuse(*a, **k):
        raise AssertionError("a finished ablation loaded its model again")

    monkeypatch.setattr(loading, "load_model", refuse)
    again = run(config, storage)
    assert again.reused and not first.reused
    assert again.effects.drop("neuron_ids").equals(first.effects.drop("neuron_ids"))
    assert again.effects["neuron_ids"].to_list() == first.effects["neuron_ids"].to_list()
    with pytest.raises(AssertionError, match="loaded its model"):
        run(base(storage, corpus_file, controls=1, mode="zero", num_samples=2, overwrite=True),
            storage)
    with pytest.raises(AssertionError, match="loaded its model"):
        run(base(storage, corpus_file, controls=2, mode="zero", num_samples=2), storage)


def test_stored_subset_is_read_from_the_run(tmp_path, micro_model_dir, corpus_file):
    storage = Storage(tmp_path)
    extract(storage, "g", "--model", str(micro_model_dir), "--corpus", str(corpus_file),
            "--num-samples", "12", "--max-length", "32")
    assert main(["coactivation", "--storage", str(tmp_path), "--run", "g", "--quiet"]) == 0
    assert main(["subset", "--storage", str(tmp_path), "--run", "g", "--threshold", "0.3",
                 "--ratio", "0.05", "--name", "top"]) == 0
    ids = np.load(storage.run_dir("g") / "subsets" / "top.npy", allow_pickle=False)
    result = run(AblationConfig(run="g", subsets=["top"], controls=0, corpus=str(corpus_file),
                                num_samples=2, max_length=8, device="cpu", quiet=True), storage)
    assert result.effects["neuron_ids"][0].to_list() == sorted(ids.tolist())
    with pytest.raises(UserError, match="no subset 'nope'"):
        run(AblationConfig(run="g", subsets=["nope"], device="cpu"), storage)


def test_model_options_reach_load_model(runs, corpus_file, monkeypatch):
    storage, _ = runs
    from pipeline.models import loading

    seen = {}

    def fake(name, revision=None, **kwargs):
        seen.update(kwargs, name=name)
        raise RuntimeError("stop")

    monkeypatch.setattr(loading, "load_model", fake)
    with pytest.raises(RuntimeError, match="stop"):
        run(base(storage, corpus_file, trust_remote_code=True, dtype="float32", overwrite=True),
            storage)
    assert seen["trust_remote_code"] is True and seen["dtype"] == "float32"
    assert seen["device"] == "cpu"


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


@pytest.mark.parametrize("kw, match", [
    ({}, "no subset to ablate"),
    ({"subsets": ["a"], "mode": "half"}, "--mode"),
    ({"subsets": ["a"], "controls": -1}, "--controls"),
    ({"subsets": ["a"], "max_length": 1}, "--max-length"),
    ({"subsets": ["a"], "revision": "step1"}, "--revision"),
])
def test_bad_config(kw, match):
    with pytest.raises(UserError, match=match):
        AblationConfig(run="a", **kw)


# -- encoders: no generation, the masked-LM loss only through the checkpoint's own head


def save_micro_bert(directory, *, head: bool = True, wordpiece: bool = True):
    """A random micro BERT (2 layers x 48 neurons) saved with its masked-LM head, or only its
    trunk (a BertModel folder); with a WordPiece tokenizer that has [MASK], or the micro BPE one
    that has no mask token."""
    import transformers as tf
    from tokenizers import BertWordPieceTokenizer

    from pipeline.models.micro import make_tokenizer, synthetic_texts

    if wordpiece:
        wp = BertWordPieceTokenizer(lowercase=True)
        wp.train_from_iterator(synthetic_texts(200), vocab_size=200, show_progress=False)
        tok = tf.BertTokenizerFast(tokenizer_object=wp._tokenizer)
        tok.save_pretrained(directory)
    else:
        tok = make_tokenizer(directory)
    torch.manual_seed(5)
    model = tf.BertForMaskedLM(tf.BertConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=200 if not wordpiece else len(tok), max_position_embeddings=64,
        pad_token_id=tok.pad_token_id or 0))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0, 0.3)
    (model if head else model.bert).save_pretrained(directory, safe_serialization=True)
    return directory


BERT_WIDTH = 48
BERT_IDS = np.array([2, 9, 30, 50, 77])  # layers 0, 0, 0, 1, 1


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory, corpus_file):
    root = tmp_path_factory.mktemp("enc")
    storage = Storage(root / "store")
    bert = save_micro_bert(root / "bert")
    extract(storage, "e", "--model", str(bert), "--corpus", str(corpus_file), "--num-samples", "8",
            "--max-length", "16")
    np.save(root / "sub.npy", BERT_IDS)
    csv = root / "p.csv"
    csv.write_text(PROMPTS)
    return storage, bert, root


def files_under(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def encoder_config(storage, root, corpus_file, **kw) -> AblationConfig:
    values = dict(run="e", subset_files=[str(root / "sub.npy")], corpus=str(corpus_file),
                  num_samples=5, max_length=12, batch_size=2, controls=2, device="cpu", quiet=True)
    return AblationConfig(**{**values, **kw})


def fed_inputs(monkeypatch):
    """The input_ids of every forward of the loaded model, read back by a pre-hook."""
    from pipeline.models import loading

    seen: list[torch.Tensor] = []
    real = loading.load_model

    def load_and_watch(*args, **kwargs):
        loaded = real(*args, **kwargs)
        loaded.model.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
        return loaded

    monkeypatch.setattr(loading, "load_model", load_and_watch)
    return seen


def test_encoder_masked_lm_loss_by_hand(encoder_run, corpus_file, monkeypatch):
    """Masks read back from the inputs fed to the model: about 15% of each window's non-special
    tokens, replaced by [MASK]; loss, KL and top-1 at exactly those positions equal torch's
    cross-entropy on the logits of an unhooked model and of a hand-written zero hook."""
    from transformers import AutoModelForMaskedLM

    from pipeline.core.inputs import framing_for

    storage, bert, root = encoder_run
    seen = fed_inputs(monkeypatch)
    result = run(encoder_config(storage, root, corpus_file), storage)
    tok = AutoTokenizer.from_pretrained(bert)
    originals = torch.tensor(list(iter_windows(
        iter_documents(str(corpus_file)), tok, max_length=12, num_samples=5,
        framing=framing_for(tok, causal=False))))
    # 3 batches (2, 2, 1 windows), each fed once as baseline and once per variant (1 + 2)
    assert [len(x) for x in seen] == [2] * 4 + [2] * 4 + [1] * 4
    fed = torch.cat([seen[0], seen[4], seen[8]])
    for k in range(12):  # every forward of a batch reads the same masked ids
        assert torch.equal(seen[k], fed[(k // 4) * 2:(k // 4) * 2 + len(seen[k])])
    masked = fed != originals
    special = torch.isin(originals, torch.tensor(tok.all_special_ids))
    assert (fed[masked] == tok.mask_token_id).all() and not (masked & special).any()
    for w in range(5):
        eligible = int((~special[w]).sum())
        assert int(masked[w].sum()) == max(1, round(0.15 * eligible)), w
    assert (originals[:, 0] == tok.cls_token_id).all() and (originals[:, -1] == tok.sep_token_id).all()

    model = AutoModelForMaskedLM.from_pretrained(bert).eval()

    def zero_hook(ids):
        handles = []
        for layer, block in enumerate(model.bert.encoder.layer):
            local = [int(i) - layer * BERT_WIDTH for i in ids if int(i) // BERT_WIDTH == layer]
            if local:
                def hook(_m, args, local=local):
                    x = args[0].clone()
                    x[..., local] = 0
                    return (x,)
                handles.append(block.output.dense.register_forward_pre_hook(hook))
        return handles

    def logits(ids=()):
        handles = zero_hook(ids)
        try:
            with torch.no_grad():
                return model(fed).logits[masked].double()
        finally:
            for h in handles:
                h.remove()

    target = originals[masked]
    base = logits()
    base_lp = torch.log_softmax(base, -1)
    for row in result.effects.iter_rows(named=True):
        abl = logits(row["neuron_ids"])
        abl_lp = torch.log_softmax(abl, -1)
        loss = torch.nn.functional.cross_entropy(abl, target)
        base_loss = torch.nn.functional.cross_entropy(base, target)
        assert row["tokens"] == int(masked.sum())
        assert row["loss"] == pytest.approx(float(loss), abs=1e-5)
        assert row["baseline_loss"] == pytest.approx(float(base_loss), abs=1e-5)
        assert row["kl"] == pytest.approx(float((base_lp.exp() * (base_lp - abl_lp)).sum(-1)
                                                .mean()), abs=1e-6)
        assert row["top1_agreement"] == pytest.approx(
            float((abl.argmax(-1) == base.argmax(-1)).double().mean()))
    assert result.effects.filter(result.effects["kind"] == "subset")["delta_loss"][0] != 0


def test_encoder_masks_follow_the_seed(encoder_run, corpus_file, monkeypatch):
    storage, _, root = encoder_run
    masks = {}
    for seed, name in ((42, "a"), (42, "b"), (7, "c")):
        seen = fed_inputs(monkeypatch)
        run(encoder_config(storage, root, corpus_file, seed=seed, controls=0, overwrite=True,
                           batch_size=5 if name == "b" else 2), storage)
        masks[name] = torch.cat(seen[0::2])  # each batch: a baseline and a subset forward
        assert len(masks[name]) == 5
    assert torch.equal(masks["a"], masks["b"])  # the same masks whatever the batch size
    assert not torch.equal(masks["a"], masks["c"])


@pytest.mark.parametrize("case", ["prompts", "headless", "no-mask-token"])
def test_encoder_refusals_write_nothing(encoder_run, corpus_file, tmp_path, capsys, case):
    storage, _, root = encoder_run
    args = ["ablate", "--storage", str(storage.root), "--run", "e", "--subset-files",
            str(root / "sub.npy"), "--corpus", str(corpus_file), "--num-samples", "2",
            "--max-length", "12", "--controls", "1", "--device", "cpu", "--quiet", "--overwrite"]
    if case == "prompts":
        args += ["--prompts", str(root / "p.csv")]
        message = "is an encoder, which cannot generate: drop --prompts"
    elif case == "headless":
        args += ["--model", str(save_micro_bert(tmp_path / "base", head=False))]
        message = "does not ship the weights of its masked-LM head (cls.predictions"
    else:
        args += ["--model", str(save_micro_bert(tmp_path / "bpe", wordpiece=False))]
        message = "has no mask token"
    before = files_under(storage.root)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert files_under(storage.root) == before


def test_generate_refuses_an_encoder(encoder_run):
    from transformers import AutoModelForMaskedLM

    from pipeline.models.generation import generate

    model = AutoModelForMaskedLM.from_pretrained(encoder_run[1]).eval()
    with pytest.raises(UserError, match="not a causal LM and cannot generate"):
        generate(model, [2, 10, 11], new_tokens=3, num_samples=1, temperature=0, top_k=0,
                 generator=torch.Generator(), device=torch.device("cpu"))


def test_causal_refusals_write_nothing(runs, corpus_file, tmp_path, capsys):
    """A base-model folder without an LM head, and windows longer than the context."""
    import transformers as tf

    from pipeline.models.micro import make_tokenizer

    storage, csv = runs
    tok = make_tokenizer(tmp_path / "trunk")
    torch.manual_seed(0)
    config = tf.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_inner=40, n_positions=128,
                           vocab_size=len(tok), tie_word_embeddings=False)
    tf.GPT2Model(config).save_pretrained(tmp_path / "trunk")
    before = files_under(storage.root)
    common = ["ablate", "--storage", str(storage.root), "--run", "r", "--subset-files",
              str(storage.root / "five.npy"), "--corpus", str(corpus_file), "--num-samples", "2",
              "--controls", "0", "--device", "cpu", "--quiet", "--overwrite"]
    capsys.readouterr()
    assert main(common + ["--model", str(tmp_path / "trunk"), "--max-length", "8"]) == 2
    assert "does not ship the weights of its LM head (lm_head.weight" in capsys.readouterr().err
    assert main(common + ["--max-length", "200"]) == 2
    assert "200 positions are needed but the model has 128" in capsys.readouterr().err
    assert main(common + ["--max-length", "8", "--prompts", str(tmp_path / "long.csv")]) == 2
    capsys.readouterr()
    (tmp_path / "long.csv").write_text('prompts,number_of_new_tokens,num_samples\n"the value",'
                                       '130,1\n')
    assert main(common + ["--max-length", "8", "--prompts", str(tmp_path / "long.csv")]) == 2
    assert "prompt 0 with its number_of_new_tokens is too long" in capsys.readouterr().err
    assert files_under(storage.root) == before
