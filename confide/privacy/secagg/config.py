"""Parameters of one secure-aggregation session, validated once at construction.

All parties (clients and server) must hold the same :class:`SecAggConfig`: it fixes the
ring, the quantization scale, the graph degree, the thresholds and the distributed-DP noise.
Bad values raise :class:`SecAggValidationError` naming the field and its allowed range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import SecAggValidationError
from .graph import default_degree

SESSION_ID_BYTES = 16


def _fail(name: str, value: object, allowed: str) -> SecAggValidationError:
    return SecAggValidationError(f"SecAggConfig.{name}={value!r} is invalid: allowed {allowed}")


@dataclass(frozen=True)
class SecAggConfig:
    """Configuration of a secure-aggregation session.

    * ``num_clients`` (n): clients invited per round; sizes the graph and the overflow margin.
    * ``vector_length`` (d): length of each client's float update (a weight coordinate is
      appended internally, so d + 1 ring elements travel).
    * ``degree`` (k): neighbours per client (SecAgg+); default 2*ceil(log2 n); >= n-1 means
      all pairs (SecAgg).
    * ``threshold`` (t): shares needed to reconstruct a client's secrets, counted within its
      closed neighbourhood (itself + k neighbours, so t <= k+1); default a majority, > (k+1)/2.
    * ``min_survivors`` (m): the round aborts if fewer clients deliver masked inputs. Default
      ceil(n t / (k+1)), the fewest survivors compatible with every neighbourhood keeping t
      members alive in a k-regular graph (counting argument: sum over u of live members of
      N[u] = (k+1) * |live| >= n t). Distributed DP noise is calibrated to m (worst case).
    * ``bits`` (b): ring Z_{2^b}, 16..64.
    * ``coord_clip``: each coordinate is clipped to [-coord_clip, coord_clip].
    * ``l2_clip``: client-level L2 clipping norm (required with ``noise_stddev``).
    * ``max_weight``: aggregation weights (e.g. example counts) are capped at this value
      (as in DP-FedAvg, McMahan et al. 2018) so a client's influence stays bounded.
    * ``noise_stddev``: target standard deviation of the total discrete Gaussian noise in the
      aggregate, in the units of the (clipped) update; ``None`` disables distributed DP.
    * ``weight_coordinate_bound``: the weight coordinate carries omega * this value
      (default: the coordinate bound). It adds to the L2 sensitivity
      (sqrt(l2_clip^2 + bound^2)); a smaller value costs less privacy but makes the decoded
      total weight noisier relative to its size.
    * ``noise_headroom_sigmas``: how many total-noise standard deviations of ring headroom to
      reserve; P(overflow of a coordinate) <= 2 exp(-z^2/2) (the discrete Gaussian is
      sub-Gaussian, CKS 2020 Cor. 9), 1.1e-31 for z = 12.
    * ``rounding_beta``: failure probability of the conditional randomized rounding bound
      (Kairouz, Liu, Steinke 2021, eq. (13)); e^{-1/2} as in the paper.
    """

    session_id: bytes
    num_clients: int
    vector_length: int
    degree: int | None = None
    threshold: int | None = None
    min_survivors: int | None = None
    bits: int = 32
    coord_clip: float = 1.0
    l2_clip: float | None = None
    max_weight: float = 1.0
    noise_stddev: float | None = None
    weight_coordinate_bound: float | None = None
    noise_headroom_sigmas: float = 12.0
    rounding_beta: float = math.exp(-0.5)

    def __post_init__(self) -> None:
        if not isinstance(self.session_id, bytes) or len(self.session_id) != SESSION_ID_BYTES:
            raise _fail("session_id", self.session_id, f"{SESSION_ID_BYTES} random bytes")
        n = self.num_clients
        if not isinstance(n, int) or n < 2:
            raise _fail("num_clients", n, "an integer >= 2")
        if not isinstance(self.vector_length, int) or self.vector_length < 1:
            raise _fail("vector_length", self.vector_length, "an integer >= 1")
        k = default_degree(n) if self.degree is None else self.degree
        if not isinstance(k, int) or k < 1:
            raise _fail("degree", k, "an integer >= 1")
        k = min(k, n - 1)
        if k < n - 1 and k % 2:
            raise _fail("degree", k, f"even (Harary graph) or >= num_clients-1 = {n - 1}")
        t = (k + 1) // 2 + 1 if self.threshold is None else self.threshold
        t = min(t, k + 1)
        if not isinstance(t, int) or not 2 <= t <= k + 1:
            raise _fail(
                "threshold",
                self.threshold,
                f"an integer in [2, degree+1 = {k + 1}]"
                " (t = 1 would give every neighbour the secret)",
            )
        m = math.ceil(n * t / (k + 1)) if self.min_survivors is None else self.min_survivors
        if not isinstance(m, int) or not max(t, 2) <= m <= n:
            raise _fail("min_survivors", m, f"an integer in [threshold = {t}, num_clients = {n}]")
        if not isinstance(self.bits, int) or not 16 <= self.bits <= 64:
            raise _fail("bits", self.bits, "an integer in [16, 64]")
        for name in ("coord_clip", "max_weight"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise _fail(name, v, "a positive finite number")
        if self.l2_clip is not None and not (math.isfinite(self.l2_clip) and self.l2_clip > 0):
            raise _fail("l2_clip", self.l2_clip, "a positive finite number or None")
        if self.noise_stddev is not None:
            if not (math.isfinite(self.noise_stddev) and self.noise_stddev > 0):
                raise _fail("noise_stddev", self.noise_stddev, "a positive finite number or None")
            if self.l2_clip is None:
                raise _fail(
                    "l2_clip",
                    None,
                    "a positive number when noise_stddev is set (DP needs bounded sensitivity)",
                )
        wb = self.weight_coordinate_bound
        if wb is not None and not (math.isfinite(wb) and 0 < wb <= self.coordinate_bound):
            raise _fail("weight_coordinate_bound", wb, f"a number in (0, {self.coordinate_bound}]")
        if not (math.isfinite(self.noise_headroom_sigmas) and self.noise_headroom_sigmas >= 0):
            raise _fail("noise_headroom_sigmas", self.noise_headroom_sigmas, "a finite number >= 0")
        if not 0 < self.rounding_beta < 1:
            raise _fail("rounding_beta", self.rounding_beta, "a number in (0, 1)")
        object.__setattr__(self, "degree", k)
        object.__setattr__(self, "threshold", t)
        object.__setattr__(self, "min_survivors", m)

    # ---- derived ring parameters ------------------------------------------------------

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """uint32 for b <= 32, uint64 above; arithmetic wraps mod 2^32 / 2^64, which is
        consistent with Z_{2^b} because 2^b divides the word size (we reduce at the end)."""
        return np.uint32 if self.bits <= 32 else np.uint64

    @property
    def ring_mask(self) -> int:
        return (1 << self.bits) - 1

    @property
    def encoded_length(self) -> int:
        """d + 1: the update plus the aggregation-weight coordinate."""
        return self.vector_length + 1

    @property
    def coordinate_bound(self) -> float:
        """Largest |coordinate| of an encoded float vector: L2 clipping bounds every
        coordinate too, so the bound is the smaller of the two clips."""
        return self.coord_clip if self.l2_clip is None else min(self.coord_clip, self.l2_clip)

    @property
    def weight_bound(self) -> float:
        return (
            self.coordinate_bound
            if self.weight_coordinate_bound is None
            else self.weight_coordinate_bound
        )

    @property
    def local_noise_stddev(self) -> float | None:
        """Per-client noise std in update units: sigma_total / sqrt(m), so any >= m survivors
        carry at least the target total variance sigma_total^2."""
        if self.noise_stddev is None:
            return None
        return self.noise_stddev / math.sqrt(self.min_survivors)
