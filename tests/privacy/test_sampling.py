"""One sampling plan for every party."""

from __future__ import annotations

import pytest

from confide.privacy.sampling import RoundSampling, plan_round, poisson_rate


def test_rate_and_steps_make_the_expected_passes() -> None:
    assert plan_round(64, 3000, 1.0) == RoundSampling(64 / 3000, round(3000 / 64))
    assert plan_round(64, 40, 1.0) == RoundSampling(1.0, 1)  # q capped at one
    assert plan_round(16, 1000, 0.04).steps == 2  # 0.04 passes at q = 0.016
    assert plan_round(16, 1000, 0.001).steps == 1  # at least one step


def test_a_rate_needs_records() -> None:
    assert poisson_rate(1024, 3000) == pytest.approx(1024 / 3000)
    with pytest.raises(ValueError, match="at least one record"):
        poisson_rate(16, 0)
