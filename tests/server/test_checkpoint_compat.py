"""Checkpoint states of the previous version (tests/privacy/data) still load: the partner
records, the client-level and distributed-DP accountants, with the same claims; a partner
record keeps its mechanism events across a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confide.config import RunConfig
from confide.privacy.mechanisms import SampledGaussian, SharedNoiseSampledGaussian
from confide.privacy.secagg import DistributedDGAccountant
from confide.server.partners import PartnerBook
from confide.strategies.client_level_dp import ClientLevelDp
from confide.strategies.delta_fedavg import DeltaFedAvg

V1 = json.loads((Path(__file__).parents[1] / "privacy" / "data" /
                 "v1_privacy_facts.json").read_text())


def test_partner_records_load_and_take_their_shared_mechanisms_from_the_ledger() -> None:
    (partner, old), = V1["partner_book_state"].items()
    book = PartnerBook(RunConfig())
    book.load_state_dict(V1["partner_book_state"])
    record = book.records[partner]
    # earlier checkpoints list [sigma, q, steps]: read as local noise until the ledger says
    assert all(type(m) is SampledGaussian for m in record.mechanisms)
    assert (record.epsilon, record.epsilon_rdp) == (old["epsilon"], old["epsilon_rdp"])
    entries = [e for e in V1["example_and_refusal"] if e["payload"]["partner"] == partner]
    book.account_unfinished_rounds(entries)
    assert all(type(m) is SharedNoiseSampledGaussian for m in record.mechanisms)
    assert record.tv_slack == pytest.approx(old["tv_slack"], rel=1e-12)
    assert record.epsilon_rdp == old["epsilon_rdp"]  # the same sampled Gaussians
    again = PartnerBook(RunConfig())
    again.load_state_dict(json.loads(json.dumps(book.state_dict())))
    assert again.records[partner] == record


def test_client_level_accountant_of_the_previous_version_claims_the_same() -> None:
    strategy = ClientLevelDp(DeltaFedAvg(), noise_multiplier=0.9, clipping_norm=0.7,
                             population=12, delta=V1["delta"])
    strategy.load_state_dict(V1["client_dp_state"])
    # repeats of one release compose as one self-composition now (the same composition;
    # PLD's numerics differ in the 8th digit)
    assert strategy.epsilon() == pytest.approx(
        V1["client_fixed"][-1]["payload"]["epsilon_claimed"], rel=1e-6)
    again = ClientLevelDp(DeltaFedAvg(), noise_multiplier=0.9, clipping_norm=0.7,
                          population=12, delta=V1["delta"])
    again.load_state_dict(json.loads(json.dumps(strategy.state_dict())))
    assert again.releases == strategy.releases


def test_distributed_dp_accountant_of_the_previous_version_claims_the_same() -> None:
    accountant = DistributedDGAccountant()
    accountant.load_state_dict(V1["ddg_accountant_state"])
    assert accountant.epsilon(V1["delta"]) == V1["numbers"]["ddg_claims"][-1]
