"""Signed budget refusals: a partner states its *lifetime* spend when it refuses a round.

A node's budget covers every run on its data, so a refusal in run B may be caused by what
run A spent. The run-B ledger alone cannot show that spend; the partner therefore signs
(with its node key, like its DP receipts) what it spent over its lifetime, the mechanism
events that make up that spend, the planned round it refuses, and the run it refuses in.
The audit then checks the refusal against the spend it states (replayed independently),
and this run's own replay as a lower bound of it.

Signed bytes: REFUSAL_DOMAIN + canonical_json(payload); the domain keeps a refusal from
ever passing as a DP receipt (or the reverse).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.privacy.accountant import Spend
from confide.privacy.json_fields import PayloadError
from confide.privacy.ledger import public_key_hex
from confide.privacy.receipts import (
    Receipt,
    ReceiptError,
    _clean,
    check_partner_signature,
    pseudonym_of,
)
from confide.run_layout import canonical_json

REFUSAL_DOMAIN = b"confide-budget-refusal-v1\n"
# Ledger (BudgetRefusal) field -> signed field; the ledger must repeat them exactly.
SIGNED_NUMBERS = {"round": "round", "partner": "partner", "spent_epsilon": "spent_epsilon",
                  "would_be_epsilon": "would_be_epsilon", "max_epsilon": "max_epsilon"}
REQUIRED = ("round", "partner", "run", "delta", "accountant", "spent_epsilon",
            "would_be_epsilon", "max_epsilon", "lifetime_events", "planned")


def _message(payload: Mapping[str, Any]) -> bytes:
    return REFUSAL_DOMAIN + canonical_json(dict(payload))


def sign_refusal(*, round_: int, run: str, delta: float, accountant: str,
                 spent_epsilon: float, would_be_epsilon: float, max_epsilon: float,
                 lifetime_events: Sequence[Spend], planned: Spend,
                 private_key: Ed25519PrivateKey) -> Receipt:
    """The partner's signed refusal of round `round_` of run `run` (its ledger key): its
    lifetime spends and the planned one, each in the layout of the node's history."""
    payload = _clean({
        "kind": "budget_refusal", "round": int(round_), "partner": pseudonym_of(private_key),
        "run": run, "delta": float(delta), "accountant": accountant,
        "spent_epsilon": float(spent_epsilon), "would_be_epsilon": float(would_be_epsilon),
        "max_epsilon": float(max_epsilon),
        "lifetime_events": [e.to_json() for e in lifetime_events],
        "planned": planned.to_json()})
    signature = private_key.sign(_message(payload))
    return Receipt(payload, public_key_hex(private_key), signature.hex())


def verify_refusal(receipt: Receipt | Mapping[str, Any]) -> Receipt:
    """Raise ReceiptError unless the refusal is well-formed, validly signed, and signed by
    the key of the partner it names. Returns it as a Receipt."""
    rec = receipt if isinstance(receipt, Receipt) else Receipt.from_dict(receipt)
    missing = [k for k in REQUIRED if k not in rec.payload]
    if missing or rec.payload.get("kind") != "budget_refusal":
        raise ReceiptError(f"not a budget refusal (missing {missing})")
    check_partner_signature(rec, _message(rec.payload), "refusal signature", "refusal")
    lifetime_spends(rec)  # ReceiptError unless they are the node's history entries
    return rec


def lifetime_spends(refusal: Receipt) -> tuple[list[Spend], Spend]:
    """The spends a refusal states (its lifetime events) and the one it refused (planned)."""
    events = refusal.payload.get("lifetime_events")
    try:
        if not isinstance(events, list):
            raise PayloadError(f"lifetime_events = {events!r} is not a list")
        return ([Spend.from_json(e, "lifetime_events[]") for e in events],
                Spend.from_json(refusal.payload.get("planned"), "planned"))
    except PayloadError as exc:
        raise ReceiptError(f"refusal's lifetime_events / planned are not mechanism events: "
                           f"{exc}") from None


def refusal_mismatches(receipt: Receipt, ledger_payload: Mapping[str, Any]) -> list[str]:
    """Fields where the ledger's budget_refusal differs from what the partner signed."""
    out = []
    for ledger_key, signed_key in SIGNED_NUMBERS.items():
        signed, stated = receipt.payload.get(signed_key), ledger_payload.get(ledger_key)
        if isinstance(signed, str) and signed == "inf":
            signed = float("inf")
        if isinstance(stated, str) and stated == "inf":
            stated = float("inf")
        same = signed == stated if isinstance(signed, str) or isinstance(stated, str) \
            else (signed is not None and stated is not None and float(signed) == float(stated))
        if not same:
            out.append(f"{ledger_key}: ledger says {stated!r}, partner signed {signed!r}")
    return out
