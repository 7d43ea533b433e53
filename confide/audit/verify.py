"""`confide audit verify RUN_DIR`: check a run's privacy ledger on its own.

Checks, in order (each PASS / FAIL / SKIP, each failure naming the ledger entry):
  chain         every line canonical, indices 0..n-1, prev_hash links, entry hashes, Ed25519
                signatures by the key in run_started (pinned by ledger_public_key.pem when
                the run folder has one, or by `public_key=`)
  payloads      every payload has the fields and types of its entry type
  ordering      run_started first, run_finished last, rounds in order (a round may only be
                re-run after run_resumed)
  completeness  every round 1..rounds_completed has round_configured, one model_digest,
                round_completed, an example_dp or budget_refusal for every partner that
                replied, client_dp / secure_aggregation when the config enables them; the
                ledger is not cut short (run_finished present when summary.json is)
  receipts      every example_dp carries the partner's receipt, validly signed by the key
                whose pseudonym is the partner, with the same numbers as the ledger
  replay        every claimed epsilon recomputed independently from the ledger's events
                agrees (1 %): PLD claims by Opacus' PRV accountant (and never below its
                certified lower bound), RDP claims by dp-accounting's RDP
  summary       summary.json equals the replay and the ledger (1 % on epsilons)
  metrics       metrics.jsonl equals the replay and the ledger, round by round (1 %)
  model         the last model_digest equals SHA-256 of model/weights.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confide.config import config_digest, recorded_value
from confide.privacy import ledger_events as ev
from confide.privacy.ledger import (
    LedgerError,
    LedgerLine,
    Problem,
    as_public_key,
    load_public_key,
    public_key_hex,
    read_lines,
    verify_chain,
)
from confide.privacy.receipts import ReceiptError, mismatches, verify_receipt
from confide.privacy.refusals import mechanisms, refusal_mismatches, verify_refusal
from confide.privacy.replay import (
    ClientReplay,
    PartnerReplay,
    UnknownMechanism,
    _cumulative_rdp,
    prv_epsilon,
    replay_client_level,
    replay_example_level,
)
from confide.run_layout import (
    LEDGER_FILE,
    LEDGER_PUBLIC_KEY_FILE,
    METRICS_FILE,
    MODEL_DIR,
    SUMMARY_FILE,
    WEIGHTS_FILE,
)

REL_TOLERANCE = 0.01
MODEL_FILE = f"{MODEL_DIR}/{WEIGHTS_FILE}"
CHECKS = ("chain", "payloads", "ordering", "completeness", "receipts", "replay", "summary",
          "metrics", "model")


def close(a: float | None, b: float | None, rel: float = REL_TOLERANCE) -> bool:
    """|a - b| <= rel * |b| (b = the independent replay), with inf == inf, None == None."""
    if a is None or b is None:
        return a is None and b is None
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rel * abs(b) + 1e-9


@dataclass
class CheckResult:
    name: str
    problems: list[Problem] = field(default_factory=list)
    detail: str = ""
    skipped: bool = False

    @property
    def status(self) -> str:
        if self.problems:
            return "FAIL"
        return "SKIP" if self.skipped else "PASS"

    def add(self, reason: str, index: int | None = None) -> None:
        self.problems.append(Problem(self.name, reason, index))


@dataclass
class VerifyResult:
    run_dir: Path
    checks: list[CheckResult]
    entries: list[dict[str, Any] | None]
    example_level: dict[str, PartnerReplay] = field(default_factory=dict)
    client_level: ClientReplay | None = None
    claimed_example: dict[str, float] = field(default_factory=dict)  # final, from ledger
    rounds_completed: int = 0

    @property
    def ok(self) -> bool:
        return all(not c.problems for c in self.checks)

    @property
    def problems(self) -> list[Problem]:
        return [p for c in self.checks for p in c.problems]

    @property
    def first_problem(self) -> Problem | None:
        """The first bad entry: the lowest ledger index among the problems of the first
        check (in CHECKS order: integrity before meaning) that names entries, else the first
        problem. An edited entry breaks the chain at that entry; the semantic checks may
        then also flag an earlier, intact entry that no longer agrees with it."""
        for check in self.checks:
            indexed = [p for p in check.problems if p.index is not None]
            if indexed:
                return min(indexed, key=lambda p: p.index)  # type: ignore[arg-type,return-value]  # index is not None here
        probs = self.problems
        return probs[0] if probs else None

    @property
    def first_bad_index(self) -> int | None:
        first = self.first_problem
        return first.index if first else None

    def check(self, name: str) -> CheckResult:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        first = self.first_problem
        return {
            "ok": self.ok, "verdict": "PASS" if self.ok else "FAIL",
            "run_dir": str(self.run_dir),
            "first_bad_entry": None if first is None else first.index,
            "first_problem": None if first is None else str(first),
            "checks": {c.name: {"status": c.status, "detail": c.detail,
                                "problems": [str(p) for p in c.problems]}
                       for c in self.checks},
            "epsilon_example_level": {
                p: {"claimed": self.claimed_example.get(p), "replay": r.final,
                    "replay_method": r.method, "replay_rdp": r.final_rdp,
                    "replay_pld": r.pld_epsilon}
                for p, r in sorted(self.example_level.items())},
            "epsilon_client_level": None if self.client_level is None
            else self.client_level.final,
        }


@dataclass
class _Attempt:
    """The entries of one round between its round_configured and round_completed."""

    round: int
    configured_at: int
    entries: list[tuple[int, ev.LedgerEvent]] = field(default_factory=list)
    completed_at: int | None = None


class RunVerifier:
    """Runs every check over one run folder; `run()` returns the VerifyResult."""

    def __init__(self, run_dir: Path | str, public_key: Any = None, *, pld: bool = True
                 ) -> None:
        self.run_dir = Path(run_dir)
        self.pld = pld
        self.pinned_key = public_key
        self.checks = {name: CheckResult(name) for name in CHECKS}
        self.lines: list[LedgerLine] = []
        self.events: list[tuple[int, ev.LedgerEvent]] = []  # (index, typed event)
        self.config: dict[str, Any] = {}
        self.delta: float | None = None
        self.attempts: dict[int, _Attempt] = {}  # round -> its final attempt
        self.rounds_completed = 0
        self.snapshots: dict[int, tuple[dict[str, float], float | None]] = {}
        self.example: dict[str, PartnerReplay] = {}
        self.client: ClientReplay | None = None
        self.claimed_final: dict[str, float] = {}
        self.client_replay_failed = False  # then client epsilons are not compared again
        self.run_key: str | None = None  # the ledger key: the run a signed refusal names

    # -- driver -------------------------------------------------------------------------
    def run(self) -> VerifyResult:
        path = self.run_dir / LEDGER_FILE
        if not path.is_file():
            self.checks["chain"].add(f"{path} does not exist")
        else:
            self.lines = read_lines(path)
            self._check_chain()
            self._check_payloads()
            self._check_ordering()
            self._check_completeness()
            self._check_receipts()
            self._check_replay()
            self._check_summary()
            self._check_metrics()
            self._check_model()
        return VerifyResult(self.run_dir, list(self.checks.values()),
                            [line.entry for line in self.lines], self.example, self.client,
                            self.claimed_final, self.rounds_completed)

    # -- chain --------------------------------------------------------------------------
    def _ledger_key(self) -> tuple[Any, str]:
        c = self.checks["chain"]
        first = self.lines[0].entry if self.lines else None
        stated = None
        if first is not None and isinstance(first.get("payload"), dict):
            stated = first["payload"].get("ledger_public_key")
        pem = self.run_dir / LEDGER_PUBLIC_KEY_FILE
        pinned = None
        source = "run_started only (not pinned: no ledger_public_key.pem)"
        if self.pinned_key is not None:
            pinned, source = (public_key_hex(as_public_key(self.pinned_key)),
                              "the given key (the run was not recorded under the expected key)")
        elif pem.is_file():
            pinned, source = public_key_hex(load_public_key(pem)), LEDGER_PUBLIC_KEY_FILE
        if pinned is not None and stated != pinned:
            c.add(f"run_started's ledger_public_key differs from {source}", 0)
        key = pinned or stated
        try:
            return as_public_key(key), source  # type: ignore[arg-type]  # None: TypeError below
        except (ValueError, TypeError):
            c.add("no usable ledger public key in run_started", 0)
            return None, source

    def _check_chain(self) -> None:
        c = self.checks["chain"]
        if not self.lines:
            c.add("ledger is empty", 0)
            return
        key, source = self._ledger_key()
        if key is not None:
            c.problems.extend(verify_chain(self.lines, key))
            c.detail = f"{len(self.lines)} entries; key {public_key_hex(key)[:16]}… from {source}"

    # -- payloads -----------------------------------------------------------------------
    def _check_payloads(self) -> None:
        c = self.checks["payloads"]
        for line in self.lines:
            entry = line.entry
            if entry is None or not isinstance(entry.get("type"), str):
                continue
            try:
                payload = entry.get("payload")  # None is a PayloadError too
                event = ev.parse_payload(entry["type"], payload)  # type: ignore[arg-type]  # above
            except ev.PayloadError as exc:
                c.add(str(exc), line.position)
                continue
            self.events.append((line.position, event))
        started = [(i, e) for i, e in self.events if isinstance(e, ev.RunStarted)]
        if started:
            start = started[0][1]
            self.config, self.delta = start.config, start.delta
            self.run_key = start.ledger_public_key
            if config_digest(start.config) != start.config_digest:
                c.add("config_digest is not the SHA-256 of the recorded config", started[0][0])
        for i, e in self.events:
            d = getattr(e, "delta", None)
            if d is not None and self.delta is not None and not isinstance(e, ev.RunStarted) \
                    and d != self.delta:
                c.add(f"{e.TYPE} delta {d} differs from the run's delta {self.delta}", i)
        c.detail = f"{len(self.events)} typed events"

    # -- ordering -----------------------------------------------------------------------
    def _check_ordering(self) -> None:
        c = self.checks["ordering"]
        n = len(self.lines)
        if not self.events or self.events[0][0] != 0 or \
                not isinstance(self.events[0][1], ev.RunStarted):
            c.add("the first entry is not run_started", 0)
        last_completed = 0
        current: _Attempt | None = None
        interrupted_at: int | None = None  # only run_resumed may follow run_interrupted
        for i, e in self.events:
            if interrupted_at is not None and not isinstance(e, ev.RunResumed):
                c.add(f"{e.TYPE} after run_interrupted (entry {interrupted_at}) without "
                      "run_resumed", i)
                interrupted_at = None
            if isinstance(e, ev.RunStarted):
                if i != 0:
                    c.add("run_started again in the middle of the ledger", i)
            elif isinstance(e, ev.RunFinished):
                if i != n - 1:
                    c.add("run_finished is not the last entry", i + 1)
                if current is not None and current.completed_at is None:
                    c.add(f"run finished inside round {current.round}", i)
            elif isinstance(e, ev.RunInterrupted):
                # a stop at a safe point: no round open, and the checkpoint is that round's
                if current is not None and current.completed_at is None:
                    c.add(f"run interrupted inside round {current.round}", i)
                if e.after_round != last_completed:
                    c.add(f"run interrupted after round {e.after_round}, but {last_completed} "
                          "rounds were completed", i)
                interrupted_at = i
            elif isinstance(e, ev.RunResumed):
                interrupted_at = None
                if e.from_round > last_completed:
                    c.add(f"resumed from round {e.from_round}, but only {last_completed} "
                          "rounds were completed", i)
                last_completed = min(last_completed, e.from_round)
                current = None
            elif isinstance(e, ev.RoundConfigured):
                if current is not None and current.completed_at is None:
                    c.add(f"round {e.round} configured before round {current.round} "
                          "completed (and no run_resumed in between)", i)
                if e.round != last_completed + 1:
                    c.add(f"round {e.round} configured, expected round {last_completed + 1}", i)
                current = _Attempt(e.round, i)
                self.attempts[e.round] = current
            else:
                r = ev.round_of(e)
                if current is None or r != current.round or current.completed_at is not None:
                    where = "no round is open" if current is None or current.completed_at \
                        is not None else f"round {current.round} is open"
                    c.add(f"{e.TYPE} of round {r} out of order ({where})", i)
                    continue
                current.entries.append((i, e))
                if isinstance(e, ev.RoundCompleted):
                    current.completed_at = i
                    last_completed = e.round
        self.rounds_completed = last_completed
        c.detail = f"{self.rounds_completed} rounds completed"

    # -- completeness -------------------------------------------------------------------
    def _check_completeness(self) -> None:
        c = self.checks["completeness"]
        n = len(self.lines)
        finished = [(i, e) for i, e in self.events if isinstance(e, ev.RunFinished)]
        summary = self._load_summary()
        if finished:
            i, fin = finished[-1]
            if fin.rounds_completed != self.rounds_completed:
                c.add(f"run_finished says {fin.rounds_completed} rounds, the ledger completes "
                      f"{self.rounds_completed}", i)
        elif summary is not None:
            c.add(f"run_finished missing although summary.json exists: the ledger ends at "
                  f"entry {n - 1} (truncated?)", n)
        if summary is not None and summary.get("rounds_completed") != self.rounds_completed:
            c.add(f"summary.json rounds_completed = {summary.get('rounds_completed')!r}, the "
                  f"ledger completes {self.rounds_completed} rounds", n)
        example_dp = bool(recorded_value(self.config, "example-dp"))
        client_dp = bool(recorded_value(self.config, "client-dp")) or \
            bool(recorded_value(self.config, "distributed-dp"))
        secagg = bool(recorded_value(self.config, "secure-aggregation"))
        signatures = [(e.receipt or {}).get("signature") for _, e in self.events
                      if isinstance(e, ev.ExampleDpEvent)]
        for r in range(1, self.rounds_completed + 1):
            att = self.attempts.get(r)
            if att is None or att.completed_at is None:
                c.add(f"round {r} has no complete round_configured ... round_completed", n)
                continue
            at = att.completed_at
            kinds: dict[str, list[tuple[int, ev.LedgerEvent]]] = {}
            for i, e in att.entries:
                kinds.setdefault(e.TYPE, []).append((i, e))
            if len(kinds.get(ev.MODEL_DIGEST, [])) != 1:
                c.add(f"round {r} has {len(kinds.get(ev.MODEL_DIGEST, []))} model_digest "
                      "entries, expected 1", at)
            done = next(e for i, e in att.entries if isinstance(e, ev.RoundCompleted))
            assert isinstance(done, ev.RoundCompleted)
            trained: dict[str, int] = {}
            # A round re-run after run_resumed may hold, before a partner's new receipt, the
            # receipts it signed in the lost attempt (the server died after the partner
            # trained, before recording it): real spends, each a distinct signed receipt.
            rerun = any(isinstance(e, ev.RunResumed) and e.from_round == r - 1
                        for i, e in self.events if i < att.configured_at)
            first_signature: dict[str, Any] = {}
            for i, e in kinds.get(ev.EXAMPLE_DP, []):
                assert isinstance(e, ev.ExampleDpEvent)
                signature = (e.receipt or {}).get("signature")
                if e.partner in trained and not (
                        rerun and all(x is not None and signatures.count(x) == 1
                                      for x in (signature, first_signature[e.partner]))):
                    c.add(f"second example_dp of partner {e.partner} in round {r}", i)
                first_signature.setdefault(e.partner, signature)
                trained[e.partner] = i
                if e.partner not in done.replied:
                    c.add(f"example_dp of partner {e.partner}, who is not among round {r}'s "
                          "replies", i)
            refused = {e.partner for _, e in kinds.get(ev.BUDGET_REFUSAL, [])
                       if isinstance(e, ev.BudgetRefusal)}
            if example_dp:
                for p in done.replied:
                    if p not in trained and p not in refused:
                        c.add(f"partner {p} replied in round {r} but has neither example_dp "
                              "nor budget_refusal", at)
                for p in done.aggregated:
                    if p not in trained:
                        c.add(f"partner {p}'s update is in round {r}'s aggregate without an "
                              "example_dp event", at)
            configured = next((e for i, e in self.events if i == att.configured_at
                               and isinstance(e, ev.RoundConfigured)), None)
            self._check_shared_noise(r, kinds, c, configured)
            if client_dp and len(kinds.get(ev.CLIENT_DP, [])) != 1:
                c.add(f"round {r} has {len(kinds.get(ev.CLIENT_DP, []))} client_dp entries, "
                      "expected 1 (client-level DP is enabled)", at)
            if secagg and len(kinds.get(ev.SECURE_AGGREGATION, [])) != 1:
                c.add(f"round {r} has {len(kinds.get(ev.SECURE_AGGREGATION, []))} "
                      "secure_aggregation entries, expected 1", at)
        c.detail = (f"rounds 1..{self.rounds_completed}; example-dp={example_dp}, "
                    f"client-dp={client_dp}, secure-aggregation={secagg}")

    def _check_shared_noise(self, r: int, kinds: dict[str, list[tuple[int, ev.LedgerEvent]]],
                            c: CheckResult, configured: ev.RoundConfigured | None) -> None:
        """Shared-noise rounds (example-dp-noise = 'shared'): every example_dp says so, with
        the run's dp-colluders c and m = min_survivors - c honest noise shares, min_survivors
        = ceil(n t / (k + 1)) recomputed from the round's cohort n and the recorded SecAgg
        threshold t and neighbours k; a released sum has at least min_survivors inputs."""
        shared = recorded_value(self.config, "example-dp-noise") == "shared"
        colluders = int(recorded_value(self.config, "dp-colluders"))
        secure = [e for _, e in kinds.get(ev.SECURE_AGGREGATION, [])
                  if isinstance(e, ev.SecureAggregationEvent)]
        min_survivors = None
        if secure and configured is not None:
            n, t, k = len(configured.sampled), secure[-1].threshold, secure[-1].neighbours
            min_survivors = math.ceil(n * t / (min(k, n - 1) + 1)) if n > 1 else None
        for i, e in kinds.get(ev.EXAMPLE_DP, []):
            assert isinstance(e, ev.ExampleDpEvent)
            if (e.noise == "shared") != shared:
                c.add(f"example_dp of partner {e.partner} round {r} has noise = {e.noise!r}, "
                      f"but the run's example-dp-noise is "
                      f"{recorded_value(self.config, 'example-dp-noise')!r}", i)
                continue
            if not shared:
                continue
            if e.colluders != colluders:
                c.add(f"example_dp of partner {e.partner} round {r}: colluders {e.colluders}, "
                      f"the run's dp-colluders is {colluders}", i)
            if min_survivors is None:
                c.add(f"shared-noise example_dp of partner {e.partner} round {r} without a "
                      "secure_aggregation event to check its noise shares against", i)
            elif e.noise_shares != min_survivors - colluders:
                c.add(f"example_dp of partner {e.partner} round {r}: {e.noise_shares} noise "
                      f"shares accounted, but min_survivors {min_survivors} - colluders "
                      f"{colluders} = {min_survivors - colluders}", i)
        if shared and min_survivors is not None:
            for e in secure:
                if e.aborted is None and len(e.participants) < min_survivors:
                    c.add(f"round {r}: secure sum released with {len(e.participants)} inputs "
                          f"< min_survivors {min_survivors}: fewer noise shares than "
                          "accounted")

    # -- receipts -----------------------------------------------------------------------
    def _check_receipts(self) -> None:
        c = self.checks["receipts"]
        count = 0
        for i, e in self.events:
            if not isinstance(e, ev.ExampleDpEvent):
                continue
            if e.receipt is None:
                c.add(f"example_dp of partner {e.partner} round {e.round} has no receipt", i)
                continue
            try:
                verify_receipt(e.receipt)
                bad = mismatches(e.receipt, e.to_payload())
            except ReceiptError as exc:
                c.add(f"receipt of partner {e.partner} round {e.round}: {exc}", i)
                continue
            if bad:
                c.add(f"ledger differs from the partner's signed receipt: {'; '.join(bad)}", i)
            count += 1
        for i, e in self.events:
            if not isinstance(e, ev.BudgetRefusal) or e.receipt is None:
                continue  # refusals of earlier versions carry no signature
            try:
                rec = verify_refusal(e.receipt)
            except ReceiptError as exc:
                c.add(f"signed refusal of partner {e.partner} round {e.round}: {exc}", i)
                continue
            bad = refusal_mismatches(rec, e.to_payload())
            if self.run_key is not None and rec.payload.get("run") != self.run_key:
                bad.append("it is signed for another run")
            if bad:
                c.add(f"budget refusal differs from the partner's signed refusal: "
                      f"{'; '.join(bad)}", i)
            count += 1
        c.detail = f"{count} receipts valid"

    # -- replay -------------------------------------------------------------------------
    def _check_replay(self) -> None:
        c = self.checks["replay"]
        examples = [(i, e) for i, e in self.events if isinstance(e, ev.ExampleDpEvent)]
        clients = [(i, e) for i, e in self.events if isinstance(e, ev.ClientDpEvent)]
        self.example = replay_example_level([e for _, e in examples], self.delta,
                                            with_pld=self.pld)
        # Cumulative epsilon after each example_dp event, in ledger order.
        per_event: dict[int, float] = {}
        lower: dict[int, float | None] = {}
        methods: dict[int, str] = {}
        cursor: dict[str, int] = {}
        for i, example in examples:
            k = cursor.get(example.partner, 0)
            rep = self.example[example.partner]
            per_event[i], lower[i], methods[i] = (rep.epsilons[k], rep.lower_bounds[k],
                                                  rep.methods[k])
            cursor[example.partner] = k + 1
        client_eps: dict[int, float] = {}
        odd = [i for i, e in clients if e.mechanism != clients[0][1].mechanism]
        if odd:
            self.client_replay_failed = True
            c.add(f"client-level events mix mechanisms "
                  f"{sorted({e.mechanism for _, e in clients})}", odd[0])
        elif clients:
            try:
                self.client = replay_client_level([e for _, e in clients], self.delta)
                client_eps = dict(zip([i for i, _ in clients], self.client.epsilons,
                                      strict=True))
            except (UnknownMechanism, ValueError) as exc:
                self.client_replay_failed = True
                c.add(str(exc), clients[0][0])
        current: dict[str, float] = {}
        current_client: float | None = None
        # this run's (sigma, q, steps, round) per partner so far, for signed refusals
        history: dict[str, list[tuple[float, float, int, int]]] = {}
        for i, e in self.events:
            if isinstance(e, ev.ExampleDpEvent):
                current[e.partner] = per_event[i]
                history.setdefault(e.partner, []).append(
                    (e.noise_multiplier, e.sample_rate, e.steps, e.round))
                self.claimed_final[e.partner] = e.epsilon_claimed
                method = methods[i]
                if not close(e.epsilon_claimed, per_event[i]):
                    c.add(f"partner {e.partner} round {e.round}: claimed epsilon "
                          f"{e.epsilon_claimed:.6g} ({e.accountant}), independent {method} "
                          f"replay {per_event[i]:.6g}", i)
                elif (low := lower[i]) is not None and e.epsilon_claimed < low * (1 - 1e-6):
                    c.add(f"partner {e.partner} round {e.round}: claimed epsilon "
                          f"{e.epsilon_claimed:.6g} is below the PRV lower bound "
                          f"{low:.6g}: the claim under-states the spend", i)
            elif isinstance(e, ev.ClientDpEvent) and i in client_eps:
                current_client = client_eps[i]
                if e.epsilon_claimed is not None and not close(e.epsilon_claimed,
                                                               client_eps[i]):
                    c.add(f"round {e.round}: claimed client-level epsilon "
                          f"{e.epsilon_claimed:.6g}, replay {client_eps[i]:.6g}", i)
            elif isinstance(e, ev.BudgetRefusal):
                spent = current.get(e.partner, 0.0)
                if e.receipt is not None:  # signed lifetime spend (multi-run partners)
                    self._check_lifetime_refusal(c, i, e, spent, history.get(e.partner, []))
                elif not close(e.spent_epsilon, spent):  # earlier versions: this run only
                    c.add(f"budget refusal of {e.partner}: spent epsilon {e.spent_epsilon:.6g}, "
                          f"replay {spent:.6g}", i)
                if not e.would_be_epsilon > e.max_epsilon:
                    c.add(f"budget refusal of {e.partner} although {e.would_be_epsilon:.6g} "
                          f"<= max {e.max_epsilon:.6g}", i)
            elif isinstance(e, ev.RoundCompleted):
                att = self.attempts.get(e.round)
                if att is not None and att.completed_at == i:
                    self.snapshots[e.round] = (dict(current), current_client)
        used = sorted({m for rep in self.example.values() for m in rep.methods})
        c.detail = (f"{len(examples)} example-level events of {len(self.example)} partners "
                    f"(replayed by {', '.join(used) or '-'}), {len(clients)} client-level "
                    "events")

    def _check_lifetime_refusal(self, c: CheckResult, i: int, e: ev.BudgetRefusal,
                                run_spent: float,
                                run_events: list[tuple[float, float, int, int]]) -> None:
        """A signed refusal states the partner's lifetime spend and the events behind it
        (earlier runs included). Replay those events independently; the stated spend must
        equal the replay, cover this run's replay (a lower bound of it), and its events
        must include every event this ledger records for the partner in this run."""
        try:
            rec = verify_refusal(e.receipt or {})
        except ReceiptError:
            return  # the receipts check names it
        pay = rec.payload
        events = pay["lifetime_events"]
        delta = self.delta if self.delta is not None else float(pay["delta"])
        lifetime = self._replay_events(mechanisms(events), str(pay["accountant"]), delta)
        would_be = self._replay_events(mechanisms([*events, pay["planned"]]),
                                       str(pay["accountant"]), delta)
        who = f"budget refusal of {e.partner}"
        if not close(e.spent_epsilon, lifetime[1]):
            c.add(f"{who}: stated lifetime spend {e.spent_epsilon:.6g}, replay of its signed "
                  f"events {lifetime[1]:.6g}", i)
        elif lifetime[0] is not None and e.spent_epsilon < lifetime[0] * (1 - 1e-6):
            c.add(f"{who}: stated lifetime spend {e.spent_epsilon:.6g} is below the PRV lower "
                  f"bound {lifetime[0]:.6g}", i)
        if not close(e.would_be_epsilon, would_be[1]):
            c.add(f"{who}: would-be epsilon {e.would_be_epsilon:.6g}, replay {would_be[1]:.6g}",
                  i)
        if e.spent_epsilon < run_spent * (1 - REL_TOLERANCE):
            c.add(f"{who}: stated lifetime spend {e.spent_epsilon:.6g} is below this run's "
                  f"replay {run_spent:.6g}", i)
        signed_here = [(float(x["noise_multiplier"]), float(x["sample_rate"]), int(x["steps"]),
                        int(x.get("round", 0))) for x in events
                       if x.get("run") == self.run_key]
        for ev_ in run_events:
            if ev_ in signed_here:
                signed_here.remove(ev_)
            else:
                c.add(f"{who}: its signed lifetime events omit this run's round {ev_[3]} "
                      "(the stated spend leaves out budget this ledger records)", i)
                break

    def _replay_events(self, params: tuple[tuple[float, float, int], ...], accountant: str,
                       delta: float) -> tuple[float | None, float]:
        """(PRV lower bound or None, independent estimate) of a composition."""
        if accountant == "pld":
            low, est, _ = prv_epsilon(params, delta)
            return low, est
        return None, (_cumulative_rdp(params, delta)[-1] if params else 0.0)

    # -- summary.json -------------------------------------------------------------------
    def _load_summary(self) -> dict[str, Any] | None:
        path = self.run_dir / SUMMARY_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"__error__": "summary.json is not valid JSON"}
        return data if isinstance(data, dict) else {"__error__": "summary.json not an object"}

    def _check_summary(self) -> None:
        c = self.checks["summary"]
        s = self._load_summary()
        if s is None:
            c.skipped, c.detail = True, "no summary.json (run not finished?)"
            return
        if "__error__" in s:
            c.add(s["__error__"])
            return
        priv = s.get("privacy") or {}
        if self.delta is not None and priv.get("delta") != self.delta:
            c.add(f"privacy.delta = {priv.get('delta')!r}, the ledger's is {self.delta}")
        stated = priv.get("example_level") or {}
        for p, rep in sorted(self.example.items()):
            if p not in stated:
                c.add(f"privacy.example_level omits partner {p} (replay {rep.final:.6g})")
            elif not isinstance(stated[p], int | float) or not close(float(stated[p]),
                                                                     rep.final):
                c.add(f"privacy.example_level[{p}] = {stated[p]!r}, replay {rep.final:.6g}")
        for p, value in stated.items():
            if p not in self.example and value not in (0, 0.0, None):
                c.add(f"privacy.example_level names partner {p}, absent from the ledger")
        # The RDP second opinion, where the summary states one, must be RDP's figure too.
        for p, value in (priv.get("example_level_rdp") or {}).items():
            replay = self.example.get(p)
            if replay is not None and (not isinstance(value, int | float)
                                       or not close(float(value), replay.final_rdp)):
                c.add(f"privacy.example_level_rdp[{p}] = {value!r}, RDP replay "
                      f"{replay.final_rdp:.6g}")
        final_client = self.client.final if self.client else None
        stated_client = priv.get("client_level_epsilon")
        if not self.client_replay_failed and not close(stated_client, final_client):
            c.add(f"privacy.client_level_epsilon = {stated_client!r}, replay {final_client!r}")
        for key, cfg_key in (("secure_aggregation", "secure-aggregation"),
                             ("distributed_dp", "distributed-dp")):
            if key in s and bool(s[key]) != bool(recorded_value(self.config, cfg_key)):
                c.add(f"{key} = {s[key]!r} but the recorded config says "
                      f"{recorded_value(self.config, cfg_key)!r}")
        last = self._completed(self.rounds_completed)
        fm = s.get("final_metrics") or {}
        if last is not None:
            for k in ("accuracy", "loss"):
                got, want = fm.get(k), getattr(last, k)
                if want is not None and not (isinstance(got, int | float)
                                             and close(float(got), want, 1e-6)):
                    c.add(f"final_metrics.{k} = {got!r}, round {last.round}'s "
                          f"round_completed says {want!r}")
        c.detail = f"{len(stated)} partners, tolerance {REL_TOLERANCE:.0%}"

    def _completed(self, r: int) -> ev.RoundCompleted | None:
        att = self.attempts.get(r)
        if att is None or att.completed_at is None:
            return None
        return next((e for i, e in att.entries if i == att.completed_at
                     and isinstance(e, ev.RoundCompleted)), None)

    # -- metrics.jsonl ------------------------------------------------------------------
    def _check_metrics(self) -> None:
        c = self.checks["metrics"]
        path = self.run_dir / METRICS_FILE
        if not path.is_file():
            c.skipped, c.detail = True, "no metrics.jsonl"
            return
        rows: dict[int, dict[str, Any]] = {}
        for n, text in enumerate(path.read_text().splitlines(), 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
                rows[int(row["round"])] = row  # a re-run round: the last row counts
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                c.add(f"metrics.jsonl line {n} is not a JSON object with a round")
        for r, row in sorted(rows.items()):
            att = self.attempts.get(r)
            if r not in self.snapshots or att is None:
                c.add(f"metrics.jsonl has round {r}, which the ledger does not complete")
                continue
            at = att.completed_at
            eps, client_eps = self.snapshots[r]
            stated = row.get("epsilon_example_level") or {}
            for p, value in eps.items():
                if p not in stated:
                    c.add(f"round {r}: epsilon_example_level omits partner {p}", at)
                elif not isinstance(stated[p], int | float) or not close(float(stated[p]),
                                                                         value):
                    c.add(f"round {r}: epsilon_example_level[{p}] = {stated[p]!r}, replay "
                          f"{value:.6g}", at)
            for p, value in stated.items():
                if p not in eps and value not in (0, 0.0, None):
                    c.add(f"round {r}: epsilon_example_level names {p}, who has no "
                          "example_dp so far", at)
            if not self.client_replay_failed and \
                    not close(row.get("epsilon_client_level"), client_eps):
                c.add(f"round {r}: epsilon_client_level = {row.get('epsilon_client_level')!r}, "
                      f"replay {client_eps!r}", at)
            done = self._completed(r)
            configured = next((e for i, e in self.events if i == att.configured_at), None)
            if done is not None:
                agg = row.get("num_clients_aggregated")
                if agg is not None and agg != len(done.aggregated):
                    c.add(f"round {r}: num_clients_aggregated = {agg}, ledger lists "
                          f"{len(done.aggregated)}", at)
                for k in ("accuracy", "loss"):
                    got, want = row.get(k), getattr(done, k)
                    if want is not None and not (isinstance(got, int | float)
                                                 and close(float(got), want, 1e-6)):
                        c.add(f"round {r}: {k} = {got!r}, round_completed says {want!r}", at)
            if isinstance(configured, ev.RoundConfigured):
                sampled = row.get("num_clients_sampled")
                if sampled is not None and sampled != len(configured.sampled):
                    c.add(f"round {r}: num_clients_sampled = {sampled}, ledger lists "
                          f"{len(configured.sampled)}", att.configured_at)
        for r in range(1, self.rounds_completed + 1):
            if r not in rows:
                c.add(f"metrics.jsonl lacks round {r}")
        c.detail = f"{len(rows)} rounds, tolerance {REL_TOLERANCE:.0%}"

    # -- model --------------------------------------------------------------------------
    def _check_model(self) -> None:
        c = self.checks["model"]
        digests = [(i, e) for i, e in self.events if isinstance(e, ev.ModelDigest)]
        path = self.run_dir / MODEL_FILE
        if not path.is_file():
            c.skipped, c.detail = True, f"no {MODEL_FILE}"
            return
        if not digests:
            c.add("no model_digest in the ledger", len(self.lines))
            return
        # No entry index: either the file was swapped or the ledger was cut short (then
        # completeness names the missing entry).
        _, last = digests[-1]
        actual = ev.file_digest(path)
        if actual != last.sha256:
            c.add(f"{MODEL_FILE} has SHA-256 {actual[:16]}…, the ledger's last model_digest "
                  f"(round {last.round}) is {last.sha256[:16]}…")
        c.detail = f"round {last.round} digest {last.sha256[:16]}…"


def verify_run(run_dir: Path | str, public_key: Any = None, *, pld: bool = True
               ) -> VerifyResult:
    """Verify a run folder. `public_key` (key object, raw bytes or hex) pins the ledger key
    instead of ledger_public_key.pem; `pld=False` skips the PLD second opinion (faster)."""
    return RunVerifier(run_dir, public_key, pld=pld).run()


def render_verdict(result: VerifyResult) -> str:
    """Plain-text verdict table: check -> PASS/FAIL/SKIP, then epsilons, then the verdict."""
    rows = [("check", "result", "detail / first problem")]
    for ch in result.checks:
        text = str(ch.problems[0]) if ch.problems else ch.detail
        more = f" (+{len(ch.problems) - 1} more)" if len(ch.problems) > 1 else ""
        rows.append((ch.name, ch.status, text + more))
    w0 = max(len(r[0]) for r in rows)
    out = [f"Confide audit of {result.run_dir}", ""]
    for name, status, text in rows:
        out.append(f"  {name:<{w0}}  {status:<6}  {text}")
    if result.example_level:
        out += ["", "  example-level epsilon (final, delta from the ledger; 'replay' is the "
                "independent check of the claim: PRV for PLD claims, RDP for RDP claims):",
                f"  {'partner':<16}  {'claimed':>10}  {'replay':>12}  {'PLD':>10}  "
                f"{'RDP':>10}"]
        for p, rep in sorted(result.example_level.items()):
            claimed = result.claimed_example.get(p)
            pld_eps = "-" if rep.pld_epsilon is None else f"{rep.pld_epsilon:.4f}"
            replay = f"{rep.final:.4f} {rep.method}"
            out.append(f"  {p:<16}  {_fmt(claimed):>10}  {replay:>12}  {pld_eps:>10}  "
                       f"{rep.final_rdp:>10.4f}")
    if result.client_level is not None and result.client_level.final is not None:
        out.append(f"  client-level epsilon (replay): {result.client_level.final:.4f}")
    out.append("")
    first = result.first_problem
    if first is None:
        out.append(f"VERDICT: PASS ({result.rounds_completed} rounds, "
                   f"{len(result.entries)} ledger entries)")
    else:
        where = f"first bad entry {first.index}" if first.index is not None else "first problem"
        out.append(f"VERDICT: FAIL, {where}: [{first.check}] {first.reason}")
    return "\n".join(out)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def read_public_key(path: Path) -> Any:
    """An Ed25519 public key from a PEM file or from a file holding its 64 hex digits."""
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        return load_public_key(path)
    text = data.decode("ascii", errors="replace").strip()
    if len(text) != 64:
        raise ValueError("not a PEM public key, nor 64 hex digits of an Ed25519 key")
    return as_public_key(text)  # ValueError on a non-hex digit


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when every check passes, 1 on any failure, 2 when there is nothing to check."""
    parser = argparse.ArgumentParser(prog="confide audit verify",
                                     description="Verify a run's privacy ledger.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--public-key", type=Path, default=None, metavar="FILE",
                        help="the server's ledger key, obtained out of band (PEM, or its 64 "
                             "hex digits): every ledger signature must verify with it "
                             f"(default: RUN_DIR/{LEDGER_PUBLIC_KEY_FILE} if present)")
    parser.add_argument("--json", action="store_true",
                        help="print the result (verdict, checks, epsilons) as JSON")
    args = parser.parse_args(argv)
    if not (args.run_dir / LEDGER_FILE).is_file():
        print(f"error: {args.run_dir / LEDGER_FILE} does not exist", file=sys.stderr)
        return 2
    key = None
    if args.public_key is not None:
        try:
            key = read_public_key(args.public_key)
        except (OSError, ValueError, LedgerError) as exc:
            print(f"error: --public-key {args.public_key}: {exc}", file=sys.stderr)
            return 2
    result = verify_run(args.run_dir, key)
    print(json.dumps(result.to_dict(), indent=2) if args.json else render_verdict(result))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
