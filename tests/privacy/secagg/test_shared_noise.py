"""Shared-noise example-level DP core (confide.privacy.secagg.shared_noise) with N in-process
parties: total noise variance of the secure sum, the noiseless aggregate equals the central
clipped-gradient sum, ring sizing and the slack bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from confide.privacy.secagg import SecAggValidationError
from confide.privacy.secagg.discrete_gaussian import discrete_gaussian_variance
from confide.privacy.secagg.inprocess import run_round
from confide.privacy.secagg.shared_noise import (
    ExampleSumEncoder,
    SharedNoiseConfig,
    decode_sum,
    delta_with_slack,
)
from tests.privacy.secagg.conftest import make_config


def _shared(secagg, *, sigma=1.0, clip=1.0, colluders=0, max_examples=100, bits=None):
    return SharedNoiseConfig(clip=clip, noise_multiplier=sigma, num_clients=secagg.num_clients,
                             min_survivors=int(secagg.min_survivors), colluders=colluders,
                             max_examples=max_examples, vector_length=secagg.vector_length,
                             bits=bits or secagg.bits)


def _clipped(rng, rows, d, clip):
    g = rng.normal(size=(rows, d)) * rng.uniform(0.1, 3.0, size=(rows, 1)) / math.sqrt(d)
    norms = np.linalg.norm(g, axis=1, keepdims=True)
    return g * np.minimum(1.0, clip / (norms + 1e-6))


def _noise_round(secagg, shared, drop=None, rounds=1):
    """Decoded secure sums of pure noise (no examples) over `rounds` rounds."""
    out = []
    for r in range(1, rounds + 1):
        encoded = {c: ExampleSumEncoder(shared).encode() for c in range(1, secagg.num_clients + 1)}
        result, _ = run_round(secagg, {c: np.zeros(secagg.vector_length) for c in encoded},
                              round_number=r, drop=drop, serialize=False,
                              encoded=encoded)
        out.append((decode_sum(result.ring_sum, shared), len(result.survivors)))
    return out


@pytest.mark.parametrize("dropouts", [False, True])
def test_secure_sum_of_noise_shares_has_the_intended_total_variance(dropouts):
    # n = 6 complete graph, threshold 4 -> min_survivors 4; with colluders c = 1, m = 3
    secagg = make_config(6, 4000, degree=5, threshold=4)
    shared = _shared(secagg, sigma=0.8, colluders=1)
    assert shared.m == 3
    drop = {"masked_input": [5, 6]} if dropouts else None
    draws = _noise_round(secagg, shared, drop=drop, rounds=3)
    survivors = {s for _, s in draws}
    assert survivors == ({4} if dropouts else {6})
    h = survivors.pop()
    values = np.concatenate([v for v, _ in draws])  # 12,000 independent coordinates
    # intended: each share has variance Var N_Z(0, sigma_int^2) (= sigma_int^2 here);
    # h shares sum; in gradient units / scale^2. With m shares: (sigma * D2 / scale)^2.
    share_var = discrete_gaussian_variance(shared.local_sigma) if shared.local_sigma < 50 \
        else shared.local_sigma**2
    expected = h * share_var / shared.scale**2
    accounted = (shared.noise_multiplier * shared.l2_sensitivity / shared.scale) ** 2
    assert expected >= accounted * (1 - 1e-9)  # h >= m honest-accounted shares
    if dropouts:  # survivors = min_survivors = m + c shares
        assert expected == pytest.approx(accounted * 4 / 3, rel=1e-9)
    observed = float(np.var(values))
    # var of a sample variance of k normals: 2 sigma^4 / k -> 1.3% std at k = 12,000
    assert observed == pytest.approx(expected, rel=0.06)
    assert abs(float(np.mean(values))) < 5 * math.sqrt(expected / values.size)
    # the noise is about sigma * C per coordinate, not more: quantisation costs < 1%
    assert accounted == pytest.approx((0.8 * 1.0) ** 2, rel=0.01)


def test_noiseless_aggregate_equals_the_central_clipped_sum_up_to_quantisation():
    rng = np.random.default_rng(0)
    d, clip = 300, 0.5
    secagg = make_config(4, d, degree=3, threshold=3)
    batches = {c: _clipped(rng, rows, d, clip) for c, rows in
               zip(range(1, 5), (7, 0, 13, 30), strict=True)}
    n_total = 200  # records of the cohort (bound on sampled examples)
    shared = _shared(secagg, clip=clip, max_examples=n_total)
    encoded = {}
    for c, rows in batches.items():
        enc = ExampleSumEncoder(shared)
        for chunk in np.array_split(rows, 3):  # physical batches
            enc.add_examples(chunk)
        assert enc.count == len(rows)
        encoded[c] = enc.encode(noise=False)
    result, _ = run_round(secagg, {c: np.zeros(d) for c in encoded}, serialize=True,
                          encoded=encoded)
    total = decode_sum(result.ring_sum, shared)
    central = np.concatenate(list(batches.values())).sum(axis=0)
    rows = sum(len(b) for b in batches.values())
    assert np.max(np.abs(total - central)) <= rows / shared.scale
    expected_batch = 55.0  # sum_i q_i n_i, public
    np.testing.assert_allclose(total / expected_batch, central / expected_batch,
                               atol=rows / shared.scale / expected_batch)


def test_per_example_conditional_rounding_bounds_each_example_by_d2():
    rng = np.random.default_rng(1)
    d = 50
    secagg = make_config(3, d)
    # a tiny ring makes rounding coarse, so the conditional bound actually bites
    shared = _shared(secagg, clip=1.0, max_examples=10_000, bits=24)
    rows = _clipped(rng, 200, d, 1.0)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)  # exactly at the clip
    enc = ExampleSumEncoder(shared)
    for row in rows:
        before = enc.total.copy()
        enc.add_examples(row[None, :])
        assert np.linalg.norm((enc.total - before).astype(float)) <= shared.l2_sensitivity
    with pytest.raises(SecAggValidationError, match="norm"):
        enc.add_examples(rows[:1] * 2)


def test_ring_cannot_wrap_and_bad_settings_are_refused():
    secagg = make_config(10, 1000)
    shared = _shared(secagg, sigma=2.0, max_examples=30_000)
    # every example at the clip in every coordinate's worst case, plus 12 total noise stds
    worst = 30_000 * (shared.scale * 1.0 + 1) + 12 * math.sqrt(10) * shared.local_sigma
    assert worst <= 2**31 - 1
    assert shared.effective_noise_multiplier == pytest.approx(2.0, rel=1e-12)
    with pytest.raises(SecAggValidationError, match="colluders"):
        _shared(secagg, colluders=int(secagg.min_survivors))
    with pytest.raises(SecAggValidationError, match="raise secagg-bits"):
        _shared(make_config(3, 10, bits=16), max_examples=10**6, bits=16)
    again = SharedNoiseConfig.from_json(shared.to_json())
    assert again == shared and again.scale == shared.scale


@pytest.mark.parametrize("s", [1.0, 2.0, 4.0, 10.0, 40.0])
def test_discrete_vs_rounded_gaussian_tv_is_below_the_stated_bound(s):
    radius = int(40 * s) + 40
    k = np.arange(-radius, radius + 1, dtype=float)
    dg = np.exp(-k**2 / (2 * s * s))
    dg /= dg.sum()
    rounded = norm.cdf((k + 0.5) / s) - norm.cdf((k - 0.5) / s)
    tv = 0.5 * np.abs(dg - rounded).sum()
    assert tv <= 1 / (24 * s * s)


def test_tv_slack_is_recorded_per_round_and_converted_to_delta():
    secagg = make_config(10, 75_000, bits=62)
    shared = _shared(secagg, sigma=1.0, max_examples=3000, bits=62)
    eta = shared.tv_slack()
    assert 0 < eta < 1e-8
    assert delta_with_slack(1e-5, 8.0, eta) == pytest.approx(1e-5 + (1 + math.e**8) * eta)


def test_slack_at_the_mode_default_bits_is_a_small_fraction_of_delta():
    """The LoRA default (d = 74,498), 10 partners, sigma 1.38, 30 rounds at epsilon 8: at
    32 bits the discrete-vs-continuous term would add ~3e-4 to delta (30x delta = 1e-5);
    at the shared mode's 48 bits the total slack adds < 5% of delta."""
    from confide.config import SHARED_NOISE_DEFAULTS

    def added_delta(bits: int) -> float:
        secagg = make_config(10, 74_498, bits=bits)
        shared = _shared(secagg, sigma=1.38, max_examples=3000, bits=bits)
        return delta_with_slack(0.0, 8.0, 30 * shared.tv_slack())

    assert added_delta(32) > 1e-4
    assert added_delta(SHARED_NOISE_DEFAULTS["secagg-bits"]) < 0.05 * 1e-5
