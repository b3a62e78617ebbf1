"""Inputs of an extraction: a text corpus cut into token windows, or a prompts CSV.

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


def iter_windows(
    documents: Iterable[str], tokenizer, *, max_length: int, num_samples: int
) -> Iterator[list[int]]:
    """Token windows of exactly `max_length` ids: documents joined by EOS, cut in order."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    buffer: list[int] = []
    made = 0
    for doc in documents:
        buffer.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            buffer.append(eos)
        while len(buffer) >= max_length and made < num_samples:
            yield buffer[:max_length]
            buffer = buffer[max_length:]
            made += 1
        if made >= num_samples:
            return


def corpus_windows(options, tokenizer) -> Iterator[list[int]]:
    """The windows of a stage's WindowOptions (corpus, num_samples, max_length, ...), streamed.

    The first window is read before this returns, so a corpus that gives none fails at once
    with a one-line error, before the stage writes anything."""
    docs = iter_documents(options.corpus, dataset_config=options.dataset_config,
                          split=options.split, text_column=options.text_column)
    windows = iter_windows(docs, tokenizer, max_length=options.max_length,
                           num_samples=options.num_samples)
    first = next(windows, None)
    if first is None:
        raise UserError(f"corpus {options.corpus!r} gives no window of {options.max_length} "
                        "tokens: lower --max-length or give more text")
    return itertools.chain([first], windows)


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
    """Prompts in the reference CSV format `prompts,number_of_new_tokens,num_samples`."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError) as e:
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
