"""Partner receipts: signed by the node key, bound to the partner's pseudonym."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.clients.node_state import pseudonym_of as node_pseudonym_of
from confide.privacy.ledger_events import ExampleDpEvent
from confide.privacy.receipts import (
    Receipt,
    ReceiptError,
    mismatches,
    pseudonym_of,
    sign_receipt,
    verify_receipt,
)

PAYLOAD = {"round": 2, "noise_multiplier": 1.1, "sample_rate": 0.02, "steps": 50,
           "delta": 1e-5, "epsilon": 1.5, "accountant": "rdp"}


def test_pseudonym_matches_the_node_state_rule() -> None:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    assert pseudonym_of(key) == pseudonym_of(raw) == node_pseudonym_of(raw)


def test_sign_verify_and_json_round_trip() -> None:
    key = Ed25519PrivateKey.generate()
    receipt = sign_receipt(PAYLOAD, key)
    assert receipt.partner == pseudonym_of(key)
    verify_receipt(receipt)
    verify_receipt(Receipt.from_json(receipt.to_json()))
    event = ExampleDpEvent.from_receipt(receipt)
    assert event.epsilon_claimed == 1.5 and event.steps == 50
    assert mismatches(receipt, event.to_payload()) == []


def test_refuses_to_sign_for_another_partner() -> None:
    with pytest.raises(ReceiptError, match="pseudonym"):
        sign_receipt({**PAYLOAD, "partner": "p-000000000000"}, Ed25519PrivateKey.generate())


def test_altered_number_or_reattributed_receipt_fails() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    receipt = sign_receipt(PAYLOAD, key)
    altered = receipt.to_dict()
    altered["payload"] = {**altered["payload"], "steps": 10}
    with pytest.raises(ReceiptError, match="signature"):
        verify_receipt(altered)
    # Re-signed by another partner, still naming the first one: pseudonym check.
    forged = Receipt(receipt.payload, sign_receipt(PAYLOAD, other).public_key_hex,
                     other.sign(b"x").hex())
    with pytest.raises(ReceiptError):
        verify_receipt(forged)


def test_mismatches_names_under_reported_fields() -> None:
    receipt = sign_receipt(PAYLOAD, Ed25519PrivateKey.generate())
    payload = ExampleDpEvent.from_receipt(receipt).to_payload()
    payload["steps"] = 40
    payload["epsilon_claimed"] = 1.0
    bad = mismatches(receipt, payload)
    assert any(b.startswith("steps") for b in bad)
    assert any(b.startswith("epsilon_claimed") for b in bad)
