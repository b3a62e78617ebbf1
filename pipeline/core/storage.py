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
import shutil
import tempfile
from contextlib import contextmanager
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


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
