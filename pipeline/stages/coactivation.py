"""Co-activation counts: C = B_a^T B_b of the bit-packed active masks of two layers.

    nwh coactivation --run demo-corpus                    # every adjacent pair of recorded layers
    nwh coactivation --run demo-corpus --pairs 0:2,1:3    # other pairs
    nwh coactivation --run demo-corpus --engine sql       # the readable reference engine
    nwh coactivation --run demo-corpus --ray              # one Ray task per pair

C[i, j] = number of included token rows (tokens.included) where neuron i of layer a and neuron j of
layer b are both active.
Streamed over token blocks (memory: one pair's matrix plus one block), stored as int64 Zarr
arrays coact/L<a>_L<b> [d_a, d_b] of the run's arrays.zarr. The `complete` attribute is set
last and is the completion marker: a re-run skips finished pairs, `--overwrite` recounts them.
Then the `coactivation_pairs` table and runs/<run>/stages/coactivation-<config hash>.json (the
resolved config: pairs, engine) are written, last.

Engines (all exact, and tested to agree with each other and with a dense integer product):
  popcount  CPU: each token block is transposed to neuron-major bitsets (uint64 words over
            tokens), then C[i, j] += sum_w popcount(A_i[w] & B_j[w]), vectorised over 8 neurons
            of b with a Harley-Seal adder tree (numba + LLVM IR, parallel, blocked;
            pipeline/kernels/bitkernels.py)
  cuda      0/1 fp16 matrix product on tensor cores with fp32 accumulation, per block of
            <= 8,192 tokens; block results are summed in fp32 while below 2^24 (exact), then
            flushed into int64
  matmul    the same chunked 0/1 product in fp32 on --device (the CPU check of the cuda path)
  sql       DuckDB self-join of sparse active events (row, neuron) on row, grouped by neuron
            pair (sql/coactivation_events.sql): the definition, and the slowest
`--engine auto` is cuda when the device is CUDA, else popcount.

Reading the counts back (read_counts, max_count, active counts, weighted edges):
pipeline/core/coact.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.core import arrays, coact, tables
from pipeline.core.config import Progress, Stage, config_hash, opt, to_dict
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage

log = logging.getLogger(__name__)

ENGINES = ("auto", "popcount", "cuda", "matmul", "sql")
MAX_CHUNK = 8192  # tokens per block: popcount blocks stay in cache; fp16 x fp16 -> fp32 stays exact
FP32_EXACT = 1 << 24  # integers up to 2^24 are exact in fp32: flush sums to int64 before that


# -- engines: one streaming counter per engine, fed token blocks of both layers


class PopcountCounter:
    """AND + popcount over neuron-major bitsets (numba); C accumulates in an int64 array."""

    def __init__(self, width_a: int, width_b: int):
        self.width_a, self.width_b = width_a, width_b
        self.counts = np.zeros((width_a, width_b), np.int64)

    def add(self, packed_a: np.ndarray, packed_b: np.ndarray) -> None:
        from pipeline.kernels.bitkernels import and_popcount

        for s in range(0, packed_a.shape[0], MAX_CHUNK):
            a = neuron_bitsets(packed_a[s:s + MAX_CHUNK], self.width_a)
            b = neuron_bitsets(packed_b[s:s + MAX_CHUNK], self.width_b, interleave=True)
            and_popcount(a, b, self.counts)

    def result(self) -> np.ndarray:
        return self.counts


class TorchCounter:
    """0/1 matrix product in torch: fp16 on CUDA (tensor cores, fp32 accumulation), fp32 elsewhere.

    Masks are unpacked on the device. Each block of <= 8,192 tokens contributes at most 8,192 to
    a count, so its fp32 product is exact; block products are summed in fp32 while the summed
    tokens stay below 2^24, then flushed into an int64 accumulator.
    """

    def __init__(self, width_a: int, width_b: int, device: str = "cpu", half: bool | None = None):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.width_a, self.width_b = width_a, width_b
        self.half = self.device.type == "cuda" if half is None else half
        self.dtype = torch.float16 if self.half else torch.float32
        self.acc = torch.zeros((width_a, width_b), dtype=torch.float32, device=self.device)
        self.total = torch.zeros((width_a, width_b), dtype=torch.int64, device=self.device)
        self.pending = 0  # tokens summed in self.acc since the last flush
        self.shifts = torch.arange(8, dtype=torch.uint8, device=self.device)

    def _unpack(self, packed: np.ndarray, width: int):
        torch = self.torch
        p = torch.from_numpy(np.ascontiguousarray(packed)).to(self.device, non_blocking=True)
        bits = (p.unsqueeze(-1) >> self.shifts) & 1  # [t, nb, 8], bit k of byte b = neuron 8b + k
        return bits.reshape(p.shape[0], -1)[:, :width].to(self.dtype)

    def _product(self, a, b):
        torch = self.torch
        if not self.half:
            return torch.mm(a.T, b)
        try:  # fp16 inputs, fp32 accumulation and output (cuBLAS tensor cores)
            return torch.mm(a.T, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # older torch, or the CPU: fp16 output, exact up to 2048
            out = torch.zeros((a.shape[1], b.shape[1]), dtype=torch.float32, device=self.device)
            for s in range(0, a.shape[0], 2048):
                out += torch.mm(a[s:s + 2048].T, b[s:s + 2048]).float()
            return out

    def add(self, packed_a: np.ndarray, packed_b: np.ndarray) -> None:
        for s in range(0, packed_a.shape[0], MAX_CHUNK):
            pa, pb = packed_a[s:s + MAX_CHUNK], packed_b[s:s + MAX_CHUNK]
            if self.pending + len(pa) >= FP32_EXACT:
                self._flush()
            self.acc += self._product(self._unpack(pa, self.width_a), self._unpack(pb, self.width_b))
            self.pending += len(pa)

    def _flush(self) -> None:
        self.total += self.acc.to(self.torch.int64)
        self.acc.zero_()
        self.pending = 0

    def result(self) -> np.ndarray:
        self._flush()
        return self.total.cpu().numpy()


class SqlCounter:
    """The reference: per token block, the (row, neuron) events of both layers as Arrow tables,
    self-joined on row in DuckDB and grouped by neuron pair (sql/coactivation_events.sql)."""

    def __init__(self, width_a: int, width_b: int):
        import duckdb

        self.width_a, self.width_b = width_a, width_b
        self.counts = np.zeros((width_a, width_b), np.int64)
        self.con = duckdb.connect()
        self.row = 0  # row number of the next block's first token

    def add(self, packed_a: np.ndarray, packed_b: np.ndarray) -> None:
        from pipeline.core.warehouse import load_sql

        for s in range(0, packed_a.shape[0], MAX_CHUNK):
            pa, pb = packed_a[s:s + MAX_CHUNK], packed_b[s:s + MAX_CHUNK]
            self.con.register("events_a", active_events(pa, self.width_a, self.row))
            self.con.register("events_b", active_events(pb, self.width_b, self.row))
            got = self.con.sql(load_sql("coactivation_events")).fetchnumpy()
            # (neuron_a, neuron_b) are unique within a block: a plain fancy-index add is exact
            self.counts[got["neuron_a"].astype(np.int64), got["neuron_b"].astype(np.int64)] += got["count"]
            self.row += len(pa)

    def result(self) -> np.ndarray:
        self.con.close()
        return self.counts


def neuron_bitsets(packed: np.ndarray, width: int, interleave: bool = False) -> np.ndarray:
    """Token-major packed rows [t, ceil(w/8)] -> neuron-major uint64 bitsets over token rows:
    [w, ceil(t/64)], or with interleave the lane layout [ceil(w/8), ceil(t/64), 8] (word w of the
    8 neurons of a byte column side by side; see pipeline/kernels/bitkernels.py)."""
    from pipeline.kernels.bitkernels import to_bitsets

    n_bytes, n_words = arrays.packed_width(width), (packed.shape[0] + 63) // 64
    shape = (n_bytes, n_words, 8) if interleave else (n_bytes, 8, n_words)
    out = np.zeros(shape, np.uint64)
    if packed.shape[0] and width:
        to_bitsets(np.ascontiguousarray(packed, dtype=np.uint8), out, interleave)
    return out if interleave else out.reshape(n_bytes * 8, n_words)[:width]


def active_events(packed: np.ndarray, width: int, row_offset: int = 0):
    """Sparse (row, neuron) pairs of the active bits of packed rows, as an Arrow table."""
    import pyarrow as pa

    rows, neurons = np.nonzero(arrays.unpack_mask(packed, width))
    return pa.table({"row": (rows + row_offset).astype(np.int64),
                     "neuron": neurons.astype(np.int32)})


def resolve_engine(engine: str, device: str = "auto") -> tuple[str, str]:
    """(engine, torch device) for an --engine/--device pair; auto picks cuda on a CUDA device."""
    if engine not in ENGINES:
        raise UserError(f"--engine {engine!r} is unknown: use one of {', '.join(ENGINES)}")
    if engine in ("popcount", "sql"):  # CPU engines: no device to resolve (and no torch import)
        return engine, "cpu"
    from pipeline.models.loading import resolve_device

    dev = resolve_device(device)
    if engine == "auto":
        engine = "cuda" if dev.type == "cuda" else "popcount"
    if engine == "cuda" and dev.type != "cuda":
        raise UserError("--engine cuda needs a CUDA device, and none is available here: "
                        "use --engine popcount (or auto)")
    return engine, str(dev)


def make_counter(engine: str, width_a: int, width_b: int, device: str = "auto"):
    """A streaming counter with .add(packed_a, packed_b) and .result() -> int64 [width_a, width_b]."""
    engine, dev = resolve_engine(engine, device)
    if engine == "popcount":
        return PopcountCounter(width_a, width_b)
    if engine == "sql":
        return SqlCounter(width_a, width_b)
    return TorchCounter(width_a, width_b, dev, half=engine == "cuda")


def coactivation_counts(packed_a: np.ndarray, packed_b: np.ndarray, width_a: int, width_b: int,
                        engine: str = "popcount", device: str = "auto") -> np.ndarray:
    """Exact int64 co-activation counts [width_a, width_b] of two in-memory packed mask blocks.

    packed_a uint8 [t, ceil(width_a/8)] and packed_b uint8 [t, ceil(width_b/8)] cover the same
    t token rows (layout of `active/L<l>`).
    """
    for packed, width in ((packed_a, width_a), (packed_b, width_b)):
        if packed.ndim != 2 or packed.shape[1] != arrays.packed_width(width):
            raise ValueError(f"packed masks of width {width} need shape [t, {arrays.packed_width(width)}], "
                             f"got {packed.shape}")
    if packed_a.shape[0] != packed_b.shape[0]:
        raise ValueError(f"both layers need the same token rows, got {packed_a.shape[0]} and "
                         f"{packed_b.shape[0]}")
    counter = make_counter(engine, width_a, width_b, device)
    counter.add(packed_a, packed_b)
    return counter.result()


# -- the stage


@dataclass(kw_only=True)
class CoactivationConfig(Progress):
    run: str = opt(help="run whose active masks are counted")
    pairs: str | None = opt(None, help="layer pairs 'a:b,c:d' (default: every adjacent pair of "
                            "recorded layers)")
    # every engine is exact: the engine, its device and the block size do not change the counts
    engine: str = opt("auto", help="auto (cuda on a CUDA device, else popcount), popcount, cuda, "
                      "matmul (torch fp32 on --device), sql (DuckDB reference)", choices=ENGINES,
                      hash=False)
    device: str = opt("auto", help="device of the cuda/matmul engines: auto, cpu, cuda, cuda:N",
                      hash=False)
    chunk_tokens: int = opt(MAX_CHUNK, help="token rows read from the masks per block "
                            f"(1..{MAX_CHUNK}; memory is one pair's matrix plus one block)",
                            hash=False)
    overwrite: bool = opt(False, help="recount pairs already counted", hash=False)
    ray: str | None = opt(None, const="local", metavar="ADDRESS", hash=False,
                          help="count the pairs as Ray tasks, one per pair (one GPU each where "
                          "the cluster has GPUs): --ray alone starts a local cluster, --ray "
                          "ADDRESS joins one (auto, host:port, ray://host:10001)")

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise UserError(f"--engine {self.engine!r} is unknown: use one of {', '.join(ENGINES)}")
        if not 1 <= self.chunk_tokens <= MAX_CHUNK:
            raise UserError(f"--chunk-tokens {self.chunk_tokens} is out of range: use 1..{MAX_CHUNK}")


@dataclass
class CoactivationResult:
    run: str
    pairs: list[dict]                               # attributes of every requested pair
    counted: list[tuple[int, int]] = field(default_factory=list)
    skipped: list[tuple[int, int]] = field(default_factory=list)  # already counted


def parse_pairs(spec: str | None, layers: list[int]) -> list[tuple[int, int]]:
    """Layer pairs of a --pairs spec ('0:2,1:3'), or every adjacent pair of the recorded layers."""
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
                            f"(recorded: {layers}): pick pairs of those")
        if (a, b) not in out:
            out.append((a, b))
    return out


def _is_complete(group, name: str, rows: int) -> bool:
    """A pair is finished when its marker is set and it counted every committed row of the run."""
    return name in group and bool(group[name].attrs.get("complete")) and \
        group[name].attrs.get("tokens") == rows


def count_pair(group, a: int, b: int, widths: dict[int, int], rows: int, engine: str, device: str,
               chunk_tokens: int, bar=None) -> np.ndarray:
    """Stream the masks of layers a and b through one engine's counter; int64 [d_a, d_b]."""
    counter = make_counter(engine, widths[a], widths[b], device)
    active_a, active_b = group[f"active/L{a}"], group[f"active/L{b}"]
    for s in range(0, rows, chunk_tokens):
        stop = min(s + chunk_tokens, rows)
        block_a, block_b = active_a[s:stop], active_b[s:stop]
        kept = arrays.included_rows(group, s, stop)
        if kept is not None:  # excluded rows keep their masks but are not counted
            block_a, block_b = block_a[kept], block_b[kept]
        counter.add(block_a, block_b)
        if bar is not None:
            bar.update(stop - s)
    return counter.result()


