"""ChaCha20 keystream expansion: the only source of mask bits and of DP-noise randomness.

Masks must be a deterministic function of a 256-bit seed (both parties of a pair, and the
server after reconstructing a seed, must expand the same vector), and must be
computationally indistinguishable from uniform; numpy/python PRNGs give neither guarantee.
ChaCha20 (RFC 8439) keyed with the seed and encrypting zeros gives both, and OpenSSL's
implementation runs at ~1 GB/s, so expanding a 22.7M-coordinate uint32 mask costs ~0.1 s.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32
# cryptography's ChaCha20 takes a 16-byte nonce = 4-byte little-endian block counter +
# 12-byte nonce. Every seed below is used for exactly one stream per purpose, so a fixed
# nonce is safe; the purpose byte keeps streams of different purposes apart should a seed
# ever be reused across purposes.
_NONCE_PREFIX = bytes(4)


def _nonce(purpose: int) -> bytes:
    return _NONCE_PREFIX + purpose.to_bytes(1, "little") + bytes(11)


PURPOSE_MASK = 1
PURPOSE_NOISE = 2
PURPOSE_ROUNDING = 3
PURPOSE_GRAPH = 4


def keystream(seed: bytes, nbytes: int, purpose: int = PURPOSE_MASK) -> np.ndarray:
    """``nbytes`` of ChaCha20 keystream for ``seed`` as a writable uint8 array."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    out = np.empty(nbytes, dtype=np.uint8)
    if nbytes == 0:
        return out
    enc = Cipher(algorithms.ChaCha20(seed, _nonce(purpose)), mode=None).encryptor()
    # update_into writes straight into numpy's buffer: no intermediate bytes object
    # beyond the zero plaintext.
    zeros = np.zeros(nbytes, dtype=np.uint8)
    enc.update_into(zeros, out)  # type: ignore[arg-type]  # ndarrays are buffers; stubs want bytes
    return out


def expand_uint(
    seed: bytes, length: int, dtype: type[np.unsignedinteger], purpose: int = PURPOSE_MASK
) -> np.ndarray:
    """Uniform unsigned integers of ``dtype`` (uint32 or uint64) expanded from ``seed``."""
    itemsize = np.dtype(dtype).itemsize
    # little-endian view so that expansions agree across platforms
    return (
        keystream(seed, length * itemsize, purpose)
        .view(np.dtype(dtype).newbyteorder("<"))
        .astype(dtype, copy=False)
    )


class ChaChaStream:
    """A sequential ChaCha20 keystream used as a cryptographically secure RNG.

    Used for DP noise and stochastic rounding: the noise must be unpredictable to the server
    (a predictable noise stream could be subtracted from the sum), so we do not use a numpy
    bit generator for it. Seeded from ``os.urandom`` unless a seed is given (tests only).
    """

    def __init__(self, seed: bytes | None = None, purpose: int = PURPOSE_NOISE) -> None:
        seed = os.urandom(SEED_BYTES) if seed is None else seed
        if len(seed) != SEED_BYTES:
            raise ValueError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
        self._enc = Cipher(algorithms.ChaCha20(seed, _nonce(purpose)), mode=None).encryptor()

    def uint64(self, size: int) -> np.ndarray:
        out = np.empty(size * 8, dtype=np.uint8)
        if size:
            zeros = np.zeros(size * 8, dtype=np.uint8)
            self._enc.update_into(zeros, out)  # type: ignore[arg-type]  # as in keystream()
        return out.view("<u8").astype(np.uint64, copy=False)

    def uint32(self, size: int) -> np.ndarray:
        out = np.empty(size * 4, dtype=np.uint8)
        if size:
            zeros = np.zeros(size * 4, dtype=np.uint8)
            self._enc.update_into(zeros, out)  # type: ignore[arg-type]  # as in keystream()
        return out.view("<u4")

    def bits(self, size: int) -> np.ndarray:
        """``size`` independent fair bits as a bool array."""
        raw = self.uint64((size + 63) // 64)
        return np.unpackbits(raw.view(np.uint8), count=size).astype(bool)
