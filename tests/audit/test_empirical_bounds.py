"""The one-run audit's bound (Steinke, Nasr, Jagielski 2023): the p-value is the paper's,
the most an audit can certify follows from its canary and guess counts, and the canary count
named to reach a claim is the smallest that does."""

from __future__ import annotations

import itertools
import math

import pytest
from scipy import stats

from confide.audit.empirical_bounds import (
    can_certify,
    canaries_needed,
    epsilon_lower_bound,
    guesses_for,
    max_certifiable_epsilon,
    p_value,
)
from confide.empirical.one_run import capability_line


def _paper_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The paper's own loop (its Algorithm 2 code), term by term."""
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return min(float(beta + alpha * delta * 2 * m), 1.0)


@pytest.mark.parametrize(("m", "r", "v", "eps", "delta"), [
    (200, 40, 40, 2.0, 1e-5), (200, 40, 31, 0.5, 1e-5), (1000, 1000, 990, 4.0, 1e-5),
    (5000, 400, 399, 6.0, 1e-3), (100, 10, 0, 1.0, 0.0)])
def test_p_value_is_the_papers(m: int, r: int, v: int, eps: float, delta: float) -> None:
    assert p_value(m, r, v, eps, delta) == pytest.approx(_paper_p_value(m, r, v, eps, delta),
                                                         rel=1e-9, abs=1e-15)


def test_p_value_is_an_exact_binomial_tail_without_delta() -> None:
    # 10 of 10 right at eps = 0 (fair coin): 2^-10
    assert p_value(100, 10, 10, 0.0, 0.0) == pytest.approx(2.0**-10)
    q = 1 / (1 + math.exp(-1.0))
    assert p_value(100, 3, 3, 1.0, 0.0) == pytest.approx(q**3)
    assert p_value(100, 3, 3, 1.0, 1e-3) > p_value(100, 3, 3, 1.0, 0.0)


def test_bound_is_zero_at_chance_monotone_in_correct_and_capped() -> None:
    assert epsilon_lower_bound(200, 40, 20, 1e-5) == 0.0
    bounds = [epsilon_lower_bound(200, 40, v, 1e-5) for v in range(28, 41)]
    assert all(b2 >= b1 for b1, b2 in itertools.pairwise(bounds))
    assert bounds[-1] == pytest.approx(max_certifiable_epsilon(200, 40, 1e-5))
    # all 40 right, delta 0: (e^eps/(1+e^eps))^40 = 0.05 at the bound
    q = 0.05 ** (1 / 40)
    pure = epsilon_lower_bound(200, 40, 40, 0.0)
    assert pure == pytest.approx(math.log(q / (1 - q)), rel=1e-3)
    assert bounds[-1] < pure  # the delta term can only weaken the bound


@pytest.mark.parametrize("canaries", [200, 1000, 5000, 20_000])
def test_the_printed_cap_is_the_bound_with_every_guess_right(canaries: int) -> None:
    r = guesses_for(canaries, 0.2)
    assert r == 2 * (canaries // 10)
    line = capability_line(canaries, r, 1e-5, 0.95)
    printed = float(line.split("certify at most epsilon ")[1].split()[0])
    # the cap is where r right guesses out of r stop rejecting: p < 0.05 just below it,
    # >= 0.05 just above (the paper's p-value, recomputed here)
    assert _paper_p_value(canaries, r, r, printed - 2e-3, 1e-5) < 0.05
    assert _paper_p_value(canaries, r, r, printed + 2e-3, 1e-5) >= 0.05
    # without delta it is closed form: q^r = beta
    q = 0.05 ** (1 / r)
    assert max_certifiable_epsilon(canaries, r, 0.0) == pytest.approx(
        math.log(q / (1 - q)), abs=1e-6)
    assert f"{canaries} canaries, {r} guesses" in line


def test_the_default_audit_caps_at_about_2_55() -> None:
    assert max_certifiable_epsilon(200, 40, 1e-5) == pytest.approx(2.548, abs=2e-3)
    assert not can_certify(8.0, 200, 40, 1e-5)


def test_canaries_needed_is_the_smallest_count_that_reaches_the_claim() -> None:
    every = canaries_needed(8.0, 1e-5, lambda m: m)  # the white-box rule at rate 1
    assert every is not None
    assert max_certifiable_epsilon(every, every, 1e-5) > 8.0
    assert max_certifiable_epsilon(every - 1, every - 1, 1e-5) <= 8.0
    assert 12_000 < every < 14_000
    small = canaries_needed(2.0, 1e-5, lambda m: guesses_for(m, 0.2))
    assert small is not None
    assert can_certify(2.0, small, guesses_for(small, 0.2), 1e-5)
    assert not can_certify(2.0, small - 1, guesses_for(small - 1, 0.2), 1e-5)


def test_some_claims_are_out_of_reach_at_a_small_guess_fraction() -> None:
    # 20% guessed: the delta term 2 m delta grows faster than the guesses help; the cap
    # peaks near 6.6 at delta 1e-5
    assert canaries_needed(8.0, 1e-5, lambda m: guesses_for(m, 0.2)) is None
    assert max_certifiable_epsilon(50_000, 10_000, 1e-5) < 8.0


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_a_bad_guess_fraction_is_named(bad: float) -> None:
    with pytest.raises(ValueError, match="guess fraction"):
        guesses_for(100, bad)
