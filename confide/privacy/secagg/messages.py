"""Protocol messages: plain frozen dataclasses with a compact, self-describing byte form.

Every message names its session, round and stage, so a receiver can reject one that is
replayed from another round/session or delivered at the wrong stage; client-to-server
messages name their sender, server-to-client requests their receiver where they are
addressed. ``to_bytes()``/``from_bytes()`` give the wire form a transport adapter (Flower:
one ``bytes`` entry of a ConfigRecord, or the masked vector as a numpy array in an
ArrayRecord) carries; nothing here depends on a transport.

Wire format: b"CSA1" | u32 little-endian header length | JSON header | concatenated blobs.
The JSON header holds the scalar fields and the (name, length) list of the binary blobs
(public keys, encrypted shares, the masked vector), which follow verbatim.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import ClassVar, Self, cast

import numpy as np

from .errors import SecAggProtocolError
from .shamir import share_from_bytes, share_to_bytes

MAGIC = b"CSA1"
SERVER_ID = 0

STAGE_ADVERTISE = "advertise_keys"
STAGE_SHARE = "share_keys"
STAGE_MASKED_INPUT = "masked_input"
STAGE_CONSISTENCY = "consistency"
STAGE_UNMASK = "unmask"

_REGISTRY: dict[str, type[Message]] = {}


def _encode(kind: str, header: dict, blobs: list[tuple[str, bytes]]) -> bytes:
    head = dict(header, kind=kind, blobs=[[name, len(b)] for name, b in blobs])
    raw = json.dumps(head, separators=(",", ":"), sort_keys=True).encode()
    return b"".join([MAGIC, struct.pack("<I", len(raw)), raw, *(b for _, b in blobs)])


def _decode(data: bytes) -> tuple[dict, dict[str, bytes]]:
    data = bytes(data)
    if data[:4] != MAGIC or len(data) < 8:
        raise SecAggProtocolError("not a secure-aggregation message (bad magic)")
    (hlen,) = struct.unpack_from("<I", data, 4)
    try:
        head = json.loads(data[8 : 8 + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SecAggProtocolError(f"malformed message header: {exc}") from None
    blobs: dict[str, bytes] = {}
    pos = 8 + hlen
    for name, length in head.get("blobs", []):
        if pos + length > len(data):
            raise SecAggProtocolError(f"message truncated in blob {name!r}")
        blobs[name] = data[pos : pos + length]
        pos += length
    if pos != len(data):
        raise SecAggProtocolError("trailing bytes after message")
    return head, blobs


@dataclass(frozen=True)
class Message:
    """Fields common to all messages."""

    KIND: ClassVar[str] = ""
    STAGE: ClassVar[str] = ""

    session_id: bytes
    round: int

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.KIND:
            _REGISTRY[cls.KIND] = cls

    def _payload(self) -> tuple[dict, list[tuple[str, bytes]]]:
        raise NotImplementedError

    @classmethod
    def _from_payload(cls, head: dict, blobs: dict[str, bytes]) -> Message:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        header, blobs = self._payload()
        header.update(session=self.session_id.hex(), round=self.round, stage=self.STAGE)
        return _encode(self.KIND, header, blobs)

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        head, blobs = _decode(data)
        kind = head.get("kind")
        target = _REGISTRY.get(kind) if isinstance(kind, str) else None
        if target is None:
            raise SecAggProtocolError(f"unknown message kind {kind!r}")
        if cls is not Message and target is not cls:
            raise SecAggProtocolError(f"expected a {cls.KIND} message, got {kind!r}")
        if head.get("stage") != target.STAGE:
            raise SecAggProtocolError(
                f"{kind} message carries stage {head.get('stage')!r}, expected {target.STAGE!r}"
            )
        try:
            # `cls` itself, or any kind when called on the base class (checked above)
            return cast(Self, target._from_payload(head, blobs))
        except (KeyError, ValueError, TypeError) as exc:
            raise SecAggProtocolError(f"malformed {kind} message: {exc}") from None


def _common(head: dict) -> dict:
    return {"session_id": bytes.fromhex(head["session"]), "round": int(head["round"])}


def _int_map(d: dict[int, bytes], prefix: str) -> list[tuple[str, bytes]]:
    return [(f"{prefix}{k}", v) for k, v in sorted(d.items())]


def _read_map(blobs: dict[str, bytes], prefix: str) -> dict[int, bytes]:
    return {int(k[len(prefix) :]): v for k, v in blobs.items() if k.startswith(prefix)}


@dataclass(frozen=True)
class AdvertiseKeys(Message):
    """Stage 0, client -> server: the client's two public keys for this round, signed with
    its long-lived identity (empty ``identity``/``signature``: an unauthenticated client)."""

    KIND: ClassVar[str] = "advertise_keys"
    STAGE: ClassVar[str] = STAGE_ADVERTISE
    sender: int = 0
    encryption_public: bytes = b""
    mask_public: bytes = b""
    identity: bytes = b""
    signature: bytes = b""

    def _payload(self) -> tuple[dict, list[tuple[str, bytes]]]:
        blobs = [("enc", self.encryption_public), ("mask", self.mask_public)]
        if self.identity or self.signature:
            blobs += [("id", self.identity), ("sig", self.signature)]
        return {"sender": self.sender}, blobs

    @classmethod
    def _from_payload(cls, head: dict, blobs: dict[str, bytes]) -> AdvertiseKeys:
        return cls(
            **_common(head),
            sender=int(head["sender"]),
            encryption_public=blobs["enc"],
            mask_public=blobs["mask"],
            identity=blobs.get("id", b""),
            signature=blobs.get("sig", b""),
        )


@dataclass(frozen=True)
class KeyDirectory(Message):
    """Stage 1 request, server -> every client: public keys of all clients that advertised,
    each with the identity and signature it advertised them with, and the seed of this
    round's neighbour graph (a hash of the directory, which every client recomputes)."""

    KIND: ClassVar[str] = "key_directory"
    STAGE: ClassVar[str] = STAGE_SHARE
    graph_seed: bytes = b""
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    identities: dict[int, bytes] = field(default_factory=dict)
    signatures: dict[int, bytes] = field(default_factory=dict)

    def _payload(self) -> tuple[dict, list[tuple[str, bytes]]]:
        blobs = [("seed", self.graph_seed)]
        for cid, (enc, mask) in sorted(self.public_keys.items()):
            blobs += [(f"enc/{cid}", enc), (f"mask/{cid}", mask)]
        blobs += _int_map(self.identities, "id/") + _int_map(self.signatures, "sig/")
        return {}, blobs

    @classmethod
    def _from_payload(cls, head: dict, blobs: dict[str, bytes]) -> KeyDirectory:
        enc = _read_map(blobs, "enc/")
        mask = _read_map(blobs, "mask/")
        if enc.keys() != mask.keys():
            raise ValueError("encryption and mask keys name different clients")
        return cls(
            **_common(head),
            graph_seed=blobs["seed"],
            public_keys={c: (enc[c], mask[c]) for c in enc},
            identities=_read_map(blobs, "id/"),
            signatures=_read_map(blobs, "sig/"),
        )


