"""Client and server state machines of SecAgg+ (Bell et al. 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", Alg. 2; built on Bonawitz et al. 2017,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", Fig. 4).

One :class:`SecAggClient` and one :class:`SecAggServer` per round. They take message objects
in and give message objects out, hold no global state and never touch a network, so
  * a test drives N in-process parties by passing messages around;
  * a transport adapter serialises each message with ``to_bytes()``;
  * stages 0-1 of round r+1 run on objects independent of round r's, so an adapter can
    piggy-back them on round r's exchanges (see :mod:`confide.privacy.secagg`).

Stages (U1 ⊇ U2 ⊇ U3 ⊇ U4 are the clients still present at each stage):
  0 advertise_keys  client -> server: two X25519 public keys.
  1 share_keys      server -> clients: key directory of U1 + public graph seed;
                    client -> server: Shamir shares of b_u and s_u^SK for each neighbour,
                    AEAD-encrypted under HKDF(DH(c_u, c_v)).
  2 masked_input    server -> client: envelopes from its neighbours in U2;
                    client -> server: y_u = enc(x_u) + PRG(b_u) + sum ±PRG(s_uv) over
                    neighbours in U2.
  3 unmask          server -> clients: survivors U3 and dropped U2 \\ U3;
                    client -> server: shares of b_v (v in U3) and s_w^SK (w dropped);
                    server: reconstructs, removes masks, decodes the sum.

Thresholds (SecAgg+): the shares of u are held by its closed neighbourhood N[u] (u and its
k neighbours); reconstruction needs t of them. The server aborts (:class:`SecAggAbort`,
nothing revealed) whenever some client's live closed neighbourhood drops below t, or fewer
than ``min_survivors`` clients remain. A client refuses (:class:`SecAggRefusal`) an unmask
request that would release both kinds of shares of one client, that lists it as dropped, or
that names fewer than ``min_survivors`` survivors.

Threat model: honest-but-curious server, honest clients (DESIGN.md). The server could
deviate (e.g. send different survivor lists to different clients, the attack SecAgg's
consistency-check round with signatures prevents); a malicious server is out of scope.
"""

from __future__ import annotations

import enum
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .config import SecAggConfig
from .errors import SecAggAbort, SecAggProtocolError, SecAggRefusal, SecAggValidationError
from .graph import neighbour_graph
from .keys import (
    INFO_SHARE_ENCRYPTION,
    PUBLIC_KEY_BYTES,
    ClientKeys,
    decrypt_share,
    derive_key,
    encrypt_share,
    pairwise_mask_seed,
)
from .masking import add_mask, mask_vector, pairwise_sign, reduce_mod
from .messages import (
    STAGE_ADVERTISE,
    STAGE_MASKED_INPUT,
    STAGE_SHARE,
    STAGE_UNMASK,
    AdvertiseKeys,
    KeyDirectory,
    MaskedInput,
    MaskedInputRequest,
    Message,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
)
from .prg import SEED_BYTES, ChaChaStream
from .quantize import UpdateEncoder
from .shamir import (
    SHARE_BYTES,
    reconstruct_secret,
    share_from_bytes,
    share_to_bytes,
    split_secret,
)

MAX_CLIENT_ID = (1 << 63) - 1
_SHARE_PLAINTEXT = struct.Struct(f"<QQ{SHARE_BYTES}s{SHARE_BYTES}s")


def _check_client_id(cid: object) -> int:
    if not isinstance(cid, int | np.integer) or not 1 <= int(cid) <= MAX_CLIENT_ID:
        raise SecAggValidationError(f"client id must be an integer in [1, 2^63), got {cid!r}")
    return int(cid)


