"""Key material of one client for one round: two X25519 key pairs, HKDF-derived shared keys
and the AEAD that carries Shamir shares between neighbours.

Following SecAgg (Bonawitz et al. 2017, §4) every client u holds
  * ``c_u`` (encryption key pair): DH with ``c_v^PK`` gives the key of the authenticated
    channel u <-> v through the server, used only to encrypt shares;
  * ``s_u`` (mask key pair): DH with ``s_v^PK`` gives the seed of the pairwise mask
    between u and v. Its private key is Shamir-shared so that the server can rebuild the
    pairwise masks of u if u drops out.
Two separate pairs, because revealing ``s_u^SK`` (when u drops) must not reveal the channel
key that protected u's shares of ``b_u``.

Raw X25519 outputs are never used directly: HKDF-SHA256 (RFC 5869) derives each key with a
purpose-specific ``info`` label, and a salt binding the session and round, so the same DH
value can never yield the same key for two purposes or two rounds.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import SecAggDecryptionError, SecAggProtocolError

INFO_SHARE_ENCRYPTION = b"confide/secagg/v1/share-encryption-key"
INFO_PAIRWISE_MASK = b"confide/secagg/v1/pairwise-mask-seed"
PUBLIC_KEY_BYTES = 32
NONCE_BYTES = 12
# cleartext envelope header: sender id, receiver id (both u64), so that a misrouted
# ciphertext is reported as such before authentication is even attempted
_ENVELOPE = struct.Struct("<QQ")


def _salt(session_id: bytes, round_number: int) -> bytes:
    return b"confide/secagg/v1" + session_id + round_number.to_bytes(8, "little")


def derive_key(
    private_key: X25519PrivateKey,
    peer_public: bytes,
    *,
    info: bytes,
    session_id: bytes,
    round_number: int,
) -> bytes:
    """HKDF-SHA256(X25519(private, peer)) -> 32 bytes, domain-separated by ``info``."""
    shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=_salt(session_id, round_number), info=info
    ).derive(shared)


@dataclass(frozen=True)
class ClientKeys:
    """The two X25519 key pairs of one client for one round (fresh every round)."""

    encryption: X25519PrivateKey
    mask: X25519PrivateKey

    @classmethod
    def generate(cls) -> ClientKeys:
        return cls(X25519PrivateKey.generate(), X25519PrivateKey.generate())

    @property
    def encryption_public(self) -> bytes:
        return self.encryption.public_key().public_bytes_raw()

    @property
    def mask_public(self) -> bytes:
        return self.mask.public_key().public_bytes_raw()

    def mask_private_bytes(self) -> bytes:
        return self.mask.private_bytes_raw()


def pairwise_mask_seed(
    mask_private: X25519PrivateKey, peer_mask_public: bytes, session_id: bytes, round_number: int
) -> bytes:
    """Seed s_{u,v} of the pairwise mask; symmetric in u and v by DH commutativity."""
    return derive_key(
        mask_private,
        peer_mask_public,
        info=INFO_PAIRWISE_MASK,
        session_id=session_id,
        round_number=round_number,
    )


def associated_data(
    session_id: bytes, round_number: int, stage: str, sender: int, receiver: int
) -> bytes:
    """AEAD associated data: binds a ciphertext to its session, round, stage and both ends,
    so a share cannot be replayed into another round/stage or re-addressed."""
    return (
        b"confide/secagg/v1/ad"
        + session_id
        + struct.pack("<QQQ", round_number, sender, receiver)
        + stage.encode()
    )


def encrypt_share(
    key: bytes,
    plaintext: bytes,
    *,
    session_id: bytes,
    round_number: int,
    stage: str,
    sender: int,
    receiver: int,
) -> bytes:
    """Envelope = sender || receiver || nonce || ChaCha20-Poly1305(key, plaintext, AD)."""
    nonce = os.urandom(NONCE_BYTES)
    ad = associated_data(session_id, round_number, stage, sender, receiver)
    return (
        _ENVELOPE.pack(sender, receiver)
        + nonce
        + ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)
    )


def envelope_ends(envelope: bytes) -> tuple[int, int]:
    """(sender, receiver) as written in the envelope's clear header."""
    if len(envelope) < _ENVELOPE.size + NONCE_BYTES + 16:
        raise SecAggProtocolError("encrypted share is truncated")
    sender, receiver = _ENVELOPE.unpack_from(envelope)
    return sender, receiver


def decrypt_share(
    key: bytes,
    envelope: bytes,
    *,
    session_id: bytes,
    round_number: int,
    stage: str,
    sender: int,
    receiver: int,
) -> bytes:
    """Open an envelope addressed from ``sender`` to ``receiver``; raise a named error if it
    is addressed elsewhere or fails authentication."""
    head_sender, head_receiver = envelope_ends(envelope)
    if head_receiver != receiver:
        raise SecAggProtocolError(
            f"encrypted share is addressed to client {head_receiver}, not to this client",
            sender=head_sender,
            receiver=receiver,
            stage=stage,
        )
    if head_sender != sender:
        raise SecAggProtocolError(
            f"encrypted share claims sender {head_sender} but was delivered as from {sender}",
            sender=sender,
            receiver=receiver,
            stage=stage,
        )
    nonce = envelope[_ENVELOPE.size : _ENVELOPE.size + NONCE_BYTES]
    ciphertext = envelope[_ENVELOPE.size + NONCE_BYTES :]
    ad = associated_data(session_id, round_number, stage, sender, receiver)
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, ad)
    except InvalidTag:
        raise SecAggDecryptionError(
            "encrypted share failed authentication (tampered, replayed from another "
            "round/stage/session, or encrypted under another key)",
            sender=sender,
            receiver=receiver,
            stage=stage,
        ) from None
