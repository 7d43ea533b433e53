"""Client-level privacy accounting of the distributed discrete Gaussian (DDG) mechanism.

Analysis (what is accounted and the worst cases assumed):

* Mechanism: each of the surviving clients adds independent N_Z(0, sigma^2) noise (integer
  units) to its conditionally-rounded integer vector; the server sees only the sum (secure
  aggregation; the modular reduction is post-processing). Kairouz, Liu, Steinke 2021
  ("The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
  Aggregation", ICML; arXiv:2102.06387), Proposition 14 / Theorem 1: for a sum of n
  independent N_Z(0, sigma^2) and any integer shift Delta with ||Delta||_2 <= D2 and
  ||Delta||_1 <= D1, the Renyi divergence of order alpha is at most
      min{ alpha/2 * D2^2/(n sigma^2) + tau d,
           alpha/2 * (D2^2/(n sigma^2) + 2 D1 tau/(sqrt(n) sigma) + tau^2 d),
           alpha/2 * (D2/(sqrt(n) sigma) + tau sqrt(d))^2 },
      tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k/(k+1)).
  tau accounts for the sum of discrete Gaussians not being exactly a discrete Gaussian; it
  is negligible (< 1e-100) once sigma >= 4.
* Sensitivity: D2 is the conditional-rounding bound of KLS21 eq. (13) on the integer vector
  (enforced by rejection in :mod:`.quantize`, so it holds with certainty), D1 = min(D2^2,
  sqrt(d) D2) (integer vectors have ||x||_1 <= ||x||_2^2).
* Neighbouring relation: client-level, one client's contribution added/removed (equivalently
  zeroed out: the client still adds its noise share, as a participating client with a zero
  update would). The remaining noise is that of the other survivors; we account with
  n = m = ``min_survivors`` noise shares, the fewest the server accepts. More survivors only
  add independent noise (post-processing), so m is the worst case over dropouts.
* Client sampling: with sampling rate q < 1 we use the general upper bound for Poisson
  subsampling of Zhu & Wang 2019 ("Poisson Subsampled Renyi Differential Privacy", ICML,
  Theorem 5), valid for any base mechanism given its RDP curve at integer orders, and take
  the minimum with the unamplified RDP. If clients are not sampled by independent coin flips
  (e.g. a fixed-size cohort), call with q = 1: no amplification is claimed, which is
  always sound.
* Composition over rounds adds RDP; conversion to (eps, delta) uses Canonne, Kamath, Steinke
  2020 Prop. 12 / Balle et al. 2020 Thm. 21:
      eps = min_alpha rdp(alpha) + log((alpha-1)/alpha) - (log(delta) + log(alpha))/(alpha-1).
* Not accounted here: the TV-distance slack of the float sampler (see
  :mod:`.discrete_gaussian`, <= d * 2^-49 added to delta) and modular wrap-around
  (probability <= 2 exp(-z^2/2) per coordinate; it only changes the decoded value and is
  post-processing).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special

from confide.privacy.mechanisms import DistributedDiscreteGaussian

from .config import SecAggConfig
from .quantize import UpdateEncoder

DEFAULT_ORDERS: tuple[int, ...] = (*range(2, 129), 160, 192, 256, 384, 512)


@dataclass(frozen=True)
class DDGParams:
    """One round of the DDG mechanism, in integer (scaled) units."""

    l2_sensitivity: float
    l1_sensitivity: float
    local_sigma: float
    num_summed: int
    dim: int

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def ddg_params_from_config(config: SecAggConfig) -> DDGParams:
    """DDG parameters implied by a session configuration (requires ``noise_stddev``)."""
    if config.noise_stddev is None:
        raise ValueError("config.noise_stddev is None: no distributed DP noise to account")
    enc = UpdateEncoder(config)
    assert enc.l2_sensitivity is not None and enc.local_noise_sigma_int is not None
    d2 = enc.l2_sensitivity
    d1 = min(d2 * d2, math.sqrt(enc.dim) * d2)
    return DDGParams(d2, d1, enc.local_noise_sigma_int, config.min_survivors, enc.dim)


def ddg_mechanism(config: SecAggConfig, *, noise_multiplier: float, clipping_norm: float,
                  population: int, sampled: int, released: bool) -> DistributedDiscreteGaussian:
    """One round's mechanism event under session `config` (requires ``noise_stddev``): its
    DDG parameters, no amplification by sampling claimed (the cohorts are fixed-size
    samples), and whether the secure sum was released."""
    p = ddg_params_from_config(config)
    return DistributedDiscreteGaussian(
        noise_multiplier=noise_multiplier, clipping_norm=clipping_norm, population=population,
        sampled=sampled, l2_sensitivity=p.l2_sensitivity, l1_sensitivity=p.l1_sensitivity,
        local_sigma=p.local_sigma, num_summed=p.num_summed, dim=p.dim, sampling_rate=1.0,
        released=released, min_survivors=config.min_survivors,
        noise_stddev=config.noise_stddev, bits=config.bits)


def ddg_params_of(mechanism: DistributedDiscreteGaussian) -> DDGParams:
    m = mechanism
    return DDGParams(m.l2_sensitivity, m.l1_sensitivity, m.local_sigma, m.num_summed, m.dim)


def ddg_tau(local_sigma: float, num_summed: int) -> float:
    """tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k/(k+1)) (KLS21 Theorem 1)."""
    k = np.arange(1, num_summed, dtype=np.float64)
    return float(10.0 * np.exp(-2.0 * math.pi**2 * local_sigma**2 * k / (k + 1)).sum())


def ddg_rdp(params: DDGParams, orders: Sequence[float]) -> np.ndarray:
    """RDP of one (unsampled) round at each order (KLS21 Proposition 14)."""
    a = np.asarray(orders, dtype=np.float64)
    n, sigma, d = params.num_summed, params.local_sigma, params.dim
    tau = ddg_tau(sigma, n)
    l2s = params.l2_sensitivity / (math.sqrt(n) * sigma)
    l1s = params.l1_sensitivity / (math.sqrt(n) * sigma)
    term1 = a / 2 * l2s**2 + tau * d
    term2 = a / 2 * (l2s**2 + 2 * l1s * tau + tau**2 * d)
    term3 = a / 2 * (l2s + math.sqrt(d) * tau) ** 2
    return np.minimum(np.minimum(term1, term2), term3)


def poisson_subsampled_rdp(
    rdp_of_order: Callable[[int], float], q: float, orders: Sequence[int]
) -> np.ndarray:
    """Zhu & Wang 2019 Theorem 5 upper bound for Poisson subsampling with rate q, at
    integer orders, min'ed with the unamplified RDP."""
    if not 0 < q <= 1:
        raise ValueError(f"sampling rate must be in (0, 1], got {q}")
    out = []
    for alpha in orders:
        alpha = int(alpha)
        if alpha < 2:
            raise ValueError("orders must be integers >= 2")
        base = rdp_of_order(alpha)
        if q == 1:
            out.append(base)
            continue
        log_terms = [(alpha - 1) * math.log1p(-q) + math.log(alpha * q - q + 1)]
        log_terms.append(
            math.log(special.comb(alpha, 2))
            + 2 * math.log(q)
            + (alpha - 2) * math.log1p(-q)
            + rdp_of_order(2)
        )
        ls = np.arange(3, alpha + 1)
        if ls.size:
            eps_l = np.array([rdp_of_order(int(order)) for order in ls])
            logc = (
                special.gammaln(alpha + 1)
                - special.gammaln(ls + 1)
                - special.gammaln(alpha - ls + 1)
            )
            t = (
                math.log(3)
                + logc
                + (alpha - ls) * math.log1p(-q)
                + ls * math.log(q)
                + (ls - 1) * eps_l
            )
            log_terms.extend(t.tolist())
        sub = float(special.logsumexp(log_terms)) / (alpha - 1)
        out.append(min(sub, base))
    return np.asarray(out)


