"""Inputs of an extraction: a text corpus cut into token windows, or a prompts CSV.

A window is exactly max_length ids: the model's framing tokens (BOS for causal models trained
with one, [CLS] ... [SEP] for encoders) around document ids, cut either from the joined
documents in order (`concat`) or from a document start (`document`). TokenClasses says which
rows (BOS, EOS, pad, newline tokens, the first positions) accumulators leave out.

Corpus sources: `stdlib` (train split of the built-in docstring corpus), `stdlib:heldout`,
a local .txt/.jsonl/.json/.parquet/.csv file, or a Hugging Face `datasets` name (streamed,
used when the hub or its cache is reachable).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from pipeline.core.errors import UserError

log = logging.getLogger(__name__)

PROMPT_COLUMNS = ("prompts", "number_of_new_tokens", "num_samples")


# -- corpus documents


def iter_documents(
    corpus: str, *, dataset_config: str | None = None, split: str = "train",
    text_column: str = "text",
) -> Iterator[str]:
    """Documents (strings) of a corpus, in a deterministic order."""
    if corpus in ("stdlib", "stdlib:train", "stdlib:heldout"):
        from pipeline.core.stdlib_corpus import split_documents

        yield from split_documents("heldout" if corpus.endswith("heldout") else "train")
        return
    path = Path(corpus)
    if path.exists():
        yield from _file_documents(path, text_column)
        return
    if any(corpus.endswith(ext) for ext in (".txt", ".jsonl", ".json", ".parquet", ".csv")):
        raise UserError(f"corpus file {corpus!r} does not exist: check the path")
    yield from _hub_documents(corpus, dataset_config, split, text_column)


def _file_documents(path: Path, text_column: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            if text_column not in pf.schema_arrow.names:
                raise UserError(
                    f"corpus {str(path)!r} has no column {text_column!r} "
                    f"(columns: {pf.schema_arrow.names}): pass --text-column"
                )
            for batch in pf.iter_batches(columns=[text_column], batch_size=1024):
                yield from (t for t in batch.column(0).to_pylist() if t)
        elif suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if text_column not in (reader.fieldnames or []):
                    raise UserError(
                        f"corpus {str(path)!r} has no column {text_column!r} "
                        f"(columns: {reader.fieldnames}): pass --text-column"
                    )
                yield from (row[text_column] for row in reader if row[text_column])
        elif suffix in (".jsonl", ".json"):
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    text = record.get(text_column) if isinstance(record, dict) else None
                    if text is None:
                        raise UserError(
                            f"corpus {str(path)!r} line {n} has no field {text_column!r}: "
                            "pass --text-column"
                        )
                    yield text
        else:  # plain text: one document per blank-line-separated paragraph
            text = path.read_text(encoding="utf-8")
            yield from (p.strip() for p in text.split("\n\n") if p.strip())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"corpus file {str(path)!r} cannot be read ({e}): check the file") from None


def _hub_documents(
    name: str, config: str | None, split: str, text_column: str
) -> Iterator[str]:
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - the hub raises many types; all mean "not available"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"corpus {name!r} is neither a local file nor a reachable dataset ({first[:200]}): "
            "pass a local .txt/.jsonl/.parquet/.csv file or --corpus stdlib"
        ) from None
    for record in ds:
        text = record.get(text_column)
        if text is None:
            raise UserError(f"dataset {name!r} has no column {text_column!r}: pass --text-column")
        if text:
            yield text


# -- framing: the special tokens around a window, and where windows start


WINDOW_MODES = ("concat", "document")


@dataclass(frozen=True)
class Framing:
    """The fixed tokens of every window and how documents fill the rest.

    prefix / suffix: ids at the start / end of every window ((bos,) for causal models trained
    with one; ([CLS],) / ([SEP],) for encoders). separator: the id after every document (EOS,
    [SEP] for encoders; None = none). mode: `concat` cuts the joined documents in order, so a
    window may start mid-document; `document` starts every window at a document start."""

    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    separator: int | None = None
    mode: str = "concat"

    def body_length(self, max_length: int) -> int:
        """Document ids per window of `max_length` ids; a one-line error when none fit."""
        frame = len(self.prefix) + len(self.suffix)
        if max_length <= frame:
            raise UserError(f"--max-length {max_length} leaves no room for text beside the "
                            f"{frame} framing token(s) of this model: raise --max-length to at "
                            f"least {frame + 1}")
        return max_length - frame


def check_window_mode(mode: str) -> None:
    if mode not in WINDOW_MODES:
        raise UserError(f"--window-mode {mode!r} is unknown: use one of {', '.join(WINDOW_MODES)}")


def default_prepend_bos(tokenizer) -> bool:
    """Whether the model was trained with a BOS first: true iff its tokenizer adds one itself
    when encoding with special tokens (Llama, Mistral, Gemma do; GPT-2, Pythia, Qwen do not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    # a probe text: what add_special_tokens puts in front of it is the tokenizer's own framing
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return framed[:1] == [bos] and plain[:1] != [bos]


def _default_separator(tokenizer) -> int | None:
    eos = tokenizer.eos_token_id
    return eos if eos is not None else getattr(tokenizer, "sep_token_id", None)


def framing_for(tokenizer, *, causal: bool, prepend_bos: bool | None = None,
                window_mode: str = "concat") -> Framing:
    """The framing of a model's windows. Causal models: BOS first when `prepend_bos` (None =
    the tokenizer's own default, see default_prepend_bos). Encoders always get their special
    tokens, [CLS] ... [SEP] (BOS / EOS when they have none); `prepend_bos` does not apply."""
    check_window_mode(window_mode)
    if not causal:
        cls = _first_id(tokenizer, "cls_token_id", "bos_token_id")
        sep = _first_id(tokenizer, "sep_token_id", "eos_token_id")
        return Framing(prefix=() if cls is None else (cls,), suffix=() if sep is None else (sep,),
                       separator=sep, mode=window_mode)
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos and bos is None:
        raise UserError("--prepend-bos: the tokenizer of this model has no BOS token: "
                        "drop --prepend-bos")
    with_bos = default_prepend_bos(tokenizer) if prepend_bos is None else prepend_bos
    return Framing(prefix=(bos,) if with_bos else (), separator=_default_separator(tokenizer),
                   mode=window_mode)


def _first_id(tokenizer, *names: str) -> int | None:
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return value
    return None


def iter_windows(
    documents: Iterable[str], tokenizer, *, max_length: int, num_samples: int,
    framing: Framing | None = None,
) -> Iterator[list[int]]:
    """Token windows of exactly `max_length` ids: prefix + document ids + suffix.

    Without a framing: no prefix or suffix, documents joined by EOS ([SEP] when there is no
    EOS) and cut in order. The framing is checked here, before the first window is read."""
    if framing is None:
        framing = Framing(separator=_default_separator(tokenizer))
    check_window_mode(framing.mode)
    body = framing.body_length(max_length)
    cut = _concat_bodies if framing.mode == "concat" else _document_bodies
    bodies = cut(_document_ids(documents, tokenizer, framing.separator), body)
    prefix, suffix = list(framing.prefix), list(framing.suffix)
    return (prefix + b + suffix for b in itertools.islice(bodies, max(num_samples, 0)))


def _document_ids(documents: Iterable[str], tokenizer, separator: int | None) -> Iterator[list[int]]:
    """The ids of each document, followed by the separator."""
    tail = [] if separator is None else [separator]
    for doc in documents:
        yield tokenizer(doc, add_special_tokens=False)["input_ids"] + tail


def _concat_bodies(docs: Iterator[list[int]], length: int) -> Iterator[list[int]]:
    buffer: list[int] = []
    for ids in docs:
        buffer.extend(ids)
        while len(buffer) >= length:
            yield buffer[:length]
            buffer = buffer[length:]


def _document_bodies(docs: Iterator[list[int]], length: int) -> Iterator[list[int]]:
    """Whole documents packed from a document start; the one that does not fit is cut to fill
    the window and its rest dropped, so the next window starts at the next document."""
    body: list[int] = []
    for ids in docs:
        body.extend(ids[:length - len(body)])
        if len(body) == length:
            yield body
            body = []


def corpus_windows(options, tokenizer, *, causal: bool = True) -> Iterator[list[int]]:
    """The windows of a stage's WindowOptions (corpus, num_samples, max_length, prepend_bos,
    window_mode, ...), streamed; `causal=False` frames an encoder's windows.

    The first window is read before this returns, so a corpus that gives none fails at once
    with a one-line error, before the stage writes anything."""
    # options without the framing fields (older callers) get today's plain windows
    framing = framing_for(tokenizer, causal=causal,
                          prepend_bos=getattr(options, "prepend_bos", False),
                          window_mode=getattr(options, "window_mode", "concat"))
    windows = iter_windows(
        iter_documents(options.corpus, dataset_config=options.dataset_config,
                       split=options.split, text_column=options.text_column),
        tokenizer, max_length=options.max_length, num_samples=options.num_samples,
        framing=framing)
    first = next(windows, None)
    if first is None:
        raise UserError(f"corpus {options.corpus!r} gives no window of {options.max_length} "
                        "tokens: lower --max-length or give more text")
    return itertools.chain([first], windows)


# -- token classes: the rows left out of every accumulator


TOKEN_CLASSES = ("bos", "eos", "pad", "newline", "newline-token")


def parse_exclude(text: str | None) -> tuple[str, ...]:
    """The token classes of an --exclude value such as "bos,eos" ("none" or empty: none)."""
    if text is None or text.strip().lower() in ("", "none"):
        return ()
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    for name in names:
        _check_class(name)
    return tuple(c for c in TOKEN_CLASSES if c in names)


def _check_class(name: str) -> None:
    if name not in TOKEN_CLASSES:
        raise UserError(f"--exclude: unknown token class {name!r}: use a comma-separated list "
                        f"of {', '.join(TOKEN_CLASSES)} (or none)")


class TokenClasses:
    """Which token ids belong to each class of TOKEN_CLASSES, for one tokenizer.

    bos: the BOS or [CLS] id; eos: the EOS or [SEP] id; pad: the pad id (when there is one);
    newline: every id whose decoded text contains a newline (each id decoded at most once);
    newline-token: only the id that "\\n" alone encodes to (the universal-neurons reference drops
    that one, not "\\n\\n" or " \\n"); nothing where "\\n" is several tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        ids = {"bos": ("bos_token_id", "cls_token_id"), "eos": ("eos_token_id", "sep_token_id"),
               "pad": ("pad_token_id",)}
        self.special = {
            name: np.array(sorted({v for a in attrs
                                   if (v := getattr(tokenizer, a, None)) is not None}),
                           dtype=np.int64)
            for name, attrs in ids.items()}
        self._decoded = np.zeros(0, dtype=bool)   # ids whose newline flag is known
        self._newline = np.zeros(0, dtype=bool)

    def newline(self, ids: np.ndarray) -> np.ndarray:
        """Whether each id's decoded text contains a newline (same shape as `ids`)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return np.zeros(ids.shape, dtype=bool)
        top = int(ids.max()) + 1
        if top > self._decoded.size:
            grow = top - self._decoded.size
            self._decoded = np.concatenate([self._decoded, np.zeros(grow, dtype=bool)])
            self._newline = np.concatenate([self._newline, np.zeros(grow, dtype=bool)])
        for i in np.unique(ids[~self._decoded[ids]]).tolist():
            self._newline[i] = "\n" in self._decode(i)
            self._decoded[i] = True
        return self._newline[ids]

    def _decode(self, token_id: int) -> str:
        try:
            return self.tokenizer.decode([token_id])
        except (IndexError, KeyError, OverflowError, TypeError, ValueError):
            return ""  # an id past the tokenizer's vocabulary (a padded embedding) has no text

    def member(self, ids: np.ndarray, name: str) -> np.ndarray:
        """Whether each id is of class `name` (same shape as `ids`)."""
        if name == "newline":
            return self.newline(ids)
        if name == "newline-token" and name not in self.special:
            alone = self.tokenizer.encode("\n", add_special_tokens=False)
            self.special[name] = np.array(alone if len(alone) == 1 else [], np.int64)
        return np.isin(np.asarray(ids), self.special[name])

    def included(self, ids: np.ndarray, exclude: tuple[str, ...] = (),
                 skip_positions: int = 0) -> np.ndarray:
        """bool [n_seq * length], row-major as the tokens table: False for a token of an
        excluded class and for positions < skip_positions of every sequence."""
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        keep = np.ones(ids.shape, dtype=bool)
        for name in exclude:
            _check_class(name)
            keep &= ~self.member(ids, name)
        if skip_positions < 0:
            raise UserError(f"--skip-positions must be at least 0, got {skip_positions}")
        keep[:, :skip_positions] = False
        return keep.reshape(-1)


def input_fingerprint(path: str | Path | None) -> str | None:
    """sha256 of a local input file (corpus or prompts), so a resume sees a changed file."""
    if path is None or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# -- prompts CSV


@dataclass(frozen=True)
class Prompt:
    text: str
    new_tokens: int
    num_samples: int


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts in the reference CSV format `prompts,number_of_new_tokens,num_samples`.

    num_samples may be left out (every prompt is sampled once, said in a log line); a file
    saved by Excel as "CSV UTF-8" starts with a byte-order mark, which is not part of the
    first column's name."""
    path = Path(path)
    try:
        # utf-8-sig: reads plain UTF-8 as is and drops a leading BOM
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = list(reader)
    except UnicodeDecodeError:
        raise UserError(f"prompts file {str(path)!r} is not UTF-8 text: save it as UTF-8 "
                        "(in Excel: CSV UTF-8)") from None
    except OSError as e:
        raise UserError(f"prompts file {str(path)!r} cannot be read ({e}): check the path") from None
    if not columns:
        raise UserError(
            f"prompts file {str(path)!r} is empty: it needs the header "
            f"'{','.join(PROMPT_COLUMNS)}' and at least one row"
        )
    missing = [c for c in PROMPT_COLUMNS[:2] if c not in columns]
    if missing:
        raise UserError(
            f"prompts file {str(path)!r} lacks column(s) {missing} (has {columns}): "
            f"the header must be '{','.join(PROMPT_COLUMNS)}'"
        )
    if "num_samples" not in columns:
        log.info("prompts file %s has no num_samples column: num_samples defaults to 1 (one "
                 "sample per prompt)", path)
    prompts = []
    for n, raw in enumerate(rows, 2):
        row = {(k or "").strip(): (v or "") for k, v in raw.items()}
        values = {}
        for col in PROMPT_COLUMNS[1:]:
            text = row.get(col, "1" if col == "num_samples" else "").strip() or (
                "1" if col == "num_samples" else ""
            )
            try:
                values[col] = int(text)
            except ValueError:
                raise UserError(
                    f"prompts file {str(path)!r} line {n}: {col} is {text!r}, not a whole number"
                ) from None
            if values[col] < 1:
                raise UserError(
                    f"prompts file {str(path)!r} line {n}: {col} must be at least 1, got {text}"
                )
        if not row["prompts"]:
            raise UserError(f"prompts file {str(path)!r} line {n}: the prompt is empty")
        prompts.append(Prompt(row["prompts"], values["number_of_new_tokens"], values["num_samples"]))
    if not prompts:
        raise UserError(f"prompts file {str(path)!r} has a header but no prompts: add rows")
    return prompts
