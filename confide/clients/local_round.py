"""The partner node's training round: everything a `train` message needs (data, model,
budget, DP training, receipts). Imported by the ClientApp (client_app.py) only when a
`train` message arrives: torch, transformers and Opacus take seconds to import, and a
deployed node starts a fresh process per message, most of which (secure-aggregation key
setup, shares, unmasking) need none of them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from confide import wire as W
from confide.clients import secure_client
from confide.clients.budget import advertise_guard
from confide.clients.disclosure import reply_metrics
from confide.clients.node_state import NodeState, load_node_state, save_node_state
from confide.clients.partner_data import partner_data
from confide.clients.policy import (
    NodeConfigError,
    PartnerPolicy,
    node_max_epsilon,
    node_policy,
)
from confide.clients.state_location import node_state_dir
from confide.clients.update_producers import (
    PRODUCERS,
    NodeRound,
    Update,
    UpdateProducer,
)
from confide.config import RunConfig, from_flat_record
from confide.model import (
    ModelSpec,
    frozen_digest,
    load_trainable_state,
    resolve_device,
)
from confide.privacy.accountant import BudgetExhausted, Spend
from confide.privacy.ledger_events import weights_digest
from confide.privacy.mechanisms import ExampleLevelMechanism
from confide.privacy.receipts import binding, dp_receipt_payload, sign_receipt, update_digest
from confide.privacy.refusals import sign_refusal
from confide.tasks import build_model
from confide.tasks.inputs import model_spec

__all__ = ["NodeConfigError", "handle_train", "node_round", "partner_data"]


def handle_train(msg: Message, context: Context) -> Message:
    """One `train` message: budget check, the mode's update (local DP training or the
    shared-noise gradient sum), signed receipt, and the reply (through secure aggregation
    when the run uses it)."""
    config_record = msg.content[W.CONFIG]
    cfg = from_flat_record(dict(config_record))
    server_round = int(config_record[W.ROUND])
    # the partner's own floors, before anything is loaded or spent (a delta the server
    # chose must not become the node's pinned delta)
    policy = node_policy(context, cfg)
    policy.check_run(cfg, len(partner_data(cfg, context)))
    max_epsilon = node_max_epsilon(cfg, context)
    state_dir = node_state_dir(context, cfg.out)
    state = load_node_state(context, delta=cfg.delta, max_epsilon=max_epsilon,
                            state_dir=state_dir)
    # Flower's message id is the content hash (incl. creation time): a replayed message has
    # the same id, a re-sent round (e.g. after a server resume) a new one.
    message_id = msg.metadata.message_id or msg.object_id
    if state.seen(message_id):
        return _status_reply(msg, state, W.STALE, f"message {message_id} was already handled")
    secure = cfg.privacy_mode.secure and W.SECAGG in msg.content.config_records
    if secure and (dropped := secure_client.injected_dropout(msg, context, cfg)) is not None:
        return dropped
    run_key = str(config_record.get(W.RUN_KEY, ""))
    r = NodeRound(msg, cfg, server_round, run_key, partner_data(cfg, context), state,
                  context, policy)
    reply, update = node_round(r, PRODUCERS[cfg.privacy_mode.example](r))
    state.mark_handled(message_id)
    if secure:
        # The update goes into the secure sum (a delta clipped, quantized, noised, masked;
        # or the shared-noise ring vector) instead of travelling in plaintext; status,
        # metrics and DP receipt travel as before.
        reply = secure_client.secure_reply(
            msg, context, cfg, reply, None if update is None else update.delta,
            encoded=None if update is None else update.encoded,
            budget=advertise_guard(msg, context, cfg, state))
    return _sealed(msg, reply, state, run_key, server_round, context, state_dir, policy)


def _sealed(msg: Message, reply: Message, state: NodeState, run_key: str, server_round: int,
            context: Context, state_dir: Path | None, policy: PartnerPolicy) -> Message:
    """The reply as it will travel, sealed: the round's receipt signed now, binding the run,
    the update as sent (the masked vector under secure aggregation, else the plain delta;
    none when masking was refused) and the model the node trained from; the ledger head
    the message names countersigned; the receipts no countersigned head covers yet
    attached. The node's state (spend, receipts, heads) is saved before the reply leaves."""
    record = reply.content.config_records.get(W.RECEIPT)
    if record is not None:
        unsigned = str(record.pop(_UNSIGNED, ""))
        bound = _is_run_key(run_key)
        head = W.ledger_head(msg.content[W.CONFIG]) if bound else None
        if head is not None:
            record[W.RECEIPT_HEAD] = state.countersign(run_key, *head, server_round).to_json()
        _attach_unrecorded(msg, state, run_key, record, None if head is None else head[0])
        if unsigned:
            payload = json.loads(unsigned)
            payload["policy"] = policy.to_json()  # the floors this spend was made under
            if bound:
                payload.update(binding(
                    run=run_key, update_sha256=_sent_update_digest(reply),
                    model_sha256=weights_digest(W.from_array_record(msg.content[W.ARRAYS]))))
            receipt_json = json.dumps(sign_receipt(payload, state.signing_key).to_dict())
            record[W.RECEIPT_JSON] = receipt_json
            state.remember_receipt(run_key, receipt_json)
    save_node_state(context, state, state_dir)
    return reply


