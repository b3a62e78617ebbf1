"""Co-activation counts: C = B_a^T B_b of the bit-packed active masks of two layers.

    nwh coactivation --run demo-corpus                  # every adjacent pair of recorded layers
    nwh coactivation --run demo-corpus --pairs 0:2,1:3  # other pairs
    nwh coactivation --run demo-corpus --engine sql     # the readable reference engine

C[i, j] = number of token rows where neuron i of layer a and neuron j of layer b are both active.
Streamed over token chunks (memory: one pair's matrix plus one chunk), stored as int64 Zarr
arrays coact/L<a>_L<b> [d_a, d_b] with a completion marker, so finished pairs are skipped.

Engines (all exact, and tested to agree):
  popcount  CPU: token chunks transposed to neuron-major bitsets of uint64 words, then
            AND + popcount over the words for every neuron pair (numba, parallel)
  matmul    0/1 matrix product in torch: fp16 on CUDA (tensor cores, fp32 accumulation, blocks
            of <= 2048 tokens so the fp16 result is an exact integer), fp32 on CPU (blocks of
            <= 8192 tokens); block results are summed in int64
  sql       DuckDB self-join of sparse active events (row, neuron) on row, grouped by pair
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from pipeline import arrays, tables
from pipeline.config import add_arguments, from_args, opt
from pipeline.errors import UserError
from pipeline.storage import DEFAULT_ROOT, Storage, read_json

log = logging.getLogger(__name__)

ENGINES = ("auto", "popcount", "matmul", "sql")
MAX_CHUNK = 8192  # tokens per block: keeps popcount blocks in cache and fp32 sums exact


# -- the popcount kernel (numba)


def _build_kernels():
    from numba import njit, prange, types
    from numba.extending import intrinsic

    @intrinsic
    def popcount64(typingctx, x):
        sig = types.uint64(types.uint64)

        def codegen(context, builder, signature, args):
            return builder.ctpop(args[0])

        return sig, codegen

    @njit(inline="always")
    def pair(a, b, i, j):
        s = np.uint64(0)
        for w in range(a.shape[1]):
            s += popcount64(a[i, w] & b[j, w])
        return s

    @njit(parallel=True, cache=True, nogil=True)
    def and_popcount(a, b, out):
        """out[i, j] += sum_w popcount(a[i, w] & b[j, w]); a [da, W], b [db, W] uint64.

        4 x 4 register tiles: each loaded word feeds four AND+popcounts.
        """
        da, words = a.shape
        db = b.shape[0]
        da4, db4 = da - da % 4, db - db % 4
        for it in prange(da4 // 4):
            i = it * 4
            for j in range(0, db4, 4):
                c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = np.uint64(0)
                c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = np.uint64(0)
                for w in range(words):
                    a0, a1, a2, a3 = a[i, w], a[i + 1, w], a[i + 2, w], a[i + 3, w]
                    b0, b1, b2, b3 = b[j, w], b[j + 1, w], b[j + 2, w], b[j + 3, w]
                    c00 += popcount64(a0 & b0)
                    c01 += popcount64(a0 & b1)
                    c02 += popcount64(a0 & b2)
                    c03 += popcount64(a0 & b3)
                    c10 += popcount64(a1 & b0)
                    c11 += popcount64(a1 & b1)
                    c12 += popcount64(a1 & b2)
                    c13 += popcount64(a1 & b3)
                    c20 += popcount64(a2 & b0)
                    c21 += popcount64(a2 & b1)
                    c22 += popcount64(a2 & b2)
                    c23 += popcount64(a2 & b3)
                    c30 += popcount64(a3 & b0)
                    c31 += popcount64(a3 & b1)
                    c32 += popcount64(a3 & b2)
                    c33 += popcount64(a3 & b3)
                out[i, j] += c00
                out[i, j + 1] += c01
                out[i, j + 2] += c02
                out[i, j + 3] += c03
                out[i + 1, j] += c10
                out[i + 1, j + 1] += c11
                out[i + 1, j + 2] += c12
                out[i + 1, j + 3] += c13
                out[i + 2, j] += c20
                out[i + 2, j + 1] += c21
                out[i + 2, j + 2] += c22
                out[i + 2, j + 3] += c23
                out[i + 3, j] += c30
                out[i + 3, j + 1] += c31
                out[i + 3, j + 2] += c32
                out[i + 3, j + 3] += c33
            for j in range(db4, db):  # right edge
                for k in range(4):
                    out[i + k, j] += pair(a, b, i + k, j)
        for i in prange(da4, da):  # bottom edge
            for j in range(db):
                out[i, j] += pair(a, b, i, j)

    @njit(parallel=True, cache=True, nogil=True)
    def to_bitsets(packed, width, out):
        """Token-major packed bytes [t, nb] -> neuron-major uint64 bitsets out [width, ceil(t/64)]."""
        t, nb = packed.shape
        for b in prange(nb):
            for w in range(out.shape[1]):
                r0 = w * 64
                acc = np.zeros(8, np.uint64)
                for r in range(r0, min(r0 + 64, t)):
                    byte = packed[r, b]
                    if byte:
                        bit = np.uint64(1) << np.uint64(r - r0)
                        for k in range(8):
                            if (byte >> k) & 1:
                                acc[k] |= bit
                for k in range(8):
                    if b * 8 + k < width:
                        out[b * 8 + k, w] = acc[k]

    return and_popcount, to_bitsets


_kernels = None


def _numba_kernels():
    global _kernels
    if _kernels is None:
        _kernels = _build_kernels()
    return _kernels


def neuron_bitsets(packed: np.ndarray, width: int) -> np.ndarray:
    """Token-major packed rows [t, ceil(w/8)] -> neuron-major bitsets [w, ceil(t/64)] uint64."""
    out = np.zeros((width, (packed.shape[0] + 63) // 64), np.uint64)
    if packed.shape[0]:
        _numba_kernels()[1](np.ascontiguousarray(packed), width, out)
    return out


def counts_popcount(packed_a: np.ndarray, packed_b: np.ndarray, width_a: int, width_b: int,
                    out: np.ndarray | None = None) -> np.ndarray:
    out = np.zeros((width_a, width_b), np.int64) if out is None else out
    for s in range(0, packed_a.shape[0], MAX_CHUNK):
        a = neuron_bitsets(packed_a[s:s + MAX_CHUNK], width_a)
        b = neuron_bitsets(packed_b[s:s + MAX_CHUNK], width_b)
        _numba_kernels()[0](a, b, out)
    return out


def counts_matmul(packed_a: np.ndarray, packed_b: np.ndarray, width_a: int, width_b: int,
                  out: np.ndarray | None = None, device: str = "cpu") -> np.ndarray:
    import torch

    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32  # 0/1 exact in both
    out = np.zeros((width_a, width_b), np.int64) if out is None else out
    acc = torch.zeros((width_a, width_b), dtype=torch.int64, device=dev)
    # fp16 products land in fp16, whose integers are exact up to 2048: smaller steps on CUDA
    step = 2048 if dtype == torch.float16 else MAX_CHUNK
    for s in range(0, packed_a.shape[0], step):
        a = torch.from_numpy(arrays.unpack_mask(packed_a[s:s + step], width_a)).to(dev, dtype)
        b = torch.from_numpy(arrays.unpack_mask(packed_b[s:s + step], width_b)).to(dev, dtype)
        acc += torch.matmul(a.T, b).round().to(torch.int64)
    out += acc.cpu().numpy()
    return out


def active_events(packed: np.ndarray, width: int, row_offset: int = 0):
    """Sparse (row, neuron) pairs of the active bits of packed rows, as an Arrow table."""
    import pyarrow as pa

    rows, neurons = np.nonzero(arrays.unpack_mask(packed, width))
    return pa.table({"row": (rows + row_offset).astype(np.int64),
                     "neuron": neurons.astype(np.int32)})


def counts_sql(packed_a: np.ndarray, packed_b: np.ndarray, width_a: int, width_b: int,
               out: np.ndarray | None = None) -> np.ndarray:
    import duckdb

    from pipeline.warehouse import load_sql

    out = np.zeros((width_a, width_b), np.int64) if out is None else out
    con = duckdb.connect()
    try:
        for s in range(0, packed_a.shape[0], MAX_CHUNK):
            con.register("events_a", active_events(packed_a[s:s + MAX_CHUNK], width_a, s))
            con.register("events_b", active_events(packed_b[s:s + MAX_CHUNK], width_b, s))
            i, j, c = con.execute(load_sql("coactivation_events")).fetchnumpy().values()
            np.add.at(out, (i.astype(np.int64), j.astype(np.int64)), c.astype(np.int64))
    finally:
        con.close()
    return out


def coactivation_counts(packed_a: np.ndarray, packed_b: np.ndarray, width_a: int, width_b: int,
                        engine: str = "popcount", device: str = "cpu") -> np.ndarray:
    """Exact int64 co-activation counts [width_a, width_b] of two packed mask blocks."""
    if packed_a.shape[0] != packed_b.shape[0]:
        raise ValueError("both layers need the same token rows")
    if engine == "popcount":
        return counts_popcount(packed_a, packed_b, width_a, width_b)
    if engine == "matmul":
        return counts_matmul(packed_a, packed_b, width_a, width_b, device=device)
    if engine == "sql":
        return counts_sql(packed_a, packed_b, width_a, width_b)
    raise UserError(f"--engine {engine!r} is unknown: use one of {', '.join(ENGINES)}")


# -- the stage


@dataclass
class CoactivationConfig:
    run: str = opt(help="run whose active masks are counted")
    pairs: str | None = opt(None, help="layer pairs 'a:b,c:d' (default: every adjacent pair of "
                            "recorded layers)")
    engine: str = opt("auto", help="auto (matmul on CUDA, else popcount), popcount, matmul, sql",
                      choices=ENGINES)
    device: str = opt("auto", help="device of the matmul engine: auto, cpu, cuda")
    chunk_tokens: int = opt(MAX_CHUNK, help="token rows read per block (<= 8192 for exactness)")

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise UserError(f"--engine {self.engine!r} is unknown: use one of {', '.join(ENGINES)}")
        if not 1 <= self.chunk_tokens <= MAX_CHUNK:
            raise UserError(f"--chunk-tokens must be in 1..{MAX_CHUNK}")


def parse_pairs(spec: str | None, layers: list[int]) -> list[tuple[int, int]]:
    if not spec:
        return list(zip(layers[:-1], layers[1:]))
    out = []
    for part in spec.split(","):
        try:
            a, b = (int(x) for x in part.split(":"))
        except ValueError:
            raise UserError(f"--pairs {spec!r} is malformed: use 'a:b,c:d', e.g. '0:1,1:2'") from None
        missing = [x for x in (a, b) if x not in layers]
        if missing:
            raise UserError(f"--pairs names layer(s) {missing} that the run did not record "
                            f"(recorded: {layers})")
        out.append((a, b))
    return out


def pair_name(a: int, b: int) -> str:
    return f"coact/L{a}_L{b}"


def read_counts(storage: Storage, run: str, a: int, b: int) -> np.ndarray:
    group = arrays.open_group(storage.arrays(run), mode="r")
    name = pair_name(a, b)
    if name not in group or not group[name].attrs.get("complete"):
        raise UserError(f"run {run!r} has no co-activation counts for layers {a}:{b}: "
                        f"run `nwh coactivation --run {run} --pairs {a}:{b}`")
    return group[name][:]


def coactivation(config: CoactivationConfig, storage: Storage, *, overwrite: bool = False,
                 progress: bool = True) -> dict[tuple[int, int], str]:
    """Count every requested pair of a run; returns pair -> Zarr array path."""
    from tqdm.auto import tqdm

    from pipeline.models import resolve_device

    manifest = storage.finished_run(config.run)
    widths = manifest["model"]["widths"]
    pairs = parse_pairs(config.pairs, manifest["model"]["layers"])
    device = resolve_device(config.device)
    engine = config.engine
    if engine == "auto":
        engine = "matmul" if device.type == "cuda" else "popcount"
    group = arrays.open_group(storage.arrays(config.run))
    rows = manifest["rows"]
    out, summary = {}, []
    bar = tqdm(total=len(pairs) * rows, unit="tok", unit_scale=True, disable=not progress,
               desc=f"coactivation {config.run}")
    for a, b in pairs:
        name = pair_name(a, b)
        if name in group and group[name].attrs.get("complete") and not overwrite:
            log.info("pair %d:%d is already counted: skipped", a, b)
            bar.update(rows)
            out[(a, b)] = name
            continue
        t0 = time.perf_counter()
        counts = np.zeros((widths[a], widths[b]), np.int64)
        active_a, active_b = group[f"active/L{a}"], group[f"active/L{b}"]
        for s in range(0, rows, config.chunk_tokens):
            pa_, pb_ = active_a[s:s + config.chunk_tokens], active_b[s:s + config.chunk_tokens]
            if engine == "matmul":
                counts_matmul(pa_, pb_, widths[a], widths[b], out=counts, device=str(device))
            elif engine == "sql":
                counts_sql(pa_, pb_, widths[a], widths[b], out=counts)
            else:
                counts_popcount(pa_, pb_, widths[a], widths[b], out=counts)
            bar.update(len(pa_))
        seconds = time.perf_counter() - t0
        array = group.create_array(name=name, shape=counts.shape, dtype="int64",
                                   chunks=(min(1024, counts.shape[0]), counts.shape[1]),
                                   overwrite=True)
        array[:] = counts
        array.attrs.update(complete=True, tokens=rows, engine=engine,
                           max_count=int(counts.max(initial=0)), seconds=round(seconds, 3))
        out[(a, b)] = name
        summary.append((a, b, engine, seconds, counts))
    bar.close()
    _write_pairs_table(storage, config.run, group, rows)
    return out


def _write_pairs_table(storage: Storage, run: str, group, rows: int) -> None:
    """One row per counted pair of the run (the `coactivation_pairs` table)."""
    cols: dict[str, list] = {k: [] for k in ("layer_a", "layer_b", "tokens", "max_count",
                                              "nonzero", "total", "engine", "seconds")}
    if "coact" not in group:
        return
    for key, array in sorted(group["coact"].arrays()):
        if not array.attrs.get("complete"):
            continue
        a, b = (int(x[1:]) for x in key.split("_"))
        counts = array[:]
        for k, v in (("layer_a", a), ("layer_b", b), ("tokens", rows),
                     ("max_count", int(counts.max(initial=0))),
                     ("nonzero", int(np.count_nonzero(counts))), ("total", int(counts.sum())),
                     ("engine", array.attrs["engine"]), ("seconds", array.attrs["seconds"])):
            cols[k].append(v)
    tables.write_part(storage, "coactivation_pairs", run, cols)


# -- weights of the counts (sql/edge_weights.sql)


def max_count(storage: Storage, run: str) -> int:
    """The largest count over every counted pair of the run (the reference normaliser)."""
    group = arrays.open_group(storage.arrays(run), mode="r")
    if "coact" not in group:
        raise UserError(f"run {run!r} has no co-activation counts: run `nwh coactivation --run {run}`")
    return max((int(a.attrs["max_count"]) for _, a in group["coact"].arrays()
                if a.attrs.get("complete")), default=0)


def pair_edges(storage: Storage, run: str, a: int, b: int, *, con=None,
               max_count_value: int | None = None):
    """Edges (count > 0) of one pair with weights normalized, jaccard and npmi (Arrow table)."""
    import duckdb
    import pyarrow as pa

    from pipeline.warehouse import load_sql

    counts = read_counts(storage, run, a, b)
    active = {l: c for l, c in _active_counts(storage, run).items()}
    i, j = np.nonzero(counts)
    edges = pa.table({
        "layer_a": np.full(len(i), a, np.int32), "neuron_a": i.astype(np.int32),
        "layer_b": np.full(len(i), b, np.int32), "neuron_b": j.astype(np.int32),
        "count": counts[i, j], "n_a": active[a][i], "n_b": active[b][j],
    })
    own = con is None
    con = duckdb.connect() if own else con
    try:
        con.register("pair_counts", edges)
        rows = read_json(storage.run_manifest(run))["rows"]
        mc = max_count(storage, run) if max_count_value is None else max_count_value
        return con.sql(load_sql("edge_weights"),
                       params={"max_count": mc, "tokens": rows}).to_arrow_table()
    finally:
        con.unregister("pair_counts")
        if own:
            con.close()


def _active_counts(storage: Storage, run: str) -> dict[int, np.ndarray]:
    stats = tables.read_partition(storage, "neuron_stats", run)
    layer = stats["layer"].to_numpy()
    count = stats["active_count"].to_numpy()
    neuron = stats["neuron"].to_numpy()
    out = {}
    for l in np.unique(layer):
        sel = layer == l
        arr = np.zeros(neuron[sel].max() + 1, np.int64)
        arr[neuron[sel]] = count[sel]
        out[int(l)] = arr
    return out


def iter_pair_edges(storage: Storage, run: str) -> Iterator[tuple[tuple[int, int], object]]:
    """Pair by pair, the weighted edges of every counted pair of a run."""
    group = arrays.open_group(storage.arrays(run), mode="r")
    mc = max_count(storage, run)
    for key, array in sorted(group["coact"].arrays()):
        if array.attrs.get("complete"):
            a, b = (int(x[1:]) for x in key.split("_"))
            yield (a, b), pair_edges(storage, run, a, b, max_count_value=mc)


# -- CLI


def register(sub) -> None:
    from pipeline.cli import add_stage_parser

    parser = add_stage_parser(
        sub, "coactivation", "Count co-activations of neuron pairs of adjacent layers (exact).",
        "  nwh coactivation --run demo-corpus\n"
        "  nwh coactivation --run demo-corpus --pairs 0:2,1:3 --engine sql\n"
        "  nwh sql \"select * from coactivation_pairs\"\n",
    )
    add_arguments(parser, CoactivationConfig)
    parser.add_argument("--storage", default=str(DEFAULT_ROOT), help="warehouse root (default: storage)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--overwrite", action="store_true", help="recount pairs already counted")
    parser.set_defaults(handler=_cli)


def _cli(args) -> int:
    from pipeline.cli import echo

    config = from_args(CoactivationConfig, args)
    storage = Storage(args.storage)
    done = coactivation(config, storage, overwrite=args.overwrite, progress=not args.quiet)
    group = arrays.open_group(storage.arrays(config.run), mode="r")
    for (a, b), name in done.items():
        attrs = group[name].attrs
        echo(f"L{a}->L{b}: max count {attrs['max_count']} over {attrs['tokens']} tokens "
             f"({attrs['engine']}, {attrs['seconds']:.2f} s)")
    return 0
