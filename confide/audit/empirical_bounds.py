"""Epsilon lower bound of a one-run audit (Steinke, Nasr, Jagielski 2023, "Privacy Auditing
with One (1) Training Run", NeurIPS; Theorem 5.2 / Algorithm 2).

m canaries are each included with probability 1/2; the auditor guesses membership for r of
them (abstaining on the rest) and is right v times. If training is (eps, delta)-DP, the
number of correct guesses is dominated by Binomial(r, e^eps / (1 + e^eps)) up to an
additive term alpha * 2m * delta. The lower bound is the largest eps whose p-value for
observing >= v correct guesses is below beta (0.05 for 95% confidence).

What an audit can show at all is capped by its size: with every one of r guesses right the
bound is `max_certifiable_epsilon(m, r, delta)` (200 canaries, 40 guesses, delta 1e-5:
about 2.55). A claim above that cap cannot be refuted by the audit, however leaky the run;
`canaries_needed` is the smallest canary count whose cap exceeds a given claim. The cap is
not monotone in m: the delta term grows with m, so at a fixed guess fraction some claims
are out of reach of every canary count (guessing on all canaries reaches furthest).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import stats

MAX_CANARIES = 1_000_000  # canaries_needed looks no further


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[>= v correct of r guesses] under an (epsilon, delta)-DP null hypothesis."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"epsilon={epsilon} must be >= 0 and delta={delta} in [0, 1]")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of eps-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    # alpha: the delta term's weight, max over i in 1..v of P[v > Binomial(r, q) >= v - i] / i
    # (the paper's loop, vectorised: the cumulative mass of v-1, v-2, ..., 0 over i)
    alpha = 0.0
    if v > 0:
        mass = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
        alpha = float(np.max(mass / np.arange(1, v + 1)))
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


def guesses_for(canaries: int, guess_fraction: float) -> int:
    """Guesses an audit of `canaries` makes at `guess_fraction`: k = max(1, floor(f * m / 2))
    "in" and k "out" (so 2k <= m), fixed before any score is seen."""
    check_guess_fraction(guess_fraction)
    if canaries < 2:
        raise ValueError(f"canaries = {canaries}; allowed: >= 2")
    return 2 * max(1, int(guess_fraction * canaries / 2))


def check_guess_fraction(guess_fraction: float) -> None:
    if not 0 < guess_fraction <= 1:
        raise ValueError(f"guess fraction = {guess_fraction}; allowed: 0 < f <= 1 (the "
                         "share of canaries guessed, half 'in' and half 'out')")


def can_certify(epsilon: float, m: int, r: int, delta: float, beta: float = 0.05) -> bool:
    """Whether r right guesses out of r (m canaries) would reject (epsilon, delta)-DP: one
    p-value, no bisection."""
    return p_value(m, r, r, epsilon, delta) < beta


def canaries_needed(epsilon: float, delta: float, guesses: Callable[[int], int],
                    beta: float = 0.05) -> int | None:
    """Smallest canary count m whose audit, with every one of its `guesses(m)` guesses right,
    would refute a claim of `epsilon` (its `max_certifiable_epsilon` exceeds it). None when no
    count up to MAX_CANARIES does: the delta term 2 m delta grows with m."""
    if not epsilon > 0 or not math.isfinite(epsilon):
        raise ValueError(f"epsilon = {epsilon}; allowed: a finite number > 0")

    def reaches(m: int) -> bool:
        return can_certify(epsilon, m, guesses(m), delta, beta)

    # A geometric scan finds the first count that reaches the claim, a bisection below it
    # the exact smallest (the cap rises with m up to its peak, so the bracket is monotone).
    below, m = 1, 2
    while not reaches(m):
        below, m = m, math.ceil(m * 1.25)
        if m > MAX_CANARIES:
            return None
    while m - below > 1:
        mid = (below + m) // 2
        if reaches(mid):
            m = mid
        else:
            below = mid
    return m
