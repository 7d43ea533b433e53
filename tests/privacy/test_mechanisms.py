"""The mechanism events: JSON round trips, named errors, and composition through the
accountants to the numbers the previous version computed (tests/privacy/data)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from confide.privacy.accountant import (
    DISTRIBUTED_DG_RDP,
    NoRule,
    PartnerAccountant,
    Spend,
    pld_epsilon,
    rdp_epsilon,
)
from confide.privacy.json_fields import PayloadError
from confide.privacy.mechanisms import (
    MECHANISMS,
    ClientLevelGaussian,
    DistributedDiscreteGaussian,
    Mechanism,
    SampledGaussian,
    SecureAggregationAbort,
    SharedNoiseSampledGaussian,
    UnregisteredClientMechanism,
    client_level_from_json,
    example_level_from_json,
)
from confide.privacy.secagg import DistributedDGAccountant

V1 = json.loads((Path(__file__).parent / "data" / "v1_privacy_facts.json").read_text())
NUMBERS = V1["numbers"]
DELTA = V1["delta"]
# PLD composes through FFTs whose last bits depend on the CPU's vector width (CI machines
# differ from the one that wrote the numbers); RDP is closed-form and compared exactly
PLD_REL = 1e-9

SHARED = SharedNoiseSampledGaussian(NUMBERS["shared_effective_sigma"], 0.05, 1,
                                    noise_shares=NUMBERS["shared_m"], colluders=1,
                                    tv_slack=NUMBERS["shared_tv_slack"])
DDG = DistributedDiscreteGaussian(1.3, 0.7, 6, 5, **NUMBERS["ddg_params"], min_survivors=3,
                                  noise_stddev=0.4, bits=32)
ONE_OF_EACH: list[Mechanism] = [
    SampledGaussian(1.1, 0.02, 50), SHARED, ClientLevelGaussian(0.9, 0.7, 12, 5, 1.0),
    ClientLevelGaussian(1.5, 1.0, 3, 2), DDG,
    DistributedDiscreteGaussian(1.3, 0.7, 6, 5, **NUMBERS["ddg_params"], released=False),
    SecureAggregationAbort("too few survivors: 2 < 3")]


def test_every_registered_kind_has_an_example_here() -> None:
    assert set(MECHANISMS) == {type(m).KIND for m in ONE_OF_EACH}


@pytest.mark.parametrize("mechanism", ONE_OF_EACH, ids=lambda m: f"{m.KIND}")
def test_each_mechanism_names_and_describes_itself_for_the_report(mechanism: Mechanism
                                                                  ) -> None:
    import dataclasses

    assert mechanism.title and mechanism.title != mechanism.KIND
    text = mechanism.describe()
    for f in dataclasses.fields(mechanism):  # type: ignore[arg-type]  # mechanisms are dataclasses
        if getattr(mechanism, f.name) is not None:
            assert f"{f.name}=" in text, (f.name, text)


@pytest.mark.parametrize("mechanism", ONE_OF_EACH, ids=lambda m: f"{m.KIND}")
def test_to_json_and_from_json_round_trip(mechanism: Mechanism) -> None:
    data = json.loads(json.dumps(mechanism.to_json()))  # through JSON text
    assert type(mechanism).from_json(data) == mechanism
    assert str(mechanism) == mechanism.KIND  # how messages and the report name it


def test_tagged_families_dispatch_on_their_tags() -> None:
    assert example_level_from_json(SampledGaussian(1.0, 0.1, 3).to_json()) == \
        SampledGaussian(1.0, 0.1, 3)
    assert example_level_from_json(SHARED.to_json()) == SHARED
    assert client_level_from_json({"mechanism": DDG.KIND, **DDG.to_json()}) == DDG


BAD: list[tuple[type[Mechanism], dict[str, Any], str]] = [
    (SampledGaussian, {"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 3},
     r"sampled_gaussian\.sample_rate = 1\.5 is above 1\.0"),
    (SampledGaussian, {"noise_multiplier": 1.0, "sample_rate": 0.1},
     r"sampled_gaussian payload lacks field 'steps'"),
    (SampledGaussian, {"noise_multiplier": "1", "sample_rate": 0.1, "steps": 3},
     r"sampled_gaussian\.noise_multiplier = '1' is not a number"),
    (SampledGaussian, {**SHARED.to_json()}, r"sampled_gaussian\.noise = 'shared'"),
    (SharedNoiseSampledGaussian, {**SHARED.to_json(), "noise_shares": 0},
     r"shared_noise_sampled_gaussian\.noise_shares = 0 is below 1"),
    (ClientLevelGaussian, {**ClientLevelGaussian(1.0, 1.0, 10, 4).to_json(), "sampled": 11},
     r"gaussian_fixed_clipping\.sampled = 11 exceeds population = 10"),
    (ClientLevelGaussian, {**ClientLevelGaussian(1.0, 1.0, 10, 4).to_json(),
                           "params": {"sample_rate": -1}},
     r"gaussian_fixed_clipping\.params\.sample_rate = -1\.0 is below 0"),
    (DistributedDiscreteGaussian, {**DDG.to_json(), "params": {
        **DDG.params(), "ddg": {**DDG.params()["ddg"], "dim": 1.5}}},
     r"distributed_discrete_gaussian\.params\.ddg\.dim = 1\.5 is not an integer"),
    (DistributedDiscreteGaussian, {**DDG.to_json(), "params": {**DDG.params(),
                                                               "released": "yes"}},
     r"distributed_discrete_gaussian\.params\.released = 'yes' is not true or false"),
    (SecureAggregationAbort, {"aborted": ""},
     r"secure_aggregation_abort\.aborted = '' is not a non-empty string"),
]


@pytest.mark.parametrize(("cls", "data", "message"), BAD, ids=lambda x: "")
def test_a_bad_field_is_named(cls: type[Mechanism], data: dict[str, Any], message: str
                              ) -> None:
    with pytest.raises(PayloadError, match=message):
        cls.from_json(data)


def test_errors_name_the_entry_that_holds_the_mechanism() -> None:
    with pytest.raises(PayloadError, match=r"example_dp\.sample_rate = 2\.0 is above"):
        example_level_from_json({"noise_multiplier": 1.0, "sample_rate": 2.0, "steps": 1})
    with pytest.raises(PayloadError, match=r"example_dp\.noise = 'loud' is not 'local' or"):
        example_level_from_json({"noise": "loud"})
    with pytest.raises(PayloadError, match=r"client_dp\.mechanism = 'sampled_gaussian' is not "
                                           r"a client-level mechanism"):
        client_level_from_json({"mechanism": "sampled_gaussian"})
    with pytest.raises(PayloadError, match=r"history entry\.run = 3 is not a string"):
        Spend.from_json({**SampledGaussian(1.0, 0.1, 3).to_json(), "run": 3}, "history entry")


def test_an_unknown_client_level_kind_parses_as_it_was_written() -> None:
    """A ledger of a newer version: the entry is well formed, only no accountant knows it."""
    data = {"mechanism": "mystery_noise", "noise_multiplier": 1.0, "clipping_norm": 0.5,
            "population": 10, "sampled": 4, "params": {"nu": [1, 2], "accountant": "x"}}
    mechanism = client_level_from_json(data)
    assert isinstance(mechanism, UnregisteredClientMechanism)
    assert (mechanism.kind, str(mechanism)) == ("mystery_noise", "mystery_noise")
    assert {"mechanism": mechanism.kind, **mechanism.to_json()} == data
    with pytest.raises(NoRule, match="mystery_noise"):
        pld_epsilon([mechanism], DELTA)


def test_mixed_example_level_events_compose_to_the_previous_numbers() -> None:
    """Local and shared noise, events that compose nothing (no steps, rate 0, an abort),
    through PLD and RDP: exactly what the previous version computed for the same events."""
    mixed: list[Mechanism] = [SampledGaussian(1.1, 0.02, 50), SampledGaussian(0.0, 0.0, 5),
                              SampledGaussian(1.3, 0.05, 0), SHARED,
                              SecureAggregationAbort("nothing unmasked"),
                              SampledGaussian(1.3, 1.0, 3)]
    assert pld_epsilon(mixed, DELTA) == pytest.approx(NUMBERS["mixed_pld"], rel=PLD_REL)
    assert rdp_epsilon(mixed, DELTA) == NUMBERS["mixed_rdp"]
    assert pld_epsilon([SecureAggregationAbort("x"), SampledGaussian(1.0, 0.0, 9)], DELTA) == 0
    assert math.isinf(pld_epsilon([*mixed, SampledGaussian(0.0, 0.1, 1)], DELTA))
    assert math.isinf(rdp_epsilon([*mixed, SampledGaussian(0.0, 0.1, 1)], DELTA))


def test_client_level_events_compose_to_the_previous_numbers() -> None:
    releases = [ClientLevelGaussian(s, 1.0, 10, 5, sample_rate=1.0) for s in (0.9, 1.1, 0.7)]
    assert pld_epsilon(releases, DELTA) == pytest.approx(NUMBERS["releases_pld"], rel=PLD_REL)
    # the distributed discrete Gaussian, its first round aborted: the stateful accountant
    # of the server and the pure analysis of the audit give the recorded claims
    rounds = [DistributedDiscreteGaussian(1.3, 0.7, 6, 5, **NUMBERS["ddg_params"],
                                          released=r) for r in (False, True, True)]
    assert DISTRIBUTED_DG_RDP.cumulative(rounds, DELTA) == NUMBERS["ddg_claims"]
    server = DistributedDGAccountant()
    claims = []
    for m in rounds:
        server.record(m)
        claims.append(server.epsilon(DELTA))
    assert claims == NUMBERS["ddg_claims"]
    assert DISTRIBUTED_DG_RDP.epsilon([*rounds, SecureAggregationAbort("x")], DELTA) == \
        NUMBERS["ddg_claims"][-1]
    with pytest.raises(NoRule, match="PLD accountant has no rule for "
                                     "distributed_discrete_gaussian"):
        pld_epsilon(rounds, DELTA)


def test_a_partner_history_of_the_previous_version_loads_and_claims_the_same() -> None:
    state = V1["node_state"]["accountant"]
    acc = PartnerAccountant.from_state_dict(state)
    assert acc.state_dict() == state  # same layout, written back
    assert [s.round for s in acc.history] == [1, 2]
    local = [e["payload"] for e in V1["example_and_refusal"]
             if e["type"] == "example_dp" and "noise" not in e["payload"]]
    assert acc.epsilon() == pytest.approx(local[-1]["epsilon_claimed"], rel=PLD_REL)
    replayed = NUMBERS["example_replay"][local[-1]["partner"]]
    assert acc.epsilon_rdp() == pytest.approx(replayed["rdp"][-1], rel=1e-9)
