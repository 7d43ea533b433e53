"""The privacy mode: the flags resolved and validated once, and the only place outside the
configuration that reads them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from confide import modes
from confide.config import ConfigError, build_config
from confide.modes import ClientLevel, ExampleNoise, PrivacyMode
from confide.privacy import ledger_events as E
from confide.privacy.accountant import PLD, RDP

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
    assert (E.CLIENT_DP in mode.ledger_events) == (client is not ClientLevel.OFF)
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
    central = PrivacyMode(ExampleNoise.OFF, ClientLevel.CENTRAL, False)
    distributed = PrivacyMode(ExampleNoise.OFF, ClientLevel.DISTRIBUTED, True)
    assert (central.client_accountant, distributed.client_accountant) == (PLD, RDP)


def test_only_the_allowed_modules_read_the_privacy_flags() -> None:
    readers = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
               if FLAGS.search(p.read_text())}
    assert readers <= STILL_READING_FLAGS, (
        f"{sorted(readers - STILL_READING_FLAGS)} read privacy flags: ask cfg.privacy_mode")
    gone = STILL_READING_FLAGS - readers
    assert not gone, f"{sorted(gone)} no longer read the flags: take them off the list"
