"""The one-run empirical audit catches a run whose DP noise is switched off, and never
exceeds the claimed epsilon on an honest DP run (tiny model, 2 partners, 200 canaries)."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from confide.audit.empirical_bounds import (
    epsilon_lower_bound,
    max_certifiable_epsilon,
    p_value,
)
from confide.config import build_config
from confide.data import synthetic_sentiment
from confide.empirical.one_run import guess_and_count, run_empirical_audit

NOISE_OFF_THRESHOLD = 1.5  # stated: with noise off the audit must certify more than this


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


def test_guessing_counts_top_and_bottom() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5])
    included = np.array([True, False, False, False, True])
    assert guess_and_count(scores, included, 2) == (4, 3)


def _write(path: Path, n: int, seed: int) -> Path:
    data = synthetic_sentiment(n, seed=seed)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(zip(data.texts, data.labels.tolist(), strict=True))
    return path


@pytest.fixture(scope="module")
def audits(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("empirical")
    base = {"model": "tiny", "fine-tune": "full", "clients": 2, "rounds": 2,
            "local-epochs": 10.0, "learning-rate": 3e-3, "head-learning-rate": 0.0,
            "batch-size": 32, "physical-batch-size": 32, "max-length": 16,
            "data": str(_write(root / "train.csv", 200, 1)),
            "eval-data": str(_write(root / "eval.csv", 100, 2)),
            "target-epsilon": 8.0, "max-epsilon": 8.0}
    noise_off = run_empirical_audit(build_config({**base, "example-dp": False}),
                                    canaries=200, work_dir=root / "off", seed=1)
    honest = run_empirical_audit(build_config({**base, "example-dp": True}),
                                 canaries=200, work_dir=root / "dp", seed=1)
    return noise_off, honest


def test_noise_off_is_caught(audits) -> None:
    noise_off, honest = audits
    assert noise_off.epsilon_lower_bound > NOISE_OFF_THRESHOLD
    assert noise_off.epsilon_lower_bound > honest.epsilon_lower_bound + 1.0


def test_honest_dp_run_stays_below_its_claim(audits) -> None:
    _, honest = audits
    assert honest.claimed_epsilon <= 8.0
    assert honest.epsilon_lower_bound <= honest.claimed_epsilon
    assert (Path(honest.run_dir).parent / "empirical_audit.json").exists()
