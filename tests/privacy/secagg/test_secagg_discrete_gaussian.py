"""Discrete Gaussian samplers against the exact pmf (CKS 2020)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from confide.privacy.secagg.discrete_gaussian import (
    discrete_gaussian_pmf,
    discrete_gaussian_variance,
    sample_discrete_gaussian,
    sample_discrete_gaussian_exact,
)
from confide.privacy.secagg.prg import ChaChaStream


def _gof(samples: np.ndarray, sigma: float) -> float:
    radius = int(4 * sigma) + 1
    support = np.arange(-radius, radius + 1)
    p = discrete_gaussian_pmf(sigma, support)
    observed = np.array(
        [(samples == x).sum() for x in support] + [(np.abs(samples) > radius).sum()]
    )
    expected = np.append(p, 1 - p.sum()) * samples.size
    return stats.chisquare(observed, expected).pvalue


@pytest.mark.parametrize("sigma", [0.6, 1.0, 2.5, 7.0])
def test_vectorised_sampler_matches_pmf(sigma):
    x = sample_discrete_gaussian(sigma, 200_000, ChaChaStream(bytes([7]) * 32))
    assert x.dtype == np.int64
    var = discrete_gaussian_variance(sigma)
    assert abs(x.mean()) < 5 * np.sqrt(var / x.size)
    assert x.var() == pytest.approx(var, rel=0.02)
    assert _gof(x, sigma) > 1e-4


def test_exact_sampler_matches_pmf():
    x = sample_discrete_gaussian_exact(Fraction(9, 4), 4000)
    assert _gof(x, 1.5) > 1e-4
    assert x.var() == pytest.approx(discrete_gaussian_variance(1.5), rel=0.1)


def test_large_sigma_and_size():
    x = sample_discrete_gaussian(1e6, 1_000_000)
    assert x.std() == pytest.approx(1e6, rel=0.01)


def test_invalid_sigma():
    with pytest.raises(ValueError):
        sample_discrete_gaussian(0.0, 10)


def test_long_double_fallback_decides_like_float64_where_both_are_sure(monkeypatch):
    """With a band so wide that most decisions go to the long-double path, the law is
    unchanged: the fallback computes the same probabilities, at higher precision."""
    import confide.privacy.secagg.discrete_gaussian as dg

    monkeypatch.setattr(dg, "_BAND", 0.05)
    x = sample_discrete_gaussian(2.5, 100_000, ChaChaStream(bytes([9]) * 32))
    assert _gof(x, 2.5) > 1e-4
    assert x.var() == pytest.approx(discrete_gaussian_variance(2.5), rel=0.03)


@pytest.mark.parametrize("sigma", [3.3e5, 2.0**35])
def test_large_sigma_buckets_are_not_coarsened(sigma):
    """The earlier float64 geometric floor(-t ln U) drew from a 2^-53 grid, so at large t
    whole ranges of integers were unreachable in the tails and the rest lumpy. Now U is an
    exact integer: residues of the samples modulo small numbers are uniform, the tails are
    as wide as the law says, and the spread is sigma."""
    x = sample_discrete_gaussian(sigma, 400_000, ChaChaStream(bytes([5]) * 32))
    assert x.std() == pytest.approx(sigma, rel=0.01)
    for k in (2, 3, 7):
        counts = np.bincount(np.mod(x, k), minlength=k)
        assert stats.chisquare(counts).pvalue > 1e-4
    # tail mass beyond 4 sigma: 2 * P[Z > 4] = 6.3e-5, i.e. ~25 of 400,000
    assert 5 <= int((np.abs(x) > 4 * sigma).sum()) <= 60


def test_total_variation_bound_does_not_grow_with_sigma_and_tracks_precision():
    from confide.privacy.secagg.discrete_gaussian import (
        SIGNIFICAND_BITS,
        sampler_tv_per_sample,
    )

    assert SIGNIFICAND_BITS >= 53
    assert sampler_tv_per_sample(64) < 1e-17  # x86-64 long double
    assert sampler_tv_per_sample(113) < sampler_tv_per_sample(64) < sampler_tv_per_sample(53)
    assert sampler_tv_per_sample(53) < 2e-14


def test_acceptance_of_one_proposal_is_at_least_a_quarter():
    """The TV bound divides by the acceptance probability A of a proposal (>= 0.25 assumed
    for sigma >= 1): measured from how many proposals a batch consumes."""
    from confide.privacy.secagg import discrete_gaussian as dg

    for sigma in (1.0, 1.7, 4.0, 1e3):
        stream = ChaChaStream(bytes([4]) * 32)
        drawn = {"n": 0}
        real = dg._uniform_below

        def counting(t, size, s, real=real, drawn=drawn):
            drawn["n"] += size
            return real(t, size, s)

        dg._uniform_below = counting
        try:
            sample_discrete_gaussian(sigma, 50_000, stream, chunk=1 << 30)
        finally:
            dg._uniform_below = real
        # outputs / proposals drawn is a lower estimate of A (surplus proposals of the
        # last pass are drawn and discarded)
        assert 50_000 / drawn["n"] >= 0.25, sigma
