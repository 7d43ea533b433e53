"""Shamir secret sharing (Shamir 1979) of 32-byte secrets over GF(2^521 - 1).

SecAgg (Bonawitz et al. 2017, §4) shares each client's self-mask seed ``b_u`` and its mask
private key ``s_u^SK`` with threshold ``t``. A 256-bit secret fits in one element of the
Mersenne-prime field p = 2^521 - 1, so each secret is one polynomial and each share one
field element (66 bytes); no splitting into chunks is needed.

Share x-coordinates are the clients' ids (positive integers below 2^63, so distinct and
non-zero mod p). Any ``t`` shares reconstruct the secret; ``t - 1`` shares are
information-theoretically independent of it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)
SECRET_BYTES = 32


def split_secret(secret: bytes, threshold: int, holders: Iterable[int]) -> dict[int, int]:
    """Split ``secret`` into one share per holder id; any ``threshold`` of them reconstruct."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    xs = list(holders)
    if len(set(xs)) != len(xs):
        raise ValueError("holder ids must be distinct")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in [1, {len(xs)}], got {threshold}")
    if any(not 0 < x < PRIME for x in xs):
        raise ValueError("holder ids must be positive and below the field prime")
    # random polynomial f of degree t-1 with f(0) = secret; coefficients from the OS CSPRNG
    coeffs = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)
    ]
    shares: dict[int, int] = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        shares[x] = acc
    return shares


def _lagrange_at(xs: list[int], ys: list[int], at: int) -> int:
    total = 0
    for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def reconstruct_secret(shares: Mapping[int, int], threshold: int) -> bytes:
    """Reconstruct the secret from at least ``threshold`` shares ``{holder id: share}``.

    Extra shares beyond ``threshold`` are checked to lie on the same polynomial, so an
    inconsistent share (corruption, wrong holder) is detected instead of silently producing
    a wrong secret (and hence a wrong, un-maskable sum).
    """
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares, got {len(shares)}")
    items = sorted(shares.items())
    xs = [x for x, _ in items[:threshold]]
    ys = [y % PRIME for _, y in items[:threshold]]
    for x, y in items[threshold:]:
        if _lagrange_at(xs, ys, x) != y % PRIME:
            raise ValueError(f"share of holder {x} is inconsistent with the others")
    value = _lagrange_at(xs, ys, 0)
    if value >> (8 * SECRET_BYTES):
        raise ValueError("reconstructed value is not a 32-byte secret (inconsistent shares)")
    return value.to_bytes(SECRET_BYTES, "big")


def share_to_bytes(share: int) -> bytes:
    return share.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ValueError("share is not a field element")
    return value
