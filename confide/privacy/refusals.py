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

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.privacy.ledger import as_public_key, public_key_hex
from confide.privacy.receipts import Receipt, ReceiptError, _clean, pseudonym_of
from confide.run_layout import canonical_json

REFUSAL_DOMAIN = b"confide-budget-refusal-v1\n"
# Ledger (BudgetRefusal) field -> signed field; the ledger must repeat them exactly.
SIGNED_NUMBERS = {"round": "round", "partner": "partner", "spent_epsilon": "spent_epsilon",
                  "would_be_epsilon": "would_be_epsilon", "max_epsilon": "max_epsilon"}
REQUIRED = ("round", "partner", "run", "delta", "accountant", "spent_epsilon",
            "would_be_epsilon", "max_epsilon", "lifetime_events", "planned")


def _message(payload: Mapping[str, Any]) -> bytes:
    return REFUSAL_DOMAIN + canonical_json(dict(payload))


def event_dict(noise_multiplier: float, sample_rate: float, steps: int, round_: int = 0,
               run: str = "") -> dict[str, Any]:
    return {"noise_multiplier": float(noise_multiplier), "sample_rate": float(sample_rate),
            "steps": int(steps), "round": int(round_), "run": str(run)}


def sign_refusal(*, round_: int, run: str, delta: float, accountant: str,
                 spent_epsilon: float, would_be_epsilon: float, max_epsilon: float,
                 lifetime_events: Sequence[Mapping[str, Any]], planned: Mapping[str, Any],
                 private_key: Ed25519PrivateKey) -> Receipt:
    """The partner's signed refusal of round `round_` of run `run` (its ledger key)."""
    payload = _clean({
        "kind": "budget_refusal", "round": int(round_), "partner": pseudonym_of(private_key),
        "run": run, "delta": float(delta), "accountant": accountant,
        "spent_epsilon": float(spent_epsilon), "would_be_epsilon": float(would_be_epsilon),
        "max_epsilon": float(max_epsilon),
        "lifetime_events": [dict(e) for e in lifetime_events], "planned": dict(planned)})
    signature = private_key.sign(_message(payload))
    return Receipt(payload, public_key_hex(private_key), signature.hex())


def verify_refusal(receipt: Receipt | Mapping[str, Any]) -> Receipt:
    """Raise ReceiptError unless the refusal is well-formed, validly signed, and signed by
    the key of the partner it names. Returns it as a Receipt."""
    rec = receipt if isinstance(receipt, Receipt) else Receipt.from_dict(receipt)
    missing = [k for k in REQUIRED if k not in rec.payload]
    if missing or rec.payload.get("kind") != "budget_refusal":
        raise ReceiptError(f"not a budget refusal (missing {missing})")
    try:
        key = as_public_key(rec.public_key_hex)
        key.verify(bytes.fromhex(rec.signature_hex), _message(rec.payload))
    except (InvalidSignature, ValueError, TypeError):
        raise ReceiptError("refusal signature is not valid for its public key") from None
    expected = pseudonym_of(bytes.fromhex(rec.public_key_hex))
    if rec.partner != expected:
        raise ReceiptError(f"refusal names partner {rec.partner!r}, but it is signed by the "
                           f"key of {expected!r}")
    events = rec.payload["lifetime_events"]
    if not isinstance(events, list) or not all(_is_event(e) for e in events) or \
            not _is_event(rec.payload["planned"]):
        raise ReceiptError("refusal's lifetime_events / planned are not mechanism events")
    return rec


def _is_event(e: Any) -> bool:
    return isinstance(e, dict) and all(
        isinstance(e.get(k), int | float) and not isinstance(e.get(k), bool)
        for k in ("noise_multiplier", "sample_rate", "steps"))


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


def mechanisms(events: Sequence[Mapping[str, Any]]) -> tuple[tuple[float, float, int], ...]:
    """(sample_rate, noise_multiplier, steps) per event: the replay's parameter order."""
    return tuple((float(e["sample_rate"]), float(e["noise_multiplier"]), int(e["steps"]))
                 for e in events)