def _is_run_key(run_key: str) -> bool:
    # servers of every version send their ledger key (64 hex digits); an empty one is a
    # message outside a run: its receipt cannot name one
    return len(run_key) == 64 and all(c in "0123456789abcdef" for c in run_key)


def _sent_update_digest(reply: Message) -> str | None:
    """SHA-256 of the update the reply carries: the masked vector, else the plain delta."""
    if W.MASKED in reply.content.array_records:
        return update_digest({"vector": reply.content[W.MASKED]["vector"].numpy()})
    if W.ARRAYS in reply.content.array_records:
        return update_digest(W.from_array_record(reply.content[W.ARRAYS]))
    return None


def node_round(r: NodeRound, producer: UpdateProducer) -> tuple[Message, Update | None]:
    """One training round, the same for every mode; `producer` makes the update. The
    planned spend is checked (the partner's policy, its run budget, its lifetime budget: a
    signed refusal) before anything is loaded; the spend is recorded once the update
    exists, and the reply carries its mechanism and the receipt of it (unsigned: `_sealed`
    signs the reply as it will travel). The update is None when the node refused."""
    cfg, state = r.cfg, r.state
    planned_mechanism = producer.plan()
    example_dp = cfg.privacy_mode.example_dp
    planned = Spend(planned_mechanism.sampled_gaussian, r.server_round, r.run_key)
    if example_dp:
        r.policy.check_run_budget(state.accountant, planned)
        try:
            state.accountant.check(planned)
        except BudgetExhausted as exc:
            return _refusal_reply(r.msg, cfg, state, r.server_round, r.run_key, exc,
                                  planned), None

    model, global_state = _round_model(r)
    device = resolve_device(str(r.context.node_config.get("device", cfg.device)))
    update = producer.produce(model, global_state, device)
    epsilon = 0.0
    receipt_json = ""
    if example_dp:
        spent = Spend(update.mechanism.sampled_gaussian, r.server_round, r.run_key)
        epsilon = state.accountant.record(spent)
        receipt_json = _receipt_payload(cfg, state, r.server_round, update.mechanism, epsilon)
    log(INFO, "partner %s round %d: %d examples, %s, epsilon %.3f", state.pseudonym,
        r.server_round, len(r.data), update.summary, epsilon)
    content = RecordDict()
    if update.delta is not None:
        content[W.ARRAYS] = W.to_array_record(update.delta)
    # under DP no loss and no time (confide.clients.disclosure)
    content[W.METRICS] = MetricRecord(reply_metrics(
        cfg, rows=r.rows, epsilon=epsilon, mechanism=update.mechanism,
        train_loss=update.train_loss, train_seconds=update.train_seconds))
    content[W.STATUS] = state.status(W.OK, "")
    content[W.RECEIPT] = _receipt_record(receipt_json)
    return Message(content=content, reply_to=r.msg), update


