import itertools
import math

import pytest

from confide.privacy.accountant import (
    RDP_ORDERS,
    BudgetExhausted,
    PartnerAccountant,
    SampledGaussianEvent,
    calibrate_noise,
    rdp_epsilon,
)


def test_epsilon_is_cumulative_and_monotone() -> None:
    acc = PartnerAccountant(delta=1e-5, max_epsilon=100)
    eps = [acc.record(SampledGaussianEvent(1.0, 0.05, 20, r)) for r in range(1, 6)]
    assert all(b > a for a, b in itertools.pairwise(eps))
    # composing five rounds equals one event with all steps (RDP composes additively)
    assert eps[-1] == pytest.approx(rdp_epsilon([SampledGaussianEvent(1.0, 0.05, 100)], 1e-5))


def test_matches_opacus_rdp_accountant() -> None:
    from opacus.accountants import RDPAccountant

    ref = RDPAccountant()
    for _ in range(30):
        ref.step(noise_multiplier=0.9, sample_rate=0.02)
    ours = rdp_epsilon([SampledGaussianEvent(0.9, 0.02, 30)], 1e-5)
    assert ours == pytest.approx(ref.get_epsilon(1e-5, alphas=RDP_ORDERS), rel=1e-9)
    # Opacus' fractional default orders are a little tighter here, never looser than ours.
    assert ours >= ref.get_epsilon(1e-5)


def test_integer_orders_agree_with_dp_accounting_where_fractional_opacus_understates() -> None:
    import dp_accounting
    from opacus.accountants.analysis import rdp as opacus_rdp

    q, sigma, steps = 0.3, 0.5, 100
    acc = dp_accounting.rdp.RdpAccountant(RDP_ORDERS)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                steps)
    ours = rdp_epsilon([SampledGaussianEvent(sigma, q, steps)], 1e-5)
    assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    frac = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    opacus_frac = opacus_rdp.get_privacy_spent(
        orders=frac, rdp=opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                                orders=frac), delta=1e-5)[0]
    assert opacus_frac < 0.8 * ours  # why the accountant avoids fractional orders


def test_budget_guard_refuses_before_spending() -> None:
    acc = PartnerAccountant(delta=1e-5, max_epsilon=2.0)
    ev = SampledGaussianEvent(1.5, 0.05, 20, 1)
    first = acc.check(ev)
    acc.record(ev)
    refused = 0
    for r in range(2, 20):
        ev = SampledGaussianEvent(1.5, 0.05, 20, r)
        try:
            acc.check(ev)
        except BudgetExhausted as exc:
            refused += 1
            assert exc.would_be > 2.0 >= exc.spent
            assert "max-epsilon 2.0000" in str(exc)
            continue
        acc.record(ev)
    assert refused == 18 - 4  # rounds 2..5 fit (eps 1.88 at 5 rounds), the rest refused
    assert acc.epsilon() <= 2.0 and acc.epsilon() >= first


def test_state_dict_roundtrip_keeps_history_and_refuses_other_delta() -> None:
    acc = PartnerAccountant(delta=1e-5, max_epsilon=5)
    acc.record(SampledGaussianEvent(1.2, 0.1, 10, 1))
    again = PartnerAccountant.from_state_dict(acc.state_dict())
    assert again.epsilon() == acc.epsilon() and again.rounds() == [1]
    other = PartnerAccountant(delta=1e-6, max_epsilon=5)
    with pytest.raises(ValueError, match="delta"):
        other.load_state_dict(acc.state_dict())


def test_calibration_hits_target() -> None:
    sigma = calibrate_noise(3.0, 1e-5, 0.05, 200)
    eps = rdp_epsilon([SampledGaussianEvent(sigma, 0.05, 200)], 1e-5)
    assert eps <= 3.0 and eps > 2.9
    assert math.isinf(rdp_epsilon([SampledGaussianEvent(0.0, 0.05, 1)], 1e-5))
