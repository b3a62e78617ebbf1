"""Atomic writes, temporary names and completion markers of pipeline.core.storage."""

from __future__ import annotations

import threading

import pytest

from pipeline.core.storage import (
    Storage,
    atomic_path,
    clean_temporaries,
    finished_marker,
    marker_path,
    read_json,
    write_json,
    write_marker,
)


def test_atomic_path_replaces_a_non_empty_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    (target / "sub").mkdir()
    (target / "sub" / "deep.txt").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no .tmp-/.old- folder left


def test_atomic_path_failure_keeps_the_old_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_temporary_names_differ_between_threads(tmp_path):
    seen, lock = [], threading.Lock()
    barrier = threading.Barrier(4)

    def write(i):
        with atomic_path(tmp_path / "same.json") as tmp:
            with lock:
                seen.append(tmp)
            barrier.wait()  # all four temporaries exist at once
            tmp.write_text(str(i))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 4
    assert (tmp_path / "same.json").read_text() in {"0", "1", "2", "3"}
    assert [p.name for p in tmp_path.iterdir()] == ["same.json"]


def test_clean_temporaries_removes_debris_only(tmp_path):
    (tmp_path / ".a.json.tmp-1-2-abc").write_text("x")
    (tmp_path / ".b.old-1-2-abc").mkdir()
    (tmp_path / "keep.json").write_text("x")
    assert clean_temporaries(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


def test_write_json_round_trip(tmp_path):
    write_json(tmp_path / "m.json", {"a": [1, 2], "b": "x"})
    assert read_json(tmp_path / "m.json") == {"a": [1, 2], "b": "x"}


def test_markers_are_keyed_by_the_config_hash(tmp_path):
    storage = Storage(tmp_path)
    path = marker_path(storage, "run1", "graph", "normalized-0.5")
    assert path == tmp_path / "runs" / "run1" / "stages" / "graph-normalized-0.5.json"
    assert finished_marker(path, "h1") is None
    write_marker(path, {"threshold": 0.5}, "h1", edges=3)
    assert finished_marker(path, "h1")["edges"] == 3
    assert finished_marker(path, "h2") is None
