"""Sparse neighbour graph of SecAgg+ (Bell et al. 2020, §3).

Instead of masking with all n-1 peers, each client masks with and shares its secrets among
k = O(log n) neighbours. Bell et al. use a random k-regular graph; we use the same
construction as their implementation and Flower's SecAgg+: a Harary graph H_{k,n} (each node
joined to its k/2 predecessors and successors on a cycle) over a uniformly random
permutation of the clients. The permutation comes from a public 32-byte seed the server picks
per round, expanded with ChaCha20 into a Fisher-Yates shuffle, so every party computes the
same graph from (seed, client ids) with no numpy/python PRNG whose stream could change
between library versions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from .prg import PURPOSE_GRAPH, keystream


def default_degree(num_clients: int) -> int:
    """k = 2 * ceil(log2 n) (even, of order log n), capped at n - 1 (complete graph)."""
    if num_clients <= 1:
        return 0
    k = 2 * math.ceil(math.log2(num_clients))
    return min(k, num_clients - 1)


def _shuffle(ids: list[int], seed: bytes) -> list[int]:
    n = len(ids)
    # 8 bytes per draw, rejection sampling for unbiased indices; 2x headroom, refilled on need
    words = keystream(seed, 16 * max(n, 1), PURPOSE_GRAPH).view("<u8")
    pos = 0
    out = list(ids)
    for i in range(n - 1, 0, -1):
        bound = i + 1
        limit = (1 << 64) - ((1 << 64) % bound)
        while True:
            if pos >= len(words):  # astronomically unlikely; extend deterministically
                words = keystream(seed, 16 * (len(words) + n), PURPOSE_GRAPH).view("<u8")
            w = int(words[pos])
            pos += 1
            if w < limit:
                break
        j = w % bound
        out[i], out[j] = out[j], out[i]
    return out


def neighbour_graph(
    client_ids: Iterable[int], degree: int, seed: bytes
) -> dict[int, frozenset[int]]:
    """Neighbours of each client (excluding itself) in a random Harary graph.

    ``degree`` >= n - 1 gives the complete graph (plain SecAgg). Otherwise ``degree`` must be
    even; the graph is exactly ``degree``-regular.
    """
    ids = sorted(set(client_ids))
    n = len(ids)
    if degree >= n - 1:
        return {u: frozenset(v for v in ids if v != u) for u in ids}
    if degree < 1 or degree % 2:
        raise ValueError(f"degree must be even and >= 2 when below n - 1 = {n - 1}, got {degree}")
    order = _shuffle(ids, seed)
    half = degree // 2
    nbrs: dict[int, set[int]] = {u: set() for u in ids}
    for i, u in enumerate(order):
        for off in range(1, half + 1):
            v = order[(i + off) % n]
            nbrs[u].add(v)
            nbrs[v].add(u)
    return {u: frozenset(s) for u, s in nbrs.items()}
