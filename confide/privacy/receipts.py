"""Partner receipts: each partner signs its own DP event with its Ed25519 node key.

The server stores the receipt inside the EXAMPLE_DP ledger entry; the audit checks the
signature, that the signing key's pseudonym is the partner named in the receipt (so a
receipt cannot be re-attributed to another partner), and that the ledger's numbers equal
the receipt's signed numbers (so the server cannot under-report a partner's spend).

Signed bytes: DOMAIN + canonical_json(payload). The domain prefix keeps a receipt
signature from ever being valid as a ledger-entry signature or anything else.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from confide.privacy.ledger import as_public_key, public_key_hex
from confide.privacy.mechanisms import (
    EXAMPLE_LEVEL_KEYS,
    SAMPLED_GAUSSIAN_KEYS,
    ExampleLevelMechanism,
)
from confide.run_layout import canonical_json

DOMAIN = b"confide-dp-receipt-v1\n"

# Numbers a receipt signs and the EXAMPLE_DP entry must repeat exactly: the entry's own and
# those of its mechanism (the keys of every example-level class). The partner's client signs
# its cumulative epsilon as "epsilon"; the ledger calls it "epsilon_claimed".
_RUN_FIELDS = ("round", "partner")
_CLAIM_FIELDS = {"delta": "delta", "epsilon": "epsilon_claimed",
                 "epsilon_claimed": "epsilon_claimed", "accountant": "accountant"}
SIGNED_FIELDS: dict[str, str] = {
    **{k: k for k in (*_RUN_FIELDS, *SAMPLED_GAUSSIAN_KEYS)}, **_CLAIM_FIELDS,
    **{k: k for k in EXAMPLE_LEVEL_KEYS if k not in SAMPLED_GAUSSIAN_KEYS}}
REQUIRED_FIELDS = (*_RUN_FIELDS, *SAMPLED_GAUSSIAN_KEYS, "delta")


class ReceiptError(ValueError):
    """A receipt is malformed, wrongly signed, or attributed to another partner."""


def pseudonym_of(public_key: bytes | str | Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Partner id derived from its node public key (raw 32 bytes): "p-" + the first 12 hex
    digits of its SHA-256. Same rule as confide.clients.node_state.pseudonym_of."""
    if isinstance(public_key, bytes):
        raw = public_key
    else:
        raw = bytes.fromhex(public_key_hex(as_public_key(public_key)))
    return "p-" + hashlib.sha256(raw).hexdigest()[:12]


@dataclass(frozen=True)
class Receipt:
    payload: dict[str, Any]
    public_key_hex: str
    signature_hex: str

    @property
    def partner(self) -> str:
        return str(self.payload.get("partner", ""))

    def to_dict(self) -> dict[str, Any]:
        return {"payload": self.payload, "public_key": self.public_key_hex,
                "signature": self.signature_hex}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Receipt:
        try:
            payload, key, sig = data["payload"], data["public_key"], data["signature"]
        except (KeyError, TypeError):
            raise ReceiptError("receipt needs payload, public_key and signature") from None
        if not isinstance(payload, dict) or not isinstance(key, str) or \
                not isinstance(sig, str):
            raise ReceiptError("receipt fields have the wrong types")
        return cls(dict(payload), key, sig)

    @classmethod
    def from_json(cls, text: str) -> Receipt:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ReceiptError(f"receipt is not JSON: {exc}") from None


def _message(payload: Mapping[str, Any]) -> bytes:
    return DOMAIN + canonical_json(dict(payload))


def _clean(payload: Mapping[str, Any]) -> dict[str, Any]:
    # Canonical JSON has no Infinity: an infinite epsilon is signed as the string "inf".
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v)
            for k, v in payload.items()}


def dp_receipt_payload(mechanism: ExampleLevelMechanism, *, round_: int, partner: str,
                       delta: float, epsilon: float, accountant: str) -> dict[str, Any]:
    """What a partner signs for its round: the mechanism it ran (its numbers flat, as the
    EXAMPLE_DP entry repeats them), the round, its cumulative epsilon and how it computed it."""
    return {"round": round_, "partner": partner, **mechanism.to_json(), "delta": delta,
            "epsilon": epsilon, "accountant": accountant}


def sign_receipt(event_payload: Mapping[str, Any], private_key: Ed25519PrivateKey) -> Receipt:
    """The partner's signed receipt of its own DP event. Fills in `partner` from the key;
    refuses a payload that names another partner."""
    payload = _clean(event_payload)
    own = pseudonym_of(private_key)
    if payload.setdefault("partner", own) != own:
        raise ReceiptError(f"payload names partner {payload['partner']!r}, "
                           f"but this key's pseudonym is {own!r}")
    missing = [k for k in REQUIRED_FIELDS if k not in payload]
    if missing:
        raise ReceiptError(f"receipt payload lacks {missing}")
    signature = private_key.sign(_message(payload))
    return Receipt(payload, public_key_hex(private_key), signature.hex())


def verify_receipt(receipt: Receipt | Mapping[str, Any]) -> None:
    """Raise ReceiptError unless the signature is valid and the signing key is the
    partner's (pseudonym derived from the key)."""
    rec = receipt if isinstance(receipt, Receipt) else Receipt.from_dict(receipt)
    try:
        key = as_public_key(rec.public_key_hex)
        signature = bytes.fromhex(rec.signature_hex)
    except ValueError as exc:
        raise ReceiptError(f"receipt key or signature is not valid hex/Ed25519: {exc}") \
            from None
    if rec.public_key_hex != rec.public_key_hex.lower():
        raise ReceiptError("receipt public key is not lowercase hex")
    try:
        key.verify(signature, _message(rec.payload))
    except (InvalidSignature, ValueError):
        raise ReceiptError("receipt signature is not valid for its public key") from None
    expected = pseudonym_of(bytes.fromhex(rec.public_key_hex))
    if rec.partner != expected:
        raise ReceiptError(f"receipt names partner {rec.partner!r}, but it is signed by "
                           f"the key of {expected!r}")


def mismatches(receipt: Receipt | Mapping[str, Any], ledger_payload: Mapping[str, Any]
               ) -> list[str]:
    """Fields where the ledger's EXAMPLE_DP payload differs from the signed receipt."""
    rec = receipt if isinstance(receipt, Receipt) else Receipt.from_dict(receipt)
    out: list[str] = []
    for signed_key, ledger_key in SIGNED_FIELDS.items():
        if signed_key not in rec.payload:
            continue
        signed, stated = rec.payload[signed_key], ledger_payload.get(ledger_key)
        same = (signed == stated and type(signed) is type(stated)) or (
            isinstance(signed, int | float) and isinstance(stated, int | float)
            and not isinstance(signed, bool) and not isinstance(stated, bool)
            and float(signed) == float(stated))
        if not same:
            out.append(f"{ledger_key}: ledger says {stated!r}, partner signed {signed!r}")
    return out
