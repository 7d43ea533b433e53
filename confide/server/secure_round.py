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

Aggregation: with local example noise or none, each surviving update is weighted by its
rows (capped at `secagg-max-weight`), as in the plaintext mean; with distributed DP each
counts once (see the node's side, `confide.clients.secure_client.update_weight`). The server
learns the (noised) weighted sum of the survivors' clipped, quantized updates and their
total weight, divides, and applies its optimizer. If too few survive, the core aborts
(`SecAggAbort`): nothing is unmasked, the global model stays as it was, the ledger records
the abort, and the run continues with the next round.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
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
from confide.privacy.sampling import poisson_rate
from confide.privacy.secagg import (
    AdvertiseKeys,
    DistributedDGAccountant,
    KeyDirectory,
    MaskedInput,
    MaskedInputRequest,
    SecAggAbort,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
    UpdateEncoder,
)
from confide.privacy.secagg import Message as SecAggMessage
from confide.privacy.secagg.ddg_accounting import ddg_mechanism
from confide.privacy.secagg.identity import refusal_verifies
from confide.privacy.secagg.masking import reduce_mod
from confide.privacy.secagg.messages import ConsistencyVote
from confide.privacy.secagg.shared_noise import SharedNoiseConfig, decode_sum
from confide.server.aggregation import RoundOutcome
from confide.server.faults import crash_point
from confide.server.partners import check_budget_left
from confide.server.recovery import EveryPartnerFailed

if TYPE_CHECKING:
    from confide.server.aggregation import RoundHost

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

    @property
    def nodes(self) -> dict[int, int]:
        return {c: n for n, c in self.ids.items()}

    def abort(self, exc: SecAggAbort) -> None:
        """Recorded here, logged when round `self.round` ends (SecureRounds.run_round): a
        later round's session can abort during an earlier round's exchange, and its log
        line must not come before that earlier round's own outcome."""
        if self.aborted is None:
            self.aborted = str(exc)


def is_simulation(grid: object) -> bool:
    """Flower's simulation engine drives the ServerApp through an InMemoryGrid (possibly
    wrapped, e.g. by server_app.AbortableGrid, which keeps it as `.inner`)."""
    seen = 0
    while type(grid).__name__ != "InMemoryGrid" and hasattr(grid, "inner") and seen < 8:
        grid, seen = grid.inner, seen + 1
    return type(grid).__name__ == "InMemoryGrid"


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
        self.accountant = DistributedDGAccountant()
        self.uploaded = 0
        # shared-noise example-level DP: one sigma per run; each node's (rows, rate)
        self.shared_mode = cfg.privacy_mode.shared_noise
        self.shared_sigma: float | None = None
        self.shared_rate: float = 0.0  # the run's common sampling rate (set with sigma)
        self.partner_info: dict[int, tuple[int, float]] = {}

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
        deadline = time.monotonic() + min(self.fed.timeout, 600.0)
        while True:
            nodes = sorted(self.fed.grid.get_node_ids())
            if len(nodes) >= need or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if len(nodes) < need:
            raise RuntimeError(f"secure aggregation needs at least {need} connected nodes, "
                               f"{len(nodes)} are connected")
        return nodes

    def _open(self, q: int) -> Session:
        """Sample round q's cohort (python `random`, seeded by the run) and open its session."""
        nodes = self._nodes()
        size = max(2, self.fed.cfg.min_clients, int(len(nodes) * self.fed.cfg.fraction_train))
        cohort = sorted(random.sample(nodes, min(size, len(nodes))))
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
        if not messages:
            return []
        replies = list(self.fed.grid.send_and_receive(messages, timeout=self.fed.timeout))
        for reply in replies:
            if reply.has_error():
                continue
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
                self.uploaded += sum(a.numpy().nbytes
                                     for a in reply.content[W.MASKED].values())
        return replies

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
        log(WARNING, "%s refused secure round %d (%s), signed by %s: %s", self.name(node),
            session.round, refusal["stage"], pseudonym_of(bytes.fromhex(refusal["identity"])),
            refusal["reason"])
        session.refusals.append(refusal)

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

    # -- setup ---------------------------------------------------------------------
    def setup(self, first: int, config: ConfigRecord) -> None:
        """Two exchanges before the first secure round: advertise keys for rounds `first`
        and `first + 1`, then share keys for `first`."""
        last = self.fed.cfg.rounds
        sessions = [self._open(q) for q in (first, first + 1) if q <= last]
        parts: dict[int, dict[str, Any]] = {}
        for s in sessions:
            self._advertise_parts(parts, s)
        replies = self._exchange(first, config, parts)
        for s in sessions:
            for reply in replies:
                self.consume(s, reply, f"{W.ADVERTISE}/{s.round}", AdvertiseKeys)
            self._no_reply(s, replies, parts)
            self._close(s, "advertise")
        head = sessions[0]
        if head.aborted is None and head.directory is not None:
            parts = {n: {f"{W.KEY_DIRECTORY}/{first}": head.directory.to_bytes()}
                     for n in head.ids}
            replies = self._exchange(first, config, parts)
            for reply in replies:
                self.consume(head, reply, f"{W.SHARE_KEYS}/{first}", ShareKeys)
            self._no_reply(head, replies, parts)
            self._close(head, "share")
        log(INFO, "secure aggregation set up for round %d: %d clients, threshold %d, "
            "%d neighbours, %d bits", first, head.config.num_clients, head.config.threshold,
            head.config.degree, head.config.bits)

    # -- one round -------------------------------------------------------------------
    def run_round(self, server_round: int, config: ConfigRecord) -> RoundOutcome:
        """Fit + unmask exchanges of one round; the outcome's aggregate is the new global
        weights when the secure sum is released (None when the round aborted)."""
        fed = self.fed
        self.uploaded = 0
        config = ConfigRecord({**dict(config), W.ROUND: server_round})
        if self.shared_mode:
            self._shared_info(config, server_round)
        if server_round not in self.sessions:
            self.setup(server_round, config)
        cur = self.sessions[server_round]
        nxt = self.sessions.get(server_round + 1)
        sampled = sorted(cur.ids)
        fed.record(E.RoundConfigured(round=server_round, sampled=[str(n) for n in sampled]))

        # fit: MaskedInputRequest(r) with the weights, KeyDirectory(r+1) alongside
        parts: dict[int, dict[str, Any]] = {}
        train: set[int] = set()
        if cur.aborted is None:
            nodes = cur.nodes
            for cid, request in cur.requests.items():
                parts.setdefault(nodes[cid], {})[f"{W.MASKED_REQUEST}/{server_round}"] = \
                    request.to_bytes()
                train.add(nodes[cid])
        if self.shared_mode and cur.aborted is None and train:
            cur.shared, silent = self._shared_config(cur, config, train)
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
        replies = self._exchange(server_round, config, parts, train)
        crash_point("after-replies", server_round, run_dir=fed.run_dir)
        recorded = fed.book.record_replies(
            fed, server_round, [r for r in replies if r.metadata.src_node_id in train])
        check_budget_left(server_round, recorded, first_round=fed.first_round,
                          target_epsilon=fed.cfg.target_epsilon)
        trained = recorded.trained
        if nxt is not None and nxt.aborted is None:
            for reply in replies:
                self.consume(nxt, reply, f"{W.SHARE_KEYS}/{nxt.round}", ShareKeys)
            self._no_reply(nxt, replies, nxt.ids)
            self._close(nxt, "share")
        verify: dict[int, np.ndarray] = {}
        unmask_request = None
        if cur.aborted is None:
            for reply in trained:
                if self.consume(cur, reply, "", MaskedInput) \
                        and W.VERIFY in reply.content.array_records:
                    verify[cur.ids[reply.metadata.src_node_id]] = \
                            reply.content[W.VERIFY]["encoded"].numpy()
            # asked to train but no masked input (failed, refused, no answer)
            cur.dropped.update(train - {r.metadata.src_node_id for r in trained})
            try:
                unmask_request = self._unmask_request(cur, server_round, config)
            except SecAggAbort as exc:
                cur.abort(exc)

        # unmask: UnmaskRequest(r) to the survivors, advertise for r+2 alongside
        parts = {}
        if unmask_request is not None:
            nodes = cur.nodes
            for cid in unmask_request.survivors:
                parts.setdefault(nodes[cid], {})[f"{W.UNMASK_REQUEST}/{server_round}"] = \
                    unmask_request.to_bytes()
        later = None
        if server_round + 2 <= fed.cfg.rounds and server_round + 2 not in self.sessions:
            later = self._open(server_round + 2)
            self._advertise_parts(parts, later)
        replies = self._exchange(server_round, config, parts)
        if later is not None:
            for reply in replies:
                self.consume(later, reply, f"{W.ADVERTISE}/{later.round}", AdvertiseKeys)
            self._no_reply(later, replies, later.ids)
            self._close(later, "advertise")
        result = None
        if unmask_request is not None and cur.aborted is None:
            for reply in replies:
                if reply.metadata.src_node_id in cur.ids:
                    self.consume(cur, reply, f"{W.UNMASK_SHARES}/{server_round}", UnmaskShares)
            self._no_reply(cur, replies, [cur.nodes[c] for c in unmask_request.survivors])
            try:
                result = cur.server.result()
            except SecAggAbort as exc:
                cur.abort(exc)
            except SecAggError as exc:  # e.g. inconsistent shares: nothing is released
                cur.aborted = f"unmasking failed: {exc}"

        # aggregate, verify, account, record
        crash_point("mid-aggregation", server_round, run_dir=fed.run_dir)  # sum released
        abort = None if cur.aborted is None else SecureAggregationAbort(cur.aborted)
        extra: dict[str, Any] = {"secagg_aborted": abort.reason if abort else None}
        aggregated: list[str] = []
        aggregate: dict[str, np.ndarray] | None = None
        partner = recorded.partner_of
        nodes = cur.nodes
        # released: the clients in the sum; aborted: the sampled nodes still answering
        # (nothing of theirs was unmasked or aggregated)
        survivors = ([nodes[c] for c in result.survivors] if result is not None
                     else [n for n in sampled if n not in cur.dropped])
        if result is not None and survivors and cur.shared is not None:
            # shared noise: the noisy clipped-gradient sum over the expected total batch
            # sum_i q_i n_i (public: the partners' rows and rates), then one server-optimizer
            # step along minus that gradient (post-processing)
            expected = sum(self.partner_info[n][0] * self.partner_info[n][1]
                           for n in survivors)
            gradient = decode_sum(result.ring_sum, cur.shared) / expected
            aggregate = fed.server_step(W.unflatten(-gradient, self.reference))
            aggregated = [partner.get(n) or fed.book.record_name(n) for n in survivors]
            released = cur.shared.mechanism(cur.shared.sample_rate)  # the partners' receipts
            extra.update({"shared_noise_multiplier": released.noise_multiplier,
                          "shared_noise_shares": released.noise_shares,
                          "shared_expected_batch": expected,
                          "secagg_quantization_step": 1.0 / cur.shared.scale})
        elif result is not None and survivors:
            # weighted: sum_i w_i x_i / sum_i w_i, as the plaintext mean (the total weight
            # is decoded from the sum's weight coordinate); else weight 1 each, and the
            # count of survivors is public and exact
            mean = result.weighted_sum / (result.total_weight if fed.cfg.secure_sum_weighted
                                          else len(survivors))
            aggregate = fed.server_step(W.unflatten(mean, self.reference))
            aggregated = [partner.get(n) or fed.book.record_name(n) for n in survivors]
            encoder = UpdateEncoder(cur.config)
            extra["secagg_quantization_step"] = encoder.step * cur.config.max_weight
            if verify:
                extra.update(self._verify(cur, result, verify))
        dropped = list(recorded.dropped)
        for node in cur.rejected:
            name = fed.book.record_name(node)
            if name not in dropped:  # counted as a dropout of this round
                dropped.append(name)
        gone = [n for n in sampled if n not in survivors]
        dropouts = sorted(fed.book.record_name(n) for n in gone)
        extra["secagg_survivors"] = len(survivors)
        extra["secagg_dropouts"] = len(dropouts)
        dropped_text = ", ".join(self.name(n) for n in gone) or "none"
        if cur.aborted is not None:  # logged here, in round order (see Session.abort)
            log(WARNING, "secure round %d aborted: %s; dropped: %s; nothing was unmasked and "
                "the global model stays unchanged", server_round,
                self._clients_named(cur, cur.aborted), dropped_text)
        elif gone:
            log(WARNING, "secure round %d: %d of %d sampled in the sum; dropped: %s",
                server_round, len(survivors), len(sampled), dropped_text)
        outcome = RoundOutcome(
            sampled=sampled, aggregate=aggregate, aggregated=aggregated,
            replied=sorted(partner.values()), dropped=sorted(dropped), uploaded=self.uploaded,
            events=[E.SecureAggregationEvent(
                round=server_round, participants=sorted(aggregated), dropouts=dropouts,
                threshold=int(cur.config.threshold), bits=cur.config.bits,
                neighbours=int(cur.config.degree), abort=abort, refusals=cur.refusals,
                authenticated=cur.server.authenticated)],
            metrics=extra)
        if fed.cfg.privacy_mode.client is ClientLevel.DISTRIBUTED:
            self._distributed_dp(cur, outcome, released=result is not None)
        del self.sessions[server_round]
        return outcome

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

    def _verify(self, session: Session, result: Any, encoded: dict[int, np.ndarray]
                ) -> dict[str, Any]:
        """Simulation only: the plaintext ring sum of the survivors' (noised, quantized)
        inputs, decoded, against the secure result."""
        cfg = session.config
        missing = [c for c in result.survivors if c not in encoded]
        if missing:
            return {"secagg_max_abs_error": None, "secagg_verify_missing": missing}
        total = np.zeros(cfg.encoded_length, dtype=cfg.dtype)
        for c in result.survivors:
            np.add(total, encoded[c].astype(cfg.dtype), out=total)
        reduce_mod(total, cfg)
        plain, _ = UpdateEncoder(cfg).decode(total)
        error = float(np.max(np.abs(plain - result.weighted_sum), initial=0.0))
        return {"secagg_max_abs_error": error,
                "secagg_ring_sum_equal": bool(np.array_equal(total, result.ring_sum))}

    def _distributed_dp(self, session: Session, outcome: RoundOutcome, *, released: bool
                        ) -> None:
        """Client-level DP of the distributed discrete Gaussian (KLS21), accounted for the
        worst case the threshold allows: only min_survivors noise shares in the sum. Cohorts
        are fixed-size samples, so no amplification by sampling is claimed (rate 1). An
        aborted round released nothing and composes nothing (recorded with released=false)."""
        cfg = self.fed.cfg
        mechanism = ddg_mechanism(
            session.config, noise_multiplier=cfg.client_dp_noise_multiplier,
            clipping_norm=cfg.client_dp_clipping_norm,
            population=max(cfg.clients, len(session.ids)), sampled=len(session.ids),
            released=released)
        self.accountant.record(mechanism)
        outcome.client_level_epsilon = self.accountant.epsilon(cfg.delta)
        outcome.events.append(E.ClientDpEvent(
            round=session.round, mechanism=mechanism, delta=cfg.delta,
            epsilon_claimed=outcome.client_level_epsilon))

    # -- shared-noise example-level DP ----------------------------------------------------
    def _shared_info(self, config: ConfigRecord, server_round: int) -> None:
        """Ask connected nodes whose rows and rate are unknown (`train.secagg` exchange, at
        the start of a run or for a newcomer) and fix the run's sampling rate and sigma once:
        one rate q = batch-size / (all partners' records) for every partner, and sigma by PLD
        so that q reaches target-epsilon after all rounds, one step per round (as if sampled
        every round). A node re-checks its own epsilon for that rate and sigma before each
        round and refuses when over budget."""
        from confide.privacy.accountant import calibrate_noise

        missing = [n for n in self._nodes() if n not in self.partner_info]
        if missing:
            parts: dict[int, dict[str, Any]] = {n: {W.SHARED_INFO: True} for n in missing}
            for reply in self._exchange(server_round, config, parts):
                up = reply.content.config_records.get(W.SECAGG_UP) \
                    if not reply.has_error() else None
                if up is None or W.SHARED_INFO not in up:
                    continue
                try:
                    info = json.loads(str(up[W.SHARED_INFO]))
                    rows, rate = int(info["examples"]), float(info["sample_rate"])
                    if rows < 1 or not 0 < rate <= 1:
                        raise ValueError(f"rows {rows}, rate {rate}")
                except (ValueError, KeyError, TypeError) as exc:
                    log(WARNING, "%s: unusable shared-noise info: %s",
                        self.name(reply.metadata.src_node_id), exc)
                    continue
                self.partner_info[reply.metadata.src_node_id] = (rows, rate)
        if self.shared_sigma is None and self.partner_info:
            cfg = self.fed.cfg
            # One Poisson rate for every partner: batch-size is the expected batch of the
            # whole federation per round, so the sum is central DP-SGD's step on the union.
            total = sum(rows for rows, _ in self.partner_info.values())
            self.shared_rate = poisson_rate(cfg.batch_size, total)
            self.shared_sigma = cfg.noise_multiplier if cfg.noise_multiplier > 0 else \
                calibrate_noise(cfg.target_epsilon, cfg.delta, self.shared_rate, cfg.rounds)
            log(INFO, "shared noise: sigma %.4f, sampling rate %.4g for every partner "
                "(expected batch %d of %d records), %d rounds, target epsilon %g",
                self.shared_sigma, self.shared_rate, cfg.batch_size, total, cfg.rounds,
                cfg.target_epsilon)
            # deployed, the first moment the server knows N (nothing is trained yet)
            self.fed.partner_rows_known([rows for rows, _ in self.partner_info.values()])
        if self.shared_rate:
            # newcomers sample at the run's rate too
            self.partner_info = {n: (rows, self.shared_rate)
                                 for n, (rows, _) in self.partner_info.items()}

    def _shared_config(self, session: Session, config: ConfigRecord, train: set[int]
                       ) -> tuple[SharedNoiseConfig, set[int]]:
        """The round's shared-noise parameters for the nodes asked to train, and those of
        them that never reported their record count (they are left out of the round like a
        dropout: the ring is sized from the reported counts only)."""
        if self.shared_sigma is None or any(n not in self.partner_info for n in train):
            self._shared_info(config, session.round)
        if self.shared_sigma is None:
            raise EveryPartnerFailed(
                f"round {session.round}: shared noise: no sampled partner reported its number "
                "of records (every one failed or refused the app), so the run's noise cannot "
                "be set; nothing was trained")
        silent = {n for n in train if n not in self.partner_info}
        if silent:
            log(WARNING, "round %d: shared noise: %s did not report their records; left out "
                "of this round", session.round,
                ", ".join(self.name(n) for n in sorted(silent)))
        cfg, sc = self.fed.cfg, session.config
        try:
            return SharedNoiseConfig(
                clip=cfg.max_grad_norm, noise_multiplier=self.shared_sigma,
                num_clients=sc.num_clients, min_survivors=int(sc.min_survivors),
                colluders=cfg.dp_colluders,
                max_examples=max(1, sum(self.partner_info[n][0] for n in train - silent)),
                vector_length=self.vector_length, bits=sc.bits,
                sample_rate=self.shared_rate), silent
        except SecAggError as exc:
            raise ConfigError(f"example-dp-noise = 'shared': {exc}") from None

    # -- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # the sessions of rounds in flight are not saved: their secrets are not on the
        # server, and a resumed run sets up fresh keys (setup exchanges) for its next round
        return {"ddg_accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ddg_accountant" in state:
            self.accountant.load_state_dict(state["ddg_accountant"])
