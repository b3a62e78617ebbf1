"""The built-in corpus: docstrings and comment blocks of the installed Python standard library.

Deterministic for a given interpreter: files are visited in sorted order, and a file belongs to
the held-out split iff crc32 of its relative path falls in the held-out bucket (about 5%); a
held-out document whose text also stands in a training file is dropped, so held-out text is
never seen in training.
"""

from __future__ import annotations

import ast
import functools
import logging
import sysconfig
import zlib
from pathlib import Path

from pipeline.core.errors import UserError

log = logging.getLogger(__name__)

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
             "__pycache__", "turtledemo", "ensurepip"}
HELDOUT_BUCKETS = 5  # of 100
SPLITS = ("train", "heldout")


def _python_files(root: Path) -> list[Path]:
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not any(part in SKIP_DIRS for part in rel.parts[:-1]):
            files.append(path)
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


@functools.lru_cache(maxsize=1)
def collect_documents() -> tuple[tuple[str, str], ...]:
    """(relative path, document) pairs of the whole standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in _python_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            source = path.read_text(encoding="utf-8")
            out.extend((rel, doc) for doc in _file_documents(source))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
    log.debug("stdlib corpus: %d documents", len(out))
    return tuple(out)


def is_heldout(relative_path: str) -> bool:
    return zlib.crc32(relative_path.encode()) % 100 < HELDOUT_BUCKETS


@functools.lru_cache(maxsize=2)
def split_documents(split: str) -> tuple[str, ...]:
    """The documents of one split ("train" or "heldout")."""
    if split not in SPLITS:
        raise UserError(f"stdlib split {split!r} is unknown: use train or heldout")
    docs = collect_documents()
    if split == "train":
        return tuple(doc for rel, doc in docs if not is_heldout(rel))
    # a text that also stands in a training file (license blocks, docstrings copied between
    # modules) is not held out: held-out text is never seen in training
    train = {doc for rel, doc in docs if not is_heldout(rel)}
    return tuple(doc for rel, doc in docs if is_heldout(rel) and doc not in train)
