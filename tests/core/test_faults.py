"""Faults: a full disk anywhere in a stage (injected, and a real tmpfs), kill -9 at random moments
(leftovers removed, the resumed run equal to an uninterrupted one), sweeps of unknown revisions."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.core import arrays, tables
from pipeline.core.errors import UserError
from pipeline.core.storage import (
    Storage,
    clean_leftovers,
    disk_full_message,
    is_disk_full,
    read_json,
)

ROOT = Path(__file__).resolve().parents[2]
VOLATILE = {"runs": ("finished_at", "seconds")}  # wall-clock columns


def snapshot(storage: Storage, run: str) -> dict:
    """Contents of every table partition and row array of a run, independent of how the rows
    were cut into part files."""
    out = {}
    for table_dir in sorted((storage.root / "tables").iterdir()):
        parts = sorted((table_dir / f"run_id={run}").glob("*.parquet"))
        if not parts:
            continue
        t = pa.concat_tables([pq.read_table(p) for p in parts])
        t = t.drop_columns([c for c in VOLATILE.get(table_dir.name, ()) if c in t.column_names])
        rows = sorted(zip(*t.to_pydict().values()), key=repr)
        out[table_dir.name] = (t.column_names, rows)
    group = arrays.open_group(storage.arrays(run), mode="r")
    for kind in arrays.ROW_KINDS:
        if kind in group:
            for name, a in group[kind].arrays():
                out[f"{kind}/{name}"] = (a.shape, a[:].tobytes())
    out["included"] = group[arrays.INCLUDED][:].tobytes()
    return out


def leftovers(root: Path) -> list[str]:
    """Temporaries of interrupted writes anywhere under the root."""
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if p.name.endswith(".partial") or ".tmp-" in p.name or ".old-" in p.name]


def base_args(model, corpus, run="k", samples=24) -> list[str]:
    """An extraction of many small commits (one per 16-token window), without --storage."""
    return ["extract", "--model", str(model), "--corpus", str(corpus), "--num-samples",
            str(samples), "--max-length", "16", "--batch-size", "1", "--chunk-tokens", "16",
            "--commit-seconds", "0", "--store-acts", "--run", run, "--quiet"]


def extract_args(model, corpus, root, run="k", samples=24) -> list[str]:
    return [*base_args(model, corpus, run, samples), "--storage", str(root)]


def holder_pid(lock: Path) -> int | None:
    """The pid a lock file names (its holder writes it once it has the lock)."""
    try:
        return json.loads(lock.read_text() or "{}").get("pid")
    except (OSError, ValueError):
        return None


# -- a full disk


def test_is_disk_full_finds_enospc_in_chains_and_texts():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("commit failed") from inner
    except RuntimeError as e:
        assert is_disk_full(e)
    assert is_disk_full(OSError("Error writing bytes to file. Detail: [errno 28] No space left "
                                "on device"))  # pyarrow's wording
    assert is_disk_full(OSError("100000 requested and 7152 written"))  # numpy's short write
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("bad value"))


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_injected_enospc_mid_extraction_is_one_line_and_the_rerun_resumes(
        tmp_path, micro_model_dir, corpus_file, capsys, monkeypatch):
    ref = tmp_path / "ref"
    assert main(extract_args(micro_model_dir, corpus_file, ref)) == 0
    root = tmp_path / "wh"
    real, calls = arrays.write_rows, {"n": 0}

    def write_rows(array, start, block):  # the disk fills during the 5th commit's Zarr writes
        calls["n"] += 1
        if start >= 4 * 16 and calls["n"] % 3 == 2:
            _enospc()
        return real(array, start, block)

    monkeypatch.setattr(arrays, "write_rows", write_rows)
    capsys.readouterr()
    assert main(extract_args(micro_model_dir, corpus_file, root)) == 2
    err = capsys.readouterr().err
    assert err == f"error: {disk_full_message(root)}\n"
    assert "no space left on device under" in err and "the run resumes" in err
    manifest = read_json(Storage(root).run_manifest("k"))
    assert manifest["status"] == "running" and manifest["committed"]["rows"] == 4 * 16
    monkeypatch.setattr(arrays, "write_rows", real)
    assert main(extract_args(micro_model_dir, corpus_file, root)) == 0
    assert snapshot(Storage(root), "k") == snapshot(Storage(ref), "k")
    assert leftovers(root) == []


def test_enospc_in_another_stage_wrapped_in_its_error_is_one_line(tmp_path, micro_model_dir,
                                                                 corpus_file, capsys,
                                                                 monkeypatch):
    root = tmp_path / "wh"
    assert main(extract_args(micro_model_dir, corpus_file, root, samples=4)) == 0
    real = tables.write_part

    def write_part(storage, table, run_id, data, part="part-0"):
        try:
            _enospc()
        except OSError as e:
            raise RuntimeError(f"writing {table} failed") from e

    monkeypatch.setattr(tables, "write_part", write_part)
    capsys.readouterr()
    code = main(["dormancy", "--run", "k", "--storage", str(root),
                 "--log-file", str(tmp_path / "d.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {disk_full_message(root)}\n"
    monkeypatch.setattr(tables, "write_part", real)
    assert main(["dormancy", "--run", "k", "--storage", str(root),
                 "--log-file", str(tmp_path / "d.csv")]) == 0


def test_other_errors_still_raise(tmp_path, micro_model_dir, corpus_file, monkeypatch):
    def broken(*_a, **_k):
        raise RuntimeError("a bug, not a full disk")

    monkeypatch.setattr(arrays, "write_rows", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(extract_args(micro_model_dir, corpus_file, tmp_path, samples=4))


TMPFS_DRIVER = """
    import json, subprocess, sys
    mount, store, ref_copy = sys.argv[1], sys.argv[2], sys.argv[3]
    args = json.loads(sys.argv[4])
    cli = [sys.executable, "-m", "pipeline", *args, "--storage", store]
    full = subprocess.run(cli, capture_output=True, text=True)
    subprocess.run(["mount", "-o", "remount,size=64m", "tmpfs", mount], check=True)
    again = subprocess.run(cli, capture_output=True, text=True)
    subprocess.run(["cp", "-a", store, ref_copy], check=True)  # out of the namespace's tmpfs
    print(json.dumps({"full": [full.returncode, full.stderr], "again": [again.returncode,
                                                                        again.stderr]}))
