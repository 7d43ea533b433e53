"""Secure aggregation in the server's round loop: a thin Flower adapter around the SecAgg+
core (`confide.privacy.secagg`), folded into the training exchange.

A round r costs two exchanges instead of one (the protocol has four stages; three are folded):

  fit r     down: global weights + config + MaskedInputRequest(r)   [+ KeyDirectory(r+1)]
            up:   MaskedInput(r) + status/metrics/DP receipt        [+ ShareKeys(r+1)]
  unmask r  down: UnmaskRequest(r)                                  [+ advertise for r+2]
            up:   UnmaskShares(r)                                   [+ AdvertiseKeys(r+2)]

so the cohort of round r+1 is sampled during round r-1 (when its keys are advertised). The
first round of a run (or of a resumed run) needs two setup exchanges: AdvertiseKeys(r, r+1),
then KeyDirectory(r) -> ShareKeys(r). A node sampled for round r+1 but not for round r gets
a `train.secagg` message with only the key directory; nodes that only unmask or advertise
likewise get `train.secagg` messages.

Folding has a consequence a plain protocol does not: a node that drops during fit r also
loses its ShareKeys(r+1) and so sits out round r+1 (it can come back from r+2 on).

This module only schedules the protocol: sessions, the folding of stages, message plumbing,
dropouts and refusals. The server learns the (noised) weighted sum of the survivors'
clipped, quantized updates; decoding it and the server step are the privacy mode's
(mode_steps.py), the shared-noise size exchange and calibration are shared_noise_round.py's,
the distributed-DP accounting distributed_dp.py's, and the cohort is drawn by the sampler
both rounds share (cohort.py). If too few survive, the core aborts (`SecAggAbort`): nothing
is unmasked, the global model stays as it was, the ledger records the abort, and the run
continues with the next round. When every node sampled for the run's first round refuses in
the set-up's first stage because its privacy budget is spent, the run stops there
(`NoBudgetLeft`), before any key is shared.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log

from confide import wire as W
from confide.config import ConfigError
from confide.modes import ClientLevel
from confide.privacy import ledger_events as E
from confide.privacy.mechanisms import SecureAggregationAbort
from confide.privacy.receipts import pseudonym_of
from confide.privacy.secagg import (
    AdvertiseKeys,
    KeyDirectory,
    MaskedInput,
    MaskedInputRequest,
    SecAggAbort,
    SecAggConfig,
    SecAggError,
    SecAggResult,
    SecAggServer,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
)
from confide.privacy.secagg import Message as SecAggMessage
from confide.privacy.secagg.identity import refusal_verifies
from confide.privacy.secagg.messages import ConsistencyVote
from confide.privacy.secagg.shared_noise import SharedNoiseConfig
from confide.server.aggregation import RoundOutcome
from confide.server.cohort import connected_nodes, sample_cohort
from confide.server.distributed_dp import DistributedDpAccounting
from confide.server.exchange import is_simulation
from confide.server.faults import crash_point
from confide.server.mode_steps import Released, mode_step
from confide.server.partners import RoundReplies, check_budget_left
from confide.server.recovery import NoBudgetLeft, no_budget_reasons_message
from confide.server.shared_noise_round import SharedNoiseRound

if TYPE_CHECKING:
    from confide.server.aggregation import RoundHost

BUDGET_STAGE = "budget"  # the stage a node names when it refuses for its privacy budget


class SecureMessageRejected(ValueError):
    """A node's secure-aggregation message cannot be accepted (names the node)."""


