"""Every path of the warehouse goes through this module: a local folder, or an fsspec URL.

Layout (storage/README.md):
    models/<name>/<revision>/       local models (the zoo)
    runs/<run_id>/run.json          run manifest
    runs/<run_id>/arrays.zarr/      Zarr v3 group: acts/L<l>, active/L<l>, coact/L<a>_L<b>
    tables/<table>/run_id=<run_id>/ Parquet, hive-partitioned by run
    reports/<name>/                 figures and index.html
    cache/                          derived inputs kept between processes (the stdlib corpus)
    runs/.locks/<owner>.lock        held (flock) by the process writing a run's outputs

One process writes a run's outputs at a time: `Storage.marker` takes the run's lock (an OS lock
that the kernel releases when the process dies, so a kill -9 never leaves it stuck), and the
first time a process takes it, it removes what interrupted writes of that run left behind.

Object storage (`Storage("s3://bucket/prefix")`, or any fsspec URL): the root is a pathlib-like
UPath (universal_pathlib), so `/`, exists, glob, open, read_text and unlink work as on a folder.
Options of the filesystem come from its own environment (s3fs/botocore: AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION...) and from NWH_STORAGE_OPTIONS
(a JSON object of keyword arguments of the filesystem). What must stay on this machine lives in
a local folder per URL (`Storage.local_dir`: NWH_CACHE or ~/.cache/nwh, then a name of the URL):
models, the corpus cache, the write locks (which then guard one machine) and the staging folder
of atomic writes. An atomic write stages its file locally and uploads it in one PUT, which
object stores apply whole or not at all; a reader trusts a run's manifest (committed rows,
status) and a stage's completion marker, both written after the objects they describe.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from pipeline.core.errors import UserError

log = logging.getLogger(__name__)

LOCAL_PROTOCOLS = ("", "file", "local")


def is_url(root: Any) -> bool:
    """Whether a --storage value names object storage (an fsspec URL other than file://)."""
    return isinstance(root, str) and "://" in root and not root.startswith("file://")


def is_remote(path: Any) -> bool:
    """Whether a path object lives on a remote filesystem (a UPath with a remote protocol)."""
    return getattr(path, "protocol", "") not in LOCAL_PROTOCOLS


def _default_root() -> str | Path:
    root = os.environ.get("NWH_STORAGE", "storage")
    return root if is_url(root) else Path(root)  # Path would fold s3:// into s3:/


DEFAULT_ROOT = _default_root()
WAREHOUSE_FOLDERS = ("runs", "tables", "models", "reports")  # one of them makes a root a warehouse
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

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT, *, must_exist: bool = False):
        """`must_exist`: the root must already be a warehouse (stages that only read it: a
        mistyped --storage is an error, not an empty result). `root` is a folder or an fsspec
        URL (s3://bucket/prefix, gs://..., memory://...)."""
        self.root = as_path(str(root).rstrip("/") if is_url(root) else root)
        if isinstance(root, str) and root.startswith("file://"):
            self.root = Path(root[len("file://"):])
        if must_exist:
            self.check_exists()

    @property
    def is_local(self) -> bool:
        return not is_remote(self.root)

    @property
    def url(self) -> str:
        """The root as text DuckDB and fsspec take: an absolute folder, or the URL."""
        if self.is_local:
            return os.path.realpath(self.root)
        # the filesystem's own spelling, the one its listings (and so DuckDB's globs) use
        return self.root.fs.unstrip_protocol(self.root.path).rstrip("/")

    def local_dir(self) -> Path:
        """What stays on this machine: the root itself when it is local, else a folder per URL
        under NWH_CACHE (default ~/.cache/nwh)."""
        if self.is_local:
            return self.root
        return local_cache_dir(self.url)

    def check_exists(self) -> None:
        if not self.is_local:
            _check_remote(self, writing=False)
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise UserError(f"storage root {str(self.root)!r} {what}: check --storage (or "
                            "NWH_STORAGE); extract or zoo create a warehouse")
        if not any((self.root / name).is_dir() for name in WAREHOUSE_FOLDERS):
            raise UserError(f"storage root {str(self.root)!r} is not a warehouse (no "
                            f"{', '.join(n + '/' for n in WAREHOUSE_FOLDERS)}): check --storage")

    def ensure_writable(self) -> None:
        if not self.is_local:  # a bucket has no folders to make: write a probe object
            _check_remote(self, writing=True)
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # the pid in the name: a probe a kill left behind is known as debris (clean_root)
            probe = tempfile.NamedTemporaryFile(dir=self.root, prefix=f".probe-{os.getpid()}-",
                                                delete=True)
            probe.close()
        except OSError as e:
            if e.errno in DISK_FULL_ERRNOS:
                raise UserError(disk_full_message(self.root)) from None
            raise UserError(
                f"storage root {str(self.root)!r} is not writable ({e.strerror}): "
                "pass --storage with a writable directory"
            ) from None
        clean_root(self.root)

    # -- folders
    def models_dir(self) -> Path:
        # models load through local files (safetensors, tokenizers): on this machine
        return self.local_dir() / "models"

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
        """The completion marker of a stage's output owned by a run (or result name).

        Every writing stage asks for its marker before it writes, so this is where a process
        takes the owner's write lock (refused in one line while another process holds it).
        The lock is held while the marker object lives and released once the marker is
        written (its work is done) or dropped; re-entrant within a process."""
        return Marker(marker_path(self, owner, stage, key), lease=self.lock(owner, stage))

    def lock_path(self, owner: str) -> Path:
        # beside the run folders, not in them: --overwrite deletes a run's folder while its
        # writer holds the lock. An object store has no locks: a local file, one machine's lock
        if not self.is_local:
            return self.local_dir() / "locks" / f"{validate_run_id(owner)}.lock"
        return self.root / "runs" / ".locks" / f"{validate_run_id(owner)}.lock"

    def lock(self, owner: str, stage: str = "") -> Lease:
        """Hold the write lock of a run (or result name) until the lease is released."""
        return _acquire(self, owner, stage)

    def catalog(self) -> Path:
        return self.root / "warehouse.duckdb"

    def cache_dir(self) -> Path:
        """Derived inputs kept between processes (the parsed stdlib corpus); on this machine."""
        return self.local_dir() / "cache"

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
        if not self.is_local:  # one listing instead of a request per run
            return sorted({p.parent.name for p in d.glob("*/run.json")})
        return sorted(p.name for p in d.iterdir() if (p / "run.json").exists()) if d.exists() else []


