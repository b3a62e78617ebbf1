"""Co-activation engines on the same masks: popcount vs fp32 matmul vs per-edge loop vs SQL.

    .venv/bin/python benchmarks/coactivation.py                  # 3072 x 3072 neurons, 8192 tokens
    .venv/bin/python benchmarks/coactivation.py --cuda           # also the CUDA engine
    .venv/bin/python benchmarks/coactivation.py --neurons 1024 --sql-tokens 64   # a quick look

Random masks with density ~0.2 (fixed seed), one layer pair, all in one process. Prints each
engine's wall time (best of --repeat) and process CPU time, and the ratios the project tracks:
  * popcount engine vs a torch fp32 matmul of the 0/1 matrices      (target >= 4x faster)
  * popcount engine vs the reference per-edge Python loop: the reference script's
    `int(np.dot(matrix[:, u], matrix[:, v]))` per edge over the (tokens x neurons) int32
    activation matrix that `nwh export` writes, timed on a sample of edges and extrapolated to
    all d_a * d_b edges                                              (target >= 1000x faster)
    Two kinder loops are shown beside it: the same dot over contiguous int64 and fp32 columns.
  * popcount engine vs the 0.36 s measured for this shape on this machine kind (target <= 2x)
  * the DuckDB SQL engine, timed on a token slice and extrapolated linearly in tokens
The popcount engine time includes the transposition of the packed masks to bitsets (shown
separately too). The load average is printed: on a shared machine, wall times stretch.
Output: about 12 lines; takes ~1-2 minutes on 2 cores (most of it the per-edge loop and SQL).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.stages.coactivation import coactivation_counts, neuron_bitsets  # noqa: E402

REFERENCE_POPCOUNT_S = 0.36  # 3072 x 3072 neurons over 8192 tokens on the 2-core reference machine


def best_of(fn, repeat: int) -> tuple[float, float]:
    """(best wall seconds, process CPU seconds of that run)."""
    best = (float("inf"), 0.0)
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--neurons", type=int, default=3072, help="neurons of each layer")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--density", type=float, default=0.2, help="fraction of active (token, neuron)")
    p.add_argument("--edge-sample", type=int, default=5000, help="edges timed in the Python loop")
    p.add_argument("--sql-tokens", type=int, default=128, help="token slice for the SQL engine")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cuda", action="store_true", help="also time the CUDA engine (fp16 tensor cores)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    d, t = args.neurons, args.tokens
    a = rng.random((t, d), dtype=np.float32) < args.density
    b = rng.random((t, d), dtype=np.float32) < args.density
    pa_, pb_ = (np.packbits(x, axis=1, bitorder="little") for x in (a, b))
    print(f"{d} x {d} neurons, {t} tokens, density {args.density}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")

    coactivation_counts(pa_[:64], pb_[:64], d, d)  # load the compiled kernels
    counts = coactivation_counts(pa_, pb_, d, d)
    pop, pop_cpu = best_of(lambda: coactivation_counts(pa_, pb_, d, d), args.repeat)
    tr, _ = best_of(lambda: (neuron_bitsets(pa_, d), neuron_bitsets(pb_, d, interleave=True)),
                    args.repeat)

    fa, fb = torch.from_numpy(a.astype(np.float32)), torch.from_numpy(b.astype(np.float32))
    np.testing.assert_array_equal((fa.T @ fb).to(torch.int64).numpy(), counts)
    mm, mm_cpu = best_of(lambda: fa.T @ fb, args.repeat)
    mm_engine, _ = best_of(lambda: coactivation_counts(pa_, pb_, d, d, engine="matmul", device="cpu"),
                           args.repeat)

    # the reference method: one dot product of two binary columns per edge. First exactly as the
    # reference script does it (strided columns of the tokens x neurons matrix), then over
    # contiguous int64 (exact integers) and fp32 (BLAS) columns
    idx = rng.integers(0, d, size=(args.edge_sample, 2))
    per_edge = {}
    matrix = np.concatenate([a, b], axis=1).astype(np.int32)  # the exported activation matrix
    variants = {
        "reference": (matrix[:, :d], matrix[:, d:], lambda m, i: m[:, i]),
        "int64": (np.ascontiguousarray(a.T, np.int64), np.ascontiguousarray(b.T, np.int64),
                  lambda m, i: m[i]),
        "fp32": (np.ascontiguousarray(a.T, np.float32), np.ascontiguousarray(b.T, np.float32),
                 lambda m, i: m[i]),
    }
    for label, (cols_a, cols_b, col) in variants.items():
        assert all(int(np.dot(col(cols_a, i), col(cols_b, j))) == counts[i, j] for i, j in idx[:100])
        t0 = time.perf_counter()
        for i, j in idx:
            int(np.dot(col(cols_a, i), col(cols_b, j)))
        per_edge[label] = (time.perf_counter() - t0) / args.edge_sample
    del matrix, variants

    s = min(args.sql_tokens, t)
    t0 = time.perf_counter()
    sql_counts = coactivation_counts(pa_[:s], pb_[:s], d, d, engine="sql")
    sql = (time.perf_counter() - t0) * t / s
    np.testing.assert_array_equal(sql_counts, coactivation_counts(pa_[:s], pb_[:s], d, d))

    print(f"popcount engine           {pop:9.3f} s   (CPU {pop_cpu:.2f} s; transposing both layers "
          f"to bitsets {tr:.3f} s of it)")
    print(f"torch fp32 matmul         {mm:9.3f} s   (CPU {mm_cpu:.2f} s; 0/1 float matrices already in "
          f"memory)  popcount is {mm / pop:5.1f}x faster (target >= 4)")
    print(f"torch fp32 matmul engine  {mm_engine:9.3f} s   (from the same packed masks)  "
          f"popcount is {mm_engine / pop:5.1f}x faster")
    for label, seconds in per_edge.items():
        loop_total = seconds * d * d
        what = {"reference": "reference", "int64": "contig int64", "fp32": "contig fp32"}[label]
        print(f"per-edge loop, {what:12s} {loop_total:7.0f} s   ({seconds * 1e6:.1f} us/edge over "
              f"{args.edge_sample} sampled edges, x{d * d / args.edge_sample:.0f})  popcount is "
              f"{loop_total / pop:6.0f}x faster" + (" (target >= 1000)" if label == "reference" else ""))
    print(f"popcount vs 0.36 s ref    {pop / REFERENCE_POPCOUNT_S:9.2f}x  (target <= 2)")
    print(f"DuckDB SQL engine         {sql:9.1f} s   (measured on {s} tokens, x{t / s:.0f}); "
          f"popcount is {sql / pop:6.0f}x faster")
    print(f"load average after        {os.getloadavg()[0]:9.1f}")
    if args.cuda:
        if not torch.cuda.is_available():
            print("CUDA engine               skipped: no CUDA device")
            return
        name = torch.cuda.get_device_name()
        ga = torch.from_numpy(a).cuda().half()
        gb = torch.from_numpy(b).cuda().half()

        def kernel():
            try:
                torch.mm(ga.T, gb, out_dtype=torch.float32)  # fp32 accumulation and output
            except (TypeError, RuntimeError):  # older torch: fp16 output
                torch.mm(ga.T, gb)
            torch.cuda.synchronize()

        kernel()
        gk, _ = best_of(kernel, args.repeat)
        coactivation_counts(pa_[:64], pb_[:64], d, d, engine="cuda")
        gpu, _ = best_of(lambda: coactivation_counts(pa_, pb_, d, d, engine="cuda"), args.repeat)
        np.testing.assert_array_equal(coactivation_counts(pa_, pb_, d, d, engine="cuda"), counts)
        print(f"CUDA fp16 matmul kernel   {gk:9.4f} s   ({name}; 0/1 fp16 matrices on the device)")
        print(f"CUDA engine               {gpu:9.4f} s   (from packed host masks: transfer, unpack, "
              f"product, int64 result back)  popcount is {gpu / pop:.2f}x its time")


if __name__ == "__main__":
    main()
