"""Corpus windows and their framing (BOS, [CLS] ... [SEP], concat or document starts), and the
token classes of the rows left out of the accumulators, checked against cuts of the token stream
written out by hand and plain loops, on micro tokenizers of three families built in-process."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import types

import numpy as np
import pytest

from pipeline.core.config import RowFilter, WindowOptions, add_arguments, from_args
from pipeline.core.errors import UserError
from pipeline.core.inputs import (
    TOKEN_CLASSES,
    WINDOW_MODES,
    Framing,
    TokenClasses,
    corpus_windows,
    default_prepend_bos,
    framing_for,
    iter_documents,
    iter_windows,
    parse_exclude,
)
from pipeline.models.micro import WORDS, make_tokenizer, synthetic_texts

# -- micro tokenizers of three families


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """GPT-2-like: bos = eos = <|endoftext|>, adds nothing when encoding."""
    return make_tokenizer(tmp_path_factory.mktemp("gpt2-tok"))


@pytest.fixture(scope="module")
def no_bos(tmp_path_factory):
    """Qwen-like: an EOS but no BOS token."""
    from transformers import GPT2Tokenizer

    directory = tmp_path_factory.mktemp("nobos-tok")
    make_tokenizer(directory)
    return GPT2Tokenizer.from_pretrained(directory, bos_token=None)


def _llama(add_bos: bool):
    """Llama-like: Metaspace BPE with byte fallback, <s> added in front when encoding."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import LlamaTokenizer

    bpe = SentencePieceBPETokenizer()
    bpe.train_from_iterator(synthetic_texts(200), vocab_size=120, show_progress=False,
                            special_tokens=["<unk>", "<s>", "</s>"])
    model = json.loads(bpe._tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):  # byte fallback: "\n" becomes <0x0A>
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    vocab.setdefault("s\n", len(vocab))  # a token with a newline inside other text
    return LlamaTokenizer(vocab=vocab, merges=[tuple(m) for m in model["merges"]],
                          add_bos_token=add_bos)


@pytest.fixture(scope="module")
def llama():
    return _llama(True)


def _bert(**special):
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    wordpiece = BertWordPieceTokenizer()
    wordpiece.train_from_iterator(synthetic_texts(200), vocab_size=100, show_progress=False)
    vocab = wordpiece.get_vocab()
    for token in special.values():
        vocab.setdefault(token, len(vocab))
    return BertTokenizer(vocab=vocab, **special)


@pytest.fixture(scope="module")
def bert():
    """BERT-like: WordPiece, [CLS] ... [SEP] when encoding, a pad id, no BOS/EOS."""
    return _bert()


@pytest.fixture(scope="module")
def bert_bos():
    """An encoder with BOS / EOS ids besides (and unlike) its [CLS] / [SEP]."""
    return _bert(bos_token="<s>", eos_token="</s>")


def _docs(n: int = 40, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 25))]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, len(words)), "\n")
        docs.append(" ".join(words))
    return docs


# -- the reference: a cut of the token stream, written out


def _stream(docs, tok, separator):
    """The joined token stream and the offset of every document start in it."""
    stream, starts = [], []
    for doc in docs:
        starts.append(len(stream))
        stream += tok.encode(doc, add_special_tokens=False)
        if separator is not None:
            stream.append(separator)
    return stream, starts


def _reference(docs, tok, *, prefix, suffix, separator, mode, max_length, n):
    """concat: consecutive slices of the stream. document: a slice from a document start, the
    next one from the first document start at or after its end."""
    stream, starts = _stream(docs, tok, separator)
    body = max_length - len(prefix) - len(suffix)
    if mode == "concat":
        begins = list(range(0, len(stream) - body + 1, body))
    else:
        begins, at = [], 0
        while at is not None and at + body <= len(stream):
            begins.append(at)
            at = next((s for s in starts if s >= at + body), None)
    return [list(prefix) + stream[b:b + body] + list(suffix) for b in begins[:n]]


