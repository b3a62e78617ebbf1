"""Correlation accumulation of two gpt2-small-shaped activation streams (12 x 3072 neurons each).

    .venv/bin/python benchmarks/correlation.py                 # 8192 tokens, 4 of the 144 layer pairs

Times pipeline.kernels.correlation.PairCorrelation.update (float64 sums, the cross term a matrix product)
on random float32 activations, against the pure matrix product a.T @ b of the same shapes (the
limit), then extrapolates to all 144 layer pairs and one million tokens. Memory is bounded by
one pair's [3072, 3072] float64 block plus one token chunk: peak RSS is measured for N and 4N
tokens in fresh processes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.kernels.correlation import CHUNK_ROWS, PairCorrelation  # noqa: E402

D, LAYERS = 3072, 12


def accumulate(tokens: int, pairs: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(CHUNK_ROWS, D)).astype(np.float32)
    b = rng.normal(size=(CHUNK_ROWS, D)).astype(np.float32)
    t0 = time.perf_counter()
    for _ in range(pairs):
        acc = PairCorrelation(D, D)
        for _ in range(0, tokens, CHUNK_ROWS):
            acc.update(a, b)
        acc.correlation()
    accum = time.perf_counter() - t0
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    t0 = time.perf_counter()
    for _ in range(pairs):
        for _ in range(0, tokens, CHUNK_ROWS):
            a64.T @ b64
    pure = time.perf_counter() - t0
    return accum, pure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        accumulate(args.tokens, 1)
        print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    accum, pure = accumulate(args.tokens, args.pairs)
    per_m = accum / args.pairs / args.tokens * 1e6 * LAYERS * LAYERS
    print(f"{args.pairs} layer pairs x {args.tokens} tokens of {D} x {D} neurons")
    print(f"accumulation (float64 sums)      {accum:8.2f} s")
    print(f"pure float64 matmul a.T @ b      {pure:8.2f} s   accumulation / matmul = {accum / pure:.3f}")
    print(f"per million tokens, all {LAYERS * LAYERS} pairs  {per_m / 3600:8.2f} h on this CPU")
    peaks = []
    for tokens in (args.tokens, 4 * args.tokens):
        out = subprocess.run([sys.executable, __file__, "--rss-child", "--tokens", str(tokens)],
                             check=True, capture_output=True, text=True)
        peaks.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])
        print(f"peak RSS, one pair, {tokens:6d} tokens  {peaks[-1]:8.0f} MiB")
    print(f"peak RSS ratio 4x / 1x tokens     {peaks[1] / peaks[0]:8.3f}")


if __name__ == "__main__":
    main()
