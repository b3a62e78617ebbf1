"""Reading one neuron against reading its whole layer, on a million-row run of gpt2-small width.

    .venv/bin/python benchmarks/neuron_read.py                      # 1,048,576 rows, 2 layers
    .venv/bin/python benchmarks/neuron_read.py --rows 131072 --export-rows 8192   # a quick look

Writes a run's arrays (synthetic float16 activations and packed masks of 3072 neurons a layer)
with the functions extraction uses (pipeline.core.arrays.ensure_rows_array / write_rows, the
neuron-blocked layout), and layer 0 again in the layout runs had before (one chunk spanning
every neuron), timing both writes. Then, for acts and masks, prints time, bytes read from the
store and bytes decompressed of:
  * one neuron through SQL `neuron_values` (the path of `nwh sql` and `nwh top-tokens`);
  * one neuron through Zarr directly (`array[:, n]`);
  * the whole layer in row blocks of 8,192 (as histogram and co-activation read it);
  * one neuron of the old layout (which decompresses the whole layer);
and the ratios whole layer / one neuron. Every neuron read is checked against the values written.
Each read runs cold (its files dropped from the page cache with posix_fadvise) and then warm;
the bytes are what a disk or an object store serves. With --export-rows N it also extracts a micro model run of N and
4N rows and prints the peak RSS of `nwh export` of each in fresh processes (target: within 10%).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zarr  # noqa: E402
from zarr.abc.store import RangeByteRequest  # noqa: E402
from zarr.storage import LocalStore, WrapperStore  # noqa: E402

from pipeline.core import arrays  # noqa: E402
from pipeline.core.storage import Storage, write_json  # noqa: E402

WIDTH, CHUNK, BASES = 3072, 2048, 4
MiB = 2 ** 20


class CountingStore(WrapperStore):
    """Counts the bytes each read returns, by key and byte range."""

    log: list[tuple[str, object, int]] = []

    async def get(self, key, prototype, byte_range=None):
        out = await self._store.get(key, prototype, byte_range)
        CountingStore.log.append((key, byte_range, 0 if out is None else len(out)))
        return out


def _open_counting(path, mode="a"):
    return zarr.open_group(store=CountingStore(LocalStore(str(path), read_only=mode == "r")),
                           mode=mode)


def bases(seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """BASES row blocks of activations and packed masks; row block i of a run is base i % BASES."""
    rng = np.random.default_rng(seed)
    acts = [(rng.standard_normal((CHUNK, WIDTH)) * 0.5).astype(np.float16) for _ in range(BASES)]
    masks = [np.packbits(a > 0.6, axis=1, bitorder="little") for a in acts]  # ~12% active
    return acts, masks


def reference(blocks: list[np.ndarray], rows: int, column) -> np.ndarray:
    n = -(-rows // CHUNK)
    return np.concatenate([blocks[i % BASES][:, column] for i in range(n)])[:rows]


def build(storage: Storage, rows: int, layers: int) -> dict[tuple[str, str, str], float]:
    """Write run "new" (neuron-blocked, `layers` layers) and run "old" (layer 0 in the layout of
    older runs) in commits of CHUNK rows, the two interleaved so both see the same machine;
    seconds spent writing, by (run, kind, wall or cpu: the process's CPU time, all threads)."""
    acts, masks = bases()
    targets = []
    for run, n_layers, old in (("new", layers, False), ("old", 1, True)):
        shutil.rmtree(storage.run_dir(run), ignore_errors=True)
        group = arrays.open_group(storage.arrays(run))
        for l in range(n_layers):
            targets.append((run, "acts", arrays.ensure_rows_array(
                group, f"acts/L{l}", width=WIDTH, dtype="float16", chunk_rows=CHUNK,
                compress=False, block=None if old else arrays.ACTS_BLOCK)))
            targets.append((run, "active", arrays.ensure_rows_array(
                group, f"active/L{l}", width=arrays.packed_width(WIDTH), dtype="uint8",
                chunk_rows=CHUNK, compress=True, block=None if old else arrays.MASK_BLOCK)))
        write_json(storage.run_manifest(run), {"model": {"widths": [WIDTH] * n_layers}})
    spent = {(run, kind, clock): 0.0 for run in ("new", "old") for kind in ("acts", "active")
             for clock in ("wall", "cpu")}
    for i, start in enumerate(range(0, rows, CHUNK)):
        stop = min(start + CHUNK, rows)
        for run, kind, array in targets:
            block = (acts if kind == "acts" else masks)[i % BASES][:stop - start]
            t0, c0 = time.perf_counter(), time.process_time()
            arrays.write_rows(array, start, block)
            spent[run, kind, "wall"] += time.perf_counter() - t0
            spent[run, kind, "cpu"] += time.process_time() - c0
    return spent


def evict(path: Path) -> None:
    """Drop a folder's files from the page cache (flushed first), so the next read is cold."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _decoded_bytes(array: zarr.Array, key: str, byte_range) -> int:
    """Bytes decompressed for one store read of a chunk key: a whole shard (or unsharded
    chunk), or one inner chunk by byte range; a shard index read decompresses no data."""
    inner, shard = arrays.chunk_blocks(array)
    itemsize = array.dtype.itemsize
    if byte_range is None:
        return shard[0] * min(shard[1], array.shape[1]) * itemsize
    if isinstance(byte_range, RangeByteRequest):
        return inner[0] * inner[1] * itemsize
    return 0


def measure(label: str, storage: Storage, run: str, kind: str, layer: int, fn) -> dict:
    """fn() with the array's files cold (evicted from the page cache), then again warm: seconds
    of each, MiB read and MiB decompressed (of the cold run), and fn's value."""
    array = zarr.open_array(str(storage.arrays(run) / kind / f"L{layer}"), mode="r")
    evict(storage.arrays(run) / kind / f"L{layer}")
    CountingStore.log = []
    t0 = time.perf_counter()
    value = fn()
    cold = time.perf_counter() - t0
    prefix = f"{kind}/L{layer}/c/"
    data = [(k, r, n) for k, r, n in CountingStore.log if k.startswith(prefix)]
    read = sum(n for _, _, n in CountingStore.log) / MiB
    decoded = sum(_decoded_bytes(array, k, r) for k, r, _ in data) / MiB
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    return {"label": label, "cold": cold, "warm": warm, "read": read, "decoded": decoded,
            "value": value}


def neuron_sql(storage: Storage, run: str, kind: str, layer: int, neuron: int) -> np.ndarray:
    from pipeline.core.warehouse import connect

    con = connect(storage)
    try:
        return con.sql("select value from neuron_values($run, $kind, $layer, $neuron) "
                       "order by row", params=dict(run=run, kind=kind, layer=layer,
                                                   neuron=neuron)).fetchnumpy()["value"]
    finally:
        con.close()


def whole_layer(storage: Storage, run: str, kind: str, layer: int) -> int:
    array = arrays.open_group(storage.arrays(run), mode="r")[f"{kind}/L{layer}"]
    total = 0
    for s in range(0, array.shape[0], 8192):
        total += np.asarray(array[s:s + 8192]).size
    return total


def direct_neuron(storage: Storage, run: str, kind: str, neuron: int) -> np.ndarray:
    """One neuron through Zarr: its fp16 column, or its bit of the packed mask bytes."""
    array = arrays.open_group(storage.arrays(run), mode="r")[f"{kind}/L0"]
    if kind == "acts":
        return np.asarray(array[:, neuron]).astype(np.float64)
    return ((np.asarray(array[:, neuron // 8]) >> (neuron % 8)) & 1).astype(np.float64)


def kind_figures(storage: Storage, rows: int, kind: str, neuron: int, want: np.ndarray) -> None:
    results = [
        measure("one neuron, SQL neuron_values", storage, "new", kind, 0,
                lambda: neuron_sql(storage, "new", kind, 0, neuron)),
        measure("one neuron, zarr a[:, n]", storage, "new", kind, 0,
                lambda: direct_neuron(storage, "new", kind, neuron)),
        measure("whole layer, row blocks", storage, "new", kind, 0,
                lambda: whole_layer(storage, "new", kind, 0)),
        measure("old layout: one neuron, SQL", storage, "old", kind, 0,
                lambda: neuron_sql(storage, "old", kind, 0, neuron)),
        measure("old layout: whole layer", storage, "old", kind, 0,
                lambda: whole_layer(storage, "old", kind, 0)),
    ]
    for r in results:
        if "neuron" in r["label"]:
            assert np.array_equal(r["value"], want), r["label"]
    inner, shard = arrays.chunk_blocks(zarr.open_array(
        str(storage.arrays("new") / kind / "L0"), mode="r"))
    print(f"\n{kind}/L0: {rows:,} rows x {WIDTH} neurons, chunks {inner} in shards {shard}; "
          f"neuron {neuron}")
    print(f"  {'':32s} {'cold s':>8s} {'warm s':>8s} {'MiB read':>10s} {'MiB decompressed':>17s}")
    for r in results:
        print(f"  {r['label']:32s} {r['cold']:8.3f} {r['warm']:8.3f} {r['read']:10.1f} "
              f"{r['decoded']:17.1f}")
    sql, zdirect, layer, old_sql = results[:4]
    print(f"  ratio whole layer / one neuron (zarr): time cold {layer['cold'] / zdirect['cold']:.1f}x"
          f", warm {layer['warm'] / zdirect['warm']:.1f}x; bytes read "
          f"{layer['read'] / zdirect['read']:.1f}x, decompressed "
          f"{layer['decoded'] / zdirect['decoded']:.1f}x")
    print(f"  ratio old / new layout, one neuron through SQL: time cold "
          f"{old_sql['cold'] / sql['cold']:.1f}x, warm {old_sql['warm'] / sql['warm']:.1f}x; "
          f"bytes read {old_sql['read'] / sql['read']:.1f}x")


def read_figures(storage: Storage, rows: int, neuron: int) -> None:
    acts, masks = bases()
    neuron_sql(storage, "new", "active", 0, 0)  # warm: imports and DuckDB's first connection
    kind_figures(storage, rows, "acts", neuron, reference(acts, rows, neuron).astype(np.float64))
    bits = (reference(masks, rows, neuron // 8) >> (neuron % 8)) & 1
    kind_figures(storage, rows, "active", neuron, bits.astype(np.float64))


# -- export memory


def export_child(args) -> None:
    from pipeline.stages.export import ExportConfig, run

    storage = Storage(Path(args.workdir) / "export-wh")
    out = Path(args.workdir) / f"export-out-{args.export_child}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    run(ExportConfig(run=args.export_child, out_dir=str(out), edges=False), storage)
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, which starts afresh at exec (ru_maxrss keeps the high
    water mark of the parent that forked it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def export_figures(args) -> None:
    from pipeline.models.micro import save_random_gpt2, synthetic_texts
    from pipeline.stages.extract import ExtractConfig
    from pipeline.stages.extract import run as extract

    work = Path(args.workdir)
    model, corpus = work / "micro-gpt2", work / "corpus.txt"
    if not (model / "config.json").exists():
        save_random_gpt2(model, n_layer=3, d_model=32, d_mlp=512, n_positions=128)
    if not corpus.exists():
        corpus.write_text("\n\n".join(synthetic_texts(20000, words_per_text=60)))
    storage = Storage(work / "export-wh")
    peaks = {}
    for rows in (args.export_rows, 4 * args.export_rows):
        run = f"x{rows}"
        extract(ExtractConfig(model=str(model), corpus=str(corpus), num_samples=rows // 64,
                              max_length=64, batch_size=32, device="cpu", run=run, quiet=True),
                storage)
        out = subprocess.run([sys.executable, __file__, "--export-child", run, "--workdir",
                              args.workdir], check=True, capture_output=True, text=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        peaks[rows] = got["peak_rss_mib"]
        print(f"export of {rows:8,d} rows (3 x 512 neurons): {got['seconds']:7.1f} s, "
              f"peak RSS {got['peak_rss_mib']:7.0f} MiB")
    small, big = peaks[args.export_rows], peaks[4 * args.export_rows]
    print(f"export peak RSS ratio 4x rows / 1x: {big / small:.3f} (target <= 1.10)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1 << 20)
    p.add_argument("--layers", type=int, default=2, help="layers of the new layout")
    p.add_argument("--neuron", type=int, default=1234)
    p.add_argument("--export-rows", type=int, default=16384, help="N of the export RSS figures; 0: skip")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "nwh-bench-neuron-read"))
    p.add_argument("--keep", action="store_true", help="keep the arrays written (GBs)")
    p.add_argument("--export-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.export_child:
        return export_child(args)
    storage = Storage(Path(args.workdir) / "wh")
    print(f"rows={args.rows:,} width={WIDTH} layers={args.layers} chunk rows={CHUNK} "
          f"acts block={arrays.ACTS_BLOCK} neurons, mask block={arrays.MASK_BLOCK} bytes")
    try:
        spent = build(storage, args.rows, args.layers)
        for kind, name in (("acts", "fp16 acts"), ("active", "packed masks")):
            per_layer = args.rows * (WIDTH * 2 if kind == "acts" else arrays.packed_width(WIDTH))
            new = per_layer * args.layers / MiB / spent["new", kind, "wall"]
            old = per_layer / MiB / spent["old", kind, "wall"]
            cpu_new = spent["new", kind, "cpu"] / (args.layers * args.rows) * 1e6
            cpu_old = spent["old", kind, "cpu"] / args.rows * 1e6
            print(f"write {name:12s}: neuron-blocked {new:6.0f} MiB/s, {cpu_new:5.2f} CPU us per "
                  f"token and layer; old layout {old:6.0f} MiB/s, {cpu_old:5.2f} us (new / old: "
                  f"{new / old:.2f} MiB/s, {cpu_new / cpu_old:.2f} CPU)")
        arrays.open_group = _open_counting  # every read below is counted
        read_figures(storage, args.rows, args.neuron)
    finally:
        if not args.keep:
            shutil.rmtree(storage.root, ignore_errors=True)
    if args.export_rows:
        print()
        export_figures(args)


if __name__ == "__main__":
    main()