@dataclass
class Session:
    """One secure round on the server: the core's state machine and who is in it."""

    round: int
    config: SecAggConfig
    server: SecAggServer
    ids: dict[int, int]  # Flower node id -> SecAgg client id (1..n, sorted node order)
    directory: KeyDirectory | None = None
    requests: dict[int, MaskedInputRequest] = field(default_factory=dict)  # by client id
    aborted: str | None = None
    rejected: dict[int, str] = field(default_factory=dict)  # node -> reason
    shared: SharedNoiseConfig | None = None  # shared-noise example-level DP parameters
    # sampled nodes that did not deliver a message of this session they were asked for
    # (error reply, no reply, nothing usable, rejected): its dropouts, whether or not the
    # session aborted
    dropped: set[int] = field(default_factory=set)
    refusals: list[dict[str, Any]] = field(default_factory=list)  # partners' signed refusals
    # node -> (signer, reason) of its signed refusal for its privacy budget
    budget_refused: dict[int, tuple[str, str]] = field(default_factory=dict)

    @property
    def nodes(self) -> dict[int, int]:
        return {c: n for n, c in self.ids.items()}

    def abort(self, exc: SecAggAbort) -> None:
        """Recorded here, logged when round `self.round` ends (SecureRounds.run_round): a
        later round's session can abort during an earlier round's exchange, and its log
        line must not come before that earlier round's own outcome."""
        if self.aborted is None:
            self.aborted = str(exc)


@dataclass
class Fit:
    """What the fit exchange of a round left for its unmask exchange and its outcome."""

    recorded: RoundReplies
    verify: dict[int, np.ndarray] = field(default_factory=dict)  # client id -> encoded input
    unmask_request: UnmaskRequest | None = None


