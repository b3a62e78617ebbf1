"""The built-in corpus: docstrings and comment blocks of the installed Python standard library.

A document is one docstring (module, class or function, via `ast.get_docstring`) or one block
of consecutive whole-line comments joined into a paragraph, in source order. Files are visited
in sorted relative-path order (site-packages, `test`/`tests` folders and idlelib are skipped;
files that do not parse are skipped), so the corpus is deterministic for a given interpreter.

A file belongs to the held-out split iff crc32 of its relative path falls in the held-out
bucket (about 5% of files), so held-out text is never seen in training. Nothing is cached on
disk; the extraction (a few seconds) is memoised within the process.
"""

from __future__ import annotations

import ast
import functools
import logging
import sysconfig
import zlib
from pathlib import Path

from pipeline.errors import UserError

log = logging.getLogger(__name__)

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib",
                       "__pycache__"})
HELDOUT_PERCENT = 5
SPLITS = ("train", "heldout")
MIN_CHARS = 20  # shorter docstrings/comment blocks ("Return x.") carry little text

_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _python_files(root: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of the standard library's modules, sorted by relative path."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not SKIP_DIRS.intersection(rel.parts[:-1]):
            files.append((rel.as_posix(), path))
    files.sort()
    return files


def _file_documents(source: str) -> list[str]:
    """Docstrings and comment blocks of one module, in source order."""
    tree = ast.parse(source)
    found: list[tuple[int, str]] = []
    in_string: set[int] = set()  # lines inside multi-line string literals are not comments
    for node in ast.walk(tree):
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node)
            if doc:
                found.append((node.body[0].lineno, doc))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.end_lineno and node.end_lineno > node.lineno:
                in_string.update(range(node.lineno + 1, node.end_lineno + 1))
    block: list[str] = []
    start = 0
    for lineno, line in enumerate(source.splitlines(), start=1):
        stripped = line.lstrip()
        if stripped.startswith("#") and lineno not in in_string:
            text = stripped.lstrip("#").strip()
            if lineno <= 2 and (text.startswith("!") or "coding" in text):
                continue  # shebang / encoding declaration
            if any(c.isalnum() for c in text):  # skip rulers such as "# -------"
                if not block:
                    start = lineno
                block.append(text)
                continue
            if text:
                continue  # a ruler inside a block does not end it
        if block:
            found.append((start, " ".join(block)))
            block = []
    if block:
        found.append((start, " ".join(block)))
    found.sort(key=lambda item: item[0])
    return [text for _, text in found if len(text) >= MIN_CHARS]


@functools.lru_cache(maxsize=1)
def _documents_by_file() -> tuple[tuple[str, tuple[str, ...]], ...]:
    root = stdlib_root()
    out = []
    skipped = 0
    for rel, path in _python_files(root):
        try:
            docs = _file_documents(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError, RecursionError):
            skipped += 1
            continue
        if docs:
            out.append((rel, tuple(docs)))
    log.debug("stdlib corpus: %d files with text, %d skipped", len(out), skipped)
    return tuple(out)


def documents_with_paths() -> list[tuple[str, str]]:
    """(relative path of the source file, document) pairs, in corpus order."""
    return [(rel, doc) for rel, docs in _documents_by_file() for doc in docs]


def collect_documents() -> list[str]:
    """Every document of the corpus (both splits), in corpus order."""
    return [doc for _, docs in _documents_by_file() for doc in docs]


def is_heldout(relative_path: str) -> bool:
    """Whether a source file (path relative to the stdlib root) belongs to the held-out split."""
    return zlib.crc32(relative_path.encode("utf-8")) % 100 < HELDOUT_PERCENT


@functools.lru_cache(maxsize=2)
def _split(split: str) -> tuple[str, ...]:
    want = split == "heldout"
    return tuple(doc for rel, docs in _documents_by_file() if is_heldout(rel) == want
                 for doc in docs)


def split_documents(split: str) -> list[str]:
    """The documents of one split: "train" (about 95% of files) or "heldout" (the rest)."""
    if split not in SPLITS:
        raise UserError(f"stdlib corpus split {split!r} is unknown: use 'train' or 'heldout'")
    return list(_split(split))
