"""The pure sort of one round's replies (confide.server.replies): no runtime, no ledger."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Error, Message, RecordDict

from confide import wire as W
from confide.server.replies import (
    FAILED,
    NO_STATUS,
    REFUSED,
    TRAINED,
    sort_replies,
    uploaded_bytes,
)


def reply(node: int, partner: str | None = None, code: str = W.OK, *,
          error: str | None = None, arrays: bool = False) -> Message:
    sent = Message(RecordDict({}), dst_node_id=node, message_type="train")
    if error is not None:
        return Message(Error(code=0, reason=error), reply_to=sent)
    content = RecordDict({})
    if partner is not None:
        content[W.STATUS] = ConfigRecord({W.STATUS_CODE: code, W.STATUS_DETAIL: "why",
                                          W.PARTNER: partner, W.PUBLIC_KEY: "key-" + partner})
    if arrays:
        content[W.ARRAYS] = W.to_array_record({"w": np.zeros(4, np.float32)})
    return Message(content, reply_to=sent)


def test_each_kind_is_sorted_with_its_partner_and_reason() -> None:
    out = sort_replies([reply(1, "p-a"), reply(2, "p-b", W.BUDGET_EXHAUSTED),
                        reply(3, "p-c", "DATA_ERROR"), reply(4, error="node crashed"),
                        reply(5)], expected={1, 2, 3, 4, 5})
    kinds = {r.node: (r.kind, r.partner, r.reason) for r in out.replies}
    assert kinds == {1: (TRAINED, "p-a", ""), 2: (REFUSED, "p-b", "why"),
                     3: (FAILED, "p-c", "DATA_ERROR: why"), 4: (FAILED, None, "node crashed"),
                     5: (NO_STATUS, None, "replied without status")}
    # only nodes that named no partner took no part; an error status is a reply
    assert [r.node for r in out.replies if r.dropped] == [4, 5]
    assert out.of_kind(TRAINED)[0].public_key == "key-p-a"
    assert out.ignored == ()


def test_second_replies_and_unsampled_nodes_are_ignored_first_come_first_counted() -> None:
    out = sort_replies([reply(1, "p-a"), reply(1, "p-a"),  # same node twice
                        reply(2, "p-a"),  # same partner from another node
                        reply(9, "p-z"),  # not sampled
                        reply(3, error="boom"), reply(3, "p-c")],  # a node's error, then more
                       expected={1, 2, 3})
    assert [(r.node, r.kind) for r in out.replies] == [(1, TRAINED), (3, FAILED)]
    reasons = [i.reason for i in out.ignored]
    assert reasons == ["second reply from node 1", "second reply from partner p-a (node 2)",
                       "reply from node 9, which was not sampled", "second reply from node 3"]


def test_without_expected_any_node_counts_and_order_is_kept() -> None:
    out = sort_replies([reply(7, "p-b"), reply(5, "p-a")])
    assert [r.node for r in out.replies] == [7, 5]


def test_uploaded_bytes_counts_the_update_arrays_only() -> None:
    assert uploaded_bytes(reply(1, "p-a", arrays=True)) == 16
    assert uploaded_bytes(reply(1, "p-a")) == 0