# -- paths on object storage


def storage_options(protocol: str) -> dict:
    """Keyword arguments of the filesystem of a URL: NWH_STORAGE_OPTIONS (JSON) over ours."""
    options: dict[str, Any] = {}
    if protocol in ("s3", "s3a", "gs", "gcs", "abfs", "az", "http", "https"):
        # listings are read fresh: another process (a shard) may have written since
        options["use_listings_cache"] = False
    text = os.environ.get("NWH_STORAGE_OPTIONS", "").strip()
    if text:
        try:
            extra = json.loads(text)
        except ValueError as e:
            raise UserError(f"NWH_STORAGE_OPTIONS is not valid JSON ({e}): give an object such "
                            'as {"endpoint_url": "http://127.0.0.1:9000"}') from None
        if not isinstance(extra, dict):
            raise UserError("NWH_STORAGE_OPTIONS must be a JSON object of filesystem options, "
                            'such as {"endpoint_url": "http://127.0.0.1:9000"}')
        options.update(extra)
    return options


def as_path(path: str | os.PathLike | Any) -> Path:
    """A path object: a UPath for an fsspec URL (or one already), a pathlib.Path otherwise."""
    if is_remote(path):
        return path
    if is_url(path):
        try:
            from upath import UPath
        except ImportError:
            raise UserError(f"{path!r} is on object storage, which needs universal_pathlib and "
                            "the filesystem's package: pip install 'neuron-warehouse[s3]'") from None
        protocol = path.split("://", 1)[0]
        for name in ("botocore", "aiobotocore"):  # "Found credentials in ..." on every command
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        try:
            return UPath(path, **storage_options(protocol))
        except (ImportError, ValueError) as e:
            raise UserError(f"{path!r}: no filesystem for {protocol}:// ({e}): install its fsspec "
                            "package (s3fs for s3://, gcsfs for gs://, adlfs for az://)") from None
    return Path(path)


