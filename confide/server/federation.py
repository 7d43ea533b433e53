"""The server's round loop: sample, send, collect, aggregate, evaluate, record, checkpoint.

Runs inside the ServerApp (simulation and deployment alike). Every privacy-relevant fact
goes to the ledger as a mechanism event; metrics.jsonl and summary.json carry the epsilons
derived from those events.
"""

from __future__ import annotations

import ast
import json
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid

import confide
from confide import wire as W
from confide.config import RunConfig
from confide.data import TextDataset
from confide.model import (
    build_model,
    count_trainable,
    frozen_digest,
    load_trainable_state,
    resolve_device,
    trainable_state,
)
from confide.privacy import ledger_events as E
from confide.privacy.accountant import (
    ACCOUNTANT_NAMES,
    PLD,
    RDP,
    SampledGaussianEvent,
    rdp_epsilon,
)
from confide.privacy.crash_points import (  # noqa: F401  (re-exported for tests)
    CRASH_AFTER_ROUND_ENV,
    CRASH_RUN_DIR_ENV,
    crash_point,
)
from confide.privacy.ledger import Ledger, LedgerError
from confide.privacy.preflight import PreflightRefused, PreflightReport, refusal_message
from confide.privacy.preflight import check as preflight_check
from confide.privacy.receipts import Receipt, verify_receipt
from confide.privacy.refusals import refusal_mismatches, verify_refusal
from confide.privacy.secagg.shared_noise import delta_with_slack
from confide.server.recovery import (
    Aborted,
    EveryPartnerFailed,
    NoBudgetLeft,
    ResumeRefused,
    RunWriteError,
    StopRequest,
    check_resume,
    no_budget_message,
    write_failure,
)
from confide.server.run_folder import RunFolder
from confide.server.secure_round import SecureRounds, is_simulation
from confide.strategies.client_level_dp import ClientLevelDp
from confide.strategies.delta_fedavg import DeltaFedAvg, arrays_to_numpy
from confide.strategies.server_optimizer import ServerOptimizer
from confide.task import federated_data, model_spec
from confide.tasks import get_task
from confide.tasks.base import Evaluation

RoundCallback = Callable[[dict[str, Any]], None]
PreflightCallback = Callable[[PreflightReport], None]


@dataclass
class PartnerRecord:
    """What the server knows of a partner: its pseudonym and claimed cumulative epsilon."""

    pseudonym: str
    public_key: str
    epsilon: float = 0.0  # cumulative, as claimed (signed) by the partner
    epsilon_rdp: float = 0.0  # the RDP second opinion on the same events (server-computed)
    accountant: str = "pld"  # which analysis the partner's claims use
    # (noise multiplier, sample rate, steps) of each round it trained in, from its receipts
    mechanisms: list[list[float]] = field(default_factory=list)
    rounds_trained: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    # shared noise: total-variation slack of its releases (sum of the receipts' tv_slack)
    tv_slack: float = 0.0


def resolve_evaluation(cfg: RunConfig) -> tuple[TextDataset, int]:
    """Central evaluation data and the number of classes the run uses."""
    if not cfg.data or (not cfg.eval_data and Path(cfg.data).is_file()):
        # synthetic demo, or a single file whose held-out part is the evaluation set
        fed = federated_data(cfg)
        return fed.evaluation, fed.num_labels
    if not cfg.eval_data:
        raise ValueError("eval-data is required unless data is one file the server can read "
                         "(then 20% of it is held out for evaluation)")
    evaluation = get_task(cfg).read(cfg.eval_data, num_labels=cfg.num_labels,
                                    max_rows=cfg.max_eval_examples)
    labels = cfg.num_labels
    if not labels:
        labels = evaluation.num_labels
        if Path(cfg.data).exists():  # simulation: the server can see the whole split
            labels = max(labels, federated_data(cfg).num_labels)
    return evaluation, max(2, labels)


