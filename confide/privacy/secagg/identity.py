"""Who may take part in a secure round, and what each party signed (the malicious-server
additions of Bonawitz et al. 2017, §6, to the SecAgg+ core).

Every partner has a long-lived Ed25519 identity: the node key it is registered with in the
federation (its ledger pseudonym is derived from the same key). Each partner holds the
federation's partner list (:class:`Roster`) itself, from the operator, out of band, so the
server cannot add partners of its own. With them:

* **Signed key advertisements.** A client signs (session, round, client id, both public
  keys) with its identity; every client checks the whole key directory against its roster
  before it shares anything: an unknown or unsigned identity, one identity twice, or too
  few partners is refused. A server can no longer fill a victim's neighbourhood with key
  pairs it owns.
* **The graph seed is a hash of the signed directory** (:func:`directory_graph_seed`), not a
  value the server picks, so the server cannot choose who neighbours whom; it can only
  leave advertisers out, which costs it rounds (the clients' floors) and shows in the logs.
* **Consistency votes.** Before revealing any share a survivor needs signatures, from at
  least t identities of the directory, on the very (survivors, dropped) split the unmask
  request names, and it must have signed that split itself. Together with
  one unmask answer per round and a threshold above half of every closed neighbourhood,
  no party's self-mask seed and mask key can both be rebuilt: the server would need t
  shares of each kind from the k + 1 holders, and an honest holder gives one kind only,
  so it needs 2t - (k + 1) colluding holders in that neighbourhood.

Signatures are over domain-separated byte strings (:func:`advertisement_bytes`,
:func:`vote_bytes`), never over JSON, so no encoding ambiguity can make two statements
collide.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import SecAggRefusal

IDENTITY_BYTES = 32  # raw Ed25519 public key
SIGNATURE_BYTES = 64
_ADVERTISE_TAG = b"confide/secagg/v2/advertise-keys"
_VOTE_TAG = b"confide/secagg/v2/consistency-vote"
_GRAPH_TAG = b"confide/secagg/v2/graph-seed"
_REFUSAL_TAG = b"confide/secagg/v2/refusal"


def raw_public(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _ids(ids: Iterable[int]) -> bytes:
    ordered = sorted(int(i) for i in ids)
    return struct.pack(f"<Q{len(ordered)}Q", len(ordered), *ordered)


def advertisement_bytes(session_id: bytes, round_number: int, client_id: int,
                        encryption_public: bytes, mask_public: bytes) -> bytes:
    """What a client signs when it advertises its round keys."""
    return b"".join([_ADVERTISE_TAG, session_id, struct.pack("<QQ", round_number, client_id),
                     encryption_public, mask_public])


def vote_bytes(session_id: bytes, round_number: int, survivors: Iterable[int],
               dropped: Iterable[int]) -> bytes:
    """What a client signs when it agrees to unmask for this (survivors, dropped) split."""
    return b"".join([_VOTE_TAG, session_id, struct.pack("<Q", round_number),
                     _ids(survivors), _ids(dropped)])


def refusal_bytes(session_id: bytes, round_number: int, stage: str, reason: str) -> bytes:
    """What a partner signs when it refuses a stage of a secure round."""
    text = f"{stage}\n{reason}".encode()
    return b"".join([_REFUSAL_TAG, session_id, struct.pack("<QI", round_number, len(text)),
                     text])


def sign_refusal(identity: Ed25519PrivateKey, session_id: bytes, round_number: int,
                 stage: str, reason: str) -> dict[str, object]:
    """A refusal the operator can show to anyone: which identity refused what, and why."""
    signature = identity.sign(refusal_bytes(session_id, round_number, stage, reason))
    return {"session": session_id.hex(), "round": round_number, "stage": stage,
            "reason": reason, "identity": raw_public(identity).hex(),
            "signature": signature.hex()}


def refusal_verifies(refusal: Mapping[str, object]) -> bool:
    """A signed refusal (:func:`sign_refusal`) checks out under the identity it names."""
    try:
        message = refusal_bytes(bytes.fromhex(str(refusal["session"])),
                                int(str(refusal["round"])), str(refusal["stage"]),
                                str(refusal["reason"]))
        return verify_signature(bytes.fromhex(str(refusal["identity"])),
                                bytes.fromhex(str(refusal["signature"])), message)
    except (KeyError, ValueError, TypeError):
        return False


def verify_signature(identity: bytes, signature: bytes, message: bytes) -> bool:
    if len(identity) != IDENTITY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(identity).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def directory_graph_seed(session_id: bytes, round_number: int,
                         public_keys: Mapping[int, tuple[bytes, bytes]],
                         identities: Mapping[int, bytes]) -> bytes:
    """The round's neighbour-graph seed: SHA-256 over the whole key directory (client ids,
    both public keys and the identity of each; unauthenticated entries hash an empty
    identity)."""
    h = hashlib.sha256(_GRAPH_TAG + session_id + struct.pack("<Q", round_number))
    for cid in sorted(public_keys):
        h.update(struct.pack("<Q", cid))
        for part in (*public_keys[cid], identities.get(cid, b"")):
            h.update(struct.pack("<I", len(part)) + part)
    return h.digest()


def roster_line(identity: bytes, name: str = "") -> str:
    """One roster line: the raw public key in hex, then (ignored by readers) a name."""
    return f"{identity.hex()} {name}".rstrip()


def parse_roster(text: str, where: str = "roster") -> frozenset[bytes]:
    """Identities of a roster file: one hex Ed25519 public key per line, anything after it
    on the line (a name) and lines starting with # ignored."""
    out: set[bytes] = set()
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        try:
            key = bytes.fromhex(words[0])
        except ValueError:
            key = b""
        if len(key) != IDENTITY_BYTES:
            raise ValueError(f"{where} line {number}: {words[0][:20]!r} is not a "
                             f"{IDENTITY_BYTES}-byte public key in hex")
        out.add(key)
    if not out:
        raise ValueError(f"{where} lists no partner")
    return frozenset(out)