class SecureRounds:
    """Owns the SecAggServer objects of the current and the next rounds and builds and
    consumes the extra records of the folded exchanges."""

    def __init__(self, fed: RoundHost, *, simulation: bool | None = None) -> None:
        self.fed = fed
        cfg = fed.cfg
        self.simulation = is_simulation(fed.grid) if simulation is None else simulation
        if not self.simulation and cfg.verify_secagg:
            raise ConfigError("verify-secagg = true is allowed only in simulation: it sends "
                              "each client's plaintext input to the server")
        if not self.simulation and cfg.dropout_rate > 0:
            raise ConfigError("dropout-rate > 0 (fault injection) is allowed only in "
                              "simulation")
        self.reference = dict(fed.global_state)
        self.vector_length = int(sum(v.size for v in self.reference.values()))
        self.sessions: dict[int, Session] = {}
        self.uploaded = 0
        mode = cfg.privacy_mode
        self.shared = SharedNoiseRound(fed, self._exchange, self._nodes, self.vector_length) \
            if mode.shared_noise else None
        self.step = mode_step(cfg, self.reference,
                              None if self.shared is None else self.shared.expected_batch)
        self.distributed = mode.client is ClientLevel.DISTRIBUTED
        self.ddp = DistributedDpAccounting(cfg)

    def name(self, node: int) -> str:
        """Logs name partners, also for a node that later stops answering."""
        return self.fed.book.node_name(node)

    def _clients_named(self, session: Session, text: str) -> str:
        """`client 2` of the SecAgg core -> `client 2 = p-...` (the partner's one name)."""
        nodes = session.nodes
        return re.sub(r"client (\d+)", lambda m: f"client {m.group(1)} = "
                      f"{self.name(nodes[int(m.group(1))])}"
                      if int(m.group(1)) in nodes else m.group(0), text)

    # -- cohorts and sessions ----------------------------------------------------------
    def _nodes(self) -> list[int]:
        need = max(2, self.fed.cfg.min_clients)
        return sorted(connected_nodes(self.fed.grid, need, self.fed.timeout))

    def _open(self, q: int) -> Session:
        """Sample round q's cohort (the run's sampler) and open its session."""
        cohort = sorted(sample_cohort(self._nodes(), self.fed.cfg, at_least=2))
        config = W.session_config(self.fed.cfg, session_id=os.urandom(16),
                                  num_clients=len(cohort), vector_length=self.vector_length)
        session = Session(q, config, SecAggServer(config, q),
                          {n: i + 1 for i, n in enumerate(cohort)})
        self.sessions[q] = session
        return session

    def _advertise_parts(self, parts: dict[int, dict[str, Any]], session: Session) -> None:
        for node, cid in session.ids.items():
            p = parts.setdefault(node, {})
            p[W.ADVERTISE] = json.dumps([*json.loads(str(p.get(W.ADVERTISE, "[]"))),
                                         session.round])
            p[f"config/{session.round}"] = W.config_to_json(session.config)
            p[f"id/{session.round}"] = cid

    # -- message plumbing ------------------------------------------------------------
    def _exchange(self, server_round: int, config: ConfigRecord,
                  parts: dict[int, dict[str, Any]], train: set[int] | None = None
                  ) -> list[Message]:
        train = train or set()
        messages = []
        for node, part in sorted(parts.items()):
            down = ConfigRecord({W.SECAGG_ROUND: server_round,
                                 W.VERIFY_FLAG: self.fed.cfg.verify_secagg, **part})
            content = RecordDict({W.CONFIG: config, W.SECAGG: down})
            if node in train:
                content[W.ARRAYS] = W.to_array_record(self.fed.global_state)
            message = Message(content=content, dst_node_id=node, message_type="train"
                              if node in train else W.SECAGG_MESSAGE_TYPE)
            if node in train:
                self.fed.book.prepare_train(message, server_round)
            messages.append(message)
        replies = self.fed.exchange(messages, "train" if train else "secure aggregation")
        for reply in replies:
            if not reply.has_error():
                self._read_up(reply)
        return replies

    def _read_up(self, reply: Message) -> None:
        """Count a reply's upload; log its secure-aggregation errors; keep its refusals."""
        up = reply.content.config_records.get(W.SECAGG_UP)
        if up is not None:
            self.uploaded += sum(len(v) for v in up.values() if isinstance(v, bytes))
            for key, value in up.items():
                if key.startswith("error/"):
                    log(WARNING, "%s: secure aggregation %s: %s",
                        self.name(reply.metadata.src_node_id), key[6:], value)
                elif key.startswith(f"{W.REFUSAL}/"):
                    self._signed_refusal(reply.metadata.src_node_id, str(value))
        if W.MASKED in reply.content.array_records:
            self.uploaded += sum(a.numpy().nbytes for a in reply.content[W.MASKED].values())

    def _signed_refusal(self, node: int, text: str) -> None:
        """Keep a partner's signed refusal for its round's ledger entry (the operator can show
        who refused what, and why); an unverifiable one is only logged."""
        try:
            refusal = json.loads(text)
            ok = isinstance(refusal, dict) and refusal_verifies(refusal)
        except json.JSONDecodeError:
            ok = False
        session = self.sessions.get(int(refusal.get("round", -1))) if ok else None
        if session is None or refusal.get("session") != session.config.session_id.hex():
            log(WARNING, "%s: a secure-aggregation refusal that does not verify was ignored",
                self.name(node))
            return
        signer = pseudonym_of(bytes.fromhex(refusal["identity"]))
        log(WARNING, "%s refused secure round %d (%s), signed by %s: %s", self.name(node),
            session.round, refusal["stage"], signer, refusal["reason"])
        session.refusals.append(refusal)
        if refusal["stage"] == BUDGET_STAGE and node in session.ids:
            session.budget_refused[node] = (signer, str(refusal["reason"]))

    def consume(self, session: Session, reply: Message, key: str,
                kind: type[SecAggMessage]) -> bool:
        """_consume; a sampled node whose part is missing or rejected is a dropout of the
        session."""
        ok = self._consume(session, reply, key, kind)
        if not ok and reply.metadata.src_node_id in session.ids:
            session.dropped.add(reply.metadata.src_node_id)
        return ok

    @staticmethod
    def _no_reply(session: Session | None, replies: list[Message], asked: Iterable[int]
                  ) -> None:
        """Nodes of `session` that were sent a message of it and did not answer at all."""
        if session is None:
            return
        answered = {r.metadata.src_node_id for r in replies}
        session.dropped.update(n for n in asked if n in session.ids and n not in answered)

    def _consume(self, session: Session, reply: Message, key: str,
                 kind: type[SecAggMessage]) -> bool:
        """Feed one part of a node's reply to the round's core; a malformed, replayed,
        misaddressed or unexpected part is rejected with a reason naming the node (that
        node then counts as a dropout), and the round goes on."""
        node = reply.metadata.src_node_id
        try:
            if node not in session.ids:
                raise SecureMessageRejected(f"node {node} was not sampled for secure round "
                                            f"{session.round}")
            if reply.has_error():
                return False
            up = reply.content.config_records.get(W.SECAGG_UP)
            msg: SecAggMessage | None
            if kind is MaskedInput:
                msg = self._masked_input(session, reply)
                if msg is None:
                    return False
            else:
                if up is None or key not in up:
                    return False
                msg = SecAggMessage.from_bytes(bytes(up[key]))
                if not isinstance(msg, kind):
                    raise SecureMessageRejected(f"node {node}: {key} holds a {msg.KIND} "
                                                "message")
            sender = getattr(msg, "sender", None)
            if sender != session.ids[node]:
                raise SecureMessageRejected(f"node {node} sent a message as client {sender}, "
                                            f"but is client {session.ids[node]} in round "
                                            f"{session.round}")
            session.server.receive(msg)
            return True
        except (SecAggError, SecureMessageRejected, ValueError, KeyError) as exc:
            if isinstance(exc, SecAggAbort):
                raise
            reason = f"node {node}: {type(exc).__name__}: {exc}"
            log(WARNING, "secure round %d: rejected message of %s: %s: %s", session.round,
                self.name(node), type(exc).__name__, exc)
            session.rejected[node] = reason
            return False

    def _masked_input(self, session: Session, reply: Message) -> MaskedInput | None:
        up = reply.content.config_records.get(W.SECAGG_UP)
        if up is None or W.MASKED not in reply.content.array_records:
            return None
        record = reply.content[W.MASKED]
        if "vector" not in record or W.MASKED_ROUND not in up or W.MASKED_SENDER not in up:
            raise SecureMessageRejected(f"node {reply.metadata.src_node_id}: masked input "
                                        "without vector, round or sender")
        # the session id and round come from the reply; the core rejects a vector of
        # another round (replay) or of the wrong length/dtype, naming the sender
        return MaskedInput(session.config.session_id, int(up[W.MASKED_ROUND]),
                           sender=int(up[W.MASKED_SENDER]),
                           vector=record["vector"].numpy(),
                           vote=bytes(up.get(W.MASKED_VOTE, b"")))

    def _close(self, session: Session | None, stage: str) -> None:
        """Close a stage of a session that is still alive; record an abort."""
        if session is None or session.aborted is not None:
            return
        try:
            if stage == "advertise":
                session.directory = session.server.key_directory()
            elif stage == "share":
                session.requests = session.server.masked_input_requests()
        except SecAggAbort as exc:
            session.abort(exc)

    def _collect(self, session: Session | None, replies: list[Message], key: str,
                 kind: type[SecAggMessage], asked: Iterable[int], stage: str) -> None:
        """One folded stage of `session` from an exchange's replies: its parts fed to the
        core, who did not answer, and the stage closed."""
        if session is None:
            return
        for reply in replies:
            self.consume(session, reply, key, kind)
        self._no_reply(session, replies, asked)
        self._close(session, stage)

    # -- setup ---------------------------------------------------------------------
    def setup(self, first: int, config: ConfigRecord) -> None:
        """Two exchanges before the first secure round: advertise keys for rounds `first`
        and `first + 1`, then share keys for `first` (not when every node sampled for the
        run's first round refused for its budget: the run stops, `NoBudgetLeft`)."""
        last = self.fed.cfg.rounds
        sessions = [self._open(q) for q in (first, first + 1) if q <= last]
        parts: dict[int, dict[str, Any]] = {}
        for s in sessions:
            self._advertise_parts(parts, s)
        replies = self._exchange(first, config, parts)
        for s in sessions:
            self._collect(s, replies, f"{W.ADVERTISE}/{s.round}", AdvertiseKeys, parts,
                          "advertise")
        head = sessions[0]
        self._stop_if_no_budget(head)
        if head.aborted is None and head.directory is not None:
            parts = {n: {f"{W.KEY_DIRECTORY}/{first}": head.directory.to_bytes()}
                     for n in head.ids}
            self._collect(head, self._exchange(first, config, parts),
                          f"{W.SHARE_KEYS}/{first}", ShareKeys, parts, "share")
        log(INFO, "secure aggregation set up for round %d: %d clients, threshold %d, "
            "%d neighbours, %d bits", first, head.config.num_clients, head.config.threshold,
            head.config.degree, head.config.bits)

    def _stop_if_no_budget(self, head: Session) -> None:
        """The run's first round, whose sampled nodes all refused the set-up for their
        privacy budget (or so many did that too few remain, and every other missing node
        refused for it too): stop now, before any key is shared, as a plain run stops when
        every train reply is a budget refusal (`partners.check_budget_left`). The ledger
        ends with the round's sample and its secure_aggregation entry holding the signed
        refusals."""
        refused = head.budget_refused
        if not self.fed.first_round or not refused:
            return
        everyone = set(refused) == set(head.ids)
        too_few = head.aborted is not None and head.dropped <= set(refused)
        if not (everyone or too_few):
            return
        sampled = sorted(head.ids)
        message = no_budget_reasons_message(head.round, sorted(refused.values()),
                                            self.fed.cfg.target_epsilon)
        self.fed.record(E.RoundConfigured(round=head.round, sampled=[str(n) for n in sampled]))
        self.fed.record(self._aggregation_event(
            head, [], sorted(self.fed.book.record_name(n) for n in sampled),
            SecureAggregationAbort("every sampled partner refused for its privacy budget")))
        raise NoBudgetLeft(message)

    # -- one round -------------------------------------------------------------------
    def run_round(self, server_round: int, config: ConfigRecord) -> RoundOutcome:
        """Fit + unmask exchanges of one round; the outcome's aggregate is the new global
        weights when the secure sum is released (None when the round aborted)."""
        self.uploaded = 0
        config = ConfigRecord({**dict(config), W.ROUND: server_round})
        if self.shared is not None:
            self.shared.ask_sizes(config, server_round)
        if server_round not in self.sessions:
            self.setup(server_round, config)
        cur = self.sessions[server_round]
        sampled = sorted(cur.ids)
        self.fed.record(E.RoundConfigured(round=server_round,
                                          sampled=[str(n) for n in sampled]))
        fit = self._fit(cur, config)
        result = self._unmask(cur, config, fit.unmask_request)
        crash_point("mid-aggregation", server_round, run_dir=self.fed.run_dir)  # released
        outcome = self._outcome(cur, sampled, fit, result)
        del self.sessions[server_round]
        return outcome

    def _fit_parts(self, cur: Session, nxt: Session | None, config: ConfigRecord
                   ) -> tuple[dict[int, dict[str, Any]], set[int]]:
        """Round r's fit exchange: MaskedInputRequest(r) with the weights (and the round's
        shared-noise parameters) to its cohort, KeyDirectory(r+1) alongside."""
        server_round = cur.round
        parts: dict[int, dict[str, Any]] = {}
        train: set[int] = set()
        if cur.aborted is None:
            nodes = cur.nodes
            for cid, request in cur.requests.items():
                parts.setdefault(nodes[cid], {})[f"{W.MASKED_REQUEST}/{server_round}"] = \
                    request.to_bytes()
                train.add(nodes[cid])
        if self.shared is not None and cur.aborted is None and train:
            cur.shared, silent = self.shared.round_config(server_round, cur.config, config,
                                                          train)
            for node in silent:  # never reported its rows (e.g. refused the app): a dropout
                train.discard(node)
                del parts[node][f"{W.MASKED_REQUEST}/{server_round}"]
                cur.dropped.add(node)
            for node in train:
                parts[node][f"{W.SHARED}/{server_round}"] = cur.shared.to_json()
        if nxt is not None and nxt.aborted is None and nxt.directory is not None:
            for node in nxt.ids:
                parts.setdefault(node, {})[f"{W.KEY_DIRECTORY}/{nxt.round}"] = \
                    nxt.directory.to_bytes()
        return parts, train

    def _fit(self, cur: Session, config: ConfigRecord) -> Fit:
        """The fit exchange: the partners' replies recorded (receipts in the ledger now),
        ShareKeys(r+1) and the masked inputs fed to their sessions, the unmask request."""
        fed, server_round = self.fed, cur.round
        nxt = self.sessions.get(server_round + 1)
        parts, train = self._fit_parts(cur, nxt, config)
        replies = self._exchange(server_round, config, parts, train)
        crash_point("after-replies", server_round, run_dir=fed.run_dir)
        fit = Fit(fed.book.record_replies(
            fed, server_round, [r for r in replies if r.metadata.src_node_id in train]))
        check_budget_left(server_round, fit.recorded, first_round=fed.first_round,
                          target_epsilon=fed.cfg.target_epsilon)
        if nxt is not None and nxt.aborted is None:
            self._collect(nxt, replies, f"{W.SHARE_KEYS}/{nxt.round}", ShareKeys, nxt.ids,
                          "share")
        if cur.aborted is None:
            for reply in fit.recorded.trained:
                if self.consume(cur, reply, "", MaskedInput) \
                        and W.VERIFY in reply.content.array_records:
                    fit.verify[cur.ids[reply.metadata.src_node_id]] = \
                            reply.content[W.VERIFY]["encoded"].numpy()
            # asked to train but no masked input (failed, refused, no answer)
            cur.dropped.update(train - {r.metadata.src_node_id for r in fit.recorded.trained})
            try:
                fit.unmask_request = self._unmask_request(cur, server_round, config)
            except SecAggAbort as exc:
                cur.abort(exc)
        return fit

    def _unmask(self, cur: Session, config: ConfigRecord,
                unmask_request: UnmaskRequest | None) -> SecAggResult | None:
        """The unmask exchange: UnmaskRequest(r) to the survivors, advertise for r+2
        alongside; the released sum (None when the round aborted)."""
        server_round = cur.round
        parts: dict[int, dict[str, Any]] = {}
        if unmask_request is not None:
            nodes = cur.nodes
            for cid in unmask_request.survivors:
                parts.setdefault(nodes[cid], {})[f"{W.UNMASK_REQUEST}/{server_round}"] = \
                    unmask_request.to_bytes()
        later = None
        if server_round + 2 <= self.fed.cfg.rounds and server_round + 2 not in self.sessions:
            later = self._open(server_round + 2)
            self._advertise_parts(parts, later)
        replies = self._exchange(server_round, config, parts)
        if later is not None:
            self._collect(later, replies, f"{W.ADVERTISE}/{later.round}", AdvertiseKeys,
                          later.ids, "advertise")
        if unmask_request is None or cur.aborted is not None:
            return None
        for reply in replies:
            if reply.metadata.src_node_id in cur.ids:
                self.consume(cur, reply, f"{W.UNMASK_SHARES}/{server_round}", UnmaskShares)
        self._no_reply(cur, replies, [cur.nodes[c] for c in unmask_request.survivors])
        try:
            return cur.server.result()
        except SecAggAbort as exc:
            cur.abort(exc)
        except SecAggError as exc:  # e.g. inconsistent shares: nothing is released
            cur.aborted = f"unmasking failed: {exc}"
        return None

    def _outcome(self, cur: Session, sampled: list[int], fit: Fit,
                 result: SecAggResult | None) -> RoundOutcome:
        """The round's outcome: the mode's step on the released sum, who took part, the
        secure_aggregation event (and distributed DP's client_dp event)."""
        fed, server_round = self.fed, cur.round
        abort = None if cur.aborted is None else SecureAggregationAbort(cur.aborted)
        extra: dict[str, Any] = {"secagg_aborted": abort.reason if abort else None}
        aggregated: list[str] = []
        aggregate: dict[str, np.ndarray] | None = None
        nodes = cur.nodes
        # released: the clients in the sum; aborted: the sampled nodes still answering
        # (nothing of theirs was unmasked or aggregated)
        survivors = ([nodes[c] for c in result.survivors] if result is not None
                     else [n for n in sampled if n not in cur.dropped])
        if result is not None and survivors:
            aggregate, metrics = self.step.step(fed, Released(
                cur.config, result, survivors, cur.shared, fit.verify))
            extra.update(metrics)
            partner = fit.recorded.partner_of
            aggregated = [partner.get(n) or fed.book.record_name(n) for n in survivors]
        dropped = list(fit.recorded.dropped)
        for node in cur.rejected:
            name = fed.book.record_name(node)
            if name not in dropped:  # counted as a dropout of this round
                dropped.append(name)
        gone = [n for n in sampled if n not in survivors]
        dropouts = sorted(fed.book.record_name(n) for n in gone)
        extra["secagg_survivors"] = len(survivors)
        extra["secagg_dropouts"] = len(dropouts)
        self._log_outcome(cur, len(survivors), len(sampled), gone)
        outcome = RoundOutcome(
            sampled=sampled, aggregate=aggregate, aggregated=aggregated,
            replied=sorted(fit.recorded.partner_of.values()), dropped=sorted(dropped),
            uploaded=self.uploaded,
            events=[self._aggregation_event(cur, sorted(aggregated), dropouts, abort)],
            metrics=extra)
        if self.distributed:
            event, outcome.client_level_epsilon = self.ddp.account(
                server_round, cur.config, len(cur.ids), released=result is not None)
            outcome.events.append(event)
        return outcome

    def _log_outcome(self, cur: Session, survivors: int, sampled: int, gone: list[int]
                     ) -> None:
        dropped_text = ", ".join(self.name(n) for n in gone) or "none"
        if cur.aborted is not None:  # logged here, in round order (see Session.abort)
            log(WARNING, "secure round %d aborted: %s; dropped: %s; nothing was unmasked and "
                "the global model stays unchanged", cur.round,
                self._clients_named(cur, cur.aborted), dropped_text)
        elif gone:
            log(WARNING, "secure round %d: %d of %d sampled in the sum; dropped: %s",
                cur.round, survivors, sampled, dropped_text)

    @staticmethod
    def _aggregation_event(session: Session, participants: list[str], dropouts: list[str],
                           abort: SecureAggregationAbort | None
                           ) -> E.SecureAggregationEvent:
        config = session.config
        return E.SecureAggregationEvent(
            round=session.round, participants=participants, dropouts=dropouts,
            threshold=int(config.threshold), bits=config.bits,
            neighbours=int(config.degree), abort=abort, refusals=session.refusals,
            authenticated=session.server.authenticated)

    def _unmask_request(self, session: Session, server_round: int, config: ConfigRecord
                        ) -> UnmaskRequest:
        """Round r's unmask request. When a node asked for a masked input did not deliver
        one, the survivors first vote on the actual split (one more exchange); otherwise
        their votes came with their masked inputs."""
        ask = session.server.consistency_request()
        if ask is not None:
            nodes = session.nodes
            parts = {nodes[c]: {f"{W.CONSISTENCY_REQUEST}/{session.round}": ask.to_bytes()}
                     for c in ask.survivors}
            replies = self._exchange(server_round, config, parts)
            for reply in replies:
                self.consume(session, reply, f"{W.CONSISTENCY_VOTE}/{session.round}",
                             ConsistencyVote)
        return session.server.unmask_request()

    # -- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # the sessions of rounds in flight are not saved: their secrets are not on the
        # server, and a resumed run sets up fresh keys (setup exchanges) for its next round
        return self.ddp.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ddp.load_state_dict(state)