class Federation:
    """State of one run on the server side."""

    def __init__(self, grid: Grid, cfg: RunConfig, out_dir: Path,
                 on_round: RoundCallback | None = None, timeout: float = 3600.0,
                 on_preflight: PreflightCallback | None = None,
                 stop: StopRequest | None = None) -> None:
        self.grid = grid
        self.stop = stop  # checked between rounds (see run())
        evaluation, num_labels = resolve_evaluation(cfg)
        self.cfg = cfg.replace(num_labels=num_labels)
        self.folder = RunFolder(out_dir)
        self.on_round = on_round
        self.on_preflight = on_preflight  # a driver shows the report itself (else: logged)
        self.preflight: PreflightReport | None = None
        self.timeout = timeout
        self.evaluation = evaluation
        self.spec = model_spec(self.cfg, num_labels)
        self.model = build_model(self.spec)
        self.device = resolve_device(self.cfg.device)
        self.frozen_digest = frozen_digest(self.model)
        self.global_state = dict(trainable_state(self.model))
        # the task evaluates (accuracy/loss; perplexity and generation for causal-lm)
        self.evaluator = get_task(self.cfg).evaluator(evaluation)
        self.partners: dict[str, PartnerRecord] = {}
        self._node_partner: dict[int, str] = {}  # Flower node id -> partner, for logs
        self._reply_partner: dict[int, str] = {}  # this round's replies (plain path)
        self.client_dp_epsilon: float | None = None
        self.rounds_completed = 0
        self.last_metrics: dict[str, Any] = {}
        inner = DeltaFedAvg(fraction_train=self.cfg.fraction_train,
                            min_train_nodes=self.cfg.min_clients,
                            min_available_nodes=self.cfg.min_clients,
                            server_optimizer=ServerOptimizer(
                                self.cfg.server_optimizer,
                                learning_rate=self.cfg.server_learning_rate,
                                momentum=self.cfg.server_momentum,
                                beta2=self.cfg.server_beta2, tau=self.cfg.server_tau))
        self.inner = inner
        self.strategy: DeltaFedAvg | ClientLevelDp = inner
        if self.cfg.client_dp:
            self.strategy = ClientLevelDp(
                inner, noise_multiplier=self.cfg.client_dp_noise_multiplier,
                clipping_norm=self.cfg.client_dp_clipping_norm, population=self.cfg.clients,
                delta=self.cfg.delta, seed=self.cfg.seed)
        self.ledger: Ledger | None = None
        self.secure: SecureRounds | None = None  # built on first use (needs the grid's nodes)
        self._secure_state: dict[str, Any] = {}

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        if self.cfg.resume:
            check_resume(self.folder, self.cfg)  # refuse before anything else runs
            self.run_preflight(refuse=False)  # budget is already being spent: report only
            self.resume()
            return
        random.seed(self.cfg.seed)  # Flower's node sampling uses `random`
        if self.folder.ledger.exists():
            raise FileExistsError(f"{self.folder.root} already holds a run; use resume = true "
                                  "to continue it or choose another out folder")
        self.run_preflight()  # before the run folder and ledger exist: nothing is spent
        self.folder.create(self.cfg)
        self.ledger = Ledger.create(self.folder.ledger, self.folder.ledger_signing_key())
        self.ledger.append(E.RUN_STARTED, E.RunStarted(
            config=self.cfg.to_dict(), config_digest=self.cfg.digest(),
            code_version=confide.__version__,
            ledger_public_key=self.ledger.public_key_hex, delta=self.cfg.delta,
        ).to_payload())
        # round 0: a server that dies in round 1 (when partners may have spent budget
        # already) is resumable too, like one that dies in any later round
        self.folder.save_checkpoint(0, self.global_state, self.server_state(),
                                    self.inner.optimizer.state_dict()["arrays"])
        log(INFO, "Confide: %s, %d trainable parameters (%s), %d evaluation rows%s",
            self.cfg.model, count_trainable(self.model), self.cfg.fine_tune,
            len(self.evaluation), " [SYNTHETIC demo data]" if self.evaluation.synthetic else "")

    def run_preflight(self, *, refuse: bool = True) -> None:
        """Before round 1: noise vs the largest possible signal of the aggregated update
        (confide.privacy.preflight). Logged (WARNING when the run is weak or cannot learn);
        with preflight = 'error' a run that cannot learn is refused before any message is
        sent. Never changes a privacy setting."""
        if self.cfg.preflight == "off":
            return
        # partners' row counts: only the simulation's server can see the split
        rows = ([len(p) for p in federated_data(self.cfg).partitions]
                if is_simulation(self.grid) else None)
        report = preflight_check(self.cfg, count_trainable(self.model), rows)
        self.preflight = report
        if self.on_preflight is not None:
            self.on_preflight(report)
        else:
            log(WARNING if report.needs_attention else INFO, "%s", "\n".join(report.lines()))
        if refuse and report.cannot_learn and self.cfg.preflight == "error":
            raise PreflightRefused(refusal_message(report))

    def resume(self) -> None:
        """Continue from the last checkpointed round: same ledger chain (verified first),
        same weights, partner records, accountants and sampling state; metrics rows of an
        unfinished round are dropped (its ledger entries stay: the ledger is append-only and
        the audit knows a round may be re-run after run_resumed)."""
        # read-only checks first: a finished run, another configuration (keys named) or
        # weights that are not the ledger's model_digest refuse before anything is written
        round_, weights, state = check_resume(self.folder, self.cfg)
        if round_ == 0 and E.weights_digest(weights) != E.weights_digest(self.global_state):
            # no model_digest before round 1: the initial model is rebuilt from the config
            raise ResumeRefused(f"checkpoint {self.folder.checkpoint_dir / state['weights']} "
                                "is not the run's initial model (altered or replaced); "
                                "refusing to resume from it")
        try:  # the whole chain verifies before anything is written (a torn tail aside)
            self.ledger = Ledger.open(self.folder.ledger, self.folder.ledger_signing_key(),
                                      repair_torn_tail=True)
        except LedgerError as exc:
            raise ResumeRefused(f"cannot resume {self.folder.root}: {exc}. Nothing was "
                                "changed; `confide audit verify` names every problem") from None
        self.global_state = dict(weights)
        self.partners = {k: PartnerRecord(**v) for k, v in state["partners"].items()}
        self.client_dp_epsilon = state.get("client_dp_epsilon")
        if isinstance(self.strategy, ClientLevelDp) and "client_dp_accountant" in state:
            self.strategy.load_state_dict(state["client_dp_accountant"])
        if "server_optimizer" in state:  # same moments as before the crash
            self.inner.optimizer.load_state_dict({
                "meta": state["server_optimizer"],
                "arrays": self.folder.load_optimizer_arrays(state)})
        self._secure_state = state.get("secure_aggregation", {})
        random.setstate(ast.literal_eval(state["python_random"]))
        self.rounds_completed = round_
        self.folder.truncate_metrics(round_)
        rows = self.folder.read_metrics()
        self.last_metrics = rows[-1] if rows else {}
        self._account_unfinished_rounds(self.ledger.entries)
        self.ledger.append(E.RunResumed(from_round=round_))
        log(INFO, "Confide: resuming %s after round %d", self.folder.root, round_)

    def _account_unfinished_rounds(self, entries: list[dict[str, Any]]) -> None:
        """Budget spent in a round after the checkpoint (the run stopped before that round
        was complete) is in the ledger, not in the checkpoint: take every partner's
        mechanisms and latest claim from the ledger, so nothing is under-counted."""
        mechanisms: dict[str, list[list[float]]] = {}
        slack: dict[str, float] = {}
        for entry in entries:
            if entry.get("type") != E.EXAMPLE_DP:
                continue
            event = E.ExampleDpEvent.from_payload(entry["payload"])
            mechanisms.setdefault(event.partner, []).append(
                [event.noise_multiplier, event.sample_rate, event.steps])
            slack[event.partner] = slack.get(event.partner, 0.0) + (event.tv_slack or 0.0)
            partner = self.partners.get(event.partner)
            if partner is None and event.receipt is not None:
                partner = self.partners[event.partner] = PartnerRecord(
                    event.partner, str(event.receipt.get("public_key", "")))
            if partner is not None:
                partner.epsilon = event.epsilon_claimed
                partner.accountant = event.accountant
                partner.tv_slack = slack[event.partner]
        for pseudonym, mechs in mechanisms.items():
            if pseudonym in self.partners and mechs != self.partners[pseudonym].mechanisms:
                partner = self.partners[pseudonym]
                partner.mechanisms = mechs
                partner.epsilon_rdp = rdp_epsilon(
                    [SampledGaussianEvent(s, q, int(k)) for s, q, k in mechs], self.cfg.delta)

    def run(self) -> dict[str, Any]:
        self.start()
        try:
            for server_round in range(self.rounds_completed + 1, self.cfg.rounds + 1):
                if self.stop:  # safe point: the last round is complete and checkpointed
                    return self.interrupt()
                self.run_round(server_round)
            return self.finish()
        except (Aborted, NoBudgetLeft, EveryPartnerFailed):
            # the driver failed (leave mid-round; resumable from the checkpoint), or round 1
            # showed the run cannot train: the ledger as it stands is the record of why
            if self.ledger is not None:
                self.ledger.close()
            raise
        except OSError as exc:  # disk full, permissions: a message, and resumable
            if self.ledger is not None:
                self.ledger.close()
            raise write_failure(self.folder, exc) from exc

    def interrupt(self) -> dict[str, Any]:
        """Stop after the last checkpointed round: record why in the ledger and leave the
        run folder resumable (no summary.json, no run_finished)."""
        assert self.ledger is not None and self.stop is not None
        self.ledger.append(E.RunInterrupted(after_round=self.rounds_completed,
                                            reason=self.stop.reason or "stop requested"))
        self.ledger.close()
        log(WARNING, "Confide: run stopped (%s) after round %d; %s is resumable",
            self.stop.reason, self.rounds_completed, self.folder.root)
        return {"rounds_completed": self.rounds_completed, "interrupted": True}

    # -- one round -------------------------------------------------------------------
    def run_round(self, server_round: int) -> dict[str, Any]:
        assert self.ledger is not None
        t0 = time.perf_counter()
        crash_point("before-sampling", server_round, run_dir=self.folder.root)
        config = ConfigRecord({**self.cfg.to_dict(), W.FROZEN_DIGEST: self.frozen_digest,
                               W.RUN_KEY: self.ledger.public_key_hex})
        extra: dict[str, Any] = {}
        if self.cfg.secure_aggregation:
            # secure path: the server only ever sees the (noised) sum of the survivors
            sampled, aggregated, uploaded, extra = self._secure_rounds().run_round(
                server_round, config)
        else:
            messages = list(self.strategy.configure_train(
                server_round, W.to_array_record(self.global_state), config, self.grid))
            sampled = [m.metadata.dst_node_id for m in messages]
            self.ledger.append(E.ROUND_CONFIGURED, E.RoundConfigured(
                round=server_round, sampled=[str(n) for n in sampled]).to_payload())
            replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
            crash_point("after-replies", server_round, run_dir=self.folder.root)
            trained, uploaded = self._sort_replies(server_round, replies, set(sampled))
            self.check_budget_left(server_round, trained)
            self.check_any_trained(server_round, trained, len(sampled))
            arrays, _ = self.strategy.aggregate_train(server_round, trained)
            crash_point("mid-aggregation", server_round, run_dir=self.folder.root)
            rejected = {node for node, _ in self.inner.rejected}
            aggregated = []
            if arrays is not None:
                self.global_state = arrays_to_numpy(arrays)
                aggregated = [self._reply_partner[m.metadata.src_node_id] for m in trained
                              if m.metadata.src_node_id not in rejected]
            self._record_client_dp(server_round)
        if not aggregated:
            log(WARNING, "round %d: no update could be aggregated; global model unchanged",
                server_round)
        evaluation = self.evaluate(server_round)
        accuracy, loss = evaluation.metrics["accuracy"], evaluation.metrics["loss"]
        if evaluation.examples:
            self.folder.append_examples(evaluation.examples)
        digest = E.weights_digest(self.global_state)
        self.ledger.append(E.MODEL_DIGEST, E.ModelDigest(round=server_round,
                                                         sha256=digest).to_payload())
        row = {
            "round": server_round, "num_clients_sampled": len(sampled),
            "num_clients_aggregated": len(aggregated), "accuracy": accuracy, "loss": loss,
            "epsilon_example_level": {p.pseudonym: p.epsilon for p in self.partners.values()},
            "epsilon_example_level_rdp": {p.pseudonym: p.epsilon_rdp
                                          for p in self.partners.values()},
            "epsilon_client_level": self.client_dp_epsilon, "bytes_uploaded": uploaded,
            "seconds": time.perf_counter() - t0,
            **{k: v for k, v in evaluation.metrics.items() if k not in ("accuracy", "loss")},
            "refused": [p.pseudonym for p in self.partners.values()
                        if server_round in p.refused],
            **extra,
        }
        self.ledger.append(E.RoundCompleted(
            round=server_round, replied=sorted(self._reply_partner.values()),
            aggregated=sorted(aggregated), dropped=sorted(self._dropped),
            accuracy=accuracy, loss=loss))
        self.folder.append_metrics(row)
        self.rounds_completed = server_round
        self.last_metrics = row
        self.folder.save_checkpoint(server_round, self.global_state, self.server_state(),
                                    self.inner.optimizer.state_dict()["arrays"])
        log(INFO, "%s", round_line(row, self.cfg.rounds))
        if self.on_round:
            self.on_round(row)
        crash_point("after-round", server_round, run_dir=self.folder.root)
        return row

    def _secure_rounds(self) -> SecureRounds:
        if self.secure is None:
            self.secure = SecureRounds(self)
            if self._secure_state:
                self.secure.load_state_dict(self._secure_state)
        return self.secure

    def _sort_replies(self, server_round: int, replies: Iterable[Message],
                      expected: set[int] | None = None) -> tuple[list[Message], int]:
        """Keep replies that trained; log and record refusals and failures.

        A reply from a node that was not sent this round's message, or a second reply
        from the same node or partner (a duplicate or a replay), is dropped: it would
        otherwise count one partner's update twice."""
        assert self.ledger is not None
        trained: list[Message] = []
        uploaded = 0
        self._reply_partner = {}
        self._dropped: list[str] = []
        self._refusals: list[tuple[str, float, float, float]] = []
        self._failures: list[str] = []  # why sampled nodes failed (errors, not refusals)
        for reply in replies:
            node = reply.metadata.src_node_id
            if expected is not None and node not in expected:
                log(WARNING, "round %d: reply from node %s, which was not sampled; dropped",
                    server_round, node)
                continue
            if node in self._reply_partner:
                log(WARNING, "round %d: second reply from node %s; dropped", server_round, node)
                continue
            if reply.has_error():
                log(WARNING, "round %d: %s failed: %s", server_round, self._node_name(node),
                    reply.error.reason)
                self._dropped.append(f"node-{node}")
                self._failures.append(str(reply.error.reason))
                continue
            status = reply.content.config_records.get(W.STATUS)
            if status is None:
                log(WARNING, "round %d: node %s replied without status", server_round, node)
                self._dropped.append(f"node-{node}")
                continue
            partner = self._partner(status)
            if partner.pseudonym in self._reply_partner.values():
                log(WARNING, "round %d: second reply from partner %s (node %s); dropped",
                    server_round, partner.pseudonym, node)
                continue
            self._reply_partner[node] = partner.pseudonym
            self._node_partner[node] = partner.pseudonym
            code = str(status[W.STATUS_CODE])
            if code == W.BUDGET_EXHAUSTED:
                refusal = self._refusal(server_round, partner, reply, status)
                if refusal is None:
                    del self._reply_partner[node]
                    self._dropped.append(partner.pseudonym)
                    continue
                partner.refused.append(server_round)
                self._refusals.append((partner.pseudonym, float(status["spent"]),
                                       float(status["would_be"]),
                                       float(status["max_epsilon"])))
                log(WARNING, "round %d: partner %s refused: %s", server_round,
                    partner.pseudonym, status[W.STATUS_DETAIL])
                self.ledger.append(refusal)
                continue
            if code != W.OK:
                log(WARNING, "round %d: partner %s: %s (%s)", server_round, partner.pseudonym,
                    code, status[W.STATUS_DETAIL])
                self._failures.append(code + ": " + str(status[W.STATUS_DETAIL]))
                continue
            if W.ARRAYS in reply.content.array_records:
                uploaded += sum(a.numpy().nbytes for a in reply.content[W.ARRAYS].values())
            if self.cfg.example_dp and not self._record_example_dp(server_round, partner,
                                                                   reply):
                continue
            partner.rounds_trained.append(server_round)
            trained.append(reply)
        return trained, uploaded

    def _node_name(self, node: int) -> str:
        """`partner p-... (node N)` once the node has answered with its partner id in this
        run (a node that fails later is still named by partner), else `node N`."""
        partner = self._node_partner.get(node)
        return f"partner {partner} (node {node})" if partner else f"node {node}"

    def check_budget_left(self, server_round: int, trained: list[Message]) -> None:
        """The first round of a run in which every partner that answered refused for budget
        (a lifetime budget spent by earlier runs): later rounds would be refused the same
        way, so the run stops now with the partners' remaining budgets, instead of going
        through every round and finishing with nothing aggregated. The ledger ends inside
        round 1 with the partners' signed refusals (their lifetime spend): the record of
        why nothing was trained, and it verifies."""
        if self.rounds_completed or trained or not self._refusals \
                or len(self._refusals) < len(self._reply_partner):
            return
        raise NoBudgetLeft(
            no_budget_message(server_round, self._refusals, self.cfg.target_epsilon))

    def check_any_trained(self, server_round: int, trained: list[Message], sampled: int
                          ) -> None:
        """The run's first round, in which every sampled node failed with an error (seen: a
        model the configured DP clipping cannot handle): every later round would fail alike,
        so the run stops here naming the errors, instead of going through every round and
        finishing "completed" with nothing aggregated."""
        if self.rounds_completed or trained or self._refusals or not self._failures \
                or len(self._failures) < sampled:
            return
        reasons = sorted(set(self._failures), key=self._failures.index)
        # the last line of each (a traceback's is the error itself)
        shown = "; ".join((r.strip().splitlines() or [""])[-1][:400] for r in reasons[:3])
        raise EveryPartnerFailed(
            f"round {server_round}: every sampled partner failed ({len(self._failures)} of "
            f"{sampled}), nothing was trained or aggregated; the run stops here. "
            f"{'Error' if len(reasons) == 1 else 'Errors'}: {shown}")

    def _partner(self, status: ConfigRecord) -> PartnerRecord:
        pseudonym = str(status[W.PARTNER])
        if pseudonym not in self.partners:
            self.partners[pseudonym] = PartnerRecord(pseudonym, str(status[W.PUBLIC_KEY]))
        return self.partners[pseudonym]

    def _refusal(self, server_round: int, partner: PartnerRecord, reply: Message,
                 status: ConfigRecord) -> E.BudgetRefusal | None:
        """The budget_refusal entry: the partner's signed numbers (its lifetime spend) with
        the signed refusal attached; None (not recorded) when the signature does not hold.
        Nodes of earlier versions send no signed refusal: recorded as before."""
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
            if bad or signed.payload.get("run") != self.ledger.public_key_hex:
                raise ValueError("; ".join(bad) or "refusal is for another run")
        except (KeyError, ValueError) as exc:
            log(WARNING, "round %d: partner %s: invalid signed refusal (%s); counted as "
                "dropped", server_round, partner.pseudonym, exc)
            return None
        return event

    def _record_example_dp(self, server_round: int, partner: PartnerRecord,
                           reply: Message) -> bool:
        """Store the partner-signed DP event; an update without a valid receipt is dropped
        (its privacy spend could not be audited)."""
        assert self.ledger is not None
        try:
            receipt = self._checked_receipt(str(reply.content[W.RECEIPT][W.RECEIPT_JSON]),
                                            server_round, partner)
        except (KeyError, ValueError, json.JSONDecodeError) as exc:
            log(WARNING, "round %d: partner %s: invalid DP receipt (%s); update dropped",
                server_round, partner.pseudonym, exc)
            return False
        self._record_lost_attempts(server_round, partner, reply)
        self._append_receipt(partner, receipt)
        return True

    def _checked_receipt(self, text: str, server_round: int, partner: PartnerRecord
                         ) -> Receipt:
        """The partner's signed receipt for this round, or ValueError/KeyError saying why not."""
        receipt = Receipt.from_dict(json.loads(text))
        verify_receipt(receipt)
        if receipt.public_key_hex != partner.public_key:
            raise ValueError("receipt signed by another key than the partner's")
        claim = receipt.payload
        if int(claim["round"]) != server_round or claim["partner"] != partner.pseudonym:
            raise ValueError("receipt is for another round or partner")
        return receipt

    def _append_receipt(self, partner: PartnerRecord, receipt: Receipt) -> None:
        assert self.ledger is not None
        partner.epsilon = float(receipt.payload["epsilon"])
        event = E.ExampleDpEvent.from_receipt(receipt)
        partner.accountant = event.accountant
        partner.tv_slack += event.tv_slack or 0.0
        partner.mechanisms.append([event.noise_multiplier, event.sample_rate, event.steps])
        partner.epsilon_rdp = rdp_epsilon(
            [SampledGaussianEvent(s, q, int(k)) for s, q, k in partner.mechanisms], event.delta)
        self.ledger.append(event)

    def _record_lost_attempts(self, server_round: int, partner: PartnerRecord,
                              reply: Message) -> None:
        """Receipts the partner signed in earlier attempts of this round that the ledger
        does not hold (the server died after the node trained, before or while recording
        its reply): that budget was spent, and each such release is recorded now, before
        the new receipt (whose claim composes them), so nothing is under-counted and the
        audit's replay matches every claim. One that does not verify is logged and left
        out (the new receipt's claim then fails the audit: the record is incomplete)."""
        assert self.ledger is not None
        earlier = reply.content[W.RECEIPT].get(W.RECEIPT_EARLIER)
        if not earlier:
            return
        recorded = {str((e["payload"].get("receipt") or {}).get("signature"))
                    for e in self.ledger.entries if e["type"] == E.EXAMPLE_DP}
        for text in json.loads(str(earlier)):
            try:
                receipt = self._checked_receipt(str(text), server_round, partner)
            except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
                log(WARNING, "round %d: partner %s: invalid receipt of an earlier attempt "
                    "(%s); not recorded", server_round, partner.pseudonym, exc)
                continue
            if receipt.signature_hex in recorded:
                continue
            log(WARNING, "round %d: partner %s trained in an earlier attempt of this round "
                "whose reply was lost; its spend is recorded now", server_round,
                partner.pseudonym)
            self._append_receipt(partner, receipt)
            recorded.add(receipt.signature_hex)

    def _record_client_dp(self, server_round: int) -> None:
        assert self.ledger is not None
        if not isinstance(self.strategy, ClientLevelDp) or self.strategy.last_event is None:
            return
        self.client_dp_epsilon = self.strategy.epsilon()
        ev = self.strategy.last_event
        self.ledger.append(E.CLIENT_DP, E.ClientDpEvent(
            round=server_round, mechanism=str(ev["mechanism"]),
            noise_multiplier=float(ev["noise_multiplier"]),
            clipping_norm=float(ev["clipping_norm"]), population=int(ev["population"]),
            sampled=int(ev["sampled"]), delta=self.cfg.delta,
            epsilon_claimed=self.client_dp_epsilon,
            params={"sample_rate": float(ev["sample_rate"]),
                    "accountant": str(ev["accountant"])}).to_payload())

    # -- evaluation ------------------------------------------------------------------
    def evaluate(self, server_round: int = 0) -> Evaluation:
        load_trainable_state(self.model, self.global_state)
        return self.evaluator(self.model, self.device, round_=server_round,
                              final=server_round == self.cfg.rounds)

    # -- end -------------------------------------------------------------------------
    def server_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "partners": {k: vars(v) for k, v in self.partners.items()},
            "client_dp_epsilon": self.client_dp_epsilon,
            "config_digest": self.cfg.digest(),
            "python_random": repr(random.getstate()),
        }
        if isinstance(self.strategy, ClientLevelDp):
            state["client_dp_accountant"] = self.strategy.state_dict()
        state["server_optimizer"] = self.inner.optimizer.state_dict()["meta"]
        if self.secure is not None:
            state["secure_aggregation"] = self.secure.state_dict()
        return state

    def summary(self) -> dict[str, Any]:
        return {
            "rounds_completed": self.rounds_completed,
            "final_metrics": {"accuracy": self.last_metrics.get("accuracy"),
                              "loss": self.last_metrics.get("loss"),
                              **self._latest_task_metrics()},
            "privacy": {
                "delta": self.cfg.delta,
                "example_level": {p.pseudonym: p.epsilon for p in self.partners.values()},
                # The same events read by RDP: a looser second opinion, never the claim.
                "example_level_rdp": {p.pseudonym: p.epsilon_rdp
                                      for p in self.partners.values()},
                "client_level_epsilon": self.client_dp_epsilon,
                # the run's budget, and whether every partner's claim stayed within it
                # the plain (epsilon, delta')-DP statement where the noise is shared inside
                # secure aggregation: delta + (1 + e^epsilon) x the recorded TV slack
                "example_level_delta_with_slack": {
                    p.pseudonym: delta_with_slack(self.cfg.delta, p.epsilon, p.tv_slack)
                    for p in self.partners.values() if p.tv_slack > 0},
                "max_epsilon": self.cfg.max_epsilon,
                "within_max_epsilon": all(p.epsilon <= self.cfg.max_epsilon
                                          for p in self.partners.values()),
                "accountant": self._accountant_summary(),
                "accountants": {
                    "example_level": sorted({p.accountant for p in self.partners.values()})
                    or ([PLD] if self.cfg.example_dp else []),
                    "example_level_second_opinion": RDP,
                    "client_level": (RDP if self.cfg.distributed_dp else PLD)
                    if self.cfg.client_dp or self.cfg.distributed_dp else None,
                },
                "adjacency": "add/remove one record (example level); add/remove one "
                             "client (client level)",
            },
            # every partner, one row each (the console summarises above 20 partners)
            "partners": [{"partner": p.pseudonym, "epsilon": p.epsilon,
                          "epsilon_rdp": p.epsilon_rdp, "accountant": p.accountant,
                          "rounds_trained": sorted(p.rounds_trained),
                          "refused_rounds": sorted(p.refused)}
                         for p in sorted(self.partners.values(), key=lambda p: p.pseudonym)],
            "secure_aggregation": self.cfg.secure_aggregation,
            "distributed_dp": self.cfg.distributed_dp,
            "synthetic_data": self.evaluation.synthetic,
            "bytes_uploaded_total": sum(r["bytes_uploaded"] for r in self.folder.read_metrics()),
            "trainable_parameters": int(sum(v.size for v in self.global_state.values())),
            "preflight": self.preflight.to_json() if self.preflight else None,
        }

    def _latest_task_metrics(self) -> dict[str, Any]:
        """A task's own metrics (e.g. perplexity, bleu, rouge_l), latest value of each:
        generation metrics are not computed every round."""
        latest: dict[str, Any] = {}
        for row in self.folder.read_metrics():
            for key in getattr(self.evaluator, "metric_names", ()):
                if row.get(key) is not None:
                    latest[key] = row[key]
        return latest

    def _accountant_summary(self) -> str:
        kinds = sorted({p.accountant for p in self.partners.values()}) or [PLD]
        text = "example level, per partner: " + "; ".join(ACCOUNTANT_NAMES.get(k, k)
                                                        for k in kinds)
        text += "; RDP (integer orders) as second opinion"
        if self.cfg.distributed_dp:
            text += ("; client level: RDP of the distributed discrete Gaussian "
                     "(Kairouz-Liu-Steinke 2021; no tight accountant covers sums of "
                     "discrete Gaussians)")
        elif self.cfg.client_dp:
            text += "; client level: PLD of the composed Gaussian releases (tight)"
        return text

    def finish(self) -> dict[str, Any]:
        assert self.ledger is not None
        self.folder.save_model(self.global_state, self.cfg,
                               {"frozen-digest": self.frozen_digest,
                                "weights-digest": E.weights_digest(self.global_state)})
        summary = self.summary()
        self.folder.write_summary(summary)
        self.ledger.append(E.RUN_FINISHED, E.RunFinished(
            rounds_completed=self.rounds_completed).to_payload())
        self.ledger.close()
        try:
            from confide.audit.report import write_report

            write_report(self.folder.root)
        except OSError as exc:  # the run is complete and verifies; only the report is not
            raise RunWriteError(
                f"the run finished ({self.rounds_completed} rounds: ledger, summary.json and "
                f"model/ are written), but its report could not be: {exc}. After freeing "
                f"space: confide audit report {self.folder.root}") from exc
        except Exception as exc:  # the run's results stand even if plotting fails
            log(WARNING, "report.html could not be written: %s", exc)
        return summary


def round_line(row: dict[str, Any], rounds: int) -> str:
    """One line per finished round for the run's log (a deployed run's streamed log)."""
    eps = row.get("epsilon_example_level") or {}
    def num(v: Any) -> str:
        return "n/a" if v is None else f"{float(v):.4f}"

    text = (f"Confide round {row['round']}/{rounds}: accuracy {num(row.get('accuracy'))}, "
            f"loss {num(row.get('loss'))}, aggregated {row['num_clients_aggregated']}"
            f"/{row['num_clients_sampled']}")
    if eps:
        text += (f", example-level epsilon max {max(eps.values()):.3f} ("
                 + ", ".join(f"{p} {e:.3f}" for p, e in sorted(eps.items())) + ")")
    if row.get("epsilon_client_level") is not None:
        text += f", client-level epsilon {row['epsilon_client_level']:.3f}"
    if row.get("refused"):
        text += f", refused (budget): {', '.join(row['refused'])}"
    return text


def np_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    return arrays_to_numpy(record)