def local_cache_dir(url: str) -> Path:
    """<NWH_CACHE or ~/.cache/nwh>/<readable name>-<hash of the URL>: this machine's folder of
    a remote root."""
    base = Path(os.environ.get("NWH_CACHE") or Path.home() / ".cache" / "nwh")
    name = slug(url.split("://", 1)[-1].replace("/", "-"))[:48]
    return base / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


def _staging_dir() -> Path:
    """Where atomic writes of remote paths are staged before their upload."""
    base = Path(os.environ.get("NWH_CACHE") or Path.home() / ".cache" / "nwh")
    return base / "staging"


def remote_error_message(error: BaseException, root: Any) -> str | None:
    """One line for an error of object storage (an endpoint that cannot be reached, a missing
    bucket, missing or refused credentials), else None."""
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        name, text = type(e).__name__, " ".join(str(e).split())
        if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
            return (f"no credentials for {root} ({text}): set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or NWH_STORAGE_OPTIONS)")
        # by name (botocore's, aiohttp's), not any ConnectionError: a model hub's is not ours
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                    "ClientConnectorDNSError", "ServerDisconnectedError"):
            return (f"storage {root} cannot be reached ({text}): check the endpoint "
                    "(AWS_ENDPOINT_URL or NWH_STORAGE_OPTIONS) and the network")
        if "bucket does not exist" in text.lower() or name == "NoSuchBucket":
            return f"storage {root}: the bucket does not exist: create it, or check --storage"
        if any(word in text for word in ("AccessDenied", "Access Denied", "Forbidden",
                                         "InvalidAccessKeyId", "SignatureDoesNotMatch")):
            return (f"storage {root} refused access ({text}): check the credentials and the "
                    "bucket's permissions")
        stack += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return None


def _check_remote(storage: Storage, writing: bool) -> None:
    """The bucket can be listed (and written): else a one-line UserError."""
    root = storage.root
    fs, key = root.fs, root.path
    try:
        if writing:
            probe = f"{key.rstrip('/')}/.probe-{os.getpid()}-{secrets.token_hex(4)}"
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
        else:  # the root itself: a credential scoped to the prefix may not list the bucket
            fs.ls(key, detail=False)
    except Exception as e:  # noqa: BLE001 - every failure of the first request is one line
        message = remote_error_message(e, storage.url)
        if message is None and isinstance(e, FileNotFoundError):
            if writing:
                message = f"storage {storage.url}: the bucket does not exist: create it, or check --storage"
            else:
                return  # an empty prefix: check_exists says the root does not exist
        if message is None:
            what = "written" if writing else "read"
            message = (f"storage {storage.url} cannot be {what} ({type(e).__name__}: "
                       f"{' '.join(str(e).split())}): check --storage and NWH_STORAGE_OPTIONS")
        raise UserError(message) from None


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


def remove_tree(path: Path) -> None:
    """Delete a folder and everything in it (a prefix of objects on object storage); absent is
    fine. Only that folder: a sibling whose name starts alike (run1 beside run10) stays."""
    path = as_path(path)
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    keys = path.fs.find(path.path.rstrip("/") + "/")
    if keys:
        path.fs.rm(keys)


