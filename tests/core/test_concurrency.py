"""Several processes on one warehouse: the write lock of a run (an flock the kernel drops when
its holder dies), two extractions of different runs at once, readers while a run is written."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.core import arrays
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, read_json

ROOT = Path(__file__).resolve().parents[2]


def python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


HOLD_MARKER = """
    import sys, time
    from pipeline.core.storage import Storage
    marker = Storage(sys.argv[1]).marker(sys.argv[2], "extract")
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
    if sys.argv[4] == "write":
        marker.write({}, "h")
        print("released", flush=True)
        time.sleep(float(sys.argv[3]))
"""


def hold(root: Path, run: str, seconds: float = 60, then: str = "sleep") -> subprocess.Popen:
    proc = python(HOLD_MARKER, str(root), run, str(seconds), then)
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def try_marker(root: Path, run: str) -> subprocess.CompletedProcess:
    """Another process asks for the run's marker (and so its lock)."""
    code = """
        import sys
        from pipeline.core.errors import UserError
        from pipeline.core.storage import Storage
        try:
            Storage(sys.argv[1]).marker(sys.argv[2], "graph")
        except UserError as e:
            print(e); sys.exit(2)
        print("got it")
    """
    proc = python(code, str(root), run)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_held_run_is_refused_to_another_process_in_one_line(tmp_path):
    holder = hold(tmp_path, "r")
    try:
        got = try_marker(tmp_path, "r")
        assert got.returncode == 2, got.stderr
        assert got.stdout.count("\n") == 1
        assert f"pid {holder.pid}" in got.stdout and "nwh extract" in got.stdout
        assert "being written by another process" in got.stdout
        assert try_marker(tmp_path, "other").returncode == 0  # other runs are free
    finally:
        holder.kill()
        holder.wait()


def test_kill_9_never_leaves_the_lock_stuck(tmp_path):
    holder = hold(tmp_path, "r")
    assert try_marker(tmp_path, "r").returncode == 2
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert holder.returncode == -signal.SIGKILL
    assert Storage(tmp_path).lock_path("r").exists()  # the dead holder's file is still there
    got = try_marker(tmp_path, "r")
    assert got.returncode == 0 and "got it" in got.stdout, got.stdout + got.stderr


def test_writing_the_marker_releases_the_lock(tmp_path):
    holder = hold(tmp_path, "r", seconds=2, then="write")
    try:
        assert try_marker(tmp_path, "r").returncode == 2
        assert holder.stdout.readline().strip() == "released"
        assert try_marker(tmp_path, "r").returncode == 0
        assert not Storage(tmp_path).lock_path("r").exists()  # removed by its last holder
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_reentrant_in_a_process_and_dropped_with_the_marker(tmp_path):
    a = Storage(tmp_path).marker("r", "subset-grid")
    b = Storage(tmp_path).marker("r", "subset", "x")  # another Storage object, same root
    assert a.lease.held and b.lease.held
    b.write({}, "h")
    assert try_marker(tmp_path, "r").returncode == 2  # `a` still holds it
    del a
    gc.collect()
    assert try_marker(tmp_path, "r").returncode == 0


def test_lock_refusal_in_process_names_the_holder(tmp_path):
    holder = hold(tmp_path, "r")
    try:
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            Storage(tmp_path).marker("r", "extract")
    finally:
        holder.kill()
        holder.wait()


