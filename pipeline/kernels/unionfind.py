"""Union-find over weighted edges at many thresholds at once (numba, cached at module level
where a cache folder is writable: pipeline/kernels/numba_cache.py).

Used by the graph stage's streaming threshold analysis (pipeline/graph.py).
"""

from __future__ import annotations

from numba import njit

from pipeline.kernels.numba_cache import CACHE


@njit(cache=CACHE, nogil=True)
def union_edges(parent, size, has_edge, stats, src, dst, weights, thresholds):
    """Union every edge into the union-find of each threshold it exceeds (weight > threshold).

    parent, size, has_edge: [k, n]; stats[k] = (edges, components merged, nodes with an edge).
    Path halving and union by size.
    """
    for e in range(len(src)):
        w = weights[e]
        for t in range(len(thresholds)):
            if not w > thresholds[t]:
                continue
            stats[t, 0] += 1
            u, v = src[e], dst[e]
            for x in (u, v):
                if not has_edge[t, x]:
                    has_edge[t, x] = True
                    stats[t, 2] += 1
            while parent[t, u] != u:
                parent[t, u] = parent[t, parent[t, u]]
                u = parent[t, u]
            while parent[t, v] != v:
                parent[t, v] = parent[t, parent[t, v]]
                v = parent[t, v]
            if u != v:
                if size[t, u] < size[t, v]:
                    u, v = v, u
                parent[t, v] = u
                size[t, u] += size[t, v]
                stats[t, 1] += 1