"""


def test_a_real_full_tmpfs_is_one_line_and_the_rerun_resumes(tmp_path, micro_model_dir,
                                                            corpus_file):
    """A 192 KiB tmpfs in a private mount namespace (unshare -rm, or plain root) fills during
    the extraction; after it grows, the same command resumes to the uninterrupted result."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) to mount a private tmpfs")
    mount = tmp_path / "small"
    mount.mkdir()
    probe = subprocess.run([unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mount}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip()}")
    args = base_args(micro_model_dir, corpus_file, "X", samples=48)
    ref = tmp_path / "ref"
    assert main([*args, "--storage", str(ref)]) == 0
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(TMPFS_DRIVER))
    store, out = mount / "wh", tmp_path / "copied"
    proc = subprocess.run(
        [unshare, "-rm", "sh", "-c",
         f"mount -t tmpfs -o size=192k tmpfs {mount} && cd {ROOT} && "
         f"{sys.executable} {driver} {mount} {store} {out} '{json.dumps(args)}'"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    code, err = result["full"]
    assert code == 2, err
    # the error is the last line, and the only one (warnings of what could not be written may
    # come before it; a traceback never)
    assert err.splitlines()[-1] == f"error: {disk_full_message(store)}", err
    assert [l for l in err.splitlines() if l.startswith("error:")] == err.splitlines()[-1:]
    assert "Traceback" not in err, err
    code, err = result["again"]
    assert code == 0, err
    assert snapshot(Storage(out), "X") == snapshot(Storage(ref), "X")
    assert leftovers(out) == []


# -- kill -9 at random moments


def test_kill_9_at_random_moments_resumes_to_the_uninterrupted_result(tmp_path, micro_model_dir,
                                                                     corpus_file):
    args = base_args(micro_model_dir, corpus_file, "X", samples=40)
    ref, root = tmp_path / "ref", tmp_path / "wh"
    assert main([*args, "--storage", str(ref)]) == 0
    storage = Storage(root)
    rng = random.Random(7)
    kills, committed = 0, []

    def committed_rows() -> int:
        try:
            return read_json(storage.run_manifest("X"))["committed"]["rows"]
        except (OSError, ValueError, KeyError):
            return 0

    for _ in range(4):
        start = committed_rows()
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--storage", str(root)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # once this process has committed something of its own, kill it at a random moment:
        # inside a commit (Zarr chunks, a tokens part, the state, run.json) or between two
        deadline = time.monotonic() + 300
        while committed_rows() <= start and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        if proc.returncode == 0:
            break  # finished before the kill
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        committed.append(committed_rows())
    assert kills >= 2 and committed == sorted(committed) and 0 < committed[0] < 640, committed
    debris = leftovers(root)
    # whatever the kills left, the resume removes; and a kill inside a Zarr write leaves these:
    chunk_dir = storage.arrays("X") / "acts" / "L0" / "c"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    (chunk_dir / f"999.{'ab' * 16}.partial").write_bytes(b"half a chunk")
    (storage.arrays("X") / "active" / "L1").mkdir(parents=True, exist_ok=True)
    (storage.arrays("X") / "active" / "L1" / f"zarr.{'cd' * 16}.partial").write_bytes(b"{")
    code = main([*args, "--storage", str(root)])
    assert code == 0
    assert leftovers(root) == [], (debris, leftovers(root))
    assert snapshot(storage, "X") == snapshot(Storage(ref), "X")


# -- the leftovers a resumed writer removes


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_clean_leftovers_removes_debris_of_dead_writers_only(tmp_path):
    storage = Storage(tmp_path)
    dead, alive = _dead_pid(), os.getpid()
    run_dir, part_dir = storage.run_dir("r"), storage.table_partition("tokens", "r")
    chunks = storage.arrays("r") / "active" / "L0" / "c"
    other = storage.table_partition("tokens", "other")
    for d in (run_dir / "state", part_dir, chunks, other):
        d.mkdir(parents=True)
    debris = [part_dir / f".part-000000000016.parquet.tmp-{dead}-1-abcdef",
              run_dir / f".run.json.tmp-{dead}-77-0a0b0c",
              chunks / f"3.{'0f' * 16}.partial",
              storage.arrays("r") / f"zarr.{'e1' * 16}.partial"]
    for p in debris:
        p.write_bytes(b"x")
    old_dir = run_dir / f".arrays.zarr.tmp-{dead}-5-123abc"  # a folder written whole
    (old_dir / "deep").mkdir(parents=True)
    (old_dir / "deep" / "f").write_text("x")
    keep = [part_dir / "part-000000000000.parquet", chunks / "0",
            run_dir / f".run.json.tmp-{alive}-1-abcdef",  # a live writer's temporary
            other / f".part-0.parquet.tmp-{dead}-1-abcdef",  # another run's: not ours to clean
            run_dir / "state" / "moments-000000000016.npz", run_dir / "notes.partial"]
    for p in keep:
        p.write_bytes(b"x")
    assert clean_leftovers(storage, "r") == len(debris) + 1
    assert not any(p.exists() for p in debris) and not old_dir.exists()
    assert all(p.exists() for p in keep)


def test_taking_the_lock_cleans_the_run(tmp_path):
    storage = Storage(tmp_path)
    part = storage.table_partition("neurons", "r")
    part.mkdir(parents=True)
    junk = part / f".part-0.parquet.tmp-{_dead_pid()}-1-abcdef"
    junk.write_bytes(b"x")
    marker = storage.marker("r", "neuron-stats")
    assert not junk.exists()
    marker.write({}, "h")


KILLED_IN_WRITES = """
import os, signal, sys
from pathlib import Path
from pipeline.core.storage import Storage, atomic_path, write_json
s = Storage(sys.argv[1])
write_json(s.run_manifest("r"), {"status": "running"})
with atomic_path(s.table_partition("tokens", "r") / "part-0.parquet") as f, \\
        atomic_path(s.arrays("r")) as d:
    f.write_bytes(b"half")
    (d / "active").mkdir(parents=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_what_a_kill_inside_atomic_writes_leaves_is_cleaned(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED_IN_WRITES, str(tmp_path)], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    assert len(leftovers(tmp_path)) == 2  # the file's and the folder's temporaries
    storage = Storage(tmp_path)
    assert clean_leftovers(storage, "r") == 2
    assert leftovers(tmp_path) == [] and storage.run_manifest("r").exists()


# -- a sweep with an unknown revision is refused before any extraction


def _fake_zoo(storage: Storage, revisions: list[str]) -> None:
    storage.models_dir().mkdir(parents=True)
    (storage.models_dir() / "zoo.json").write_text(json.dumps(
        {"models": {"zoo-s0": {"revisions": revisions}}}))


def test_sweep_revisions_of_a_zoo_model_are_checked_first(tmp_path):
    from pipeline.stages.dormancy import check_revisions

    storage = Storage(tmp_path)
    _fake_zoo(storage, ["step0", "step8", "step32"])
    check_revisions(storage, "zoo-s0", ["step0", "step32"])
    with pytest.raises(UserError, match=r"no revision step9 step99: available are step0 step8 "
                                        r"step32; nothing was extracted"):
        check_revisions(storage, "zoo-s0", ["step0", "step9", "step32", "step99"])


def test_sweep_revisions_of_a_local_folder_are_checked_first(tmp_path):
    from pipeline.models.micro import save_random_gpt2
    from pipeline.stages.dormancy import check_revisions

    for rev in ("step0", "step5"):
        save_random_gpt2(tmp_path / "m" / rev, n_layer=1, d_mlp=8)
    (tmp_path / "m" / "notes").mkdir()  # no config.json: not a revision
    check_revisions(Storage(tmp_path), str(tmp_path / "m"), ["step5", "step0"])
    with pytest.raises(UserError, match="no revision notes: available are step0 step5"):
        check_revisions(Storage(tmp_path), str(tmp_path / "m"), ["step0", "notes"])


def test_sweep_revisions_of_an_offline_hub_model_must_be_cached(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    from pipeline.stages.dormancy import check_revisions

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--pythia-mini"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "step1000").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    check_revisions(Storage(tmp_path), "org/pythia-mini", ["step1000"])
    with pytest.raises(UserError, match="no cached revision step0 step2000"):
        check_revisions(Storage(tmp_path), "org/pythia-mini", ["step0", "step1000", "step2000"])


def test_sweep_revisions_of_an_online_hub_model_are_its_branches_and_tags(tmp_path,
                                                                         monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub

    import pipeline.models.loading as loading
    from pipeline.stages.dormancy import check_revisions

    monkeypatch.setattr(loading, "_hub_offline_reason", lambda: None)
    asked = []

    def list_repo_refs(self, repo_id, **kw):
        asked.append(repo_id)
        return SimpleNamespace(branches=[SimpleNamespace(name=n) for n in
                                         ("main", "step0", "step1000")],
                               tags=[SimpleNamespace(name="v1")])

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_refs", list_repo_refs)
    check_revisions(Storage(tmp_path), "org/m", ["step0", "v1", "0123abcd"])  # a commit id too
    with pytest.raises(UserError, match="has no revision step5 on the hub"):
        check_revisions(Storage(tmp_path), "org/m", ["step0", "step5"])
    assert asked == ["org/m", "org/m"]  # one question per check, not one per revision
