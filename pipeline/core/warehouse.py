"""The warehouse in SQL: DuckDB views per table, macros over Zarr arrays, and the catalog file.

    nwh sql "select layer, count(*) from neuron_stats group by layer"
    nwh sql "select * from neuron_values('zoo-s0_stdlib', 'acts', 2, 3) order by value desc limit 20"
    nwh sql "select * from coactivation('zoo-s0_stdlib', 2, 3) order by count desc limit 20"
    nwh sql --out stats.parquet "select * from neuron_stats"

Stage queries live in sql/<name>.sql and run with bound parameters ($name), never with string
formatting of values.

Every connection of `connect` is confined to the storage root (DuckDB's own sandbox:
enable_external_access off with the root as the one allowed directory, extensions neither
installed nor loaded, configuration locked), and `query_frame` (the ad-hoc queries of `nwh sql`)
runs read-only statements only: a statement that would write (COPY, EXPORT, CREATE, INSERT...),
open another database (ATTACH), add an extension or change a setting is refused in one line.
The Python functions behind the array macros read Zarr under the root themselves.

`<root>/warehouse.duckdb` is a catalog that any DuckDB client opens: the same views (and the
moment macros) with paths relative to the root, so the root can move. It is rebuilt, through a
temporary file and a rename, when a table gains its first partition or loses its last one
(`partitions_changed`, called by pipeline.core.tables); views read their table's folder by glob,
so other partition changes need no rebuild.

On object storage (an fsspec root such as s3://bucket/prefix) the views read the same globs
under the URL. DuckDB reads them through httpfs with an S3 secret from the environment when
`LOAD httpfs` succeeds (it is never installed from here), else through the root's fsspec
filesystem registered on the connection. The sandbox is the same: the one allowed directory is
the root URL. The catalog is written to the root as well (built locally, uploaded in one PUT),
with the same relative paths: a client sets `warehouse_root` to the URL (see storage/README.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import duckdb
import numpy as np
import pyarrow as pa

from pipeline.core import tables
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, atomic_path, read_json, remove_file, storage_options

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
# The catalog's on-disk format, which DuckDB 1.x clients open as well as Python's 2.x (tested:
# CLI 1.4.4 and 1.5.6); views use getvariable(), which needs 1.1. Small blocks: the catalog
# takes tens of KB instead of 256 KB blocks.
STORAGE_VERSION = "v1.1.0"
BLOCK_SIZE = 16384
CATALOG_FORMAT = 1  # bump when the way the catalog is built changes
_TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_VIEW = re.compile(r"create\s+or\s+replace\s+view\s+(\w+)", re.I)


@functools.lru_cache(maxsize=None)
def load_sql(name: str) -> str:
    path = SQL_DIR / f"{name}.sql"
    if not path.exists():
        raise FileNotFoundError(f"no query sql/{name}.sql")
    return path.read_text()


def _statements(text: str) -> list[str]:
    lines = [ln for ln in text.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


# -- the views


def tables_with_data(storage: Storage) -> list[str]:
    """Tables with at least one Parquet file in a run partition."""
    if not storage.is_local:  # one listing of tables/ instead of a glob per table
        root = storage.root / "tables"
        prefix = root.path.rstrip("/") + "/"
        found = set()
        for key in root.fs.find(prefix):
            parts = key[len(prefix):].split("/")
            if len(parts) == 3 and parts[1].startswith("run_id=") and parts[2].endswith(".parquet") \
                    and not parts[2].startswith("."):
                found.add(parts[0])
        return [t for t in tables.table_names() if t in found]
    return [t for t in tables.table_names()
            if any(storage.table_dir(t).glob("run_id=*/*.parquet"))]


_DUCK_TYPES = {pa.bool_(): "BOOLEAN", pa.int8(): "TINYINT", pa.int16(): "SMALLINT",
               pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.float32(): "FLOAT",
               pa.float64(): "DOUBLE", pa.string(): "VARCHAR"}


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _duck_type(t.value_type) + "[]"
    return _DUCK_TYPES[t]


def _files_view(table: str, has_data: bool) -> str:
    """DDL of files.<table>, the relation the view <table> of sql/views.sql selects from: the
    table's Parquet files, or an empty relation with the declared columns when it has none
    (DuckDB refuses a glob that matches no file). Table names come from schemas/, never from
    input; paths stay relative unless the session sets the variable warehouse_root."""
    if not _TABLE_NAME.match(table):
        raise ValueError(f"table name {table!r} is not a plain identifier")
    if has_data:
        return (f'create or replace view files."{table}" as select * from read_parquet('
                f"coalesce(getvariable('warehouse_root') || '/', '') || "
                f"'tables/{table}/run_id=*/*.parquet', hive_partitioning = true, "
                # run_id is a name: an all-digit one must not become a number
                "hive_types = {'run_id': 'VARCHAR'})")
    columns = [f'cast(null as {_duck_type(f.type)}) as "{f.name}"' for f in tables.schema(table)]
    columns.append('cast(null as varchar) as "run_id"')
    return f'create or replace view files."{table}" as select {", ".join(columns)} where false'


def _define_views(con: duckdb.DuckDBPyConnection, with_data: list[str]) -> None:
    """files.<table> for every table, then the views of sql/views.sql and the moment macros,
    as one script (one call: a rebuild of the catalog stays cheap)."""
    script = ["create schema if not exists files"]
    script += [_files_view(table, table in with_data) for table in tables.table_names()]
    views = _statements(load_sql("views"))
    script += views
    defined = {found.group(1) for found in map(_VIEW.match, views) if found}
    # a table whose view sql/views.sql lacks: the plain one
    script += [f'create or replace view "{t}" as select * from files."{t}"'
               for t in tables.table_names() if t not in defined]
    script += _statements(load_sql("moments"))
    con.execute(";\n".join(script))


# functions (con, storage) that put more functions and macros on every connection, added by the
# modules that define them (a stage's macros over its own results), so this layer imports none
CONNECTION_EXTENSIONS: list = []


def add_connection_extension(register) -> None:
    if register not in CONNECTION_EXTENSIONS:
        CONNECTION_EXTENSIONS.append(register)


def connect(storage: Storage) -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB over the warehouse, confined to the storage root: the views of
    sql/views.sql, the array macros (sql/array_macros.sql), the moment macros and those of
    CONNECTION_EXTENSIONS."""
    con = duckdb.connect()
    root = _root(storage)
    try:
        attach_filesystem(con, storage)
        con.execute("set variable warehouse_root = ?", [root])
        _define_views(con, tables_with_data(storage))
        _register_array_functions(con, storage)
        for stmt in _statements(load_sql("array_macros")):
            con.execute(stmt)
        for register in CONNECTION_EXTENSIONS:
            register(con, storage)
        _confine(con, root)
    except BaseException:
        con.close()
        raise
    return con


