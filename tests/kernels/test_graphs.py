"""Centralities and the streaming threshold analysis against plain-Python / NumPy references.

The reference functions here (BFS, power iteration, peeling, shortest-path enumeration) are also
the truth of tests/stages/test_subsets.py.
"""

from __future__ import annotations

from collections import deque
from itertools import combinations

import numpy as np
import pytest

from pipeline.kernels.graphs import (
    METHODS,
    ThresholdAnalysis,
    build_graph,
    centrality,
    threshold_analysis,
    top_k,
)

# -- references


def neighbours(n: int, edges) -> list[set[int]]:
    adj = [set() for _ in range(n)]
    for u, v in np.asarray(edges).reshape(-1, 2).tolist():
        if u != v:
            adj[u].add(v)
            adj[v].add(u)
    return adj


def bfs(adj: list[set[int]], source: int) -> dict[int, int]:
    """Distance (edges) from source to every node it reaches."""
    dist = {source: 0}
    queue = deque([source])
    while queue:
        u = queue.popleft()
        for v in adj[u]:
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def ref_components(n: int, edges) -> list[int]:
    """Sizes of the connected components (isolated nodes included) by BFS."""
    adj, seen, sizes = neighbours(n, edges), set(), []
    for s in range(n):
        if s not in seen:
            reach = bfs(adj, s)
            seen.update(reach)
            sizes.append(len(reach))
    return sizes


def ref_degree(n: int, edges) -> list[int]:
    out = [0] * n
    for u, v in np.asarray(edges).reshape(-1, 2).tolist():
        out[u] += 1
        out[v] += 1
    return out


def ref_strength(n: int, edges, weights) -> list[float]:
    out = [0.0] * n
    for (u, v), w in zip(np.asarray(edges).reshape(-1, 2).tolist(), np.asarray(weights).tolist()):
        out[u] += w
        out[v] += w
    return out


def ref_pagerank(n: int, edges, damping: float = 0.85) -> np.ndarray:
    """Power iteration: a walker follows a random edge, or (prob. 1 - damping, and always from a
    node without edges) jumps to a uniform random node."""
    a = np.zeros((n, n))
    for u, v in np.asarray(edges).reshape(-1, 2).tolist():
        a[u, v] += 1
        a[v, u] += 1
    deg = a.sum(1)
    p = np.full(n, 1 / n)
    for _ in range(100_000):
        spread = a @ np.divide(p, deg, out=np.zeros(n), where=deg > 0)
        nxt = (1 - damping) / n + damping * (spread + p[deg == 0].sum() / n)
        if np.abs(nxt - p).max() < 1e-16:
            break
        p = nxt
    return nxt


def ref_harmonic(n: int, edges) -> list[float]:
    """Mean over the other n - 1 nodes of 1 / distance (0 when unreachable)."""
    adj = neighbours(n, edges)
    return [sum(1 / d for d in bfs(adj, s).values() if d) / (n - 1) for s in range(n)]


def ref_coreness(n: int, edges) -> list[int]:
    """k-core number by peeling: remove nodes of degree <= k until none is left, k = 0, 1, ..."""
    adj = neighbours(n, edges)
    deg = {v: len(adj[v]) for v in range(n)}
    core, k = [0] * n, 0
    while deg:
        low = [v for v, d in deg.items() if d <= k]
        if not low:
            k += 1
            continue
        for v in low:
            core[v] = k
            del deg[v]
            for u in adj[v]:
                if u in deg:
                    deg[u] -= 1
    return core


def shortest_paths(adj: list[set[int]], s: int, t: int) -> list[list[int]]:
    """Every shortest path from s to t, enumerated by depth-first search along BFS levels."""
    dist = bfs(adj, s)
    if t not in dist:
        return []
    paths = []

    def walk(path):
        u = path[-1]
        if u == t:
            paths.append(path)
            return
        for v in adj[u]:
            if dist.get(v) == dist[u] + 1 and dist[v] <= dist[t]:
                walk(path + [v])

    walk([s])
    return paths


def ref_betweenness(n: int, edges, cutoff: int | None = None) -> list[float]:
    """Sum over unordered pairs {s, t} (at distance <= cutoff) of the share of their shortest
    paths that pass through the node."""
    adj = neighbours(n, edges)
    out = [0.0] * n
    for s, t in combinations(range(n), 2):
        paths = shortest_paths(adj, s, t)
        if not paths or (cutoff is not None and len(paths[0]) - 1 > cutoff):
            continue
        for path in paths:
            for v in path[1:-1]:
                out[v] += 1 / len(paths)
    return out


def ref_eigenvector(n: int, edges) -> np.ndarray:
    """Eigenvector of the largest eigenvalue of the adjacency matrix (numpy eigh), max = 1."""
    a = np.zeros((n, n))
    for u, v in np.asarray(edges).reshape(-1, 2).tolist():
        a[u, v] = a[v, u] = 1
    values, vectors = np.linalg.eigh(a)
    assert values[-1] - values[-2] > 1e-3, "the test graph needs a simple top eigenvalue"
    top = np.abs(vectors[:, -1])
    return top / top.max()


def reference(method: str, n: int, edges, weights, cutoff: int | None = None) -> np.ndarray:
    """The test's own value of a centrality (cutoff: of betweenness)."""
    return np.asarray({
        "degree": lambda: ref_degree(n, edges),
        "strength": lambda: ref_strength(n, edges, weights),
        "pagerank": lambda: ref_pagerank(n, edges),
        "eigenvector": lambda: ref_eigenvector(n, edges),
        "betweenness": lambda: ref_betweenness(n, edges, cutoff),
        "harmonic": lambda: ref_harmonic(n, edges),
        "coreness": lambda: ref_coreness(n, edges),
    }[method](), dtype=np.float64)