def _store_pair(group, a: int, b: int, counts: np.ndarray, rows: int, engine: str,
                chunk_tokens: int, seconds: float) -> None:
    array = group.create_array(name=arrays.pair_name(a, b), shape=counts.shape, dtype="int64",
                               chunks=(max(1, min(1024, counts.shape[0])), max(1, counts.shape[1])),
                               overwrite=True)
    array[:] = counts
    # the marker goes last: an interrupted write leaves an array without it, recounted next time
    array.attrs.update(tokens=rows, engine=engine, chunk_tokens=chunk_tokens,
                       seconds=round(seconds, 3), max_count=int(counts.max(initial=0)),
                       nonzero=int(np.count_nonzero(counts)), total=int(counts.sum()))
    array.attrs.update(complete=True)


def run(config: CoactivationConfig, storage: Storage) -> CoactivationResult:
    """Count every requested pair of a run that is not counted yet (all with --overwrite)."""
    from tqdm.auto import tqdm

    manifest = storage.finished_run(config.run)
    widths = coact.layer_widths(manifest)
    pairs = parse_pairs(config.pairs, list(widths))
    # on Ray the engine resolves on each worker (a driver without a GPU may lead GPU workers)
    engine, device = (config.engine, config.device) if config.ray is not None else \
        resolve_engine(config.engine, config.device)
    group = arrays.open_group(storage.arrays(config.run))
    rows = int(manifest["rows"])
    digest = config_hash(config, pairs=pairs, rows=rows, extraction=manifest.get("config_hash"))
    # one marker per pair selection (a stable name, so Makefile targets can key on it)
    marker = storage.marker(config.run, "coactivation",
                         "adjacent" if not config.pairs else config.pairs.replace(":", "-"))
    todo = [p for p in pairs if config.overwrite or not _is_complete(group, arrays.pair_name(*p), rows)]
    skipped = [p for p in pairs if p not in todo]
    for a, b in skipped:
        log.info("pair %d:%d of run %s is already counted: skipped (--overwrite recounts)",
                 a, b, config.run)
    on_ray = config.ray is not None and bool(todo)
    if on_ray:  # the tasks count and store the pairs; the loop below has none left
        engine = _count_on_ray(config, storage, group, todo, widths, rows)
    with tqdm(total=len(todo) * rows, unit="tok", unit_scale=True,
              disable=config.quiet or on_ray, desc=f"coactivation {config.run} ({engine})") as bar:
        for a, b in [] if on_ray else todo:
            t0 = time.perf_counter()
            counts = count_pair(group, a, b, widths, rows, engine, device, config.chunk_tokens, bar)
            seconds = time.perf_counter() - t0
            _store_pair(group, a, b, counts, rows, engine, config.chunk_tokens, seconds)
            log.info("pair %d:%d of run %s: %d x %d counts over %d tokens in %.2f s (%s)",
                     a, b, config.run, counts.shape[0], counts.shape[1], rows, seconds, engine)
    if todo or marker.done(digest) is None:
        _write_pairs_table(storage, config.run, group)
        marker.write(to_dict(config), digest, engine=engine,
                     pairs=[list(p) for p in pairs], counted=[list(p) for p in todo])
    attrs = [{"layer_a": a, "layer_b": b, **group[arrays.pair_name(a, b)].attrs} for a, b in pairs]
    return CoactivationResult(config.run, attrs, todo, skipped)


