"""Every path of the warehouse goes through this module (so the root can later be an fsspec URL).

Layout (storage/README.md):
    models/<name>/<revision>/       local models (the zoo)
    runs/<run_id>/run.json          run manifest
    runs/<run_id>/arrays.zarr/      Zarr v3 group: acts/L<l>, active/L<l>, coact/L<a>_L<b>
    tables/<table>/run_id=<run_id>/ Parquet, hive-partitioned by run
    reports/<name>/                 figures and index.html
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from pipeline.core.errors import UserError

DEFAULT_ROOT = Path(os.environ.get("NWH_STORAGE", "storage"))
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,127}$")


def validate_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id) or ".." in run_id:
        raise UserError(
            f"run id {run_id!r} is not a valid name: use letters, digits and . _ - = + "
            "(no path separators, no '..', at most 128 characters)"
        )
    return run_id


def slug(*parts: str) -> str:
    """A readable run id from free text (model names with '/', file paths...)."""
    text = "_".join(p for p in parts if p)
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    text = re.sub(r"-{2,}", "-", text)
    return text[:128] or "run"


class Storage:
    """The warehouse root and the paths under it."""

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT):
        self.root = Path(root)

    def ensure_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-", delete=True)
            probe.close()
        except OSError as e:
            raise UserError(
                f"storage root {str(self.root)!r} is not writable ({e.strerror}): "
                "pass --storage with a writable directory"
            ) from None

    # -- folders
    def models_dir(self) -> Path:
        return self.root / "models"

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / validate_run_id(run_id)

    def run_manifest(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "run.json"

    def arrays(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "arrays.zarr"

    def table_dir(self, table: str) -> Path:
        return self.root / "tables" / table

    def table_partition(self, table: str, run_id: str) -> Path:
        return self.table_dir(table) / f"run_id={validate_run_id(run_id)}"

    def reports(self, name: str) -> Path:
        return self.root / "reports" / validate_run_id(name)

    def marker(self, owner: str, stage: str, key: str = "") -> Marker:
        """The completion marker of a stage's output owned by a run (or result name)."""
        return Marker(marker_path(self, owner, stage, key))

    def catalog(self) -> Path:
        return self.root / "warehouse.duckdb"

    def finished_run(self, run_id: str) -> dict:
        """Manifest of a finished extraction run, or a UserError that says what to do."""
        path = self.run_manifest(run_id)
        if not path.exists():
            known = ", ".join(self.list_runs()) or "none"
            raise UserError(f"run {run_id!r} does not exist in {self.root} (runs: {known}): "
                            "extract it first")
        manifest = read_json(path)
        if manifest.get("status") != "finished" or "layers" not in manifest.get("model", {}):
            raise UserError(f"run {run_id!r} is not a finished extraction: finish it with its "
                            "extract command")
        return manifest

    def list_runs(self) -> list[str]:
        d = self.root / "runs"
        return sorted(p.name for p in d.iterdir() if (p / "run.json").exists()) if d.exists() else []


# -- atomic writes: write to a temporary name in the same folder, then rename


def _temp_name(path: Path, kind: str) -> Path:
    # pid, thread and a random token: two writers (processes or threads) never share a name
    token = f"{os.getpid()}-{threading.get_ident() % 100000}-{secrets.token_hex(3)}"
    return path.with_name(f".{path.name}.{kind}-{token}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A file replaces a file in one rename. A folder replaces a folder (empty or not) by moving
    the old one aside first, renaming the new one in, then deleting the old one: a reader sees
    the old or the new folder, and a crash in between leaves the old one under a hidden name
    that `clean_temporaries` removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, "tmp")
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            old = _temp_name(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        _remove(tmp)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_temporaries(directory: Path) -> int:
    """Remove the temporary files and folders that interrupted atomic writes left in a folder."""
    removed = 0
    for p in Path(directory).glob(".*.tmp-*"):
        _remove(p)
        removed += 1
    for p in Path(directory).glob(".*.old-*"):
        _remove(p)
        removed += 1
    return removed


def write_json(path: Path, data: Any) -> None:
    """JSON written to a temporary file, fsynced, then renamed: a manifest survives a crash."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


# -- completion markers: a stage's resolved config and the hash that says its work is done


def marker_path(storage: Storage, owner: str, stage: str, key: str = "") -> Path:
    """runs/<owner>/stages/<stage>[-<key>].json: beside the outputs of the run (or result) owner."""
    name = f"{stage}-{key}" if key else stage
    return storage.run_dir(owner) / "stages" / f"{slug(name)}.json"


def finished_marker(path: Path, config_hash: str) -> dict | None:
    """The marker at `path` when it records this config hash (the work is done), else None."""
    if not path.exists():
        return None
    marker = read_json(path)
    return marker if marker.get("config_hash") == config_hash else None


def write_marker(path: Path, config: dict, config_hash: str, **summary: Any) -> None:
    """Written last, after every output of the stage is in place."""
    write_json(path, {"config": config, "config_hash": config_hash,
                      "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      **summary})


@dataclass(frozen=True)
class Marker:
    """A completion marker file: `done(hash)` reads it, `write(...)` writes it (last)."""

    path: Path

    def __fspath__(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return self.path.exists()

    def done(self, config_hash: str) -> dict | None:
        return finished_marker(self.path, config_hash)

    def write(self, config: dict, config_hash: str, **summary: Any) -> None:
        write_marker(self.path, config, config_hash, **summary)
