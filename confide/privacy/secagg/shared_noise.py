"""Example-level DP-SGD with the noise shared inside the secure sum (transport-free core).

Each sampled partner i of a round Poisson-samples its records at rate q_i, clips every
per-example gradient to L2 norm C, and enters into the secure sum

    y_i = sum_{x in B_i} R(x) + N_Z(0, sigma_int^2)^d        (integer vector, ring Z_{2^b})

where R(x) is the *conditionally randomized rounding* of scale * g(x) (Kairouz, Liu, Steinke
2021, eq. (13): re-round until ||R(x)||_2 <= D2), applied to each example separately. The
server only learns sum_i y_i, decodes it (divide by ``scale``), divides by the expected
total batch sum_i q_i n_i and takes a server-optimizer step (post-processing).

Why round each example separately: adding or removing one record then shifts the integer
sum by exactly one vector R(x) with ||R(x)||_2 <= D2 with certainty, whatever the other
records are (the other records' roundings are independent of it). Rounding the partner's
*sum* once would not give a clean shift. The rounding randomness of x is independent of
everything else, so the mixture over it is no worse than its worst value (joint convexity of
the hockey-stick divergence).

Noise and accounting (per partner, one Poisson-subsampled Gaussian step per round):

* **Quantisation is paid by inflating sigma**: sigma_int = sigma * D2 / sqrt(m), so m
  honest shares carry integer std sqrt(m) sigma_int = sigma * D2: noise multiplier exactly
  sigma with respect to the *integer* sensitivity D2 (which is slightly larger than
  scale * C because of rounding). m = min_survivors - colluders: the protocol never
  unmasks a sum of fewer than min_survivors inputs (a client refuses such an unmask
  request), and colluding partners know (and can subtract) their own shares.
* **Discrete vs continuous Gaussian: total-variation slack, added to delta.** For an
  integer vector S, S + round(Z), Z ~ N(0, s^2 I), equals round(S + Z): post-processing of
  the continuous Gaussian mechanism with multiplier s / D2 >= sigma (s^2 = h sigma_int^2 for
  h >= m honest shares). The actual noise differs from round(Z) per coordinate by at most
  (TV): the sampler's slack (:func:`.discrete_gaussian.sampler_tv_per_sample`, ~5.2e-18 per
  coordinate and share with x86-64 long doubles, independent of sigma; n shares), the sum
  of n discrete Gaussians vs one (KLS21 tau, :func:`.ddg_accounting.ddg_tau`)
  and the discrete vs rounded continuous Gaussian, <= 1/(24 s^2) (asymptotically
  0.0202 / s^2; checked numerically for s >= 1 in the tests). Over d coordinates and the
  T rounds a partner trains in, the released sums are within TV eta = sum of the per-round
  values (:func:`tv_slack`) of a mechanism that is (epsilon, delta)-DP by the Gaussian PLD
  accountant; as a plain (epsilon, delta') statement, delta' = delta + (1 + e^epsilon) eta.
* **A fixed physical budget per round; truncation added to the slack.** The time a
  partner takes for its round must not depend on its Poisson sample (the sample size is
  what the amplification by subsampling hides: an exactly revealed size turns the
  sensitivity C into 2C). So the node processes exactly :func:`padded_slots` example slots
  every round, a number fixed by public values only (its public row count N_pub, see
  ``confide.clients.disclosure``, and the rate q): its sampled records, then padding rows
  whose clipped gradients are multiplied by zero (same shapes, same work, nothing added to
  the sum). A sample larger than the budget is truncated to a uniformly random subset of
  that size. The truncated mechanism equals the Poisson one unless the sample exceeds the
  budget, so on every data set of at most N_pub + 1 records (the partner's and each of its
  neighbours) it is within TV eta_trunc = P(Binomial(N_pub + 1, q) > slots) of it
  (:func:`binomial_tail`, exact). The node picks the smallest budget with
  eta_trunc <= ``TRUNCATION_TAIL`` (1e-12 per round) and adds its eta_trunc to the round's
  recorded ``tv_slack`` (:meth:`SharedNoiseConfig.mechanism`), so the plain statement
  delta + (1 + e^epsilon) eta below covers it: at epsilon 8 over 60 rounds it adds at most
  1.8e-7 to delta. The budget is about the expected sample plus 7 standard deviations
  (e.g. 256 expected of 5,000 records: ~370 slots, the price of a constant round time).
* Ring: the total over all survivors cannot wrap: per coordinate
  N (scale C + 1) + z * total noise std <= 2^(b-1) - 1, with N a deterministic bound on the
  number of examples in the round (the cohort's record count) and z = 12 (noise tail
  probability <= 2 exp(-z^2/2); a wrap only changes the decoded value, post-processing).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from confide.privacy.mechanisms import SharedNoiseSampledGaussian

from .ddg_accounting import ddg_tau
from .discrete_gaussian import sample_discrete_gaussian, sampler_tv_per_sample
from .errors import SecAggValidationError
from .prg import PURPOSE_ROUNDING, ChaChaStream
from .quantize import from_ring, rounding_l2_bound, stochastic_round

SHARED_NOISE = "shared"
MAX_SCALED = 2.0**52  # float64 integers stay exact
MAX_LOCAL_SIGMA = 2.0**40  # range of the vectorised sampler
# Largest per-round probability that a Poisson sample exceeds the padded budget (module
# docstring): each round's exact value is added to its recorded tv_slack.
TRUNCATION_TAIL = 1e-12


def _fail(name: str, value: object, allowed: str) -> SecAggValidationError:
    return SecAggValidationError(f"SharedNoiseConfig.{name}={value!r} is invalid: allowed "
                                 f"{allowed}")


@dataclass(frozen=True)
class SharedNoiseConfig:
    """Parameters of one round of shared-noise example-level DP (all parties agree on them;
    the derived scale, D2 and sigma_int are recomputed by each party, never trusted).

    * ``clip`` (C): per-example L2 clip norm.
    * ``noise_multiplier`` (sigma): total noise multiplier of the sum, relative to the
      per-example (integer) sensitivity.
    * ``num_clients`` (n), ``min_survivors``: of the round's SecAggConfig.
    * ``colluders`` (c): partners assumed to collude with the server (they know their own
      noise); m = min_survivors - c honest shares are accounted.
    * ``max_examples`` (N): a deterministic bound on the examples of all partners in the
      round (each partner samples at most its n_i records), sizes the ring.
    * ``vector_length`` (d), ``bits`` (b): the ring vector is d + 1 long (SecAgg's weight
      coordinate, left 0 here).
    """

    clip: float
    noise_multiplier: float
    num_clients: int
    min_survivors: int
    colluders: int
    max_examples: int
    vector_length: int
    bits: int
    noise_headroom_sigmas: float = 12.0
    rounding_beta: float = math.exp(-0.5)
    # The Poisson rate every partner samples its records at this run (one rate for all: the
    # released sum is then exactly central DP-SGD's noisy step on the union of the records,
    # and every partner spends the same epsilon); 0 = each partner's own batch-size / n_i.
    sample_rate: float = 0.0
    # derived in __post_init__
    scale: float = field(init=False)
    l2_sensitivity: float = field(init=False)
    local_sigma: float = field(init=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise _fail("clip", self.clip, "a positive finite number")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise _fail("noise_multiplier", self.noise_multiplier, "a positive finite number")
        if not isinstance(self.num_clients, int) or self.num_clients < 2:
            raise _fail("num_clients", self.num_clients, "an integer >= 2")
        if not isinstance(self.min_survivors, int) \
                or not 1 <= self.min_survivors <= self.num_clients:
            raise _fail("min_survivors", self.min_survivors, f"1..{self.num_clients}")
        if not isinstance(self.colluders, int) or not 0 <= self.colluders < self.min_survivors:
            raise _fail("colluders", self.colluders,
                        f"0 <= c < min_survivors = {self.min_survivors} (at least one honest "
                        "noise share must remain; lower dp-colluders or raise "
                        "secagg-threshold)")
        if not isinstance(self.max_examples, int) or self.max_examples < 1:
            raise _fail("max_examples", self.max_examples, "an integer >= 1")
        if not isinstance(self.vector_length, int) or self.vector_length < 1:
            raise _fail("vector_length", self.vector_length, "an integer >= 1")
        if not isinstance(self.bits, int) or not 16 <= self.bits <= 64:
            raise _fail("bits", self.bits, "an integer in [16, 64]")
        if not (isinstance(self.sample_rate, int | float) and 0 <= self.sample_rate <= 1):
            raise _fail("sample_rate", self.sample_rate, "0 (per partner) or 0 < q <= 1")
        scale = self._scale()
        d2 = rounding_l2_bound(scale * self.clip, self.vector_length, self.rounding_beta)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "l2_sensitivity", d2)
        # quantisation paid by inflating sigma: m shares give std sigma * D2 exactly
        object.__setattr__(self, "local_sigma", self.noise_multiplier * d2 / math.sqrt(self.m))

    @property
    def m(self) -> int:
        """Honest noise shares the accounting assumes: min_survivors - colluders."""
        return self.min_survivors - self.colluders

    @property
    def dim(self) -> int:
        return self.vector_length + 1

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint32 if self.bits <= 32 else np.uint64

    def _scale(self) -> float:
        """Largest scale for which the ring sum cannot wrap (module docstring). D2 <=
        scale C + sqrt(d) bounds the noise std before the scale is known."""
        n, m, big_n, c = self.num_clients, self.m, self.max_examples, self.clip
        zs = self.noise_headroom_sigmas * self.noise_multiplier * math.sqrt(n / m)
        half = float(2 ** (self.bits - 1) - 1)
        a = (half - big_n - zs * math.sqrt(self.vector_length)) / (big_n + zs)
        a = min(a * (1 - 2.0**-20), MAX_SCALED,
                MAX_LOCAL_SIGMA * math.sqrt(m) / self.noise_multiplier
                - math.sqrt(self.vector_length))
        if not a >= 1:
            raise SecAggValidationError(
                f"secagg-bits = {self.bits} is too small for {big_n} examples in a round with "
                f"noise multiplier {self.noise_multiplier}: fewer than one quantization level "
                "per example; raise secagg-bits")
        return a / c

    @property
    def effective_noise_multiplier(self) -> float:
        """sqrt(m) sigma_int / D2: the multiplier the accountant uses (= sigma up to float
        rounding)."""
        return math.sqrt(self.m) * self.local_sigma / self.l2_sensitivity

    def tv_slack(self) -> float:
        """Per-round total-variation distance of the released sum from the rounded continuous
        Gaussian mechanism (module docstring), over all d + 1 coordinates."""
        s2 = self.m * self.local_sigma**2
        per_coordinate = (self.num_clients * sampler_tv_per_sample()
                          + ddg_tau(self.local_sigma, self.num_clients)
                          + 1.0 / (24.0 * s2))
        return self.dim * per_coordinate

    def mechanism(self, sample_rate: float, truncation_tail: float = 0.0
                  ) -> SharedNoiseSampledGaussian:
        """A partner's mechanism event for this round, sampling its records at
        `sample_rate`: one step with the effective multiplier over m honest shares.
        `truncation_tail`: the probability that its sample exceeded its padded budget
        (:func:`padded_slots`), added to the round's TV slack."""
        if not (math.isfinite(truncation_tail) and 0 <= truncation_tail <= 1):
            raise SecAggValidationError(f"truncation_tail = {truncation_tail!r} is not a "
                                        "probability")
        return SharedNoiseSampledGaussian(
            self.effective_noise_multiplier, sample_rate, 1, noise_shares=self.m,
            colluders=self.colluders, tv_slack=self.tv_slack() + truncation_tail)

    # -- wire -------------------------------------------------------------------------
    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items()
                if k not in ("scale", "l2_sensitivity", "local_sigma")}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SharedNoiseConfig:
        try:
            data = json.loads(text)
            return cls(**data)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, SecAggValidationError):
                raise
            raise SecAggValidationError(f"unreadable shared-noise parameters: {exc}") from None


