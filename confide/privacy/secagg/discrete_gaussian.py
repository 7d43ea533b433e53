"""Discrete Gaussian N_Z(0, sigma^2) sampling (Canonne, Kamath, Steinke 2020, "The Discrete
Gaussian for Differential Privacy", Algorithms 1-3).

The discrete Gaussian has pmf P[X = x] ∝ exp(-x^2 / (2 sigma^2)) on the integers. Clients of
the distributed DP mechanism (Kairouz, Liu, Steinke 2021) add it to their quantized update
before masking; integers are closed under the ring arithmetic of secure aggregation, so the
noise survives aggregation exactly.

Two samplers implement the same rejection scheme (CKS Algorithm 3): propose Y from the
discrete Laplace with scale t = floor(sigma) + 1 (Algorithm 2), accept with probability
exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)).

* :func:`sample_discrete_gaussian_exact` - the paper's algorithm verbatim, with exact rational
  arithmetic (``fractions.Fraction``) and ``secrets.randbelow`` for every Bernoulli trial. Its
  output distribution is exactly N_Z(0, sigma^2). It is a scalar Python loop (~10^4
  samples/s), kept as the reference and for auditing/tests.

* :func:`sample_discrete_gaussian` - the same algorithm vectorised in numpy for the bulk noise.
  It follows CKS Algorithm 2 step by step (U uniform on {0..t-1} from exact integer
  rejection sampling, kept with probability exp(-U/t); V counts Bernoulli(e^-1) successes by
  exact integer comparisons; Y = +-(U + t V)), so the precision of no step depends on sigma.
  Each Bernoulli(exp(-x)) compares an exactly uniform 64-bit fraction with exp(-x) in long
  double (64-bit significand on x86-64), deciding in float64 wherever float64 cannot be
  wrong. :func:`sampler_tv_per_sample` bounds the total-variation distance of one output to
  N_Z(0, sigma^2) (~5.2e-18 with x86-64 long doubles, any sigma <= 2^40); a mechanism
  within TV eta of an (eps, delta)-DP one is (eps, delta + eta (1 + e^eps))-DP, and the
  shared-noise mode records its slack per round and states that delta. (The earlier float64
  geometric floor(-t ln U), U on a 2^-53 grid, was off by ~2^-53 in each of ~37 t integer
  buckets: ~4e-9 per coordinate at t = 1e6, not the 2^-49 it claimed.) The output is an
  integer, so the least-significant-bit attack on floating-point Laplace noise (Mironov
  2012) does not apply. Randomness comes from a ChaCha20 keystream (:class:`ChaChaStream`),
  never from a numpy PRNG, because predictable noise could be subtracted by the server.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from fractions import Fraction

import numpy as np

from .prg import ChaChaStream

# ---------------------------------------------------------------------------------------
# exact reference sampler (CKS 2020 Algorithms 1-3, exact rational arithmetic)


def _bernoulli(p: Fraction) -> bool:
    return secrets.randbelow(p.denominator) < p.numerator


def _bernoulli_exp_neg(gamma: Fraction) -> bool:
    """Bernoulli(exp(-gamma)) for rational gamma >= 0 (CKS Algorithm 1)."""
    while gamma > 1:  # exp(-gamma) = exp(-1)^floor(gamma) * exp(-frac)
        if not _bernoulli_exp_neg(Fraction(1)):
            return False
        gamma -= 1
    k = 1
    while _bernoulli(gamma / k):
        k += 1
    return k % 2 == 1


def _discrete_laplace_exact(t: int) -> int:
    """P[X = x] ∝ exp(-|x| / t) for integer t >= 1 (CKS Algorithm 2)."""
    while True:
        u = secrets.randbelow(t)
        if not _bernoulli_exp_neg(Fraction(u, t)):
            continue
        v = 0
        while _bernoulli_exp_neg(Fraction(1)):
            v += 1
        x = u + t * v
        negative = secrets.randbelow(2) == 1
        if negative and x == 0:
            continue
        return -x if negative else x


def sample_discrete_gaussian_exact(sigma2: Fraction | int, size: int) -> np.ndarray:
    """``size`` exact samples of N_Z(0, sigma2) for rational ``sigma2`` > 0 (CKS Algorithm 3)."""
    sigma2 = Fraction(sigma2)
    if sigma2 <= 0:
        raise ValueError("sigma2 must be positive")
    t = math.isqrt(sigma2.numerator // sigma2.denominator) + 1  # floor(sigma) + 1
    out = np.empty(size, dtype=np.int64)
    for i in range(size):
        while True:
            y = _discrete_laplace_exact(t)
            gamma = (abs(y) - sigma2 / t) ** 2 / (2 * sigma2)
            if _bernoulli_exp_neg(gamma):
                out[i] = y
                break
    return out


# ---------------------------------------------------------------------------------------
# vectorised sampler (same algorithm, float64 probabilities; see module docstring)


# Bits of the significand of numpy's long double on this platform: 64 on x86-64 (x87
# extended precision), 113 where long double is IEEE quad, 53 where it is plain double
# (e.g. macOS on arm64). Every probability comparison of the sampler is decided at this
# precision, and the total-variation bound below is stated for it.
_LD = np.longdouble
SIGNIFICAND_BITS = int(np.finfo(_LD).nmant) + 1
_TWO64 = _LD(2) ** 64
# Decisions are made in float64 wherever float64 cannot be wrong, and in long double only
# inside a band of ~2^-40 (relative) around each decision boundary: almost never. The
# result is the long-double decision at close to float64 speed.
_BAND = 2.0**-40


def sampler_tv_per_sample(significand_bits: int = SIGNIFICAND_BITS) -> float:
    """A bound on the total-variation distance between one output of
    :func:`sample_discrete_gaussian` and exact N_Z(0, sigma^2), for 1 <= sigma <= 2^40.

    One proposal of CKS Algorithms 2 + 3: U uniform on {0..t-1} and the sign are exact
    (integer rejection sampling); each of the two Bernoulli(exp(-x)) tests compares an exactly
    uniform 64-bit fraction with exp(-x) at p = ``significand_bits`` bits: absolute error <=
    2^-64 + 4 * 2^-p; the geometric V counts Bernoulli(e^-1) trials, each an exact integer
    comparison off by < 2^-64, 1 / (1 - e^-1) < 2 trials expected: TV <= 2 * 2^-64. So one
    proposal is within TV e_p <= 2 (2^-64 + 4 * 2^-p) + 2 * 2^-64. Rejection sampling with
    acceptance probability A turns it into an output TV <= 2 e_p / A; A >= 0.25 for
    sigma >= 1 (about 0.63 x 0.7, CKS section 5.3; measured in the tests). None of this
    depends on sigma: the earlier sampler's geometric floor(-t ln U), U on a 2^-53 grid, was
    off by up to 2^-53 in each of its ~37 t integer buckets, ~37 t 2^-53 in all (4e-9 at
    t = 1e6), where its docstring claimed 2^-49.
    """
    e_p = 2 * (2.0**-64 + 4 * 2.0**-significand_bits) + 2 * 2.0**-64
    return 8.0 * e_p


def _uniform_below(t: int, size: int, stream: ChaChaStream) -> np.ndarray:
    """``size`` exactly uniform integers in [0, t) (64-bit draws, the top partial block of
    residues rejected)."""
    limit = (2**64 // t) * t
    out = np.empty(size, dtype=np.uint64)
    filled = 0
    while filled < size:
        raw = stream.uint64(size - filled)
        if limit < 2**64:
            raw = raw[raw < np.uint64(limit)]
        got = raw % np.uint64(t)
        out[filled:filled + got.size] = got
        filled += got.size
    return out.astype(np.int64)


def _bernoulli_exp_neg_vec(x64: np.ndarray, x_ld: Callable[[np.ndarray], np.ndarray],
                           stream: ChaChaStream) -> np.ndarray:
    """Bernoulli(exp(-x)) element-wise for x >= 0, given in float64 (``x64``, relative error
    <= 2^-50) and, on demand, in long double (``x_ld(indices)``): an exactly uniform 64-bit
    fraction compared with exp(-x) at long-double precision."""
    r = stream.uint64(x64.size)
    low = (r >> np.uint64(11)).astype(np.float64) * 2.0**-53  # fraction in [low, low + 2^-53)
    p = np.exp(-x64)
    margin = p * (_BAND * (1.0 + x64)) + 2.0**-52
    accept = low + 2.0**-53 <= p - margin
    unsure = ~accept & (low < p + margin)
    if unsure.any():
        idx = np.flatnonzero(unsure)
        accept[idx] = r[idx].astype(_LD) / _TWO64 < np.exp(-x_ld(idx))
    return accept


def _exp_neg_one_threshold() -> int:
    """floor(e^-1 * 2^64), exactly (50 significant digits)."""
    from decimal import Decimal, localcontext

    with localcontext() as ctx:
        ctx.prec = 50
        return int(Decimal(-1).exp() * (2**64))


_EXP_NEG_ONE_64 = np.uint64(_exp_neg_one_threshold())


def _geometric_e(size: int, stream: ChaChaStream) -> np.ndarray:
    """V with P[V >= v] = e^-v (v = 0, 1, ...): the number of successes before the first
    failure of Bernoulli(e^-1) trials (CKS Algorithm 2), each an exact comparison of a
    64-bit integer with floor(e^-1 2^64) (off by < 2^-64 per trial)."""
    v = np.zeros(size, dtype=np.int64)
    active = np.arange(size)
    while active.size:
        success = stream.uint64(active.size) < _EXP_NEG_ONE_64
        active = active[success]
        v[active] += 1
    return v


def sample_discrete_gaussian(
    sigma: float, size: int, stream: ChaChaStream | None = None, *, chunk: int = 1 << 20
) -> np.ndarray:
    """``size`` samples of N_Z(0, sigma^2) as int64, vectorised (CKS Algorithms 2 and 3).

    ``sigma`` is the standard-deviation parameter of the discrete Gaussian (in integer
    units), up to 2^40. The discrete Laplace proposal is built as CKS Algorithm 2 builds it,
    Y = +-(U + t V) with U uniform on {0..t-1} (exact integers) kept with probability
    exp(-U/t) and V geometric with parameter e^-1, so no step's precision depends on sigma;
    every probability is decided at long-double precision (:func:`sampler_tv_per_sample`
    bounds the distance to the exact law). Work is done in chunks of ``chunk`` coordinates
    to bound temporary memory.
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be positive and finite, got {sigma}")
    if sigma > 2.0**40:
        raise ValueError("sigma above 2^40 is outside the sampler's stated precision")
    stream = stream if stream is not None else ChaChaStream()
    out = np.empty(size, dtype=np.int64)
    filled = 0
    t = math.floor(sigma) + 1
    sigma_ld, t_ld = _LD(sigma), _LD(t)
    center, center_ld = sigma * sigma / t, sigma_ld * sigma_ld / t_ld
    while filled < size:
        need = min(size - filled, chunk)
        batch = int(need * 2.6) + 64  # acceptance >= ~0.44 for sigma >= 1
        u = _uniform_below(t, batch, stream)
        # Algorithm 2, step 1: keep U with probability exp(-U/t)
        keep = _bernoulli_exp_neg_vec(u / t, lambda i, u=u: u[i].astype(_LD) / t_ld,  # type: ignore[misc]  # default args
                                      stream)
        u = u[keep]
        magnitude = u + t * _geometric_e(u.size, stream)  # U + t V
        negative = stream.bits(u.size)
        keep = ~(negative & (magnitude == 0))  # Algorithm 2: "-0" is rejected
        magnitude, negative = magnitude[keep], negative[keep]
        # Algorithm 3: accept with probability exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2))
        gamma = np.square(magnitude - center) / (2.0 * sigma * sigma)
        keep = _bernoulli_exp_neg_vec(
            gamma, lambda i, m=magnitude: np.square(m[i].astype(_LD) - center_ld)  # type: ignore[misc]  # default args
            / (2 * sigma_ld * sigma_ld), stream)
        y = np.where(negative[keep], -magnitude[keep], magnitude[keep])
        take = min(need, y.size)
        out[filled : filled + take] = y[:take]
        filled += take
    return out


def discrete_gaussian_pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    """Exact pmf of N_Z(0, sigma^2) on ``support`` (normalised over |x| <= 60 sigma + 60)."""
    radius = int(60 * sigma) + 60
    grid = np.arange(-radius, radius + 1, dtype=np.float64)
    norm = np.exp(-np.square(grid) / (2 * sigma * sigma)).sum()
    return np.exp(-np.square(support.astype(np.float64)) / (2 * sigma * sigma)) / norm


def discrete_gaussian_variance(sigma: float) -> float:
    """Variance of N_Z(0, sigma^2) (slightly below sigma^2 for small sigma)."""
    radius = int(60 * sigma) + 60
    grid = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-np.square(grid) / (2 * sigma * sigma))
    return float((w * grid * grid).sum() / w.sum())
