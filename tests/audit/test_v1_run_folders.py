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
    statuses = {c.name: c.status for c in result.checks}
    assert {k: statuses[k] for k in want["checks"]} == want["checks"]
    # the stored folders hold no partners/ or checkpoint/: those checks have nothing to read
    assert {k: v for k, v in statuses.items() if k not in want["checks"]} == \
        {"partners": "SKIP", "checkpoint": "SKIP"}
    assert result.verdict == "PASS"
    assert set(want["checks"].values()) == {"PASS"}
    for partner, rep in result.example_level.items():
        w = want["example"][partner]
        assert rep.rdp_epsilons == w["rdp"]
        # PRV and PLD: one (sigma, q)'s releases are folded into one history entry, one
        # self-composition (the same composition; the numerics differ in the 11th digit)
        assert rep.pld_epsilon == pytest.approx(w["pld"], rel=1e-9)
        assert rep.epsilons == pytest.approx(w["epsilons"], rel=1e-9)
        assert [x is None for x in rep.lower_bounds] == [x is None for x in w["lower"]]
        assert [x for x in rep.lower_bounds if x is not None] == pytest.approx(
            [x for x in w["lower"] if x is not None], rel=1e-9)
    assert result.client_level is not None
    assert result.client_level.epsilons == want["client"]