def _root(storage: Storage) -> str:
    # resolved: the sandbox compares path text, and the views name files under this text
    return storage.url


def attach_filesystem(con: duckdb.DuckDBPyConnection, storage: Storage) -> str | None:
    """Let DuckDB read a remote root: httpfs with an S3 secret when the extension loads, else
    the root's fsspec filesystem registered on the connection. Returns which ('httpfs',
    'fsspec'), None for a local root."""
    if storage.is_local:
        return None
    if storage.root.protocol in ("s3", "s3a") and _httpfs_s3(con):
        return "httpfs"
    con.register_filesystem(_connection_filesystem(storage))
    return "fsspec"


def _connection_filesystem(storage: Storage):
    """A filesystem of the root's own for one connection, which keeps the listings it made:
    DuckDB then opens the files of a glob without a HEAD request each (82 requests -> 23 to
    bind the views of a small warehouse). A connection lives for one query or stage, so its
    listings are never older than that."""
    options = dict(storage.root.storage_options)
    if options.get("use_listings_cache") is not False:  # a filesystem without that cache
        return storage.root.fs
    import fsspec

    return fsspec.filesystem(storage.root.protocol, **{**options, "use_listings_cache": True,
                                                       "skip_instance_cache": True})


def _httpfs_s3(con: duckdb.DuckDBPyConnection) -> bool:
    """httpfs (already installed: LOAD never downloads) with a secret of the environment's S3
    settings, the ones s3fs reads; False when it is not there."""
    try:
        con.execute("load httpfs")
    except duckdb.Error:
        return False
    options = storage_options("s3")
    endpoint = options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") \
        or os.environ.get("AWS_ENDPOINT_URL")
    region = (options.get("client_kwargs") or {}).get("region_name") \
        or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    secret = {"key_id": options.get("key") or os.environ.get("AWS_ACCESS_KEY_ID"),
              "secret": options.get("secret") or os.environ.get("AWS_SECRET_ACCESS_KEY"),
              "session_token": options.get("token") or os.environ.get("AWS_SESSION_TOKEN"),
              "region": region}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        secret.update(endpoint=host.rstrip("/") or scheme, url_style="path",
                      use_ssl=scheme != "http")
    fields = []
    for name, value in secret.items():
        if value is None:
            continue
        text = str(value).lower() if isinstance(value, bool) else f"'{_quote(str(value))}'"
        fields.append(f"{name} {text}")
    try:  # CREATE SECRET takes no parameters: the values are quoted
        con.execute(f"create or replace secret nwh_s3 (type s3{''.join(', ' + f for f in fields)})")
    except duckdb.Error as e:
        log.warning("httpfs is loaded but its S3 secret failed (%s): reading through fsspec",
                    " ".join(str(e).split()))
        return False
    return True


