"""Client-level accountant of the distributed discrete Gaussian mechanism."""

from __future__ import annotations

import dataclasses
import itertools

import dp_accounting
import pytest
from conftest import make_config

from confide.privacy.secagg import (
    DDGParams,
    DistributedDGAccountant,
    UpdateEncoder,
    calibrate_noise_stddev,
    ddg_epsilon,
    ddg_params_from_config,
)
from confide.privacy.secagg.ddg_accounting import DEFAULT_ORDERS, ddg_tau


def test_matches_gaussian_closed_form_when_tau_vanishes():
    # sigma large => tau ~ 0 and the RDP is that of a Gaussian with multiplier z
    params = DDGParams(
        l2_sensitivity=100.0, l1_sensitivity=1e4, local_sigma=80.0, num_summed=4, dim=1000
    )
    assert ddg_tau(80.0, 4) < 1e-100
    z = 80.0 * 2 / 100.0  # sqrt(m) sigma / Delta
    rounds, delta = 50, 1e-6
    ours = ddg_epsilon(params, rounds, delta)
    acc = dp_accounting.rdp.RdpAccountant(list(DEFAULT_ORDERS))
    acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
    assert ours == pytest.approx(acc.get_epsilon(delta), rel=1e-3)
    # and below the classic zCDP conversion rho + 2 sqrt(rho log(1/delta))
    rho = rounds / (2 * z * z)
    assert ours <= rho + 2 * (rho * 13.8155) ** 0.5


def test_subsampled_is_smaller_and_close_to_sampled_gaussian():
    params = DDGParams(100.0, 1e4, 80.0, 4, 1000)
    full = ddg_epsilon(params, 100, 1e-6)
    sub = ddg_epsilon(params, 100, 1e-6, sampling_rate=0.05)
    assert sub < full
    acc = dp_accounting.rdp.RdpAccountant(list(DEFAULT_ORDERS))
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.6)), 100)
    assert sub >= acc.get_epsilon(1e-6) * 0.999  # Zhu-Wang general bound is an upper bound


def test_tau_term_costs_privacy_for_tiny_sigma():
    small = DDGParams(4.0, 16.0, 0.3, 10, 1000)
    no_tau = dataclasses.replace(small, dim=1)
    assert ddg_epsilon(small, 1, 1e-5) > ddg_epsilon(no_tau, 1, 1e-5)


def test_accountant_monotone_and_state_round_trip():
    params = ddg_params_from_config(make_config(10, 100, l2_clip=1.0, noise_stddev=2.0))
    acc = DistributedDGAccountant()
    eps = []
    for _ in range(5):
        acc.step(params, sampling_rate=0.2)
        eps.append(acc.epsilon(1e-5))
    assert all(a < b for a, b in itertools.pairwise(eps))
    restored = DistributedDGAccountant()
    restored.load_state_dict(acc.state_dict())
    assert restored.epsilon(1e-5) == eps[-1] and restored.rounds == 5
    batched = DistributedDGAccountant()
    batched.step(params, sampling_rate=0.2, rounds=5)
    assert batched.epsilon(1e-5) == pytest.approx(eps[-1])


def test_calibration_round_trips():
    cfg = make_config(20, 1000, l2_clip=1.0)
    sigma = calibrate_noise_stddev(
        cfg, target_epsilon=3.0, delta=1e-5, rounds=20, sampling_rate=0.5
    )
    params = ddg_params_from_config(dataclasses.replace(cfg, noise_stddev=sigma))
    eps = ddg_epsilon(params, 20, 1e-5, 0.5)
    assert 2.99 <= eps <= 3.0
    looser = ddg_params_from_config(dataclasses.replace(cfg, noise_stddev=sigma * 0.98))
    assert ddg_epsilon(looser, 20, 1e-5, 0.5) > 3.0


def test_noise_is_calibrated_to_min_survivors():
    cfg = make_config(20, 100, l2_clip=1.0, noise_stddev=3.0, min_survivors=12)
    params = ddg_params_from_config(cfg)
    assert params.num_summed == 12
    # m local shares of variance sigma^2/m make up the target total noise (integer units)
    scale = UpdateEncoder(cfg).scale
    assert params.local_sigma == pytest.approx(3.0 * scale / 12**0.5)
