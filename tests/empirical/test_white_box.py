"""The white-box one-run audit (gradient canaries through the partners' DP-SGD): a run that
claims epsilon 8 with its noise secretly off is refuted, the same run with its noise is not,
and an audit too small to refute the claim says how many canaries it needs.

The attacker here is a bug: Opacus' noise generator patched to return zeros while the
calibration, the accountant and the claim stay as they are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from confide.audit.empirical_bounds import canaries_needed, max_certifiable_epsilon
from confide.cli import main
from confide.config import build_config
from confide.empirical.white_box import (
    count_correct,
    draw_inclusion,
    guesses_for_plan,
    train_with_canaries,
)
from tests.empirical.files import write_sentiment_csv

REFUTING_CANARIES = 14_000  # > 12,977: every canary guessed right certifies > 8 at 1e-5


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("white_box_data")
    # Batch above every row count: sampling rate 1, so every included canary is in every
    # step (the audit's threshold rule guesses every canary)
    return {"model": "tiny", "fine-tune": "head", "clients": 2, "rounds": 1,
            "local-epochs": 1.0, "batch-size": 65536, "physical-batch-size": 2048,
            "max-length": 16, "device": "cpu", "target-epsilon": 8.0, "max-epsilon": 8.0,
            "data": str(write_sentiment_csv(root / "train.csv", 80, 1)),
            "eval-data": str(write_sentiment_csv(root / "eval.csv", 40, 2))}


def _noise_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import opacus.optimizers.optimizer as plain
    import opacus.optimizers.optimizer_fast_gradient_clipping as fast

    def zeros(std: float, reference: torch.Tensor, generator: Any = None,
              secure_mode: bool = False) -> torch.Tensor:
        return torch.zeros_like(reference)

    monkeypatch.setattr(plain, "_generate_noise", zeros)
    monkeypatch.setattr(fast, "_generate_noise", zeros)


def _cli(settings: dict[str, Any], out: Path, *extra: str) -> int:
    sets = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    return main(["audit", "empirical", *sets, "--out", str(out), *extra])


def test_a_canary_moves_its_own_coordinate_by_exactly_one_clipped_step(
        settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    _noise_off(monkeypatch)
    cfg = build_config({**settings, "optimizer": "sgd", "local-epochs": 2.0,
                        "physical-batch-size": 64})
    included = draw_inclusion(300, seed=3)
    run = train_with_canaries(cfg, included)
    assert run.sample_rate == 1.0 and run.steps == 2
    # clipped to C (the raw canary gradient is 1e6 C), divided by the expected batch: one
    # unit per step for an included canary, nothing for an excluded one or from natural rows
    np.testing.assert_allclose(run.scores[included], 2.0, rtol=1e-4)
    assert np.all(run.scores[~included] == 0.0)
    assert count_correct(run, included) == (300, 300)


def test_below_rate_one_only_in_guesses_are_made_and_all_are_right_without_noise(
        settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    _noise_off(monkeypatch)
    cfg = build_config({**settings, "batch-size": 128, "local-epochs": 3.0,
                        "physical-batch-size": 128})
    included = draw_inclusion(600, seed=4)
    run = train_with_canaries(cfg, included)
    assert run.sample_rate < 1.0 and run.plan.rule == "top"
    guesses, correct = count_correct(run, included)
    assert guesses == run.plan.guesses < included.sum()  # never-sampled ones are not guessed
    assert correct == guesses
    # the plan is fixed by public facts: the same rule gives the count canaries_needed scans
    assert guesses_for_plan(run.sample_rate, run.steps * run.rounds)(600) == guesses


def test_a_noise_free_run_claiming_8_is_refuted(
        settings: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _noise_off(monkeypatch)
    code = _cli(settings, tmp_path / "off", "--white-box", "--canaries",
                str(REFUTING_CANARIES))
    out = " ".join(capsys.readouterr().out.split())
    record = json.loads((tmp_path / "off" / "empirical_audit.json").read_text())
    assert code == 1
    assert 7.9 < record["claimed_epsilon"] <= 8.0  # the claim stands: only the noise is gone
    assert record["correct"] == record["guesses"] == REFUTING_CANARIES
    bound = record["epsilon_lower_bound"]
    assert bound == pytest.approx(max_certifiable_epsilon(REFUTING_CANARIES,
                                                          REFUTING_CANARIES, 1e-5))
    assert bound > record["claimed_epsilon"] and record["refuted"] is True
    assert (f"REFUTED: the run is not ({record['claimed_epsilon']:.3f}, 1e-05)-DP: the "
            f"empirical lower bound {bound:.3f} exceeds the claimed epsilon") in out


def test_the_same_run_with_its_noise_is_not_refuted(
        settings: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = _cli(settings, tmp_path / "dp", "--white-box", "--canaries",
                str(REFUTING_CANARIES), "--json")
    record = json.loads(capsys.readouterr().out)
    assert code == 0
    assert record["method"] == "white-box" and record["can_refute_claim"] is True
    assert record["epsilon_lower_bound"] <= record["claimed_epsilon"] <= 8.0
    assert record["mechanism"]["noise_multiplier"] > 0.3
    assert record["verdict"][0].startswith("Not refuted")


def test_too_few_canaries_say_the_claim_is_out_of_reach_and_how_many_would_do(
        settings: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _noise_off(monkeypatch)
    code = _cli(settings, tmp_path / "few", "--white-box", "--canaries", "2000", "--json")
    record = json.loads(capsys.readouterr().out)
    assert code == 0  # every guess right, yet 2,000 canaries cannot certify 8
    assert record["correct"] == record["guesses"] == 2000
    assert record["can_refute_claim"] is False
    cap = max_certifiable_epsilon(2000, 2000, 1e-5)
    assert record["max_certifiable"] == pytest.approx(cap)
    need = canaries_needed(record["claimed_epsilon"], 1e-5, lambda m: m)
    assert record["canaries_needed"] == need
    assert record["verdict"][0] == (
        f"INCONCLUSIVE: this audit cannot refute a claim above {cap:.3f}; the run claims "
        f"{record['claimed_epsilon']:.3f}, so passing says nothing about that claim. To "
        f"refute it, use --canaries {need} or more.")
    assert record["method"] == "white-box"


@pytest.mark.parametrize(("extra_sets", "flags", "message"), [
    ({"example-dp": "false"}, ["--white-box"], "there is no claim to test"),
    ({"secure-aggregation": "true", "example-dp-noise": "shared"}, ["--white-box"],
     "example-dp-noise = 'shared'"),
    ({}, ["--white-box", "--guess-fraction", "0.5"], "--guess-fraction applies to the "
     "black-box audit"),
    ({}, ["--guess-fraction", "0"], "--guess-fraction"),
    ({}, ["--white-box", "--canaries", "1"], "--canaries 1; allowed: >= 2"),
    ({}, ["--white-box", "--confidence", "1.5"], "--confidence 1.5"),
])
def test_bad_white_box_settings_are_named_before_training(
        settings: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        extra_sets: dict[str, str], flags: list[str], message: str) -> None:
    assert _cli({**settings, **extra_sets}, tmp_path / "bad", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "bad" / "empirical_audit.json").exists()
