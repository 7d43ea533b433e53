"""The one-run empirical audit catches a run whose DP noise is switched off, never exceeds
the claimed epsilon on an honest DP run, and says when the claim is above what it can
certify (tiny model, 2 partners, 200 canaries)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from confide.audit.empirical_bounds import max_certifiable_epsilon
from confide.config import build_config
from confide.empirical.one_run import guess_and_count, run_empirical_audit, verdict_lines
from tests.empirical.files import write_sentiment_csv

NOISE_OFF_THRESHOLD = 1.5  # stated: with noise off the audit must certify more than this


def test_guessing_counts_top_and_bottom() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5])
    included = np.array([True, False, False, False, True])
    assert guess_and_count(scores, included, 2) == (4, 3)


@pytest.fixture(scope="module")
def audits(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("empirical")
    base = {"model": "tiny", "fine-tune": "full", "clients": 2, "rounds": 2,
            "local-epochs": 10.0, "learning-rate": 3e-3, "head-learning-rate": 0.0,
            "batch-size": 32, "physical-batch-size": 32, "max-length": 16,
            "data": str(write_sentiment_csv(root / "train.csv", 200, 1)),
            "eval-data": str(write_sentiment_csv(root / "eval.csv", 100, 2)),
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


def test_a_claim_above_the_cap_is_called_inconclusive_with_the_way_out(audits) -> None:
    _, honest = audits
    cap = max_certifiable_epsilon(200, 40, honest.delta)
    assert honest.max_certifiable == pytest.approx(cap)
    assert cap < honest.claimed_epsilon  # 200 canaries cannot test a claim near 8
    lines = verdict_lines(honest)
    assert lines[0].startswith(f"INCONCLUSIVE: this audit cannot refute a claim above "
                               f"{cap:.3f}")
    assert "--white-box" in lines[0] and "--guess-fraction 1" in lines[0]
    # 20% guessed: no canary count reaches 8 at delta 1e-5, and the record says so
    record = json.loads((Path(honest.run_dir).parent / "empirical_audit.json").read_text())
    assert record["max_certifiable"] == pytest.approx(cap)
    assert record["can_refute_claim"] is False and record["refuted"] is False
    assert record["canaries_needed"] is None and record["confidence"] == 0.95


def test_a_run_without_dp_claims_nothing(audits) -> None:
    noise_off, _ = audits
    assert noise_off.can_refute_claim is None and not noise_off.refuted
    assert "claims no example-level DP" in verdict_lines(noise_off)[1]
    assert noise_off.record()["claimed_epsilon"] is None
