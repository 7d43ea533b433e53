"""The shared-noise round's padded budget and its truncation probability
(confide.privacy.secagg.shared_noise: binomial_tail, padded_slots), and that probability in
the round's mechanism event (its TV slack, hence delta)."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binom

from confide.privacy.secagg import SecAggValidationError
from confide.privacy.secagg.shared_noise import (
    TRUNCATION_TAIL,
    SharedNoiseConfig,
    binomial_tail,
    delta_with_slack,
    padded_slots,
)


@pytest.mark.parametrize(("n", "q", "b"), [
    (5001, 0.0512, 300), (5001, 0.0512, 373), (301, 0.34, 140), (10, 0.5, 3),
    (100_000, 0.01, 1100), (50, 0.02, 0), (7, 0.9, 6), (1, 0.3, 0)])
def test_binomial_tail_is_scipys(n: int, q: float, b: int) -> None:
    assert binomial_tail(n, q, b) == pytest.approx(binom.sf(b, n, q), rel=1e-9, abs=1e-300)


def test_binomial_tail_edges() -> None:
    assert binomial_tail(10, 0.3, 10) == 0.0 and binomial_tail(10, 0.3, -1) == 1.0
    assert binomial_tail(10, 1.0, 9) == 1.0 and binomial_tail(10, 0.0, 0) == 0.0
    with pytest.raises(SecAggValidationError, match=r"q = 1\.5 is not in"):
        binomial_tail(10, 1.5, 3)


@pytest.mark.parametrize(("rows", "q"), [(5000, 1024 / 20000), (300, 1024 / 3000),
                                         (1_000_000, 0.001), (100, 0.02), (560, 32 / 1680)])
def test_the_budget_is_the_smallest_whose_overflow_is_below_the_tail(rows: int, q: float
                                                                     ) -> None:
    slots, tail = padded_slots(rows, q)
    # a neighbouring data set holds one record more: the overflow of rows + 1 records
    assert tail == pytest.approx(binom.sf(slots, rows + 1, q), rel=1e-9)
    assert tail <= TRUNCATION_TAIL < binom.sf(slots - 1, rows + 1, q)
    mean, sd = (rows + 1) * q, math.sqrt((rows + 1) * q * (1 - q))
    assert mean < slots <= mean + 9 * sd + 10  # the price: a few standard deviations


def test_full_batch_rounds_pad_to_the_neighbours_size_and_never_truncate() -> None:
    assert padded_slots(100, 1.0) == (101, 0.0)


@pytest.mark.parametrize(("rows", "q", "needle"), [
    (0, 0.5, "public_rows = 0"), (10, 0.0, "sample_rate = 0.0"),
    (10, 1.2, "sample_rate = 1.2"), (2.5, 0.5, "public_rows = 2.5")])
def test_bad_budget_inputs_are_named(rows: object, q: float, needle: str) -> None:
    with pytest.raises(SecAggValidationError, match=needle):
        padded_slots(rows, q)  # type: ignore[arg-type]


def test_the_truncation_probability_is_in_the_rounds_slack_and_so_in_delta() -> None:
    shared = SharedNoiseConfig(clip=1.0, noise_multiplier=1.0, num_clients=4,
                               min_survivors=3, colluders=0, max_examples=4000,
                               vector_length=1000, bits=48)
    _, tail = padded_slots(1000, 0.05)
    plain, padded = shared.mechanism(0.05), shared.mechanism(0.05, tail)
    assert padded.tv_slack == pytest.approx(plain.tv_slack + tail, rel=1e-12)
    assert 0 < tail <= TRUNCATION_TAIL
    # over 60 rounds at epsilon 8 the truncation adds at most 1.8e-7 to delta 1e-5
    assert delta_with_slack(0.0, 8.0, 60 * TRUNCATION_TAIL) < 1.8e-7
    with pytest.raises(SecAggValidationError, match=r"truncation_tail = -0\.1 is not a"):
        shared.mechanism(0.05, -0.1)
