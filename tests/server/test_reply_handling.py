"""The server's handling of bad, duplicated and foreign replies (no runtime needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from confide import wire as W
from confide.config import build_config
from confide.privacy.receipts import pseudonym_of, public_key_hex, sign_receipt
from confide.server.federation import Federation
from confide.server.partners import RoundReplies


@pytest.fixture
def federation(tmp_path: Path) -> Federation:
    cfg = build_config({"model": "tiny", "clients": 3, "out": str(tmp_path / "run"),
                        "max-length": 16})
    # run folder, ledger with run_started
    fed = Federation.create(grid=None, cfg=cfg, out_dir=tmp_path / "run")  # type: ignore[arg-type]
    return fed


def reply(fed: Federation, node: int, key: Ed25519PrivateKey, server_round: int = 1, *,
          epsilon: float = 1.0, tamper: bool = False) -> Message:
    sent = Message(RecordDict({}), dst_node_id=node, message_type="train")
    partner = pseudonym_of(key)
    claim = {"round": server_round, "partner": partner, "noise_multiplier": 1.0,
             "sample_rate": 0.1, "steps": 10, "delta": 1e-5, "epsilon": epsilon,
             "accountant": "rdp"}
    receipt = sign_receipt(claim, key).to_dict()
    if tamper:
        receipt["payload"]["steps"] = 1  # under-report the spend after signing
    delta = {k: np.zeros_like(v) for k, v in fed.global_state.items()}
    return Message(RecordDict({
        W.ARRAYS: W.to_array_record(delta),
        W.METRICS: MetricRecord({W.NUM_EXAMPLES: 10}),
        W.STATUS: ConfigRecord({W.STATUS_CODE: W.OK, W.STATUS_DETAIL: "", W.PARTNER: partner,
                                W.PUBLIC_KEY: public_key_hex(key)}),
        W.RECEIPT: ConfigRecord({W.RECEIPT_JSON: json.dumps(receipt)}),
    }), reply_to=sent)


def record(fed: Federation, replies: list[Message], expected: set[int]) -> RoundReplies:
    assert fed.ledger is not None
    return fed.book.record_replies(fed, 1, replies, expected)


def test_valid_replies_are_kept_and_their_receipts_recorded(federation: Federation) -> None:
    keys = [Ed25519PrivateKey.generate() for _ in range(2)]
    recorded = record(federation, [reply(federation, i + 1, k) for i, k in enumerate(keys)],
                      {1, 2})
    assert len(recorded.trained) == 2 and recorded.uploaded > 0
    types = [e["type"] for e in federation.ledger.entries]
    assert types.count("example_dp") == 2


def test_duplicate_and_foreign_replies_are_dropped(federation: Federation) -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    replies = [reply(federation, 1, a), reply(federation, 1, a),  # same node twice
               reply(federation, 2, a),  # same partner key from another node
               reply(federation, 9, b)]  # a node that was not sampled
    recorded = record(federation, replies, {1, 2})
    assert [m.metadata.src_node_id for m in recorded.trained] == [1]
    assert recorded.partner_of == {1: pseudonym_of(a)}


def test_tampered_or_misattributed_receipts_drop_the_update(federation: Federation) -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    wrong_round = reply(federation, 2, b, server_round=2)
    recorded = record(federation, [reply(federation, 1, a, tamper=True), wrong_round], {1, 2})
    assert recorded.trained == []
    assert not [e for e in federation.ledger.entries if e["type"] == "example_dp"]


def test_error_replies_count_as_dropouts(federation: Federation) -> None:
    from flwr.app import Error

    sent = Message(RecordDict({}), dst_node_id=3, message_type="train")
    failed = Message(Error(code=0, reason="node crashed"), reply_to=sent)
    recorded = record(federation, [failed], {3})
    assert recorded.trained == [] and recorded.dropped == ["node-3"]
    assert recorded.failures == ["node crashed"]


def with_earlier(message: Message, *earlier: Message) -> Message:
    """`message` carrying the receipts of `earlier` replies as unacknowledged ones."""
    texts = [str(m.content[W.RECEIPT][W.RECEIPT_JSON]) for m in earlier]
    message.content[W.RECEIPT][W.RECEIPT_EARLIER] = json.dumps(texts)
    return message


def test_a_lost_reply_of_an_earlier_round_is_recorded_with_the_next_one(
        federation: Federation) -> None:
    key = Ed25519PrivateKey.generate()
    assert federation.ledger is not None
    lost = reply(federation, 1, key, server_round=1, epsilon=1.0)  # never reached the server
    second = with_earlier(reply(federation, 1, key, server_round=2, epsilon=1.5), lost)
    recorded = federation.book.record_replies(federation, 2, [second], {1})
    assert len(recorded.trained) == 1
    events = [e["payload"] for e in federation.ledger.entries if e["type"] == "example_dp"]
    assert [(e["round"], e.get("recorded_in_round")) for e in events] == [(1, 2), (2, None)]
    # sent again (not yet acknowledged): the ledger's copy is skipped, nothing is repeated
    third = with_earlier(reply(federation, 1, key, server_round=3, epsilon=2.0), lost, second)
    federation.book.record_replies(federation, 3, [third], {1})
    events = [e["payload"] for e in federation.ledger.entries if e["type"] == "example_dp"]
    assert [e["round"] for e in events] == [1, 2, 3]
    # a receipt for a round the run does not have is not recorded
    beyond = reply(federation, 1, key, server_round=federation.cfg.rounds + 1, epsilon=3.0)
    fourth = with_earlier(reply(federation, 1, key, server_round=4, epsilon=2.5), beyond)
    federation.book.record_replies(federation, 4, [fourth], {1})
    events = [e["payload"] for e in federation.ledger.entries if e["type"] == "example_dp"]
    assert [e["round"] for e in events] == [1, 2, 3, 4]


def test_train_messages_acknowledge_what_the_ledger_holds_per_node(
        federation: Federation) -> None:
    key = Ed25519PrivateKey.generate()
    assert federation.ledger is not None
    first = reply(federation, 1, key)
    federation.book.record_replies(federation, 1, [first], {1})
    shared = RecordDict({W.CONFIG: ConfigRecord({W.ROUND: 2})})  # as a strategy sends
    known, unknown = (Message(shared, dst_node_id=n, message_type="train") for n in (1, 2))
    for message in (known, unknown):
        federation.book.prepare_train(message, 2)
    signature = json.loads(str(first.content[W.RECEIPT][W.RECEIPT_JSON]))["signature"]
    assert json.loads(str(known.content[W.RECORDED][W.ACKNOWLEDGED])) == [
        W.receipt_ack_name(signature)]
    # a node whose partner the server does not know gets none; the shared content is intact
    assert W.RECORDED not in unknown.content.config_records
    assert W.RECORDED not in shared.config_records
    # both were sent and neither reply recorded: both may hold a lost receipt
    assert federation.book.unanswered_nodes() == {1, 2}