@dataclass(frozen=True)
class ShareKeys(Message):
    """Stage 1, client -> server: one encrypted share envelope per neighbour."""

    KIND: ClassVar[str] = "share_keys"
    STAGE: ClassVar[str] = STAGE_SHARE
    sender: int = 0
    envelopes: dict[int, bytes] = field(default_factory=dict)  # receiver -> envelope

    def _payload(self) -> tuple[dict, list[tuple[str, bytes]]]:
        return {"sender": self.sender}, _int_map(self.envelopes, "to/")

    @classmethod
    def _from_payload(cls, head: dict, blobs: dict[str, bytes]) -> ShareKeys:
        return cls(**_common(head), sender=int(head["sender"]), envelopes=_read_map(blobs, "to/"))


@dataclass(frozen=True)
class MaskedInputRequest(Message):
    """Stage 2 request, server -> one client: the envelopes its live neighbours sent it, and
    every client asked for a masked input this round (U2: the split a client votes for
    together with its masked input, in case all of them deliver)."""

    KIND: ClassVar[str] = "masked_input_request"
    STAGE: ClassVar[str] = STAGE_MASKED_INPUT
    receiver: int = 0
    envelopes: dict[int, bytes] = field(default_factory=dict)  # sender -> envelope
    candidates: tuple[int, ...] = ()

    def _payload(self) -> tuple[dict, list[tuple[str, bytes]]]:
        return {"receiver": self.receiver, "candidates": list(self.candidates)}, \
            _int_map(self.envelopes, "from/")

    @classmethod
    def _from_payload(cls, head: dict, blobs: dict[str, bytes]) -> MaskedInputRequest:
        return cls(
            **_common(head), receiver=int(head["receiver"]), envelopes=_read_map(blobs, "from/"),
            candidates=tuple(int(x) for x in head.get("candidates", [])),
        )


