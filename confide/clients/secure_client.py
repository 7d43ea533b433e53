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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
BUDGET_STAGE = "budget"  # the stage of a signed refusal for budget, before advertising


class BudgetRefusal(SecAggRefusal):
    """This node's budget cannot afford a round it is asked to set up
    (`confide.clients.budget`): signed with the stage "budget", no keys advertised."""


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
                 extra_up: Mapping[str, object] | None = None,
                 budget: Callable[[int], None] | None = None) -> Message:
    """Answer every secure-aggregation part of `msg`. `plain` is the local training reply
    (status, metrics, DP receipt; None for key/unmask-only messages) whose plaintext delta
    is replaced by the masked vector; `delta` is that delta (None when the node did not
    train, e.g. it refused for budget: it still does the key stages of later rounds).
    `encoded`: shared-noise mode, the ring vector (clipped per-example gradient sum plus
    this node's noise share) that replaces the delta. `extra_up`: further answers (the
    shared-noise info exchange). `budget`: asked before advertising keys for round q
    (`confide.clients.budget.advertise_guard`): BudgetRefusal when the node cannot afford
    it."""
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
    parts = _Parts(context, cfg, down, store, identity, up, content, plain, delta, encoded,
                   budget)
    for q in json.loads(str(down.get(ADVERTISE, "[]"))):
        parts.attempt(int(q), ADVERTISE, _advertise)
    for prefix, stage, handler in _STAGES:
        for q in _rounds(down, prefix):
            parts.attempt(q, stage, handler)
    store.save()
    content[SECAGG_UP] = ConfigRecord(up)
    return Message(content=content, reply_to=msg)


@dataclass
class _Parts:
    """One message's secure-aggregation parts as they are answered: what every stage
    reads (the message, the node's clients and identity) and writes (`up`, `content`)."""

    context: Context
    cfg: RunConfig
    down: ConfigRecord
    store: ClientStore
    identity: tuple[Ed25519PrivateKey, Roster] | None
    up: dict[str, object]
    content: RecordDict
    plain: Message | None
    delta: Mapping[str, np.ndarray] | None
    encoded: np.ndarray | None
    budget: Callable[[int], None] | None

    @property
    def simulation(self) -> bool:
        return "num-partitions" in self.context.node_config

    def attempt(self, q: int, stage: str, handler: Callable[[_Parts, int], None]) -> None:
        """Run one stage of round q; a refused or invalid part is reported (signed when
        refused), the rest of the message still counts."""
        try:
            handler(self, q)
        except SecAggError as exc:
            if isinstance(exc, BudgetRefusal):
                stage = BUDGET_STAGE
            log(WARNING, "partition %d: secure aggregation round %d, %s: %s",
                _partition(self.context), q, stage, exc)
            self.up[f"error/{q}/{stage}"] = str(exc)
            if isinstance(exc, SecAggRefusal) and self.identity is not None:
                session = _session_id(self.store, self.down, q)
                if session is not None:  # signed: the operator can show who refused what
                    self.up[f"{REFUSAL}/{q}/{stage}"] = json.dumps(sign_refusal(
                        self.identity[0], session, q, stage, str(exc)))
            self.store.drop(q)


def _advertise(p: _Parts, q: int) -> None:
    config = config_from_json(str(p.down[f"config/{q}"]))
    check_session_config(config, p.cfg)
    if p.identity is None:
        raise SecAggRefusal("this node has no usable identity or federation roster")
    if p.budget is not None:
        p.budget(q)  # a node that cannot afford round q says so now, before any key
    client = SecAggClient(config, int(p.down[f"id/{q}"]), q, identity=p.identity[0],
                          roster=p.identity[1])
    p.up[f"{ADVERTISE}/{q}"] = client.advertise_keys().to_bytes()
    p.store.put(q, config, client)


def _share_keys(p: _Parts, q: int) -> None:
    client = p.store.get(q)
    cfg = p.cfg
    if p.simulation and cfg.dropout_rate > 0 and cfg.dropout_stage == "share-keys" \
            and drops_out(cfg.seed, q, _partition(p.context), cfg.dropout_rate):
        # injected dropout after advertising: no shares, out of round q
        log(WARNING, "partition %d: injected dropout at share-keys of round %d",
            _partition(p.context), q)
        p.store.drop(q)
        return
    directory = KeyDirectory.from_bytes(bytes(p.down[f"{KEY_DIRECTORY}/{q}"]))
    p.up[f"{SHARE_KEYS}/{q}"] = client.share_keys(directory).to_bytes()
    p.store.put(q, client.config, client)


def _masked_input(p: _Parts, q: int) -> None:
    client = p.store.get(q)
    if p.delta is None and p.encoded is None:  # did not train: a dropout for the protocol
        p.store.drop(q)
        return
    request = MaskedInputRequest.from_bytes(bytes(p.down[f"{MASKED_REQUEST}/{q}"]))
    verify = bool(p.down.get(VERIFY_FLAG, False)) and p.simulation
    out = client.masked_input(request, None if p.delta is None else flatten(p.delta),
                              update_weight(p.cfg, p.plain), keep_encoded=verify,
                              encoded=p.encoded)
    p.content[MASKED] = ArrayRecord({"vector": Array(out.vector)})
    p.up[MASKED_ROUND] = q
    p.up[MASKED_SENDER] = out.sender
    p.up[MASKED_VOTE] = out.vote
    if verify and client.last_encoded is not None:
        p.content[VERIFY] = ArrayRecord({"encoded": Array(client.last_encoded)})
        p.up[VERIFY_ONLY] = True
    p.store.put(q, client.config, client)


def _consistency_vote(p: _Parts, q: int) -> None:
    client = p.store.get(q)
    request = ConsistencyRequest.from_bytes(bytes(p.down[f"{CONSISTENCY_REQUEST}/{q}"]))
    p.up[f"{CONSISTENCY_VOTE}/{q}"] = client.consistency_vote(request).to_bytes()
    p.store.put(q, client.config, client)


def _unmask(p: _Parts, q: int) -> None:
    client = p.store.get(q)
    request = UnmaskRequest.from_bytes(bytes(p.down[f"{UNMASK_REQUEST}/{q}"]))
    p.up[f"{UNMASK_SHARES}/{q}"] = client.unmask(request).to_bytes()
    p.store.drop(q)  # one answer per round; the secrets are no longer needed


# the stages after advertising, in protocol order: (request prefix, stage, handler)
_STAGES: tuple[tuple[str, str, Callable[[_Parts, int], None]], ...] = (
    (KEY_DIRECTORY, SHARE_KEYS, _share_keys),
    (MASKED_REQUEST, "masked-input", _masked_input),
    (CONSISTENCY_REQUEST, "consistency", _consistency_vote),
    (UNMASK_REQUEST, "unmask", _unmask),
)
