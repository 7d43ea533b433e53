"""Run folders written by the previous version (tests/audit/data, see
tests/privacy/data/README.md) still verify, with the same replayed numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confide.audit.verify import verify_run

DATA = Path(__file__).parent / "data"
V1 = json.loads((Path(__file__).parents[1] / "privacy" / "data" /
                 "v1_privacy_facts.json").read_text())


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_previous_run_folders_verify_to_the_same_numbers(accountant: str) -> None:
    result = verify_run(DATA / f"run_v1_{accountant}")
    want = V1["runs"][accountant]
    assert {c.name: c.status for c in result.checks} == want["checks"]
    assert set(want["checks"].values()) == {"PASS"}
    for partner, rep in result.example_level.items():
        w = want["example"][partner]
        assert (rep.epsilons, rep.rdp_epsilons, rep.lower_bounds, rep.pld_epsilon) == \
            (w["epsilons"], w["rdp"], w["lower"], w["pld"])
    assert result.client_level is not None
    assert result.client_level.epsilons == want["client"]
