"""Ring encoding: rounding error bound, no overflow at the maximum n, unbiased rounding."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_config

from confide.privacy.secagg import UpdateEncoder
from confide.privacy.secagg.prg import ChaChaStream
from confide.privacy.secagg.quantize import from_ring, to_ring


@pytest.mark.parametrize("bits", [16, 24, 32, 48, 64])
def test_worst_case_sum_of_max_n_does_not_overflow(bits):
    n, d = 12, 64
    cfg = make_config(n, d, bits=bits, coord_clip=2.0, max_weight=3.0)
    enc = UpdateEncoder(cfg)
    for sign in (1.0, -1.0):
        total = np.zeros(cfg.encoded_length, dtype=np.uint64)
        for _ in range(n):  # every client at the clip bound, full weight
            total += enc.encode(np.full(d, 5.0 * sign), 3.0).astype(np.uint64)
        ring = to_ring(total.view(np.int64), cfg)
        weighted, weight = enc.decode(ring)
        np.testing.assert_allclose(weighted, sign * 2.0 * 3.0 * n, atol=enc.sum_error_bound(n))
        assert weight == pytest.approx(3.0 * n, abs=enc.sum_error_bound(n))


def test_sum_within_step_bound_and_unbiased():
    n, d = 8, 3000
    cfg = make_config(n, d, bits=20)
    enc = UpdateEncoder(cfg)
    rng = np.random.default_rng(0)
    xs = [rng.uniform(-1, 1, d) for _ in range(n)]
    total = sum(enc.encode(x, 1.0).astype(np.uint64) for x in xs)
    weighted, _ = enc.decode(to_ring(total.view(np.int64), cfg))
    err = weighted - sum(xs)
    assert np.max(np.abs(err)) <= enc.sum_error_bound(n)
    # unbiased rounding: mean error ~ 0 (std of the mean ~ step * sqrt(n/6/d))
    assert abs(err.mean()) < 5 * enc.step * np.sqrt(n / 6 / d)


def test_ring_round_trip_signed_values():
    for bits in (16, 33, 63, 64):
        cfg = make_config(bits=bits)
        v = np.array([0, 1, -1, 2 ** (bits - 1) - 1, -(2 ** (bits - 1))], dtype=np.int64)
        np.testing.assert_array_equal(from_ring(to_ring(v, cfg), cfg), v)


def test_l2_clip_and_conditional_rounding_bound_hold():
    cfg = make_config(4, 500, bits=32, l2_clip=1.0, noise_stddev=None)
    enc = UpdateEncoder(cfg)
    x = np.ones(500) * 10  # norm 224 -> clipped to 1
    rounded = from_ring(enc.encode(x, 1.0, rounding_stream=ChaChaStream(bytes(32))), cfg)
    assert np.linalg.norm(rounded.astype(float)) <= enc.l2_sensitivity
    assert np.linalg.norm(rounded[:-1] * enc.step) == pytest.approx(1.0, rel=1e-3)


def test_noise_headroom_keeps_noisy_sum_decodable():
    n, d = 10, 20000
    cfg = make_config(n, d, bits=20, l2_clip=1.0, coord_clip=1.0, noise_stddev=0.5)
    enc = UpdateEncoder(cfg)
    total = sum(enc.encode(np.full(d, 1.0 / np.sqrt(d)), 1.0).astype(np.uint64) for _ in range(n))
    weighted, _ = enc.decode(to_ring(total.view(np.int64), cfg))
    # total noise std = sigma * sqrt(n/m) >= 0.5; no wrap-around means errors stay Gaussian-sized
    err = weighted - n / np.sqrt(d)
    assert np.max(np.abs(err)) < 8 * 0.5 * np.sqrt(n / cfg.min_survivors)
    assert 0.45 < err.std() / np.sqrt(n / cfg.min_survivors) < 0.55