def _check_context(
    msg: Message, config: SecAggConfig, round_number: int, expected: type[Message]
) -> None:
    """Reject messages of another session, round or stage with a message naming which."""
    if not isinstance(msg, Message):
        raise SecAggProtocolError(f"expected a {expected.KIND} message, got {type(msg).__name__}")
    if msg.session_id != config.session_id:
        raise SecAggProtocolError(
            f"{msg.KIND} message belongs to session {msg.session_id.hex()}, not"
            f" {config.session_id.hex()}",
            stage=msg.STAGE,
        )
    if msg.round != round_number:
        raise SecAggProtocolError(
            f"{msg.KIND} message is from round {msg.round} but this is round {round_number}"
            " (replayed or misrouted)",
            stage=msg.STAGE,
        )
    if not isinstance(msg, expected):
        raise SecAggProtocolError(
            f"{msg.KIND} message (stage {msg.STAGE!r}) received where a {expected.KIND}"
            f" message (stage {expected.STAGE!r}) is expected",
            stage=msg.STAGE,
        )


def _round_graph(
    config: SecAggConfig, ids: Iterable[int], seed: bytes
) -> dict[int, frozenset[int]]:
    ids = sorted(ids)
    degree = config.degree
    if degree >= len(ids) - 1:
        degree = len(ids) - 1  # fewer advertisers than planned: complete graph
    return neighbour_graph(ids, degree, seed)


class ClientStage(enum.Enum):
    ADVERTISE = 0
    SHARE = 1
    MASKED_INPUT = 2
    UNMASK = 3
    DONE = 4