def binomial_tail(n: int, q: float, b: int) -> float:
    """P(Binomial(n, q) > b), exact up to float rounding: the probability mass terms from
    b + 1 on, summed until they no longer change the total (they fall geometrically past
    the mode)."""
    if not isinstance(n, int) or n < 0 or not isinstance(b, int):
        raise SecAggValidationError(f"binomial_tail: n = {n!r}, b = {b!r} must be integers, "
                                    "n >= 0")
    if not 0 <= q <= 1:
        raise SecAggValidationError(f"binomial_tail: q = {q!r} is not in [0, 1]")
    if b >= n or q == 0:
        return 0.0
    if b < 0 or q == 1:
        return 1.0
    k = b + 1
    log_ratio = math.log(q) - math.log1p(-q)
    log_term = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                + k * math.log(q) + (n - k) * math.log1p(-q))
    mode = (n + 1) * q
    total = 0.0
    while k <= n:
        term = math.exp(log_term)
        total += term
        if k > mode and term <= total * 1e-18:
            break
        log_term += math.log((n - k) / (k + 1)) + log_ratio if k < n else 0.0
        k += 1
    return min(1.0, total)


def padded_slots(public_rows: int, sample_rate: float, tail: float = TRUNCATION_TAIL
                 ) -> tuple[int, float]:
    """The fixed number of example slots a partner processes each round (module docstring),
    and the probability that a Poisson sample at `sample_rate` of any data set of at most
    `public_rows` + 1 records (the partner's or a neighbour's) exceeds it: the smallest
    budget whose probability is at most `tail`, with that probability."""
    if not isinstance(public_rows, int) or public_rows < 1:
        raise SecAggValidationError(f"padded_slots: public_rows = {public_rows!r} must be an "
                                    "integer >= 1")
    if not 0 < sample_rate <= 1:
        raise SecAggValidationError(f"padded_slots: sample_rate = {sample_rate!r} is not in "
                                    "(0, 1]")
    if not 0 < tail < 1:
        raise SecAggValidationError(f"padded_slots: tail = {tail!r} is not in (0, 1)")
    n = public_rows + 1  # a neighbouring data set holds one record more
    lo, hi = max(0, math.floor(n * sample_rate) - 1), n  # tail(lo) > tail >= tail(hi) = 0
    while binomial_tail(n, sample_rate, lo) <= tail and lo > 0:
        lo = lo // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if binomial_tail(n, sample_rate, mid) <= tail:
            hi = mid
        else:
            lo = mid
    return hi, binomial_tail(n, sample_rate, hi)