def _confine(con: duckdb.DuckDBPyConnection, root: str) -> None:
    """DuckDB's sandbox: files under the root only, no extensions, settings locked."""
    spill = Path(tempfile.gettempdir()) / "nwh-duckdb"  # not the cwd's .tmp
    con.execute("set temp_directory = ?", [str(spill)])
    # the trailing separator: /data/storage must not admit /data/storage2 (a URL: s3://b/p
    # must not admit s3://b/p2)
    sep = "/" if "://" in root else os.sep
    con.execute("set allowed_directories = ?", [[root.rstrip(sep) + sep]])
    for setting in ("enable_external_access", "autoinstall_known_extensions",
                    "autoload_known_extensions", "allow_community_extensions"):
        con.execute(f"set {setting} = false")
    con.execute("set lock_configuration = true")


def add_moment_macros(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """The central-moment macros of sql/moments.sql on a connection."""
    for stmt in _statements(load_sql("moments")):
        con.execute(stmt)
    return con


def central_moments(n, shift, s1, s2, s3, s4) -> dict[str, np.ndarray]:
    """Mean, var, skew, kurt (E[z^4]) of each entry from power sums about `shift`, computed by
    the macros of sql/moments.sql (the one definition), for NumPy arrays of equal length."""
    arrays_ = [np.broadcast_to(np.asarray(v, dtype=np.float64), np.shape(s1))
               for v in (n, shift, s1, s2, s3, s4)]
    con = add_moment_macros(duckdb.connect())
    try:
        con.register("power_sums", pa.table({
            "idx": np.arange(len(arrays_[2]), dtype=np.int64),
            **{k: np.ascontiguousarray(v) for k, v in zip(("n", "shift", "s1", "s2", "s3", "s4"),
                                                       arrays_)}}))
        got = con.sql(load_sql("central_moments")).fetchnumpy()
    finally:
        con.close()
    return {k: np.asarray(got[k], dtype=np.float64) if not hasattr(got[k], "filled")
            else got[k].astype(np.float64).filled(np.nan) for k in ("mean", "var", "skew", "kurt")}


def _quote(path: str) -> str:
    # a path in DDL (ATTACH takes no parameters); the path is ours, not input
    return path.replace("'", "''")


def _frame(rel: duckdb.DuckDBPyRelation):
    """A relation as a polars DataFrame, with integer sums as Int64: DuckDB's sum of BIGINT is
    a HUGEINT, which would arrive as decimal(38,0). A value beyond int64 keeps its type."""
    import polars as pl
    import pyarrow.compute as pc

    wide = [i for i, t in enumerate(rel.types) if str(t) in ("HUGEINT", "UHUGEINT")]
    arrow = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
    if not isinstance(arrow, pa.Table):
        arrow = arrow.read_all()
    for i in wide:
        try:
            arrow = arrow.set_column(i, arrow.field(i).name,
                                     pc.cast(arrow.column(i), pa.int64(), safe=True))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    return pl.from_arrow(arrow)


def query(con: duckdb.DuckDBPyConnection, name: str, **params: Any):
    """Run sql/<name>.sql with bound parameters; returns a polars DataFrame."""
    return _frame(con.sql(load_sql(name), params=params))


def run_query(storage: Storage, name: str, **params: Any):
    """sql/<name>.sql over the warehouse (a connection of its own); a query that reads dense
    activations a run did not store is a one-line UserError."""
    con = connect(storage)
    try:
        return query(con, name, **params)
    except duckdb.Error as e:
        message = " ".join(str(e).split())
        if "has no acts array" in message or "no arrays" in message:
            raise UserError(message.split("Error: ")[-1] + ": re-extract with --store-acts") from None
        raise
    finally:
        con.close()


# -- ad-hoc queries: read-only statements only

_SELECTS = ("SELECT", "WITH, FROM, VALUES, TABLE, DESCRIBE, SHOW, SUMMARIZE, PIVOT or EXPLAIN")
_READ_PRAGMAS = {"version", "platform", "user_agent", "database_list", "show_tables",
                 "show_tables_expanded", "show", "table_info", "functions", "collations",
                 "database_size", "storage_info", "metadata_info"}
_OUT_HINT = "write a result with --out FILE"
_REFUSED = {
    "COPY": f"COPY reads and writes files directly: select from the views, and {_OUT_HINT}",
    "EXPORT": f"EXPORT DATABASE writes files: {_OUT_HINT}",
    "ATTACH": "ATTACH opens another database: nwh sql reads the warehouse only",
    "DETACH": "DETACH changes the attached databases: nwh sql reads the warehouse only",
    "SET": "SET and RESET change settings, which are locked in nwh sql",
    "VARIABLE_SET": "SET and RESET change settings, which are locked in nwh sql",
    "CALL": "CALL runs a procedure: use SELECT * FROM function(...) for a table function",
}
_WRITES = {"INSERT", "UPDATE", "DELETE", "CREATE", "CREATE_FUNC", "DROP", "ALTER", "VACUUM",
           "ANALYZE", "TRANSACTION", "PREPARE", "EXECUTE", "MERGE_INTO", "UPDATE_EXTENSIONS",
           "COPY_DATABASE", "LOGICAL_PLAN", "RELATION", "EXTENSION"}


def _first_word(text: str) -> str:
    text = re.sub(r"^(\s+|--[^\n]*\n|/\*.*?\*/)+", "", text, flags=re.S)
    found = re.match(r"[A-Za-z_]+", text)
    return found.group(0).lower() if found else ""


def refusal(con: duckdb.DuckDBPyConnection, sql: str) -> str | None:
    """Why `sql` may not run in nwh sql (None: every statement only reads)."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error:
        return None  # a syntax error: running it gives DuckDB's own message
    for st in statements:
        kind, text = st.type.name, st.query
        word = _first_word(text)
        if kind == "SELECT":
            continue
        if kind == "EXPLAIN":  # EXPLAIN ANALYZE runs the statement it explains
            inner = re.sub(r"^\s*explain\s+(analyze\s+)?", "", text.strip(), flags=re.I)
            why = refusal(con, inner)
            if why:
                return why
            continue
        if kind == "MULTI" and word in ("pivot", "unpivot"):  # a PIVOT: an enum type, then a select
            continue
        if kind == "PRAGMA":
            name = re.match(r"\s*pragma\s+(\w+)", text, re.I)
            if name and name.group(1).lower() in _READ_PRAGMAS:
                continue
            if word == "import":
                return "IMPORT DATABASE loads files into the database: nwh sql reads the warehouse only"
            return f"PRAGMA {name.group(1) if name else ''} is not one that only reads: run a query"
        if kind == "LOAD":
            return (f"{word.upper() or 'LOAD'} adds an extension: nwh sql runs with its "
                    "extensions fixed")
        if kind in _REFUSED:
            return _REFUSED[kind]
        if kind in _WRITES:
            return (f"{word.upper() or kind} writes to the database, which is read-only in "
                    f"nwh sql: {_OUT_HINT}")
        return f"{kind} statements are not allowed: nwh sql runs read-only queries ({_SELECTS[0]}, " \
               f"{_SELECTS[1]})"
    return None


def _message(e: duckdb.Error, storage: Storage) -> str:
    message = " ".join(str(e).split())
    python = re.search(r"(?:ValueError|UserError): (.*)$", message)
    if python:  # raised by a function of the array macros: its own sentence
        return f"query failed: {python.group(1)}"
    if isinstance(e, duckdb.PermissionException):
        path = re.search(r'"([^"]+)"', message)
        what = f"{path.group(1)} is outside" if path else "that is outside"
        return (f"refused: {what} the storage root {_root(storage)}: nwh sql reads the warehouse "
                "only (the views, and files under the root)")
    return f"query failed: {message}"


def query_frame(storage: Storage, sql: str, **params: Any):
    """An ad-hoc read-only query over the warehouse as a polars DataFrame (None for a statement
    without result), `$name` placeholders bound from `params`; a refused or failing query is a
    one-line UserError."""
    con = connect(storage)
    try:
        why = refusal(con, sql)
        if why:
            raise UserError(f"refused: {why}")
        rel = con.sql(sql, params=params) if params else con.sql(sql)
        return None if rel is None else _frame(rel)
    except duckdb.Error as e:
        raise UserError(_message(e, storage)) from None
    finally:
        con.close()


def check_warehouse(storage: Storage) -> None:
    """A UserError unless the root exists and holds a warehouse (a mistyped --storage)."""
    storage.check_exists()


# -- the catalog file: <root>/warehouse.duckdb


def _catalog_state(storage: Storage) -> dict:
    """What the catalog's content depends on: the SQL and schemas it is built from, and which
    tables have data (their views read files; the others are empty)."""
    digest = hashlib.sha256()
    for text in (load_sql("views"), load_sql("moments"), STORAGE_VERSION, str(BLOCK_SIZE),
                 str(CATALOG_FORMAT)):
        digest.update(text.encode())
    for table in tables.table_names():
        digest.update(str(tables.schema(table)).encode())
    return {"format": CATALOG_FORMAT, "sql": digest.hexdigest()[:16],
            "tables": tables_with_data(storage)}


def _state_path(storage: Storage) -> Path:
    return storage.root / ".warehouse.duckdb.json"


def _stored_state(storage: Storage) -> dict | None:
    try:
        return json.loads(_state_path(storage).read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def _catalog_lock(storage: Storage) -> Iterator[None]:
    """Serialise rebuilds of one root across processes (the kernel drops a flock of a dead
    process, so a kill never leaves it stuck)."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: rebuilds are still atomic, just not serial
        yield
        return
    # a remote root has no locks: this machine's folder of it (local_dir is the root otherwise)
    folder = storage.local_dir()
    if not storage.is_local:
        folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".warehouse.duckdb.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def refresh_catalog(storage: Storage, force: bool = False) -> bool:
    """Rebuild <root>/warehouse.duckdb when it is missing or out of date; True if rebuilt.

    Cheap when nothing changed (a glob per table and one small file read). Two processes that
    rebuild at once take turns; the second sees the first's result and does nothing."""
    if not force and storage.catalog().exists() and _stored_state(storage) == _catalog_state(storage):
        return False
    if storage.is_local:
        storage.root.mkdir(parents=True, exist_ok=True)
    with _catalog_lock(storage):
        state = _catalog_state(storage)  # again, under the lock: another process may have built it
        if not force and storage.catalog().exists() and _stored_state(storage) == state:
            return False
        if storage.is_local:  # a remote rebuild stages locally: no leftovers in the root
            for leftover in storage.root.glob(".warehouse.duckdb.tmp-*"):  # of a killed rebuild
                leftover.unlink(missing_ok=True)
        _build_catalog(storage, state["tables"])
        with atomic_path(_state_path(storage)) as tmp:
            tmp.write_text(json.dumps(state) + "\n")
    return True


_BUILDER: dict[str, Any] = {"pid": None, "con": None}
_BUILDER_LOCK = threading.Lock()


def _build_catalog(storage: Storage, with_data: list[str]) -> None:
    target = storage.catalog()
    if not storage.is_local:
        _build_remote_catalog(storage, with_data)
        return
    with atomic_path(target) as tmp, _BUILDER_LOCK:
        # one in-memory connection per process builds every catalog (a new one costs as much
        # as the views); not shared with a forked child
        if _BUILDER["pid"] != os.getpid():
            _BUILDER.update(pid=os.getpid(), con=duckdb.connect())
        con = _BUILDER["con"]
        attached = False
        try:
            con.execute(f"attach '{_quote(str(tmp))}' as catalog "
                        f"(storage_version '{STORAGE_VERSION}', block_size {BLOCK_SIZE})")
            attached = True
            con.execute("use catalog")
            # views are bound as they are created: their files are found under the root here,
            # while the stored SQL keeps the relative path
            con.execute("set variable warehouse_root = ?", [_root(storage)])
            con.execute("begin")
            _define_views(con, with_data)
            con.execute("commit")
        except BaseException:
            _BUILDER.update(pid=None, con=None)  # start afresh after a failure
            con.close()
            raise
        finally:
            if attached and _BUILDER["con"] is con:
                con.execute("use memory")
                con.execute("detach catalog")
        Path(f"{tmp}.wal").unlink(missing_ok=True)
        # a WAL that a client left beside the old file must not be replayed onto the new one
        Path(f"{target}.wal").unlink(missing_ok=True)


def _build_remote_catalog(storage: Storage, with_data: list[str]) -> None:
    """The catalog of a remote root: built in a local file by a connection of its own (the
    root's filesystem is registered on it to bind the views), uploaded in one PUT."""
    target = storage.catalog()
    with atomic_path(target) as tmp:
        con = duckdb.connect()
        try:
            attach_filesystem(con, storage)
            con.execute(f"attach '{_quote(str(tmp))}' as catalog "
                        f"(storage_version '{STORAGE_VERSION}', block_size {BLOCK_SIZE})")
            con.execute("use catalog")
            con.execute("set variable warehouse_root = ?", [_root(storage)])
            con.execute("begin")
            _define_views(con, with_data)
            con.execute("commit")
            con.execute("use memory")
            con.execute("detach catalog")
        finally:
            con.close()
        Path(f"{tmp}.wal").unlink(missing_ok=True)
    remove_file(target.with_name(target.name + ".wal"))


def partitions_changed(storage: Storage, table: str) -> None:
    """Called after a partition of `table` was written or removed: rebuild the catalog if its
    views must change. A failure is logged, never raised: the write itself succeeded."""
    try:
        if refresh_catalog(storage):
            log.debug("rebuilt %s after a change of table %s", storage.catalog(), table)
    except Exception as e:  # the catalog is derived: the tables are what count
        log.warning("could not rebuild %s (%s): nwh sql still works; the next write retries",
                    storage.catalog(), " ".join(str(e).split()))
        remove_file(_state_path(storage))


# -- Zarr access from SQL


def _register_array_functions(con: duckdb.DuckDBPyConnection, storage: Storage) -> None:
    from pipeline.core import arrays

    cache: dict[tuple[str, str, int], Any] = {}
    groups: dict[str, Any] = {}
    committed: dict[str, int | None] = {}

    def rows_of(run: str) -> int | None:
        """Rows a reader may see: the manifest's committed rows (an array can be longer while
        a commit is under way, or after one was interrupted); None without a manifest."""
        if run not in committed:
            path = storage.run_manifest(run)
            committed[run] = committed_rows(read_json(path)) if path.exists() else None
        return committed[run]

    def group_of(run: str):
        if run not in groups:
            path = storage.arrays(run)
            if not path.exists():
                raise ValueError(f"run {run!r} has no arrays in {storage.root}")
            groups[run] = arrays.open_group(path, mode="r")
        return groups[run]

    def array_of(run: str, kind: str, layer: int):
        key = (run, kind, layer)
        if key not in cache:
            if kind not in ("acts", "active"):
                raise ValueError(f"kind must be 'acts' or 'active', not {kind!r}")
            group = group_of(run)
            if f"{kind}/L{layer}" not in group:
                hint = " (dense activations need --store-acts)" if kind == "acts" else ""
                raise ValueError(f"run {run!r} has no {kind} array for layer {layer}{hint}")
            width = (_run_widths(storage, run)[layer] if kind == "active"
                     else group[f"{kind}/L{layer}"].shape[1])
            cache[key] = (group[f"{kind}/L{layer}"], width)
        return cache[key]

    def clip(run: str, rows: slice) -> slice:
        limit = rows_of(run)
        if limit is None:
            return rows
        start = min(rows.start or 0, limit)
        return slice(start, limit if rows.stop is None else max(start, min(rows.stop, limit)))

    def values(kind: str, array, width: int, rows: slice, neuron: int | None) -> np.ndarray:
        if kind == "acts":
            block = array[rows] if neuron is None else array[rows, neuron]
            return np.asarray(block, dtype=np.float64).reshape(-1)
        if neuron is not None:
            byte = np.asarray(array[rows, neuron // 8])
            return ((byte >> (neuron % 8)) & 1).astype(np.float64)
        return arrays.unpack_mask(np.asarray(array[rows]), width).astype(np.float64).reshape(-1)

    def as_lists(chunks: list[np.ndarray], dtype=np.float64) -> pa.Array:
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
        flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype)
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(dtype)))

    def zarr_column(run, kind, layer, neuron):
        out = []
        for r, k, l, n in zip(run.to_pylist(), kind.to_pylist(), layer.to_pylist(), neuron.to_pylist()):
            array, width = array_of(r, k, l)
            if not 0 <= n < width:
                raise ValueError(f"neuron {n} is out of range for layer {l} (width {width})")
            out.append(values(k, array, width, clip(r, slice(None)), n))
        return as_lists(out)

    def zarr_block(run, kind, layer, start, stop):
        out = []
        for r, k, l, a, b in zip(run.to_pylist(), kind.to_pylist(), layer.to_pylist(),
                                 start.to_pylist(), stop.to_pylist()):
            array, width = array_of(r, k, l)
            out.append(values(k, array, width, clip(r, slice(a, b)), None))
        return as_lists(out)

    def zarr_width(run, kind, layer):
        return pa.array([array_of(r, k, l)[1] for r, k, l in
                         zip(run.to_pylist(), kind.to_pylist(), layer.to_pylist())], pa.int64())

    def counts_of(run: str, a: int, b: int):
        """The finished counts of layers a and b as (array, transposed): a pair is stored once,
        under the order it was counted in."""
        key = (run, "coact", a * 100003 + b)
        if key not in cache:
            group = group_of(run)
            for name, transposed in ((arrays.pair_name(a, b), False), (arrays.pair_name(b, a), True)):
                if name in group and group[name].attrs.get("complete"):
                    cache[key] = (group[name], transposed)
                    break
            else:
                raise ValueError(f"run {run!r} has no co-activation counts for layers {a}:{b}: "
                                 f"run `nwh coactivation --run {run} --pairs {a}:{b}`")
        return cache[key]

    def coact_rows(run, a, b):
        out = []
        for r, x, y in zip(run.to_pylist(), a.to_pylist(), b.to_pylist()):
            array, transposed = counts_of(r, x, y)
            out.append(array.shape[1] if transposed else array.shape[0])
        return pa.array(out, pa.int64())

    def coact_block(run, a, b, start, stop):
        """Nonzero counts of neurons start..stop-1 of layer a with every neuron of layer b."""
        na, nb, cnt = [], [], []
        for r, x, y, s, e in zip(run.to_pylist(), a.to_pylist(), b.to_pylist(),
                                 start.to_pylist(), stop.to_pylist()):
            array, transposed = counts_of(r, x, y)
            block = np.asarray(array[:, s:e]).T if transposed else np.asarray(array[s:e])
            i, j = np.nonzero(block)
            na.append((i + s).astype(np.int32))
            nb.append(j.astype(np.int32))
            cnt.append(block[i, j].astype(np.int64))
        return pa.StructArray.from_arrays(
            [as_lists(na, np.int32), as_lists(nb, np.int32), as_lists(cnt, np.int64)],
            names=["neuron_a", "neuron_b", "count"])

    V, I, B = duckdb.sqltype("VARCHAR"), duckdb.sqltype("INTEGER"), duckdb.sqltype("BIGINT")
    dbl_list = duckdb.list_type(duckdb.sqltype("DOUBLE"))
    con.create_function("zarr_column", zarr_column, [V, V, I, I], dbl_list, type="arrow")
    con.create_function("zarr_block", zarr_block, [V, V, I, B, B], dbl_list, type="arrow")
    con.create_function("zarr_width", zarr_width, [V, V, I], B, type="arrow")
    con.create_function("coact_rows", coact_rows, [V, I, I], B, type="arrow")
    pairs = duckdb.struct_type({"neuron_a": duckdb.list_type(I), "neuron_b": duckdb.list_type(I),
                                "count": duckdb.list_type(B)})
    con.create_function("coact_block", coact_block, [V, I, I, B, B], pairs, type="arrow")


def _run_widths(storage: Storage, run: str) -> list[int]:
    return read_json(storage.run_manifest(run))["model"]["widths"]


def committed_rows(manifest: dict) -> int | None:
    """Rows of a run that readers see: all of a finished run, the last commit of another;
    None for a manifest that records neither (every row of the arrays)."""
    if manifest.get("status") == "finished" and "rows" in manifest:
        return int(manifest["rows"])
    if "rows" in manifest.get("committed", {}):
        return int(manifest["committed"]["rows"])
    return int(manifest["rows"]) if "rows" in manifest else None