class SecAggClient:
    """One client's side of one round."""

    def __init__(
        self,
        config: SecAggConfig,
        client_id: int,
        round_number: int,
        *,
        noise_stream: ChaChaStream | None = None,
        rounding_stream: ChaChaStream | None = None,
    ) -> None:
        self.config = config
        self.client_id = _check_client_id(client_id)
        self.round = int(round_number)
        self._keys = ClientKeys.generate()
        self._self_seed = os.urandom(SEED_BYTES)  # b_u
        self._stage = ClientStage.ADVERTISE
        self._noise_stream = noise_stream
        self._rounding_stream = rounding_stream
        self._directory: dict[int, tuple[bytes, bytes]] = {}
        self._neighbours: frozenset[int] = frozenset()
        # owner -> (share of b_owner, share of s_owner^SK) held by this client
        self._held: dict[int, tuple[int, int]] = {}
        self._own_shares: tuple[int, int] | None = None
        # the client's own encoded (clipped, quantized, noised) input before masking; kept
        # only when masked_input(keep_encoded=True) asks for it (simulation-only checks)
        self.last_encoded: np.ndarray | None = None

    @property
    def stage(self) -> ClientStage:
        return self._stage

    # ---- persistence (a node's stages of one round may run in different processes) ------

    def to_state(self) -> bytes:
        """Everything this client needs to continue the round later, secret keys included:
        the bytes must stay on the node (e.g. its Flower Context.state), never be sent.
        Injected noise/rounding streams are not saved (fresh OS randomness on restore)."""
        state = {
            "id": self.client_id,
            "round": self.round,
            "stage": self._stage.name,
            "enc": self._keys.encryption.private_bytes_raw().hex(),
            "mask": self._keys.mask.private_bytes_raw().hex(),
            "b": self._self_seed.hex(),
            "dir": {str(c): [e.hex(), m.hex()] for c, (e, m) in self._directory.items()},
            "nb": sorted(self._neighbours),
            "held": {str(o): [b, s] for o, (b, s) in self._held.items()},
            "own": list(self._own_shares) if self._own_shares is not None else None,
        }
        return json.dumps(state, separators=(",", ":")).encode()

    @classmethod
    def from_state(cls, config: SecAggConfig, data: bytes) -> SecAggClient:
        """Inverse of :meth:`to_state` for the same session configuration."""
        try:
            state = json.loads(data)
            client = cls(config, int(state["id"]), int(state["round"]))
            client._keys = ClientKeys(
                X25519PrivateKey.from_private_bytes(bytes.fromhex(state["enc"])),
                X25519PrivateKey.from_private_bytes(bytes.fromhex(state["mask"])),
            )
            client._self_seed = bytes.fromhex(state["b"])
            client._stage = ClientStage[state["stage"]]
            client._directory = {
                int(c): (bytes.fromhex(e), bytes.fromhex(m)) for c, (e, m) in state["dir"].items()
            }
            client._neighbours = frozenset(int(v) for v in state["nb"])
            client._held = {int(o): (int(b), int(s)) for o, (b, s) in state["held"].items()}
            own = state["own"]
            client._own_shares = (int(own[0]), int(own[1])) if own is not None else None
        except (KeyError, ValueError, TypeError) as exc:
            raise SecAggValidationError(
                f"unreadable secure-aggregation client state: {exc}"
            ) from None
        return client

    def _expect(self, stage: ClientStage, what: str) -> None:
        if self._stage is not stage:
            raise SecAggProtocolError(
                f"client {self.client_id} cannot {what} in state {self._stage.name}"
                " (message replayed or out of order)"
            )

    def advertise_keys(self) -> AdvertiseKeys:
        """Stage 0: public keys. May be sent together with the previous round's messages."""
        self._expect(ClientStage.ADVERTISE, "advertise keys")
        self._stage = ClientStage.SHARE
        return AdvertiseKeys(
            self.config.session_id,
            self.round,
            sender=self.client_id,
            encryption_public=self._keys.encryption_public,
            mask_public=self._keys.mask_public,
        )

    def share_keys(self, directory: KeyDirectory) -> ShareKeys:
        """Stage 1: Shamir-share b_u and s_u^SK among the closed neighbourhood; encrypt."""
        self._expect(ClientStage.SHARE, "share keys")
        _check_context(directory, self.config, self.round, KeyDirectory)
        cfg = self.config
        me = self.client_id
        keys = directory.public_keys
        if keys.get(me) != (self._keys.encryption_public, self._keys.mask_public):
            raise SecAggProtocolError(
                "key directory does not carry this client's own public keys",
                receiver=me,
                stage=STAGE_SHARE,
            )
        for cid, (enc, mask) in keys.items():
            if len(enc) != PUBLIC_KEY_BYTES or len(mask) != PUBLIC_KEY_BYTES:
                raise SecAggProtocolError("malformed public key in directory", sender=cid)
        if len(directory.graph_seed) != SEED_BYTES:
            raise SecAggProtocolError("graph seed must be 32 bytes", stage=STAGE_SHARE)
        if len(keys) < cfg.min_survivors:
            raise SecAggAbort(STAGE_SHARE, len(keys), cfg.min_survivors, "clients in key directory")
        graph = _round_graph(cfg, keys, directory.graph_seed)
        neighbours = graph[me]
        holders = sorted(neighbours | {me})
        if len(holders) < cfg.threshold:
            raise SecAggAbort(STAGE_SHARE, len(holders), cfg.threshold, f"neighbourhood of {me}")
        b_shares = split_secret(self._self_seed, cfg.threshold, holders)
        sk_shares = split_secret(self._keys.mask_private_bytes(), cfg.threshold, holders)
        envelopes = {}
        for v in neighbours:
            key = derive_key(
                self._keys.encryption,
                keys[v][0],
                info=INFO_SHARE_ENCRYPTION,
                session_id=cfg.session_id,
                round_number=self.round,
            )
            plaintext = _SHARE_PLAINTEXT.pack(
                me, v, share_to_bytes(b_shares[v]), share_to_bytes(sk_shares[v])
            )
            envelopes[v] = encrypt_share(
                key,
                plaintext,
                session_id=cfg.session_id,
                round_number=self.round,
                stage=STAGE_SHARE,
                sender=me,
                receiver=v,
            )
        self._own_shares = (b_shares[me], sk_shares[me])
        self._directory = dict(keys)
        self._neighbours = neighbours
        self._stage = ClientStage.MASKED_INPUT
        return ShareKeys(cfg.session_id, self.round, sender=me, envelopes=envelopes)

    def masked_input(
        self,
        request: MaskedInputRequest,
        update: np.ndarray | None,
        weight: float = 1.0,
        *,
        keep_encoded: bool = False,
        encoded: np.ndarray | None = None,
    ) -> MaskedInput:
        """Stage 2: decrypt neighbours' shares, encode (clip, quantize, noise) and mask.

        ``encoded``: a ring vector the caller already encoded (shared-noise example-level DP,
        :mod:`.shared_noise`, rounds each example itself); it replaces ``update``."""
        self._expect(ClientStage.MASKED_INPUT, "send a masked input")
        _check_context(request, self.config, self.round, MaskedInputRequest)
        cfg = self.config
        me = self.client_id
        if request.receiver != me:
            raise SecAggProtocolError(
                f"masked-input request addressed to client {request.receiver}",
                receiver=me,
                stage=STAGE_MASKED_INPUT,
            )
        held: dict[int, tuple[int, int]] = {}
        for sender, envelope in request.envelopes.items():
            if sender not in self._neighbours:
                raise SecAggProtocolError(
                    "encrypted share from a client that is not a neighbour",
                    sender=sender,
                    receiver=me,
                    stage=STAGE_MASKED_INPUT,
                )
            key = derive_key(
                self._keys.encryption,
                self._directory[sender][0],
                info=INFO_SHARE_ENCRYPTION,
                session_id=cfg.session_id,
                round_number=self.round,
            )
            plaintext = decrypt_share(
                key,
                envelope,
                session_id=cfg.session_id,
                round_number=self.round,
                stage=STAGE_SHARE,
                sender=sender,
                receiver=me,
            )
            owner, holder, b_share, sk_share = _SHARE_PLAINTEXT.unpack(plaintext)
            if owner != sender or holder != me:
                raise SecAggProtocolError(
                    f"decrypted share names owner {owner} / holder {holder}",
                    sender=sender,
                    receiver=me,
                    stage=STAGE_MASKED_INPUT,
                )
            held[sender] = (share_from_bytes(b_share), share_from_bytes(sk_share))
        if len(held) + 1 < cfg.threshold:
            raise SecAggAbort(
                STAGE_MASKED_INPUT, len(held) + 1, cfg.threshold, f"live neighbourhood of {me}"
            )
        if encoded is not None:
            if not isinstance(encoded, np.ndarray) or encoded.dtype != np.dtype(cfg.dtype) \
                    or encoded.shape != (cfg.encoded_length,):
                raise SecAggValidationError(
                    f"pre-encoded input must be a {np.dtype(cfg.dtype)} vector of length"
                    f" {cfg.encoded_length}"
                )
        elif update is None:
            raise SecAggValidationError("masked_input needs an update or an encoded vector")
        else:
            encoded = UpdateEncoder(cfg).encode(
                update, weight, noise_stream=self._noise_stream,
                rounding_stream=self._rounding_stream,
            )
        assert self._own_shares is not None
        held[me] = self._own_shares
        self._held = held
        pair_seeds = [
            (
                v,
                pairwise_mask_seed(
                    self._keys.mask, self._directory[v][1], cfg.session_id, self.round
                ),
            )
            for v in sorted(held)
            if v != me
        ]
        if keep_encoded:
            self.last_encoded = encoded.copy()
        vector = mask_vector(encoded, me, self._self_seed, pair_seeds, cfg)
        self._stage = ClientStage.UNMASK
        return MaskedInput(cfg.session_id, self.round, sender=me, vector=vector)

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Stage 3: release b-shares of survivors and s^SK-shares of dropped clients, never
        both for one client, and only once per round."""
        self._expect(ClientStage.UNMASK, "answer an unmask request")
        _check_context(request, self.config, self.round, UnmaskRequest)
        me = self.client_id
        survivors, dropped = set(request.survivors), set(request.dropped)
        both = survivors & dropped
        if both:
            raise SecAggRefusal(
                f"unmask request lists clients {sorted(both)} as both survived and dropped;"
                " releasing both share kinds would reveal their inputs",
                receiver=me,
                stage=STAGE_UNMASK,
            )
        if me not in survivors:
            raise SecAggRefusal(
                "unmask request does not list this client as a survivor",
                receiver=me,
                stage=STAGE_UNMASK,
            )
        if len(survivors) < self.config.min_survivors:
            raise SecAggRefusal(
                f"unmask request names {len(survivors)} survivors < min_survivors ="
                f" {self.config.min_survivors}",
                receiver=me,
                stage=STAGE_UNMASK,
            )
        self._stage = ClientStage.DONE  # one answer per round, even if the next check fails
        b_out = {o: s[0] for o, s in self._held.items() if o in survivors}
        sk_out = {o: s[1] for o, s in self._held.items() if o in dropped}
        return UnmaskShares(
            self.config.session_id,
            self.round,
            sender=me,
            self_mask_shares=b_out,
            mask_key_shares=sk_out,
        )


class ServerStage(enum.Enum):
    ADVERTISE = 0
    SHARE = 1
    MASKED_INPUT = 2
    UNMASK = 3
    DONE = 4
    ABORTED = 5


@dataclass(frozen=True, eq=False)
class SecAggResult:
    """What the server learns: the (noised) weighted sum of survivors' updates and their
    total weight, plus who took part. ``ring_sum`` is the same sum in Z_{2^b}."""

    round: int
    weighted_sum: np.ndarray
    total_weight: float
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    ring_sum: np.ndarray


class SecAggServer:
    """The server's side of one round: collects each stage's messages, then closes the stage.

    Call :meth:`receive` for every incoming message, then the stage-closing method
    (:meth:`key_directory`, :meth:`masked_input_requests`, :meth:`unmask_request`,
    :meth:`result`) when the stage's deadline passes; whoever has not answered by then has
    dropped out.
    """

    def __init__(
        self, config: SecAggConfig, round_number: int, *, graph_seed: bytes | None = None
    ) -> None:
        self.config = config
        self.round = int(round_number)
        self.graph_seed = os.urandom(SEED_BYTES) if graph_seed is None else graph_seed
        if len(self.graph_seed) != SEED_BYTES:
            raise SecAggValidationError("graph_seed must be 32 bytes")
        self._stage = ServerStage.ADVERTISE
        self._encoder = UpdateEncoder(config)
        self._public_keys: dict[int, tuple[bytes, bytes]] = {}
        self._graph: dict[int, frozenset[int]] = {}
        self._share_msgs: dict[int, ShareKeys] = {}
        self._masked_sum: np.ndarray | None = None
        self._masked_from: set[int] = set()
        self._unmask_msgs: dict[int, UnmaskShares] = {}
        self._survivors: tuple[int, ...] = ()
        self._dropped: tuple[int, ...] = ()
        self.reconstructed_secrets = 0  # for audits/tests: nothing is reconstructed on abort

    @property
    def stage(self) -> ServerStage:
        return self._stage

    @property
    def masked_sum(self) -> np.ndarray | None:
        """The running sum of masked inputs (still masked); cleared on abort."""
        return self._masked_sum

    def _abort(self, stage: str, available: int, required: int, detail: str) -> SecAggAbort:
        # discard everything derived from client inputs before reporting the abort
        self._stage = ServerStage.ABORTED
        self._masked_sum = None
        self._unmask_msgs.clear()
        return SecAggAbort(stage, available, required, detail)

    def _closed_neighbourhood(self, u: int) -> frozenset[int]:
        return self._graph[u] | {u}

    def receive(self, msg: Message) -> None:
        """Accept one client message of the current stage (validated, never partially)."""
        expected = {
            ServerStage.ADVERTISE: AdvertiseKeys,
            ServerStage.SHARE: ShareKeys,
            ServerStage.MASKED_INPUT: MaskedInput,
            ServerStage.UNMASK: UnmaskShares,
        }.get(self._stage)
        if expected is None:
            raise SecAggProtocolError(f"round {self.round} is {self._stage.name}; no more messages")
        _check_context(msg, self.config, self.round, expected)
        sender = msg.sender  # type: ignore[attr-defined]  # every client message has one
        if isinstance(msg, AdvertiseKeys):
            _check_client_id(sender)
            if sender in self._public_keys:
                raise SecAggProtocolError(
                    "duplicate key advertisement", sender=sender, stage=msg.STAGE
                )
            if (
                len(msg.encryption_public) != PUBLIC_KEY_BYTES
                or len(msg.mask_public) != PUBLIC_KEY_BYTES
            ):
                raise SecAggProtocolError(
                    "public keys must be 32 bytes", sender=sender, stage=msg.STAGE
                )
            if len(self._public_keys) >= self.config.num_clients:
                raise SecAggProtocolError(
                    f"more than num_clients={self.config.num_clients} advertisements",
                    sender=sender,
                    stage=msg.STAGE,
                )
            self._public_keys[sender] = (msg.encryption_public, msg.mask_public)
        elif isinstance(msg, ShareKeys):
            if sender not in self._graph:
                raise SecAggProtocolError(
                    "shares from a client not in the key directory", sender=sender, stage=msg.STAGE
                )
            if sender in self._share_msgs:
                raise SecAggProtocolError("duplicate share message", sender=sender, stage=msg.STAGE)
            if set(msg.envelopes) != set(self._graph[sender]):
                raise SecAggProtocolError(
                    "share message must address exactly the sender's neighbours",
                    sender=sender,
                    stage=msg.STAGE,
                )
            self._share_msgs[sender] = msg
        elif isinstance(msg, MaskedInput):
            self._receive_masked(msg)
        elif isinstance(msg, UnmaskShares):
            if sender not in self._survivors:
                raise SecAggProtocolError(
                    "unmask shares from a non-survivor", sender=sender, stage=msg.STAGE
                )
            if sender in self._unmask_msgs:
                raise SecAggProtocolError("duplicate unmask shares", sender=sender, stage=msg.STAGE)
            dropped = set(self._dropped)
            if (
                not set(msg.self_mask_shares) <= set(self._survivors)
                or not set(msg.mask_key_shares) <= dropped
            ):
                raise SecAggProtocolError(
                    "unmask shares for clients not requested", sender=sender, stage=msg.STAGE
                )
            self._unmask_msgs[sender] = msg

    def _receive_masked(self, msg: MaskedInput) -> None:
        cfg = self.config
        sender = msg.sender
        if sender not in self._share_msgs:
            raise SecAggProtocolError(
                "masked input from a client that did not share keys", sender=sender, stage=msg.STAGE
            )
        if sender in self._masked_from:
            raise SecAggProtocolError("duplicate masked input", sender=sender, stage=msg.STAGE)
        v = msg.vector
        if not isinstance(v, np.ndarray) or v.dtype != np.dtype(cfg.dtype):
            raise SecAggProtocolError(
                f"masked input has dtype {getattr(v, 'dtype', type(v).__name__)}, expected"
                f" {np.dtype(cfg.dtype)}",
                sender=sender,
                stage=msg.STAGE,
            )
        if v.shape != (cfg.encoded_length,):
            raise SecAggProtocolError(
                f"masked input has shape {v.shape}, expected ({cfg.encoded_length},)",
                sender=sender,
                stage=msg.STAGE,
            )
        if cfg.bits not in (32, 64) and int(v.max(initial=0)) > cfg.ring_mask:
            raise SecAggProtocolError(
                f"masked input has values outside Z_2^{cfg.bits}", sender=sender, stage=msg.STAGE
            )
        if self._masked_sum is None:
            self._masked_sum = np.zeros(cfg.encoded_length, dtype=cfg.dtype)
        # streaming sum: the server never stores individual masked vectors
        np.add(self._masked_sum, v, out=self._masked_sum)
        self._masked_from.add(sender)

    def _expect(self, stage: ServerStage, what: str) -> None:
        if self._stage is not stage:
            raise SecAggProtocolError(f"cannot {what} in server state {self._stage.name}")

    def key_directory(self) -> KeyDirectory:
        """Close stage 0; broadcast the directory of U1 and this round's graph seed."""
        self._expect(ServerStage.ADVERTISE, "publish the key directory")
        cfg = self.config
        u1 = sorted(self._public_keys)
        if len(u1) < cfg.min_survivors:
            raise self._abort(
                STAGE_ADVERTISE, len(u1), cfg.min_survivors, "clients advertised keys"
            )
        self._graph = _round_graph(cfg, u1, self.graph_seed)
        self._stage = ServerStage.SHARE
        return KeyDirectory(
            cfg.session_id,
            self.round,
            graph_seed=self.graph_seed,
            public_keys=dict(self._public_keys),
        )

    def masked_input_requests(self) -> dict[int, MaskedInputRequest]:
        """Close stage 1; route each client in U2 the envelopes its neighbours in U2 sent it."""
        self._expect(ServerStage.SHARE, "request masked inputs")
        cfg = self.config
        u2 = set(self._share_msgs)
        if len(u2) < cfg.min_survivors:
            raise self._abort(STAGE_SHARE, len(u2), cfg.min_survivors, "clients shared keys")
        for u in sorted(u2):
            alive = len(self._closed_neighbourhood(u) & u2)
            if alive < cfg.threshold:
                raise self._abort(
                    STAGE_SHARE, alive, cfg.threshold, f"live neighbourhood of client {u}"
                )
        requests = {}
        for v in sorted(u2):
            env = {u: self._share_msgs[u].envelopes[v] for u in sorted(self._graph[v] & u2)}
            requests[v] = MaskedInputRequest(cfg.session_id, self.round, receiver=v, envelopes=env)
        self._stage = ServerStage.MASKED_INPUT
        return requests

    def unmask_request(self) -> UnmaskRequest:
        """Close stage 2; announce survivors U3 and dropped U2 \\ U3."""
        self._expect(ServerStage.MASKED_INPUT, "request unmasking")
        cfg = self.config
        u2, u3 = set(self._share_msgs), set(self._masked_from)
        if len(u3) < cfg.min_survivors:
            raise self._abort(
                STAGE_MASKED_INPUT, len(u3), cfg.min_survivors, "masked inputs received"
            )
        for u in sorted(u2):
            alive = len(self._closed_neighbourhood(u) & u3)
            if alive < cfg.threshold:
                raise self._abort(
                    STAGE_MASKED_INPUT, alive, cfg.threshold, f"live share holders of client {u}"
                )
        self._survivors = tuple(sorted(u3))
        self._dropped = tuple(sorted(u2 - u3))
        self._stage = ServerStage.UNMASK
        return UnmaskRequest(
            cfg.session_id, self.round, survivors=self._survivors, dropped=self._dropped
        )

    def result(self) -> SecAggResult:
        """Close stage 3: reconstruct secrets, remove masks, decode. Checks every threshold
        before reconstructing anything, so an abort reveals nothing."""
        self._expect(ServerStage.UNMASK, "compute the result")
        cfg = self.config
        u2 = set(self._share_msgs)
        responders = set(self._unmask_msgs)
        if len(responders) < cfg.threshold:
            raise self._abort(
                STAGE_UNMASK, len(responders), cfg.threshold, "clients answered unmask"
            )
        b_shares: dict[int, dict[int, int]] = {v: {} for v in self._survivors}
        sk_shares: dict[int, dict[int, int]] = {w: {} for w in self._dropped}
        for holder, msg in self._unmask_msgs.items():
            for owner, share in msg.self_mask_shares.items():
                b_shares[owner][holder] = share
            for owner, share in msg.mask_key_shares.items():
                sk_shares[owner][holder] = share
        for kind, table in (("self-mask", b_shares), ("mask-key", sk_shares)):
            for owner, shares in table.items():
                if len(shares) < cfg.threshold:
                    raise self._abort(
                        STAGE_UNMASK, len(shares), cfg.threshold, f"{kind} shares of client {owner}"
                    )
        assert self._masked_sum is not None
        total = self._masked_sum.copy()
        try:
            for shares in b_shares.values():
                seed = reconstruct_secret(shares, cfg.threshold)
                self.reconstructed_secrets += 1
                add_mask(total, seed, -1)
            for w, shares in sk_shares.items():
                sk = X25519PrivateKey.from_private_bytes(reconstruct_secret(shares, cfg.threshold))
                self.reconstructed_secrets += 1
                for v in sorted(self._graph[w] & set(self._survivors) & u2):
                    seed = pairwise_mask_seed(
                        sk, self._public_keys[v][1], cfg.session_id, self.round
                    )
                    # v added sign(v, w) * PRG(s_vw); w never sent its cancelling term
                    add_mask(total, seed, -pairwise_sign(v, w))
        except ValueError as exc:
            self._stage = ServerStage.ABORTED
            self._masked_sum = None
            raise SecAggProtocolError(
                f"share reconstruction failed: {exc}", stage=STAGE_UNMASK
            ) from None
        reduce_mod(total, cfg)
        weighted_sum, total_weight = self._encoder.decode(total)
        self._stage = ServerStage.DONE
        return SecAggResult(
            self.round, weighted_sum, total_weight, self._survivors, self._dropped, total
        )
