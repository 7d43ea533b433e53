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
    return fed.book.record_replies(fed.ledger, 1, replies, expected)


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
