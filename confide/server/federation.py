"""The server's round loop: sample, send, collect, aggregate, evaluate, record, checkpoint.

Runs inside the ServerApp (simulation and deployment alike). Every privacy-relevant fact
goes to the ledger as a mechanism event; metrics.jsonl and summary.json carry the epsilons
derived from those events.
"""

from __future__ import annotations

import ast
import random
import time
from collections.abc import Callable, Mapping, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

import confide
from confide import wire as W
from confide.config import RunConfig
from confide.data import TextDataset
from confide.model import (
    HEAD_MARKER,
    count_trainable,
    frozen_digest,
    load_trainable_state,
    resolve_device,
    trainable_state,
)
from confide.modes import ClientLevel
from confide.privacy import ledger_events as E
from confide.privacy.accountant import (
    ACCOUNTANT_NAMES,
    PLD,
    RDP,
)
from confide.privacy.ledger import Ledger, LedgerError
from confide.privacy.mode_rules import rules_of
from confide.privacy.preflight import PreflightRefused, PreflightReport, refusal_message
from confide.privacy.preflight import check as preflight_check
from confide.privacy.secagg.shared_noise import delta_with_slack
from confide.server.aggregation import RoundAggregation
from confide.server.exchange import RoundProgress, exchange, is_simulation
from confide.server.faults import crash_point, ledger_crash_point
from confide.server.partners import PartnerBook
from confide.server.plain_round import PlainRounds
from confide.server.recovery import (
    Aborted,
    EveryPartnerFailed,
    NoBudgetLeft,
    ResumeRefused,
    StopRequest,
    check_resume,
    complete_recorded_round,
    round_record,
    write_failure,
)
from confide.server.run_folder import RunFolder
from confide.server.secure_round import SecureRounds
from confide.strategies.client_level_dp import ClientLevelDp
from confide.strategies.delta_fedavg import DeltaFedAvg
from confide.strategies.server_optimizer import ServerOptimizer
from confide.tasks import build_model, get_task
from confide.tasks.base import Evaluation
from confide.tasks.inputs import federated_data, model_spec

