"""Partner receipts: each partner signs its own DP event with its Ed25519 node key.

The server stores the receipt inside the EXAMPLE_DP ledger entry; the audit checks the
signature, that the signing key's pseudonym is the partner named in the receipt (so a
receipt cannot be re-attributed to another partner), and that the ledger's numbers equal
the receipt's signed numbers (so the server cannot under-report a partner's spend).

Signed bytes: DOMAIN + canonical_json(payload). The domain prefix keeps a receipt
signature from ever being valid as a ledger-entry signature or anything else.

A receipt also binds what it paid for (`BINDING_FIELDS`): the run (the server's ledger
key), the digest of the update the node sent (its plain delta, or the masked vector under
secure aggregation) and the digest of the global weights it trained from. Receipts of
earlier versions lack them: they still verify, but say nothing of which run, update or
model they belong to (`receipt_binding` returns None).

Partners also countersign the ledger's chain head (`sign_head`): the server, which holds
the ledger key, can re-sign a rewritten chain, but not the partners' countersignatures of
the chain they saw. A node keeps its own record of each run (`PartnerRunRecord`: its
receipts and the heads it countersigned), which `confide audit partner` compares with the
run folder the operator publishes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from confide.privacy.ledger import as_public_key, public_key_hex
from confide.privacy.ledger_events import weights_digest
from confide.privacy.mechanisms import (
    EXAMPLE_LEVEL_KEYS,
    SAMPLED_GAUSSIAN_KEYS,
    ExampleLevelMechanism,
)
from confide.run_layout import canonical_json

DOMAIN = b"confide-dp-receipt-v1\n"
HEAD_DOMAIN = b"confide-ledger-head-v1\n"
HEAD_KIND = "ledger_head"
# What a receipt of this version binds besides its mechanism: the run (its ledger key), the
# update it paid for (None: the node sent none, e.g. its masking was refused) and the model
# version it trained from (both SHA-256, hex).
BINDING_FIELDS = ("run", "update_sha256", "model_sha256")

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


def check_partner_signature(rec: Receipt, message: bytes, signature_name: str,
                            name: str) -> None:
    """`rec` is signed over `message` by its public key, and names the partner that key
    belongs to (ReceiptError saying which fails, e.g. "refusal signature is not valid")."""
    try:
        as_public_key(rec.public_key_hex).verify(bytes.fromhex(rec.signature_hex), message)
    except (InvalidSignature, ValueError, TypeError):
        raise ReceiptError(f"{signature_name} is not valid for its public key") from None
    expected = pseudonym_of(bytes.fromhex(rec.public_key_hex))
    if rec.partner != expected:
        raise ReceiptError(f"{name} names partner {rec.partner!r}, but it is signed by the "
                           f"key of {expected!r}")


def _message(payload: Mapping[str, Any]) -> bytes:
    return DOMAIN + canonical_json(dict(payload))


def _clean(payload: Mapping[str, Any]) -> dict[str, Any]:
    # Canonical JSON has no Infinity: an infinite epsilon is signed as the string "inf".
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v)
            for k, v in payload.items()}


def dp_receipt_payload(mechanism: ExampleLevelMechanism, *, round_: int, partner: str,
                       delta: float, epsilon: float, accountant: str) -> dict[str, Any]:
    """What a partner signs for its round: the mechanism it ran (its numbers flat, as the
    EXAMPLE_DP entry repeats them), the round, its cumulative epsilon and how it computed it.
    `binding` adds what the receipt paid for before it is signed."""
    return {"round": round_, "partner": partner, **mechanism.to_json(), "delta": delta,
            "epsilon": epsilon, "accountant": accountant}


def update_digest(arrays: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of an update as it travels: name -> array (the plain delta, or
    {"vector": masked vector}), serialised as safetensors (independent of the order of the
    names). Node and server compute it from the same arrays."""
    return weights_digest(arrays)


def binding(*, run: str, update_sha256: str | None, model_sha256: str) -> dict[str, Any]:
    """The binding fields of a receipt (see BINDING_FIELDS)."""
    return {"run": run, "update_sha256": update_sha256, "model_sha256": model_sha256}


@dataclass(frozen=True)
class ReceiptBinding:
    run: str
    update_sha256: str | None
    model_sha256: str


