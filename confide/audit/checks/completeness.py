"""Every completed round holds what its configuration requires, and the ledger is not cut
short."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from confide.audit.checks.base import CheckResult
from confide.audit.checks.ledger_walk import IndexedEvent, RoundAttempt
from confide.audit.checks.loaded_run import LoadedRun
from confide.config import recorded_value
from confide.logs import plural
from confide.privacy import ledger_events as ev
from confide.privacy.mechanisms import SharedNoiseSampledGaussian


@dataclass(frozen=True)
class _RequiredEvents:
    """What the run's recorded configuration requires of every completed round."""
    example_dp: bool
    client_dp: bool
    secagg: bool

    @classmethod
    def of(cls, run: LoadedRun) -> _RequiredEvents:
        return cls(
            example_dp=bool(recorded_value(run.config, "example-dp")),
            client_dp=bool(recorded_value(run.config, "client-dp"))
            or bool(recorded_value(run.config, "distributed-dp")),
            secagg=bool(recorded_value(run.config, "secure-aggregation")))


def check_completeness(run: LoadedRun) -> CheckResult:
    """Every round 1..rounds_completed has round_configured, one model_digest,
    round_completed, an example_dp or budget_refusal for every partner that replied,
    client_dp / secure_aggregation when the config enables them, and shared-noise accounting
    that matches its secure sum; run_finished is present when summary.json is."""
    c = CheckResult("completeness")
    _check_run_end(run, c)
    required = _RequiredEvents.of(run)
    signatures = [(e.receipt or {}).get("signature") for _, e in run.events
                  if isinstance(e, ev.ExampleDpEvent)]
    for r in range(1, run.rounds.rounds_completed + 1):
        att = run.rounds.attempts.get(r)
        if att is None or att.completed_at is None:
            c.add(f"round {r} has no complete round_configured ... round_completed",
                  len(run.lines))
            continue
        _check_round(run, r, att, required, signatures, c)
    c.detail = (f"{_rounds_span(run)}; example-dp={required.example_dp}, "
                f"client-dp={required.client_dp}, secure-aggregation={required.secagg}")
    return c


def _check_run_end(run: LoadedRun, c: CheckResult) -> None:
    """run_finished and summary.json agree with the rounds the ledger completes, and
    run_finished is there when summary.json is (else the ledger was cut short)."""
    n = len(run.lines)
    rounds_completed = run.rounds.rounds_completed
    finished = [(i, e) for i, e in run.events if isinstance(e, ev.RunFinished)]
    if finished:
        i, fin = finished[-1]
        if fin.rounds_completed != rounds_completed:
            c.add(f"run_finished says {fin.rounds_completed} rounds, the ledger completes "
                  f"{rounds_completed}", i)
    elif run.has_summary:
        c.add(f"run_finished missing although summary.json exists: the ledger ends at "
              f"entry {n - 1} (truncated?)", n)
    stated_rounds = (run.summary or {}).get("rounds_completed")
    if run.has_summary and stated_rounds != rounds_completed:
        c.add(f"summary.json rounds_completed = {stated_rounds!r}, the ledger completes "
              f"{plural(rounds_completed, 'round')}", n)


def _check_round(run: LoadedRun, r: int, att: RoundAttempt, required: _RequiredEvents,
                 signatures: list[Any], c: CheckResult) -> None:
    """One completed round: its entries, by kind, are what the configuration requires."""
    at = att.completed_at
    kinds: dict[str, list[IndexedEvent]] = {}
    for i, e in att.entries:
        kinds.setdefault(e.TYPE, []).append((i, e))
    if len(kinds.get(ev.MODEL_DIGEST, [])) != 1:
        c.add(f"round {r} has {len(kinds.get(ev.MODEL_DIGEST, []))} model_digest "
              "entries, expected 1", at)
    done = next(e for i, e in att.entries if isinstance(e, ev.RoundCompleted))
    assert isinstance(done, ev.RoundCompleted)
    trained = _check_releases(run, r, att, kinds, done, signatures, c)
    if required.example_dp:
        _check_replies_accounted(r, at, kinds, done, trained, c)
    configured = next((e for i, e in run.events if i == att.configured_at
                       and isinstance(e, ev.RoundConfigured)), None)
    _check_shared_noise(run, r, kinds, c, configured)
    if required.client_dp and len(kinds.get(ev.CLIENT_DP, [])) != 1:
        c.add(f"round {r} has {len(kinds.get(ev.CLIENT_DP, []))} client_dp entries, "
              "expected 1 (client-level DP is enabled)", at)
    if required.secagg and len(kinds.get(ev.SECURE_AGGREGATION, [])) != 1:
        c.add(f"round {r} has {len(kinds.get(ev.SECURE_AGGREGATION, []))} "
              "secure_aggregation entries, expected 1", at)


def _check_releases(run: LoadedRun, r: int, att: RoundAttempt,
                    kinds: dict[str, list[IndexedEvent]], done: ev.RoundCompleted,
                    signatures: list[Any], c: CheckResult) -> dict[str, int]:
    """Round r's own example_dp releases: one per partner (or distinct signed receipts of a
    lost attempt on a re-run), each from a partner that replied; late releases of earlier
    rounds are checked apart. Returns partner -> entry index of its release."""
    trained: dict[str, int] = {}
    # A round re-run after run_resumed may hold, before a partner's new receipt, the
    # receipts it signed in the lost attempt (the server died after the partner
    # trained, before recording it): real spends, each a distinct signed receipt.
    rerun = any(isinstance(e, ev.RunResumed) and e.from_round == r - 1
                for i, e in run.events if i < att.configured_at)
    first_signature: dict[str, Any] = {}
    for i, e in kinds.get(ev.EXAMPLE_DP, []):
        assert isinstance(e, ev.ExampleDpEvent)
        signature = (e.receipt or {}).get("signature")
        if e.recorded_in_round is not None:
            _check_late_release(i, e, run, signatures, c)
            continue
        if e.partner in trained and not (
                rerun and all(x is not None and signatures.count(x) == 1
                              for x in (signature, first_signature[e.partner]))):
            c.add(f"second example_dp of partner {e.partner} in round {r}", i)
        first_signature.setdefault(e.partner, signature)
        trained[e.partner] = i
        if e.partner not in done.replied:
            c.add(f"example_dp of partner {e.partner}, who is not among round {r}'s "
                  "replies", i)
    return trained


