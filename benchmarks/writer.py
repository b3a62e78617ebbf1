"""The row-array writer alone: how fast one commit's masks and dense activations reach the store.

    .venv/bin/python benchmarks/writer.py                     # 12 layers x 8192 rows, gpt2-small width
    .venv/bin/python benchmarks/writer.py --rows 2048 --layers 4 --repeats 1   # a quick look

The arrays are those an extraction writes (`arrays.ensure_rows_array`: masks uint8 [rows, 384]
zstd-1 in 64-byte blocks, dense float16 [rows, 3072] raw in 256-neuron blocks, chunk rows
--chunk-rows), filled from synthetic masks (density --density) and normal fp16 values. Per
kind, written in one process on the same data:

  zarr     `array[start:stop] = rows`, zarr-python's own codec pipeline (the baseline)
  direct   `arrays.write_rows`: whole chunk files encoded by arrays.ChunkFormat and put
           straight to the store

each on 1 thread and on --threads threads (one layer per task, as the extraction's writer
pool does on an accelerator): wall time, rows/s, MB/s of array bytes, CPU seconds (all
threads) and the ratios direct / zarr; then the disk's own figure, plain file writes of the
same bytes, measured in the same script. Every array is read back through zarr and compared
with what was written. The page cache absorbs the first writes of a run, so on a machine
with little dirty-page headroom the later figures are the disk's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peers import cpu_info  # noqa: E402  (benchmarks/, the script's folder)

from pipeline.core import arrays  # noqa: E402

KINDS = {
    "masks (zstd-1)": dict(dtype="uint8", compress=True, block=arrays.MASK_BLOCK),
    "masks (raw)": dict(dtype="uint8", compress=False, block=arrays.MASK_BLOCK),
    "dense fp16": dict(dtype="float16", compress=False, block=arrays.ACTS_BLOCK),
}


def data_for(kind: str, rows: int, neurons: int, density: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind.startswith("masks"):
        return np.packbits(rng.random((rows, neurons)) < density, axis=1, bitorder="little")
    return rng.standard_normal((rows, neurons), dtype=np.float32).astype(np.float16)


def write_layers(folder: Path, kind: str, data: np.ndarray, layers: int, chunk_rows: int,
                 threads: int, mode: str) -> tuple[float, float]:
    """Wall and CPU seconds to write `data` as every layer's array of one commit."""
    group = arrays.open_group(folder)
    spec = KINDS[kind]
    layer_arrays = [arrays.ensure_rows_array(group, f"L{l}", width=data.shape[1],
                                             chunk_rows=chunk_rows, **spec)
                    for l in range(layers)]

    def one(array):
        if mode == "direct":
            arrays.write_rows(array, 0, data)
        else:
            array.resize(data.shape)
            array[:] = data

    wall, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, layer_arrays))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    back = arrays.open_group(folder, "r")
    for l in range(layers):
        if not np.array_equal(back[f"L{l}"][:].view(np.uint8), data.view(np.uint8)):
            raise SystemExit(f"{kind} {mode}: layer {l} reads back different bytes")
    return wall, cpu


def plain_writes(folder: Path, data: np.ndarray, layers: int) -> float:
    """Seconds to write the same bytes as one plain file per layer (the disk's own figure)."""
    payload = data.tobytes()
    start = time.perf_counter()
    for l in range(layers):
        with open(folder / f"plain-{l}.bin", "wb") as f:
            f.write(payload)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--rows", type=int, default=8192, help="rows (tokens) of the commit")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--neurons", type=int, default=3072)
    ap.add_argument("--chunk-rows", type=int, default=2048)
    ap.add_argument("--density", type=float, default=0.1, help="share of active neurons")
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=3, help="median of this many writes")
    ap.add_argument("--dir", default=None, help="folder to write in (default: a temporary one)")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    args = ap.parse_args()

    cpu = cpu_info()
    print(f"cpu: {cpu['model']}, {os.cpu_count()} cores, avx512f={cpu['avx512f']}, "
          f"avx512_vpopcntdq={cpu['avx512_vpopcntdq']}; load average {os.getloadavg()[0]:.2f}")
    print(f"{args.layers} layers x {args.rows:,} rows x {args.neurons:,} neurons, chunk rows "
          f"{args.chunk_rows:,}, median of {args.repeats}")
    base = Path(tempfile.mkdtemp(prefix="nwh-writer-", dir=args.dir))
    rows_out = []
    try:
        for kind in args.kinds:
            data = data_for(kind, args.rows, args.neurons, args.density, seed=0)
            nbytes = data.nbytes * args.layers
            figures = {}
            for threads in sorted({1, args.threads}):
                for mode in ("zarr", "direct"):
                    runs = []
                    for r in range(args.repeats):
                        folder = base / f"{mode}-{threads}-{r}"
                        runs.append(write_layers(folder, kind, data, args.layers,
                                                 args.chunk_rows, threads, mode))
                        shutil.rmtree(folder)
                    wall = statistics.median(w for w, _ in runs)
                    cpu = statistics.median(c for _, c in runs)
                    figures[mode, threads] = wall, cpu
                    print(f"  {kind:15s} {mode:6s} {threads} thread{'s' if threads > 1 else ' '} "
                          f"{wall:7.3f} s  {args.rows / wall:12,.0f} rows/s  "
                          f"{nbytes / wall / 1e6:8,.0f} MB/s  cpu {cpu:6.3f} s")
                z, d = figures["zarr", threads], figures["direct", threads]
                print(f"  {kind:15s} direct / zarr, {threads} thread{'s' if threads > 1 else ''}: "
                      f"{z[0] / d[0]:.2f}x faster, {z[1] / max(d[1], 1e-9):.2f}x less CPU")
                rows_out.append((kind, threads, args.rows / z[0], args.rows / d[0],
                                 z[0] / d[0], z[1] / max(d[1], 1e-9)))
            plain = statistics.median(plain_writes(base, data, args.layers)
                                      for _ in range(args.repeats))
            print(f"  {kind:15s} plain file writes of the same bytes: {plain:.3f} s, "
                  f"{nbytes / plain / 1e6:,.0f} MB/s (the disk's own figure)")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("\n| kind | threads | zarr rows/s | direct rows/s | faster | less CPU |")
    print("|---|---|---|---|---|---|")
    for kind, threads, z, d, faster, cpu in rows_out:
        print(f"| {kind} | {threads} | {z:,.0f} | {d:,.0f} | {faster:.2f}x | {cpu:.2f}x |")


if __name__ == "__main__":
    main()