def test_a_cut_by_hand():
    """Four documents of word ids, cut into windows of 4 with a BOS prefix."""
    vocab = {w: i for i, w in enumerate("BOS EOS a b c d e f g h i".split())}

    class Words:
        bos_token_id, eos_token_id = 0, 1

        def __call__(self, text, add_special_tokens=True):
            ids = [vocab[w] for w in text.split()]
            return {"input_ids": ([0] if add_special_tokens else []) + ids}

    docs = ["a b c", "d e", "f g h i", "a"]
    a, b, c, d, e, f, g, h, i = range(2, 11)
    E = 1
    concat = list(iter_windows(docs, Words(), max_length=4, num_samples=9,
                               framing=framing_for(Words(), causal=True, prepend_bos=None,
                                                   window_mode="concat")))
    assert concat == [[0, a, b, c], [0, E, d, e], [0, E, f, g], [0, h, i, E]]
    document = list(iter_windows(docs, Words(), max_length=4, num_samples=9,
                                 framing=framing_for(Words(), causal=True, prepend_bos=None,
                                                     window_mode="document")))
    assert document == [[0, a, b, c], [0, d, e, E], [0, f, g, h]]  # "a" + EOS: 2 < 3 ids
    plain = list(iter_windows(docs, Words(), max_length=4, num_samples=2))
    assert plain == [[a, b, c, E], [d, e, E, f]]


FRAMINGS = [  # tokenizer, causal, prepend_bos, expected (prefix, suffix, separator) by name
    ("gpt2", True, None, ((), (), "eos")),
    ("gpt2", True, False, ((), (), "eos")),
    ("gpt2", True, True, (("bos",), (), "eos")),
    ("no_bos", True, None, ((), (), "eos")),
    ("llama", True, None, (("bos",), (), "eos")),
    ("llama", True, True, (("bos",), (), "eos")),
    ("llama", True, False, ((), (), "eos")),
    ("bert", False, None, (("cls",), ("sep",), "sep")),
    ("bert", False, True, (("cls",), ("sep",), "sep")),   # prepend_bos does not apply
    ("bert", False, False, (("cls",), ("sep",), "sep")),
    ("bert_bos", False, None, (("cls",), ("sep",), "sep")),  # [CLS] / [SEP] before BOS / EOS
]


@pytest.mark.parametrize("mode", WINDOW_MODES)
@pytest.mark.parametrize("name,causal,prepend_bos,expected", FRAMINGS)
def test_windows_are_the_hand_cut_of_the_stream(request, name, causal, prepend_bos, expected,
                                                mode):
    tok = request.getfixturevalue(name)
    special = lambda n: getattr(tok, f"{n}_token_id")  # noqa: E731
    prefix, suffix, separator = ([special(n) for n in expected[0]],
                                 [special(n) for n in expected[1]], special(expected[2]))
    assert None not in prefix + suffix + [separator]
    framing = framing_for(tok, causal=causal, prepend_bos=prepend_bos, window_mode=mode)
    assert framing == Framing(tuple(prefix), tuple(suffix), separator, mode)
    docs = _docs()
    for max_length in (len(prefix) + len(suffix) + 1, 7, 16, 33):
        got = list(iter_windows(docs, tok, max_length=max_length, num_samples=1000,
                                framing=framing))
        want = _reference(docs, tok, prefix=prefix, suffix=suffix, separator=separator,
                          mode=mode, max_length=max_length, n=1000)
        assert len(want) > 3
        assert got == want
        assert all(len(w) == max_length for w in got)
        assert got[:3] == list(iter_windows(docs, tok, max_length=max_length, num_samples=3,
                                            framing=framing))


def test_document_windows_start_at_document_starts(llama):
    docs = _docs()
    framing = framing_for(llama, causal=True, prepend_bos=None, window_mode="document")
    heads = [llama.encode(d, add_special_tokens=False) + [llama.eos_token_id] for d in docs]
    windows = list(iter_windows(docs, llama, max_length=20, num_samples=100, framing=framing))
    assert len(windows) > 5 and all(w[0] == llama.bos_token_id for w in windows)
    assert all(any(w[1:1 + len(h)] == h[:19] for h in heads) for w in windows)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_no_framing_gives_the_plain_windows(request, name):
    """framing=None: documents joined by EOS ([SEP] without one), cut in order, nothing added."""
    tok = request.getfixturevalue(name)
    separator = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    docs = _docs()
    want = _reference(docs, tok, prefix=[], suffix=[], separator=separator, mode="concat",
                      max_length=12, n=50)
    assert list(iter_windows(docs, tok, max_length=12, num_samples=50)) == want


def test_default_prepend_bos_follows_the_tokenizer(gpt2, no_bos, llama, bert):
    assert default_prepend_bos(llama) is True
    assert default_prepend_bos(_llama(False)) is False
    assert default_prepend_bos(gpt2) is False   # bos = eos, never added
    assert default_prepend_bos(no_bos) is False
    assert default_prepend_bos(bert) is False   # adds [CLS], but has no BOS