def _count_on_ray(config: CoactivationConfig, storage: Storage, group, todo, widths,
                  rows: int) -> str:
    """One Ray task per pair, each writing its own array coact/L<a>_L<b>; the engine and
    device resolve on the worker, so --engine auto picks cuda where the task got a GPU."""
    from pipeline.core import cluster

    group.require_group("coact")  # made once here, not raced by the tasks' implicit parents
    gpu = config.engine not in ("popcount", "sql") and config.device != "cpu"
    path, names = storage.arrays(config.run), [arrays.pair_name(a, b) for a, b in todo]

    def poll() -> list[tuple[int, int]]:  # a pair commits once, when its marker is set
        current = arrays.open_group(path, mode="r")
        return [(rows if _is_complete(current, n, rows) else 0, rows) for n in names]

    engines = cluster.run_tasks(
        count_pair_task, [((cluster.task_root(storage.root), config.run, a, b, widths, rows,
                            config.engine, config.device, config.chunk_tokens), {})
                           for a, b in todo],
        address=config.ray, device="auto" if gpu else "cpu", desc=f"coactivation {config.run}",
        poll=poll, progress=not config.quiet)
    return ",".join(sorted(set(engines)))


def count_pair_task(root: str, run: str, a: int, b: int, widths: dict[int, int], rows: int,
                    engine: str, device: str, chunk_tokens: int) -> str:
    """A Ray task: count and store one pair of a run, as the sequential loop does; returns the
    engine it used. A retried task recounts its pair from the start."""
    engine, device = resolve_engine(engine, device)
    group = arrays.open_group(Storage(root).arrays(run))
    t0 = time.perf_counter()
    counts = count_pair(group, a, b, widths, rows, engine, device, chunk_tokens)
    _store_pair(group, a, b, counts, rows, engine, chunk_tokens, time.perf_counter() - t0)
    log.info("pair %d:%d of run %s counted on a Ray worker (%s)", a, b, run, engine)
    return engine