@dataclass(frozen=True)
class Roster:
    """The federation's partner list as one partner holds it, and that partner's floor.

    ``identities``: raw Ed25519 public keys of every partner allowed in a round.
    ``min_partners``: the fewest verified partners this partner takes part with."""

    identities: frozenset[bytes]
    min_partners: int = 2

    def __post_init__(self) -> None:
        bad = [i for i in self.identities if len(i) != IDENTITY_BYTES]
        if bad:
            raise ValueError(f"roster entries must be {IDENTITY_BYTES}-byte Ed25519 public keys")
        if not isinstance(self.min_partners, int) or self.min_partners < 2:
            raise ValueError(f"min_partners must be an integer >= 2, got {self.min_partners!r}")

    def check_directory(self, identities: Mapping[int, bytes], own_id: int,
                        own_identity: bytes) -> None:
        """Refuse (SecAggRefusal, naming the problem) a directory that holds an identity
        outside the roster or one identity twice, misstates this client, or is too small."""
        if identities.get(own_id) != own_identity:
            raise SecAggRefusal("key directory does not carry this partner's own identity",
                                receiver=own_id)
        unknown = sorted(c for c, i in identities.items() if i not in self.identities)
        if unknown:
            raise SecAggRefusal(f"key directory holds clients {unknown} whose identities are "
                                "not on this partner's federation roster", receiver=own_id)
        seen: dict[bytes, int] = {}
        for cid, identity in sorted(identities.items()):
            if identity in seen:
                raise SecAggRefusal(f"key directory lists one identity twice (clients "
                                    f"{seen[identity]} and {cid})", receiver=own_id)
            seen[identity] = cid
        if len(identities) < self.min_partners:
            raise SecAggRefusal(f"key directory holds {len(identities)} verified partners, "
                                f"fewer than this partner's floor of {self.min_partners}",
                                receiver=own_id)
