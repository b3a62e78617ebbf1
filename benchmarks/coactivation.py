"""Co-activation engines on the same masks: popcount vs fp32 matmul vs per-edge loop vs SQL.

    .venv/bin/python benchmarks/coactivation.py                  # 3072 x 3072 neurons, 8192 tokens
    .venv/bin/python benchmarks/coactivation.py --cuda           # also the CUDA engine

Random masks with density ~0.2 (fixed seed). Prints each engine's time for one layer pair and
the ratios the project tracks:
  * popcount vs a torch fp32 matmul of the 0/1 matrices            (target >= 4x faster),
    both as the bare kernel on unpacked floats and as an engine from the same packed masks
  * popcount vs the reference per-edge Python dot-product loop     (target >= 1000x faster;
    the loop is timed on a sample of edges and extrapolated to all d_a * d_b edges)
  * popcount vs the 0.36 s measured for this shape on this machine kind (target within 2x)
  * the DuckDB SQL engine (on a token slice, extrapolated linearly), for the record
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.coactivation import coactivation_counts  # noqa: E402

REFERENCE_POPCOUNT_S = 0.36


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--neurons", type=int, default=3072)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--edge-sample", type=int, default=20000, help="edges timed in the Python loop")
    p.add_argument("--sql-tokens", type=int, default=256, help="token slice for the SQL engine")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cuda", action="store_true", help="also time the CUDA matmul engine")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    d, t = args.neurons, args.tokens
    a = rng.random((t, d), dtype=np.float32) < args.density
    b = rng.random((t, d), dtype=np.float32) < args.density
    pa_, pb_ = (np.packbits(x, axis=1, bitorder="little") for x in (a, b))
    print(f"{d} x {d} neurons, {t} tokens, density {args.density}, threads {torch.get_num_threads()}")

    coactivation_counts(pa_[:64], pb_[:64], d, d)  # compile / load the kernel
    counts = coactivation_counts(pa_, pb_, d, d)
    pop = best_of(lambda: coactivation_counts(pa_, pb_, d, d), args.repeat)

    fa, fb = torch.from_numpy(a.astype(np.float32)), torch.from_numpy(b.astype(np.float32))
    dense = (fa.T @ fb).to(torch.int64).numpy()
    assert np.array_equal(dense, counts), "popcount disagrees with the matmul"
    mm = best_of(lambda: fa.T @ fb, args.repeat)
    mm_engine = best_of(lambda: coactivation_counts(pa_, pb_, d, d, engine="matmul"), args.repeat)

    # the reference method: one dot product of two binary columns per edge
    cols_a, cols_b = a.T.astype(np.int64), b.T.astype(np.int64)
    idx = rng.integers(0, d, size=(args.edge_sample, 2))
    t0 = time.perf_counter()
    for i, j in idx:
        int(np.dot(cols_a[i], cols_b[j]))
    per_edge = (time.perf_counter() - t0) / args.edge_sample
    loop_total = per_edge * d * d

    s = args.sql_tokens
    t0 = time.perf_counter()
    sql_counts = coactivation_counts(pa_[:s], pb_[:s], d, d, engine="sql")
    sql = (time.perf_counter() - t0) * t / s
    assert np.array_equal(sql_counts, coactivation_counts(pa_[:s], pb_[:s], d, d))

    print(f"popcount (numba)          {pop:9.3f} s")
    print(f"torch fp32 matmul, kernel {mm:9.3f} s   popcount is {mm / pop:6.1f}x faster "
          "(0/1 float matrices already in memory)")
    print(f"torch fp32 matmul engine  {mm_engine:9.3f} s   popcount is {mm_engine / pop:6.1f}x faster "
          "(target >= 4; from the same packed masks)")
    print(f"per-edge Python loop      {loop_total:9.0f} s   popcount is {loop_total / pop:6.0f}x faster "
          f"(target >= 1000; {per_edge * 1e6:.1f} us/edge over {args.edge_sample} sampled edges)")
    print(f"popcount / 0.36 s ref     {pop / REFERENCE_POPCOUNT_S:9.2f}     (target <= 2)")
    print(f"DuckDB SQL engine         {sql:9.1f} s   (measured on {s} tokens, x{t / s:.0f})")
    if args.cuda:
        if not torch.cuda.is_available():
            print("CUDA engine               skipped: no CUDA device")
        else:
            coactivation_counts(pa_[:64], pb_[:64], d, d, engine="matmul", device="cuda")
            torch.cuda.synchronize()
            gpu = best_of(lambda: coactivation_counts(pa_, pb_, d, d, engine="matmul",
                                                      device="cuda"), args.repeat)
            assert np.array_equal(coactivation_counts(pa_, pb_, d, d, engine="matmul",
                                                      device="cuda"), counts)
            print(f"CUDA fp16 matmul engine   {gpu:9.3f} s   (incl. unpacking and transfers)")


if __name__ == "__main__":
    main()
