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

* :func:`sample_discrete_gaussian` - the same algorithm vectorised in numpy for the bulk noise
  (~20M coordinates per client). Its float64 approximation, and why it is acceptable:
    - the discrete Laplace is drawn as a geometric G = floor(-t ln U) with a random sign,
      rejecting (G = 0, sign = -), which is CKS Algorithm 2's distribution; U is uniform on
      (0, 1] with 53-bit resolution, so G is computed with relative error ~2^-52 and its tail
      is cut at 36.7 t (probability e^-36.7 < 2^-52);
    - the acceptance test compares a 53-bit uniform with exp(.) evaluated in float64
      (relative error ~2^-52).
  Each proposal's probabilities are therefore within ~2^-50 (additively) of the exact ones,
  and the sampler's output is within total-variation distance ~2^-49 of N_Z(0, sigma^2) per
  coordinate, i.e. <= d * 2^-49 for a d-dimensional vector (~4e-8 for d = 22.7M). A mechanism
  within TV distance eta of an (eps, delta)-DP one is (eps, delta + eta * (1 + e^eps))-DP;
  with the delta values used in FL (>= 1e-6) this is far below the rounding of the reported
  epsilon, which is why the bulk path uses floats (the same choice as the authors' own
  implementation in TensorFlow Federated). The output is an integer, so the
  least-significant-bit attack on floating-point Laplace noise (Mironov 2012) does not apply.
  Randomness comes from a ChaCha20 keystream (:class:`ChaChaStream`), never from a numpy
  PRNG, because predictable noise could be subtracted by the server.
"""

from __future__ import annotations

import math
import secrets
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


def sample_discrete_gaussian(
    sigma: float, size: int, stream: ChaChaStream | None = None, *, chunk: int = 1 << 22
) -> np.ndarray:
    """``size`` samples of N_Z(0, sigma^2) as int64, vectorised (CKS Algorithm 3 in batches).

    ``sigma`` is the standard-deviation parameter of the discrete Gaussian (in integer
    units). Work is done in chunks of ``chunk`` coordinates to bound temporary memory.
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be positive and finite, got {sigma}")
    if sigma > 2.0**40:
        raise ValueError("sigma above 2^40 would lose integer precision in float64")
    stream = stream if stream is not None else ChaChaStream()
    out = np.empty(size, dtype=np.int64)
    filled = 0
    t = math.floor(sigma) + 1
    sigma2 = sigma * sigma
    center = sigma2 / t
    # acceptance rate of Algorithm 3 is >= ~0.7 for sigma >= 1 (CKS §5.3); draw a little more
    # than needed so most chunks finish in one pass.
    while filled < size:
        need = min(size - filled, chunk)
        batch = int(need * 1.45) + 64
        u = stream.uniform_open0(batch)
        g = np.floor(-t * np.log(u))  # geometric: P[G >= k] = exp(-k/t)
        negative = stream.bits(batch)
        keep = ~(negative & (g == 0))  # Algorithm 2: reject "-0" so 0 is not double-counted
        # Algorithm 3 acceptance: Bernoulli(exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)))
        accept_p = np.exp(-np.square(g - center) / (2.0 * sigma2))
        keep &= stream.uniform01(batch) < accept_p
        y = g[keep]
        y = np.where(negative[keep], -y, y).astype(np.int64)
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
