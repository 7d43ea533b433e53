"""The server's side of a ledger the partners can check (no runtime needed): a receipt must
be for this run and pay for the update that came with it, trained from this round's model;
a partner's countersignature of the chain head is recorded only when it names this ledger's
entry; each train message says at which entry the ledger holds each of the partner's
receipts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from confide import wire as W
from confide.config import build_config
from confide.privacy import ledger_events as E
from confide.privacy.receipts import (
    binding,
    pseudonym_of,
    public_key_hex,
    sign_head,
    sign_receipt,
    update_digest,
)
from confide.server.federation import Federation


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    cfg = build_config({"model": "tiny", "clients": 3, "out": str(tmp_path / "run"),
                        "max-length": 16})
    return Federation.create(grid=None, cfg=cfg, out_dir=tmp_path / "run")  # type: ignore[arg-type]


def delta_of(fed: Federation, value: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, value) for k, v in fed.global_state.items()}


def send(fed: Federation, node: int, server_round: int = 1) -> Message:
    """The round's train message to `node`, through the server's own preparation."""
    message = Message(RecordDict({W.CONFIG: ConfigRecord({W.ROUND: server_round}),
                                  W.ARRAYS: W.to_array_record(fed.global_state)}),
                      dst_node_id=node, message_type="train")
    fed.book.prepare_train(message, server_round)
    return message


def reply(fed: Federation, sent: Message, key: Ed25519PrivateKey, *,
          delta: dict[str, np.ndarray], **bound: Any) -> Message:
    """A node's reply carrying `delta`, its receipt bound as `bound` overrides say."""
    assert fed.ledger is not None
    partner = pseudonym_of(key)
    claim = {"round": int(sent.content[W.CONFIG][W.ROUND]), "partner": partner,
             "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, "delta": 1e-5,
             "epsilon": 1.0, "accountant": "rdp",
             **binding(run=ledger_key(fed), update_sha256=update_digest(delta),
                       model_sha256=E.weights_digest(fed.global_state)), **bound}
    return Message(RecordDict({
        W.ARRAYS: W.to_array_record(delta),
        W.METRICS: MetricRecord({W.NUM_EXAMPLES: 10}),
        W.STATUS: ConfigRecord({W.STATUS_CODE: W.OK, W.STATUS_DETAIL: "", W.PARTNER: partner,
                                W.PUBLIC_KEY: public_key_hex(key)}),
        W.RECEIPT: ConfigRecord({W.RECEIPT_JSON: json.dumps(sign_receipt(claim, key)
                                                            .to_dict())}),
    }), reply_to=sent)


def ledger_key(fed: Federation) -> str:
    assert fed.ledger is not None
    return fed.ledger.public_key_hex


def types(fed: Federation) -> list[str]:
    assert fed.ledger is not None
    return [e["type"] for e in fed.ledger.entries]


def test_a_receipt_for_the_update_and_model_it_came_with_is_kept(fed: Federation) -> None:
    key = Ed25519PrivateKey.generate()
    assert fed.ledger is not None
    recorded = fed.book.record_replies(fed, 1, [
        reply(fed, send(fed, 1), key, delta=delta_of(fed, 0.5))], {1})
    assert len(recorded.trained) == 1 and types(fed).count(E.EXAMPLE_DP) == 1


def test_a_receipt_of_another_run_is_refused(fed: Federation) -> None:
    key = Ed25519PrivateKey.generate()
    assert fed.ledger is not None
    recorded = fed.book.record_replies(fed, 1, [
        reply(fed, send(fed, 1), key, delta=delta_of(fed, 0.5), run="ee" * 32)], {1})
    assert recorded.trained == [] and E.EXAMPLE_DP not in types(fed)


@pytest.mark.parametrize("bound", [{"update_sha256": "ee" * 32}, {"update_sha256": None},
                                   {"model_sha256": "ee" * 32}],
                         ids=["another-update", "no-update", "another-model"])
def test_an_update_its_receipt_did_not_pay_for_is_dropped_but_the_spend_recorded(
        fed: Federation, bound: dict[str, Any]) -> None:
    key = Ed25519PrivateKey.generate()
    assert fed.ledger is not None
    recorded = fed.book.record_replies(fed, 1, [
        reply(fed, send(fed, 1), key, delta=delta_of(fed, 0.5), **bound)], {1})
    assert recorded.trained == []
    # the partner spent its budget: the ledger holds the receipt all the same
    assert types(fed).count(E.EXAMPLE_DP) == 1


def with_head(message: Message, countersignature: dict[str, Any]) -> Message:
    message.content[W.RECEIPT][W.RECEIPT_HEAD] = json.dumps(countersignature)
    return message


def test_a_countersignature_is_recorded_only_when_it_names_this_ledgers_entry(
        fed: Federation) -> None:
    assert fed.ledger is not None
    index, head = fed.ledger.head() or (-1, "")
    keys = [Ed25519PrivateKey.generate() for _ in range(4)]
    good = sign_head(run=ledger_key(fed), index=index, entry_hash=head, round_=1,
                     private_key=keys[0]).to_dict()
    wrong_hash = sign_head(run=ledger_key(fed), index=index, entry_hash="ee" * 32,
                           round_=1, private_key=keys[1]).to_dict()
    other_run = sign_head(run="ee" * 32, index=index, entry_hash=head, round_=1,
                          private_key=keys[2]).to_dict()
    # signed by another partner than the one replying
    foreign = sign_head(run=ledger_key(fed), index=index, entry_hash=head, round_=1,
                        private_key=keys[0]).to_dict()
    replies = [with_head(reply(fed, send(fed, i + 1), k, delta=delta_of(fed, 0.5)), c)
               for i, (k, c) in enumerate(zip(keys, (good, wrong_hash, other_run, foreign),
                                              strict=True))]
    recorded = fed.book.record_replies(fed, 1, replies, {1, 2, 3, 4})
    assert len(recorded.trained) == 4  # a bad countersignature does not cost the update
    heads = [e["payload"] for e in fed.ledger.entries if e["type"] == E.HEAD_COUNTERSIGNED]
    assert [(h["partner"], h["index"], h["hash"]) for h in heads] == [
        (pseudonym_of(keys[0]), index, head)]


def test_train_messages_say_at_which_entry_each_receipt_is(fed: Federation) -> None:
    key = Ed25519PrivateKey.generate()
    assert fed.ledger is not None
    first = reply(fed, send(fed, 1), key, delta=delta_of(fed, 0.5))
    fed.book.record_replies(fed, 1, [first], {1})
    at = next(e["index"] for e in fed.ledger.entries if e["type"] == E.EXAMPLE_DP)
    second = send(fed, 1, 2)
    signature = json.loads(str(first.content[W.RECEIPT][W.RECEIPT_JSON]))["signature"]
    assert W.acknowledged_at(second) == {W.receipt_ack_name(signature): at}
    # nodes of earlier versions read the bare list
    assert W.acknowledged_receipts(second) == {W.receipt_ack_name(signature)}