def _write_pairs_table(storage: Storage, run: str, group) -> None:
    """One row per counted pair of the run (the `coactivation_pairs` table)."""
    keys = ("tokens", "max_count", "nonzero", "total", "engine", "seconds")
    cols: dict[str, list] = {k: [] for k in ("layer_a", "layer_b", *keys)}
    for a, b in coact.completed_pairs(group):
        attrs = dict(group[arrays.pair_name(a, b)].attrs)
        if "nonzero" not in attrs:  # counted by an older version: derive from the counts
            counts = group[arrays.pair_name(a, b)][:]
            attrs.update(nonzero=int(np.count_nonzero(counts)), total=int(counts.sum()))
        cols["layer_a"].append(a)
        cols["layer_b"].append(b)
        for k in keys:
            cols[k].append(attrs[k])
    tables.write_part(storage, "coactivation_pairs", run, cols)


def show(result: CoactivationResult) -> str:
    lines = []
    for p in result.pairs:
        a, b = p["layer_a"], p["layer_b"]
        note = " (already counted: skipped; --overwrite recounts)" \
            if (a, b) in result.skipped else ""
        lines.append(f"L{a}->L{b}: max count {p['max_count']}, {p.get('nonzero', '?')} nonzero "
                     f"pairs over {p['tokens']} tokens ({p['engine']}, {p['seconds']:.2f} s) -> "
                     f"{arrays.pair_name(a, b)}{note}")
    return "\n".join(lines)


STAGES = [Stage(
    "coactivation", "Count co-activations of neuron pairs of adjacent layers (exact).",
    "  nwh coactivation --run demo-corpus\n"
    "  nwh coactivation --run demo-corpus --pairs 0:2,1:3 --engine sql\n"
    "  nwh coactivation --run demo-corpus --engine cuda --overwrite\n"
    "  nwh coactivation --run demo-corpus --ray\n"
    "  nwh sql \"select * from coactivation_pairs\"\n",
    CoactivationConfig, run, show)]
