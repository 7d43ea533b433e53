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
