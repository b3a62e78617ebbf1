"""The kernels import and run where no numba cache folder is writable.

Tests run as root, for whom permission bits stop no write, so "not writable" is a path that
cannot be a folder: the kernels' __pycache__ is a regular file, and NUMBA_CACHE_DIR (and numba's
user-wide cache, XDG_CACHE_HOME) point below a regular file. Each case runs in a fresh process
that imports a copy of the package from a temporary folder and calls kernels.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline

# imports the copy and the kernel modules, calls a kernel, prints where numba caches
CHILD = """
import json, sys, tempfile
if sys.argv[1]:
    tempfile.tempdir = sys.argv[1]  # the system's temporary folder, as the child sees it
import numpy as np
from pipeline.kernels import numba_cache
import pipeline.kernels.bitkernels  # decorates the kernels: where cache=True used to raise
from pipeline.kernels.unionfind import union_edges  # compiles fastest: the one called
parent = np.arange(3).reshape(1, 3).copy()
stats = np.zeros((1, 3), np.int64)
union_edges(parent, np.ones((1, 3), np.int64), np.zeros((1, 3), np.bool_), stats,
            np.array([0]), np.array([2]), np.array([0.9]), np.array([0.5]))
assert stats.tolist() == [[1, 1, 2]], stats
print(json.dumps({"file": numba_cache.__file__, "cache": numba_cache.CACHE,
                  "dir": numba_cache.CACHE_DIR}))
"""


def _package_copy(root: Path, *, fallback: bool, in_tree: bool = False) -> Path:
    """A copy of the package under `root` whose kernels' __pycache__ is a regular file (unless
    `in_tree`); without `fallback`, numba_cache says `CACHE = True` unconditionally (the
    decorators before it)."""
    shutil.copytree(Path(pipeline.__file__).parent, root / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    if not in_tree:
        (root / "pipeline" / "kernels" / "__pycache__").write_text("not a folder\n")
    if not fallback:
        (root / "pipeline" / "kernels" / "numba_cache.py").write_text(
            "CACHE = True\nCACHE_DIR = None\n")
    return root


@pytest.fixture()
def unwritable(tmp_path) -> dict[str, str]:
    """Environment in which neither NUMBA_CACHE_DIR nor numba's user-wide cache can be created."""
    blocker = tmp_path / "file"
    blocker.write_text("a regular file\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(NUMBA_CACHE_DIR=str(blocker / "sub"), XDG_CACHE_HOME=str(blocker / "xdg"),
               PYTHONDONTWRITEBYTECODE="1")
    return env


def _child(root: Path, env: dict[str, str], tempdir: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, tempdir], cwd=root, capture_output=True,
                          text=True, env={**env, "PYTHONPATH": str(root)}, timeout=300)


def _report(done: subprocess.CompletedProcess, root: Path) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["file"].startswith(str(root))  # the copy was imported, not the checkout
    return report


def test_falls_back_to_a_user_folder_under_tempdir(tmp_path, unwritable):
    root = _package_copy(tmp_path / "pkg", fallback=True)
    tempdir = tmp_path / "tmp"
    tempdir.mkdir()
    report = _report(_child(root, unwritable, str(tempdir)), root)
    assert report["cache"] and Path(report["dir"]).parent == tempdir
    assert any(Path(report["dir"]).rglob("*.nbi"))  # numba wrote its index there


def test_turns_caching_off_when_nothing_is_writable(tmp_path, unwritable):
    root = _package_copy(tmp_path / "pkg", fallback=True)
    report = _report(_child(root, unwritable, str(tmp_path / "file" / "tmp")), root)
    assert report == {**report, "cache": False, "dir": None}


def test_the_unconditional_cache_fails_there(tmp_path, unwritable):
    """The same process with `cache=True` in every decorator dies at import: the failure the
    fallback prevents, so the two tests above can tell it is there."""
    root = _package_copy(tmp_path / "old", fallback=False)
    done = _child(root, unwritable, str(tmp_path / "file" / "tmp"))
    assert done.returncode != 0 and "cannot cache function" in done.stderr, done.stderr[-3000:]


def test_a_writable_numba_cache_dir_is_used(tmp_path, unwritable):
    root = _package_copy(tmp_path / "pkg", fallback=True)
    chosen = tmp_path / "numba-cache"
    report = _report(_child(root, {**unwritable, "NUMBA_CACHE_DIR": str(chosen)},
                            str(tmp_path / "file" / "tmp")), root)
    assert report["cache"] and report["dir"] == str(chosen) and any(chosen.rglob("*.nbi"))


def test_the_kernels_pycache_comes_before_the_fallback(tmp_path, unwritable):
    root = _package_copy(tmp_path / "pkg", fallback=True, in_tree=True)
    tempdir = tmp_path / "tmp"
    tempdir.mkdir()
    report = _report(_child(root, unwritable, str(tempdir)), root)
    in_tree = root / "pipeline" / "kernels" / "__pycache__"
    assert report["cache"] and report["dir"] == str(in_tree) and any(in_tree.glob("*.nbi"))
    assert not any(tempdir.iterdir())
