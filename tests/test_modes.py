"""The privacy mode: the flags resolved and validated once, and the only place outside the
configuration that reads them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from confide import modes
from confide import wire as W
from confide.config import ConfigError, build_config
from confide.modes import ClientLevel, ExampleNoise, PrivacyMode
from confide.privacy import ledger_events as E
from confide.privacy.accountant import PLD, RDP, calibrate_noise
from confide.privacy.mode_rules import rules_of

ROOT = Path(__file__).resolve().parents[1] / "confide"
FLAGS = re.compile(r"\bcfg\.(example_dp_noise|example_dp|client_dp|secure_aggregation|"
                   r"distributed_dp)\b")
# Modules that still read a privacy flag from a RunConfig themselves. Only the configuration
# (confide/config.py, as `self.`) and the mode object should: this list only shrinks, each
# module moved onto `cfg.privacy_mode` leaves it.
STILL_READING_FLAGS: set[str] = set()


@pytest.mark.parametrize(("values", "example", "client", "secure"), [
    ({}, ExampleNoise.LOCAL, ClientLevel.OFF, False),
    ({"example-dp": False}, ExampleNoise.OFF, ClientLevel.OFF, False),
    ({"secure-aggregation": True}, ExampleNoise.SHARED, ClientLevel.OFF, True),
    ({"secure-aggregation": True, "example-dp-noise": "local"}, ExampleNoise.LOCAL,
     ClientLevel.OFF, True),
    ({"client-dp": True}, ExampleNoise.LOCAL, ClientLevel.CENTRAL, False),
    ({"secure-aggregation": True, "distributed-dp": True}, ExampleNoise.LOCAL,
     ClientLevel.DISTRIBUTED, True),
])
def test_each_supported_combination_is_one_mode(values, example, client, secure) -> None:
    mode = build_config(values).privacy_mode
    assert (mode.example, mode.client, mode.secure) == (example, client, secure)
    assert mode.any_dp == (example is not ExampleNoise.OFF or client is not ClientLevel.OFF)
    assert mode.weighted_sum == (secure and client is not ClientLevel.DISTRIBUTED
                                 and example is not ExampleNoise.SHARED)
    rules = rules_of(mode)
    assert (E.CLIENT_DP in rules.ledger_events) == (client is not ClientLevel.OFF)
    assert (E.EXAMPLE_DP in rules.ledger_events) == (example is not ExampleNoise.OFF)
    assert (E.SECURE_AGGREGATION in rules.ledger_events) == secure
    assert (rules.example.noise, rules.client.level) == (example, client)
    assert mode.name


@pytest.mark.parametrize(("values", "why"), [
    ({"secure-aggregation": True, "client-dp": True}, "exclude each other"),
    ({"distributed-dp": True}, "needs secure-aggregation"),
    ({"client-dp": True, "distributed-dp": True, "secure-aggregation": True},
     "exclude each other"),
])
def test_unsupported_combinations_are_refused_with_the_configuration(values, why) -> None:
    with pytest.raises(ConfigError, match=why):
        build_config(values)


def test_the_mode_speaks_the_ledger_and_accountants_names() -> None:
    assert (modes.EXAMPLE_DP, modes.CLIENT_DP, modes.SECURE_AGGREGATION) == (
        E.EXAMPLE_DP, E.CLIENT_DP, E.SECURE_AGGREGATION)
    assert (modes.PLD, modes.RDP) == (PLD, RDP)
    central = PrivacyMode(ExampleNoise.OFF, ClientLevel.CENTRAL, False)
    distributed = PrivacyMode(ExampleNoise.OFF, ClientLevel.DISTRIBUTED, True)
    assert (rules_of(central).client.accountant, rules_of(distributed).client.accountant) == (
        PLD, RDP)


def test_each_mode_calibrates_its_noise_by_the_one_rule() -> None:
    # local noise: the node's steps per round over all rounds; shared noise: one step per
    # round at the federation's common rate; no example DP: no noise
    cfg = build_config({"rounds": 3, "target-epsilon": 4.0})
    local = rules_of(cfg.privacy_mode).example
    assert local.noise_multiplier(cfg, 0.1, 5) == calibrate_noise(4.0, cfg.delta, 0.1, 15)
    shared_cfg = build_config({"rounds": 3, "target-epsilon": 4.0, "secure-aggregation": True})
    shared = rules_of(shared_cfg.privacy_mode).example
    assert shared.noise == ExampleNoise.SHARED
    assert shared.noise_multiplier(shared_cfg, 0.1) == calibrate_noise(4.0, cfg.delta, 0.1, 3)
    assert local.noise_multiplier(cfg, 0.1, 5) > shared.noise_multiplier(shared_cfg, 0.1)
    fixed = cfg.replace(noise_multiplier=1.7)
    assert local.noise_multiplier(fixed, 0.1, 5) == 1.7
    off = build_config({"example-dp": False})
    assert rules_of(off.privacy_mode).example.noise_multiplier(off, 0.1, 5) == 0.0


@pytest.mark.parametrize(("values", "raw"), [
    ({"example-dp": False}, True), ({}, False), ({"secure-aggregation": True}, False),
    ({"example-dp": False, "client-dp": True}, False)])
def test_replies_carry_raw_statistics_only_without_any_dp(values, raw) -> None:
    fields = rules_of(build_config(values).privacy_mode).reply_fields
    assert (W.TRAIN_LOSS in fields, W.TRAIN_SECONDS in fields) == (raw, raw)
    assert {W.NUM_EXAMPLES, W.EPSILON, W.STEPS, W.SAMPLE_RATE, W.NOISE_MULTIPLIER} <= set(fields)


@pytest.mark.parametrize(("values", "names"), [
    ({"example-dp": False}, []),
    ({}, ["example-dp"]),
    ({"secure-aggregation": True}, ["example-dp (shared noise)"]),
    ({"client-dp": True}, ["example-dp", "client-dp"]),
    ({"example-dp": False, "secure-aggregation": True, "distributed-dp": True},
     ["distributed-dp"])])
def test_each_mode_estimates_its_own_mechanisms(values, names) -> None:
    cfg = build_config({"rounds": 3, **values})
    estimates = rules_of(cfg.privacy_mode).estimates(cfg, 10_000, 4, [300] * 4)
    assert [m.mechanism for m in estimates] == names


def test_only_the_allowed_modules_read_the_privacy_flags() -> None:
    readers = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
               if FLAGS.search(p.read_text())}
    assert readers <= STILL_READING_FLAGS, (
        f"{sorted(readers - STILL_READING_FLAGS)} read privacy flags: ask cfg.privacy_mode")
    gone = STILL_READING_FLAGS - readers
    assert not gone, f"{sorted(gone)} no longer read the flags: take them off the list"
