"""Encoding of a float update into the ring Z_{2^b} and back, with the client-side steps of
the distributed discrete Gaussian mechanism (Kairouz, Liu, Steinke 2021, "The Distributed
Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation", Algorithm 1).

Client pipeline (:meth:`UpdateEncoder.encode`):
  1. validate (1-D, floating dtype, length d, all finite);
  2. client-level L2 clip to ``l2_clip`` (if set), then coordinate clip to ``coord_clip``;
  3. multiply by the aggregation weight omega = min(w, W)/W in [0, 1] and append the weight
     coordinate omega * B_w (B_w = ``weight_coordinate_bound``) so the server learns only
     sum(omega x) and sum(omega); the encoded float vector has L2 norm
     <= sqrt(l2_clip^2 + B_w^2);
  4. scale by ``scale`` and round stochastically (unbiased); with DP, *conditional*
     randomized rounding (KLS21 §4.1): re-round until ||x~||^2 <= Delta_2^2 (KLS21 eq. (13)),
     so the integer sensitivity used by the accountant holds with certainty;
  5. add discrete Gaussian noise N_Z(0, (scale * sigma_total)^2 / m) per coordinate;
  6. reduce mod 2^b.

Random rotation (KLS21's flattening via a randomized Hadamard transform) is NOT applied.
KLS21 need it because they size the ring from a high-probability bound on each coordinate
(~ c / sqrt(d) after rotation) and accept modular wrap-around as a small failure probability.
We size the ring from the deterministic bound |coordinate| <= B that clipping guarantees
(sum of n clients cannot wrap), so rotation would not change overflow safety; it would only
let a smaller b reach the same precision. The accounting is unaffected: the sensitivity
Delta_2 is enforced by conditional rounding on the unrotated vector and the rotation is an
isometry in KLS21's analysis anyway. The price is precision at small b: with b = 32 and
n = 50 the quantization step is ~B * 50 / 2^31, i.e. ~23 bits per coordinate of relative
precision, plenty for FL updates; b = 16 is usable only for small n.

Scale: with per-client |x~_j| <= scale * B + 1 and noise headroom h = z * scale * sigma_total
* sqrt(n/m) (n survivors each add variance (scale sigma_total)^2/m),
    n (scale B + 1) + h <= 2^(b-1) - 1
so the signed sum of all n clients lies in [-2^(b-1), 2^(b-1)) and decodes exactly, except
with probability <= 2 exp(-z^2/2) per coordinate from the noise tail. The scale is further
capped so scale * B <= 2^52 (float64 rounding stays exact) and the per-client noise std in
integer units stays <= 2^40 (range of the vectorised sampler).
"""

from __future__ import annotations

import math

import numpy as np

from .config import SecAggConfig
from .discrete_gaussian import sample_discrete_gaussian
from .errors import SecAggValidationError
from .prg import PURPOSE_ROUNDING, ChaChaStream


def clip_l2(x: np.ndarray, bound: float) -> np.ndarray:
    """x * min(1, bound / ||x||_2) in float64."""
    norm = float(np.linalg.norm(x))
    return x * (bound / norm) if norm > bound else x


def ring_scale(config: SecAggConfig) -> float:
    """Largest scale for which the sum of ``num_clients`` encodings cannot wrap (see module
    docstring); raises if the ring is too small to represent even one quantization level."""
    n = config.num_clients
    bound = config.coordinate_bound
    half = float(2 ** (config.bits - 1) - 1 - n)
    denom = n * bound
    if config.noise_stddev is not None:
        denom += (
            config.noise_headroom_sigmas * config.noise_stddev * math.sqrt(n / config.min_survivors)
        )
    # 1 - 2^-20 keeps float64 rounding of the products below from crossing the bound
    scale = half / denom * (1 - 2.0**-20)
    scale = min(scale, 2.0**52 / bound)
    if config.local_noise_stddev is not None:
        scale = min(scale, 2.0**40 / config.local_noise_stddev)
    if not scale * bound >= 1:
        raise SecAggValidationError(
            f"SecAggConfig.bits={config.bits} is too small for num_clients={n}"
            f" with coordinate bound {bound} and the noise headroom: fewer than one"
            " quantization level per coordinate; raise bits"
        )
    return scale


def rounding_l2_bound(scaled_norm: float, dim: int, beta: float) -> float:
    """Delta_2 of KLS21 eq. (13): with probability >= 1 - beta, randomized rounding of a
    vector of norm <= ``scaled_norm`` in ``dim`` dimensions has norm <= this bound (and
    always <= scaled_norm + sqrt(dim))."""
    c = scaled_norm
    sq = c * c + dim / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + math.sqrt(dim) / 2.0)
    return min(math.sqrt(sq), c + math.sqrt(dim))


def stochastic_round(v: np.ndarray, stream: ChaChaStream) -> np.ndarray:
    """Randomized rounding: floor(v) + Bernoulli(p), as int64, p = floor(frac * 2^32) / 2^32.

    One 32-bit keystream word per coordinate compared in integers (half the keystream and
    none of the float conversion of a 53-bit uniform; it was most of the encoding time at
    22.6M coordinates). p is below the fractional part by less than 2^-32: a bias of at
    most 2^-32 quantization steps per coordinate, far below the rounding noise itself."""
    low = np.floor(v)
    threshold = ((v - low) * 2.0**32).astype(np.uint64)
    up = stream.uint32(v.size).astype(np.uint64) < threshold
    return low.astype(np.int64) + up