def random_graph(seed: int, n: int = 30, m: int = 45, isolated: int = 5):
    """A simple undirected graph (no loops or repeated edges) with `isolated` nodes without edges."""
    rng = np.random.default_rng(seed)
    edges = set()
    while len(edges) < m:
        u, v = sorted(int(x) for x in rng.integers(0, n - isolated, 2))
        if u != v:
            edges.add((u, v))
    edges = np.array(sorted(edges), np.int64)
    return edges, np.round(rng.random(len(edges)), 3)


# -- centralities


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("method", METHODS)
def test_centrality_equals_reference(method, seed):
    n = 30
    edges, weights = random_graph(seed, n)
    cutoff = 3 if seed == 1 else None  # one graph with a path length cutoff, as the stage uses
    got = centrality(method, n, edges, weights, betweenness_cutoff=cutoff)
    assert got.shape == (n,) and got.dtype == np.float64
    np.testing.assert_allclose(got, reference(method, n, edges, weights, cutoff), rtol=1e-9,
                               atol=1e-12)


def test_betweenness_cutoff_drops_long_pairs():
    path = np.array([[0, 1], [1, 2], [2, 3], [3, 4]])  # a path of 5 nodes
    np.testing.assert_allclose(centrality("betweenness", 5, path, np.ones(4), betweenness_cutoff=2),
                               [0, 1, 1, 1, 0])  # node 2 is inside 1-3 only (0-4 is 4 edges long)
    np.testing.assert_allclose(centrality("betweenness", 5, path, np.ones(4), betweenness_cutoff=None),
                               [0, 3, 4, 3, 0])


def test_layered_graph_like_the_stage():
    """Three layers of 12 nodes, edges only between adjacent layers (a stage-shaped graph)."""
    rng = np.random.default_rng(11)
    n, cells = 36, [(a, b) for a in range(12) for b in range(12)]
    edges = np.array([(a + 12 * l, b + 12 * (l + 1)) for l in range(2) for a, b in cells
                      if rng.random() < 0.2])
    weights = rng.random(len(edges))
    graph = build_graph(n, edges)
    assert graph.vcount() == n and graph.ecount() == len(edges) and not graph.is_directed()
    for method in METHODS:
        np.testing.assert_allclose(centrality(method, n, edges, weights, graph=graph,
                                              betweenness_cutoff=None),
                                   reference(method, n, edges, weights), rtol=1e-9, atol=1e-12)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown centrality"):
        centrality("closeness2", 3, np.array([[0, 1]]), np.ones(1))


def ranked(scores, ids, rtol: float = 1e-9) -> list[int]:
    """Plain-Python ranking: score descending; a score within rtol (relative) below the previous
    one is tied with it; tied nodes by id ascending."""
    by_score = sorted(range(len(scores)), key=lambda i: -scores[i])
    group, groups = 0, {}
    for prev, cur in zip([None] + by_score[:-1], by_score):
        if prev is not None and scores[prev] - scores[cur] > rtol * abs(scores[prev]):
            group += 1
        groups[cur] = group
    return sorted(range(len(scores)), key=lambda i: (groups[i], ids[i]))


def test_top_k_breaks_ties_by_neuron_id():
    rng = np.random.default_rng(2)
    ids = rng.permutation(1000)[:50]
    exact = rng.integers(0, 4, 50).astype(float)
    # equal centralities that float sums left a few ulps apart, and two close but distinct ones
    noisy = 0.26 + rng.integers(0, 3, 50) * 0.01 + rng.integers(-3, 4, 50) * 2.0 ** -54
    noisy[:2] = 0.5, 0.5 * (1 - 1e-8)
    for scores in (exact, noisy):
        expect = ranked(scores.tolist(), ids.tolist())
        assert expect != sorted(range(50), key=lambda i: -scores[i])  # ties matter here
        for k in (1, 7, 50):
            assert top_k(scores, ids, k).tolist() == expect[:k]
    assert top_k(noisy, ids, 2).tolist() == [0, 1]


# -- threshold analysis


def reference_analysis(n, edges, weights, t) -> dict:
    kept = edges[weights > t]
    sizes = ref_components(n, kept)
    return {"nodes_with_edge": len(set(kept.ravel().tolist())), "edges": len(kept),
            "components": len(sizes), "min_component": min(sizes), "max_component": max(sizes),
            "mean_component": n / len(sizes), "nontrivial_components": sum(s > 1 for s in sizes)}


@pytest.mark.parametrize("seed", range(5))
def test_threshold_analysis_equals_bfs_per_threshold(seed):
    rng = np.random.default_rng(seed)
    n, m = 60, 120
    edges = rng.integers(0, n, size=(m, 2))  # repeated edges and loops on purpose
    weights = np.round(rng.random(m), 2)  # ties with the thresholds on purpose
    thresholds = [0.0, 0.1, 0.25, 0.5, 0.9, 0.99]
    got = threshold_analysis(n, edges, weights, thresholds)
    assert got["threshold"].to_list() == thresholds
    for row in got.iter_rows(named=True):
        expect = reference_analysis(n, edges, weights, row["threshold"])
        assert {k: row[k] for k in expect} == pytest.approx(expect)


def test_streaming_analysis_is_order_free():
    rng = np.random.default_rng(7)
    edges = rng.integers(0, 50, size=(300, 2))
    weights = rng.random(300)
    whole = threshold_analysis(50, edges, weights, [0.2, 0.5, 0.8])
    streamed = ThresholdAnalysis(50, [0.8, 0.2, 0.5])
    order = rng.permutation(300)
    for chunk in np.array_split(order, 7):
        streamed.add(edges[chunk, 0], edges[chunk, 1], weights[chunk])
    assert streamed.result().equals(whole)