RoundCallback = Callable[[dict[str, Any]], None]
PreflightCallback = Callable[[PreflightReport], None]


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
    """State of one run on the server side. It sequences rounds, checkpoints and records;
    each round's exchanges and aggregation are `self.aggregation`'s (plain_round.py or
    secure_round.py), which returns a `RoundOutcome`.

    Build one with `Federation.create` (a new run) or `Federation.resume` (continue the run
    in `out_dir` from its last checkpoint); `Federation.open` picks by `cfg.resume`."""

    def __init__(self, grid: Grid, cfg: RunConfig, out_dir: Path,
                 on_round: RoundCallback | None = None, timeout: float = 3600.0,
                 on_preflight: PreflightCallback | None = None,
                 stop: StopRequest | None = None) -> None:
        """The run's model, evaluation and aggregation, nothing written yet: use `create`
        or `resume`."""
        self.grid = grid
        self.stop = stop  # checked between rounds (see run())
        evaluation, num_labels = resolve_evaluation(cfg)
        self.cfg = cfg.replace(num_labels=num_labels)
        self.folder = RunFolder(out_dir)
        self.on_round = on_round
        self.on_preflight = on_preflight  # a driver shows the report itself (else: logged)
        self.preflight: PreflightReport | None = None
        self.timeout = timeout
        self.simulation = is_simulation(grid)
        self.progress = RoundProgress()  # the round in flight, for the progress line
        self.evaluation = evaluation
        self.spec = model_spec(self.cfg, num_labels)
        self.model = build_model(self.spec)
        self.device = resolve_device(self.cfg.device)
        self.frozen_digest = frozen_digest(self.model)
        self.global_state = dict(trainable_state(self.model))
        # the task evaluates (accuracy/loss; perplexity and generation for causal-lm)
        self.evaluator = get_task(self.cfg).evaluator(evaluation)
        self.book = PartnerBook(self.cfg)
        # resumed: nodes may hold receipts of the lost attempt that no later round asks for
        self.resumed = False
        self.client_dp_epsilon: float | None = None
        self.rounds_completed = 0
        self.last_metrics: dict[str, Any] = {}
        self.inner = DeltaFedAvg(fraction_train=self.cfg.fraction_train,
                                 min_train_nodes=self.cfg.min_clients,
                                 min_available_nodes=self.cfg.min_clients,
                                 server_optimizer=ServerOptimizer(
                                     self.cfg.server_optimizer,
                                     learning_rate=self.cfg.server_learning_rate,
                                     momentum=self.cfg.server_momentum,
                                     beta2=self.cfg.server_beta2, tau=self.cfg.server_tau,
                                     schedule=self.cfg.server_lr_schedule,
                                     schedule_steps=self.cfg.rounds,
                                     bias_correction=self.cfg.server_bias_correction,
                                     name_learning_rates=(
                                         ((HEAD_MARKER, self.cfg.server_head_learning_rate),)
                                         if self.cfg.server_head_learning_rate else ())))
        self.ledger: Ledger | None = None
        self.aggregation: RoundAggregation
        mode = self.cfg.privacy_mode
        if mode.secure:
            # the server only ever sees the (noised) sum of the survivors' updates
            self.aggregation = SecureRounds(self)
        elif mode.client is ClientLevel.CENTRAL:
            self.aggregation = PlainRounds(self, ClientLevelDp(
                self.inner, noise_multiplier=self.cfg.client_dp_noise_multiplier,
                clipping_norm=self.cfg.client_dp_clipping_norm, population=self.cfg.clients,
                delta=self.cfg.delta))
        else:
            self.aggregation = PlainRounds(self, self.inner)

    # -- lifecycle -------------------------------------------------------------------
    @classmethod
    def create(cls, grid: Grid, cfg: RunConfig, out_dir: Path, **options: Any) -> Federation:
        """A new run: the pre-flight check (with preflight = 'error', a run that cannot
        learn is refused before anything is written), then the run folder, a new ledger
        and the round-0 checkpoint. `options`: those of the constructor."""
        fed = cls(grid, cfg, out_dir, **options)
        if fed.folder.ledger.exists():
            raise FileExistsError(f"{fed.folder.root} already holds a run; use resume = true "
                                  "to continue it or choose another out folder")
        random.seed(fed.cfg.seed)  # Flower's node sampling uses `random`
        fed.run_preflight()  # before the run folder and ledger exist: nothing is spent
        fed.folder.create(fed.cfg)
        fed.ledger = Ledger.create(fed.folder.ledger, fed.folder.ledger_signing_key())
        fed.ledger.before_write = ledger_crash_point(fed.folder.root)
        fed.record(E.RunStarted(
            config=fed.cfg.to_dict(), config_digest=fed.cfg.digest(),
            code_version=confide.__version__,
            ledger_public_key=fed.ledger.public_key_hex, delta=fed.cfg.delta))
        # round 0: a server that dies in round 1 (when partners may have spent budget
        # already) is resumable too, like one that dies in any later round
        fed.save_checkpoint()
        log(INFO, "Confide: %s, %d trainable parameters (%s), %d evaluation rows%s",
            fed.cfg.model, count_trainable(fed.model), fed.cfg.fine_tune,
            len(fed.evaluation), " [SYNTHETIC demo data]" if fed.evaluation.synthetic else "")
        return fed

    @classmethod
    def resume(cls, grid: Grid, cfg: RunConfig, out_dir: Path, **options: Any
               ) -> Federation:
        """Continue the run in `out_dir` from its last checkpointed round: same ledger chain
        (verified first), same weights, partner records, accountants and sampling state;
        metrics rows of an unfinished round are dropped (its ledger entries stay: the
        ledger is append-only and the audit knows a round may be re-run after
        run_resumed). A finished run, another configuration (keys named) or weights that
        are not the ledger's model_digest are refused before anything is written."""
        fed = cls(grid, cfg, out_dir, **options)
        check_resume(fed.folder, fed.cfg)  # refuse before anything else runs
        fed.run_preflight(refuse=False)  # budget is already being spent: report only
        fed._load_checkpoint()
        return fed

    @classmethod
    def open(cls, grid: Grid, cfg: RunConfig, out_dir: Path, **options: Any) -> Federation:
        """`resume` when the configuration says resume = true, else `create`."""
        return (cls.resume if cfg.resume else cls.create)(grid, cfg, out_dir, **options)

    def run_preflight(self, *, refuse: bool = True,
                      partition_rows: Sequence[int] | None = None) -> None:
        """Before round 1: noise vs the largest possible signal of the aggregated update
        (confide.privacy.preflight). Logged (WARNING when the run is weak or cannot learn);
        with preflight = 'error' a run that cannot learn is refused before any message is
        sent (deployed shared noise: before any training message). Never changes a privacy
        setting. `partition_rows`: the partners' row counts where the caller has them."""
        if self.cfg.preflight == "off":
            return
        rows = partition_rows
        if rows is None and self.simulation:  # the simulation's server sees the split
            rows = [len(p) for p in federated_data(self.cfg).partitions]
        if rows is None and self.cfg.privacy_mode.shared_noise:
            # a deployed server learns every partner's rows in the size exchange before round
            # 1, and SecureRounds runs the check then (the estimate needs them all)
            log(INFO, "pre-flight: shared noise: checked once the partners report their "
                "record counts, before round 1")
            return
        report = preflight_check(self.cfg, count_trainable(self.model), rows)
        self.preflight = report
        if self.on_preflight is not None:
            self.on_preflight(report)
        else:
            log(WARNING if report.needs_attention else INFO, "%s", "\n".join(report.lines()))
        if refuse and report.cannot_learn and self.cfg.preflight == "error":
            raise PreflightRefused(refusal_message(report))

    def partner_rows_known(self, rows: list[int]) -> None:
        """The deployed shared-noise pre-flight, once the size exchange gave every partner's
        rows (before any training message: a new run that cannot learn can still be refused
        with preflight = 'error' and nothing spent; a resumed run is only reported on)."""
        if self.preflight is None:
            self.run_preflight(refuse=not self.resumed, partition_rows=rows)

    # -- what the round's aggregation asks of its host (aggregation.RoundHost) ---------
    def record(self, event: E.LedgerEvent) -> int:
        """Append `event` to the run's ledger (the only writer); returns its entry index."""
        if self.ledger is None:
            raise RuntimeError("the run has no ledger yet: build it with Federation.create, "
                               "Federation.resume or Federation.open")
        return int(self.ledger.append(event)["index"])

    @property
    def run_key(self) -> str:
        assert self.ledger is not None
        return self.ledger.public_key_hex

    def entry_hash_at(self, index: int) -> str | None:
        assert self.ledger is not None
        return self.ledger.entry_hash_at(index)

    @property
    def run_dir(self) -> Path:
        return self.folder.root

    @property
    def first_round(self) -> bool:
        return self.rounds_completed == 0

    def server_step(self, mean_delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.inner.step(self.global_state, mean_delta)

    def exchange(self, messages: list[Message], what: str) -> list[Message]:
        # deployed: the operator's console shows the round's progress while it waits
        return exchange(self.grid, messages, timeout=self.timeout, what=what,
                        progress=None if self.simulation else self.progress)

    def _load_checkpoint(self) -> None:
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
            self.ledger.before_write = ledger_crash_point(self.folder.root)
        except LedgerError as exc:
            raise ResumeRefused(f"cannot resume {self.folder.root}: {exc}. Nothing was "
                                "changed; `confide audit verify` names every problem") from None
        self.global_state = dict(weights)
        self.book.load_state_dict(state["partners"])
        self.client_dp_epsilon = state.get("client_dp_epsilon")
        self.aggregation.load_state_dict(aggregation_state(state))
        if "server_optimizer" in state:  # same moments as before the crash
            self.inner.optimizer.load_state_dict({
                "meta": state["server_optimizer"],
                "arrays": self.folder.load_optimizer_arrays(state)})
        random.setstate(ast.literal_eval(state["python_random"]))
        self.rounds_completed = round_
        self.folder.truncate_metrics(round_)
        for recorded in complete_recorded_round(self.folder, self, self.ledger.entries, round_,
                                                state):
            log(INFO, "Confide: resume recorded %s", recorded)
        rows = self.folder.read_metrics()
        self.last_metrics = rows[-1] if rows else {}
        self.book.account_unfinished_rounds(self.ledger.entries)
        self.resumed = True
        self.record(E.RunResumed(from_round=round_))
        log(INFO, "Confide: resuming %s after round %d", self.folder.root, round_)

    def run(self) -> dict[str, Any]:
        """Every round left, then the run's end (`finish`); a stop request ends it after
        the last complete round instead (`interrupt`)."""
        if self.ledger is None:
            raise RuntimeError("Federation.run needs a started run: build it with "
                               "Federation.create, Federation.resume or Federation.open")
        try:
            for server_round in range(self.rounds_completed + 1, self.cfg.rounds + 1):
                if self.stop:  # safe point: the last round is complete and checkpointed
                    return self.interrupt()
                self.run_round(server_round)
            return self.finish()
        except (Aborted, NoBudgetLeft, EveryPartnerFailed, PreflightRefused):
            # the driver failed (leave mid-round; resumable from the checkpoint), or round 1
            # showed the run cannot train (or, deployed shared noise, cannot learn): the
            # ledger as it stands is the record of why
            self.ledger.close()
            raise
        except OSError as exc:  # disk full, permissions: a message, and resumable
            self.ledger.close()
            raise write_failure(self.folder, exc) from exc

    def interrupt(self) -> dict[str, Any]:
        """Stop after the last checkpointed round: record why in the ledger and leave the
        run folder resumable (no summary.json, no run_finished)."""
        assert self.ledger is not None and self.stop is not None
        self.record(E.RunInterrupted(after_round=self.rounds_completed,
                                     reason=self.stop.reason or "stop requested"))
        self.ledger.close()
        log(WARNING, "Confide: run stopped (%s) after round %d; %s is resumable",
            self.stop.reason, self.rounds_completed, self.folder.root)
        return {"rounds_completed": self.rounds_completed, "interrupted": True}

    # -- one round -------------------------------------------------------------------
    def run_round(self, server_round: int) -> dict[str, Any]:
        assert self.ledger is not None
        t0 = time.perf_counter()
        self.progress.start(server_round)
        crash_point("before-sampling", server_round, run_dir=self.folder.root)
        # the ledger's head as the round starts: each partner that takes part countersigns it
        head_index, head_hash = self.ledger.head() or (-1, "")
        config = ConfigRecord({**self.cfg.to_dict(), W.FROZEN_DIGEST: self.frozen_digest,
                               W.RUN_KEY: self.ledger.public_key_hex,
                               W.LEDGER_HEAD_INDEX: head_index, W.LEDGER_HEAD_HASH: head_hash})
        outcome = self.aggregation.run_round(server_round, config)
        for event in outcome.events:
            self.record(event)
        if server_round == self.cfg.rounds and self.cfg.privacy_mode.example_dp:
            late = self.collect_unrecorded_receipts(server_round, config)
            outcome.replied = sorted({*outcome.replied, *late})
        if outcome.client_level_epsilon is not None:
            self.client_dp_epsilon = outcome.client_level_epsilon
        if outcome.aggregate is not None:
            self.global_state = outcome.aggregate
        if not outcome.aggregated:
            log(WARNING, "round %d: no update could be aggregated; global model unchanged",
                server_round)
        evaluation = self.evaluate(server_round)
        accuracy, loss = evaluation.metrics["accuracy"], evaluation.metrics["loss"]
        if evaluation.examples:
            self.folder.append_examples(evaluation.examples)
        digest = E.weights_digest(self.global_state)
        partners = list(self.book.records.values())
        self.record(E.ModelDigest(round=server_round, sha256=digest))
        row = {
            "round": server_round, "num_clients_sampled": len(outcome.sampled),
            "num_clients_aggregated": len(outcome.aggregated), "accuracy": accuracy, "loss": loss,
            "epsilon_example_level": {p.pseudonym: p.epsilon for p in partners},
            "epsilon_example_level_rdp": {p.pseudonym: p.epsilon_rdp for p in partners},
            "epsilon_client_level": self.client_dp_epsilon, "bytes_uploaded": outcome.uploaded,
            "seconds": time.perf_counter() - t0,
            **{k: v for k, v in evaluation.metrics.items() if k not in ("accuracy", "loss")},
            "refused": [p.pseudonym for p in partners if server_round in p.refused],
            **outcome.metrics,
        }
        completed = E.RoundCompleted(
            round=server_round, replied=outcome.replied, aggregated=sorted(outcome.aggregated),
            dropped=outcome.dropped, accuracy=accuracy, loss=loss)
        self.rounds_completed = server_round
        self.last_metrics = row
        self.progress.finish()
        # the checkpoint first, holding the round's closing entry and metrics row: a run
        # that stops once the ledger records round_completed resumes after this round
        # (recovery.complete_recorded_round) and never trains it, or spends for it, again
        self.save_checkpoint(round_record(completed, row))
        self.record(completed)
        self.folder.append_metrics(row)
        log(INFO, "%s", round_line(row, self.cfg.rounds,
                                   example_dp=self.cfg.privacy_mode.example_dp))
        if self.on_round:
            self.on_round(row)
        crash_point("after-round", server_round, run_dir=self.folder.root)
        return row

    def collect_unrecorded_receipts(self, server_round: int, config: ConfigRecord
                                    ) -> list[str]:
        """The run's last round: a node whose train reply was lost (or that trained in an
        attempt a resume superseded) and was not asked again still holds that receipt.
        Ask those nodes (every node after a resume: a resumed server cannot tell which
        nodes the lost attempt reached) for their receipts of this run; the ledger
        records the ones it lacks in this round, so the run ends with every spend.
        Returns the partners whose lost reply was of this round (they replied after all)."""
        assert self.ledger is not None
        nodes = set(self.grid.get_node_ids()) if self.resumed \
            else self.book.unanswered_nodes()
        if not nodes:
            return []
        messages = []
        for node in sorted(nodes):
            message = Message(content=RecordDict({W.CONFIG: config}), dst_node_id=node,
                              message_type=W.RECEIPTS_MESSAGE_TYPE)
            self.book.prepare_train(message, server_round)
            messages.append(message)
        replies = self.exchange(messages, "receipts")
        answered, this_round = self.book.record_unrecorded_receipts(self, server_round,
                                                                    replies, nodes)
        log(INFO, "round %d: asked %d node(s) for receipts the ledger may lack; %d answered",
            server_round, len(messages), answered)
        return this_round

    # -- evaluation ------------------------------------------------------------------
    def evaluate(self, server_round: int = 0) -> Evaluation:
        load_trainable_state(self.model, self.global_state)
        return self.evaluator(self.model, self.device, round_=server_round,
                              final=server_round == self.cfg.rounds)

    # -- end -------------------------------------------------------------------------
    def save_checkpoint(self, record: dict[str, Any] | None = None) -> None:
        """The state after `rounds_completed` rounds (0: the run's start); `record`: the last
        round's closing entry and metrics row (recovery.round_record)."""
        self.folder.save_checkpoint(self.rounds_completed, self.global_state,
                                    {**self.server_state(), **(record or {})},
                                    self.inner.optimizer.state_dict()["arrays"])

    def server_state(self) -> dict[str, Any]:
        return {
            "partners": self.book.state_dict(),
            "client_dp_epsilon": self.client_dp_epsilon,
            "config_digest": self.cfg.digest(),
            "python_random": repr(random.getstate()),
            "server_optimizer": self.inner.optimizer.state_dict()["meta"],
            "aggregation": self.aggregation.state_dict(),
        }

    def summary(self) -> dict[str, Any]:
        return {
            "rounds_completed": self.rounds_completed,
            "final_metrics": {"accuracy": self.last_metrics.get("accuracy"),
                              "loss": self.last_metrics.get("loss"),
                              **self._latest_task_metrics()},
            "privacy": {
                # without example DP there is no example-level guarantee: the zeros below
                # mean "no DP events", never "epsilon 0"; readers must check this first
                "example_dp": self.cfg.privacy_mode.example_dp,
                "delta": self.cfg.delta,
                "example_level": {p.pseudonym: p.epsilon for p in self.book.records.values()},
                # The same events read by RDP: a looser second opinion, never the claim.
                "example_level_rdp": {p.pseudonym: p.epsilon_rdp
                                      for p in self.book.records.values()},
                "client_level_epsilon": self.client_dp_epsilon,
                # the run's budget, and whether every partner's claim stayed within it
                # the plain (epsilon, delta')-DP statement where the noise is shared inside
                # secure aggregation: delta + (1 + e^epsilon) x the recorded TV slack
                "example_level_delta_with_slack": {
                    p.pseudonym: delta_with_slack(self.cfg.delta, p.epsilon, p.tv_slack)
                    for p in self.book.records.values() if p.tv_slack > 0},
                "max_epsilon": self.cfg.max_epsilon,
                "within_max_epsilon": all(p.epsilon <= self.cfg.max_epsilon
                                          for p in self.book.records.values()),
                # the noise is calibrated to reach target-epsilon in the planned rounds; a
                # partner above it trained more than planned (e.g. a round run again)
                "target_epsilon": self.cfg.target_epsilon,
                "above_target_epsilon": {
                    p.pseudonym: p.epsilon for p in self.book.records.values()
                    if self.cfg.privacy_mode.example_dp and self.cfg.noise_multiplier == 0
                    and p.epsilon > self.cfg.target_epsilon * (1 + 1e-9)},
                "allow_large_delta": self.cfg.allow_large_delta,
                "accountant": self._accountant_summary(),
                "accountants": {
                    "example_level": sorted({p.accountant for p in self.book.records.values()})
                    or ([PLD] if self.cfg.privacy_mode.example_dp else []),
                    "example_level_second_opinion": RDP,
                    "client_level": rules_of(self.cfg.privacy_mode).client.accountant,
                },
                "adjacency": "add/remove one record (example level); add/remove one "
                             "client (client level)",
            },
            # every partner, one row each (the console summarises above 20 partners)
            "partners": [{"partner": p.pseudonym, "epsilon": p.epsilon,
                          "epsilon_rdp": p.epsilon_rdp, "accountant": p.accountant,
                          "rounds_trained": sorted(p.rounds_trained),
                          "refused_rounds": sorted(p.refused)}
                         for p in sorted(self.book.records.values(), key=lambda p: p.pseudonym)],
            "secure_aggregation": self.cfg.privacy_mode.secure,
            "distributed_dp": self.cfg.privacy_mode.client is ClientLevel.DISTRIBUTED,
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
        kinds = sorted({p.accountant for p in self.book.records.values()}) or [PLD]
        text = "example level, per partner: " + "; ".join(ACCOUNTANT_NAMES.get(k, k)
                                                        for k in kinds)
        text += "; RDP (integer orders) as second opinion"
        client = self.cfg.privacy_mode.client
        if client is ClientLevel.DISTRIBUTED:
            text += ("; client level: RDP of the distributed discrete Gaussian "
                     "(Kairouz-Liu-Steinke 2021; no tight accountant covers sums of "
                     "discrete Gaussians)")
        elif client is ClientLevel.CENTRAL:
            text += "; client level: PLD of the composed Gaussian releases (tight)"
        return text

    def finish(self) -> dict[str, Any]:
        assert self.ledger is not None
        self.folder.save_model(self.global_state, self.cfg,
                               {"frozen-digest": self.frozen_digest,
                                "weights-digest": E.weights_digest(self.global_state)})
        summary = self.summary()
        self.folder.write_summary(summary)
        self.record(E.RunFinished(rounds_completed=self.rounds_completed))
        self.ledger.close()
        # report.html / report.md are the driver's, written after the run
        # (confide.audit.report.write_report_after_run); after a plain `flwr run`:
        # `confide audit report RUN_DIR`
        return summary


def round_line(row: dict[str, Any], rounds: int, *, example_dp: bool) -> str:
    """One line per finished round for the run's log (a deployed run's streamed log).

    Without example DP the partners' accountants hold no events: their 0.0 is not an
    epsilon, and the line says DP is off instead of printing it."""
    eps = row.get("epsilon_example_level") or {}
    def num(v: Any) -> str:
        return "n/a" if v is None else f"{float(v):.4f}"

    text = f"Confide round {row['round']}/{rounds}: "
    if row.get("perplexity") is not None:  # causal-lm: accuracy is next-token accuracy
        text += f"perplexity {float(row['perplexity']):.4g}, "
        if row.get("bleu") is not None:
            text += f"BLEU {float(row['bleu']):.1f}, ROUGE-L {float(row['rouge_l']):.1f}, "
        text += "next-token "
    text += (f"accuracy {num(row.get('accuracy'))}, "
             f"loss {num(row.get('loss'))}, aggregated {row['num_clients_aggregated']}"
             f"/{row['num_clients_sampled']}")
    if not example_dp:
        text += ", example-level DP off"
    elif eps:
        text += (f", example-level epsilon max {max(eps.values()):.3f} ("
                 + ", ".join(f"{p} {e:.3f}" for p, e in sorted(eps.items())) + ")")
    if row.get("epsilon_client_level") is not None:
        text += f", client-level epsilon {row['epsilon_client_level']:.3f}"
    if row.get("refused"):
        text += f", refused (budget): {', '.join(row['refused'])}"
    return text


def aggregation_state(state: dict[str, Any]) -> dict[str, Any]:
    """The aggregation's part of a checkpoint; checkpoints of earlier versions kept it in
    two keys of their own."""
    if "aggregation" in state:
        return dict(state["aggregation"])
    old = dict(state.get("secure_aggregation", {}))
    if "client_dp_accountant" in state:
        old["client_dp_accountant"] = state["client_dp_accountant"]
    return old
