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

Against an actively malicious server (:mod:`.identity`): a client given its identity and
the federation's roster signs its advertisement, checks the whole directory against the
roster, recomputes the graph seed from the directory, refuses a threshold that is not above
half of its closed neighbourhood, votes (signs) the (survivors, dropped) split it will
unmask for, and unmasks only a split it voted for itself that carries votes of at least
t identities of the directory. The vote for "everyone asked survived" travels
with the masked input, so a round without dropouts needs no extra exchange; otherwise the
server asks the survivors to vote on the actual split (:class:`ConsistencyRequest`) first.
Without identity and roster a client runs the honest-but-curious protocol.
"""

from __future__ import annotations

import enum
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .config import SecAggConfig
from .errors import SecAggAbort, SecAggProtocolError, SecAggRefusal, SecAggValidationError
from .graph import neighbour_graph
from .identity import (
    Roster,
    advertisement_bytes,
    directory_graph_seed,
    raw_public,
    verify_signature,
    vote_bytes,
)
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
    STAGE_CONSISTENCY,
    STAGE_MASKED_INPUT,
    STAGE_SHARE,
    STAGE_UNMASK,
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencyVote,
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
        identity: Ed25519PrivateKey | None = None,
        roster: Roster | None = None,
    ) -> None:
        if (identity is None) != (roster is None):
            raise SecAggValidationError("an authenticated client needs both its identity and "
                                        "the federation's roster")
        self.config = config
        self.client_id = _check_client_id(client_id)
        self.round = int(round_number)
        self._identity = identity
        self._roster = roster
        self._identities: dict[int, bytes] = {}  # the directory's, once verified
        self._candidates: tuple[int, ...] = ()  # U2, as the masked-input request named it
        self._voted: list[tuple[tuple[int, ...], tuple[int, ...]]] = []  # splits it signed
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
            "ids": {str(c): i.hex() for c, i in self._identities.items()},
            "cand": list(self._candidates),
            "voted": [[list(s), list(d)] for s, d in self._voted],
        }
        return json.dumps(state, separators=(",", ":")).encode()

    @classmethod
    def from_state(cls, config: SecAggConfig, data: bytes, *,
                   identity: Ed25519PrivateKey | None = None,
                   roster: Roster | None = None) -> SecAggClient:
        """Inverse of :meth:`to_state` for the same session configuration. The identity and
        roster are the node's, not the round's: the caller passes them again."""
        try:
            state = json.loads(data)
            client = cls(config, int(state["id"]), int(state["round"]), identity=identity,
                         roster=roster)
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
            client._identities = {int(c): bytes.fromhex(i)
                                  for c, i in state.get("ids", {}).items()}
            client._candidates = tuple(int(c) for c in state.get("cand", []))
            client._voted = [(tuple(int(x) for x in sv), tuple(int(x) for x in dr))
                             for sv, dr in state.get("voted", [])]
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
        enc, mask = self._keys.encryption_public, self._keys.mask_public
        identity = signature = b""
        if self._identity is not None:
            identity = raw_public(self._identity)
            signature = self._identity.sign(advertisement_bytes(
                self.config.session_id, self.round, self.client_id, enc, mask))
        return AdvertiseKeys(
            self.config.session_id,
            self.round,
            sender=self.client_id,
            encryption_public=enc,
            mask_public=mask,
            identity=identity,
            signature=signature,
        )

    @property
    def authenticated(self) -> bool:
        return self._roster is not None

    def _check_directory(self, directory: KeyDirectory) -> None:
        """Authenticated clients: every entry signed by an identity on the roster, each
        identity once, this client's own entry intact, enough partners, and a threshold
        above half of this client's closed neighbourhood."""
        assert self._roster is not None and self._identity is not None
        me, cfg = self.client_id, self.config
        ids, sigs = directory.identities, directory.signatures
        for cid, (enc, mask) in sorted(directory.public_keys.items()):
            message = advertisement_bytes(cfg.session_id, self.round, cid, enc, mask)
            if not verify_signature(ids.get(cid, b""), sigs.get(cid, b""), message):
                raise SecAggRefusal(f"key directory entry of client {cid} is unsigned or its "
                                    "signature does not verify", receiver=me,
                                    stage=STAGE_SHARE)
        self._roster.check_directory({c: ids[c] for c in directory.public_keys}, me,
                                     raw_public(self._identity))

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
        seed = directory_graph_seed(cfg.session_id, self.round, keys, directory.identities)
        if directory.graph_seed != seed:
            raise SecAggRefusal("the graph seed is not the hash of the key directory (a server "
                                "may not choose the neighbour graph)", receiver=me,
                                stage=STAGE_SHARE)
        if self.authenticated:
            self._check_directory(directory)
        if len(keys) < cfg.min_survivors:
            raise SecAggAbort(STAGE_SHARE, len(keys), cfg.min_survivors, "clients in key directory")
        graph = _round_graph(cfg, keys, seed)
        neighbours = graph[me]
        holders = sorted(neighbours | {me})
        if len(holders) < cfg.threshold:
            raise SecAggAbort(STAGE_SHARE, len(holders), cfg.threshold, f"neighbourhood of {me}")
        if self.authenticated and 2 * int(cfg.threshold) <= len(holders):
            raise SecAggRefusal(f"threshold {cfg.threshold} is not above half of this "
                                f"client's {len(holders)} share holders: two disjoint halves "
                                "could rebuild both of its secrets", receiver=me,
                                stage=STAGE_SHARE)
        b_shares = split_secret(self._self_seed, cfg.threshold, holders)
        sk_shares = split_secret(self._keys.mask_private_bytes(), cfg.threshold, holders)
        envelopes = self._seal_envelopes(keys, neighbours, b_shares, sk_shares)
        self._own_shares = (b_shares[me], sk_shares[me])
        self._directory = dict(keys)
        self._identities = {c: directory.identities.get(c, b"") for c in keys}
        self._neighbours = neighbours
        self._stage = ClientStage.MASKED_INPUT
        return ShareKeys(cfg.session_id, self.round, sender=me, envelopes=envelopes)

    def _seal_envelopes(self, keys: dict[int, tuple[bytes, bytes]],
                        neighbours: frozenset[int], b_shares: dict[int, int],
                        sk_shares: dict[int, int]) -> dict[int, bytes]:
        """Each neighbour's shares of b_u and s_u^SK, encrypted under the key this client
        shares with it (the server relays them and cannot read them)."""
        cfg = self.config
        me = self.client_id
        envelopes: dict[int, bytes] = {}
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
        return envelopes

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
        held = self._open_envelopes(request)
        if len(held) + 1 < cfg.threshold:
            raise SecAggAbort(
                STAGE_MASKED_INPUT, len(held) + 1, cfg.threshold, f"live neighbourhood of {me}"
            )
        candidates = self._checked_candidates(request, held)
        encoded = self._input_to_mask(update, weight, encoded)
        assert self._own_shares is not None
        held[me] = self._own_shares
        self._held = held
        pair_seeds = self._pair_seeds(held)
        if keep_encoded:
            self.last_encoded = encoded.copy()
        vector = mask_vector(encoded, me, self._self_seed, pair_seeds, cfg)
        self._candidates = candidates
        vote = self._vote(candidates, ()) if self.authenticated else b""
        self._stage = ClientStage.UNMASK
        return MaskedInput(cfg.session_id, self.round, sender=me, vector=vector, vote=vote)

    def _open_envelopes(self, request: MaskedInputRequest) -> dict[int, tuple[int, int]]:
        """The shares the neighbours sent this client: owner -> (share of b_owner, share of
        s_owner^SK). An envelope from a non-neighbour, one that does not decrypt, or one
        that names another owner or holder is a protocol error."""
        cfg = self.config
        me = self.client_id
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
        return held

    def _checked_candidates(self, request: MaskedInputRequest,
                            held: dict[int, tuple[int, int]]) -> tuple[int, ...]:
        """U2 as the request names it. The vote sent with the masked input is for "every
        candidate survived", so an authenticated client refuses candidates that leave it
        out, miss a neighbour whose envelope it holds, or reach outside the directory."""
        me = self.client_id
        candidates = tuple(sorted(set(request.candidates)))
        if self.authenticated and (me not in candidates or not set(held) <= set(candidates)
                                   or not set(candidates) <= set(self._directory)):
            raise SecAggRefusal(
                "masked-input request names candidates that do not contain this client, "
                "its neighbours' envelopes, or are outside the key directory",
                receiver=me, stage=STAGE_MASKED_INPUT)
        return candidates

    def _input_to_mask(self, update: np.ndarray | None, weight: float,
                       encoded: np.ndarray | None) -> np.ndarray:
        """The ring vector to mask: the caller's pre-encoded one (checked for dtype and
        length), else ``update`` encoded here (clip, quantize, noise)."""
        cfg = self.config
        if encoded is not None:
            if not isinstance(encoded, np.ndarray) or encoded.dtype != np.dtype(cfg.dtype) \
                    or encoded.shape != (cfg.encoded_length,):
                raise SecAggValidationError(
                    f"pre-encoded input must be a {np.dtype(cfg.dtype)} vector of length"
                    f" {cfg.encoded_length}"
                )
            return encoded
        if update is None:
            raise SecAggValidationError("masked_input needs an update or an encoded vector")
        return UpdateEncoder(cfg).encode(
            update, weight, noise_stream=self._noise_stream,
            rounding_stream=self._rounding_stream,
        )

    def _pair_seeds(self, held: dict[int, tuple[int, int]]) -> list[tuple[int, bytes]]:
        """The pairwise mask seed s_uv shared with each live neighbour v."""
        cfg = self.config
        return [
            (
                v,
                pairwise_mask_seed(
                    self._keys.mask, self._directory[v][1], cfg.session_id, self.round
                ),
            )
            for v in sorted(held)
            if v != self.client_id
        ]

    def _vote(self, survivors: tuple[int, ...], dropped: tuple[int, ...]) -> bytes:
        assert self._identity is not None
        self._voted.append((survivors, dropped))
        return self._identity.sign(vote_bytes(self.config.session_id, self.round, survivors,
                                              dropped))

    def consistency_vote(self, request: ConsistencyRequest) -> ConsistencyVote:
        """Consistency round (only after a dropout at the masked-input stage): sign the
        actual split, once, if it is a split of the clients asked and this client survived."""
        self._expect(ClientStage.UNMASK, "vote on the survivors")
        _check_context(request, self.config, self.round, ConsistencyRequest)
        me = self.client_id
        survivors, dropped = tuple(sorted(set(request.survivors))), \
            tuple(sorted(set(request.dropped)))
        problem = None
        if not self.authenticated:
            problem = "this client runs without identities; there is nothing to vote with"
        elif len(self._voted) > 1:
            problem = "this client already voted on a split of this round's survivors"
        elif me not in survivors:
            problem = "the split does not list this client as a survivor"
        elif set(survivors) & set(dropped) or \
                set(survivors) | set(dropped) != set(self._candidates) or not dropped:
            problem = ("the split is not a partition of the clients asked for masked inputs "
                       "with someone dropped")
        elif len(survivors) < self._fewest_survivors():
            problem = f"the split names only {len(survivors)} survivors"
        if problem is not None:
            raise SecAggRefusal(problem, receiver=me, stage=STAGE_CONSISTENCY)
        return ConsistencyVote(self.config.session_id, self.round, sender=me,
                               vote=self._vote(survivors, dropped))

    def _floor(self) -> int:
        return self._roster.min_partners if self._roster is not None else 0

    def _fewest_survivors(self) -> int:
        """The fewest survivors this client unmasks for: the session's min_survivors, or
        its own floor where that is higher."""
        return max(int(self.config.min_survivors), self._floor())

    def _check_votes(self, request: UnmaskRequest) -> None:
        """Authenticated clients unmask only a split they voted for themselves that carries
        valid votes of at least t distinct survivors of the directory (Bonawitz et al.'s
        consistency check; every survivor is a signed member of the directory, so the
        survivor count the noise accounting rests on is checked in `unmask`)."""
        me, cfg = self.client_id, self.config
        split = (tuple(sorted(set(request.survivors))), tuple(sorted(set(request.dropped))))
        if split not in self._voted:
            raise SecAggRefusal("unmask request names a split of the survivors this client "
                                "never voted for", receiver=me, stage=STAGE_UNMASK)
        message = vote_bytes(cfg.session_id, self.round, *split)
        need, valid = int(cfg.threshold), 0
        for c, sig in sorted(request.votes.items()):  # stops at the quorum: O(t) checks
            if c in split[0] and verify_signature(self._identities.get(c, b""), sig, message):
                valid += 1
                if valid >= need:
                    return
        raise SecAggRefusal(f"unmask request carries {valid} valid survivor votes for its "
                            f"split; {need} are needed", receiver=me, stage=STAGE_UNMASK)

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
        fewest = self._fewest_survivors()
        if len(survivors) < fewest:
            raise SecAggRefusal(
                f"unmask request names {len(survivors)} survivors < {fewest} (min_survivors"
                f" {self.config.min_survivors}, this partner's floor {self._floor()})",
                receiver=me,
                stage=STAGE_UNMASK,
            )
        if self.authenticated:
            self._check_votes(request)
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
    CONSISTENCY = 3
    UNMASK = 4
    DONE = 5
    ABORTED = 6


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

    def __init__(self, config: SecAggConfig, round_number: int) -> None:
        self.config = config
        self.round = int(round_number)
        self.graph_seed = b""  # the hash of the key directory, once it is closed
        self._stage = ServerStage.ADVERTISE
        self._encoder = UpdateEncoder(config)
        self._public_keys: dict[int, tuple[bytes, bytes]] = {}
        self._identities: dict[int, bytes] = {}
        self._signatures: dict[int, bytes] = {}
        self._candidates: tuple[int, ...] = ()
        self._votes: dict[int, bytes] = {}  # votes on the split the unmask request will name
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
            ServerStage.CONSISTENCY: ConsistencyVote,
            ServerStage.UNMASK: UnmaskShares,
        }.get(self._stage)
        if expected is None:
            raise SecAggProtocolError(f"round {self.round} is {self._stage.name}; no more messages")
        _check_context(msg, self.config, self.round, expected)
        if isinstance(msg, AdvertiseKeys):
            self._receive_advertisement(msg)
        elif isinstance(msg, ShareKeys):
            self._receive_shares(msg)
        elif isinstance(msg, MaskedInput):
            self._receive_masked(msg)
        elif isinstance(msg, ConsistencyVote):
            self._receive_vote(msg)
        elif isinstance(msg, UnmaskShares):
            self._receive_unmask_shares(msg)

    def _receive_advertisement(self, msg: AdvertiseKeys) -> None:
        sender = msg.sender
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
        if msg.identity or msg.signature:
            self._check_advertisement(msg)
        self._public_keys[sender] = (msg.encryption_public, msg.mask_public)

    def _receive_shares(self, msg: ShareKeys) -> None:
        sender = msg.sender
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

    def _receive_vote(self, msg: ConsistencyVote) -> None:
        sender = msg.sender
        if sender not in self._survivors or sender in self._votes:
            raise SecAggProtocolError("consistency vote from a non-survivor, or twice",
                                      sender=sender, stage=msg.STAGE)
        self._take_vote(sender, msg.vote, self._survivors, self._dropped)

    def _receive_unmask_shares(self, msg: UnmaskShares) -> None:
        sender = msg.sender
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

    def _check_advertisement(self, msg: AdvertiseKeys) -> None:
        """An honest server keeps unverifiable or repeated identities out of the directory
        (the clients would refuse the whole directory otherwise)."""
        cfg = self.config
        message = advertisement_bytes(cfg.session_id, self.round, msg.sender,
                                      msg.encryption_public, msg.mask_public)
        if not verify_signature(msg.identity, msg.signature, message):
            raise SecAggProtocolError("key advertisement signature does not verify",
                                      sender=msg.sender, stage=msg.STAGE)
        if msg.identity in self._identities.values():
            raise SecAggProtocolError("identity already advertised by another client",
                                      sender=msg.sender, stage=msg.STAGE)
        self._identities[msg.sender] = msg.identity
        self._signatures[msg.sender] = msg.signature

    @property
    def authenticated(self) -> bool:
        """Every client of the directory advertised with an identity."""
        return bool(self._public_keys) and self._identities.keys() == self._public_keys.keys()

    def _take_vote(self, sender: int, vote: bytes, survivors: Iterable[int],
                   dropped: Iterable[int]) -> None:
        message = vote_bytes(self.config.session_id, self.round, survivors, dropped)
        if not verify_signature(self._identities.get(sender, b""), vote, message):
            raise SecAggProtocolError("consistency vote does not verify", sender=sender)
        self._votes[sender] = vote

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
        if self.authenticated:  # the vote for "every candidate survived" comes with it
            self._take_vote(sender, msg.vote, self._candidates, ())
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
        self.graph_seed = directory_graph_seed(cfg.session_id, self.round, self._public_keys,
                                               self._identities)
        self._graph = _round_graph(cfg, u1, self.graph_seed)
        self._stage = ServerStage.SHARE
        return KeyDirectory(
            cfg.session_id,
            self.round,
            graph_seed=self.graph_seed,
            public_keys=dict(self._public_keys),
            identities=dict(self._identities),
            signatures=dict(self._signatures),
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
        self._candidates = tuple(sorted(u2))
        for v in sorted(u2):
            env = {u: self._share_msgs[u].envelopes[v] for u in sorted(self._graph[v] & u2)}
            requests[v] = MaskedInputRequest(cfg.session_id, self.round, receiver=v, envelopes=env,
                                             candidates=self._candidates)
        self._stage = ServerStage.MASKED_INPUT
        return requests

    def consistency_request(self) -> ConsistencyRequest | None:
        """Close stage 2. None when no consistency round is needed (every client asked for a
        masked input delivered one, and its vote came with it; or an unauthenticated
        session): go on with :meth:`unmask_request`. Else the split every survivor must
        sign (:class:`ConsistencyVote`) before :meth:`unmask_request`."""
        self._close_masked_input()
        if not self.authenticated or set(self._survivors) == set(self._candidates):
            return None
        self._votes = {}
        self._stage = ServerStage.CONSISTENCY
        return ConsistencyRequest(self.config.session_id, self.round,
                                  survivors=self._survivors, dropped=self._dropped)

    def unmask_request(self) -> UnmaskRequest:
        """Announce survivors U3 and dropped U2 \\ U3 with the survivors' votes on that split
        (closes stage 2 first if :meth:`consistency_request` was not called)."""
        if self._stage is ServerStage.MASKED_INPUT and self.consistency_request() is not None:
            raise SecAggProtocolError("some clients asked for masked inputs did not deliver: "
                                      "collect consistency votes (consistency_request) first")
        if self._stage is not ServerStage.CONSISTENCY:
            self._expect(ServerStage.UNMASK, "request unmasking")
        cfg = self.config
        if self.authenticated and len(self._votes) < int(cfg.threshold):
            raise self._abort(STAGE_CONSISTENCY, len(self._votes), int(cfg.threshold),
                              "survivors voted for the split")
        self._stage = ServerStage.UNMASK
        return UnmaskRequest(cfg.session_id, self.round, survivors=self._survivors,
                             dropped=self._dropped, votes=dict(self._votes))

    def _close_masked_input(self) -> None:
        """Fix survivors U3 and dropped U2 \\ U3 (abort if any threshold fails)."""
        self._expect(ServerStage.MASKED_INPUT, "close the masked-input stage")
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
        self._votes = {c: v for c, v in self._votes.items() if c in u3}
        self._stage = ServerStage.UNMASK

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