def test_a_root_that_cannot_hold_a_lock_is_left_to_the_writes(tmp_path):
    """A root that cannot be written (here: below a file) gives a marker without a lock; the
    stage's first write (ensure_writable) then says what is wrong, in one line."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    storage = Storage(blocker / "root")
    marker = storage.marker("r", "universal")
    assert not marker.lease.held
    with pytest.raises(UserError, match="not writable"):
        storage.ensure_writable()


# -- real extractions


def extract_args(model, corpus, run, root, *extra, samples=24) -> list[str]:
    return ["extract", "--model", str(model), "--corpus", str(corpus), "--num-samples", str(samples),
            "--max-length", "16", "--batch-size", "1", "--chunk-tokens", "16",
            "--commit-seconds", "0", "--store-acts", "--run", run, "--storage", str(root),
            "--quiet", *extra]


def cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_runs_extracted_at_once_both_land_in_the_views(tmp_path, micro_model_dir,
                                                           corpus_file):
    from pipeline.core.warehouse import connect

    procs = [cli(*extract_args(micro_model_dir, corpus_file, run, tmp_path, samples=12))
             for run in "ab"]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    storage = Storage(tmp_path)
    con = connect(storage)
    try:
        runs = con.sql("select run_id, num_rows from runs order by run_id").fetchall()
        tokens = con.sql("select run_id, count(*), max(row) from tokens group by run_id "
                         "order by run_id").fetchall()
    finally:
        con.close()
    assert runs == [("a", 12 * 16), ("b", 12 * 16)]
    assert tokens == [("a", 192, 191), ("b", 192, 191)]
    # same input and model: the two runs hold the same masks (each written whole)
    ga, gb = (arrays.open_group(storage.arrays(r), mode="r") for r in "ab")
    for l in range(3):
        assert np.array_equal(ga[f"active/L{l}"][:], gb[f"active/L{l}"][:])
    locks = tmp_path / "runs" / ".locks"
    assert not (locks.exists() and any(locks.iterdir()))  # released: no lock file left


HOLD_IN_COMMIT = """
    import os, sys, time
    from pathlib import Path
    import pipeline.core.tables as tables
    from pipeline.cli import main

    real = tables.write_part

    def write_part(storage, table, run_id, data, part="part-0"):
        path = real(storage, table, run_id, data, part)
        if table == "tokens" and os.environ.get("STALL_AFTER") and \\
                path.stem == "part-" + os.environ["STALL_AFTER"].zfill(12):
            Path(os.environ["READY"]).write_text("ready")
            time.sleep(600)  # mid-commit, holding the run's lock, until killed
        time.sleep(float(os.environ.get("DELAY", "0")))
        return path

    tables.write_part = write_part
    sys.exit(main(sys.argv[1:]))
"""


def stalled(tmp_path: Path, args: list[str], env: dict) -> subprocess.Popen:
    script = tmp_path / "stall.py"
    script.write_text(textwrap.dedent(HOLD_IN_COMMIT))
    return subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {proc.stderr.read()}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_same_run_twice_at_once_is_refused_and_a_killed_holder_resumes(
        tmp_path, micro_model_dir, corpus_file, capsys):
    from test_faults import snapshot

    ref = tmp_path / "ref"
    assert main(extract_args(micro_model_dir, corpus_file, "r", ref)) == 0
    root = tmp_path / "wh"
    ready = tmp_path / "ready"
    first = stalled(tmp_path, extract_args(micro_model_dir, corpus_file, "r", root),
                    {"STALL_AFTER": "64", "READY": str(ready)})
    try:
        wait_for(ready, first)
        capsys.readouterr()
        code = main(extract_args(micro_model_dir, corpus_file, "r", root))
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert "being written by another process" in err and f"pid {first.pid}" in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert read_json(Storage(root).run_manifest("r"))["status"] == "running"
    assert main(extract_args(micro_model_dir, corpus_file, "r", root)) == 0  # not stuck
    assert snapshot(Storage(root), "r") == snapshot(Storage(ref), "r")


def test_readers_during_a_write_see_whole_files_and_committed_rows(tmp_path, micro_model_dir,
                                                                   corpus_file):
    """What a reader sees while a run is written: every table part whole (rows 0..n-1 with no
    gap, whole commits of 16 rows), at least the rows run.json says are committed and at most
    one commit more (the tokens part is renamed in just before run.json), no `runs` row until
    the run is finished, and then all of it."""
    from pipeline.core.warehouse import connect

    storage = Storage(tmp_path)
    writer = stalled(tmp_path, extract_args(micro_model_dir, corpus_file, "r", tmp_path),
                     {"DELAY": "0.15"})
    seen, finished = set(), False
    try:
        while not finished:
            done = writer.poll() is not None
            manifest = storage.run_manifest("r")
            before = read_json(manifest)["committed"]["rows"] if manifest.exists() else 0
            parts = sorted(storage.table_partition("tokens", "r").glob("*.parquet"))
            rows = np.concatenate([pq.read_table(p).column("row").to_numpy() for p in parts]) \
                if parts else np.zeros(0, np.int64)
            con = connect(storage)
            try:
                n = con.execute("select count(*) from tokens where run_id = 'r'").fetchall()[0][0]
                finished_rows = con.sql("select num_rows from runs where run_id = 'r'").fetchall()
            finally:
                con.close()
            after = read_json(manifest)["committed"]["rows"] if manifest.exists() else 0
            assert np.array_equal(np.sort(rows), np.arange(len(rows)))
            assert len(rows) % 16 == 0 and n % 16 == 0
            assert before <= n <= after + 16, (before, n, after)
            if finished_rows:
                assert finished_rows == [(384,)] and n == 384
                finished = True
            seen.add(n)
            if done and not finished:
                raise AssertionError(f"writer exited {writer.returncode}: {writer.stderr.read()}")
            time.sleep(0.02)
    finally:
        writer.kill()
        writer.wait()
    assert len(seen) >= 3  # the reader did look in between commits
