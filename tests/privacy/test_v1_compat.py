"""What the previous version wrote (tests/privacy/data) still parses, keeps its bytes,
verifies and replays to the numbers that version computed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from confide.privacy import ledger_events as ev
from confide.privacy.mechanisms import (
    ClientLevelGaussian,
    DistributedDiscreteGaussian,
    SampledGaussian,
    SharedNoiseSampledGaussian,
)
from confide.privacy.receipts import Receipt, mismatches, verify_receipt
from confide.privacy.refusals import lifetime_spends, refusal_mismatches, verify_refusal
from confide.privacy.replay import (
    replay_client_level,
    replay_example_level,
    replay_sampled_gaussians,
)
from confide.run_layout import canonical_json

V1 = json.loads((Path(__file__).parent / "data" / "v1_privacy_facts.json").read_text())
NUMBERS = V1["numbers"]
ENTRIES: list[dict[str, Any]] = [e for group in ("example_and_refusal", "client_fixed",
                                                 "client_ddg", "secure_aggregation")
                                 for e in V1[group]]


def _events(group: str) -> list[Any]:
    return [ev.parse_payload(e["type"], e["payload"]) for e in V1[group]]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e["type"])
def test_payloads_parse_and_keep_their_bytes(entry: dict[str, Any]) -> None:
    event = ev.parse_payload(entry["type"], entry["payload"])
    assert canonical_json(event.to_payload()) == canonical_json(entry["payload"])


def test_client_level_params_read_as_they_were_written() -> None:
    """The report prints a client_dp's params, sorted, nested objects as Python dicts: the
    same text whether the event was parsed from the ledger or built by the server."""
    for entry in [*V1["client_fixed"], *V1["client_ddg"]]:
        event = ev.parse_payload(entry["type"], entry["payload"])
        assert isinstance(event, ev.ClientDpEvent)
        built = ev.ClientDpEvent(round=event.round, mechanism=dataclasses.replace(
            event.mechanism), delta=event.delta, accountant=event.accountant)
        shown = [repr(sorted(params.items())) for params in
                 (built.params, event.params, entry["payload"]["params"])]
        assert shown[0] == shown[1] == shown[2]


def test_each_entry_holds_its_mechanism() -> None:
    kinds = [type(getattr(e, "mechanism", None)) for e in _events("example_and_refusal")]
    assert kinds == [SampledGaussian, SampledGaussian, SharedNoiseSampledGaussian,
                     SharedNoiseSampledGaussian, type(None)]
    assert {type(e.mechanism) for e in _events("client_fixed")} == {ClientLevelGaussian}
    ddg = _events("client_ddg")
    assert [e.mechanism.released for e in ddg] == [False, True, True]
    assert {type(e.mechanism) for e in ddg} == {DistributedDiscreteGaussian}
    aborts = [e.abort for e in _events("secure_aggregation")]
    assert aborts[0] is not None and aborts[0].reason.startswith("too few")
    assert aborts[1] is None


def test_receipts_verify_and_match_their_entries() -> None:
    for event in _events("example_and_refusal"):
        if isinstance(event, ev.ExampleDpEvent):
            assert event.receipt is not None
            verify_receipt(event.receipt)
            assert mismatches(event.receipt, event.to_payload()) == []


def test_signed_refusal_verifies_and_its_spends_replay_to_its_claims() -> None:
    (refusal,) = [e for e in _events("example_and_refusal")
                  if isinstance(e, ev.BudgetRefusal)]
    assert refusal.receipt is not None
    signed = verify_refusal(Receipt.from_dict(refusal.receipt))
    assert refusal_mismatches(signed, refusal.to_payload()) == []
    spends, planned = lifetime_spends(signed)
    assert [(s.round, s.run) for s in spends] == [(1, V1["run_key"]), (2, V1["run_key"])]
    assert planned.mechanism == SampledGaussian(1.3, 0.05, 2000)
    low, spent = replay_sampled_gaussians([s.mechanism for s in spends], V1["delta"], "pld")
    assert spent == pytest.approx(refusal.spent_epsilon, rel=0.01)
    assert low is not None and low <= refusal.spent_epsilon
    _, would_be = replay_sampled_gaussians([*(s.mechanism for s in spends),
                                            planned.mechanism], V1["delta"], "pld")
    assert would_be == pytest.approx(refusal.would_be_epsilon, rel=0.01)


def test_replays_give_the_previous_numbers() -> None:
    examples = [e for e in _events("example_and_refusal") if isinstance(e, ev.ExampleDpEvent)]
    for partner, rep in replay_example_level(examples, V1["delta"]).items():
        want = NUMBERS["example_replay"][partner]
        assert (rep.rdp_epsilons, rep.methods) == (want["rdp"], want["methods"])
        # PRV and PLD: releases of one (sigma, q) are now folded into one history entry,
        # one self-composition (the same composition; the numerics differ in the 11th digit)
        assert rep.pld_epsilon == pytest.approx(want["pld"], rel=1e-9)
        assert rep.epsilons == pytest.approx(want["epsilons"], rel=1e-9)
        assert [x for x in rep.lower_bounds if x is not None] == pytest.approx(
            [x for x in want["lower"] if x is not None], rel=1e-9)
        assert [x is None for x in rep.lower_bounds] == [x is None for x in want["lower"]]
    assert replay_client_level(_events("client_fixed")).epsilons == NUMBERS["fixed_replay"]
    ddg = _events("client_ddg")
    assert replay_client_level(ddg).epsilons == NUMBERS["ddg_replay"] == \
        [e.epsilon_claimed for e in ddg]


def test_earlier_secure_rounds_verify_and_are_marked_without_the_new_guarantees() -> None:
    from confide.audit.verify import verify_run

    result = verify_run(Path(__file__).parents[1] / "audit" / "data" / "run_v1_pld")
    payloads = next(c for c in result.checks if c.name == "payloads")
    assert payloads.status == "PASS"
    assert "recorded before partner identities and consistency votes" in payloads.detail
