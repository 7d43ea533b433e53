"""The ledger as a record: its chain and signatures, the form of each payload, the order of
its entries."""

from __future__ import annotations

from confide.audit.checks.base import CheckResult
from confide.audit.checks.loaded_run import LoadedRun
from confide.config import config_digest
from confide.logs import plural
from confide.privacy import ledger_events as ev
from confide.privacy.ledger import as_public_key, public_key_hex, verify_chain
from confide.privacy.receipts import ReceiptError, verify_head
from confide.privacy.secagg.identity import refusal_verifies


def check_chain(run: LoadedRun) -> CheckResult:
    """Every line canonical, indices 0..n-1, prev_hash links, entry hashes, and Ed25519
    signatures by the key in run_started (pinned by ledger_public_key.pem when the run
    folder has one, or by the key given to the audit)."""
    c = CheckResult("chain")
    if not run.ledger_found:
        c.add(f"{run.ledger_path} does not exist")
        return c
    if not run.lines:
        c.add("ledger is empty", 0)
        return c
    first = run.lines[0].entry
    stated = None
    if first is not None and isinstance(first.get("payload"), dict):
        stated = first["payload"].get("ledger_public_key")
    if run.pinned_key is not None and stated != run.pinned_key:
        c.add(f"run_started's ledger_public_key differs from {run.key_source}", 0)
    try:
        key = as_public_key(run.pinned_key or stated)  # type: ignore[arg-type]  # None: TypeError
    except (ValueError, TypeError):
        c.add("no usable ledger public key in run_started", 0)
        return c
    c.problems.extend(verify_chain(run.lines, key))
    c.detail = f"{len(run.lines)} entries; key {public_key_hex(key)[:16]}… from {run.key_source}"
    heads = _check_countersignatures(run, c)
    c.detail += (f"; {heads} chain heads countersigned by partners" if heads else
                 "; no chain head countersigned by a partner (an earlier version, or no "
                 "partner took part): only the server's signature stands behind it")
    return c


def _check_countersignatures(run: LoadedRun, c: CheckResult) -> int:
    """Each head_countersigned holds the partner's valid countersignature of this run's
    chain, naming an earlier entry with that entry's hash. Returns how many there are."""
    count = 0
    for i, e in run.events:
        if not isinstance(e, ev.HeadCountersigned):
            continue
        count += 1
        try:
            signed = verify_head(e.countersignature).payload
        except ReceiptError as exc:
            c.add(f"countersignature of partner {e.partner}: {exc}", i)
            continue
        named = (signed.get("partner"), signed.get("index"), signed.get("hash"))
        if named != (e.partner, e.index, e.hash) or signed.get("run") != run.run_key:
            c.add(f"head_countersigned of partner {e.partner} differs from what the partner "
                  "signed (partner, index, hash or run)", i)
        elif e.index >= i or (run.lines[e.index].entry or {}).get("entry_hash") != e.hash:
            c.add(f"partner {e.partner} countersigned entry {e.index} with another hash "
                  "than the chain's (the chain was rewritten after it)", i)
    return count


def check_payloads(run: LoadedRun) -> CheckResult:
    """Every payload has the fields and types of its entry type; run_started's config_digest
    is the digest of its config; every event's delta is the run's."""
    c = CheckResult("payloads")
    for index, reason in run.parsed.errors:
        c.add(reason, index)
    started = [(i, e) for i, e in run.events if isinstance(e, ev.RunStarted)]
    if started:
        i, start = started[0]
        if config_digest(start.config) != start.config_digest:
            c.add("config_digest is not the SHA-256 of the recorded config", i)
    for i, e in run.events:
        d = getattr(e, "delta", None)
        if d is not None and run.delta is not None and not isinstance(e, ev.RunStarted) \
                and d != run.delta:
            c.add(f"{e.TYPE} delta {d} differs from the run's delta {run.delta}", i)
        if isinstance(e, ev.SecureAggregationEvent):
            for refusal in e.refusals:
                if not refusal_verifies(refusal) or refusal.get("round") != e.round:
                    c.add(f"a partner's refusal of secure round {e.round} does not verify "
                          "(not signed by the identity it names, or another round's)", i)
    c.detail = f"{len(run.events)} typed events"
    secure = [e for _, e in run.events if isinstance(e, ev.SecureAggregationEvent)]
    earlier = sum(1 for e in secure if e.authenticated is None)
    if earlier:
        c.detail += (f"; {earlier} secure rounds recorded before partner identities and "
                     "consistency votes (they hold against an honest-but-curious server only)")
    elif secure:
        c.detail += f"; {sum(1 for e in secure if e.authenticated)} secure rounds authenticated"
    return c


def check_ordering(run: LoadedRun) -> CheckResult:
    """run_started first, run_finished last, rounds in order (a round may only be re-run
    after run_resumed)."""
    c = CheckResult("ordering")
    if not run.events or run.events[0][0] != 0 or \
            not isinstance(run.events[0][1], ev.RunStarted):
        c.add("the first entry is not run_started", 0)
    for reason, index in run.rounds.out_of_order:
        c.add(reason, index)
    c.detail = f"{plural(run.rounds.rounds_completed, 'round')} completed"
    return c