def receipt_binding(receipt: Receipt | Mapping[str, Any]) -> ReceiptBinding | None:
    """What a receipt binds, or None for a receipt of an earlier version (no binding
    fields). Raises ReceiptError when it binds only some of them, or one is not a digest."""
    rec = receipt if isinstance(receipt, Receipt) else Receipt.from_dict(receipt)
    present = [k for k in BINDING_FIELDS if k in rec.payload]
    if not present:
        return None
    if len(present) != len(BINDING_FIELDS):
        raise ReceiptError(f"receipt binds only {present} of {list(BINDING_FIELDS)}")
    run, update, model = (rec.payload[k] for k in BINDING_FIELDS)
    for name, value, optional in (("run", run, False), ("update_sha256", update, True),
                                  ("model_sha256", model, False)):
        if not (optional and value is None) and not _is_digest(value):
            raise ReceiptError(f"receipt's {name} = {value!r} is not 64 lowercase hex digits")
    return ReceiptBinding(run, update, model)


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and \
        all(c in "0123456789abcdef" for c in value)


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
    try:  # a malformed key or signature is named as such, before any verification
        as_public_key(rec.public_key_hex)
        bytes.fromhex(rec.signature_hex)
    except ValueError as exc:
        raise ReceiptError(f"receipt key or signature is not valid hex/Ed25519: {exc}") \
            from None
    if rec.public_key_hex != rec.public_key_hex.lower():
        raise ReceiptError("receipt public key is not lowercase hex")
    check_partner_signature(rec, _message(rec.payload), "receipt signature", "receipt")
    receipt_binding(rec)  # well-formed where present


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


# -- countersigned chain heads --------------------------------------------------------------

def _head_message(payload: Mapping[str, Any]) -> bytes:
    return HEAD_DOMAIN + canonical_json(dict(payload))


def sign_head(*, run: str, index: int, entry_hash: str, round_: int,
              private_key: Ed25519PrivateKey) -> Receipt:
    """A partner's countersignature of the ledger of run `run` as it was shown to it: entry
    `index` (the chain's head then) has hash `entry_hash`. Signed in round `round_`."""
    if not _is_digest(run) or not _is_digest(entry_hash):
        raise ReceiptError("a chain head is countersigned with the run key and the entry "
                           "hash as 64 lowercase hex digits")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ReceiptError(f"chain head index {index!r} is not an index")
    payload = {"kind": HEAD_KIND, "run": run, "index": index, "hash": entry_hash,
               "round": int(round_), "partner": pseudonym_of(private_key)}
    signature = private_key.sign(_head_message(payload))
    return Receipt(payload, public_key_hex(private_key), signature.hex())


def verify_head(countersignature: Receipt | Mapping[str, Any]) -> Receipt:
    """Raise ReceiptError unless it is a well-formed countersignature of a chain head,
    validly signed by the key of the partner it names. Returns it as a Receipt."""
    rec = countersignature if isinstance(countersignature, Receipt) \
        else Receipt.from_dict(countersignature)
    pay = rec.payload
    if pay.get("kind") != HEAD_KIND or not _is_digest(pay.get("run")) or \
            not _is_digest(pay.get("hash")) or isinstance(pay.get("index"), bool) or \
            not isinstance(pay.get("index"), int) or not isinstance(pay.get("round"), int):
        raise ReceiptError("not a countersignature of a chain head (kind, run, index, hash, "
                           "round)")
    check_partner_signature(rec, _head_message(pay), "countersignature", "countersignature")
    return rec


# -- a partner's own record of a run ---------------------------------------------------------

MAX_RECORDED = 1024  # receipts and heads a node keeps per run (one or two per round)


@dataclass(frozen=True)
class CountersignedHead:
    index: int
    hash: str
    round: int


@dataclass
class PartnerRunRecord:
    """What a node keeps of one run, to check the operator's published run folder against:
    every receipt it signed in the run (as sent) and every chain head it countersigned."""

    receipts: list[dict[str, Any]] = field(default_factory=list)
    heads: list[CountersignedHead] = field(default_factory=list)

    def add_receipt(self, receipt: Mapping[str, Any]) -> None:
        self.receipts = [*self.receipts, dict(receipt)][-MAX_RECORDED:]

    def add_head(self, head: CountersignedHead) -> None:
        if head not in self.heads:
            self.heads = [*self.heads, head][-MAX_RECORDED:]

    def to_json(self) -> dict[str, Any]:
        return {"receipts": self.receipts,
                "heads": [{"index": h.index, "hash": h.hash, "round": h.round}
                          for h in self.heads]}

    @classmethod
    def from_json(cls, data: Any) -> PartnerRunRecord:
        """Raises ReceiptError naming what is malformed."""
        if not isinstance(data, Mapping) or not isinstance(data.get("receipts", []), list) \
                or not isinstance(data.get("heads", []), list):
            raise ReceiptError("a run record holds a list of receipts and a list of heads")
        heads = []
        for h in data.get("heads", []):
            if not isinstance(h, Mapping) or not all(
                    isinstance(h.get(k), t) for k, t in (("index", int), ("hash", str),
                                                         ("round", int))):
                raise ReceiptError(f"countersigned head {h!r} needs index, hash and round")
            heads.append(CountersignedHead(int(h["index"]), str(h["hash"]), int(h["round"])))
        receipts = [dict(r) for r in data.get("receipts", []) if isinstance(r, Mapping)]
        if len(receipts) != len(data.get("receipts", [])):
            raise ReceiptError("a run record's receipts must be objects")
        return cls(receipts, heads)
