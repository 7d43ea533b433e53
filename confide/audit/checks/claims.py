"""What the partners signed and what the run claims: receipts and refusals against their
signatures, every claimed epsilon against an independent replay."""

from __future__ import annotations

from confide.audit.checks.base import REL_TOLERANCE, CheckResult, close
from confide.audit.checks.loaded_run import LoadedRun
from confide.privacy import ledger_events as ev
from confide.privacy.mechanisms import SampledGaussian
from confide.privacy.receipts import (
    ReceiptError,
    mismatches,
    receipt_binding,
    verify_receipt,
)
from confide.privacy.refusals import (
    lifetime_spends,
    refusal_mismatches,
    verify_refusal,
)
from confide.privacy.replay import replay_sampled_gaussians

# what one example_dp event of a partner composes, and its round
RunEvent = tuple[SampledGaussian, int]


def check_receipts(run: LoadedRun) -> CheckResult:
    """Every example_dp carries the partner's receipt, validly signed by the key whose
    pseudonym is the partner, with the same numbers as the ledger; every signed budget
    refusal is valid, agrees with its entry and names this run."""
    c = CheckResult("receipts")
    count = unbound = 0
    for i, e in run.events:
        if not isinstance(e, ev.ExampleDpEvent):
            continue
        if e.receipt is None:
            c.add(f"example_dp of partner {e.partner} round {e.round} has no receipt", i)
            continue
        try:
            verify_receipt(e.receipt)
            bad = mismatches(e.receipt, e.to_payload())
            bound = receipt_binding(e.receipt)
        except ReceiptError as exc:
            c.add(f"receipt of partner {e.partner} round {e.round}: {exc}", i)
            continue
        if bound is None:
            unbound += 1
        elif bound.run != run.run_key:
            bad.append(f"it is signed for another run ({bound.run[:16]}…)")
        if bad:
            c.add(f"ledger differs from the partner's signed receipt: {'; '.join(bad)}", i)
        count += 1
    for i, e in run.events:
        if not isinstance(e, ev.BudgetRefusal) or e.receipt is None:
            continue  # refusals of earlier versions carry no signature
        try:
            rec = verify_refusal(e.receipt)
        except ReceiptError as exc:
            c.add(f"signed refusal of partner {e.partner} round {e.round}: {exc}", i)
            continue
        bad = refusal_mismatches(rec, e.to_payload())
        if run.run_key is not None and rec.payload.get("run") != run.run_key:
            bad.append("it is signed for another run")
        if bad:
            c.add(f"budget refusal differs from the partner's signed refusal: "
                  f"{'; '.join(bad)}", i)
        count += 1
    c.detail = f"{count} receipts valid"
    if unbound:
        c.detail += (f"; {unbound} of an earlier version, bound to no run, update or model "
                     "(produced without those guarantees)")
    return c


def check_replay(run: LoadedRun) -> CheckResult:
    """Every claimed epsilon recomputed independently from the ledger's events agrees
    (1 %): PLD claims by Opacus' PRV accountant (and never below its certified lower
    bound), RDP claims by dp-accounting's RDP; budget refusals state the spend the replay
    finds."""
    c = CheckResult("replay")
    replay = run.replay
    if replay.client_failure is not None:
        c.add(*replay.client_failure)
    current: dict[str, float] = {}  # partner -> replayed cumulative epsilon so far
    # this run's events per partner so far, for signed refusals
    history: dict[str, list[RunEvent]] = {}
    for i, e in run.events:
        if isinstance(e, ev.ExampleDpEvent):
            point = replay.example_at[i]
            current[e.partner] = point.epsilon
            history.setdefault(e.partner, []).append((e.mechanism.sampled_gaussian, e.round))
            if not close(e.epsilon_claimed, point.epsilon):
                c.add(f"partner {e.partner} round {e.round}: claimed epsilon "
                      f"{e.epsilon_claimed:.6g} ({e.accountant}), independent {point.method} "
                      f"replay {point.epsilon:.6g}", i)
            elif (low := point.lower_bound) is not None and \
                    e.epsilon_claimed < low * (1 - 1e-6):
                c.add(f"partner {e.partner} round {e.round}: claimed epsilon "
                      f"{e.epsilon_claimed:.6g} is below the PRV lower bound "
                      f"{low:.6g}: the claim under-states the spend", i)
        elif isinstance(e, ev.ClientDpEvent) and i in replay.client_at:
            if e.epsilon_claimed is not None and not close(e.epsilon_claimed,
                                                           replay.client_at[i]):
                c.add(f"round {e.round}: claimed client-level epsilon "
                      f"{e.epsilon_claimed:.6g}, replay {replay.client_at[i]:.6g}", i)
        elif isinstance(e, ev.BudgetRefusal):
            spent = current.get(e.partner, 0.0)
            if e.receipt is not None:  # signed lifetime spend (multi-run partners)
                _check_lifetime_refusal(run, c, i, e, spent, history.get(e.partner, []))
            elif not close(e.spent_epsilon, spent):  # earlier versions: this run only
                c.add(f"budget refusal of {e.partner}: spent epsilon {e.spent_epsilon:.6g}, "
                      f"replay {spent:.6g}", i)
            if not e.would_be_epsilon > e.max_epsilon:
                c.add(f"budget refusal of {e.partner} although {e.would_be_epsilon:.6g} "
                      f"<= max {e.max_epsilon:.6g}", i)
    examples = sum(1 for _, e in run.events if isinstance(e, ev.ExampleDpEvent))
    clients = sum(1 for _, e in run.events if isinstance(e, ev.ClientDpEvent))
    used = sorted({m for rep in replay.example.values() for m in rep.methods})
    c.detail = (f"{examples} example-level events of {len(replay.example)} partners "
                f"(replayed by {', '.join(used) or '-'}), {clients} client-level events")
    return c


def _check_lifetime_refusal(run: LoadedRun, c: CheckResult, i: int, e: ev.BudgetRefusal,
                            run_spent: float, run_events: list[RunEvent]) -> None:
    """A signed refusal states the partner's lifetime spend and the events behind it
    (earlier runs included). Replay those events independently; the stated spend must
    equal the replay, cover this run's replay (a lower bound of it), and its events must
    include every event this ledger records for the partner in this run."""
    try:
        rec = verify_refusal(e.receipt or {})
    except ReceiptError:
        return  # the receipts check names it
    pay = rec.payload
    spends, planned = lifetime_spends(rec)
    delta = run.delta if run.delta is not None else float(pay["delta"])
    signed = [s.mechanism for s in spends]
    lifetime = replay_sampled_gaussians(signed, delta, str(pay["accountant"]))
    would_be = replay_sampled_gaussians([*signed, planned.mechanism], delta,
                                        str(pay["accountant"]))
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
    signed_here = [(s.mechanism, s.round) for s in spends if s.run == run.run_key]
    for event in run_events:
        if event in signed_here:
            signed_here.remove(event)
        else:
            c.add(f"{who}: its signed lifetime events omit this run's round {event[1]} "
                  "(the stated spend leaves out budget this ledger records)", i)
            break
