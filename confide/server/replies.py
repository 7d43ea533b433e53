"""Sorting one round's replies into trained, refused and failed, and the replies not counted.

Pure: no Flower I/O, no ledger, no logging, no partner records (tests/server/test_replies.py
builds Messages and checks the sort alone). Federation.record_replies then verifies what
needs a key or the ledger (signed refusals, DP receipts) and records and logs the result.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Message

from confide import wire as W

TRAINED = "trained"  # status OK: an update (and, with example DP, a receipt) to check
REFUSED = "refused"  # the partner's budget guard refused the round
FAILED = "failed"  # an error reply, or a status naming an error
NO_STATUS = "no-status"  # a reply without the status record: nothing can be read from it


@dataclass(frozen=True)
class SortedReply:
    node: int
    kind: str  # TRAINED | REFUSED | FAILED | NO_STATUS
    reply: Message
    # the partner the reply's status names (None for an error reply or one without status)
    partner: str | None = None
    public_key: str = ""
    reason: str = ""  # FAILED: the error, or "CODE: detail" of the status

    @property
    def dropped(self) -> bool:
        """The node did not take part: an error reply or an unreadable one. A partner that
        answered with an error status did take part (it is in the round's replies)."""
        return self.partner is None


@dataclass(frozen=True)
class IgnoredReply:
    """A reply that is not counted at all: it would count one partner's update twice, or it
    comes from a node this round did not ask."""

    node: int
    reason: str


@dataclass(frozen=True)
class SortedReplies:
    replies: tuple[SortedReply, ...]  # in arrival order
    ignored: tuple[IgnoredReply, ...]

    def of_kind(self, kind: str) -> list[SortedReply]:
        return [r for r in self.replies if r.kind == kind]


def sort_replies(replies: Iterable[Message], expected: set[int] | None = None
                 ) -> SortedReplies:
    """Sort `replies` of one round. `expected`: the nodes sent this round's message (None:
    any node). A node's second reply, a partner's second reply (from another node) and a
    reply from a node not in `expected` are ignored: first come, first counted."""
    kept: list[SortedReply] = []
    ignored: list[IgnoredReply] = []
    nodes: set[int] = set()
    partners: set[str] = set()
    for reply in replies:
        node = reply.metadata.src_node_id
        if expected is not None and node not in expected:
            ignored.append(IgnoredReply(node, f"reply from node {node}, which was not sampled"))
            continue
        if node in nodes:
            ignored.append(IgnoredReply(node, f"second reply from node {node}"))
            continue
        nodes.add(node)
        if reply.has_error():
            kept.append(SortedReply(node, FAILED, reply, reason=str(reply.error.reason)))
            continue
        status = reply.content.config_records.get(W.STATUS)
        if status is None:
            kept.append(SortedReply(node, NO_STATUS, reply, reason="replied without status"))
            continue
        partner = str(status[W.PARTNER])
        if partner in partners:
            ignored.append(IgnoredReply(
                node, f"second reply from partner {partner} (node {node})"))
            continue
        partners.add(partner)
        code = str(status[W.STATUS_CODE])
        public_key = str(status[W.PUBLIC_KEY])
        if code == W.BUDGET_EXHAUSTED:
            kept.append(SortedReply(node, REFUSED, reply, partner, public_key,
                                    reason=str(status[W.STATUS_DETAIL])))
        elif code != W.OK:
            kept.append(SortedReply(node, FAILED, reply, partner, public_key,
                                    reason=f"{code}: {status[W.STATUS_DETAIL]!s}"))
        else:
            kept.append(SortedReply(node, TRAINED, reply, partner, public_key))
    return SortedReplies(tuple(kept), tuple(ignored))


def uploaded_bytes(reply: Message) -> int:
    """Bytes of the update arrays a reply carries (plain aggregation)."""
    if W.ARRAYS not in reply.content.array_records:
        return 0
    return sum(a.numpy().nbytes for a in reply.content[W.ARRAYS].values())