def test_corpus_windows_read_the_options(tmp_path, llama, bert):
    docs = _docs()
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(docs))
    read = list(iter_documents(str(corpus)))  # paragraphs, stripped
    for mode in WINDOW_MODES:
        for prepend in (None, True, False):
            options = WindowOptions(corpus=str(corpus), num_samples=5, max_length=10,
                                    prepend_bos=prepend, window_mode=mode)
            prefix = [] if prepend is False else [llama.bos_token_id]
            want = _reference(read, llama, prefix=prefix, suffix=[], separator=2, mode=mode,
                              max_length=10, n=5)
            assert list(corpus_windows(options, llama)) == want
        encoder = list(corpus_windows(WindowOptions(corpus=str(corpus), num_samples=5,
                                                    max_length=10, window_mode=mode),
                                      bert, causal=False))
        assert encoder == _reference(read, bert, prefix=[2], suffix=[3], separator=3,
                                     mode=mode, max_length=10, n=5)
    # options without the framing fields: the plain windows, even for a BOS tokenizer
    bare = types.SimpleNamespace(corpus=str(corpus), dataset_config=None, split="train",
                                 text_column="text", num_samples=5, max_length=10)
    assert list(corpus_windows(bare, llama)) == _reference(
        read, llama, prefix=[], suffix=[], separator=2, mode="concat", max_length=10, n=5)


def test_framing_errors(tmp_path, no_bos, llama, bert):
    with pytest.raises(UserError, match="no BOS token: drop --prepend-bos") as error:
        framing_for(no_bos, causal=True, prepend_bos=True, window_mode="concat")
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="--window-mode 'packed' is unknown"):
        framing_for(llama, causal=True, prepend_bos=None, window_mode="packed")
    with pytest.raises(UserError, match="--window-mode"):
        WindowOptions(window_mode="packed").check_windows()
    framing = framing_for(llama, causal=True, prepend_bos=None, window_mode="concat")
    with pytest.raises(UserError, match="--max-length 1 leaves no room .* at least 2") as error:
        iter_windows(_docs(), llama, max_length=1, num_samples=1, framing=framing)
    assert "\n" not in str(error.value)
    encoder = framing_for(bert, causal=False, prepend_bos=None, window_mode="document")
    with pytest.raises(UserError, match="--max-length 2 leaves no room .* at least 3"):
        iter_windows(_docs(), bert, max_length=2, num_samples=1, framing=encoder)
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(_docs()))
    with pytest.raises(UserError, match="--max-length 1 leaves no room"):
        corpus_windows(WindowOptions(corpus=str(corpus), max_length=1), llama)


# -- token classes and included rows


def test_parse_exclude():
    assert parse_exclude("bos,eos") == ("bos", "eos")
    assert parse_exclude(" Newline , bos,,bos") == ("bos", "newline")
    assert parse_exclude(",".join(reversed(TOKEN_CLASSES))) == TOKEN_CLASSES
    for empty in (None, "", "none", " None "):
        assert parse_exclude(empty) == ()
    with pytest.raises(UserError, match="unknown token class 'tab': .*bos, eos, pad, newline"):
        parse_exclude("bos,tab")


def _reference_included(tok, ids, exclude, skip):
    """A plain loop over every position, decoding every token."""
    def ids_of(*names):
        return {getattr(tok, n) for n in names if getattr(tok, n, None) is not None}

    members = {"bos": ids_of("bos_token_id", "cls_token_id"),
               "eos": ids_of("eos_token_id", "sep_token_id"), "pad": ids_of("pad_token_id")}
    out = []
    for seq in ids.tolist():
        for position, token in enumerate(seq):
            classes = {name for name, group in members.items() if token in group}
            if "\n" in tok.decode([token]):
                classes.add("newline")
            if tok("\n", add_special_tokens=False)["input_ids"] == [token]:
                classes.add("newline-token")  # the reference's model.to_single_token('\n')
            out.append(position >= skip and not classes & set(exclude))
    return np.array(out, dtype=bool)


EXCLUDES = [(), ("bos",), ("eos",), ("pad",), ("newline",), ("newline-token",),
            ("pad", "newline-token"), ("bos", "eos", "pad", "newline")]


