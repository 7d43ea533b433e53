"""Partner receipts: signed by the node key, bound to the partner's pseudonym, its run, the
update it paid for and the model it trained from; countersigned ledger heads."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.clients.node_state import pseudonym_of as node_pseudonym_of
from confide.privacy.ledger_events import ExampleDpEvent
from confide.privacy.receipts import (
    CountersignedHead,
    PartnerRunRecord,
    Receipt,
    ReceiptBinding,
    ReceiptError,
    binding,
    mismatches,
    pseudonym_of,
    receipt_binding,
    sign_head,
    sign_receipt,
    update_digest,
    verify_head,
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


RUN, UPDATE, MODEL = "a1" * 32, "b2" * 32, "c3" * 32


def test_a_receipt_binds_its_run_update_and_model() -> None:
    key = Ed25519PrivateKey.generate()
    bound = sign_receipt({**PAYLOAD, **binding(run=RUN, update_sha256=UPDATE,
                                                model_sha256=MODEL)}, key)
    verify_receipt(bound)
    assert receipt_binding(bound) == ReceiptBinding(RUN, UPDATE, MODEL)
    # the ledger entry copies the mechanism's numbers; the binding stays in the receipt
    event = ExampleDpEvent.from_receipt(bound)
    assert mismatches(bound, event.to_payload()) == []
    assert receipt_binding(event.receipt or {}) == ReceiptBinding(RUN, UPDATE, MODEL)
    # a receipt cannot be moved to another run or update without breaking its signature
    moved = bound.to_dict()
    moved["payload"] = {**moved["payload"], "run": "d4" * 32}
    with pytest.raises(ReceiptError, match="signature"):
        verify_receipt(moved)
    # no update sent (masking refused): it says so
    none_sent = sign_receipt({**PAYLOAD, **binding(run=RUN, update_sha256=None,
                                                    model_sha256=MODEL)}, key)
    assert receipt_binding(none_sent) == ReceiptBinding(RUN, None, MODEL)


def test_receipts_of_an_earlier_version_bind_nothing_and_half_bindings_are_refused() -> None:
    key = Ed25519PrivateKey.generate()
    assert receipt_binding(sign_receipt(PAYLOAD, key)) is None
    half = sign_receipt({**PAYLOAD, "run": RUN}, key)
    with pytest.raises(ReceiptError, match="binds only"):
        verify_receipt(half)
    not_a_digest = sign_receipt({**PAYLOAD, **binding(run="run-1", update_sha256=UPDATE,
                                                       model_sha256=MODEL)}, key)
    with pytest.raises(ReceiptError, match="run = 'run-1' is not 64 lowercase hex"):
        verify_receipt(not_a_digest)


def test_update_digest_does_not_depend_on_the_order_of_names() -> None:
    a = {"x": np.ones((2, 3), np.float32), "y": np.zeros(4, np.float32)}
    assert update_digest(a) == update_digest(dict(reversed(list(a.items()))))
    assert update_digest(a) != update_digest({**a, "y": np.ones(4, np.float32)})


def test_a_countersigned_head_names_the_run_entry_and_hash() -> None:
    key = Ed25519PrivateKey.generate()
    head = sign_head(run=RUN, index=7, entry_hash=UPDATE, round_=3, private_key=key)
    assert verify_head(Receipt.from_json(head.to_json())).payload == {
        "kind": "ledger_head", "run": RUN, "index": 7, "hash": UPDATE, "round": 3,
        "partner": pseudonym_of(key)}
    for field_, value in (("index", 8), ("hash", MODEL), ("run", MODEL)):
        altered = head.to_dict()
        altered["payload"] = {**altered["payload"], field_: value}
        with pytest.raises(ReceiptError, match="not valid"):
            verify_head(altered)
    # a DP receipt's signature is never valid as a countersignature (separate domains)
    receipt = sign_receipt(PAYLOAD, key)
    as_head = Receipt({**head.payload}, receipt.public_key_hex, receipt.signature_hex)
    with pytest.raises(ReceiptError, match="not valid"):
        verify_head(as_head)
    with pytest.raises(ReceiptError, match="not a countersignature"):
        verify_head(receipt)
    with pytest.raises(ReceiptError, match="64 lowercase hex"):
        sign_head(run="run-1", index=7, entry_hash=UPDATE, round_=3, private_key=key)


def test_a_partners_run_record_round_trips_and_refuses_malformed_heads() -> None:
    record = PartnerRunRecord()
    record.add_receipt(sign_receipt(PAYLOAD, Ed25519PrivateKey.generate()).to_dict())
    record.add_head(CountersignedHead(3, UPDATE, 2))
    again = PartnerRunRecord.from_json(record.to_json())
    assert again == record
    with pytest.raises(ReceiptError, match="needs index, hash and round"):
        PartnerRunRecord.from_json({"receipts": [], "heads": [{"index": "3"}]})