def delta_with_slack(delta: float, epsilon: float, tv: float) -> float:
    """delta' of the plain (epsilon, delta')-DP statement when the mechanism is within TV
    ``tv`` of an (epsilon, delta)-DP one: delta + (1 + e^epsilon) tv."""
    return delta + (1.0 + math.exp(min(epsilon, 700.0))) * tv


class ExampleSumEncoder:
    """A partner's side: per-example conditional rounding, summed, plus its noise share."""

    def __init__(self, config: SharedNoiseConfig, *,
                 rounding_stream: ChaChaStream | None = None,
                 noise_stream: ChaChaStream | None = None) -> None:
        self.config = config
        self.total = np.zeros(config.vector_length, dtype=np.int64)
        self.count = 0
        self._limit_sq = config.l2_sensitivity**2
        self._rounding = rounding_stream or ChaChaStream(purpose=PURPOSE_ROUNDING)
        self._noise = noise_stream

    def add_examples(self, clipped: np.ndarray) -> None:
        """Add a batch of per-example gradients, shape [rows, d], each of L2 norm <= C
        (re-checked: a row above C would break the sensitivity, so it is refused)."""
        cfg = self.config
        rows = np.asarray(clipped, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != cfg.vector_length:
            raise SecAggValidationError(f"per-example gradients have shape {rows.shape}; "
                                        f"expected [rows, {cfg.vector_length}]")
        if rows.shape[0] == 0:
            return
        if not np.isfinite(rows).all():
            raise SecAggValidationError("per-example gradients contain NaN or infinity")
        norms = np.linalg.norm(rows, axis=1)
        if float(norms.max()) > cfg.clip * (1 + 1e-6):
            raise SecAggValidationError(f"a per-example gradient has norm {norms.max():.6g} > "
                                        f"clip {cfg.clip}")
        scaled = rows * cfg.scale
        rounded = stochastic_round(scaled.ravel(), self._rounding).reshape(scaled.shape)
        # conditional randomized rounding (KLS21 §4.1), per example: expected 1/(1-beta) tries
        for _ in range(1000):
            sq = np.einsum("ij,ij->i", rounded.astype(np.float64), rounded.astype(np.float64))
            bad = np.flatnonzero(sq > self._limit_sq)
            if bad.size == 0:
                break
            rounded[bad] = stochastic_round(scaled[bad].ravel(), self._rounding
                                            ).reshape(bad.size, -1)
        else:  # probability beta^1000
            raise SecAggValidationError("conditional randomized rounding did not converge")
        self.total += rounded.sum(axis=0)
        self.count += rows.shape[0]

    def encode(self, *, noise: bool = True) -> np.ndarray:
        """The ring vector (d + 1 entries, weight coordinate 0) with this partner's noise
        share: the input of ``SecAggClient.masked_input(..., encoded=...)``.
        ``noise=False`` only for tests of the noiseless aggregate."""
        cfg = self.config
        out = np.zeros(cfg.dim, dtype=np.int64)
        out[:-1] = self.total
        if noise:
            out[:-1] += sample_discrete_gaussian(cfg.local_sigma, cfg.vector_length,
                                                 self._noise)
        ring = out.astype(np.uint64).astype(cfg.dtype, copy=False)
        if cfg.bits not in (32, 64):
            ring &= cfg.dtype((1 << cfg.bits) - 1)
        return ring


def decode_sum(ring_sum: np.ndarray, config: SharedNoiseConfig) -> np.ndarray:
    """Unmasked ring sum -> float sum of the clipped per-example gradients (noise included),
    in gradient units."""
    view = _RingView(config.bits)
    signed = from_ring(np.asarray(ring_sum), view)  # type: ignore[arg-type]  # reads only .bits
    signed = signed.astype(np.float64)
    return signed[:-1] / config.scale


@dataclass(frozen=True)
class _RingView:
    """The one attribute of SecAggConfig that ``from_ring`` reads."""

    bits: int