def _round_model(r: NodeRound) -> tuple[Any, dict[str, np.ndarray]]:
    """The run's model (built once per process), checked against the server's frozen
    weights, with the round's global trainable weights loaded; and those weights."""
    spec = model_spec(r.cfg, _num_labels(r.cfg))
    model = _cached_model(spec)
    if r.msg.content[W.CONFIG].get(W.FROZEN_DIGEST) not in (None, _cached_frozen_digest(spec)):
        raise NodeConfigError("this node's frozen base model differs from the server's "
                              "(different model files or versions?)")
    global_state = {k: v.numpy() for k, v in r.msg.content[W.ARRAYS].items()}
    load_trainable_state(model, global_state)
    return model, global_state


def _receipt_payload(cfg: RunConfig, state: NodeState, server_round: int,
                     mechanism: ExampleLevelMechanism, epsilon: float) -> str:
    """What the partner's receipt of the mechanism it ran this round states, as JSON; it
    is signed when the reply is final (`_sealed`: it then binds the update sent)."""
    payload = dp_receipt_payload(mechanism, round_=server_round, partner=state.pseudonym,
                                 delta=cfg.delta, epsilon=epsilon,
                                 accountant=state.accountant.accountant)
    return json.dumps(payload)


def _receipt_record(payload_json: str) -> ConfigRecord:
    """The reply's receipt record, its receipt still unsigned (`_sealed` signs it and
    attaches this run's receipts the ledger may lack). Empty without example-level DP:
    nothing spent, nothing to sign."""
    record = ConfigRecord({W.RECEIPT_JSON: ""})
    if payload_json:
        record[_UNSIGNED] = payload_json  # never leaves the node: `_sealed` takes it out
    return record


# the receipt record's key for the round's receipt until `_sealed` signs it
_UNSIGNED = "unsigned"


def _attach_unrecorded(msg: Message, state: NodeState, run_key: str,
                       record: ConfigRecord, countersigned: int | None) -> None:
    """Put this run's receipts that no head the node countersigned covers yet (a reply lost
    when the server died or in transit: a real spend the ledger must record) into the
    reply's receipt record. `countersigned`: the head index the reply countersigns."""
    earlier = state.unrecorded_receipts(run_key, W.acknowledged_at(msg), countersigned)
    if earlier:
        record[W.RECEIPT_EARLIER] = json.dumps(earlier)


def _refusal_reply(msg: Message, cfg: RunConfig, state: NodeState, server_round: int,
                   run_key: str, exc: BudgetExhausted, planned: Spend) -> Message:
    """A budget refusal (local and shared noise alike). The spend is the node's lifetime one
    (earlier runs included): signed, with the events behind it, so the run's audit can check
    a refusal it cannot replay."""
    log(WARNING, "partner %s refuses round %d: %s", state.pseudonym, server_round, exc)
    refusal = sign_refusal(
        round_=server_round, run=run_key, delta=cfg.delta,
        accountant=state.accountant.accountant, spent_epsilon=exc.spent,
        would_be_epsilon=exc.would_be, max_epsilon=exc.max_epsilon,
        lifetime_events=state.accountant.history, planned=planned,
        private_key=state.signing_key)
    reply = _status_reply(msg, state, W.BUDGET_EXHAUSTED, str(exc), spent=exc.spent,
                          would_be=exc.would_be, max_epsilon=exc.max_epsilon)
    # lost receipts of this run reach the ledger with a refusal too (its signed spend
    # includes them): `_sealed` attaches them
    reply.content[W.RECEIPT] = ConfigRecord({W.RECEIPT_JSON: refusal.to_json()})
    return reply


def _status_reply(msg: Message, state: NodeState, code: str, detail: str, **extra: float
                  ) -> Message:
    return Message(content=RecordDict({W.STATUS: state.status(code, detail, **extra)}),
                   reply_to=msg)


def _num_labels(cfg: RunConfig) -> int:
    if cfg.num_labels < 2:
        # The server resolves num-labels from the data before the first round.
        raise NodeConfigError("num-labels missing from the round configuration")
    return cfg.num_labels


@lru_cache(maxsize=2)
def _cached_model(spec: ModelSpec):
    # Built once per process: every round loads the global trainable weights over it,
    # and frozen weights never change.
    return build_model(spec)


@lru_cache(maxsize=2)
def _cached_frozen_digest(spec: ModelSpec) -> str:
    return frozen_digest(_cached_model(spec))