@dataclass(frozen=True, eq=False)
class MaskedInput(Message):
    """Stage 2, client -> server: the masked, quantized, noised update y_u in Z_{2^b}, and
    the client's consistency vote for "every client asked survived" (empty: unauthenticated)."""

    KIND: ClassVar[str] = "masked_input"
    STAGE: ClassVar[str] = STAGE_MASKED_INPUT
    sender: int = 0
    vector: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    vote: bytes = b""

    def _payload(self) -> tuple[dict, list[tuple[str, bytes]]]:
        v = np.ascontiguousarray(self.vector)
        le = v.astype(v.dtype.newbyteorder("<"), copy=False)
        blobs = [("vector", le.tobytes())] + ([("vote", self.vote)] if self.vote else [])
        return {"sender": self.sender, "dtype": v.dtype.name, "length": int(v.size)}, blobs

    @classmethod
    def _from_payload(cls, head: dict, blobs: dict[str, bytes]) -> MaskedInput:
        dtype = np.dtype(head["dtype"])
        if dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
            raise ValueError(f"masked vector dtype {dtype} is not uint32/uint64")
        vec = np.frombuffer(blobs["vector"], dtype=dtype.newbyteorder("<")).astype(dtype)
        if vec.size != int(head["length"]):
            raise ValueError("masked vector length does not match its header")
        return cls(**_common(head), sender=int(head["sender"]), vector=vec,
                   vote=blobs.get("vote", b""))


@dataclass(frozen=True)
class ConsistencyRequest(Message):
    """Consistency round, server -> survivors, only when some client asked for a masked input
    did not deliver one: the (survivors, dropped) split every survivor is asked to sign."""

    KIND: ClassVar[str] = "consistency_request"
    STAGE: ClassVar[str] = STAGE_CONSISTENCY
    survivors: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()

    def _payload(self) -> tuple[dict, list[tuple[str, bytes]]]:
        return {"survivors": list(self.survivors), "dropped": list(self.dropped)}, []

    @classmethod
    def _from_payload(cls, head: dict, blobs: dict[str, bytes]) -> ConsistencyRequest:
        return cls(
            **_common(head),
            survivors=tuple(int(x) for x in head["survivors"]),
            dropped=tuple(int(x) for x in head["dropped"]),
        )


@dataclass(frozen=True)
class ConsistencyVote(Message):
    """Consistency round, client -> server: its signature on the split it was shown."""

    KIND: ClassVar[str] = "consistency_vote"
    STAGE: ClassVar[str] = STAGE_CONSISTENCY
    sender: int = 0
    vote: bytes = b""

    def _payload(self) -> tuple[dict, list[tuple[str, bytes]]]:
        return {"sender": self.sender}, [("vote", self.vote)]

    @classmethod
    def _from_payload(cls, head: dict, blobs: dict[str, bytes]) -> ConsistencyVote:
        return cls(**_common(head), sender=int(head["sender"]), vote=blobs["vote"])


@dataclass(frozen=True)
class UnmaskRequest(Message):
    """Stage 3 request, server -> all survivors: who survived (self-mask shares wanted) and
    who dropped after sharing keys (mask-key shares wanted). Disjoint by construction.
    ``votes``: the survivors' signatures on exactly this split (client id -> signature)."""

    KIND: ClassVar[str] = "unmask_request"
    STAGE: ClassVar[str] = STAGE_UNMASK
    survivors: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()
    votes: dict[int, bytes] = field(default_factory=dict)

    def _payload(self) -> tuple[dict, list[tuple[str, bytes]]]:
        return {"survivors": list(self.survivors), "dropped": list(self.dropped)}, \
            _int_map(self.votes, "vote/")

    @classmethod
    def _from_payload(cls, head: dict, blobs: dict[str, bytes]) -> UnmaskRequest:
        return cls(
            **_common(head),
            survivors=tuple(int(x) for x in head["survivors"]),
            dropped=tuple(int(x) for x in head["dropped"]),
            votes=_read_map(blobs, "vote/"),
        )


@dataclass(frozen=True)
class UnmaskShares(Message):
    """Stage 3, client -> server: its shares of survivors' b_u and dropped clients' s_u^SK."""

    KIND: ClassVar[str] = "unmask_shares"
    STAGE: ClassVar[str] = STAGE_UNMASK
    sender: int = 0
    self_mask_shares: dict[int, int] = field(default_factory=dict)  # owner -> share of b_owner
    mask_key_shares: dict[int, int] = field(default_factory=dict)  # owner -> share of s_owner^SK

    def _payload(self) -> tuple[dict, list[tuple[str, bytes]]]:
        blobs = [(f"b/{k}", share_to_bytes(v)) for k, v in sorted(self.self_mask_shares.items())]
        blobs += [(f"sk/{k}", share_to_bytes(v)) for k, v in sorted(self.mask_key_shares.items())]
        return {"sender": self.sender}, blobs

    @classmethod
    def _from_payload(cls, head: dict, blobs: dict[str, bytes]) -> UnmaskShares:
        return cls(
            **_common(head),
            sender=int(head["sender"]),
            self_mask_shares={k: share_from_bytes(v) for k, v in _read_map(blobs, "b/").items()},
            mask_key_shares={k: share_from_bytes(v) for k, v in _read_map(blobs, "sk/").items()},
        )
