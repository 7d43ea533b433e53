"""Masking in Z_{2^b} (Bonawitz et al. 2017, §4; Bell et al. 2020, §3).

Client u sends
    y_u = x_u + PRG(b_u) + sum_{v in N(u) alive, u < v} PRG(s_uv)
                         - sum_{v in N(u) alive, u > v} PRG(s_uv)
(mod 2^b). Pairwise masks cancel in the sum over clients; the server removes the self masks
PRG(b_u) of survivors and the pairwise masks of dropped clients after reconstructing their
seeds. PRG is ChaCha20 (:mod:`.prg`). All arithmetic is in place on uint32/uint64 numpy
arrays, whose wrap-around is exactly reduction mod 2^32 / 2^64, and the result is reduced
mod 2^b once at the end (2^b divides the word size, so this commutes with the sums).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .config import SecAggConfig
from .prg import expand_uint


def pairwise_sign(own: int, peer: int) -> int:
    """+1 for the smaller id, -1 for the larger: the two masks of a pair cancel."""
    if own == peer:
        raise ValueError("a client has no pairwise mask with itself")
    return 1 if own < peer else -1


def reduce_mod(vector: np.ndarray, config: SecAggConfig) -> np.ndarray:
    if config.bits not in (32, 64):
        vector &= config.dtype(config.ring_mask)
    return vector


def add_mask(acc: np.ndarray, seed: bytes, sign: int) -> None:
    """acc += sign * PRG(seed) (mod word size), in place."""
    mask = expand_uint(seed, acc.size, acc.dtype.type)
    if sign > 0:
        np.add(acc, mask, out=acc)
    else:
        np.subtract(acc, mask, out=acc)


def mask_vector(
    encoded: np.ndarray,
    own_id: int,
    self_seed: bytes,
    pair_seeds: Iterable[tuple[int, bytes]],
    config: SecAggConfig,
) -> np.ndarray:
    """y_u = x_u + PRG(b_u) + sum_v sign(u, v) PRG(s_uv), mod 2^b. ``encoded`` is consumed."""
    if encoded.dtype != np.dtype(config.dtype):
        raise ValueError(f"encoded vector must be {np.dtype(config.dtype)}, got {encoded.dtype}")
    y = encoded
    add_mask(y, self_seed, +1)
    for peer, seed in pair_seeds:
        add_mask(y, seed, pairwise_sign(own_id, peer))
    return reduce_mod(y, config)