def _check_replies_accounted(r: int, at: int | None, kinds: dict[str, list[IndexedEvent]],
                             done: ev.RoundCompleted, trained: dict[str, int],
                             c: CheckResult) -> None:
    """With example-level DP, every reply is a release or a budget refusal, and every
    aggregated update is a release."""
    refused = {e.partner for _, e in kinds.get(ev.BUDGET_REFUSAL, [])
               if isinstance(e, ev.BudgetRefusal)}
    for p in done.replied:
        if p not in trained and p not in refused:
            c.add(f"partner {p} replied in round {r} but has neither example_dp "
                  "nor budget_refusal", at)
    for p in done.aggregated:
        if p not in trained:
            c.add(f"partner {p}'s update is in round {r}'s aggregate without an "
                  "example_dp event", at)


def _rounds_span(run: LoadedRun) -> str:
    """'rounds 1..N', or 'no round completed', and each round that was configured but not
    completed (e.g. every partner refused it), with its budget refusals."""
    done = run.rounds.rounds_completed
    text = f"rounds 1..{done}" if done else "no round completed"
    for r, att in sorted(run.rounds.attempts.items()):
        if att.completed_at is None and r > done:
            refusals = sum(1 for _, e in att.entries if isinstance(e, ev.BudgetRefusal))
            text += f"; round {r} configured, not completed" + (
                f" ({refusals} budget refusal(s))" if refusals else "")
    return text


def _check_late_release(i: int, e: ev.ExampleDpEvent, run: LoadedRun,
                        signatures: list[Any], c: CheckResult) -> None:
    """A release recorded in a later round than its own (its reply was lost; the partner
    sent the receipt again with a later reply, or when the run's last round asked for
    it): a distinct signed receipt of a round this run had configured before."""
    signature = (e.receipt or {}).get("signature")
    if e.recorded_in_round == e.round:
        c.add(f"example_dp of partner {e.partner} round {e.round} says it was recorded late "
              "in its own round", i)
    if signature is None or signatures.count(signature) != 1:
        c.add(f"late example_dp of partner {e.partner} (round {e.round}) repeats a receipt "
              "the ledger already holds", i)
    if not any(isinstance(x, ev.RoundConfigured) and x.round == e.round
               for j, x in run.events if j < i):
        c.add(f"late example_dp of partner {e.partner} for round {e.round}, which this run "
              "had not configured before", i)


def _check_shared_noise(run: LoadedRun, r: int, kinds: dict[str, list[IndexedEvent]],
                        c: CheckResult, configured: ev.RoundConfigured | None) -> None:
    """Shared-noise rounds (example-dp-noise = 'shared'): every example_dp says so, with
    the run's dp-colluders c and m = min_survivors - c honest noise shares, min_survivors
    = ceil(n t / (k + 1)) recomputed from the round's cohort n and the recorded SecAgg
    threshold t and neighbours k; a released sum has at least min_survivors inputs."""
    shared = recorded_value(run.config, "example-dp-noise") == "shared"
    colluders = int(recorded_value(run.config, "dp-colluders"))
    secure = [e for _, e in kinds.get(ev.SECURE_AGGREGATION, [])
              if isinstance(e, ev.SecureAggregationEvent)]
    min_survivors = None
    if secure and configured is not None:
        n, t, k = len(configured.sampled), secure[-1].threshold, secure[-1].neighbours
        min_survivors = math.ceil(n * t / (min(k, n - 1) + 1)) if n > 1 else None
    for i, e in kinds.get(ev.EXAMPLE_DP, []):
        assert isinstance(e, ev.ExampleDpEvent)
        m = e.mechanism
        if isinstance(m, SharedNoiseSampledGaussian) != shared:
            c.add(f"example_dp of partner {e.partner} round {r} has noise = {m.NOISE!r}, "
                  f"but the run's example-dp-noise is "
                  f"{recorded_value(run.config, 'example-dp-noise')!r}", i)
            continue
        if not isinstance(m, SharedNoiseSampledGaussian):
            continue
        if m.colluders != colluders:
            c.add(f"example_dp of partner {e.partner} round {r}: colluders {m.colluders}, "
                  f"the run's dp-colluders is {colluders}", i)
        if e.recorded_in_round is not None:
            continue  # its own round's cohort, not this one's, fixed its noise shares
        if min_survivors is None:
            c.add(f"shared-noise example_dp of partner {e.partner} round {r} without a "
                  "secure_aggregation event to check its noise shares against", i)
        elif m.noise_shares != min_survivors - colluders:
            c.add(f"example_dp of partner {e.partner} round {r}: {m.noise_shares} noise "
                  f"shares accounted, but min_survivors {min_survivors} - colluders "
                  f"{colluders} = {min_survivors - colluders}", i)
    if shared and min_survivors is not None:
        for e in secure:
            if e.abort is None and len(e.participants) < min_survivors:
                c.add(f"round {r}: secure sum released with {len(e.participants)} inputs "
                      f"< min_survivors {min_survivors}: fewer noise shares than "
                      "accounted")