@pytest.mark.parametrize("name", ["gpt2", "no_bos", "llama", "bert", "bert_bos"])
def test_included_rows_against_a_loop(request, name):
    tok = request.getfixturevalue(name)
    causal = not name.startswith("bert")
    framing = framing_for(tok, causal=causal, prepend_bos=None if name == "no_bos" else True,
                          window_mode="document")
    windows = np.array(list(iter_windows(_docs(), tok, max_length=12, num_samples=20,
                                         framing=framing)))
    rng = np.random.default_rng(0)
    # every vocabulary id (and two past it) somewhere, and the pad id where there is one
    everything = np.arange(len(tok) + 2)
    everything = np.concatenate([everything, rng.integers(0, len(tok), -everything.size % 12)])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = np.concatenate([windows, rng.permutation(everything).reshape(-1, 12),
                          np.full((1, 12), pad)])
    classes = TokenClasses(tok)
    for exclude in EXCLUDES:
        for skip in (0, 1, 3, 12, 20):
            got = classes.included(ids, exclude, skip)
            assert got.dtype == bool and got.shape == (ids.size,)
            np.testing.assert_array_equal(got, _reference_included(tok, ids, exclude, skip),
                                          err_msg=f"{name} {exclude} {skip}")
    newline = classes.included(ids, ("newline",), 0)
    # the corpus has newlines; WordPiece drops them as whitespace, the others keep them
    assert newline.all() == name.startswith("bert")
    if name == "llama":
        inside = tok.convert_tokens_to_ids("s\n")  # a newline inside other text
        assert not classes.included(np.array([[inside]]), ("newline",), 0)[0]
        # newline-token is the token of "\n" alone, not every token holding one
        assert classes.included(np.array([[inside]]), ("newline-token",), 0)[0]
    alone = ~classes.included(ids, ("newline-token",), 0)
    assert alone.sum() <= newline.size - newline.sum()
    assert not (alone & newline).any()  # a subset of the newline class
    excluded_pad = ~classes.included(ids, ("pad",), 0)
    assert excluded_pad.any() == (tok.pad_token_id is not None)


def test_each_id_is_decoded_at_most_once(llama):
    class Counting:
        def __init__(self, inner):
            self.inner, self.calls = inner, []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def decode(self, ids):
            self.calls.append(tuple(ids))
            return self.inner.decode(ids)

    counting = Counting(llama)
    classes = TokenClasses(counting)
    rng = np.random.default_rng(1)
    first, second = rng.integers(0, 200, (4, 16)), rng.integers(100, 300, (4, 16))
    for ids in (first, second, first):
        classes.included(ids, ("newline",), 0)
    decoded = [c[0] for c in counting.calls]
    assert all(len(c) == 1 for c in counting.calls)
    assert sorted(decoded) == sorted(set(np.concatenate([first, second]).ravel().tolist()))
    classes.included(first, ("bos", "eos"), 0)  # other classes decode nothing
    assert len(counting.calls) == len(decoded)


def test_included_rows_errors(gpt2):
    classes = TokenClasses(gpt2)
    with pytest.raises(UserError, match="unknown token class 'tab'"):
        classes.included(np.zeros((1, 3), dtype=int), ("tab",), 0)
    with pytest.raises(UserError, match="--skip-positions must be at least 0"):
        classes.included(np.zeros((1, 3), dtype=int), (), -1)


# -- the options


@dataclasses.dataclass(kw_only=True)
class Rows(WindowOptions, RowFilter):
    def __post_init__(self):
        self.check_windows()
        self.check_rows()


def test_row_filter_options():
    assert Rows().excluded_classes == () and Rows().skip_positions == 0
    assert Rows(exclude="eos,bos", skip_positions=2).excluded_classes == ("bos", "eos")
    with pytest.raises(UserError, match="--skip-positions must be at least 0"):
        Rows(skip_positions=-1)
    with pytest.raises(UserError, match="unknown token class 'sink'"):
        Rows(exclude="bos,sink")


def test_framing_and_row_options_on_the_command_line():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Rows)
    default = from_args(Rows, parser.parse_args([]))
    assert (default.prepend_bos, default.window_mode, default.exclude) == (None, "concat", None)
    config = from_args(Rows, parser.parse_args(
        ["--no-prepend-bos", "--window-mode", "document", "--exclude", "bos,newline",
         "--skip-positions", "2"]))
    assert (config.prepend_bos, config.window_mode, config.excluded_classes,
            config.skip_positions) == (False, "document", ("bos", "newline"), 2)
    assert from_args(Rows, parser.parse_args(["--prepend-bos"])).prepend_bos is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--window-mode", "packed"])
    choices = dataclasses.fields(WindowOptions)
    assert next(f for f in choices if f.name == "window_mode").metadata["choices"] == WINDOW_MODES
