"""What the server knows of its partners, from their signed replies only.

`PartnerBook.record_replies` takes one round's replies through the pure sort
(`confide.server.replies`), checks what only a key or the ledger can check (signed budget
refusals, DP receipts, receipts of earlier lost attempts), hands those facts to the run's
record (`run_record.RunRecord`: the federation appends each to the ledger at once) and
keeps them in each partner's record, and logs what it drops. It never holds the ledger.
Plain and secure rounds both use it, so a reply is judged the same way on either path.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log

from confide import wire as W
from confide.config import RunConfig
from confide.logs import verbose_from_env
from confide.privacy import ledger_events as E
from confide.privacy.accountant import rdp_epsilon
from confide.privacy.mechanisms import (
    ExampleLevelMechanism,
    SampledGaussian,
    SharedNoiseSampledGaussian,
    example_level_from_json,
)
from confide.privacy.receipts import (
    Receipt,
    receipt_binding,
    update_digest,
    verify_head,
    verify_receipt,
)
from confide.privacy.refusals import refusal_mismatches, verify_refusal
from confide.server.recovery import EveryPartnerFailed, NoBudgetLeft, no_budget_message
from confide.server.replies import (
    FAILED,
    REFUSED,
    TRAINED,
    SortedReply,
    sort_replies,
    uploaded_bytes,
)

if TYPE_CHECKING:
    from confide.server.run_record import RunRecord


@dataclass
class PartnerRecord:
    """What the server knows of a partner: its pseudonym and claimed cumulative epsilon."""

    pseudonym: str
    public_key: str
    epsilon: float = 0.0  # cumulative, as claimed (signed) by the partner
    epsilon_rdp: float = 0.0  # the RDP second opinion on the same events (server-computed)
    accountant: str = "pld"  # which analysis the partner's claims use
    # the mechanism of each of its releases in this run, from its receipts, in order
    mechanisms: list[ExampleLevelMechanism] = field(default_factory=list)
    rounds_trained: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)

    @property
    def tv_slack(self) -> float:
        """Shared noise: the total-variation slack of its releases, summed."""
        return sum(m.tv_slack for m in self.mechanisms
                   if isinstance(m, SharedNoiseSampledGaussian))

    def add_mechanism(self, mechanism: ExampleLevelMechanism, delta: float) -> None:
        self.mechanisms.append(mechanism)
        self.epsilon_rdp = rdp_epsilon(self.mechanisms, delta)

    def to_state(self) -> dict[str, Any]:
        return {"pseudonym": self.pseudonym, "public_key": self.public_key,
                "epsilon": self.epsilon, "epsilon_rdp": self.epsilon_rdp,
                "accountant": self.accountant,
                "mechanisms": [m.to_json() for m in self.mechanisms],
                "rounds_trained": self.rounds_trained, "refused": self.refused}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PartnerRecord:
        """A record of a checkpoint; those of earlier versions list each mechanism as
        [noise multiplier, sample rate, steps] and keep the TV slack apart (the resume takes
        both from the ledger again: PartnerBook.account_unfinished_rounds)."""
        fields = {k: v for k, v in state.items() if k not in ("mechanisms", "tv_slack")}
        return cls(**fields, mechanisms=[
            SampledGaussian(float(m[0]), float(m[1]), int(m[2])) if isinstance(m, list)
            else example_level_from_json(m, "checkpoint partner mechanism")
            for m in state.get("mechanisms", [])])


@dataclass
class Refusal:
    partner: str
    spent: float
    would_be: float
    max_epsilon: float


@dataclass
class RoundReplies:
    """One round's replies as recorded: the updates to aggregate and what became of the rest."""

    trained: list[Message] = field(default_factory=list)
    # node -> partner for every counted reply that named its partner (trained, refused with
    # a valid refusal, failed with a status)
    partner_of: dict[int, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # partners (or node-N) that took no part
    refusals: list[Refusal] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # errors of sampled nodes
    uploaded: int = 0  # bytes of update arrays received


class PartnerBook:
    """Partner records of one run, and the recording of each round's replies."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.records: dict[str, PartnerRecord] = {}
        self.node_partner: dict[int, str] = {}  # Flower node id -> partner, for logs
        # signatures of the example-level receipts this run's ledger holds, and per partner
        # their acknowledgement names -> the ledger index holding each (what a train
        # message tells the node is recorded, and where)
        self.signatures: set[str] = set()
        self.acknowledged: dict[str, dict[str, int]] = {}
        # round -> digest of the global weights its train messages carried: a receipt binds
        # the model its partner trained from
        self.model_sent: dict[int, str] = {}
        # node -> the last round it was sent a train message / its reply was recorded in
        # (a receipt or a refusal): a node sent more than recorded may hold a lost receipt
        self.last_sent: dict[int, int] = {}
        self.last_recorded: dict[int, int] = {}

    # -- one round -------------------------------------------------------------------
    def record_replies(self, host: RunRecord, server_round: int, replies: Iterable[Message],
                       expected: set[int] | None = None) -> RoundReplies:
        """Keep replies that trained; log and record refusals and failures. A trained reply
        whose DP receipt does not verify is dropped (its spend could not be audited), as is
        a refusal whose signature does not hold."""
        sorted_ = sort_replies(replies, expected)
        for ignored in sorted_.ignored:
            log(WARNING, "round %d: %s; dropped", server_round, ignored.reason)
        out = RoundReplies()
        for r in sorted_.replies:
            if r.dropped:  # an error reply or one without status
                log(WARNING, "round %d: %s %s: %s", server_round, self.node_name(r.node),
                    "failed" if r.kind == FAILED else "replied without status", r.reason)
                out.dropped.append(self.record_name(r.node))
                if r.kind == FAILED:
                    out.failures.append(r.reason)
                continue
            partner = self._partner(r)
            out.partner_of[r.node] = self.node_partner[r.node] = partner.pseudonym
            self.last_recorded[r.node] = server_round
            self._record_countersignature(host, server_round, partner, r.reply)
            if r.kind == REFUSED:
                self._record_refusal(host, server_round, partner, r, out)
            elif r.kind == FAILED:
                log(WARNING, "round %d: partner %s: %s", server_round, partner.pseudonym,
                    r.reason)
                out.failures.append(r.reason)
            else:
                out.uploaded += uploaded_bytes(r.reply)
                if self.cfg.privacy_mode.example_dp and not self._record_example_dp(
                        host, server_round, partner, r.reply):
                    continue
                partner.rounds_trained.append(server_round)
                out.trained.append(r.reply)
        return out

    def record_name(self, node: int) -> str:
        """One name per partner, in the run's records and logs alike: its pseudonym once
        the node has answered with it in this run (a node that fails later keeps it), else
        `node-N` (Flower's node id: a node that never said who it is)."""
        return self.node_partner.get(node) or f"node-{node}"

    def node_name(self, node: int) -> str:
        """The partner as logs name it: `record_name`, with Flower's node id added when
        the processes run verbose (`--verbose`)."""
        name = self.record_name(node)
        if verbose_from_env() and name != f"node-{node}":
            return f"{name} (Flower node {node})"
        return name

    def _partner(self, r: SortedReply) -> PartnerRecord:
        assert r.partner is not None
        if r.partner not in self.records:
            self.records[r.partner] = PartnerRecord(r.partner, r.public_key)
        return self.records[r.partner]

    # -- refusals --------------------------------------------------------------------
    def _record_refusal(self, host: RunRecord, server_round: int, partner: PartnerRecord,
                        r: SortedReply, out: RoundReplies) -> None:
        status = r.reply.content.config_records[W.STATUS]
        refusal = self._refusal(host, server_round, partner, r.reply)
        if refusal is None:
            del out.partner_of[r.node]
            out.dropped.append(partner.pseudonym)
            return
        self._record_earlier_receipts(host, server_round, partner, r.reply)
        partner.refused.append(server_round)
        out.refusals.append(Refusal(partner.pseudonym, float(status["spent"]),
                                    float(status["would_be"]), float(status["max_epsilon"])))
        log(WARNING, "round %d: partner %s refused: %s", server_round, partner.pseudonym,
            r.reason)
        host.record(refusal)

    def _refusal(self, host: RunRecord, server_round: int, partner: PartnerRecord,
                 reply: Message) -> E.BudgetRefusal | None:
        """The budget_refusal entry: the partner's signed numbers (its lifetime spend) with
        the signed refusal attached; None (not recorded) when the signature does not hold.
        Nodes of earlier versions send no signed refusal: recorded as before."""
        status = reply.content.config_records[W.STATUS]
        numbers = {"spent_epsilon": float(status["spent"]),
                   "would_be_epsilon": float(status["would_be"]),
                   "max_epsilon": float(status["max_epsilon"])}
        if W.RECEIPT not in reply.content.config_records:
            return E.BudgetRefusal(round=server_round, partner=partner.pseudonym, **numbers)
        try:
            signed = verify_refusal(Receipt.from_json(
                str(reply.content[W.RECEIPT][W.RECEIPT_JSON])))
            if signed.public_key_hex != partner.public_key:
                raise ValueError("refusal signed by another key than the partner's")
            event = E.BudgetRefusal(round=server_round, partner=partner.pseudonym,
                                    **numbers, receipt=signed.to_dict())
            bad = refusal_mismatches(signed, event.to_payload())
            if bad or signed.payload.get("run") != host.run_key:
                raise ValueError("; ".join(bad) or "refusal is for another run")
        except (KeyError, ValueError) as exc:
            log(WARNING, "round %d: partner %s: invalid signed refusal (%s); counted as "
                "dropped", server_round, partner.pseudonym, exc)
            return None
        return event

    # -- example-level DP receipts ---------------------------------------------------
    def _record_example_dp(self, host: RunRecord, server_round: int, partner: PartnerRecord,
                           reply: Message) -> bool:
        """Store the partner-signed DP event; an update without a valid receipt is dropped
        (its privacy spend could not be audited)."""
        try:
            receipt = self._checked_receipt(str(reply.content[W.RECEIPT][W.RECEIPT_JSON]),
                                            server_round, partner, run=host.run_key)
        except (KeyError, ValueError, json.JSONDecodeError) as exc:
            log(WARNING, "round %d: partner %s: invalid DP receipt (%s); update dropped",
                server_round, partner.pseudonym, exc)
            return False
        self._record_earlier_receipts(host, server_round, partner, reply)
        if receipt.signature_hex in self.signatures:
            log(WARNING, "round %d: partner %s sent a receipt the ledger already holds; "
                "update dropped", server_round, partner.pseudonym)
            return False
        self._append_receipt(host, partner, receipt)
        unpaid = self._unpaid_update(server_round, receipt, reply)
        if unpaid:
            # the partner spent its budget all the same: the receipt stays in the ledger
            log(WARNING, "round %d: partner %s: %s; its spend is recorded, its update "
                "dropped", server_round, partner.pseudonym, unpaid)
            return False
        return True

    def _unpaid_update(self, server_round: int, receipt: Receipt, reply: Message) -> str:
        """Why the reply's update is not the one its receipt paid for ("" when it is, or
        when the receipt, of an earlier version, binds no update): another update, or an
        update trained from another model than this round's."""
        bound = receipt_binding(receipt)
        if bound is None:
            return ""
        if W.MASKED in reply.content.array_records:
            sent: str | None = update_digest(
                {"vector": reply.content[W.MASKED]["vector"].numpy()})
        elif W.ARRAYS in reply.content.array_records:
            sent = update_digest(W.from_array_record(reply.content[W.ARRAYS]))
        else:
            sent = None
        if bound.update_sha256 != sent:
            return "the update received is not the one its receipt paid for"
        model = self.model_sent.get(server_round)
        if model is not None and bound.model_sha256 != model:
            return "its receipt says it trained from another model than this round's"
        return ""

    @staticmethod
    def _checked_receipt(text: str, server_round: int, partner: PartnerRecord, *,
                         rounds: int | None = None, run: str | None = None) -> Receipt:
        """The partner's signed receipt for this round (with `rounds`: for any round
        1..rounds of the run) of run `run` (the ledger key; receipts of earlier versions
        name none), or ValueError/KeyError saying why not."""
        receipt = Receipt.from_dict(json.loads(text))
        verify_receipt(receipt)
        if receipt.public_key_hex != partner.public_key:
            raise ValueError("receipt signed by another key than the partner's")
        bound = receipt_binding(receipt)
        if run is not None and bound is not None and bound.run != run:
            raise ValueError(f"receipt is for another run ({bound.run[:16]}…)")
        claim = receipt.payload
        if claim["partner"] != partner.pseudonym:
            raise ValueError("receipt is for another partner")
        if rounds is None and int(claim["round"]) != server_round:
            raise ValueError("receipt is for another round")
        if rounds is not None and not 1 <= int(claim["round"]) <= rounds:
            raise ValueError(f"receipt is for round {claim['round']}, not a round of this "
                             f"run (1..{rounds})")
        return receipt

    def _append_receipt(self, host: RunRecord, partner: PartnerRecord, receipt: Receipt,
                        recorded_in_round: int | None = None) -> None:
        partner.epsilon = float(receipt.payload["epsilon"])
        event = E.ExampleDpEvent.from_receipt(receipt, recorded_in_round)
        partner.accountant = event.accountant
        partner.add_mechanism(event.mechanism, event.delta)
        index = host.record(event)  # durable before the round goes on
        self._index_receipt(partner.pseudonym, receipt.signature_hex, index)

    def _index_receipt(self, partner: str, signature_hex: str, index: int) -> None:
        self.signatures.add(signature_hex)
        self.acknowledged.setdefault(partner, {})[W.receipt_ack_name(signature_hex)] = index

    # -- countersigned chain heads ---------------------------------------------------
    def _record_countersignature(self, host: RunRecord, server_round: int,
                                 partner: PartnerRecord, reply: Message) -> None:
        """The partner's countersignature of the ledger head its train message named, in
        the ledger (head_countersigned), when it holds: signed by the partner's key, for
        this run, naming an entry of this ledger with its hash. Nodes of earlier versions
        send none."""
        record = reply.content.config_records.get(W.RECEIPT)
        text = None if record is None else record.get(W.RECEIPT_HEAD)
        if not text:
            return
        try:
            signed = verify_head(Receipt.from_json(str(text)))
            head = signed.payload
            if signed.public_key_hex != partner.public_key:
                raise ValueError("countersigned by another key than the partner's")
            if head["run"] != host.run_key:
                raise ValueError("it countersigns another run's ledger")
            if host.entry_hash_at(head["index"]) != head["hash"]:
                raise ValueError(f"entry {head['index']} of this ledger has another hash")
        except (KeyError, ValueError) as exc:
            log(WARNING, "round %d: partner %s: invalid countersignature of the ledger head "
                "(%s); not recorded", server_round, partner.pseudonym, exc)
            return
        host.record(E.HeadCountersigned(
            round=server_round, partner=partner.pseudonym, index=int(head["index"]),
            hash=str(head["hash"]), countersignature=signed.to_dict()))

    def _record_earlier_receipts(self, host: RunRecord, server_round: int,
                                 partner: PartnerRecord, reply: Message) -> list[int]:
        """Receipts the partner signed earlier in this run that the ledger does not hold
        (its reply was lost: the server died after the node trained, before or while
        recording it, or the reply never arrived): that budget was spent, and each such
        release is recorded now, before the reply's own receipt (whose claim composes them),
        so nothing is under-counted and the audit's replay matches every claim. One of an
        earlier round is recorded with `recorded_in_round` (this round). The node re-sends
        every receipt the server has not acknowledged: those the ledger holds are skipped
        silently. One that does not verify is logged and left out (the partner's next claim
        then fails the audit: the record is incomplete). Returns the rounds recorded."""
        earlier = reply.content[W.RECEIPT].get(W.RECEIPT_EARLIER)
        rounds: list[int] = []
        if not earlier:
            return rounds
        for text in json.loads(str(earlier)):
            try:
                receipt = self._checked_receipt(str(text), server_round, partner,
                                                rounds=self.cfg.rounds,
                                                run=host.run_key)
            except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
                log(WARNING, "round %d: partner %s: invalid receipt of an earlier reply "
                    "(%s); not recorded", server_round, partner.pseudonym, exc)
                continue
            if receipt.signature_hex in self.signatures:
                continue
            trained_in = int(receipt.payload["round"])
            log(WARNING, "round %d: partner %s trained in %s whose reply was lost; its "
                "spend is recorded now", server_round, partner.pseudonym,
                "an earlier attempt of this round" if trained_in == server_round
                else f"round {trained_in}")
            self._append_receipt(host, partner, receipt,
                                 None if trained_in == server_round else server_round)
            rounds.append(trained_in)
        return rounds

    def prepare_train(self, message: Message, server_round: int) -> None:
        """A train message about to go out: note it (and the model it carries), and tell its
        node which of its partner's receipts the ledger holds and at which entries, so it
        stops re-sending them once it countersigns a head that covers them (nothing when
        its partner is not known yet: the node then re-sends what it holds, and the
        ledger's copies are skipped)."""
        node = message.metadata.dst_node_id
        self.last_sent[node] = server_round
        if server_round not in self.model_sent and W.ARRAYS in message.content.array_records:
            self.model_sent[server_round] = E.weights_digest(
                W.from_array_record(message.content[W.ARRAYS]))
        partner = self.node_partner.get(node)
        if partner is not None:
            held = self.acknowledged.get(partner, {})
            # a copy: a strategy's messages of one round share one content object; the bare
            # list is what nodes of earlier versions read
            message.content = RecordDict({
                **dict(message.content.items()), W.RECORDED: ConfigRecord(
                    {W.ACKNOWLEDGED: json.dumps(list(held)),
                     W.ACKNOWLEDGED_AT: json.dumps(held)})})

    def unanswered_nodes(self) -> set[int]:
        """Nodes sent a train message whose reply this server did not record: each may
        hold a receipt the ledger lacks (it trained, the reply was lost)."""
        return {n for n, r in self.last_sent.items() if self.last_recorded.get(n, 0) < r}

    def record_unrecorded_receipts(self, host: RunRecord, server_round: int,
                                   replies: Iterable[Message], asked: set[int]
                                   ) -> tuple[int, list[str]]:
        """Replies to a receipts query (`wire.RECEIPTS_MESSAGE_TYPE`) sent to `asked`: each
        node's receipts of this run the server never acknowledged; those the ledger lacks
        are recorded in `server_round` (each checked against the partner's key, as any
        receipt). Returns how many nodes answered, and the partners that released in this
        very round (their train reply was lost): they replied in this round after all."""
        answered = sort_replies(replies, asked).of_kind(TRAINED)
        this_round = []
        for r in answered:
            partner = self._partner(r)
            self.node_partner[r.node] = partner.pseudonym
            self.last_recorded[r.node] = self.last_sent.get(r.node, server_round)
            if W.RECEIPT in r.reply.content.config_records and server_round in \
                    self._record_earlier_receipts(host, server_round, partner, r.reply):
                this_round.append(partner.pseudonym)
        return len(answered), this_round

    # -- resume ----------------------------------------------------------------------
    def account_unfinished_rounds(self, entries: list[dict[str, Any]]) -> None:
        """Budget spent in a round after the checkpoint (the run stopped before that round
        was complete) is in the ledger, not in the checkpoint: take every partner's
        mechanisms and latest claim from the ledger, so nothing is under-counted."""
        mechanisms: dict[str, list[ExampleLevelMechanism]] = {}
        self.signatures, self.acknowledged = set(), {}
        for entry in entries:
            if entry.get("type") != E.EXAMPLE_DP:
                continue
            event = E.ExampleDpEvent.from_payload(entry["payload"])
            if event.receipt is not None:
                signature = str(event.receipt.get("signature"))
                if "index" in entry:
                    self._index_receipt(event.partner, signature, int(entry["index"]))
                else:  # an entry without its place in the chain: no head can cover it
                    self.signatures.add(signature)
            mechanisms.setdefault(event.partner, []).append(event.mechanism)
            partner = self.records.get(event.partner)
            if partner is None and event.receipt is not None:
                partner = self.records[event.partner] = PartnerRecord(
                    event.partner, str(event.receipt.get("public_key", "")))
            if partner is not None:
                partner.epsilon = event.epsilon_claimed
                partner.accountant = event.accountant
        for pseudonym, mechs in mechanisms.items():
            if pseudonym in self.records and mechs != self.records[pseudonym].mechanisms:
                partner = self.records[pseudonym]
                partner.mechanisms = mechs
                partner.epsilon_rdp = rdp_epsilon(mechs, self.cfg.delta)

    def state_dict(self) -> dict[str, Any]:
        return {k: v.to_state() for k, v in self.records.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = {k: PartnerRecord.from_state(v) for k, v in state.items()}


def check_budget_left(server_round: int, replies: RoundReplies, *, first_round: bool,
                      target_epsilon: float) -> None:
    """The first round of a run in which every partner that answered refused for budget
    (a lifetime budget spent by earlier runs): later rounds would be refused the same
    way, so the run stops now with the partners' remaining budgets, instead of going
    through every round and finishing with nothing aggregated. The ledger ends inside
    round 1 with the partners' signed refusals (their lifetime spend): the record of
    why nothing was trained, and it verifies."""
    if not first_round or replies.trained or not replies.refusals \
            or len(replies.refusals) < len(replies.partner_of):
        return
    raise NoBudgetLeft(no_budget_message(
        server_round, [(r.partner, r.spent, r.would_be, r.max_epsilon)
                       for r in replies.refusals], target_epsilon))


def check_any_trained(server_round: int, replies: RoundReplies, sampled: int, *,
                      first_round: bool) -> None:
    """The run's first round, in which every sampled node failed with an error (seen: a
    model the configured DP clipping cannot handle): every later round would fail alike,
    so the run stops here naming the errors, instead of going through every round and
    finishing "completed" with nothing aggregated."""
    failures = replies.failures
    if not first_round or replies.trained or replies.refusals or not failures \
            or len(failures) < sampled:
        return
    reasons = sorted(set(failures), key=failures.index)
    # the last line of each (a traceback's is the error itself)
    shown = "; ".join((r.strip().splitlines() or [""])[-1][:400] for r in reasons[:3])
    raise EveryPartnerFailed(
        f"round {server_round}: every sampled partner failed ({len(failures)} of "
        f"{sampled}), nothing was trained or aggregated; the run stops here. "
        f"{'Error' if len(reasons) == 1 else 'Errors'}: {shown}")
