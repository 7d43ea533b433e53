"""The node's side of secure aggregation: a thin Flower adapter around the SecAgg+ core.

The server folds the protocol into the training exchange (see `confide.server.secure_round`):
one Flower message to a node may carry parts of up to three secure-aggregation rounds
(advertise keys for r+2, share keys for r+1, masked input or unmask for r). This module
handles each part present, in protocol order, and answers all of them in one reply.

The node's `SecAggClient` objects (secret keys, Shamir shares it holds) live in the node's
`Context.state` as bytes between messages: in simulation, Ray may run a node's messages in
different worker processes, and Context.state is what Flower carries from one to the next.
They never leave the node.

Wire names and encodings (shared with the server): `confide.wire`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from logging import WARNING

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.logger import log

from confide.clients.faults import drops_out
from confide.clients.identity import IdentityError, node_identity
from confide.config import RunConfig
from confide.modes import ClientLevel
from confide.privacy.secagg import (
    KeyDirectory,
    MaskedInputRequest,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggRefusal,
    SecAggValidationError,
    UnmaskRequest,
)
from confide.privacy.secagg.identity import Roster, sign_refusal
from confide.privacy.secagg.messages import ConsistencyRequest
from confide.wire import (
    ADVERTISE,
    ARRAYS,
    CONSISTENCY_REQUEST,
    CONSISTENCY_VOTE,
    KEY_DIRECTORY,
    MASKED,
    MASKED_REQUEST,
    MASKED_ROUND,
    MASKED_SENDER,
    MASKED_VOTE,
    NUM_EXAMPLES,
    REFUSAL,
    SECAGG,
    SECAGG_ROUND,
    SECAGG_UP,
    SHARE_KEYS,
    UNMASK_REQUEST,
    UNMASK_SHARES,
    VERIFY,
    VERIFY_FLAG,
    VERIFY_ONLY,
    config_from_json,
    config_to_json,
    flatten,
    reported_num_examples,
    reported_rows,
)

DROPOUT_ERROR_CODE = 701  # Error code of an injected dropout (simulation only)

STATE_RECORD = "confide-secagg"


def check_session_config(config: SecAggConfig, cfg: RunConfig) -> None:
    """A node checks the server's session parameters against the run configuration it was
    sent: it will not add less noise or clip less than the run promises."""
    if cfg.privacy_mode.client is not ClientLevel.DISTRIBUTED:
        return
    want = cfg.client_dp_noise_multiplier * cfg.client_dp_clipping_norm
    if config.noise_stddev is None or config.noise_stddev < want * (1 - 1e-9):
        raise SecAggRefusal(f"session noise stddev {config.noise_stddev} is below the run's "
                            f"{want} (client-dp-noise-multiplier x client-dp-clipping-norm)")
    if config.l2_clip is None or config.l2_clip > cfg.client_dp_clipping_norm * (1 + 1e-9):
        raise SecAggRefusal(f"session L2 clip {config.l2_clip} exceeds the run's "
                            f"client-dp-clipping-norm {cfg.client_dp_clipping_norm}")


def update_weight(cfg: RunConfig, plain: Message | None) -> float:
    """The weight this node's update enters the secure sum with: its training rows where
    the sum is weighted (the plaintext mean's weights; the encoder caps them at the
    session's max_weight), else 1 (distributed DP: each update counts once, DP-FedAvg's
    bounded contribution)."""
    if not cfg.secure_sum_weighted or plain is None or plain.has_error():
        return 1.0
    rows = reported_rows(plain)
    if rows is None:
        raise SecAggValidationError(
            f"the training reply reports no positive {NUM_EXAMPLES} "
            f"({reported_num_examples(plain)!r}) to weight the update by")
    return rows


# -- the node's clients, persisted in Context.state -----------------------------------------
class ClientStore:
    """SecAggClient objects of this node keyed by secure round, kept in Context.state, with
    the node's identity and roster (not saved with them: they are the node's own)."""

    def __init__(self, context: Context,
                 identity: tuple[Ed25519PrivateKey, Roster] | None = None) -> None:
        self.context = context
        self.identity = identity
        records = context.state.config_records
        self.record = records[STATE_RECORD] if STATE_RECORD in records else ConfigRecord()

    def put(self, q: int, config: SecAggConfig, client: SecAggClient) -> None:
        self.record[f"{q}/config"] = config_to_json(config)
        self.record[f"{q}/client"] = client.to_state()

    def config(self, q: int) -> SecAggConfig:
        """The session parameters of secure round q this node agreed to."""
        if f"{q}/config" not in self.record:
            raise SecAggRefusal(f"this node holds no secure-aggregation state for round {q} "
                                "(it did not advertise keys, or dropped)")
        return config_from_json(str(self.record[f"{q}/config"]))

    def get(self, q: int) -> SecAggClient:
        config = self.config(q)
        if self.identity is None:
            raise SecAggRefusal("this node has no usable identity or federation roster")
        return SecAggClient.from_state(config, bytes(self.record[f"{q}/client"]),
                                       identity=self.identity[0], roster=self.identity[1])

    def drop(self, q: int) -> None:
        for key in (f"{q}/config", f"{q}/client"):
            if key in self.record:
                del self.record[key]

    def prune(self, before: int) -> None:
        """Forget rounds that are over (their secrets must not outlive them)."""
        for key in list(self.record.keys()):
            if int(key.split("/")[0]) < before:
                del self.record[key]

    def save(self) -> None:
        self.context.state.config_records[STATE_RECORD] = self.record


def _session_id(store: ClientStore, down: ConfigRecord, q: int) -> bytes | None:
    """The session id of secure round q as this node knows it (its state, or the message)."""
    try:
        return store.config(q).session_id
    except SecAggRefusal:
        text = down.get(f"config/{q}")
        return None if text is None else config_from_json(str(text)).session_id


def _rounds(down: ConfigRecord, prefix: str) -> list[int]:
    return sorted(int(k.split("/")[1]) for k in down if k.startswith(prefix + "/"))


def _partition(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))


def injected_dropout(msg: Message, context: Context, cfg: RunConfig) -> Message | None:
    """Fault injection (simulation only): an error reply, which the server treats as a
    dropout, when this node is drawn to drop at the masked-input or unmask stage of a round
    this message carries. Decided before any local work, as a crashed node would do none."""
    if cfg.dropout_rate <= 0 or SECAGG not in msg.content.config_records \
            or "num-partitions" not in context.node_config:
        return None
    down = msg.content.config_records[SECAGG]
    prefix = {"masked-input": MASKED_REQUEST, "unmask": UNMASK_REQUEST}.get(cfg.dropout_stage)
    if prefix is None:
        return None
    for q in _rounds(down, prefix):
        if drops_out(cfg.seed, q, _partition(context), cfg.dropout_rate):
            reason = f"injected dropout at {cfg.dropout_stage} of round {q}"
            log(WARNING, "partition %d: %s", _partition(context), reason)
            return Message(Error(DROPOUT_ERROR_CODE, reason), reply_to=msg)
    return None


def secure_reply(msg: Message, context: Context, cfg: RunConfig, plain: Message | None,
                 delta: Mapping[str, np.ndarray] | None, *, encoded: np.ndarray | None = None,
                 extra_up: Mapping[str, object] | None = None) -> Message:
    """Answer every secure-aggregation part of `msg`. `plain` is the local training reply
    (status, metrics, DP receipt; None for key/unmask-only messages) whose plaintext delta
    is replaced by the masked vector; `delta` is that delta (None when the node did not
    train, e.g. it refused for budget: it still does the key stages of later rounds).
    `encoded`: shared-noise mode, the ring vector (clipped per-example gradient sum plus
    this node's noise share) that replaces the delta. `extra_up`: further answers (the
    shared-noise info exchange)."""
    down = msg.content.config_records[SECAGG]
    up: dict[str, object] = dict(extra_up or {})
    identity: tuple[Ed25519PrivateKey, Roster] | None = None
    try:
        identity = node_identity(context, cfg)
    except (IdentityError, SecAggError) as exc:
        # every part of the message then fails alike (ClientStore.get refuses): this node
        # takes part in no secure round without its identity and roster
        log(WARNING, "partition %d: secure aggregation refused: %s", _partition(context), exc)
        up["error/identity"] = str(exc)
    store = ClientStore(context, identity)
    store.prune(int(down[SECAGG_ROUND]))
    content = RecordDict()
    if plain is not None and not plain.has_error():
        for name, record in plain.content.items():
            if name != ARRAYS:  # the plaintext delta never leaves the node
                content[name] = record
    simulation = "num-partitions" in context.node_config
    share_drop = simulation and cfg.dropout_rate > 0 and cfg.dropout_stage == "share-keys"

    def attempt(q: int, stage: str, fn) -> None:
        try:
            fn()
        except SecAggError as exc:
            # a refused or invalid part is reported, the rest of the message still counts
            log(WARNING, "partition %d: secure aggregation round %d, %s: %s",
                _partition(context), q, stage, exc)
            up[f"error/{q}/{stage}"] = str(exc)
            if isinstance(exc, SecAggRefusal) and identity is not None:
                session = _session_id(store, down, q)
                if session is not None:  # signed: the operator can show who refused what
                    up[f"{REFUSAL}/{q}/{stage}"] = json.dumps(sign_refusal(
                        identity[0], session, q, stage, str(exc)))
            store.drop(q)

    advertise = json.loads(str(down.get(ADVERTISE, "[]")))
    for q in advertise:
        def adv(q: int = int(q)) -> None:
            config = config_from_json(str(down[f"config/{q}"]))
            check_session_config(config, cfg)
            if identity is None:
                raise SecAggRefusal("this node has no usable identity or federation roster")
            client = SecAggClient(config, int(down[f"id/{q}"]), q, identity=identity[0],
                                  roster=identity[1])
            up[f"{ADVERTISE}/{q}"] = client.advertise_keys().to_bytes()
            store.put(q, config, client)
        attempt(int(q), ADVERTISE, adv)

    for q in _rounds(down, KEY_DIRECTORY):
        def share(q: int = q) -> None:
            client = store.get(q)
            if share_drop and drops_out(cfg.seed, q, _partition(context), cfg.dropout_rate):
                # injected dropout after advertising: no shares, out of round q
                log(WARNING, "partition %d: injected dropout at share-keys of round %d",
                    _partition(context), q)
                store.drop(q)
                return
            directory = KeyDirectory.from_bytes(bytes(down[f"{KEY_DIRECTORY}/{q}"]))
            up[f"{SHARE_KEYS}/{q}"] = client.share_keys(directory).to_bytes()
            store.put(q, client.config, client)
        attempt(q, SHARE_KEYS, share)

    for q in _rounds(down, MASKED_REQUEST):
        def masked(q: int = q) -> None:
            client = store.get(q)
            if delta is None and encoded is None:  # did not train: a dropout for the protocol
                store.drop(q)
                return
            request = MaskedInputRequest.from_bytes(bytes(down[f"{MASKED_REQUEST}/{q}"]))
            verify = bool(down.get(VERIFY_FLAG, False)) and simulation
            out = client.masked_input(request,
                                      None if delta is None else flatten(delta),
                                      update_weight(cfg, plain), keep_encoded=verify,
                                      encoded=encoded)
            content[MASKED] = ArrayRecord({"vector": Array(out.vector)})
            up[MASKED_ROUND] = q
            up[MASKED_SENDER] = out.sender
            up[MASKED_VOTE] = out.vote
            if verify and client.last_encoded is not None:
                content[VERIFY] = ArrayRecord({"encoded": Array(client.last_encoded)})
                up[VERIFY_ONLY] = True
            store.put(q, client.config, client)
        attempt(q, "masked-input", masked)

    for q in _rounds(down, CONSISTENCY_REQUEST):
        def vote(q: int = q) -> None:
            client = store.get(q)
            request = ConsistencyRequest.from_bytes(bytes(down[f"{CONSISTENCY_REQUEST}/{q}"]))
            up[f"{CONSISTENCY_VOTE}/{q}"] = client.consistency_vote(request).to_bytes()
            store.put(q, client.config, client)
        attempt(q, "consistency", vote)

    for q in _rounds(down, UNMASK_REQUEST):
        def unmask(q: int = q) -> None:
            client = store.get(q)
            request = UnmaskRequest.from_bytes(bytes(down[f"{UNMASK_REQUEST}/{q}"]))
            up[f"{UNMASK_SHARES}/{q}"] = client.unmask(request).to_bytes()
            store.drop(q)  # one answer per round; the secrets are no longer needed
        attempt(q, "unmask", unmask)

    store.save()
    content[SECAGG_UP] = ConfigRecord(up)
    return Message(content=content, reply_to=msg)