def remove_file(path: Path) -> None:
    """Delete one file (object); absent is fine."""
    path = as_path(path)
    if is_remote(path):
        try:
            path.fs.rm_file(path.path)
        except FileNotFoundError:
            pass
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A file replaces a file in one rename. A folder replaces a folder (empty or not) by moving
    the old one aside first, renaming the new one in, then deleting the old one: a reader sees
    the old or the new folder, and a crash in between leaves the old one under a hidden name
    that `clean_temporaries` removes.

    A remote `path` (object storage) is written through a local temporary path that is
    uploaded when the block succeeds: a file in one PUT (an object appears whole or not at
    all; a failed block uploads nothing), a folder object by object, new objects first and
    stale ones removed last, so it is never missing but can be a mixture while it is replaced
    (its stage's completion marker, written after it, says when it is whole).
    """
    path = as_path(path)
    if is_remote(path):
        with _staged(path) as tmp:
            yield tmp
        return
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


@contextmanager
def _staged(path: Path) -> Iterator[Path]:
    staging = _staging_dir()
    staging.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(staging / path.name, "tmp")
    try:
        yield tmp
        if tmp.is_dir():
            _upload_folder(tmp, path)
        elif tmp.exists():
            path.fs.put_file(str(tmp), path.path)
        else:  # as os.replace of a file never written
            raise FileNotFoundError(f"{tmp} was not written")
    finally:
        _remove(tmp)


def _upload_folder(local: Path, path: Path) -> None:
    files = [p for p in local.rglob("*") if p.is_file()]
    target = path.path.rstrip("/")
    new = {f"{target}/{p.relative_to(local).as_posix()}" for p in files}
    old = set(path.fs.find(target + "/"))
    if files:
        path.fs.put([str(p) for p in files], [f"{target}/{p.relative_to(local).as_posix()}"
                                              for p in files])
    stale = sorted(old - new)
    if stale:
        path.fs.rm(stale)


def _clean_staging() -> int:
    """Staged files of atomic writes whose process is gone."""
    staging, removed = _staging_dir(), 0
    try:
        names = os.listdir(staging)
    except OSError:
        return 0
    for name in names:
        if _is_leftover(name):
            _remove(staging / name)
            removed += 1
    return removed


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
    """Remove the temporary files and folders that interrupted atomic writes left in a folder.
    A remote folder has none (writes are staged locally): its staging leftovers go instead."""
    if is_remote(directory) or is_url(directory):
        return _clean_staging()
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
    return json.loads(as_path(path).read_text())


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
    """A completion marker file: `done(hash)` reads it, `write(...)` writes it (last).

    From `Storage.marker` it carries the lease of its owner's write lock: released by
    `write` (the stage's last step) or when the marker is dropped (the stage returned or
    raised)."""

    path: Path
    lease: Lease | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.lease is not None:
            weakref.finalize(self, self.lease.release)

    def __fspath__(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return self.path.exists()

    def done(self, config_hash: str) -> dict | None:
        return finished_marker(self.path, config_hash)

    def write(self, config: dict, config_hash: str, **summary: Any) -> None:
        write_marker(self.path, config, config_hash, **summary)
        if self.lease is not None:
            self.lease.release()


# -- the write lock of a run: fcntl.flock on runs/.locks/<owner>.lock
#
# The kernel drops a flock when its holder dies, so a killed process never leaves a run locked.
# Within a process the lock is re-entrant (counted): stages that nest markers of one owner
# (a subset grid and its cells), and two Storage objects of one root, share it.


class Lease:
    """One holding of a run's write lock; `release()` is idempotent."""

    def __init__(self, held: _Held | None):
        self._held = held

    @property
    def held(self) -> bool:
        return self._held is not None

    def release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.release()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Held:
    """The open, locked file of one lock path in this process, with its holding count."""

    def __init__(self, key: str, path: Path, fd: int, created: list[Path]):
        self.key, self.path, self.fd, self.count = key, path, fd, 1
        self.created = created  # folders made for the lock file, removed again when empty

    def release(self) -> None:
        with _LOCKS_GUARD:
            self.count -= 1
            if self.count > 0:
                return
            _LOCKS.pop(self.key, None)
            # unlink while still locked: a process that opened this file and then gets the
            # lock sees that the path no longer names its file, and opens the path again
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    os.unlink(self.path)
            except OSError:
                pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            for folder in self.created:  # deepest first; a folder in use is not empty
                try:
                    os.rmdir(folder)
                except OSError:
                    break


_LOCKS: dict[str, _Held] = {}
_LOCKS_GUARD = threading.RLock()


def _acquire(storage: Storage, owner: str, stage: str) -> Lease:
    path = storage.lock_path(owner)
    key = os.path.realpath(path)
    with _LOCKS_GUARD:
        held = _LOCKS.get(key)
        if held is not None:
            held.count += 1
            return Lease(held)
        try:
            fd, created = _lock_file(path, owner)
        except OSError as e:
            if e.errno in DISK_FULL_ERRNOS:
                raise
            # a read-only or unusable root: its writes fail with their own message
            # (ensure_writable), and a stage that only finds its work done writes nothing
            log.debug("no write lock for %s: %s", owner, e)
            return Lease(None)
        held = _LOCKS[key] = _Held(key, path, fd, created)
        _note_holder(fd, stage)
    clean_root(storage.root)
    removed = clean_leftovers(storage, owner)
    if removed:
        log.info("%s: removed %d leftover temporary file(s) of interrupted writes", owner, removed)
    return Lease(held)


def _lock_file(path: Path, owner: str) -> tuple[int, list[Path]]:
    """(fd of `path`, exclusively flocked; the folders made for it, deepest first); a
    UserError when another process holds it."""
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # another process removed the empty folder just now
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(f"run {owner!r} is being written by another process ({holder}): "
                            "wait for it to finish or stop it, then run this again") from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder may have unlinked the file as it released it: lock the path anew
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, created
        os.close(fd)


def _note_holder(fd: int, stage: str) -> None:
    """Who holds the lock, for the refusal message of another process (best effort)."""
    from datetime import datetime

    text = json.dumps({"pid": os.getpid(), "stage": stage,
                       "since": datetime.now().isoformat(timespec="seconds")})
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
    except OSError:
        pass


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process"
    stage = f"nwh {info['stage']}, " if info.get("stage") else ""
    return f"pid {info['pid']}, {stage}since {info.get('since', '?')}"


# -- leftovers of interrupted writes

_OURS = re.compile(r"^\..+\.(?:tmp|old)-(\d+)-\d+-[0-9a-f]+$")  # atomic_path's names
_ZARR_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")    # zarr's LocalStore: <key>.<uuid>.partial
_PROBE = re.compile(r"^\.probe-(\d+)-")                      # ensure_writable's probe


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _is_leftover(name: str) -> bool:
    """Debris of an interrupted write: a zarr partial chunk (only the lock holder writes the
    run's arrays), or a temporary of atomic_path whose writing process is gone."""
    if _ZARR_PARTIAL.search(name):
        return True
    ours = _OURS.match(name)
    return bool(ours) and not _pid_alive(int(ours.group(1)))


def clean_leftovers(storage: Storage, owner: str) -> int:
    """Remove what interrupted writes left in a run's folder and table partitions (called with
    the run's lock held): zarr's *.<uuid>.partial chunks and metadata, atomic_path's
    .<name>.tmp-<pid>-* / .<name>.old-<pid>-* files and folders. Returns how many.

    On object storage nothing partial is ever written (a PUT is whole; atomic writes stage
    locally), so only the local staging folder is cleaned."""
    if not storage.is_local:
        return _clean_staging()
    folders = [storage.run_dir(owner)]
    tables = storage.root / "tables"
    if tables.is_dir():
        folders += [p / f"run_id={owner}" for p in tables.iterdir() if p.is_dir()]
    removed = 0
    for folder in folders:
        if not folder.is_dir():
            continue
        for directory, subdirs, files in os.walk(folder):
            for name in [d for d in subdirs if _is_leftover(d)]:
                subdirs.remove(name)  # not descended into: removed whole
                _remove(Path(directory) / name)
                removed += 1
            for name in files:
                if _is_leftover(name):
                    _remove(Path(directory) / name)
                    removed += 1
    return removed


def clean_root(root: Path) -> None:
    """What killed processes left directly in the root: writability probes and temporaries
    of atomic writes there (the catalog), when their process is gone. A remote root has none:
    its probe object is removed as soon as it is written, its temporaries are local."""
    if is_remote(root):
        return
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        found = _PROBE.match(name) or _OURS.match(name)
        if found and not _pid_alive(int(found.group(1))):
            _remove(Path(root) / name)


# -- a full disk: one message, wherever in a stage it happens

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = re.compile(r"no space left on device|disk quota exceeded|"
                             r"\d+ requested and \d+ written", re.I)  # numpy's short write


def is_disk_full(error: BaseException) -> bool:
    """Whether an error, or one it was raised from (causes, contexts, exception groups), is a
    full disk: errno ENOSPC / EDQUOT, or their text (pyarrow, DuckDB and numpy word it)."""
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        if _DISK_FULL_TEXT.search(str(e)):
            return True
        stack += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return False


def disk_full_message(root: str | os.PathLike) -> str:
    return f"no space left on device under {root}: free space and rerun; the run resumes"
