"""The graph chain at gpt2-xl scale: 48 layers x 6,400 neurons, 16,384 tokens, on this CPU.

    .venv/bin/python benchmarks/gpt2xl_graph.py                       # full size (~10 min, 2 cores)
    .venv/bin/python benchmarks/gpt2xl_graph.py --layers 6 --tokens 4096   # a quick look

Synthetic bit-packed masks with per-neuron densities from Beta(1.3, 3.5) (median ~0.25, a tail
near 0), generated layer by layer. Then the pipeline's own pieces, stage by stage:
  1. co-activation of all 47 adjacent pairs with the popcount engine (counts kept on disk as
     uint16 .npy, the max count tracked for the reference normalisation);
  2. thresholding (normalized weight > --threshold, sql/edge_weights.sql in DuckDB, pair by
     pair) into NumPy edge arrays;
  3. the one-pass threshold analysis (union-find) over the kept edges;
  4. igraph construction (Graph(n) + add_edges on the ndarray) and PageRank;
  5. degree straight from the edges (np.bincount) and subset selection (top k, ratio 0.01).
Prints each stage's time and the peak RSS so far. Targets: co-activation <= 5 min, the whole
chain <= 10 min, peak RSS <= 6 GB.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.core.coact import pair_index, weighted_edges  # noqa: E402
from pipeline.kernels.graphs import build_graph, centrality, threshold_analysis, top_k  # noqa: E402
from pipeline.stages.coactivation import coactivation_counts  # noqa: E402
from pipeline.stages.subsets import subset_size  # noqa: E402


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def layer_masks(layer: int, tokens: int, width: int, densities: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(1000 + layer)
    packed = np.empty((tokens, (width + 7) // 8), np.uint8)
    for s in range(0, tokens, 2048):  # bounded temporaries
        block = rng.random((min(2048, tokens - s), width), dtype=np.float32) < densities[layer]
        packed[s:s + len(block)] = np.packbits(block, axis=1, bitorder="little")
    return packed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--neurons", type=int, default=6400)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--workdir", default=tempfile.mkdtemp(prefix="nwh-xl-"))
    args = p.parse_args()
    L, d, T = args.layers, args.neurons, args.tokens
    rng = np.random.default_rng(0)
    densities = rng.beta(1.3, 3.5, size=(L, d)).astype(np.float32)
    print(f"{L} layers x {d} neurons, {T} tokens; median density {np.median(densities):.3f}, "
          f"{(densities < 0.01).mean():.1%} of neurons below 0.01")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    # 1. co-activation, pair by pair
    t0 = time.perf_counter()
    coactivation_counts(layer_masks(0, 64, d, densities)[:64], layer_masks(0, 64, d, densities)[:64], d, d)
    gen_seconds = 0.0
    max_count = 0
    g0 = time.perf_counter()
    prev = layer_masks(0, T, d, densities)
    active = [np.unpackbits(prev, axis=1, count=d, bitorder="little").sum(0)]  # neuron_stats'
    gen_seconds += time.perf_counter() - g0
    for layer in range(L - 1):
        g0 = time.perf_counter()
        nxt = layer_masks(layer + 1, T, d, densities)
        active.append(np.unpackbits(nxt, axis=1, count=d, bitorder="little").sum(0))
        gen_seconds += time.perf_counter() - g0
        counts = coactivation_counts(prev, nxt, d, d)
        max_count = max(max_count, int(counts.max()))
        np.save(work / f"L{layer}.npy", counts.astype(np.uint16))
        prev = nxt
    coact = time.perf_counter() - t0 - gen_seconds
    print(f"1. co-activation, {L - 1} pairs      {coact:8.1f} s   (+{gen_seconds:.1f} s making masks)"
          f"   peak RSS {peak_gb():.2f} GB")

    # 2. thresholding
    import duckdb

    t1 = time.perf_counter()
    src, dst, wts = [], [], []
    con, index = duckdb.connect(), pair_index(d, d)
    for layer in range(L - 1):
        counts = np.load(work / f"L{layer}.npy")
        kept = weighted_edges(con, counts, active[layer], active[layer + 1], tokens=T,
                              max_count=max_count, weight="normalized", threshold=args.threshold,
                              index=index)
        src.append(layer * d + kept["neuron_a"].to_numpy().astype(np.int64))
        dst.append((layer + 1) * d + kept["neuron_b"].to_numpy().astype(np.int64))
        wts.append(kept["weight"].to_numpy())
    con.close()
    edges = np.stack([np.concatenate(src), np.concatenate(dst)], axis=1)
    weights = np.concatenate(wts)
    del src, dst, wts
    thr = time.perf_counter() - t1
    n = L * d
    print(f"2. threshold > {args.threshold:g} x max ({max_count})  {thr:8.1f} s   "
          f"{len(edges):,} edges of {(L - 1) * d * d:,}   peak RSS {peak_gb():.2f} GB")

    t2 = time.perf_counter()
    analysis = threshold_analysis(n, edges, weights, [args.threshold + k * 0.05 for k in range(8)])
    ta = time.perf_counter() - t2
    print(f"3. threshold analysis (union-find)  {ta:8.1f} s   peak RSS {peak_gb():.2f} GB")
    print(analysis)

    t3 = time.perf_counter()
    graph = build_graph(n, edges)
    build = time.perf_counter() - t3
    print(f"4a. igraph Graph(n) + add_edges    {build:8.1f} s   peak RSS {peak_gb():.2f} GB")
    t4 = time.perf_counter()
    pagerank = centrality("pagerank", n, edges, weights, graph=graph)
    pr = time.perf_counter() - t4
    print(f"4b. PageRank                       {pr:8.1f} s   peak RSS {peak_gb():.2f} GB")

    t5 = time.perf_counter()
    degree = centrality("degree", n, edges, weights)
    ids = np.arange(n)
    k = subset_size(n, args.ratio)
    chosen_degree = top_k(degree, ids, k)
    chosen_pagerank = top_k(pagerank, ids, k)
    sub = time.perf_counter() - t5
    print(f"5. degree + subsets (k = {k})       {sub:8.1f} s   overlap degree/pagerank "
          f"{len(set(chosen_degree) & set(chosen_pagerank)) / k:.0%}")
    total = coact + thr + ta + build + pr + sub
    print(f"co-activation {coact:.0f} s (target <= 300); whole chain {total:.0f} s (target <= 600); "
          f"peak RSS {peak_gb():.2f} GB (target <= 6)")


if __name__ == "__main__":
    main()
