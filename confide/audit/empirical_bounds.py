"""Epsilon lower bound of a one-run audit (Steinke, Nasr, Jagielski 2023, "Privacy Auditing
with One (1) Training Run", NeurIPS; Theorem 5.2 / Algorithm 2).

m canaries are each included with probability 1/2; the auditor guesses membership for r of
them (abstaining on the rest) and is right v times. If training is (eps, delta)-DP, the
number of correct guesses is dominated by Binomial(r, e^eps / (1 + e^eps)) up to an
additive term alpha * 2m * delta. The lower bound is the largest eps whose p-value for
observing >= v correct guesses is below beta (0.05 for 95% confidence).
"""

from __future__ import annotations

import math

from scipy import stats


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[>= v correct of r guesses] under an (epsilon, delta)-DP null hypothesis."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"epsilon={epsilon} must be >= 0 and delta={delta} in [0, 1]")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of eps-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    # alpha: the delta term's weight, max_i P[v > Binomial(r, q) >= v - i] / i
    alpha, mass = 0.0, 0.0
    for i in range(1, v + 1):
        mass += float(stats.binom.pmf(v - i, r, q))
        alpha = max(alpha, mass / i)
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05,
                        iterations: int = 40) -> float:
    """Largest eps rejected at level `beta`: the run is not (eps, delta)-DP with confidence
    1 - beta. 0 when even eps = 0 cannot be rejected (e.g. guesses at chance)."""
    if not 0 < beta < 1:
        raise ValueError(f"beta={beta} must be in (0, 1)")
    if r == 0 or p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < beta:
        low, high = high, 2 * high
        if high > 1e3:
            return low
    for _ in range(iterations):
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < beta:
            low = mid
        else:
            high = mid
    return low


def max_certifiable_epsilon(m: int, r: int, delta: float, beta: float = 0.05) -> float:
    """The bound when every one of r guesses is right: the most this audit can show."""
    return epsilon_lower_bound(m, r, r, delta, beta)
