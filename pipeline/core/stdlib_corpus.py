"""The built-in corpus: docstrings and comment blocks of the installed Python standard library.

Deterministic for a given interpreter: files are visited in sorted order, and a file belongs to
the held-out split iff crc32 of its relative path falls in the held-out bucket (about 5%); a
held-out document whose text also stands in a training file is dropped, so held-out text is
never seen in training.

Parsing the library takes seconds, so the documents are cached under the storage root
(cache/stdlib-corpus-<key>.json, written atomically) when a cache folder is set (`cache_in`;
the CLI sets the root's). The key covers everything that changes the documents: the Python
version and build, the library's folder, every file's path, size and mtime, and the source of
this module (its extraction rules). A cache of another key is rebuilt, never trusted.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import logging
import os
import sys
import sysconfig
import zlib
from pathlib import Path
from typing import Iterator

from pipeline.core.errors import UserError

log = logging.getLogger(__name__)

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
             "__pycache__", "turtledemo", "ensurepip"}
HELDOUT_BUCKETS = 5  # of 100
SPLITS = ("train", "heldout")


def _python_files(root: Path) -> list[Path]:
    """Every .py file under `root` outside SKIP_DIRS, sorted by relative path (skipped folders
    are never walked: site-packages and the tests are most of the tree)."""
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIP_DIRS]
        files += [Path(directory) / n for n in names if n.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _file_documents(source: str) -> list[str]:
    """Docstrings of the module, classes and functions, then blocks of consecutive comments."""
    docs = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 20:
                docs.append(doc)
    # comment blocks: consecutive lines that are only a comment (a cheap scan, no tokenizer)
    block: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if text and not text.startswith("!") and "coding" not in text[:12]:
                block.append(text)
        elif block:
            docs.append(" ".join(block))
            block = []
    if block:
        docs.append(" ".join(block))
    return [d for d in docs if len(d) > 20]


_CACHE: tuple[Path | None, bool] = (None, False)  # (folder, may write it)


@contextlib.contextmanager
def cache_in(directory: str | os.PathLike | None, *, write: bool = True) -> Iterator[None]:
    """Keep the parsed documents in `directory` (None: no cache) within the block; with
    write=False a cache there is read but none is written (a dry run writes nothing)."""
    global _CACHE
    before, _CACHE = _CACHE, (None if directory is None else Path(directory), write)
    try:
        yield
    finally:
        _CACHE = before


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


_PARSED: dict[Path, tuple[tuple[str, str], ...]] = {}  # in this process, by library folder


def collect_documents() -> tuple[tuple[str, str], ...]:
    """(relative path, document) pairs of the whole standard library, in a fixed order: parsed
    once a process, read from the cache folder when it holds them, written there when not."""
    cache_dir, write = _CACHE
    root = stdlib_root()
    docs = _PARSED.get(root)
    if docs is None:
        docs = _PARSED[root] = load_documents(root, cache_dir, write=write)
    elif cache_dir is not None and write:  # parsed before this cache folder was set
        files = _python_files(root)
        key = cache_key(root, files)
        path = cache_path(cache_dir, key)
        if not path.exists():
            _write_cache(path, key, docs)
    return docs


collect_documents.cache_clear = _PARSED.clear  # type: ignore[attr-defined]  # as a new process


def load_documents(root: Path, cache_dir: Path | None = None, *,
                   write: bool = True) -> tuple[tuple[str, str], ...]:
    """The documents of the library at `root`: from the cache of their key when it is there,
    else parsed (and cached when `cache_dir` is given and `write`)."""
    files = _python_files(root)
    if cache_dir is None:
        return parse_documents(root, files)
    key = cache_key(root, files)
    path = cache_path(cache_dir, key)
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("key") == key:
            log.debug("stdlib corpus: %d documents from %s", len(cached["documents"]), path)
            return tuple((rel, doc) for rel, doc in cached["documents"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: parse again
    docs = parse_documents(root, files)
    if write:
        _write_cache(path, key, docs)
    return docs


def parse_documents(root: Path, files: list[Path] | None = None) -> tuple[tuple[str, str], ...]:
    """Parse every file (the slow path, seconds for the whole library)."""
    out = []
    for path in files if files is not None else _python_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            source = path.read_text(encoding="utf-8")
            out.extend((rel, doc) for doc in _file_documents(source))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
    log.debug("stdlib corpus: %d documents parsed", len(out))
    return tuple(out)


def cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"stdlib-corpus-{key}.json"


def cache_key(root: Path, files: list[Path]) -> str:
    """Hash of what the documents depend on: interpreter, library files, extraction rules."""
    h = hashlib.sha256()
    h.update(json.dumps([sys.version, sys.implementation.cache_tag, str(root)]).encode())
    h.update(Path(__file__).read_bytes())  # the rules (SKIP_DIRS, buckets, the parsing)
    for path in files:
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _write_cache(path: Path, key: str, docs: tuple[tuple[str, str], ...]) -> None:
    """Atomically (a reader never sees half a cache), replacing caches of other keys; a root
    that cannot take it (read-only, full) just goes without."""
    from pipeline.core.storage import atomic_path

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"key": key, "documents": docs}), encoding="utf-8")
        for old in path.parent.glob("stdlib-corpus-*.json"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as e:
        log.debug("stdlib corpus not cached in %s: %s", path.parent, e)


def is_heldout(relative_path: str) -> bool:
    return zlib.crc32(relative_path.encode()) % 100 < HELDOUT_BUCKETS


def split_documents(split: str) -> tuple[str, ...]:
    """The documents of one split ("train" or "heldout")."""
    if split not in SPLITS:
        raise UserError(f"stdlib split {split!r} is unknown: use train or heldout")
    docs = collect_documents()  # every time: it also fills a cache folder set since
    memo = _SPLITS.get(split)
    if memo is None or memo[0] is not docs:  # not yet, or the documents were parsed anew
        memo = _SPLITS[split] = (docs, _split(docs, split))
    return memo[1]


_SPLITS: dict[str, tuple[tuple, tuple[str, ...]]] = {}  # split -> (its documents, the split)


def _split(docs: tuple[tuple[str, str], ...], split: str) -> tuple[str, ...]:
    if split == "train":
        return tuple(doc for rel, doc in docs if not is_heldout(rel))
    # a text that also stands in a training file (license blocks, docstrings copied between
    # modules) is not held out: held-out text is never seen in training
    train = {doc for rel, doc in docs if not is_heldout(rel)}
    return tuple(doc for rel, doc in docs if is_heldout(rel) and doc not in train)