def rdp_to_epsilon(orders: Sequence[float], rdp: np.ndarray, delta: float) -> tuple[float, float]:
    """(epsilon, best order) from an RDP curve (CKS 2020 Prop. 12)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    a = np.asarray(orders, dtype=np.float64)
    eps = rdp + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)
    i = int(np.nanargmin(eps))
    return max(0.0, float(eps[i])), float(a[i])


def round_rdp(params: DDGParams, sampling_rate: float, orders: Sequence[int]) -> np.ndarray:
    table = dict(zip((int(o) for o in orders), ddg_rdp(params, orders), strict=True))

    def rdp_at(alpha: int) -> float:
        if alpha not in table:
            table[alpha] = float(ddg_rdp(params, [alpha])[0])
        return table[alpha]

    return poisson_subsampled_rdp(rdp_at, sampling_rate, orders)


def ddg_epsilon(
    params: DDGParams,
    rounds: int,
    delta: float,
    sampling_rate: float = 1.0,
    orders: Sequence[int] = DEFAULT_ORDERS,
) -> float:
    """Client-level epsilon after ``rounds`` identical rounds."""
    return rdp_to_epsilon(orders, rounds * round_rdp(params, sampling_rate, orders), delta)[0]


def calibrate_noise_stddev(
    config: SecAggConfig,
    target_epsilon: float,
    delta: float,
    rounds: int,
    sampling_rate: float = 1.0,
    *,
    rel_tol: float = 1e-3,
) -> float:
    """Smallest total noise std (update units, ``SecAggConfig.noise_stddev``) for which
    ``rounds`` rounds of ``config``'s mechanism reach ``target_epsilon`` at ``delta``.

    The scale (and hence the integer sensitivity) depends on the noise headroom, so each
    candidate is evaluated on the full configuration it induces. Bisection in log space.
    """
    if config.l2_clip is None:
        raise ValueError("config.l2_clip must be set to calibrate noise")

    def eps_for(sigma: float) -> float:
        cfg = dataclasses.replace(config, noise_stddev=sigma)
        return ddg_epsilon(ddg_params_from_config(cfg), rounds, delta, sampling_rate)

    lo, hi = config.l2_clip * 1e-3, config.l2_clip
    while eps_for(hi) > target_epsilon:
        lo, hi = hi, hi * 4
        if hi > config.l2_clip * 1e6:
            raise ValueError("target epsilon unreachable")
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if eps_for(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


class DistributedDGAccountant:
    """Stateful client-level accountant: records one mechanism event per round.

    Events (the DDG parameters, sampling rate and repetition count) are stored, not only the
    resulting epsilon, so another accountant can replay them (DESIGN.md).
    """

    def __init__(self, orders: Sequence[int] = DEFAULT_ORDERS) -> None:
        self.orders = tuple(int(o) for o in orders)
        self._rdp = np.zeros(len(self.orders))
        self.events: list[dict] = []

    def record(self, mechanism: DistributedDiscreteGaussian) -> None:
        """Add one round's mechanism event (an unreleased round adds nothing to the RDP,
        but counts: see DistributedDiscreteGaussian)."""
        self.step(ddg_params_of(mechanism), mechanism.sampling_rate,
                  rounds=int(mechanism.released))

    def step(self, params: DDGParams, sampling_rate: float = 1.0, rounds: int = 1) -> None:
        if rounds < 0:
            raise ValueError("rounds must be >= 0")
        self._rdp = self._rdp + rounds * round_rdp(params, sampling_rate, self.orders)
        self.events.append(
            {"params": params.to_dict(), "sampling_rate": sampling_rate, "rounds": rounds}
        )

    @property
    def rounds(self) -> int:
        return sum(e["rounds"] for e in self.events)

    def epsilon(self, delta: float) -> float:
        if not self.events:
            return 0.0
        return rdp_to_epsilon(self.orders, self._rdp, delta)[0]

    def state_dict(self) -> dict:
        return {"orders": list(self.orders), "rdp": self._rdp.tolist(), "events": list(self.events)}

    def load_state_dict(self, state: dict) -> None:
        orders = tuple(int(o) for o in state["orders"])
        rdp = np.asarray(state["rdp"], dtype=np.float64)
        if len(rdp) != len(orders):
            raise ValueError("state_dict orders and rdp lengths differ")
        self.orders, self._rdp, self.events = orders, rdp, list(state["events"])