def to_ring(values: np.ndarray, config: SecAggConfig) -> np.ndarray:
    """Signed int64 -> Z_{2^b} in the config's unsigned dtype (two's complement wrap)."""
    ring = values.astype(np.uint64).astype(config.dtype, copy=False)
    if config.bits not in (32, 64):
        ring &= config.dtype(config.ring_mask)
    return ring


def from_ring(ring: np.ndarray, config: SecAggConfig) -> np.ndarray:
    """Z_{2^b} -> centered signed representatives in [-2^(b-1), 2^(b-1)) as int64."""
    # shift the b-bit value to the top of a 64-bit word, reinterpret as signed and shift back
    # arithmetically: sign extension without any constant that overflows int64
    shift = np.uint64(64 - config.bits)
    top = ring.astype(np.uint64) << shift
    return top.view(np.int64) >> np.int64(64 - config.bits)


def validate_update(update: object, length: int) -> np.ndarray:
    """Return ``update`` as float64 after checking type, dtype, shape and finiteness."""
    if not isinstance(update, np.ndarray):
        raise SecAggValidationError(f"update must be a numpy array, got {type(update).__name__}")
    if not np.issubdtype(update.dtype, np.floating):
        raise SecAggValidationError(
            f"update has dtype {update.dtype}; a floating-point dtype (float32/float64) is required"
        )
    if update.ndim != 1 or update.shape[0] != length:
        raise SecAggValidationError(
            f"update has shape {update.shape}; expected a flat vector of length {length}"
        )
    finite = np.isfinite(update)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise SecAggValidationError(
            f"update has {bad.size} non-finite value(s) (NaN/inf), first at index {int(bad[0])}"
        )
    return update.astype(np.float64, copy=False)


class UpdateEncoder:
    """Float update <-> ring vector for one session configuration."""

    def __init__(self, config: SecAggConfig) -> None:
        self.config = config
        self.scale = ring_scale(config)
        self.dim = config.encoded_length
        # norm of the encoded float vector (update part + weight coordinate)
        self.float_norm_bound = (
            math.hypot(config.l2_clip, config.weight_bound) if config.l2_clip is not None else None
        )
        self.l2_sensitivity = (
            rounding_l2_bound(self.scale * self.float_norm_bound, self.dim, config.rounding_beta)
            if self.float_norm_bound is not None
            else None
        )

    @property
    def step(self) -> float:
        """Quantization step in update units."""
        return 1.0 / self.scale

    @property
    def local_noise_sigma_int(self) -> float | None:
        """Per-client discrete Gaussian parameter in integer (scaled) units."""
        s = self.config.local_noise_stddev
        return None if s is None else s * self.scale

    def sum_error_bound(self, num_summed: int) -> float:
        """Max |decoded - exact| per coordinate of the weighted sum from rounding alone
        (each client's randomized rounding moves each coordinate by < one step, times
        ``max_weight`` because decode rescales to weight units)."""
        return num_summed * self.step * self.config.max_weight

    def encode(
        self,
        update: np.ndarray,
        weight: float,
        *,
        noise_stream: ChaChaStream | None = None,
        rounding_stream: ChaChaStream | None = None,
    ) -> np.ndarray:
        cfg = self.config
        x = validate_update(update, cfg.vector_length)
        if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
            raise SecAggValidationError(f"weight must be a finite number >= 0, got {weight!r}")
        if cfg.l2_clip is not None:
            x = clip_l2(x, cfg.l2_clip)
        omega = min(float(weight), cfg.max_weight) / cfg.max_weight
        encoded = np.empty(self.dim, dtype=np.float64)
        np.clip(x, -cfg.coord_clip, cfg.coord_clip, out=encoded[:-1])
        encoded[:-1] *= omega * self.scale
        encoded[-1] = omega * cfg.weight_bound * self.scale
        rounding_stream = rounding_stream or ChaChaStream(purpose=PURPOSE_ROUNDING)
        rounded = stochastic_round(encoded, rounding_stream)
        if self.l2_sensitivity is not None:
            # conditional randomized rounding (KLS21 §4.1): expected 1/(1-beta) tries
            limit_sq = self.l2_sensitivity**2
            for _ in range(1000):
                if (
                    float(np.dot(rounded.astype(np.float64), rounded.astype(np.float64)))
                    <= limit_sq
                ):
                    break
                rounded = stochastic_round(encoded, rounding_stream)
            else:  # probability beta^1000: effectively impossible
                raise SecAggValidationError("conditional randomized rounding did not converge")
        del encoded
        sigma = self.local_noise_sigma_int
        if sigma is not None:
            rounded += sample_discrete_gaussian(sigma, self.dim, noise_stream)
        return to_ring(rounded, cfg)

    def decode(self, ring_sum: np.ndarray) -> tuple[np.ndarray, float]:
        """Ring sum -> (sum_i w_i x_i, sum_i w_i) in update and weight units
        (w_i = min(weight_i, max_weight)), noise included."""
        signed = from_ring(ring_sum, self.config).astype(np.float64)
        signed *= self.step
        w = self.config.max_weight
        total_weight = signed[-1] / self.config.weight_bound * w
        return signed[:-1] * w, float(total_weight)
