"""The check across runs: a partner's signed budget refusal against the earlier run folders
the auditor has (`confide audit verify RUN --earlier-run DIR ...`).

A partner's budget covers every run on its data, so a refusal in this run states its
lifetime spend: the mechanism events behind it, each naming the run (ledger key) and round
it was spent in. The single-run checks replay that statement and compare it with this run's
own ledger. With an earlier run's folder the statement can be compared with that run's
ledger as well, in both directions: every event the refusal states for that run must be in
its ledger, and every event its ledger records for the partner must be in the statement (a
stated lifetime spend that leaves out recorded budget would let the partner, or a server
that altered a refusal, train past the budget unseen).

Runs the refusal names but the auditor has no folder for are listed, not failed. An
earlier run folder that no signed refusal of this run names fails: nothing could be
compared with it, and the audit must not read as if it had been (the wrong folder given,
or refusals that leave that run out).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from confide.audit.checks.base import CheckResult
from confide.audit.checks.integrity import check_chain
from confide.audit.checks.loaded_run import LoadedRun
from confide.privacy import ledger_events as ev
from confide.privacy.receipts import ReceiptError
from confide.privacy.refusals import lifetime_spends, verify_refusal

NAME = "earlier-runs"
# One spend as both sides name it: (round, noise multiplier, sample rate, steps)
SpendKey = tuple[int, float, float, int]


def check_earlier_runs(run: LoadedRun, earlier: tuple[LoadedRun, ...]) -> CheckResult:
    c = CheckResult(NAME)
    by_key: dict[str, LoadedRun] = {}
    for other in earlier:
        chain = check_chain(other)
        if chain.problems:
            c.add(f"earlier run {other.run_dir}: its ledger does not verify "
                  f"({chain.problems[0].reason}); its records cannot be compared")
            continue
        key = other.run_key
        if key is None or key == run.run_key:
            c.add(f"earlier run {other.run_dir}: "
                  + ("has no run_started entry" if key is None else "is this run itself"))
            continue
        by_key[key] = other
    refusals, unknown, named = 0, set[str](), set[str]()
    for i, e in run.events:
        if not isinstance(e, ev.BudgetRefusal) or e.receipt is None:
            continue
        try:
            signed = verify_refusal(e.receipt)
            spends, _ = lifetime_spends(signed)
        except ReceiptError:
            continue  # the receipts check names it
        refusals += 1
        stated: dict[str, Counter[SpendKey]] = {}
        for s in spends:
            m = s.mechanism
            stated.setdefault(s.run, Counter())[
                (s.round, m.noise_multiplier, m.sample_rate, m.steps)] += 1
        unknown.update(k for k in stated if k and k != run.run_key and k not in by_key)
        named.update(stated)
        for key, other in by_key.items():
            _compare(c, i, e.partner, stated.get(key, Counter()), other)
    for key, other in by_key.items():
        if key not in named:
            c.add(f"earlier run {other.run_dir}: no signed budget refusal of this run names "
                  f"it ({refusals} signed refusal(s) here), so nothing was compared with it")
    c.detail = f"{refusals} signed refusal(s) compared with {len(by_key)} earlier run(s)"
    if unknown:
        c.detail += (f"; {len(unknown)} run(s) they name not given (not compared): "
                     + ", ".join(sorted(k[:16] for k in unknown)))
    return c


def _compare(c: CheckResult, index: int, partner: str, stated: Counter[SpendKey],
             other: LoadedRun) -> None:
    recorded: Counter[SpendKey] = Counter(
        (e.round, e.noise_multiplier, e.sample_rate, e.steps) for _, e in other.events
        if isinstance(e, ev.ExampleDpEvent) and e.partner == partner)
    where = Path(other.run_dir)
    who = f"budget refusal of {partner}"
    for spend in sorted((recorded - stated).elements()):
        c.add(f"{who}: its stated lifetime spend leaves out round {spend[0]} of the earlier "
              f"run {where} (sigma {spend[1]:g}, rate {spend[2]:g}, {spend[3]} steps, "
              "recorded in that run's ledger)", index)
    for spend in sorted((stated - recorded).elements()):
        c.add(f"{who}: it states a spend in round {spend[0]} of the earlier run {where} "
              f"(sigma {spend[1]:g}, rate {spend[2]:g}, {spend[3]} steps) that the run's "
              "ledger does not record", index)
